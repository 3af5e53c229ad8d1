"""Every registered stage of every level against the declared schemas (the timm pattern: a stage
registered in a level's ``STAGES`` is checked here without a test of its own).

- each typed output (``provides`` with an Arrow type) is a column of its level's schema, same type;
- each input (``requires``) is a record attribute, a column of the previous level, or an output of
  an earlier stage of the same level, so a level N+1 mismatch fails here and not on the cluster;
- every column a level adds to the schema is written by one of its stages.
"""

from __future__ import annotations

import pytest

import levels  # noqa: F401 - importing the package registers every level
from grand_pipeline.schemas import COMMON_FIELDS, level_schema
from grand_pipeline.stage import RECORD_ATTRIBUTES
from levels.base import LEVELS, LevelSpec

SPECS = [LEVELS.get(name) for name in sorted(LEVELS.names(), key=int)]


def previous_columns(spec: LevelSpec) -> set[str]:
    """Columns a level reads from the level before it (none for level 1: it reads the source)."""
    return set(level_schema(spec.number - 1).names) if spec.number > 1 else set()


def new_columns(spec: LevelSpec) -> set[str]:
    """Columns the level's schema adds to the previous level's (and to the common ones)."""
    common = {f.name for f in COMMON_FIELDS}
    return set(spec.schema.names) - previous_columns(spec) - common


def test_every_level_is_registered() -> None:
    assert [spec.number for spec in SPECS] == [1, 2, 3, 4]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"level{s.number}")
def test_typed_outputs_are_schema_columns_of_the_same_type(spec: LevelSpec) -> None:
    wrong = [
        f"{stage.name}:{key} is {tp}, schema says "
        f"{spec.schema.field(key).type if key in spec.schema.names else 'no such column'}"
        for stage in spec.stages
        for key, tp in stage.provides.items()
        if tp is not None and (key not in spec.schema.names or spec.schema.field(key).type != tp)
    ]
    assert wrong == []


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"level{s.number}")
def test_inputs_are_met_by_the_record_the_previous_level_or_an_earlier_stage(spec: LevelSpec) -> None:
    available = set(RECORD_ATTRIBUTES) | previous_columns(spec)
    unmet = []
    for stage in spec.stages:
        unmet += [f"{stage.name}:{key}" for key in stage.requires if key not in available]
        available |= set(stage.provides)
    assert unmet == []


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"level{s.number}")
def test_every_new_column_is_written_by_a_stage(spec: LevelSpec) -> None:
    written = {key for stage in spec.stages for key, tp in stage.provides.items() if tp is not None}
    assert new_columns(spec) - written == set()
    assert new_columns(spec)  # a level that adds nothing is a wiring mistake
