"""The dependency rules of ARCHITECTURE.md, checked on the source: the allow-list table is read
from the document and every project import must be allowed by it; levels stand side by side,
training is reached only through entry points, geometry stays a pure kernel library."""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
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


PACKAGES = ("grand_pipeline", "levels", "prompts")


def project_modules() -> dict[str, Path]:
    """Dotted name -> file of every project module (a package is its ``__init__.py``)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


@dataclass(frozen=True)
class Row:
    name: str
    modules: tuple[str, ...]  # patterns: ``x`` exactly, ``x.*`` x and below, ``<N>`` one level number
    allows: tuple[str, ...]  # row names and module patterns


def allow_list() -> list[Row]:
    """The rows of ARCHITECTURE.md's "Dependency rules" table, in order."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    section = text.split("## Dependency rules", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("row", "---"):
            continue
        items = [item.strip() for item in cells[2].split(",") if item.strip() not in ("-", "")]
        rows.append(Row(cells[0], tuple(re.findall(r"`([^`]+)`", cells[1])), tuple(i.strip("`") for i in items)))
    return rows


def pattern_matches(pattern: str, module: str) -> re.Match[str] | None:
    regex = re.escape(pattern).replace(re.escape("<N>"), r"(\d+)")
    if pattern.endswith(".*"):
        regex = regex[: -len(re.escape(".*"))] + r"(?:\..+)?"
    return re.fullmatch(regex, module)


def row_of(module: str, rows: list[Row]) -> tuple[Row, list[str]] | None:
    """The first row covering ``module`` and its own patterns (a level's ``<N>`` bound to it)."""
    for row in rows:
        for pattern in row.modules:
            if m := pattern_matches(pattern, module):
                own = [p.replace("<N>", m.group(1)) if "<N>" in p else p for p in row.modules]
                return row, own
    return None


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an imported name lands in (``pkg.attr`` -> ``pkg``), or None."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_the_allow_list_is_read_and_covers_every_module() -> None:
    rows = allow_list()
    assert [r.name for r in rows][:2] == ["leaves", "geometry"] and len(rows) >= 10
    names = {r.name for r in rows}
    for row in rows:
        unknown = [a for a in row.allows if "." not in a and a not in names and a not in PACKAGES]
        assert unknown == [], f"row {row.name} allows unknown rows {unknown}"
    uncovered = [m for m in project_modules() if row_of(m, rows) is None]
    assert uncovered == [], "add these modules to a row of ARCHITECTURE.md's allow-list"


def test_every_project_import_is_allowed_by_architecture_md() -> None:
    rows, modules = allow_list(), project_modules()
    by_name = {r.name: r for r in rows}
    offenders = []
    for module, path in modules.items():
        found = row_of(module, rows)
        if found is None:
            continue  # reported by the coverage test
        row, own = found
        allowed = own + [p for a in row.allows for p in (by_name[a].modules if a in by_name else (a,))]
        for name in imported_modules(path):
            target = resolve(name, modules)
            if target is None or target == module:
                continue
            if not any(pattern_matches(p, target) for p in allowed if "<N>" not in p):
                offenders.append(f"{path.relative_to(ROOT)} ({row.name}) imports {target}")
    assert sorted(set(offenders)) == []


def test_nothing_allows_training_from_outside_it() -> None:
    rows = allow_list()
    outside = [r.name for r in rows if r.name != "training" and "training" in r.allows]
    assert outside == [] and not any("training" in a for r in rows if r.name != "training" for a in r.allows)


def test_ray_is_imported_at_module_level_only_by_the_engine_and_training() -> None:
    offenders = []
    for module, path in project_modules().items():
        if module.startswith(("grand_pipeline.engine", "grand_pipeline.training")):
            continue
        for node in ast.parse(path.read_text()).body:  # module level only: lazy imports are fine
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{module} imports {n}" for n in names if n == "ray" or n.startswith("ray.")]
    assert offenders == []


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
