"""The build-atlas flow's mistakes step (issue 23) and its site published while it runs (issue 24),
on a real Prefect server (test harness) and a real 2-worker Dask LocalCluster.

The data is test_confusions.py's probe: classes 0 and 2 drawn with the lime hexagon of class 5, so
that the shipped toy CNN calls many of their images class 5 (a known mistake to explain).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import read_artifact, read_task_runs

from lens_core.toy import ensure_toy_dataset

pytestmark = pytest.mark.slow

A, A2, B = 0, 2, 5
RED_DISC, GREEN_TRIANGLE, HEXAGON = 0, 4, 10
CLASSES = [str(A), str(A2), str(B)]
LENS = str(Path(sys.executable).with_name("lens"))


def _config(root: Path) -> dict[str, Any]:
    data = ensure_toy_dataset(
        f"file://{root}/probe",
        10,
        6,
        0,
        recipes={A: (RED_DISC, HEXAGON), A2: (GREEN_TRIANGLE, HEXAGON)},
    )
    return {
        "data": {"url": data, "images_per_class": 6},
        "patches": {"grid": 2},
        "concepts": {"n_concepts": 4},
        "importance": {"images": 2, "n_designs": 4},
        "crops": {"per_concept": 2, "attribution_images": 1},
        "maco": {"steps": 2, "image_size": 64, "crops": 2, "batch_size": 4},
        "mistakes": {"examples": 1},
        "store": f"file://{root}/store",
        "publish": f"file://{root}/site",
    }


@pytest.fixture(scope="module")
def flow_run(prefect_api, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from flows.atlas import build_atlas, make_task_runner, progress_listener

    root = tmp_path_factory.mktemp("flow-mistakes")
    seen: list[tuple[str, int, int]] = []
    flow = build_atlas.with_options(task_runner=make_task_runner(workers=2))
    with progress_listener(lambda kind, done, total: seen.append((kind, done, total))):
        state = flow(config=_config(root), classes=CLASSES, return_state=True)
    assert state.is_completed() and state.name == "Completed", state.message
    result = state.result()
    return {
        "root": root,
        "state": state,
        "result": result,
        "run_id": result["run_id"],
        "seen": seen,
    }


def test_the_flow_explains_mistakes_once_and_publishes_their_table(flow_run):
    from lens_core.confusions import read_confusions
    from lens_core.store import RunStore

    root, run_id, result = flow_run["root"], flow_run["run_id"], flow_run["result"]
    store = RunStore(f"file://{root}/store", run_id)
    report = read_confusions(store)
    assert report is not None and report["pairs"], "the step wrote atlas/confusions.json"
    assert (
        result["mistakes"]["pairs"] == len(report["pairs"])
        and result["mistakes"]["skipped"] is False
    )
    assert not result["steps_failed"]
    site = root / "site" / run_id
    assert (site / "mistakes.html").read_text().rstrip().endswith("</html>")
    assert (root / "store" / "runs" / run_id / "finished.json").exists()

    names = [r.name for r in read_task_runs(flow_run["state"].state_details.flow_run_id)]
    assert names.count("mistakes") == 1, names

    table = read_artifact(f"lens-mistakes-{run_id}")
    assert table is not None and table.type == "table"
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    top = report["pairs"][0]
    assert len(rows) == min(len(report["pairs"]), 20)
    assert rows[0]["images"] == top["images"]
    assert (
        rows[0]["true class"] == top["true_name"]
        and rows[0]["predicted class"] == top["predicted_name"]
    )
    assert (
        rows[0]["top concept of the predicted class"] == f"concept {top['concepts'][0]['concept']}"
    )
    assert rows[0]["share of the mistaken logit (%)"] == top["concepts"][0]["share"]
    assert f"{report['mistaken']} mistaken images" in table.description


def test_pages_are_published_while_the_run_goes_on(flow_run):
    """A class's page is written when its chain ends, before the final publish; the CLI's
    listener hears of it; the progress artifact gives the link; the final site is whole."""
    run_id, result = flow_run["run_id"], flow_run["result"]
    timings = result["timings"]
    assert timings["partial_page_writes"] >= 1 and timings["first_page"] > 0, timings
    assert any(kind == "site" for kind, _, _ in flow_run["seen"]), flow_run["seen"]
    progress = read_artifact(f"lens-progress-{run_id}")
    assert "site so far" in progress.description and run_id in progress.description
    site = flow_run["root"] / "site" / run_id
    pages = sorted(p.parent.name for p in (site / "classes").glob("*/index.html"))
    assert len(pages) == len(CLASSES), pages
    assert "rendering…" not in "".join(
        (site / "classes" / p / "index.html").read_text() for p in pages
    )


def _toml(cfg: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        return json.dumps(v)  # strings, numbers: TOML and JSON agree

    top = [f"{k} = {value(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    sections = [
        f"[{k}]\n" + "\n".join(f"{kk} = {value(vv)}" for kk, vv in v.items())
        for k, v in cfg.items()
        if isinstance(v, dict)
    ]
    return "\n".join(top) + "\n\n" + "\n\n".join(sections) + "\n"


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _lens(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return subprocess.run(
        [LENS, "run", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_a_finished_run_is_answered_without_prefect_or_dask(flow_run):
    """`lens run` on the finished run (same config): nothing runs, nothing is written; with
    --force-publish the site is written again from the store, the store untouched."""
    root, run_id = flow_run["root"], flow_run["run_id"]
    config = root / "run.toml"
    config.write_text(_toml(_config(root)))
    store_before, site_before = _snapshot(root / "store"), _snapshot(root / "site")

    out = _lens("--config", str(config), "--classes", ",".join(CLASSES), "--no-progress")
    assert out.returncode == 0, out.stderr
    assert f"LENS run {run_id}: finished" in out.stdout
    assert "no Prefect server or Dask cluster started" in out.stdout, out.stdout
    assert _snapshot(root / "store") == store_before  # no stage, status or marker written
    assert _snapshot(root / "site") == site_before

    out = _lens(
        "--config", str(config), "--classes", ",".join(CLASSES), "--no-progress", "--force-publish"
    )
    assert out.returncode == 0, out.stderr
    assert (
        "published again" in out.stdout
        and "no Prefect server or Dask cluster started" in out.stdout
    )
    after = _snapshot(root / "site")
    index = str(root / "site" / run_id / "index.html")
    assert after[index] > site_before[index]
    assert set(after) >= set(site_before)
    assert {k: v for k, v in _snapshot(root / "store").items() if not k.endswith("run.json")} == {
        k: v for k, v in store_before.items() if not k.endswith("run.json")
    }


def test_a_run_with_something_left_to_do_is_not_answered_early(flow_run):
    """No mistakes report, a render missing, or a class outside the finished selection: the
    normal path (the flow skips what is done)."""
    from flows.rerun import finished_unchanged
    from lens_core.config import make_config

    root, run_id = flow_run["root"], flow_run["run_id"]
    cfg = make_config(_config(root), classes=CLASSES)
    assert finished_unchanged(cfg) is not None
    assert finished_unchanged(make_config(_config(root), classes=[*CLASSES, "1"])) is None
    run = root / "store" / "runs" / run_id
    slug = next((run / "viz").iterdir()).name
    for paths in (
        [run / "atlas" / "confusions.json"],  # mistakes not explained
        [run / "crops" / slug / "_SUCCESS"],  # a class not complete
        [run / "viz" / slug / "_SUCCESS", *(run / "viz" / slug).glob("0.*")],
    ):  # a render to do
        saved = {p: p.read_bytes() for p in paths}
        for p in paths:
            p.unlink()
        try:
            assert finished_unchanged(cfg) is None, paths
        finally:
            for p, data in saved.items():
                p.write_bytes(data)
    assert finished_unchanged(cfg) is not None
