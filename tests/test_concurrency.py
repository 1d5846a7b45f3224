"""Nothing is lost when writers meet (issue 21, items 1-3).

Labels and run.json are read-modify-writes of one JSON file; `RunStore.update_json` keeps
concurrent writers apart with the store's own means (S3 conditional puts, a file lock on disk).
Each race here runs real processes, released together at a barrier, several trials in a row, on
local disk and on a real S3 server (SeaweedFS), and checks that every write is kept.
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lens_core import layout
from lens_core.labels import LabelError, carry_labels, import_labels, read_labels, set_label
from lens_core.store import RunStore

WRITERS = 5
TRIALS = 6
LENS = str(Path(sys.executable).with_name("lens"))
CTX = multiprocessing.get_context("spawn")  # fresh processes: no inherited S3 client or threads


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any] | None]:
    """(store URL, storage options) on local disk, then on the S3 test server."""
    if request.param == "local":
        return f"file://{tmp_path}/store", None
    s3 = request.getfixturevalue("s3")
    return f"s3://{s3.new_bucket()}/store", s3.storage_options


def _with_concepts(store: RunStore, slugs: list[str], k: int) -> None:
    """Give each class a W of k concepts: what set_label checks concept numbers against."""
    for slug in slugs:
        store.group(layout.concepts(slug)).create_array("W", shape=(k, 4), dtype="float32")


def _race(target: Any, args_of: list[tuple]) -> None:
    """Start one process per argument tuple (each gets the shared barrier last) and wait for all."""
    barrier = CTX.Barrier(len(args_of))
    procs = [CTX.Process(target=target, args=(*args, barrier)) for args in args_of]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0] * len(procs)


# ---- the processes ---------------------------------------------------------------------------
def _label_writer(store_url: str, opts: Any, slugs: list[str], me: int, barrier: Any) -> None:
    store = RunStore(store_url, "run000000001", opts)
    for slug in slugs:  # one trial per class: all writers label it at the same instant
        barrier.wait(timeout=300)
        set_label(store, slug, me, f"label {me} of {slug}")


def _user_labeller(store_url: str, opts: Any, slug: str, n: int, barrier: Any) -> None:
    store = RunStore(store_url, "run000000001", opts)
    barrier.wait(timeout=300)
    for concept in range(n):
        set_label(store, slug, concept, f"user {concept}")


def _carrier(store_url: str, opts: Any, slug: str, n: int, barrier: Any) -> None:
    store, previous = (
        RunStore(store_url, "run000000001", opts),
        RunStore(store_url, "run000000000", opts),
    )
    barrier.wait(timeout=300)
    for j in range(n):  # the changes step carrying label j of the previous run onto concept n + j
        report = {
            "threshold": 0.5,
            "vanished": [],
            "matched": [{"before": j, "after": n + j, "similarity": 0.9}],
        }
        carry_labels(store, previous, slug, slug, report)


def _recorder(store_url: str, opts: Any, run_ids: list[str], me: int, barrier: Any) -> None:
    from lens_core.config import make_config
    from lens_core.data import ClassInfo
    from lens_core.run import RunInfo, _record_run

    cfg = make_config({"store": store_url, "storage_options": opts or {}})
    mine = ClassInfo(me, f"c{me}", f"class {me}", f"c{me}")
    for run_id in run_ids:  # one trial per run: every process records its class at the same instant
        info = RunInfo(run_id, cfg, "file:///data", "digest", WRITERS, [mine])
        barrier.wait(timeout=300)
        _record_run(info)


# ---- item 1: labels --------------------------------------------------------------------------
def test_concurrent_set_label_keeps_every_label(where):
    store_url, opts = where
    store = RunStore(store_url, "run000000001", opts)
    slugs = [f"class-{t}" for t in range(TRIALS)]
    _with_concepts(store, slugs, WRITERS)
    _race(_label_writer, [(store_url, opts, slugs, me) for me in range(WRITERS)])
    labels = read_labels(store)
    kept = [len(labels.get(slug, {})) for slug in slugs]
    assert kept == [WRITERS] * TRIALS, f"labels kept per trial: {kept} of {WRITERS}"
    for slug in slugs:
        assert {c: r["text"] for c, r in labels[slug].items()} == {
            str(me): f"label {me} of {slug}" for me in range(WRITERS)
        }


def test_set_label_while_labels_are_carried_keeps_both(where):
    store_url, opts = where
    n = 30
    store, previous = (
        RunStore(store_url, "run000000001", opts),
        RunStore(store_url, "run000000000", opts),
    )
    slugs = [f"mixed-{t}" for t in range(3)]
    _with_concepts(store, slugs, 2 * n)
    previous.write_json(
        layout.LABELS,
        {s: {str(j): {"text": f"old {j}", "source": "user"} for j in range(n)} for s in slugs},
    )
    for slug in slugs:  # three trials: 30 user labels and 30 carried labels written at once
        _race(_pair_worker, [(store_url, opts, slug, n, role) for role in (0, 1)])
    labels = read_labels(store)
    for slug in slugs:
        users = {c for c, r in labels[slug].items() if r["source"] == "user"}
        carried = {c for c, r in labels[slug].items() if r["source"] == "carried"}
        assert users == {str(c) for c in range(n)}, f"{slug}: {len(users)} of {n} user labels kept"
        assert carried == {str(n + j) for j in range(n)}, (
            f"{slug}: {len(carried)} of {n} carried labels kept"
        )


def _pair_worker(store_url: str, opts: Any, slug: str, n: int, role: int, barrier: Any) -> None:
    (_user_labeller if role == 0 else _carrier)(store_url, opts, slug, n, barrier)


# ---- item 2: run.json ------------------------------------------------------------------------
def test_concurrent_processes_of_one_run_record_every_class(where):
    store_url, opts = where
    run_ids = [f"{t:012x}" for t in range(1, TRIALS + 1)]
    _race(_recorder, [(store_url, opts, run_ids, me) for me in range(WRITERS)])
    for run_id in run_ids:
        meta = RunStore(store_url, run_id, opts).read_json(layout.RUN_JSON)
        recorded = [c["index"] for c in meta["classes"]]
        assert recorded == list(range(WRITERS)), f"run {run_id}: classes {recorded} of {WRITERS}"
        assert meta["run_id"] == run_id and meta["lineage"]


# ---- item 3: label import, all or nothing, written once --------------------------------------
class _Cls:
    def __init__(self, index: int, slug: str):
        self.index, self.id, self.name, self.slug = index, f"n{index:04d}", f"class {index}", slug


@pytest.mark.parametrize("bad", ["99", "x1", "-1"])
def test_an_import_with_one_bad_concept_writes_nothing(where, bad):
    store_url, opts = where
    store = RunStore(store_url, "run000000001", opts)
    _with_concepts(store, ["a", "b"], 5)
    set_label(store, "a", 0, "kept")
    mapping = {"a": {"1": "Stem", "2": "Leaf"}, "b": {"0": "Root", bad: "Bad", "3": "Flower"}}
    with pytest.raises(LabelError, match="nothing imported"):
        import_labels(store, [_Cls(0, "a"), _Cls(1, "b")], mapping)
    assert read_labels(store) == {"a": {"0": {"text": "kept", "source": "user"}}}


def test_an_import_is_one_write_whatever_its_size(where, monkeypatch):
    store_url, opts = where
    store = RunStore(store_url, "run000000001", opts)
    k = 500
    _with_concepts(store, ["a", "b"], k)
    writes: list[str] = []
    write_bytes = RunStore.write_bytes
    monkeypatch.setattr(
        RunStore,
        "write_bytes",
        lambda self, rel, data: (writes.append(rel), write_bytes(self, rel, data))[1],
    )
    pipe_file = store.fs.pipe_file
    monkeypatch.setattr(
        store.fs,
        "pipe_file",
        lambda path, *a, **kw: (writes.append(path), pipe_file(path, *a, **kw))[1],
    )
    mapping = {
        "a": {str(c): f"a{c}" for c in range(k)},
        "n0001": {str(c): f"b{c}" for c in range(k)},
    }
    assert import_labels(store, [_Cls(0, "a"), _Cls(1, "b")], mapping) == 2 * k
    assert len(writes) == 1, f"{len(writes)} writes for one import"
    labels = read_labels(store)
    assert len(labels["a"]) == k and labels["b"]["7"] == {"text": "b7", "source": "user"}


def test_lens_label_import_exits_2_and_keeps_nothing(tmp_path):
    store_url = f"file://{tmp_path}/store"
    store = RunStore(store_url, "0123456789ab")
    _with_concepts(store, ["a"], 3)
    store.write_json(
        layout.RUN_JSON,
        {
            "run_id": "0123456789ab",
            "created": "2026-12-04T00:00:00+00:00",
            "classes": [{"index": 0, "id": "a", "name": "a", "slug": "a"}],
        },
    )
    bad = tmp_path / "labels.json"
    bad.write_text(json.dumps({"a": {"0": "Stem", "1": "Leaf", "7": "no such concept"}}))
    out = subprocess.run(
        [LENS, "label", "--store", store_url, "--import", str(bad)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "0..2, not 7" in out.stderr and "Traceback" not in out.stderr
    assert read_labels(store) == {}
    good = tmp_path / "good.toml"
    good.write_text('[a]\n0 = "Stem"\n1 = "Leaf"\n')
    out = subprocess.run(
        [LENS, "label", "--store", store_url, "--import", str(good)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert {c: r["text"] for c, r in read_labels(store)["a"].items()} == {"0": "Stem", "1": "Leaf"}


def test_labels_drop_unicode_format_characters(tmp_path):
    store = RunStore(f"file://{tmp_path}/store", "run000000001")
    _with_concepts(store, ["a"], 2)
    record = set_label(store, "a", 1, "stem \u202e1 tnatropmi\u200b")
    assert record == {"text": "stem 1 tnatropmi", "source": "user"}
