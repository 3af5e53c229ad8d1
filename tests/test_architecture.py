"""The dependency rules of ARCHITECTURE.md, checked on the source: levels stand side by side,
training is reached only through entry points, geometry stays a pure kernel library."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEVEL_DIRS = sorted(p for p in (ROOT / "levels").iterdir() if re.fullmatch(r"level\d+", p.name))
CORE = ROOT / "grand_pipeline"
GEOMETRY_ALLOWED = {"numpy", "torch", "pycocotools"}


def imported_modules(path: Path) -> list[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            # ``from pkg import sub`` may import a submodule: count both names.
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def test_the_levels_are_found() -> None:
    assert [p.name for p in LEVEL_DIRS] == ["level1", "level2", "level3", "level4"]


@pytest.mark.parametrize("level_dir", LEVEL_DIRS, ids=lambda p: p.name)
def test_a_level_never_imports_another_level(level_dir: Path) -> None:
    own = level_dir.name
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted(level_dir.glob("*.py"))
        for name in imported_modules(path)
        if (m := re.match(r"levels\.(level\d+)\b", name)) and m.group(1) != own
    ]
    assert offenders == []


def test_the_core_never_imports_training() -> None:
    training = CORE / "training"
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted(CORE.rglob("*.py"))
        if training not in path.parents
        for name in imported_modules(path)
        if name == "grand_pipeline.training" or name.startswith("grand_pipeline.training.")
    ]
    assert offenders == []


def test_geometry_imports_only_numpy_torch_pycocotools_and_the_stdlib() -> None:
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((CORE / "geometry").glob("*.py"))
        for name in imported_modules(path)
        if name.split(".")[0] not in GEOMETRY_ALLOWED | set(sys.stdlib_module_names)
        and not name.startswith("grand_pipeline.geometry")
    ]
    assert offenders == []
