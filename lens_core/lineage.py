"""Runs in a lineage: the runs of one data set and method on successive checkpoints.

Two runs are in the same lineage when they explain the same data with the same method settings;
only the checkpoint differs. Their concepts were computed on the same sampled images and patches,
so they can be compared concept by concept (lens_core.changes). The lineage key is recorded in each
run's run.json; a run's previous run is the latest finished run of its lineage on another
checkpoint.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any

from lens_core import layout
from lens_core.config import AtlasConfig
from lens_core.identity import is_run_id, short_hash
from lens_core.secrets import url_label
from lens_core.store import RunStore, filesystem, join_url, normalize_url


def lineage_key(data_url: str, config: AtlasConfig) -> str:
    """What the runs of one lineage share: the data URL and the method without the checkpoint."""
    method = config.method_dict()
    method["model"] = {k: v for k, v in method["model"].items() if k != "checkpoint"}
    return short_hash({"data": data_url, "method": method})


@dataclass(frozen=True)
class RunRecord:
    """A run found in a store: its id, run.json, and whether build-atlas finished it."""

    run_id: str
    meta: dict[str, Any]
    finished: bool

    @property
    def created(self) -> str:
        return str(self.meta.get("created") or "")

    @property
    def lineage(self) -> str | None:
        return self.meta.get("lineage")

    @property
    def checkpoint_digest(self) -> str:
        return str(self.meta.get("checkpoint_digest") or "")

    @property
    def label(self) -> str:
        """How people name the run: its checkpoint's file name, else the start of its digest."""
        ckpt = self.meta.get("checkpoint")
        if ckpt:
            # never its query (a run.json from before queries were checked)
            return url_label(str(ckpt))
        return (
            f"weights {self.checkpoint_digest[:12]}"
            if self.checkpoint_digest
            else f"run {self.run_id}"
        )


def list_runs(store_url: str, storage_options: dict[str, Any] | None = None) -> list[RunRecord]:
    """Every run under `<store>/runs/` with a run.json, oldest first (by creation time, then id)."""
    fs, root = filesystem(join_url(normalize_url(store_url), layout.RUNS), storage_options)
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    runs = []
    for entry in entries:
        run_id = posixpath.basename(entry.rstrip("/"))
        if not is_run_id(run_id):
            continue
        try:
            meta = json.loads(fs.cat_file(posixpath.join(entry, layout.RUN_JSON)))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError):
            continue
        if not isinstance(meta, dict):
            continue
        finished = fs.exists(posixpath.join(entry, layout.FINISHED))
        runs.append(RunRecord(run_id, meta, finished))
    return sorted(runs, key=lambda r: (r.created, r.run_id))


def find_run(
    store_url: str, run_id: str, storage_options: dict[str, Any] | None = None
) -> RunRecord:
    """The run `run_id` of a store; ValueError naming the store when it is not there."""
    if not is_run_id(run_id):
        raise ValueError(f"{run_id!r} is not a run id (12 hexadecimal digits)")
    store = RunStore(store_url, run_id, storage_options)
    meta = store.read_json(layout.RUN_JSON)
    if not isinstance(meta, dict):
        raise ValueError(f"no run {run_id} under {normalize_url(store_url)}/{layout.RUNS}")
    return RunRecord(run_id, meta, store.exists(layout.FINISHED))


def previous_run(
    store_url: str, run_id: str, storage_options: dict[str, Any] | None = None
) -> RunRecord | None:
    """The run to compare `run_id` with: the latest finished run of its lineage on another
    checkpoint, created before it (else the latest such run at all); None when there is none."""
    runs = list_runs(store_url, storage_options)
    me = next((r for r in runs if r.run_id == run_id), None)
    if me is None or me.lineage is None:
        return None
    peers = [
        r
        for r in runs
        if r.run_id != run_id
        and r.finished
        and r.lineage == me.lineage
        and r.checkpoint_digest != me.checkpoint_digest
    ]
    earlier = [r for r in peers if (r.created, r.run_id) < (me.created, me.run_id)]
    pool = earlier or peers
    return pool[-1] if pool else None
