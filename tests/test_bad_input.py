"""Bad input through the pipeline: broken and hostile images, empty and oddly named classes, bad
checkpoints, impossible configs, unreachable or unauthorized storage. Each is refused with one clear
line naming what is wrong (no traceback soup), credentials never appear, and other classes finish.

The unit-level cases (each image mode, each checkpoint format) live in test_data.py,
test_models.py and test_config.py; these tests push the same inputs through the stages, the status
table (`lens status`), the published site and the `lens` command.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lens_core.config import ConfigError, make_config
from lens_core.data import EmptyClassError
from lens_core.models import CheckpointError
from lens_core.pipeline import prepare_run, run_class, stage_activations
from lens_core.status import read_status
from lens_core.store import StoreAccessError, StoreError
from lens_core.toy.generator import render_image

EVIL_NAME = "AC/DC ../../etc/passwd <script>alert(1)</script>"
SAFE = re.compile(r"[A-Za-z0-9_.-]+")


def _encode(array: np.ndarray, fmt: str, mode: str | None = None, **kw) -> bytes:
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _toy_png(cls: int, i: int) -> bytes:
    return _encode(render_image(cls, 10, 1000 + i)[0], "PNG")


def _bomb() -> bytes:
    """A small PNG whose header claims more pixels than the decompression-bomb limit."""
    buf = io.BytesIO()
    Image.new("1", (9500, 9500)).save(buf, format="PNG")
    return buf.getvalue()


def _hostile_and_odd(cls: int) -> dict[str, bytes]:
    """Readable odd modes, plus broken and hostile files under image names (value: readable?)."""
    rgb = render_image(cls, 10, 77)[0]
    good_jpeg = _encode(rgb, "JPEG", quality=90)
    grey16 = rgb[..., 0].astype(np.uint16) * 257
    return {
        "cmyk.jpg": _encode(rgb, "JPEG", "CMYK", quality=95),
        "grey16.png": _encode(grey16, "PNG"),
        "grey8.png": _encode(rgb, "PNG", "L"),
        "ünï cødé #1.png": _toy_png(cls, 99),
        "corrupt.jpg": b"this is not an image at all" * 20,
        "truncated.jpeg": good_jpeg[: len(good_jpeg) // 2],
        "zero.png": b"",
        "huge.png": BOMB,
        "tiff-in-disguise.jpg": _encode(rgb, "TIFF"),
        "postscript.jpg": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n",
    }


BOMB = _bomb()
UNREADABLE = {
    "corrupt.jpg",
    "truncated.jpeg",
    "zero.png",
    "huge.png",
    "tiff-in-disguise.jpg",
    "postscript.jpg",
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six classes: good, mixed (odd + broken + hostile files), empty, all broken, odd names."""
    root = tmp_path_factory.mktemp("bad-data") / "images"
    dirs = {
        "n01-good": 0,
        "n02-mixed": 1,
        "n03-empty": None,
        "n04-broken": None,
        "x..y <i>Ünï</i> ☕": 3,
        "n05": 4,
    }
    for name, cls in dirs.items():
        (root / name).mkdir(parents=True)
        if cls is not None:
            for i in range(5):
                (root / name / f"{i}.png").write_bytes(_toy_png(cls, i))
    for name, blob in _hostile_and_odd(1).items():
        (root / "n02-mixed" / name).write_bytes(blob)
    (root / "n03-empty" / "README.txt").write_text("no images here")
    for name in ("corrupt.jpg", "zero.png", "truncated.jpeg"):
        (root / "n04-broken" / name).write_bytes(_hostile_and_odd(2)[name])
    (root.parent / "names.json").write_text(json.dumps({"n01-good": "good", "n05": EVIL_NAME}))
    # the toy model has 10 outputs: the six folders say which label each holds
    labels = {
        "n01-good": 0,
        "n02-mixed": 1,
        "n03-empty": 2,
        "x..y <i>Ünï<": 3,
        "n05": 4,
        "n04-broken": 5,
    }
    (root.parent / "class_index.json").write_text(json.dumps(labels))
    return root


