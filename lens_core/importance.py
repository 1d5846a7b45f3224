"""Concept importance: Sobol total indices over concept masks (CRAFT), exact logit shares, deletion.

Sobol: quasi-Monte Carlo matrices A, B and the Saltelli replicates A_B^i (A with column i from B);
the Jansen estimator ST_i = E[(f(A) - f(A_B^i))^2] / (2 Var f(A)), as in CRAFT (Fel et al. 2023).

`precision` (model.precision) applies to h's forward passes only: the masked inputs (U * mask) W
are built in float32, h runs under autocast (lens_core.device), its logits are read back as
float64, and the Sobol statistics are computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import qmc

from lens_core.device import autocast
from lens_core.factorize import project_nnls

# a point whose output variance is below this fraction of its mean square counts as constant
_ZERO_VAR = 1e-10


def saltelli_masks(
    k: int, n_designs: int, sampler: str = "halton", seed: int = 0, scramble: bool = False
) -> np.ndarray:
    """Masks (n_designs * (k + 2), k) in [0, 1]: A, then B, then A_B^1 .. A_B^k (column i from B).

    A and B are the two halves of one 2k-dimensional QMC sequence (unscrambled by default, as the
    reference does, so `seed` only matters with scramble=True).
    """
    if k < 1 or n_designs < 2:
        raise ValueError(f"need k >= 1 and n_designs >= 2, got k={k}, n_designs={n_designs}")
    if sampler == "halton":
        engine = qmc.Halton(d=2 * k, scramble=scramble, seed=seed)
    elif sampler == "sobol":
        engine = qmc.Sobol(d=2 * k, scramble=scramble, seed=seed)
    else:
        raise ValueError(f"unknown sampler {sampler!r}; use 'halton' or 'sobol'")
    ab = engine.random(n_designs)
    a, b = ab[:, :k], ab[:, k:]
    rep = np.repeat(a[None], k, axis=0)  # (k, n, k)
    idx = np.arange(k)
    rep[idx, :, idx] = b.T
    return np.concatenate([a, b, rep.reshape(-1, k)]).astype(np.float32)


def jansen_total(outputs: np.ndarray, n_designs: int, k: int) -> np.ndarray:
    """Total indices (k,) from outputs (n_designs * (k + 2),) or (.., P): per-point, then averaged.

    Points (columns) whose output does not vary over A are skipped; all constant gives zeros.
    """
    y = np.asarray(outputs, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if y.shape[0] != n_designs * (k + 2):
        raise ValueError(
            f"expected {n_designs * (k + 2)} outputs (n_designs * (k + 2)), got {y.shape[0]}"
        )
    ya = y[:n_designs]
    yc = y[2 * n_designs :].reshape(k, n_designs, -1)
    var = ya.var(axis=0, ddof=1)
    live = var > _ZERO_VAR * np.maximum((ya**2).mean(axis=0), np.finfo(np.float64).tiny)
    if not live.any():
        return np.zeros(k)
    diff2 = ((ya[None, :, live] - yc[:, :, live]) ** 2).sum(axis=1)  # (k, live points)
    return (diff2 / (2 * n_designs * var[live])).mean(axis=1)


def sobol_total_indices(
    f: Callable[[np.ndarray], np.ndarray],
    k: int,
    n_designs: int = 32,
    sampler: str = "halton",
    seed: int = 0,
    batch_size: int | None = None,
    *,
    scramble: bool = False,
) -> np.ndarray:
    """Total Sobol indices (k,) of f: [0,1]^k -> R.

    f maps masks (M, k) to outputs (M,) or (M, P) (P points, e.g. images); indices are estimated
    per point and averaged. f sees at most batch_size masks per call (None = all at once).
    """
    masks = saltelli_masks(k, n_designs, sampler, seed, scramble)
    step = batch_size or len(masks)
    outs = [
        np.asarray(f(masks[s : s + step]), dtype=np.float64) for s in range(0, len(masks), step)
    ]
    return jansen_total(np.concatenate(outs), n_designs, k)


def _head(h: object) -> torch.nn.Module:
    """h itself, or the .h of a SplitModel-like object."""
    return h if isinstance(h, torch.nn.Module) else h.h  # type: ignore[attr-defined]


def _model_device(
    h: torch.nn.Module, device: str | torch.device | None, acts: object
) -> torch.device:
    if device is not None:
        return torch.device(device)
    for p in h.parameters():
        return p.device
    return acts.device if isinstance(acts, torch.Tensor) else torch.device("cpu")


def _flatten_acts(
    acts: np.ndarray | torch.Tensor, dev: torch.device
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(N, C, H, W) or (N, C) -> rows (N * H * W, C) in (image, y, x) order, and the original
    shape."""
    a = torch.as_tensor(acts).to(dev, torch.float32)
    if a.ndim == 4:
        return a.permute(0, 2, 3, 1).reshape(-1, a.shape[1]), tuple(a.shape)
    if a.ndim == 2:
        return a, tuple(a.shape)
    raise ValueError(f"activations must be (N, C, H, W) or (N, C), got shape {tuple(a.shape)}")


