"""Sobol indices, logit split and share, deletion curves,
each checked against an independent truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lens_core.factorize import nmf, project_nnls
from lens_core.importance import (
    concept_sobol,
    deletion_curve,
    logit_contributions,
    logit_share,
    random_deletion_baseline,
    rank_concepts,
    saltelli_masks,
    sobol_total_indices,
)

ISHIGAMI_A, ISHIGAMI_B = 7.0, 0.1


def _ishigami(masks: np.ndarray) -> np.ndarray:
    x = -math.pi + 2 * math.pi * masks.astype(np.float64)  # [0, 1] -> [-pi, pi]
    s1 = np.sin(x[:, 0])
    return s1 + ISHIGAMI_A * np.sin(x[:, 1]) ** 2 + ISHIGAMI_B * x[:, 2] ** 4 * s1


def _ishigami_totals() -> np.ndarray:
    """Closed-form totals: V1 = (1 + b pi^4/5)^2 / 2, V2 = a^2/8, V13 = 8 b^2 pi^8 / 225."""
    a, b = ISHIGAMI_A, ISHIGAMI_B
    v1 = 0.5 * (1 + b * math.pi**4 / 5) ** 2
    v2 = a**2 / 8
    v13 = 8 * b**2 * math.pi**8 / 225
    # total variance, independently
    v = a**2 / 8 + b * math.pi**4 / 5 + b**2 * math.pi**8 / 18 + 0.5
    assert v == pytest.approx(v1 + v2 + v13)
    return np.array([(v1 + v13) / v, v2 / v, v13 / v])


@pytest.mark.parametrize("sampler", ["halton", "sobol"])
def test_ishigami_total_indices(sampler):
    truth = _ishigami_totals()
    assert truth == pytest.approx([0.5576, 0.4424, 0.2437], abs=1e-4)
    st = sobol_total_indices(_ishigami, 3, n_designs=2**12, sampler=sampler)
    np.testing.assert_allclose(st, truth, atol=0.01)  # QMC error at 4096 designs is ~3e-3


def test_linear_model_total_indices():
    coef = np.array([3.0, 2.0, 1.0, 0.5])
    st = sobol_total_indices(lambda m: m @ coef, 4, n_designs=2**12, batch_size=1000)
    np.testing.assert_allclose(st, coef**2 / (coef**2).sum(), atol=2e-3)


def test_default_designs_rank_a_linear_model():
    coef = np.array([1.0, 0.2, 2.0, 0.5, 1.4, 0.05, 3.0, 0.8, 1.7, 0.3])
    st = sobol_total_indices(lambda m: m @ coef, 10)  # 32 Halton designs, as in CRAFT
    np.testing.assert_array_equal(rank_concepts(st), np.argsort(-coef))


def test_per_point_outputs_are_averaged_and_constant_points_skipped():
    a, b = np.array([3.0, 1.0, 0.0]), np.array([0.0, 1.0, 1.0])
    f = lambda m: np.stack([m @ a, m @ b, np.full(len(m), 5.0)], axis=1)  # noqa: E731
    st = sobol_total_indices(f, 3, n_designs=2**12)
    truth = 0.5 * (a**2 / (a**2).sum() + b**2 / (b**2).sum())
    np.testing.assert_allclose(st, truth, atol=3e-3)
    np.testing.assert_array_equal(sobol_total_indices(lambda m: np.ones(len(m)), 3), np.zeros(3))


def test_saltelli_masks_layout():
    m = saltelli_masks(3, 8, "sobol")
    a, b, rep = m[:8], m[8:16], m[16:].reshape(3, 8, 3)
    for i in range(3):
        expect = a.copy()
        expect[:, i] = b[:, i]
        np.testing.assert_array_equal(rep[i], expect)
    with pytest.raises(ValueError, match="sampler"):
        saltelli_masks(3, 8, "grid")


class ToyNet(nn.Module):
    """conv features -> global average pool -> linear, split after the features."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    net = ToyNet().eval()
    x = torch.rand(40, 3, 10, 10)
    with torch.no_grad():
        feats, logits = net.features(x), net(x)
    A = feats.mean((2, 3)).numpy()
    W = nmf(A, 3).W
    return net, A, W, project_nnls(A, W), logits.numpy()