def _config(data_dir: Path, root: Path, **extra) -> dict:
    return {
        "data": {
            "url": str(data_dir),
            "class_names": str(data_dir.parent / "names.json"),
            "images_per_class": 20,
            "class_index": str(data_dir.parent / "class_index.json"),
        },
        "importance": {"images": 4, "n_designs": 16},
        "concepts": {"n_concepts": 4},
        "crops": {"per_concept": 3, "attribution_images": 1},
        "store": f"file://{root}/store",
        "publish": f"file://{root}/site",
        **extra,
    }


def test_bad_classes_fail_alone_with_their_reason(data_dir, tmp_path):
    from flows.cli import status_table
    from lens_core.publish import publish

    info = prepare_run(make_config(_config(data_dir, tmp_path)))
    by_id = {c.id: c for c in info.classes}
    assert by_id["n05"].name == EVIL_NAME and SAFE.fullmatch(by_id["n05"].slug)
    assert all(SAFE.fullmatch(c.slug) and ".." not in c.slug for c in info.classes)
    errors: dict[str, Exception] = {}
    for slug in info.slugs:
        try:
            run_class(info, slug)
        except Exception as err:  # noqa: BLE001 - each class fails on its own
            errors[slug] = err
    empty, broken = by_id["n03-empty"].slug, by_id["n04-broken"].slug
    assert set(errors) == {empty, broken}
    assert isinstance(errors[empty], EmptyClassError) and "'n03-empty'" in str(errors[empty])
    assert isinstance(errors[broken], EmptyClassError) and "no readable image" in str(
        errors[broken]
    )

    store = info.store()
    mixed = store.zarr[f"acts/{by_id['n02-mixed'].slug}"].attrs
    skipped = {url.rsplit("/", 1)[1]: reason for url, reason in mixed["skipped"]}
    # 5 toy + cmyk, grey16, grey8, unicode
    assert set(skipped) == UNREADABLE and mixed["n_images"] == 5 + 4
    assert skipped["zero.png"] == "empty file" and "truncated" in skipped["truncated.jpeg"]
    assert "decompression bomb" in skipped["huge.png"]
    for hostile in ("tiff-in-disguise.jpg", "postscript.jpg"):  # never handed to TIFF/Ghostscript
        assert "not a recognised image format" in skipped[hostile]

    rows = {r["class"]: r for r in status_table(store)}  # what `lens status` prints
    assert rows[empty]["state"] == rows[broken]["state"] == "failed"
    assert "has no images" in rows[empty]["error"] and "3 unreadable" in rows[broken]["error"]
    assert all(rows[s]["state"] == "completed" for s in info.slugs if s not in errors)
    for row in rows.values():
        assert "Traceback" not in row["error"] and "\n" not in row["error"]

    run_root = Path(store.root_path)  # nothing escapes the run, no unsafe name is written
    assert [p.name for p in run_root.parent.parent.iterdir()] == ["runs"]
    assert [p.name for p in run_root.parent.iterdir()] == [info.run_id]
    for path in run_root.rglob("*"):
        assert all(SAFE.fullmatch(part) for part in path.relative_to(run_root).parts), path

    publish(info)
    pages = "".join(p.read_text() for p in (tmp_path / "site").rglob("*.html"))
    assert "<script>alert(1)" not in pages and "&lt;script&gt;alert(1)" in pages
    classes = json.loads((tmp_path / "site" / info.run_id / "data" / "classes.json").read_text())
    listed = {c["slug"]: c for c in (classes["classes"] if isinstance(classes, dict) else classes)}
    assert listed[empty]["status"] == "failed" and listed[by_id["n05"].slug]["status"] == "ok"