def _coefficients(
    rows: torch.Tensor, shape: tuple[int, ...], W: torch.Tensor, U: np.ndarray | torch.Tensor | None
) -> torch.Tensor:
    """Concept coefficients per image (N, L, k), L = locations per image; U=None projects with
    NNLS."""
    n, k = shape[0], W.shape[0]
    if U is None:
        U = project_nnls(rows, W)
    U = torch.as_tensor(U).to(rows.device, torch.float32)
    if U.numel() != rows.shape[0] * k:
        raise ValueError(
            f"U has {U.numel()} values; expected {rows.shape[0]} locations x {k} concepts"
        )
    return U.reshape(n, -1, k)


def _prepare(
    h: object,
    acts: np.ndarray | torch.Tensor,
    W: np.ndarray | torch.Tensor,
    U: np.ndarray | torch.Tensor | None,
    device: str | torch.device | None,
) -> tuple[
    torch.nn.Module, torch.device, torch.Tensor, tuple[int, ...], torch.Tensor, torch.Tensor
]:
    """(h, device, activation rows, activation shape, W, coefficients (N, L, k)) on h's device."""
    h = _head(h)
    dev = _model_device(h, device, acts)
    rows, shape = _flatten_acts(acts, dev)
    Wt = torch.as_tensor(W).to(dev, torch.float32)
    return h, dev, rows, shape, Wt, _coefficients(rows, shape, Wt, U)


@torch.inference_mode()
def _masked_logits(
    h: torch.nn.Module,
    U3: torch.Tensor,
    W: torch.Tensor,
    masks: np.ndarray,
    class_index: int,
    shape: tuple[int, ...],
    batch_size: int,
    residual: torch.Tensor | None = None,
    precision: str = "fp32",
    extra: np.ndarray | torch.Tensor | None = None,
) -> np.ndarray:
    """Class logit of h((U * mask) W [+ residual]) for every (mask, image): array (M, N); h under
    autocast in `precision`; a token model's h also gets each image's `extra` tokens (N, T, C)."""
    masks = torch.from_numpy(masks).to(U3.device)
    extra = _extra(extra, U3.device)
    n, L, _ = U3.shape
    m = masks.shape[0]
    out = torch.empty(m * n, dtype=torch.float64, device=U3.device)
    for s in range(0, m * n, batch_size):
        pair = torch.arange(s, min(s + batch_size, m * n), device=U3.device)
        mi, ii = pair // n, pair % n
        x = (U3[ii] * masks[mi][:, None, :]) @ W  # (b, L, C)
        if residual is not None:
            x = x + residual[ii]
        if len(shape) == 4:
            x = x.reshape(len(pair), shape[2], shape[3], -1).permute(0, 3, 1, 2)
        else:
            x = x[:, 0, :]
        with autocast(U3.device, precision):
            logits = h(x) if extra is None else h(x, extra[ii])
        out[s : s + len(pair)] = logits[:, class_index].double()
    return out.reshape(m, n).cpu().numpy()


