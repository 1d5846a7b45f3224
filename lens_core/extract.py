"""Concept extraction behind one small interface: fit a dictionary, encode points on it.

A concept extractor turns a class's patch activations A (n, C) into a dictionary W (k, C) and
coefficients U (n, k) with A ~= U W; `encode` codes new activations (whole images, spatial
locations) on a fixed dictionary. The importance and crops stages only use this interface, so
another extractor (the Holistic paper compares several) plugs in without touching them.
NMF (CRAFT) serves non-negative layers; semi-NMF (U >= 0, W signed) serves layers whose
activations can be negative. `concepts.method = "auto"` picks one per run from the set-up probe of
the layer (`choose_method`), with the same tolerance rule as the factorization
(`factorize.is_nonnegative`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from lens_core.config import ConceptConfig
from lens_core.factorize import is_nonnegative, nmf, project_nnls
from lens_core.seminmf import semi_nmf


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

    def encode(
        self,
        X: np.ndarray | torch.Tensor,
        W: np.ndarray | torch.Tensor,
        device: torch.device | str | None = None,
    ) -> np.ndarray | torch.Tensor: ...


class NNLSEncoding:
    """The encoding every extractor here shares: the exact non-negative least squares of X's rows
    on the fixed dictionary W (U >= 0 whatever W's signs)."""

    def encode(
        self,
        X: np.ndarray | torch.Tensor,
        W: np.ndarray | torch.Tensor,
        device: torch.device | str | None = None,
    ) -> np.ndarray | torch.Tensor:
        return project_nnls(X, W, device=device)


def _fitted(res: Any, solver: str, method: str) -> ConceptFit:
    """A factorization's result as a ConceptFit, with its fit record (error, iterations, dead
    concepts, solver, method)."""
    attrs = {
        "rel_error": float(res.rel_error),
        "n_iter": int(res.n_iter),
        "dead": int(res.dead),
        "solver": solver,
        "method": method,
    }
    return ConceptFit(np.asarray(res.U, np.float32), np.asarray(res.W, np.float32), attrs)


@dataclass(frozen=True)
class NMFExtractor(NNLSEncoding):
    """CRAFT's NMF: A ~= U W with U, W >= 0; encoding is the exact non-negative least squares."""

    n_concepts: int
    solver: str = "torch"
    max_iter: int = 500
    tol: float = 1e-4
    seed: int = 0
    name: str = "nmf"

    def fit(self, A: np.ndarray, device: torch.device | str | None = None) -> ConceptFit:
        res = nmf(
            A,
            self.n_concepts,
            solver=self.solver,
            max_iter=self.max_iter,
            tol=self.tol,
            seed=self.seed,
            device=device,
        )
        return _fitted(res, self.solver, self.name)


@dataclass(frozen=True)
class SemiNMFExtractor(NNLSEncoding):
    """Semi-NMF: A ~= U W with U >= 0 and W signed; encoding is the exact non-negative least
    squares on the signed dictionary (the same NNLS as NMF's)."""

    n_concepts: int
    max_iter: int = 500
    tol: float = 1e-4
    seed: int = 0
    sparsity: float = 0.05
    name: str = "semi-nmf"

    def fit(self, A: np.ndarray, device: torch.device | str | None = None) -> ConceptFit:
        res = semi_nmf(
            A,
            self.n_concepts,
            max_iter=self.max_iter,
            tol=self.tol,
            seed=self.seed,
            device=device,
            sparsity=self.sparsity,
        )
        return _fitted(res, "torch", self.name)


METHODS = ("nmf", "semi-nmf")


class SignedLayerError(ValueError):
    """concepts.method = 'nmf' on a layer whose activations are negative beyond rounding noise."""


def choose_method(setting: str, lo: float, hi: float) -> str:
    """The extractor for a layer whose probed activations range over [lo, hi].

    'auto' gives NMF when the layer is non-negative up to rounding noise (`is_nonnegative`, the
    rule the factorization clips with), semi-NMF otherwise; an explicit method is kept, and 'nmf'
    on a signed layer raises SignedLayerError (one line, naming the way out).
    """
    if setting not in ("auto", *METHODS):
        raise ValueError(f"unknown concepts.method {setting!r}; use 'auto', 'nmf' or 'semi-nmf'")
    signed = not is_nonnegative(lo, hi)
    if setting == "auto":
        return "semi-nmf" if signed else "nmf"
    if setting == "nmf" and signed:
        raise SignedLayerError(
            f"gives negative activations (minimum {lo:.3g}, maximum {hi:.3g} on a test batch) and "
            "concepts.method = 'nmf' needs a non-negative layer, one after a ReLU: set "
            "concepts.method = 'auto' or 'semi-nmf' (a signed dictionary), or pick a layer after a "
            "ReLU (e.g. 'layer4' in ResNets)"
        )
    return setting


@dataclass(frozen=True)
class AutoExtractor(NNLSEncoding):
    """'auto' left unresolved (a notebook fitting arrays directly): NMF when this A is
    non-negative up to rounding noise, semi-NMF otherwise. A run resolves 'auto' once at set-up
    instead, so that every class uses the same method."""

    nmf: NMFExtractor
    semi: SemiNMFExtractor | None  # None: the solver is NMF-only ('sklearn')
    name: str = "auto"

    def fit(self, A: np.ndarray, device: torch.device | str | None = None) -> ConceptFit:
        t = torch.as_tensor(A)
        lo, hi = (float(t.min()), float(t.max())) if t.numel() else (0.0, 0.0)
        if is_nonnegative(lo, hi) or self.semi is None:
            return self.nmf.fit(A, device=device)  # NMF names the problem if A is signed
        return self.semi.fit(A, device=device)


def make_extractor(cfg: ConceptConfig) -> ConceptExtractor:
    """The extractor a run's concept settings name (a run has resolved 'auto' at set-up)."""
    nmf_ = NMFExtractor(cfg.n_concepts, cfg.solver, cfg.max_iter, cfg.tol, cfg.seed)
    if cfg.method == "nmf":
        return nmf_
    if cfg.solver != "torch":
        if cfg.method == "auto":
            return AutoExtractor(nmf_, None)
        raise ValueError(
            f"concepts.solver = {cfg.solver!r} is NMF's reference solver; "
            "semi-NMF has the 'torch' solver only"
        )
    semi = SemiNMFExtractor(cfg.n_concepts, cfg.max_iter, cfg.tol, cfg.seed, cfg.sparsity)
    return semi if cfg.method == "semi-nmf" else AutoExtractor(nmf_, semi)
