"""NMF and NNLS projection, checked against scikit-learn,
scipy.optimize.nnls and hand-built cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import nnls as scipy_nnls

import lens_core.factorize as fz
from lens_core.factorize import nmf, project_nnls


def _low_rank(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((300, 5)) @ rng.random((5, 40)) + 0.05 * rng.random((300, 40))).astype(
        np.float32
    )


def _sparse_relu(seed: int = 0) -> np.ndarray:
    """ReLU-like activations: sparse codes through a random map, thresholded (about 60% zeros)."""
    rng = np.random.default_rng(seed)
    codes = rng.exponential(1.0, (400, 64)) * (rng.random((400, 64)) < 0.08)
    pre = codes @ rng.normal(size=(64, 50)) + 0.3 * rng.normal(size=(400, 50)) - 0.5
    return np.maximum(pre, 0).astype(np.float32)


def _rel_error(A: np.ndarray, U: np.ndarray, W: np.ndarray) -> float:
    A64 = A.astype(np.float64)
    return float(
        np.linalg.norm(A64 - U.astype(np.float64) @ W.astype(np.float64)) / np.linalg.norm(A64)
    )


def _naive_hals(
    A: np.ndarray, U: np.ndarray, W: np.ndarray, iters: int = 200
) -> tuple[np.ndarray, np.ndarray]:
    """Textbook HALS (exact column updates, no safeguard against components collapsing to 0)."""
    U, W = U.copy(), W.copy()
    for _ in range(iters):
        for j in range(W.shape[0]):
            R = A - U @ W + np.outer(U[:, j], W[j])
            ww = W[j] @ W[j]
            U[:, j] = np.maximum(R @ W[j], 0) / ww if ww > 0 else 0
        for j in range(W.shape[0]):
            R = A - U @ W + np.outer(U[:, j], W[j])
            uu = U[:, j] @ U[:, j]
            W[j] = np.maximum(U[:, j] @ R, 0) / uu if uu > 0 else 0
    return U, W


@pytest.mark.parametrize("make,k", [(_low_rank, 5), (_sparse_relu, 6)])
def test_torch_matches_sklearn_error(make, k):
    A = make()
    ref = nmf(A, k, solver="sklearn")
    res = nmf(A, k, solver="torch")
    assert res.U.shape == (A.shape[0], k) and res.W.shape == (k, A.shape[1])
    assert res.U.dtype == np.float32 and res.W.dtype == np.float32
    assert (res.U >= 0).all() and (res.W >= 0).all()
    # rel_error is what it claims, recomputed independently in float64
    assert res.rel_error == pytest.approx(_rel_error(A, res.U, res.W), rel=1e-4)
    assert ref.rel_error == pytest.approx(_rel_error(A, ref.U, ref.W), rel=1e-4)
    assert res.rel_error <= 1.05 * ref.rel_error
    assert res.dead == 0 and res.n_iter >= 1 and res.seconds > 0


def test_no_dead_components_where_naive_hals_dies(monkeypatch):
    # rank 3 data with a zero column block, factorized with k = 8 > rank
    rng = np.random.default_rng(0)
    A = np.hstack([rng.random((60, 3)) @ rng.random((3, 20)), np.zeros((60, 20))])
    k = 8
    U0, W0 = rng.random((60, k)), rng.random((k, 40))
    Un, Wn = _naive_hals(A, U0, W0)
    naive_dead = int(((Un.max(0) <= 0) | (Wn.max(1) <= 0)).sum())
    assert naive_dead > 0, "the case must defeat plain HALS"

    calls = []
    real = fz._reseed
    monkeypatch.setattr(fz, "_reseed", lambda *a: (calls.append(list(a[3])), real(*a)))
    res = nmf(A.astype(np.float32), k)
    assert calls, "the solver should have had to re-seed"
    assert res.dead == 0
    assert (res.U.max(0) > 0).all() and (res.W.max(1) > 0).all()
    assert _rel_error(A, res.U, res.W) < 1e-3


def test_reseed_on_exact_fit_splits_a_component():
    # the residual is zero, so a dead component can only be revived by splitting a live one
    rng = np.random.default_rng(1)
    U, W = rng.random((30, 2)), rng.random((2, 10))
    A = torch.tensor(U @ W, dtype=torch.float32)
    Ut = torch.zeros(3, 30)
    Wt = torch.zeros(3, 10)
    Ut[:2], Wt[:2] = torch.tensor(U.T, dtype=torch.float32), torch.tensor(W, dtype=torch.float32)
    fz._reseed(A, Ut, Wt, [2])
    assert (Ut.amax(1) > 0).all() and (Wt.amax(1) > 0).all()
    assert torch.allclose(Ut.T @ Wt, A, atol=1e-5)


def test_torch_tensor_input_and_k_equal_min_dim():
    A = torch.from_numpy(_low_rank(2)[:, :8].copy())
    res = nmf(A, 8, max_iter=100)
    assert res.dead == 0 and res.U.shape == (300, 8)
    assert res.rel_error == pytest.approx(_rel_error(A.numpy(), res.U, res.W), rel=1e-4)


def _nnls_reference(A: np.ndarray, W: np.ndarray) -> np.ndarray:
    return np.stack([scipy_nnls(W.T.astype(np.float64), a.astype(np.float64))[0] for a in A])


@pytest.mark.parametrize(
    "offset", [0.0, 2.0]
)  # 2.0 makes the rows of W nearly parallel (cond ~1e3)
def test_project_nnls_matches_scipy(offset):
    rng = np.random.default_rng(3)
    W = (rng.random((6, 20)) + offset).astype(np.float32)
    codes = rng.random((150, 6)) * (rng.random((150, 6)) < 0.5)
    A = np.maximum(codes @ W + 0.5 * rng.normal(size=(150, 20)), 0).astype(np.float32)
    ref = _nnls_reference(A, W)
    assert (ref == 0).any(), "some constraints should be active"
    U = project_nnls(A, W)
    assert isinstance(U, np.ndarray) and U.dtype == np.float32 and (U >= 0).all()
    np.testing.assert_allclose(U, ref, atol=1e-4 * ref.max())


def test_project_nnls_torch_in_torch_out():
    rng = np.random.default_rng(4)
    W = rng.random((4, 12)).astype(np.float32)
    A = rng.random((30, 12)).astype(np.float32)
    U = project_nnls(torch.from_numpy(A), torch.from_numpy(W))
    assert isinstance(U, torch.Tensor)
    np.testing.assert_allclose(U.numpy(), _nnls_reference(A, W), atol=1e-5)


def test_validation_errors():
    A = _low_rank()
    with pytest.raises(ValueError, match="non-negative"):
        nmf(A - 1.0, 3)
    with pytest.raises(ValueError, match=r"k=41 .*min\(n_points=300, channels=40\)"):
        nmf(A, 41)
    with pytest.raises(ValueError, match="2-D"):
        nmf(A[None], 3)
    bad = A.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        nmf(bad, 3)
    with pytest.raises(ValueError, match="all zeros"):
        nmf(np.zeros((5, 4)), 2)
    with pytest.raises(ValueError, match="solver"):
        nmf(A, 3, solver="magic")
    with pytest.raises(ValueError, match="positive integer"):
        nmf(A, 0)
    with pytest.raises(ValueError, match=r"W \(k, C\)"):
        project_nnls(A, np.ones((3, 7)))


def test_float_noise_negatives_are_clipped():
    A = _low_rank()
    A[0, :3] = -1e-9
    res = nmf(A, 3)
    assert res.dead == 0 and (res.U >= 0).all()
