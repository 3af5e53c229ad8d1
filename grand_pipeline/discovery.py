"""Import every module of a package, so that their registration decorators run.

Registries (backends, prompts, levels) are filled at import; discovering the package's modules
means adding a file is enough to add an entry, with no list to keep in sync.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def import_submodules(package: ModuleType) -> list[str]:
    names = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        importlib.import_module(f"{package.__name__}.{info.name}")
        names.append(info.name)
    return names