class _Payload:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["other-architecture", "truncated", "pickled-code"])
def test_bad_checkpoint_fails_the_stage_cleanly(kind, data_dir, tmp_path):
    from lens_core.models import build_model
    from lens_core.toy import TOY_CHECKPOINT

    marker = tmp_path / "pwned"
    ckpt = tmp_path / f"{kind}.pt"
    if kind == "other-architecture":
        torch.save(build_model("resnet18", 10).state_dict(), ckpt)
    elif kind == "truncated":
        blob = TOY_CHECKPOINT.read_bytes()
        ckpt = tmp_path / "cut.safetensors"
        ckpt.write_bytes(blob[: len(blob) // 2])
    else:
        torch.save({"block1.0.weight": torch.zeros(1), "hook": _Payload(marker)}, ckpt)
    cfg = _config(data_dir, tmp_path, model={"checkpoint": str(ckpt)})
    expected = {
        "other-architecture": "does not match architecture 'toy'",
        "truncated": "truncated or corrupt",
        "pickled-code": "refusing checkpoint",
    }[kind]
    with pytest.raises(CheckpointError) as err:  # the run is refused at set-up, before any class
        prepare_run(make_config(cfg, classes=["n01-good"]))
    assert expected in str(err.value) and str(ckpt) in str(err.value)
    assert "Traceback" not in str(err.value) and err.value.__cause__ is None
    assert not marker.exists()  # the pickled payload never ran
    # a worker that meets the bad checkpoint (replaced after set-up) fails the stage cleanly too
    from dataclasses import replace

    from lens_core import model_cache

    good = prepare_run(make_config(_config(data_dir, tmp_path), classes=["n01-good"]))
    info = replace(good, config=make_config(cfg, classes=["n01-good"]))
    model_cache.clear()
    with pytest.raises(CheckpointError) as err:
        stage_activations(info, info.slugs[0])
    assert expected in str(err.value) and str(ckpt) in str(err.value)
    assert not marker.exists()
    rec = read_status(info.store(), info.slugs)[info.slugs[0]]["activations"]
    assert rec["state"] == "failed" and expected in rec["error"]
    assert not info.store().is_complete(f"acts/{info.slugs[0]}")


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({"model": {"std": [float("nan"), 0.2, 0.2]}}, "model.std", "finite"),
        ({"maco": {"lr": float("inf")}}, "maco.lr", "finite"),
        ({"patches": {"fraction": 0.001}}, "patches", "under 1 px"),
        ({"patches": {"grid": 40, "image_size": 32}}, "patches", "does not fit"),
        ({"concepts": {"max_iter": -3}}, "concepts.max_iter", "greater than 0"),
        (
            {
                "data": {"images_per_class": 2},
                "patches": {"grid": 1},
                "concepts": {"n_concepts": 3},
            },
            "n_concepts",
            "exceeds",
        ),
        ({"data": {"images_per_class": "forty"}}, "data.images_per_class", "integer"),
        ({"store": "zzz://bucket/lens"}, "store", "unknown storage protocol"),
        (
            {"publish": "s3://AKIAEXAMPLE:s3cr3t-in-url@bucket/site"},
            "publish",
            "credentials in URLs",
        ),
    ],
)
def test_impossible_config_is_refused_by_field(data, field, words):
    with pytest.raises(ConfigError) as err:
        make_config(data)
    msg = str(err.value)
    assert field in msg and words in msg and "Traceback" not in msg
    assert "s3cr3t" not in msg and "AKIAEXAMPLE" not in msg


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_store_names_the_url_never_the_secret(data_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LENS_STORE_RETRY_S", "0")
    secret = "never-print-this-secret-0123456789"
    opts = {
        "endpoint_url": f"http://127.0.0.1:{_closed_port()}",
        "key": "AKIANEVERPRINTED",
        "secret": secret,
        "config_kwargs": {"retries": {"total_max_attempts": 1}},
    }  # no botocore retries: fail at once
    cfg = make_config(_config(data_dir, tmp_path, store="s3://nowhere/lens", storage_options=opts))
    with caplog.at_level(logging.DEBUG), pytest.raises(StoreError) as err:
        prepare_run(cfg)
    msg = str(err.value)
    assert "s3://nowhere/lens/runs/" in msg and "unreachable" in msg, msg
    assert secret not in msg and "AKIANEVERPRINTED" not in msg and secret not in caplog.text
    assert err.value.__cause__ is None and err.value.__context__ is None


def test_unauthorized_bucket_names_the_url_never_the_secret(s3, bucket, data_dir, tmp_path, caplog):
    wrong = {**s3.storage_options, "secret": "wrong-" + s3.secret[::-1]}
    cfg = make_config(
        _config(data_dir, tmp_path, store=f"s3://{bucket}/lens", storage_options=wrong)
    )
    with caplog.at_level(logging.DEBUG), pytest.raises(StoreAccessError) as err:
        prepare_run(cfg)
    msg = str(err.value)
    assert (
        f"s3://{bucket}/lens/runs/" in msg
        and "access denied" in msg
        and isinstance(err.value, PermissionError)
    )
    for secret in (s3.secret, wrong["secret"]):
        assert secret not in msg and secret not in caplog.text
    assert s3.key not in msg


def _lens(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_lens_run_reports_bad_config_and_refused_credentials_in_one_line(
    s3, bucket, data_dir, tmp_path
):
    """`lens run` prints `lens: <reason>` and exits 2: no traceback, no credential."""
    bad = tmp_path / "bad.toml"  # wrong type, impossible value, NaN
    bad.write_text('[concepts]\nn_concepts = -4\nseed = "x"\n[model]\nstd = [nan, 0.2, 0.2]\n')
    out = _lens(["run", "--config", str(bad), "--no-progress"], {}, tmp_path)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and out.stderr.startswith("lens: invalid LENS config")
    assert all(f in out.stderr for f in ("concepts.n_concepts", "concepts.seed", "model.std"))

    cfg = tmp_path / "denied.toml"
    cfg.write_text(
        f'store = "s3://{bucket}/lens"\npublish = "{tmp_path}/site"\n'
        f'storage_options = {{ endpoint_url = "{s3.endpoint_url}" }}\n'
        f'[data]\nurl = "{data_dir}"\nimages_per_class = 12\nclass_index = '
        f'"{data_dir.parent / "class_index.json"}"\n'
    )
    wrong = "wrong-" + s3.secret[::-1]
    env = {
        "AWS_ACCESS_KEY_ID": s3.key,
        "AWS_SECRET_ACCESS_KEY": wrong,
        "LENS_STORE_RETRY_S": "0",
        # the store is refused before either is used: spare booting a Prefect API and a cluster
        "PREFECT_API_URL": "http://127.0.0.1:9/api",
        "LENS_DASK_ADDRESS": "tcp://127.0.0.1:9",
    }
    out = _lens(["run", "--config", str(cfg), "--no-progress"], env, tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert (
        "Traceback" not in out.stderr and f"access denied reading s3://{bucket}/lens" in out.stderr
    )
    for text in (out.stdout, out.stderr):
        assert wrong not in text and s3.secret not in text and s3.key not in text


def test_lens_run_reports_unknown_classes_and_a_foreign_checkpoint_in_one_line(data_dir, tmp_path):
    """Both are found before anything is submitted (no Prefect API or cluster is ever reached)."""
    from lens_core.models import build_model

    cfg = tmp_path / "ok.toml"
    cfg.write_text(
        f'store = "{tmp_path}/store"\npublish = "{tmp_path}/site"\n'
        f'[data]\nurl = "{data_dir}"\nimages_per_class = 12\nclass_index = '
        f'"{data_dir.parent / "class_index.json"}"\n'
    )
    env = {"PREFECT_API_URL": "http://127.0.0.1:9/api", "LENS_DASK_ADDRESS": "tcp://127.0.0.1:9"}
    out = _lens(
        ["run", "--config", str(cfg), "--classes", "n01-good,espresso", "--no-progress"],
        env,
        tmp_path,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and out.stderr.startswith(
        "lens: unknown classes: 'espresso'"
    )
    ckpt = tmp_path / "resnet18.pt"
    torch.save(build_model("resnet18", 10).state_dict(), ckpt)
    out = _lens(
        ["run", "--config", str(cfg), "--checkpoint", str(ckpt), "--no-progress"], env, tmp_path
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "does not match architecture 'toy'" in out.stderr
    assert str(ckpt) in out.stderr and not (tmp_path / "site").exists()
