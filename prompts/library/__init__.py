"""The built-in prompts, one module each; importing the package registers them."""

import sys

from grand_pipeline.discovery import import_submodules

import_submodules(sys.modules[__name__])
