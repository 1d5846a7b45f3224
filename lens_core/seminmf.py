"""Semi-NMF A ~= U W with U >= 0 and W signed (Ding, Li & Jordan 2010), for signed layers.

Layers after GELU, SiLU, a normalization or a residual sum give activations of both signs, which
NMF cannot factorize. Semi-NMF keeps the concept presence U non-negative (crops, masks and Sobol
work on it unchanged) and lets the dictionary W be signed.

The solver alternates two steps that never raise the error: U takes HALS passes (exact projected
coordinate descent, the inner solver of the NMF) given W, and W is the exact least-squares fit
given U (a k x k solve in float64). It starts from k-means++ seeded by `seed`, as Ding et al.
start from k-means, and re-seeds a component whose U column dies from the largest residual.
The data are scaled to unit RMS while solving, so layers of any magnitude behave alike.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from lens_core.factorize import (
    _BLOCK,
    _EXACT_BELOW,
    NMFResult,
    _check_k,
    _hals_inner,
    _residual_norm2,
    _resolve_device,
    _sqnorm,
    as_matrix,
    project_nnls,
)

_KMEANS_ITERS = 10
_POLISH = 20  # unpenalized passes that remove the L1 weight's bias at the end


def _sq_dist(A: torch.Tensor, sq: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Squared distances (n, m) from the rows of A (norms sq) to the rows of C, >= 0."""
    return (sq[:, None] - 2 * (A @ C.T) + (C * C).sum(1)[None, :]).clamp(min=0)


def kmeans_init(A: torch.Tensor, k: int, seed: int, iters: int = _KMEANS_ITERS) -> torch.Tensor:
    """k centroids (k, C) of the rows of A: k-means++ seeding (drawn on the CPU from `seed`), then
    Lloyd iterations; an empty cluster keeps its centre."""
    n = A.shape[0]
    gen = torch.Generator().manual_seed(int(seed))
    sq = (A * A).sum(1)
    picks = [int(torch.randint(n, (1,), generator=gen))]
    d2 = _sq_dist(A, sq, A[picks[0]][None])[:, 0]
    for _ in range(1, k):
        p = d2.double().cpu()
        total = float(p.sum())
        if total > 0:
            i = int(torch.multinomial(p / total, 1, generator=gen))
        else:  # every point sits on a centre already: take the first point not picked
            i = next(j for j in range(n) if j not in set(picks))
        picks.append(i)
        d2 = torch.minimum(d2, _sq_dist(A, sq, A[i][None])[:, 0])
    C = A[picks].clone()
    for _ in range(iters):
        sums = torch.zeros_like(C)
        counts = torch.zeros(k, dtype=A.dtype, device=A.device)
        for s in range(0, n, _BLOCK):
            lab = _sq_dist(A[s : s + _BLOCK], sq[s : s + _BLOCK], C).argmin(1)
            sums.index_add_(0, lab, A[s : s + _BLOCK])
            counts.index_add_(0, lab, torch.ones_like(lab, dtype=A.dtype))
        filled = counts > 0
        C[filled] = sums[filled] / counts[filled, None]
    return C