def _extra(extra: np.ndarray | torch.Tensor | None, dev: torch.device) -> torch.Tensor | None:
    return None if extra is None else torch.as_tensor(extra).to(dev, torch.float32)


def concept_sobol(
    h: torch.nn.Module,
    acts: np.ndarray | torch.Tensor,
    W: np.ndarray | torch.Tensor,
    class_index: int,
    n_designs: int = 32,
    sampler: str = "halton",
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device | None = None,
    *,
    U: np.ndarray | torch.Tensor | None = None,
    scramble: bool = False,
    precision: str = "fp32",
    extra: np.ndarray | torch.Tensor | None = None,
) -> np.ndarray:
    """CRAFT importance (k,): total Sobol index of each concept for the class logit, image-averaged.

    acts (N, C, H, W) or (N, C) at the split layer; every location is coded on W (k, C) by NNLS
    (or pass U, (N * H * W, k) in (image, y, x) order); a mask scales each concept's coefficient
    at all locations of an image, h sees (U * mask) W (no residual, as in CRAFT). h should be in
    eval mode (a SplitModel is accepted for h: its .h is used); batch_size is the number of
    perturbed images per h call; designs as in saltelli_masks. precision: autocast dtype of h's
    forwards ("fp32", "bf16", "fp16"); the estimator itself is float64. extra: a token model's
    class/register tokens per image (N, T, C), kept as they are while the map is masked.
    """
    h, dev, _, shape, Wt, U3 = _prepare(h, acts, W, U, device)
    autocast(dev, precision)  # an unknown precision fails here, before any work
    k = Wt.shape[0]
    masks = saltelli_masks(k, n_designs, sampler, seed, scramble)
    y = _masked_logits(
        h, U3, Wt, masks, class_index, shape, batch_size, precision=precision, extra=extra
    )
    return jansen_total(y, n_designs, k)


def logit_contributions(
    U: np.ndarray | torch.Tensor,
    W: np.ndarray | torch.Tensor,
    A_pooled: np.ndarray | torch.Tensor,
    head_weight: np.ndarray | torch.Tensor,
    head_bias: np.ndarray | torch.Tensor | None,
    class_index: int,
) -> dict[str, np.ndarray | float]:
    """Exact split of a linear head's class logit: logit = contributions.sum(1) + residual + bias.

    With w = head_weight[class_index]: contributions[:, i] = U[:, i] (W[i] . w), residual =
    (A - U W) . w, bias = head_bias[class_index]; float64. Keys: contributions (n, k), residual
    (n,), bias (float), logits (n,) = A . w + bias.
    """
    u, w_, a = (torch.as_tensor(x).detach().cpu().double().numpy() for x in (U, W, A_pooled))
    wc = torch.as_tensor(head_weight).detach().cpu().double().numpy()[class_index]
    b = (
        0.0
        if head_bias is None
        else float(torch.as_tensor(head_bias).detach().cpu().double()[class_index])
    )
    if u.shape[0] != a.shape[0] or u.shape[1] != w_.shape[0] or w_.shape[1] != a.shape[1]:
        raise ValueError(f"shapes do not chain: U {u.shape}, W {w_.shape}, A {a.shape}")
    contrib = u * (w_ @ wc)[None, :]
    residual = (a - u @ w_) @ wc
    return {"contributions": contrib, "residual": residual, "bias": b, "logits": a @ wc + b}


@dataclass
class LogitShare:
    """Percent shares of the summed class logit: concepts (k,) + residual + bias = 100."""

    concepts: np.ndarray
    residual: float
    bias: float
    denominator: float  # the summed class logit over the selected points
    n_points: int


