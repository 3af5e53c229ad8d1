"""``grand dashboard`` in a real headless Chromium: the page shows what ``grand status --json`` says."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from grand_pipeline.cli import app
from grand_pipeline.commit import commit
from grand_pipeline.dashboard import make_server
from grand_pipeline.run_meta import RunMeta
from grand_pipeline.sample import make_sample
from grand_pipeline.status import ETA_WINDOW, level_extras, shard_span, timeline

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
runner = CliRunner()


def grand(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


# ---------------------------------------------------------------------------------- pure parts
def test_span_is_started_to_finished() -> None:
    assert shard_span({"started": 100.0, "finished": 110.0, "seconds": 3}) == (100.0, 110.0)
    assert shard_span({"rows": 3, "seconds": 2}) is None  # no time at all


def test_timeline_spreads_rows_over_each_shard_span() -> None:
    markers = {"a": {"rows": 10, "started": 0.0, "finished": 10.0}, "b": {"rows": 30, "started": 10.0,
                                                                          "finished": 20.0}}
    points = timeline(markers, bins=4)
    assert [p["images_per_second"] for p in points] == [1.0, 1.0, 3.0, 3.0]
    assert sum(p["images_per_second"] * 5.0 for p in points) == pytest.approx(40)


def test_eta_from_commit_pace_and_graceful_without_timestamps() -> None:
    # Units commit, not shards: 2 of 10 units are committed while none of the 3 shards is whole.
    entry = {"units_total": 10, "units_committed": 2, "shards_total": 3, "shards_committed": 0}
    timed = {"a@00000": {"rows": 4, "started": 0.0, "finished": 50.0},
             "a@00001": {"rows": 4, "started": 50.0, "finished": 100.0}}
    extras = level_extras(entry, timed, now=200.0)
    assert extras["units_remaining"] == 8
    assert extras["eta_seconds"] == pytest.approx(400.0)  # 8 units left at 2 units / 100 s
    assert extras["wall_images_per_second"] == pytest.approx(0.08)
    untimed = level_extras(entry, {"a@00000": {"rows": 4}, "a@00001": {"rows": 4}}, now=200.0)
    assert untimed["eta_seconds"] is None and untimed["timeline"] == []
    assert untimed["units_remaining"] == 8
    done = level_extras({"units_total": 2, "units_committed": 2, "shards_total": 1, "shards_committed": 1}, {}, 0.0)
    assert (done["eta_seconds"], done["units_remaining"]) == (0.0, 0)


def test_eta_follows_the_latest_shards_not_a_resume_gap() -> None:
    day = 86_400.0
    early = {f"a{i}": {"rows": 1, "started": i * 100.0, "finished": i * 100.0 + 100} for i in range(10)}
    late = {f"b{i}": {"rows": 1, "started": day + i * 10.0, "finished": day + i * 10.0 + 10}
            for i in range(ETA_WINDOW)}
    entry = {"units_total": 70 + ETA_WINDOW, "units_committed": 10 + ETA_WINDOW}
    extras = level_extras(entry, {**early, **late}, now=2 * day)
    assert extras["units_remaining"] == 60
    assert extras["eta_seconds"] == pytest.approx(60 * 10.0)  # 60 left at 10 s per unit


# ---------------------------------------------------------------------------- server + browser
@pytest.fixture(scope="module")
def run_output(tmp_path_factory, tiny_cfg) -> Path:
    """Level 1 on two shards, level 2 on one of them: so level 2 is half done and has an ETA."""
    folder = tmp_path_factory.mktemp("dash-in")
    make_sample(str(folder), tiny_cfg, images=2, shard_id="sa_000000", start=1)
    make_sample(str(folder), tiny_cfg, images=1, shard_id="sa_000001", start=3)
    out = tmp_path_factory.mktemp("dash") / "out"
    base = ["run", "-i", str(folder), "-o", str(out), "--profile", "tiny-lite", "--executor", "local"]
    assert grand(*base).exit_code == 0
    assert grand(*base, "--level", "2", "--shards", "sa_000000").exit_code == 0
    return out


@pytest.fixture(scope="module")
def server(run_output: Path):
    srv = make_server(str(run_output), "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    srv.server_close()


@pytest.mark.slow
def test_server_is_read_only_and_local(server: str) -> None:
    assert server.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(server + "/") as response:
        assert "script-src 'self'" in response.headers["Content-Security-Policy"]
        assert b"/app.js" in response.read()
    for path in ("/../pyproject.toml", "/level1/sa_000000@00000.parquet", "/level1/sa_000000%4000000.parquet",
                 "/_run/units/sa_000000.json", "/etc/passwd"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(server + path)
        assert err.value.code == 404
    post = urllib.request.Request(server + "/api/status", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(post)
    assert err.value.code == 501


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip("needs Debian chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager never runs, so nothing is downloaded.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


@pytest.mark.slow
def test_page_shows_the_numbers_of_grand_status(server: str, browser, run_output: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    result = grand("status", "--output", str(run_output), "--json")
    assert result.exit_code == 0
    status = json.loads(result.output)
    browser.get(server + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"))
    assert not browser.find_element(By.ID, "error").is_displayed()

    rows = browser.find_elements(By.CSS_SELECTOR, "#levels tbody tr")
    assert [int(r.get_attribute("data-level")) for r in rows] == [e["level"] for e in status["levels"]]
    for entry in status["levels"]:
        row = browser.find_element(By.CSS_SELECTOR, f'#levels tr[data-level="{entry["level"]}"]')

        def text(field: str, row=row) -> str:
            return row.find_element(By.CSS_SELECTOR, f'td[data-field="{field}"]').text

        for field in ("units_committed", "units_total", "shards_committed", "shards_total", "images_ok",
                      "images_failed"):
            assert text(field) == str(entry[field]), (entry["level"], field)
        assert text("images_per_second") == f"{entry['images_per_second']:.2f}"
    by_level = {e["level"]: e for e in status["levels"]}
    # Each shard (2 images, 1 image) is one unit.
    assert (by_level[1]["units_committed"], by_level[1]["units_total"]) == (2, 2)
    assert (by_level[1]["shards_committed"], by_level[1]["shards_total"]) == (2, 2)
    assert (by_level[2]["units_committed"], by_level[2]["units_total"]) == (1, 2)
    assert (by_level[2]["shards_committed"], by_level[2]["shards_total"]) == (1, 2)
    eta = browser.find_element(By.CSS_SELECTOR, '#levels tr[data-level="1"] td[data-field="eta_seconds"]')
    assert eta.text == "done"
    eta2 = browser.find_element(By.CSS_SELECTOR, '#levels tr[data-level="2"] td[data-field="eta_seconds"]')
    assert eta2.text not in ("done", "unknown") and float(eta2.get_attribute("data-value")) > 0

    # One throughput line per level, and a shard matrix equal to the CLI's.
    lines = browser.find_elements(By.CSS_SELECTOR, "#chart polyline")
    assert sorted(int(p.get_attribute("data-level")) for p in lines) == [1, 2]
    cells = browser.find_elements(By.CSS_SELECTOR, "#matrix tbody td[data-state]")
    shown = {(c.find_element(By.XPATH, "..").get_attribute("data-shard"), c.get_attribute("data-level"),
              c.get_attribute("data-state")) for c in cells}
    expected = {(shard, lvl, state) for shard, row in status["matrix"].items() for lvl, state in row.items()}
    assert shown == expected
    failures = browser.find_elements(By.CSS_SELECTOR, "#failures tbody tr[data-name]")
    assert {(int(f.get_attribute("data-level")), f.get_attribute("data-name")) for f in failures} == {
        (e["level"], stage) for e in status["levels"] for stage in e["failures_by_stage"]
    }


@pytest.mark.slow
def test_status_prints_throughput_eta_and_the_shard_matrix(run_output: Path) -> None:
    result = grand("status", "--output", str(run_output))
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["level", "units", "shards"]
    assert lines[0].split()[-4:] == ["img/s", "wall", "img/s", "ETA"]
    level1 = next(line for line in lines if line.startswith("1 "))
    level2 = next(line for line in lines if line.startswith("2 "))
    assert level1.split()[1:3] == ["2/2", "2/2"] and level1.split()[-1] == "done"  # units, shards
    assert level2.split()[1:3] == ["1/2", "1/2"] and level2.split()[-1] not in ("done", "unknown")
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.startswith("sa_")}
    assert rows == {"sa_000000": ["x", "x"], "sa_000001": ["x", "."]}


def test_status_counts_units_and_marks_a_partial_shard(tmp_path: Path) -> None:
    from grand_pipeline.store import Store
    from grand_pipeline.units import ShardIndex, unit_id
    from tests.test_store import STATS, make_table

    out = tmp_path / "out"
    store = Store(str(out))
    RunMeta(store).record_shards(None, ["sa_000000", "sa_000001"])
    RunMeta(store).write_index(ShardIndex("sa_000000", 2, tuple(f"sa_{i}" for i in range(6))))  # three units
    RunMeta(store).write_index(ShardIndex("sa_000001", 2, ("sa_7",)))  # one unit
    for unit in (unit_id("sa_000000", 0), unit_id("sa_000000", 1), unit_id("sa_000001", 0)):
        assert commit(store, 1, unit, make_table(unit.split("@")[0], n=2), STATS, attempt=1)
    result = grand("status", "--output", str(out))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    level1 = next(line for line in lines if line.startswith("1 "))
    assert level1.split()[1:3] == ["3/4", "1/2"]  # units, shards
    assert level1.split()[-1] != "done"
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.startswith("sa_")}
    assert rows == {"sa_000000": ["~"], "sa_000001": ["x"]}
    status = json.loads(grand("status", "--output", str(out), "--json").output)
    assert status["matrix"] == {"sa_000000": {"1": "partial"}, "sa_000001": {"1": "committed"}}
    [entry] = status["levels"]
    assert (entry["units_committed"], entry["units_total"]) == (3, 4)
    assert level_extras(entry, store.committed(1), now=0.0)["units_remaining"] == 1


@pytest.mark.slow
def test_grand_dashboard_command_serves_the_status(run_output: Path) -> None:
    import re
    import subprocess
    import sys

    grand_bin = Path(sys.executable).parent / "grand"
    proc = subprocess.Popen([str(grand_bin), "dashboard", "--output", str(run_output), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, line + proc.stderr.read() if proc.poll() is not None else line
        with urllib.request.urlopen(f"http://127.0.0.1:{match.group(1)}/api/status") as response:
            served = json.loads(response.read())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    status = json.loads(grand("status", "--output", str(run_output), "--json").output)
    for got, want in zip(served["levels"], status["levels"], strict=True):
        assert {k: got[k] for k in want} == want  # the CLI's keys, unchanged
    assert served["matrix"] == status["matrix"] and served["run"]["profile"] == "tiny-lite"


def test_snapshot_shows_glamm_training_from_its_log(tmp_path: Path) -> None:
    from grand_pipeline.dashboard import snapshot, training_summary
    from grand_pipeline.store import Store

    out = tmp_path / "out"
    assert training_summary(Store(str(out))) is None
    (out / "glamm").mkdir(parents=True)
    lines = [{"step": s, "loss": 5.0 - s, "ce": 4.0, "bce": 0.5, "dice": 0.4, "lr": 1e-3, "samples_per_s": 9.5}
             for s in (1, 2, 3)]
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo'  # a line being written
    (out / "glamm" / "train_log.jsonl").write_text(text)
    training = snapshot(Store(str(out)))["training"]
    assert training["last"] == lines[-1]
    assert [p["loss"] for p in training["series"]] == [4.0, 3.0, 2.0]
