"""Per-class, per-stage status files: `status/<class>/<stage>.json` (what `lens status` reads).

One file per (class, stage) so that concurrent stages never race on the same object.
"""

from __future__ import annotations

import time
from typing import Any

from lens_core import layout
from lens_core.store import RunStore

STAGES = layout.STATUS_STAGES


def write_status(
    store: RunStore,
    slug: str,
    stage: str,
    state: str,
    seconds: float | None = None,
    error: str | None = None,
    **extra: Any,
) -> None:
    """Record a stage's state (running, completed, skipped, failed) with timing and error text."""
    record = {"state": state, "seconds": seconds, "error": error, "at": time.time(), **extra}
    store.write_json(layout.status_file(slug, stage), record)


def read_status(
    store: RunStore, slugs: list[str] | None = None
) -> dict[str, dict[str, dict[str, Any]]]:
    """{slug: {stage: record}} for the given classes (default: every class with a status)."""
    slugs = slugs if slugs is not None else store.list(layout.STATUS)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for slug in slugs:
        stages = {}
        for name in store.list(layout.status_dir(slug)):
            if name.endswith(".json"):
                rec = store.read_json(f"{layout.status_dir(slug)}/{name}")
                if rec is not None:
                    stages[name[: -len(".json")]] = rec
        out[slug] = stages
    return out


def class_state(stages: dict[str, dict[str, Any]]) -> str:
    """Overall state of one class: failed if any stage failed, else completed/running/pending."""
    states = {rec.get("state") for rec in stages.values()}
    if "failed" in states:
        return "failed"
    if "running" in states:
        return "running"
    done = {s for s, rec in stages.items() if rec.get("state") in ("completed", "skipped")}
    if set(layout.CLASS_STAGES) <= done:
        return "completed"
    return "pending" if not stages else "partial"


def class_note(stages: dict[str, dict[str, Any]]) -> str:
    """A finding worth flagging beside the state (e.g. the model rarely predicts the class)."""
    return str((stages.get("importance") or {}).get("note") or "")
