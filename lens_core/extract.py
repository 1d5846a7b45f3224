"""Concept extraction behind one small interface: fit a dictionary, encode points on it.

A concept extractor turns a class's patch activations A (n, C) into a dictionary W (k, C) and
coefficients U (n, k) with A ~= U W; `encode` codes new activations (whole images, spatial
locations) on a fixed dictionary. The importance and crops stages only use this interface, so
another extractor (the Holistic paper compares several) plugs in without touching them.
NMF (CRAFT) is the first implementation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from lens_core.config import ConceptConfig
from lens_core.factorize import nmf, project_nnls


@dataclass
class ConceptFit:
    """A fitted dictionary: U (n, k), W (k, C) float32, and what to record about the fit."""

    U: np.ndarray
    W: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)


class ConceptExtractor(Protocol):
    """fit(A) -> ConceptFit; encode(X, W) -> coefficients of X's rows on W (same type as X)."""

    name: str

    def fit(self, A: np.ndarray, device: torch.device | str | None = None) -> ConceptFit: ...

    def encode(self, X: np.ndarray | torch.Tensor, W: np.ndarray | torch.Tensor,
               device: torch.device | str | None = None) -> np.ndarray | torch.Tensor: ...


@dataclass(frozen=True)
class NMFExtractor:
    """CRAFT's NMF: A ~= U W with U, W >= 0; encoding is the exact non-negative least squares."""

    n_concepts: int
    solver: str = "torch"
    max_iter: int = 500
    tol: float = 1e-4
    seed: int = 0
    name: str = "nmf"

    def fit(self, A: np.ndarray, device: torch.device | str | None = None) -> ConceptFit:
        res = nmf(A, self.n_concepts, solver=self.solver, max_iter=self.max_iter, tol=self.tol,
                  seed=self.seed, device=device)
        attrs = {"rel_error": float(res.rel_error), "n_iter": int(res.n_iter), "dead": int(res.dead),
                 "solver": self.solver, "method": self.name}
        return ConceptFit(np.asarray(res.U, np.float32), np.asarray(res.W, np.float32), attrs)

    def encode(self, X: np.ndarray | torch.Tensor, W: np.ndarray | torch.Tensor,
               device: torch.device | str | None = None) -> np.ndarray | torch.Tensor:
        return project_nnls(X, W, device=device)


def make_extractor(cfg: ConceptConfig) -> ConceptExtractor:
    """The extractor a run's concept settings name."""
    return NMFExtractor(cfg.n_concepts, cfg.solver, cfg.max_iter, cfg.tol, cfg.seed)
