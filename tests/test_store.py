"""lens_core.store.RunStore on a local directory and on a real S3 server: files, Zarr, markers."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from lens_core.store import RunStore, join_url, normalize_url


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict]:
    """(store URL, storage options) for each backend."""
    if request.param == "file":
        return f"file://{tmp_path}/store", {}
    s3 = request.getfixturevalue("s3")
    return f"s3://{s3.new_bucket()}/prefix", s3.storage_options


def test_files_round_trip(backend: tuple[str, dict]) -> None:
    url, opts = backend
    store = RunStore(url, "run1", opts)
    assert store.read_json("run.json") is None and store.list("status") == []
    store.write_json("run.json", {"classes": ["a", "b"], "n": 2})
    store.write_bytes("crops/alpha/0_1.webp", b"\x00\x01binary")
    store.write_bytes("crops/alpha/0_2.webp", b"")
    assert store.read_json("run.json") == {"classes": ["a", "b"], "n": 2}
    assert store.read_bytes("crops/alpha/0_1.webp") == b"\x00\x01binary"
    assert store.list("crops/alpha") == ["0_1.webp", "0_2.webp"]
    assert store.url("run.json") == join_url(normalize_url(url), "runs", "run1", "run.json")
    assert not store.files_complete("crops/alpha")
    store.mark_files_complete("crops/alpha")
    assert store.files_complete("crops/alpha")
    again = RunStore(url, "run1", opts)  # a fresh handle sees what was written
    assert again.files_complete("crops/alpha") and again.exists("run.json")
    again.remove("crops/alpha")
    assert not store.exists("crops/alpha/0_1.webp") and not store.files_complete("crops/alpha")
    assert RunStore(url, "other", opts).read_json("run.json") is None  # runs are separate


def test_zarr_groups_and_markers(backend: tuple[str, dict]) -> None:
    url, opts = backend
    store = RunStore(url, "run1", opts)
    a = np.arange(60, dtype=np.float32).reshape(12, 5)
    group = store.group("acts/alpha", fresh=True)
    arr = group.create_array("A", shape=a.shape, chunks=(5, 5), dtype=a.dtype)
    arr[:] = a
    group.attrs.update({"image_urls": ["u0", "u1"]})
    assert not store.is_complete("acts/alpha")  # written but not marked
    store.mark_complete("acts/alpha", n_patches=12)
    fresh = RunStore(url, "run1", opts)
    assert fresh.is_complete("acts/alpha")
    g = fresh.get_group("acts/alpha")
    assert np.array_equal(g["A"][:], a) and g["A"].chunks == (5, 5)
    assert g.attrs["n_patches"] == 12 and g.attrs["image_urls"] == ["u0", "u1"]
    assert fresh.get_group("acts/missing") is None and not fresh.is_complete("acts/missing")


def test_fresh_group_drops_partial_work(backend: tuple[str, dict]) -> None:
    url, opts = backend
    store = RunStore(url, "run1", opts)
    partial = store.group("concepts/beta")
    partial.create_array("U", shape=(3, 2), dtype="f4")[:] = 1.0
    partial.attrs["stale"] = True
    kept = store.group("concepts/beta")  # not fresh: leftovers stay
    assert "U" in kept and kept.attrs["stale"] is True
    clean = RunStore(url, "run1", opts).group("concepts/beta", fresh=True)
    assert "U" not in clean and "stale" not in clean.attrs
    assert not store.is_complete("concepts/beta")


def test_many_workers_open_a_fresh_store_at_once(tmp_path: Path) -> None:
    """The first stage of every class opens lens.zarr's root at the same moment on a fresh store:
    none may fail because another created it in between (zarr's open-or-create is not atomic)."""
    import threading

    url, n = f"file://{tmp_path}/store", 12
    start, errors, groups = threading.Barrier(n), [], []

    def open_root(i: int) -> None:
        start.wait()
        try:
            store = RunStore(url, "run1")
            groups.append(store.group(f"acts/c{i}"))
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    for _ in range(5):
        threads = [threading.Thread(target=open_root, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        assert sorted(RunStore(url, "run1").zarr["acts"].group_keys()) == sorted(
            f"c{i}" for i in range(n)
        )
        shutil.rmtree(tmp_path / "store")
