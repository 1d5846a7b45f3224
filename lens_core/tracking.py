"""Running one stage of one class: skip when done, one writer across runs, status and timing.

A stage says what it is computed from (`inputs`: a fingerprint recorded in its completion
marker) and how to compute it. `run_stage` skips it when its marker records the same inputs,
otherwise takes the stage's lease (a second run of the same checkpoint waits, then finds it
done), computes it, and records running/completed/skipped/failed with the error text scrubbed.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict

from lens_core import layout
from lens_core.run import RunInfo
from lens_core.secrets import error_text
from lens_core.status import write_status
from lens_core.store import RunStore

log = logging.getLogger("lens")

Inputs = dict[str, Any]  # {"fingerprint": str, ...}: what a stage reads, recorded in its marker


class StageOutput(TypedDict, total=False):
    """What a stage body returns: the figures its status records (counts, fit error)."""

    status: dict[str, Any]


# What `run_stage` returns for one class: the stage, the class, its seconds, whether it was
# skipped (done before), and the body's status when it ran.
StageResult = TypedDict(
    "StageResult",
    {
        "stage": str,
        "class": str,
        "seconds": float,
        "skipped": bool,
        "status": NotRequired[dict[str, Any]],
    },
)


class StageError(RuntimeError):
    """A stage failed for one class; the message says which and why."""


@dataclass(frozen=True)
class Stage:
    """A per-class stage: its name, what it is computed from, and its body.

    `inputs(info, slug)` returns the inputs (a dict with a "fingerprint"); `compute(info, slug,
    inputs, device)` writes the outputs, then the marker (`mark`), and returns its StageOutput.
    """

    name: str
    inputs: Callable[[RunInfo, str], Inputs]
    compute: Callable[[RunInfo, str, Inputs, str | None], StageOutput]

    def done(self, store: RunStore, slug: str, inputs: Inputs) -> bool:
        """True when the stage's marker exists and records these inputs."""
        return is_done(store, self.name, slug, inputs["fingerprint"])


def is_done(store: RunStore, stage: str, slug: str, fingerprint: str | None) -> bool:
    """Whether `stage` of `slug` is complete for `fingerprint` (None: any marker at all)."""
    where = layout.stage_group(stage, slug)
    if stage in layout.FILE_STAGES:
        return store.files_complete(where, fingerprint)
    return store.is_complete(where, fingerprint)


def mark(store: RunStore, stage: str, slug: str, inputs: Inputs, **attrs: Any) -> None:
    """Write `stage`'s completion marker for `slug`, recording its inputs (call last)."""
    where = layout.stage_group(stage, slug)
    if stage in layout.FILE_STAGES:
        store.mark_files_complete(where, inputs["fingerprint"], **attrs)
    else:
        store.mark_complete(where, inputs["fingerprint"], **attrs)


def run_stage(stage: Stage, info: RunInfo, slug: str, device: str | None = None) -> StageResult:
    """Run `stage` for one class unless done (the skip, the lease, the status record)."""
    store = info.store()
    t0 = time.perf_counter()
    try:
        inputs = stage.inputs(info, slug)
        result: StageOutput | None = None  # None: skipped, done before
        if not stage.done(store, slug, inputs):
            # one writer per (stage, class) across concurrent runs: a second run waits, then reuses
            with store.lease(layout.lock(stage.name, slug)):
                if not stage.done(store, slug, inputs):
                    result = stage.compute(info, slug, inputs, device)
    except Exception as err:
        message = error_text(err, info.config.storage_options)
        write_status(store, slug, stage.name, "failed", time.perf_counter() - t0, message)
        log.debug("stage %s failed for %s:\n%s", stage.name, slug, traceback.format_exc())
        raise
    seconds = time.perf_counter() - t0
    done: StageResult = {"stage": stage.name, "class": slug, "seconds": seconds, "skipped": True}
    if result is not None:
        status = result.get("status", {})
        write_status(store, slug, stage.name, "completed", seconds, **status)
        return {**done, "skipped": False, "status": status}
    if not store.exists(layout.status_file(slug, stage.name)):
        write_status(store, slug, stage.name, "completed", None)
    return done


def upstream_inputs(info: RunInfo, slug: str) -> Inputs:
    """The inputs of a stage that reads the class's activations: the activations' own
    fingerprint."""
    store = info.store()
    group = store.get_group(layout.acts(slug))
    if group is None or not group.attrs.get("complete", False):
        raise StageError(
            f"class {slug!r}: its activations are not computed (run the activations stage first)"
        )
    return {"fingerprint": group.attrs.get("inputs")}
