"""One reader of a class's stored results: which computation they belong to, and what the page
shows of them. Every consumer (summary, publish, changes, cross-class, renders, mistakes) asks
here, so the rules "which fingerprint is current" and "which score is shown" live in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from lens_core import layout
from lens_core.store import RunStore
from lens_core.tracking import is_done


def class_fingerprint(store: RunStore, slug: str) -> str | None:
    """The fingerprint the class's activations were computed from (None before they exist)."""
    group = store.get_group(layout.acts(slug))
    return None if group is None else group.attrs.get("inputs")


def complete_fingerprint(store: RunStore, slug: str, *stages: str) -> str | None:
    """The class's fingerprint when every one of `stages` is complete for its current
    activations (None otherwise): results of another computation are never read."""
    fp = class_fingerprint(store, slug)
    if fp is None or not all(is_done(store, stage, slug, fp) for stage in stages):
        return None
    return fp


def read_result(store: RunStore, slug: str, *stages: str) -> ClassResult | None:
    """The class's results when every one of `stages` is complete for its current activations
    (None otherwise)."""
    fp = complete_fingerprint(store, slug, *stages)
    return None if fp is None else ClassResult(store, slug, fp)


@dataclass
class ClassResult:
    """A class's stored concepts and importance for one fingerprint; arrays are read on first
    use, so a consumer pays only for what it reads."""

    store: RunStore
    slug: str
    fingerprint: str

    @cached_property
    def concepts(self) -> Any:
        """The concepts group (U, W and the fit's attributes)."""
        return self.store.zarr[layout.concepts(self.slug)]

    @cached_property
    def importance(self) -> Any:
        """The importance group (Sobol, shares, per-image importance, counts in its attributes)."""
        return self.store.zarr[layout.importance(self.slug)]

    @cached_property
    def W(self) -> np.ndarray:
        """The concept dictionary (k, channels)."""
        return self.concepts["W"][:]

    @cached_property
    def U(self) -> np.ndarray:
        """The patches' concept coefficients (patches, k)."""
        return self.concepts["U"][:]

    @cached_property
    def order(self) -> list[int]:
        """The concepts, most important first."""
        return [int(c) for c in self.importance["order"][:]]

    @cached_property
    def logit_share(self) -> np.ndarray | None:
        """Each concept's share of the class logit in percent (None where it is not defined)."""
        imp = self.importance
        return imp["logit_share"][:] if "logit_share" in imp else None  # a lookup, not a listing

    @cached_property
    def shown(self) -> tuple[np.ndarray, str]:
        """(the percentages a class page shows, their basis)."""
        return shown_scores(self.importance)

    @property
    def attrs(self) -> Any:
        """The importance group's attributes: counts, the basis and why, residual and bias."""
        return self.importance.attrs


def shown_scores(importance: Any) -> tuple[np.ndarray, str]:
    """(the percentages a class page shows, their basis) from an importance group: the logit
    share where it is defined, else each concept's share of the summed Sobol indices."""
    names = set(importance.array_keys())
    if "logit_share" in names:
        return importance["logit_share"][:], str(
            importance.attrs.get("importance_basis", "logit_share")
        )
    return importance["sobol_share"][:], "sobol"
