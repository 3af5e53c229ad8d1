"""CLI misuse: every mistake is one line on stderr and exit code 2, and a refused run writes nothing.

No model runs here: every command is refused before the first unit, on hand-committed outputs
and empty tar files (level >= 2 only lists the input; Level 1 is refused before indexing).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from grand_pipeline.cli import app
from grand_pipeline.commit import commit
from grand_pipeline.run_meta import RunMeta
from grand_pipeline.schemas import STATUS_OK, level_schema
from grand_pipeline.store import Store
from grand_pipeline.units import unit_id

PROFILE = "tiny-lite"
runner = CliRunner()


def grand(*args: str):
    return runner.invoke(app, list(args))


def assert_one_line_error(result, *names: str) -> str:
    """Exit 2, no traceback, one line that names every string of ``names``."""
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output and len(lines) == 1, result.output
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def commit_level(out: Path, level: int, shard: str, images: int = 2) -> None:
    schema = level_schema(level)
    rows = []
    for i in range(images):
        row = {f.name: ([] if pa.types.is_list(f.type) else None) for f in schema}
        row.update(image_id=f"{shard}-{i}", shard_id=shard, file_name=f"{shard}-{i}.jpg", width=8, height=8,
                   status=STATUS_OK, provenance={"config_hash": "abc", "backends": [], "prompt_versions": []})
        rows.append(row)
    store = Store(str(out))
    assert commit(store, level, unit_id(shard, 0), pa.Table.from_pylist(rows, schema=schema), {"seconds": 1.0}, 1)


def status_json(out: Path) -> dict:
    result = grand("status", "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture()
def demo(tmp_path: Path) -> Path:
    """``make demo``'s layout: the input tar and a run over it (levels 1-2 committed) side by side."""
    (tmp_path / "sa_000000.tar").write_bytes(b"")
    out = tmp_path / "out"
    for level in (1, 2):
        commit_level(out, level, "sa_000000")
    RunMeta(Store(str(out))).record_shards(None, ["sa_000000"])
    return tmp_path


def test_output_inside_the_input_is_refused_and_status_is_unchanged(demo: Path) -> None:
    out = demo / "out"
    before, files = status_json(out), tree(demo)
    # The exact mistaken command: the input folder holds the output folder itself.
    result = grand("run", "--input", str(demo), "--output", str(out), "--level", "3", "--profile", PROFILE)
    assert_one_line_error(result, str(out), str(demo), "inside")
    assert status_json(out) == before and tree(demo) == files
    assert [e["shards_total"] for e in before["levels"]] == [1, 1]
    # The same folder for both, and a path that reaches it through "..", are refused too.
    same = grand("run", "-i", str(demo), "-o", str(demo), "--profile", PROFILE)
    assert_one_line_error(same, "inside")
    dotted = grand("run", "-i", str(demo / "out" / ".."), "-o", str(out), "--level", "3", "--profile", PROFILE)
    assert_one_line_error(dotted, "inside")
    assert tree(demo) == files


def test_a_level_without_its_prerequisite_records_no_phantom_shard(demo: Path, tmp_path: Path) -> None:
    other = tmp_path / "other_input"
    other.mkdir()
    (other / "sa_000099.tar").write_bytes(b"")
    out = demo / "out"
    before = status_json(out)
    result = grand("run", "-i", str(other), "-o", str(out), "--level", "3", "--profile", PROFILE)
    assert_one_line_error(result, "level 3 needs level 2")
    after = status_json(out)
    assert after == before and after["shards"] == ["sa_000000"]


@pytest.mark.parametrize(
    ("flag", "value", "names"),
    [
        ("--levels", "3-1", ["--levels", "3-1"]),
        ("--levels", "0-2", ["level 0"]),
        ("--levels", "one", ["--levels", "one"]),
        ("--limit", "0", ["--limit 0", ">= 1"]),
        ("--limit", "-1", ["--limit -1", ">= 1"]),
    ],
)
def test_bad_levels_and_limits_are_one_line_and_create_nothing(
    demo: Path, tmp_path: Path, flag: str, value: str, names: list[str]
) -> None:
    out = tmp_path / "new_out"
    result = grand("run", "-i", str(demo / "sa_000000.tar"), "-o", str(out), flag, value, "--profile", PROFILE)
    assert_one_line_error(result, *names)
    assert not out.exists()


def _unwritable(tmp_path: Path) -> str:
    if os.geteuid() == 0:
        pytest.skip("running as root: permission bits do not stop root, so a read-only folder is writable")
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    return str(folder / "out")


@pytest.mark.parametrize(
    ("where", "reason"),
    [
        (lambda tmp: str(tmp / "a_file"), "is a file"),
        (lambda tmp: str(tmp / "a_file" / "out"), "under the file"),
        (lambda tmp: "/proc/grand-out", "not writable"),
        (_unwritable, "not writable"),
    ],
    ids=["file", "under-a-file", "proc", "read-only-folder"],
)
def test_an_unusable_output_is_one_line_naming_it(demo: Path, tmp_path: Path, where, reason: str) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    out = where(tmp_path)
    # Level 1 of a fresh output has work to do, so the run gets as far as the output check.
    result = grand("run", "-i", str(demo / "sa_000000.tar"), "-o", out, "--profile", PROFILE)
    assert_one_line_error(result, out, reason)


def test_read_commands_on_a_missing_or_wrong_output(demo: Path, tmp_path: Path) -> None:
    missing, a_file = tmp_path / "no_such_run", tmp_path / "a_file"
    a_file.write_text("x")
    assert_one_line_error(grand("status", "-o", str(missing)), str(missing), "does not exist")
    assert_one_line_error(grand("status", "-o", str(a_file), "--json"), str(a_file), "is a file")
    assert_one_line_error(grand("plan", "-o", str(missing), "--gpus", "1", "--profile", PROFILE), str(missing))
    assert_one_line_error(grand("export", "-o", str(missing), "--to", str(tmp_path / "x")), str(missing))
    assert_one_line_error(
        grand("show", "-o", str(demo / "out"), "--image", "nope", "--to", str(tmp_path / "x.png")), "'nope'"
    )
    assert not missing.exists()


ORT_PROBE = """
import onnxruntime
calls = []
onnxruntime.disable_telemetry_events = lambda: calls.append(1)
from grand_pipeline.config import ModelSpec
from grand_pipeline.models.backends.nanodet import NanoDetONNX
NanoDetONNX(ModelSpec(backend="nanodet_onnx"))
print(len(calls))
"""


def test_onnxruntime_sessions_turn_telemetry_off_and_write_nothing_under_home(tmp_path: Path) -> None:
    """The detector turns telemetry events off; onnxruntime's import-time device id goes to
    $XDG_CACHE_HOME (the README's advice), so nothing appears under $HOME."""
    import subprocess
    import sys

    home, xdg = tmp_path / "home", tmp_path / "xdg"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(xdg), "GRAND_CACHE_DIR": str(tmp_path / "grand")}
    done = subprocess.run([sys.executable, "-c", ORT_PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "1"  # disable_telemetry_events() ran before the session
    assert tree(home) == []
    # Whether onnxruntime writes its device id at all depends on the build and the
    # environment (a CI run saw none); when it does, it lands under $XDG_CACHE_HOME.
    if xdg.exists():
        assert all(path.startswith("Microsoft") for path in tree(xdg))