def logit_share(
    contributions: np.ndarray,
    predicted_mask: np.ndarray,
    residual: np.ndarray | None = None,
    bias: float = 0.0,
) -> LogitShare:
    """Each concept's percent share of the class logit summed over the points predicted as the
    class.

    denominator = sum over selected points of (contributions.sum(1) + residual + bias), i.e. their
    summed class logit when residual and bias come from logit_contributions. A concept's share is
    negative when W[i] . w_c < 0. Shares are NaN when no point is selected or the sum is 0; when
    the sum is negative the signs invert, so callers should check `denominator`.
    """
    c = np.asarray(contributions, dtype=np.float64)
    sel = np.asarray(predicted_mask, dtype=bool)
    if sel.shape != (c.shape[0],):
        raise ValueError(f"predicted_mask must have shape ({c.shape[0]},), got {sel.shape}")
    r = np.zeros(c.shape[0]) if residual is None else np.asarray(residual, dtype=np.float64)
    n = int(sel.sum())
    conc, res, bia = c[sel].sum(0), float(r[sel].sum()), float(bias) * n
    denom = float(conc.sum()) + res + bia
    if n == 0 or denom == 0:
        return LogitShare(np.full(c.shape[1], np.nan), math.nan, math.nan, denom, n)
    return LogitShare(100 * conc / denom, 100 * res / denom, 100 * bia / denom, denom, n)


def rank_concepts(scores: np.ndarray) -> np.ndarray:
    """Concept indices by descending score (stable; NaN last)."""
    s = np.asarray(scores, dtype=np.float64)
    return np.argsort(np.where(np.isnan(s), np.inf, -s), kind="stable")


def deletion_curve(
    h: torch.nn.Module,
    acts: np.ndarray | torch.Tensor,
    U: np.ndarray | torch.Tensor | None,
    W: np.ndarray | torch.Tensor,
    class_index: int,
    order: np.ndarray | list[int],
    *,
    keep_residual: bool = False,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    extra: np.ndarray | torch.Tensor | None = None,
) -> tuple[np.ndarray, float]:
    """Mean class logit as concepts are removed in `order`: curve (k + 1,) and its area.

    curve[s] = mean over images of h(U W with the first s concepts of `order` zeroed [+ the fixed
    residual A - U W]); auc = trapezoid area with the x axis scaled to [0, 1] (in logit units;
    lower = the order finds the logit's support faster). U as in concept_sobol (None = NNLS);
    precision: autocast dtype of h's forwards; extra: a token model's tokens, as in concept_sobol.
    """
    h, dev, rows, shape, Wt, U3 = _prepare(h, acts, W, U, device)
    autocast(dev, precision)  # an unknown precision fails here, before any work
    k = Wt.shape[0]
    order = [int(i) for i in order]
    if sorted(order) != list(range(k)):
        raise ValueError(f"order must be a permutation of range({k}), got {order}")
    masks = np.ones((k + 1, k), dtype=np.float32)
    for s in range(1, k + 1):
        masks[s:, order[s - 1]] = 0
    residual = None
    if keep_residual:
        residual = rows.reshape(U3.shape[0], U3.shape[1], -1) - U3 @ Wt
    y = _masked_logits(h, U3, Wt, masks, class_index, shape, batch_size, residual, precision, extra)
    curve = y.mean(axis=1)
    return curve, float(np.trapezoid(curve, dx=1.0 / k))


def random_deletion_baseline(
    h: torch.nn.Module,
    acts: np.ndarray | torch.Tensor,
    U: np.ndarray | torch.Tensor | None,
    W: np.ndarray | torch.Tensor,
    class_index: int,
    n_orders: int = 8,
    seed: int = 0,
    **kwargs: object,
) -> tuple[np.ndarray, float]:
    """Deletion curve and area averaged over n_orders random orders (the chance baseline);
    kwargs go to deletion_curve (keep_residual, batch_size, device, precision, extra)."""
    k = torch.as_tensor(W).shape[0]
    if U is None:  # project once, not once per order
        dev = _model_device(_head(h), kwargs.get("device"), acts)  # type: ignore[arg-type]
        rows, _ = _flatten_acts(acts, dev)
        U = project_nnls(rows, torch.as_tensor(W).to(dev, torch.float32))
    rng = np.random.default_rng(seed)
    runs = [
        deletion_curve(h, acts, U, W, class_index, rng.permutation(k), **kwargs)
        for _ in range(n_orders)
    ]
    return np.mean([c for c, _ in runs], axis=0), float(np.mean([a for _, a in runs]))
