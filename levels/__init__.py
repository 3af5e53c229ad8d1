"""Stage logic per level (``level1`` ... ``level4``). Importing this package registers every level."""

import sys

from grand_pipeline.discovery import import_submodules

import_submodules(sys.modules[__name__])
