"""NMF concept extraction A ~= U W (U, W >= 0): a torch HALS solver and the scikit-learn reference.

The torch solver is accelerated HALS (Gillis & Glineur 2012) from an NNDSVDa start computed with
torch, with a stop on the relative change of the reconstruction error. Components that die (an
all-zero column of U or row of W, the known failure of plain HALS) are re-seeded from the residual.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

NEG_TOL = (
    1e-6  # negatives down to -NEG_TOL * max|A| are float noise and clipped to 0 (is_nonnegative)
)
_BLOCK = 8192  # rows per block when a full residual is formed
_WARM_SWEEPS = 50  # coordinate-descent passes that guess the NNLS support before pivoting
_EXACT_BELOW = 0.1  # below this relative error, convergence is tested on the exact residual


@dataclass
class NMFResult:
    """A ~= U W with rel_error = ||A - UW||_F / ||A||_F; dead = components with all-zero U or W."""

    U: np.ndarray  # (n, k) float32
    W: np.ndarray  # (k, C) float32
    rel_error: float
    n_iter: int
    dead: int
    seconds: float

    @classmethod
    def of(
        cls, A: torch.Tensor, U: torch.Tensor, W: torch.Tensor, n_iter: int, dead: int, start: float
    ) -> NMFResult:
        """The result of torch factors U, W of A: float32 arrays, their relative error, the
        seconds since `start` (a perf_counter reading)."""
        return cls(
            U=U.cpu().numpy().astype(np.float32, copy=False),
            W=W.cpu().numpy().astype(np.float32, copy=False),
            rel_error=relative_error(A, U, W),
            n_iter=n_iter,
            dead=dead,
            seconds=time.perf_counter() - start,
        )


def _resolve_device(device: str | torch.device | None, *arrays: object) -> torch.device:
    if device is not None:
        return torch.device(device)
    for a in arrays:
        if isinstance(a, torch.Tensor):
            return a.device
    return torch.device("cpu")


def is_nonnegative(lo: float, hi: float) -> bool:
    """True when values ranging over [lo, hi] are non-negative up to rounding noise.

    The one tolerance rule of the project: negatives no larger than NEG_TOL * max|x| are float
    noise (clipped to 0 before NMF), anything below is a signed layer. The set-up probe of a layer
    and the factorization both decide with it, so they never disagree.
    """
    return lo >= -NEG_TOL * max(abs(lo), abs(hi))


def as_matrix(A: np.ndarray | torch.Tensor, device: torch.device, name: str = "A") -> torch.Tensor:
    """A as a float32 2-D finite tensor on device (any sign); ValueError names what is wrong."""
    t = torch.as_tensor(A)
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (points x channels), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    t = t.to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def as_nonneg_matrix(
    A: np.ndarray | torch.Tensor, device: torch.device, name: str = "A"
) -> torch.Tensor:
    """A as a float32 2-D non-negative tensor on device; ValueError names what is wrong."""
    t = as_matrix(A, device, name)
    lo, hi = float(t.min()), float(t.max())
    if lo < 0:
        if not is_nonnegative(lo, hi):
            raise ValueError(
                f"{name} must be non-negative (NMF); its minimum is {lo:.4g} against a maximum of "
                f"{hi:.4g}: a signed layer needs concepts.method = 'semi-nmf' (or 'auto')"
            )
        t = t.clamp(min=0)
    return t


def _check_k(k: int, n: int, c: int) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k (number of concepts) must be a positive integer, got {k!r}")
    if k > min(n, c):
        raise ValueError(
            f"k={k} concepts exceed min(n_points={n}, channels={c}) = {min(n, c)}; "
            "use fewer concepts or more points"
        )


@torch.no_grad()
def nmf(
    A: np.ndarray | torch.Tensor,
    k: int,
    solver: str = "torch",
    max_iter: int = 500,
    tol: float = 1e-4,
    seed: int = 0,
    device: str | torch.device | None = None,
    *,
    target_error: float | None = None,
) -> NMFResult:
    """Factorize A (n, C) >= 0 as U (n, k) @ W (k, C) with U, W >= 0.

    solver "torch" (HALS; on `device`, default A's device or CPU; deterministic, `seed` unused) or
    "sklearn" (scikit-learn NMF, nndsvda + coordinate descent, the reference). `tol` stops on the
    relative decrease of the error per iteration; `target_error` also stops once rel_error <= it.
    """
    if solver not in ("torch", "sklearn"):
        raise ValueError(f"unknown NMF solver {solver!r}; use 'torch' or 'sklearn'")
    start = time.perf_counter()
    dev = _resolve_device(device, A) if solver == "torch" else torch.device("cpu")
    At = as_nonneg_matrix(A, dev)
    n, c = At.shape
    _check_k(k, n, c)
    if float(At.max()) == 0.0:
        raise ValueError("A is all zeros: there is nothing to factorize")
    if solver == "sklearn":
        U, W, n_iter = _sklearn_nmf(At.numpy(), int(k), max_iter, tol, seed)
        Ut, Wt = torch.from_numpy(U), torch.from_numpy(W)
    else:
        Ut, Wt, n_iter = _hals_nmf(At, int(k), max_iter, tol, target_error)
    dead = int(((Ut.amax(0) <= 0) | (Wt.amax(1) <= 0)).sum())
    return NMFResult.of(At, Ut, Wt, n_iter, dead, start)


def _sqnorm(x: torch.Tensor) -> float:
    """||x||^2 accumulated in float64."""
    return float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2


def _residual_norm2(A: torch.Tensor, U: torch.Tensor, W: torch.Tensor) -> float:
    """||A - U W||_F^2 in float64, the residual formed block by block."""
    return sum(
        _sqnorm(A[s : s + _BLOCK] - U[s : s + _BLOCK] @ W) for s in range(0, A.shape[0], _BLOCK)
    )


def relative_error(A: torch.Tensor, U: torch.Tensor, W: torch.Tensor) -> float:
    """||A - U W||_F / ||A||_F, accumulated in float64 over row blocks."""
    den = _sqnorm(A)
    num = _residual_norm2(A, U.to(A.device, A.dtype), W.to(A.device, A.dtype))
    return math.sqrt(num / den) if den > 0 else 0.0


def _sklearn_nmf(
    A: np.ndarray, k: int, max_iter: int, tol: float, seed: int
) -> tuple[np.ndarray, np.ndarray, int]:
    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning

    model = NMF(
        n_components=k, init="nndsvda", solver="cd", max_iter=max_iter, tol=tol, random_state=seed
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        U = model.fit_transform(A)
    W = model.components_
    return U.astype(np.float32), W.astype(np.float32), int(model.n_iter_)


def _top_singular(A: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k singular triplets (u (n,k), s (k,), v (k,C)) from the smaller Gram matrix."""
    transpose = A.shape[0] < A.shape[1]
    M = A.T if transpose else A
    gram = (M.T @ M).double()
    evals, evecs = torch.linalg.eigh(gram)
    idx = torch.argsort(evals, descending=True)[:k]
    s = evals[idx].clamp(min=0).sqrt()
    v = evecs[:, idx].to(A.dtype)  # right vectors of M
    safe = torch.where(s > 0, s, torch.ones_like(s)).to(A.dtype)
    u = (M @ v) / safe  # left vectors of M
    u = torch.where(s.to(A.dtype) > 0, u, torch.zeros_like(u))
    if transpose:
        u, v = v, u
    return u, s.to(A.dtype), v.T.contiguous()


def nndsvda_init(A: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NNDSVD start (Boutsidis & Gallopoulos 2008) with zeros filled by mean(A):
    (U (n,k), W (k,C))."""
    u, s, v = _top_singular(A, k)

    def split(
        x: torch.Tensor, dim: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        p, m = x.clamp(min=0), (-x).clamp(min=0)
        return p, m, torch.linalg.vector_norm(p, dim=dim), torch.linalg.vector_norm(m, dim=dim)

    up, um, nup, num = split(u, 0)
    vp, vm, nvp, nvm = split(v, 1)
    use_pos = nup * nvp >= num * nvm
    sigma = torch.where(use_pos, nup * nvp, num * nvm)
    uu = torch.where(use_pos, up / nup.clamp(min=1e-30), um / num.clamp(min=1e-30))
    vv = torch.where(
        use_pos[:, None], vp / nvp.clamp(min=1e-30)[:, None], vm / nvm.clamp(min=1e-30)[:, None]
    )
    scale = (s * sigma).sqrt()
    U = uu * scale
    W = vv * scale[:, None]
    avg = A.mean()
    U = torch.where(U > 0, U, avg)
    W = torch.where(W > 0, W, avg)
    return U, W


def _hals_sweep(X: torch.Tensor, P: torch.Tensor, G: torch.Tensor, diag: list[float]) -> None:
    """One exact coordinate pass over the rows of X for min ||.||: gradient = G X - P (in place)."""
    for j, g in enumerate(diag):
        if g <= 0:
            continue
        X[j] += (P[j] - G[j] @ X) / g
        X[j].clamp_(min=0)


def _hals_inner(
    X: torch.Tensor, P: torch.Tensor, G: torch.Tensor, max_inner: int, delta: float = 0.1
) -> None:
    """Repeat HALS passes while they still move X (stop when a pass moves < delta * the first)."""
    diag = G.diagonal().tolist()
    first = None
    for _ in range(max_inner):
        old = X.clone()
        _hals_sweep(X, P, G, diag)
        moved = float(torch.linalg.vector_norm(X - old))
        if first is None:
            first = moved
        elif moved <= delta * first:
            break


def _reseed(A: torch.Tensor, Ut: torch.Tensor, W: torch.Tensor, dead: list[int]) -> None:
    """Re-seed dead components in place from the data row with the largest positive residual."""
    for j in dead:
        Ut[j] = 0
        W[j] = 0
        best, best_i = 0.0, -1
        for s in range(0, A.shape[0], _BLOCK):
            r = (A[s : s + _BLOCK] - Ut[:, s : s + _BLOCK].T @ W).clamp(min=0)
            score = (r * r).sum(1)
            i = int(score.argmax())
            if float(score[i]) > best:
                best, best_i = float(score[i]), s + i
        if best_i < 0 or best <= 1e-20 * _sqnorm(A):
            # Exact fit already: split the strongest component in two (same error, both alive).
            strength = torch.linalg.vector_norm(Ut, dim=1) * torch.linalg.vector_norm(W, dim=1)
            m = int(strength.argmax())
            Ut[m] *= 0.5
            Ut[j] = Ut[m]
            W[j] = W[m]
            continue
        w = (A[best_i] - Ut[:, best_i] @ W).clamp(min=0)
        W[j] = w
        # exact HALS update of column j given the others (U[:, j] = 0 now): never raises the error
        Ut[j] = ((A @ w - Ut.T @ (W @ w)) / (w @ w)).clamp(min=0)


def _dead(Ut: torch.Tensor, W: torch.Tensor) -> list[int]:
    return torch.nonzero((Ut.amax(1) <= 0) | (W.amax(1) <= 0)).flatten().tolist()


def _hals_nmf(
    A: torch.Tensor, k: int, max_iter: int, tol: float, target: float | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    n, c = A.shape
    U, W = nndsvda_init(A, k)
    Ut = U.T.contiguous()  # (k, n): rows are contiguous for the column updates
    norm2 = _sqnorm(A)
    inner_u = int(min(30, 1 + 0.5 * (1 + c / (k + 1))))
    inner_w = int(min(30, 1 + 0.5 * (1 + n / (k + 1))))
    prev = math.inf
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 (n_iter is the count reported)
        P = W @ A.T
        _hals_inner(Ut, P, W @ W.T, inner_u)
        P = Ut @ A
        G = Ut @ Ut.T
        _hals_inner(W, P, G, inner_w)
        err2 = (
            norm2
            - 2 * float((W.double() * P.double()).sum())
            + float((G.double() * (W @ W.T).double()).sum())
        )
        rel = math.sqrt(max(err2, 0.0) / norm2)
        if rel < _EXACT_BELOW:  # the cheap expansion cancels badly for a close fit
            rel = math.sqrt(_residual_norm2(A, Ut.T, W) / norm2)
        dead = _dead(Ut, W)
        if dead:
            _reseed(A, Ut, W, dead)
            prev = math.inf
            continue
        if (target is not None and rel <= target) or prev - rel < tol * max(rel, 1e-12):
            break
        prev = rel
    return Ut.T.contiguous(), W, n_iter


def _pattern_ids(F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique rows of a bool matrix F (m, k) and each row's index among them."""
    if F.shape[1] <= 62:
        code = (F.long() << torch.arange(F.shape[1], device=F.device)).sum(1)
        uniq, inv = torch.unique(code, return_inverse=True)
        bits = (uniq[:, None] >> torch.arange(F.shape[1], device=F.device)) & 1
        return bits.bool(), inv
    return torch.unique(F, dim=0, return_inverse=True)


def _bpp_solve(
    G: torch.Tensor, P: torch.Tensor, F: torch.Tensor, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block principal pivoting (Kim & Park 2011): min_x>=0 x'Gx/2 - p'x for each row p of P.

    G (k, k) and P (m, k) float64, F (m, k) the starting passive sets. One inverse is computed per
    distinct passive set, so rows that share a support share the work. Returns x and a mask of rows
    whose KKT conditions hold.
    """
    m, k = P.shape
    eye = torch.eye(k, dtype=G.dtype, device=G.device)
    ridge = 1e-12 * float(G.diagonal().max()) * eye
    F = F.clone()
    x = torch.zeros_like(P)
    alpha = torch.full((m,), 3, device=G.device)
    beta = torch.full((m,), k + 1, device=G.device)
    todo = torch.arange(m, device=G.device)
    ok = torch.zeros(m, dtype=torch.bool, device=G.device)
    pscale = P.abs().amax(1).clamp(min=1e-300)
    for _ in range(max_iter):
        f, p = F[todo], P[todo]
        uniq, inv = _pattern_ids(f)
        both = uniq[:, :, None] & uniq[:, None, :]
        Minv = torch.linalg.inv(torch.where(both, G + ridge, eye))
        xs = torch.bmm(Minv[inv], (p * f)[:, :, None])[:, :, 0] * f
        y = (xs @ G - p) * ~f
        tol_x = 1e-12 * xs.abs().amax(1, keepdim=True)
        bad = (f & (xs < -tol_x)) | (~f & (y < -1e-10 * pscale[todo, None]))
        nbad = bad.sum(1)
        x[todo] = xs
        done = nbad == 0
        ok[todo[done]] = True
        keep = ~done
        todo, bad, nbad = todo[keep], bad[keep], nbad[keep]
        if todo.numel() == 0:
            break
        a, b = alpha[todo], beta[todo]
        better = nbad < b
        b = torch.where(better, nbad, b)
        a = torch.where(better, torch.full_like(a, 3), a - (~better).long())
        full = better | (a >= 0)
        # backup rule: flip only the largest infeasible index when full swaps stop making progress
        last = k - 1 - torch.flip(bad, dims=[1]).long().argmax(1)
        single = torch.zeros_like(bad)
        single[torch.arange(len(todo), device=G.device), last] = True
        alpha[todo] = a.clamp(min=0)
        beta[todo] = b
        F[todo] = F[todo] ^ torch.where(full[:, None], bad, single)
    return x.clamp(min=0), ok


@torch.no_grad()
def project_nnls(
    A: np.ndarray | torch.Tensor,
    W: np.ndarray | torch.Tensor,
    max_iter: int = 200,
    device: str | torch.device | None = None,
) -> np.ndarray | torch.Tensor:
    """U >= 0 minimizing ||A - U W||_F with W (k, C) fixed, for all rows of A (n, C) at once.

    A few coordinate-descent (HALS) passes guess each row's support, then an exact batched
    active-set solver (block principal pivoting) on the k x k normal equations in float64 settles
    it; rows still unsettled after max_iter pivots are finished by more coordinate descent.
    Returns a tensor on the compute device if A is a tensor, else a float32 numpy array.
    """
    dev = _resolve_device(device, A, W)
    At = torch.as_tensor(A).to(dev, torch.float32)
    Wt = torch.as_tensor(W).to(dev, torch.float32)
    if At.ndim != 2 or Wt.ndim != 2 or At.shape[1] != Wt.shape[1]:
        raise ValueError(
            f"need A (n, C) and W (k, C); got A {tuple(At.shape)} and W {tuple(Wt.shape)}"
        )
    if not bool(torch.isfinite(At).all()) or not bool(torch.isfinite(Wt).all()):
        raise ValueError("A and W must be finite")
    Wd = Wt.double()
    G = Wd @ Wd.T
    diag = G.diagonal().tolist()
    block = max(1024, (1 << 22) // len(diag) ** 2)  # keeps the (rows, k, k) pivoting buffers small
    out = [torch.zeros(0, len(diag), device=dev)]
    for s in range(0, At.shape[0], block):
        P = At[s : s + block].double() @ Wd.T  # (m, k)
        Pt = P.T.contiguous()
        guess = torch.zeros_like(Pt)
        for _ in range(_WARM_SWEEPS):
            old = guess.clone()
            _hals_sweep(guess, Pt, G, diag)
            if float((guess - old).abs().max()) <= 1e-7 * float(guess.abs().max()):
                break
        x, ok = _bpp_solve(G, P, guess.T > 0, max_iter)
        if not bool(ok.all()):
            rest = x[~ok].T.contiguous()
            Pt = P[~ok].T.contiguous()
            for _ in range(10 * max_iter):
                _hals_sweep(rest, Pt, G, diag)
            x[~ok] = rest.T
        out.append(x.to(torch.float32))
    U = torch.cat(out)
    return U if isinstance(A, torch.Tensor) else U.cpu().numpy()