def test_logit_split_matches_the_module(toy):
    net, A, W, U, logits = toy
    fc = net.head[2]
    for c in range(4):
        parts = logit_contributions(U, W, A, fc.weight, fc.bias, c)
        total = parts["contributions"].sum(1) + parts["residual"] + parts["bias"]
        np.testing.assert_allclose(total, logits[:, c], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(parts["logits"], logits[:, c], rtol=1e-5, atol=1e-5)
        assert parts["contributions"].shape == (40, 3)


def test_logit_share_denominator_is_the_summed_logit(toy):
    net, A, W, U, logits = toy
    c = int(np.bincount(logits.argmax(1)).argmax())
    pred = logits.argmax(1) == c
    parts = logit_contributions(U, W, A, net.head[2].weight, net.head[2].bias, c)
    share = logit_share(parts["contributions"], pred, parts["residual"], parts["bias"])
    assert share.n_points == pred.sum()
    assert share.denominator == pytest.approx(float(logits[pred, c].sum()), rel=1e-5)
    assert share.concepts.sum() + share.residual + share.bias == pytest.approx(100.0)


def test_logit_share_by_hand():
    contrib = np.array([[2.0, -1.0], [9.0, 9.0]])  # concept 1 pulls the logit down on point 0
    share = logit_share(contrib, np.array([True, False]), np.array([0.5, 0.0]), 0.5)
    assert share.denominator == pytest.approx(2.0)
    np.testing.assert_allclose(share.concepts, [100.0, -50.0])
    assert (share.residual, share.bias) == pytest.approx((25.0, 25.0))
    empty = logit_share(contrib, np.array([False, False]))
    assert empty.n_points == 0 and np.isnan(empty.concepts).all()


def test_rank_concepts():
    np.testing.assert_array_equal(rank_concepts([0.1, np.nan, 0.5, 0.1]), [2, 0, 3, 1])


SCALES = np.array([0.5, 4.0, 1.0, 2.0])  # concept strengths: the true order is 1, 3, 2, 0


@pytest.fixture(scope="module")
def linear_toy():
    """Spatial activations built from known concepts,
    read by pool -> linear (an exactly linear h)."""
    rng = np.random.default_rng(0)
    n, hw, k, c = 12, 3, 4, 6
    W = rng.random((k, c)).astype(np.float32) + np.eye(k, c, dtype=np.float32)
    U = (rng.random((n, hw, hw, k)) * SCALES).astype(np.float32)
    acts = np.ascontiguousarray((U @ W).transpose(0, 3, 1, 2))  # (N, C, H, W)
    torch.manual_seed(0)
    fc = nn.Linear(c, 2)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor(rng.random((2, c)), dtype=torch.float32))
    h = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc).eval()
    # per image the class logit is sum_j s_nj m_j + b: total index of j is s_nj^2 / sum_i s_ni^2
    s = U.mean((1, 2)).astype(np.float64) * (
        W.astype(np.float64) @ fc.weight[0].detach().double().numpy()
    )
    truth = (s**2 / (s**2).sum(1, keepdims=True)).mean(0)
    return h, acts, W, U, truth


def test_concept_sobol_recovers_linear_truth(linear_toy):
    h, acts, W, _, truth = linear_toy
    st = concept_sobol(h, acts, W, 0, n_designs=2**10, batch_size=4096)
    np.testing.assert_allclose(st, truth, atol=0.01)
    np.testing.assert_array_equal(rank_concepts(truth), [1, 3, 2, 0])
    default = concept_sobol(h, torch.from_numpy(acts), W, 0, batch_size=100)
    np.testing.assert_array_equal(rank_concepts(default), rank_concepts(truth))


def test_concept_sobol_pooled_activations(linear_toy):
    h, acts, W, _, _ = linear_toy
    pooled = acts.mean((2, 3))
    fc = h[2]
    U = project_nnls(pooled, W)
    s = U.astype(np.float64) * (W.astype(np.float64) @ fc.weight[0].detach().double().numpy())
    truth = (s**2 / (s**2).sum(1, keepdims=True)).mean(0)
    st = concept_sobol(fc, pooled, W, 0, n_designs=2**10, batch_size=2048)
    np.testing.assert_allclose(st, truth, atol=0.01)


def test_deletion_curve_true_order_beats_random(linear_toy):
    h, acts, W, U, truth = linear_toy
    order = rank_concepts(truth)
    curve, auc = deletion_curve(h, acts, U.reshape(-1, 4), W, 0, order)
    with torch.no_grad():
        full = float(h(torch.from_numpy(acts))[:, 0].mean())
    assert curve.shape == (5,)
    assert curve[0] == pytest.approx(full, rel=1e-5)
    # nothing left: h(0) = bias
    assert curve[-1] == pytest.approx(float(h[2].bias[0].detach()), abs=1e-6)
    rand_curve, rand_auc = random_deletion_baseline(h, acts, None, W, 0, n_orders=6)
    assert auc < rand_auc
    worst, worst_auc = deletion_curve(h, acts, None, W, 0, order[::-1], keep_residual=True)
    assert worst_auc > rand_auc
    with pytest.raises(ValueError, match="permutation"):
        deletion_curve(h, acts, U, W, 0, [0, 1, 1, 2])
