"""Built-in backends, one module each. Importing this package registers them all in
``roles.BACKENDS``; a new module here is picked up without editing this file."""

import sys

from grand_pipeline.discovery import import_submodules

import_submodules(sys.modules[__name__])
