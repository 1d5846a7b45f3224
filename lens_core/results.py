"""One reader of a class's stored results: which computation they belong to, and what the page
shows of them. Every consumer (summary, publish, changes, cross-class, renders, mistakes) asks
here, so the rules "which fingerprint is current" and "which score is shown" live in one place.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lens_core import layout
from lens_core.tracking import is_done


def class_fingerprint(store: Any, slug: str) -> str | None:
    """The fingerprint the class's activations were computed from (None before they exist)."""
    group = store.get_group(layout.acts(slug))
    return None if group is None else group.attrs.get("inputs")


def complete_fingerprint(store: Any, slug: str, *stages: str) -> str | None:
    """The class's fingerprint when every one of `stages` is complete for its current
    activations (None otherwise): results of another computation are never read."""
    fp = class_fingerprint(store, slug)
    if fp is None or not all(is_done(store, stage, slug, fp) for stage in stages):
        return None
    return fp


def shown_scores(importance: Any) -> tuple[np.ndarray, str]:
    """(the percentages a class page shows, their basis) from an importance group: the logit
    share where it is defined, else each concept's share of the summed Sobol indices."""
    names = set(importance.array_keys())
    if "logit_share" in names:
        return importance["logit_share"][:], str(
            importance.attrs.get("importance_basis", "logit_share")
        )
    return importance["sobol_share"][:], "sobol"
