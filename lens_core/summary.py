"""What a run tells about one class, read back from the store: stage states, time, top concept."""

from __future__ import annotations

from typing import Any

from lens_core.results import read_result
from lens_core.run import RunInfo
from lens_core.status import class_note, read_status


def class_summary(info: RunInfo, slug: str) -> dict[str, Any]:
    """Per-stage states, total seconds, errors, the top concept and its score, and any note."""
    store = info.store()
    stages = read_status(store, [slug]).get(slug, {})
    top_concept = top_importance = None
    basis = None
    result = read_result(store, slug, "importance")
    if result is not None:
        scores, basis = result.shown
        top_concept = result.order[0]
        top_importance = round(float(scores[top_concept]), 3)
    return {
        "stages": {s: rec.get("state", "-") for s, rec in stages.items()},
        "seconds": sum(rec.get("seconds") or 0.0 for rec in stages.values()),
        "errors": {s: rec["error"] for s, rec in stages.items() if rec.get("error")},
        "top_concept": top_concept,
        "top_importance": top_importance,
        "importance_basis": basis,
        "note": class_note(stages),
    }