def _initial_codes(A: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """U^T (k, n) with each point on its nearest centre only, at the best non-negative scale."""
    k, n = W.shape[0], A.shape[0]
    Ut = torch.zeros(k, n, dtype=A.dtype, device=A.device)
    sq = (A * A).sum(1)
    norms = (W * W).sum(1).clamp(min=torch.finfo(A.dtype).tiny)
    for s in range(0, n, _BLOCK):
        rows = A[s : s + _BLOCK]
        lab = _sq_dist(rows, sq[s : s + _BLOCK], W).argmin(1)
        scale = ((rows * W[lab]).sum(1) / norms[lab]).clamp(min=0)
        Ut[lab, torch.arange(s, s + len(rows), device=A.device)] = scale
    return Ut


def _least_squares_w(Ut: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """W = argmin ||A - U W||_F given U (k x k normal equations in float64, a tiny ridge)."""
    G = (Ut @ Ut.T).double()
    P = (Ut @ A).double()
    k = G.shape[0]
    ridge = 1e-10 * max(float(G.diagonal().sum()) / k, torch.finfo(torch.float64).tiny)
    G = G + ridge * torch.eye(k, dtype=G.dtype, device=G.device)
    return torch.linalg.solve(G, P).to(A.dtype)


def _reseed(A: torch.Tensor, Ut: torch.Tensor, W: torch.Tensor, dead: list[int]) -> None:
    """Re-seed dead components in place: W[j] = the largest residual row, U[:, j] its exact
    coordinate update (never raises the error)."""
    for j in dead:
        Ut[j] = 0
        best, best_i = 0.0, -1
        for s in range(0, A.shape[0], _BLOCK):
            r = A[s : s + _BLOCK] - Ut[:, s : s + _BLOCK].T @ W
            score = (r * r).sum(1)
            i = int(score.argmax())
            if float(score[i]) > best:
                best, best_i = float(score[i]), s + i
        if best_i < 0 or best <= 1e-20 * _sqnorm(A):
            continue  # exact fit already: nothing left to explain
        w = A[best_i] - Ut[:, best_i] @ W
        W[j] = w
        Ut[j] = ((A @ w - Ut.T @ (W @ w)) / (w @ w)).clamp(min=0)


def _unit_rows(Ut: torch.Tensor, W: torch.Tensor) -> None:
    """Scale W's rows to unit norm and U's columns inversely, in place (U W unchanged)."""
    norms = torch.linalg.vector_norm(W, dim=1)
    alive = norms > 0
    Ut[alive] *= norms[alive, None]
    W[alive] /= norms[alive, None]


def _w_sweep(W: torch.Tensor, P: torch.Tensor, G: torch.Tensor) -> None:
    """One exact pass over W's rows for min ||X - U W|| with unit rows: w_j = r_j / ||r_j||,
    r_j = U_j^T (X - sum_{l != j} U_l w_l) (in place; a row whose U column is 0 is left)."""
    for j in range(W.shape[0]):
        if float(G[j, j]) <= 0:
            continue
        r = P[j] - G[j] @ W + G[j, j] * W[j]
        norm = float(torch.linalg.vector_norm(r))
        if norm > 0:
            W[j] = r / norm


@torch.no_grad()
def semi_nmf(
    A: np.ndarray | torch.Tensor,
    k: int,
    max_iter: int = 500,
    tol: float = 1e-4,
    seed: int = 0,
    device: str | torch.device | None = None,
    sparsity: float = 0.05,
) -> NMFResult:
    """Factorize A (n, C), of any sign, as U (n, k) >= 0 @ W (k, C) signed.

    Semi-NMF's solutions are not unique (any U M >= 0, M^-1 W fits as well); a small L1 weight on
    U (`sparsity`, relative to the RMS row norm) picks the tightest cone of concepts, and a last
    unpenalized step (W by least squares, U by exact NNLS on it) removes its bias. On `device`
    (default A's device or CPU); deterministic for a seed on one device. `tol` stops on the
    relative decrease of the objective per iteration; `dead` counts all-zero columns of U.
    """
    start = time.perf_counter()
    dev = _resolve_device(device, A)
    At = as_matrix(A, dev)
    n, c = At.shape
    _check_k(k, n, c)
    norm2 = _sqnorm(At)
    if norm2 == 0.0:
        raise ValueError("A is all zeros: there is nothing to factorize")
    scale = math.sqrt(norm2 / At.numel())  # solve at unit RMS, whatever the layer's magnitude
    X = At / scale
    Ut, W, n_iter = _alternate(X, int(k), max_iter, tol, seed, sparsity * math.sqrt(c))
    W = _least_squares_w(Ut, X)
    for _ in range(_POLISH):
        _hals_inner(Ut, W @ X.T, W @ W.T, 30)
        W = _least_squares_w(Ut, X)
    U = project_nnls(X, W)
    W = W * scale
    return NMFResult.of(At, U, W, n_iter, int((U.amax(0) <= 0).sum()), start)


def _alternate(
    X: torch.Tensor, k: int, max_iter: int, tol: float, seed: int, lam: float
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Block coordinate descent on 1/2 ||X - U W||^2 + lam * sum(U), U >= 0, unit rows of W."""
    n, c = X.shape
    W = kmeans_init(X, k, seed)
    Ut = _initial_codes(X, W)
    _unit_rows(Ut, W)
    norm2 = _sqnorm(X)
    inner_u = int(min(30, 1 + 0.5 * (1 + c / (k + 1))))
    prev = math.inf
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 (n_iter is the count reported)
        _hals_inner(Ut, W @ X.T - lam, W @ W.T, inner_u)
        dead = torch.nonzero(Ut.amax(1) <= 0).flatten().tolist()
        if dead:
            _reseed(X, Ut, W, dead)
            _unit_rows(Ut, W)
            dead = [j for j in dead if float(Ut[j].amax()) > 0]  # revived: the objective restarts
        P = Ut @ X
        G = Ut @ Ut.T
        _w_sweep(W, P, G)
        err2 = (
            norm2
            - 2 * float((W.double() * P.double()).sum())
            + float((G.double() * (W @ W.T).double()).sum())
        )
        if math.sqrt(max(err2, 0.0) / norm2) < _EXACT_BELOW:  # the expansion cancels badly
            err2 = _residual_norm2(X, Ut.T, W)
        obj = 0.5 * max(err2, 0.0) + lam * float(Ut.sum())
        if dead:
            prev = math.inf
            continue
        if prev - obj < tol * max(obj, 1e-12 * norm2):
            break
        prev = obj
    return Ut, W, n_iter
