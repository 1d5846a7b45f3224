"""The `lens` command: `run --help`, config errors, `status` on a store, `serve` of a published
site.

The store and site come from the lens_core stages run in-process on tiny budgets (no Prefect or
Dask here: tests/test_flow.py covers the flow); `serve` and the config error run the real console
script in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tiny import run_isolated, tiny_config, write_toml

from flows.cli import main

LENS = str(Path(sys.executable).with_name("lens"))
SMALL_DATA = {"toy_images_per_class": 2, "images_per_class": 2}


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory):
    """A run with two explained classes and one failed class, and its published site."""
    from lens_core import cross_class, publish, renders
    from lens_core.config import make_config
    from lens_core.pipeline import prepare_run, run_class
    from lens_core.status import write_status

    root = tmp_path_factory.mktemp("cli")
    cfg = make_config(
        tiny_config(root, data=SMALL_DATA),
        classes=["0", "1", "2"],
    )
    info = prepare_run(cfg)
    ok, bad = info.slugs[:2], info.slugs[2]
    for slug in ok:
        run_class(info, slug)
    renders.render_batch(info, renders.pending_items(info, ok))
    renders.finalize_viz(info, ok)
    write_status(
        info.store(), bad, "activations", "failed", 0.1, "EmptyClassError: no readable image here"
    )
    cross_class.build_cross_class(info)
    publish.publish(info)
    return {"root": root, "info": info, "ok": ok, "bad": bad}


def test_run_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--config",
        "--classes",
        "--store",
        "--publish",
        "--checkpoint",
        "--workers",
        "--dask-address",
        "--no-progress",
    ):
        assert option in out


def test_bad_config_is_one_line_naming_the_field_and_exit_code_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[concepts]\nn_concepts = 0\n")
    proc = subprocess.run(
        [LENS, "run", "--config", str(bad), "--store", f"file://{tmp_path}/store"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr  # no traceback
    assert lines[0].startswith("lens: ") and "concepts.n_concepts" in lines[0]
    assert not (tmp_path / "store").exists()  # nothing started, nothing written


def test_unknown_field_is_named_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "typo.toml"
    bad.write_text("[maco]\nstepz = 3\n")
    assert main(["run", "--config", str(bad)]) == 2
    assert "maco.stepz" in capsys.readouterr().err


def test_status_prints_the_per_class_table(
    published, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # one table row per line
    store_url = f"file://{published['root']}/store"
    assert main(["status", "--store", store_url]) == 0
    out = capsys.readouterr().out
    assert f"LENS run {published['info'].run_id}" in out
    rows = {
        slug: next(line for line in out.splitlines() if slug in line)
        for slug in (*published["ok"], published["bad"])
    }
    for slug in published["ok"]:
        cells = [c.strip() for c in rows[slug].split("│") if c.strip()]
        assert cells[:7] == [
            slug,
            "completed",
            "completed",
            "completed",
            "completed",
            "completed",
            "completed",
        ]
    assert "failed" in rows[published["bad"]] and "no readable image here" in rows[published["bad"]]
    assert "3 classes, 1 failed" in out


def test_status_without_a_run_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--store", f"file://{tmp_path}/empty"]) == 1
    assert "no run found" in capsys.readouterr().err


def test_serve_serves_the_index_and_a_class_page(published) -> None:
    site = published["root"] / "site"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [LENS, "serve", "--publish", f"file://{site}", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, (
            line,
            proc.stderr.read() if proc.poll() is not None else "",
        )
        base = line.split("http://", 1)[1].split("/", 1)[0]
        run_id, slug = published["info"].run_id, published["ok"][0]
        index = _get(f"http://{base}/{run_id}/index.html")
        assert f"classes/{slug}/" in index
        page = _get(f"http://{base}/{run_id}/classes/{slug}/index.html")
        assert published["info"].cls(slug).name in page
        # the runs page above the run
        assert f'href="{run_id}/index.html"' in _get(f"http://{base}/")
        with pytest.raises(urllib.error.HTTPError) as missing:
            _get(f"http://{base}/{run_id}/classes/no-such-class/index.html")
        assert missing.value.code == 404
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _get(url: str, tries: int = 50) -> str:
    for _ in range(tries):
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback only
                assert resp.status == 200
                return resp.read().decode()
        except urllib.error.URLError as err:
            if isinstance(err, urllib.error.HTTPError):
                raise
            time.sleep(0.1)
    raise AssertionError(f"no answer from {url}")


COUNT_LOADS = """
import sys
import lens_core.run as run
from flows.cli import main

loads = []
load = run.load_split_model
run.load_split_model = lambda *a, **k: loads.append(1) or load(*a, **k)
code = main(sys.argv[1:])
print(f"checkpoint loads in the lens process: {len(loads)}")
sys.exit(code)
"""


def test_lens_run_reads_the_checkpoint_once_and_passes_the_config_object(tmp_path: Path) -> None:
    """`lens run` prepares the run before starting Prefect or Dask; the flow takes that run as it
    is (`flows.atlas.prepared_run`): the checkpoint is loaded and hashed once in its process."""
    toml = write_toml(
        tiny_config(tmp_path, data=SMALL_DATA),
        tmp_path / "atlas.toml",
    )
    args = ["run", "--config", str(toml), "--classes", "0", "--no-progress"]
    proc = run_isolated([sys.executable, "-c", COUNT_LOADS, *args], tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "checkpoint loads in the lens process: 1" in out, out
    assert (tmp_path / "site").is_dir(), out
