"""Concept extractors (lens_core.extract, lens_core.seminmf) against independent truths: planted
signed dictionaries, scikit-learn's NMF and DictionaryLearning, a brute-force alternating NNLS
written here with scipy, and the tolerance rule shared by the set-up check and the factorization."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.optimize import nnls as scipy_nnls
from tiny import TINY

from lens_core.config import ConceptConfig, make_config
from lens_core.extract import (
    AutoExtractor,
    NMFExtractor,
    SemiNMFExtractor,
    SignedLayerError,
    choose_method,
    make_extractor,
)
from lens_core.factorize import is_nonnegative, nmf
from lens_core.seminmf import semi_nmf


def _planted(seed: int, n: int = 600, k: int = 6, c: int = 32, noise: float = 0.0):
    """X = U W (+ noise): U >= 0 with 1-3 active concepts per row, W signed Gaussian."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(k, c))
    U = np.zeros((n, k))
    for i in range(n):
        m = rng.integers(1, 4)
        U[i, rng.choice(k, m, replace=False)] = rng.exponential(1.0, m)
    X = U @ W + noise * rng.normal(size=(n, c))
    return X.astype(np.float32), U, W


def _gelu_like(seed: int, n: int = 300, c: int = 40) -> np.ndarray:
    """Activations after a GELU: sparse causes through a random map, about half negative."""
    rng = np.random.default_rng(seed)
    codes = rng.exponential(1.0, (n, 24)) * (rng.random((n, 24)) < 0.15)
    pre = codes @ rng.normal(size=(24, c)) + 0.3 * rng.normal(size=(n, c))
    return torch.nn.functional.gelu(torch.from_numpy(pre)).numpy().astype(np.float32)


def _matched_cosines(W: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Cosines of the recovered rows with the planted ones, concepts matched by Hungarian."""
    a = W / np.linalg.norm(W, axis=1, keepdims=True)
    b = truth / np.linalg.norm(truth, axis=1, keepdims=True)
    cos = b @ a.T
    rows, cols = linear_sum_assignment(-cos)
    return cos[rows, cols]


def _rel(X: np.ndarray, U: np.ndarray, W: np.ndarray) -> float:
    X = X.astype(np.float64)
    return float(
        np.linalg.norm(X - U.astype(np.float64) @ W.astype(np.float64)) / np.linalg.norm(X)
    )


def _brute_force_semi_nmf(X: np.ndarray, k: int, seed: int, iters: int = 100) -> float:
    """Reference: exact alternating minimization, each row of U by scipy's NNLS, W by lstsq."""
    rng = np.random.default_rng(seed)
    X = X.astype(np.float64)
    W = X[rng.choice(len(X), k, replace=False)].copy()
    prev = np.inf
    for _ in range(iters):
        U = np.array([scipy_nnls(W.T, x)[0] for x in X])
        W = np.linalg.lstsq(U, X, rcond=None)[0]
        err = _rel(X, U, W)
        if prev - err < 1e-8:
            break
        prev = err
    return err


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_semi_nmf_recovers_a_planted_signed_dictionary(seed, noise):
    X, _, W = _planted(seed, noise=noise)
    res = semi_nmf(X, 6, seed=0)
    assert (res.U >= 0).all() and res.dead == 0
    assert (res.W < 0).any()  # the dictionary is signed, as planted
    cos = _matched_cosines(res.W, W)
    assert cos.min() > 0.95, cos
    # noise-free: exact; noisy: the fit is as good as the noise allows (|noise| / |X| ~ 0.02-0.03)
    assert res.rel_error < (1e-3 if noise == 0 else 0.04)
    assert res.rel_error == pytest.approx(_rel(X, res.U, res.W), abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k", [4, 8])
def test_semi_nmf_error_matches_independent_references(seed, k):
    """Same data, same k: within 1% of brute-force alternating NNLS (best of 2 starts) and of
    scikit-learn's DictionaryLearning with non-negative codes (a near-zero L1 weight)."""
    from sklearn.decomposition import DictionaryLearning

    X = _gelu_like(seed, n=150)
    assert (X < 0).mean() > 0.3
    ours = SemiNMFExtractor(k).fit(X)
    assert ours.attrs["method"] == "semi-nmf"
    assert ours.attrs["rel_error"] == pytest.approx(_rel(X, ours.U, ours.W), abs=1e-5)
    brute = min(_brute_force_semi_nmf(X, k, s) for s in range(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dl = DictionaryLearning(
            n_components=k,
            alpha=1e-4,
            positive_code=True,
            max_iter=100,
            fit_algorithm="cd",
            transform_algorithm="lasso_cd",
            transform_alpha=1e-4,
            random_state=seed,
        )
        code = dl.fit_transform(X.astype(np.float64))
    sk = _rel(X, code, dl.components_)
    assert ours.attrs["rel_error"] <= 1.01 * min(brute, sk), (ours.attrs["rel_error"], brute, sk)


@pytest.mark.parametrize("seed", [0, 1])
def test_on_a_non_negative_layer_auto_is_nmf_as_good_as_scikit_learn(seed):
    """A non-negative layer gets NMF; its error is scikit-learn's NMF's on the same data, and
    semi-NMF (a relaxation of NMF) does no worse."""
    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning

    rng = np.random.default_rng(seed)
    X = np.maximum(_gelu_like(seed) + 0.1 * rng.random((300, 40)), 0).astype(np.float32)
    k = 6
    fit = make_extractor(ConceptConfig(n_concepts=k, tol=1e-6)).fit(X)
    assert fit.attrs["method"] == "nmf" and (fit.W >= 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref = NMF(
            n_components=k, init="nndsvda", solver="cd", max_iter=2000, tol=1e-6, random_state=0
        )
        U = ref.fit_transform(X.astype(np.float64))
    sk = _rel(X, U, ref.components_)
    assert fit.attrs["rel_error"] <= 1.01 * sk
    semi = SemiNMFExtractor(k).fit(X)
    assert semi.attrs["rel_error"] <= 1.01 * sk


def test_encoding_on_a_signed_dictionary_is_exact_nnls():
    rng = np.random.default_rng(3)
    W = rng.normal(size=(7, 20)).astype(np.float32)
    X = np.maximum(rng.normal(size=(50, 7)), 0) @ W + 0.3 * rng.normal(size=(50, 20))
    X = X.astype(np.float32)
    ref = np.array([scipy_nnls(W.T.astype(np.float64), x.astype(np.float64))[0] for x in X])
    for extractor in (SemiNMFExtractor(7), make_extractor(ConceptConfig(n_concepts=7))):
        got = np.asarray(extractor.encode(X, W))
        np.testing.assert_allclose(got, ref, atol=2e-4)
        t = extractor.encode(torch.from_numpy(X), torch.from_numpy(W))
        assert isinstance(t, torch.Tensor)


def test_semi_nmf_is_deterministic_and_scale_free():
    X, _, _ = _planted(5, n=300, noise=0.05)
    a, b = semi_nmf(X, 6, seed=1), semi_nmf(X, 6, seed=1)
    np.testing.assert_array_equal(a.W, b.W)
    np.testing.assert_array_equal(a.U, b.U)
    # EfficientNet's features at random init are ~1e-13: the same fit, scaled
    tiny = semi_nmf(X * 1e-13, 6, seed=1)
    assert tiny.rel_error == pytest.approx(a.rel_error, rel=1e-3, abs=1e-5)
    np.testing.assert_allclose(tiny.W * 1e13, a.W, rtol=1e-3, atol=1e-3 * np.abs(a.W).max())


def test_semi_nmf_validation():
    X, _, _ = _planted(0, n=50, c=8)
    with pytest.raises(ValueError, match=r"k=9 .*min\(n_points=50, channels=8\)"):
        semi_nmf(X, 9)
    with pytest.raises(ValueError, match="all zeros"):
        semi_nmf(np.zeros((10, 4)), 2)
    bad = X.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        semi_nmf(bad, 2)
    with pytest.raises(ValueError, match="'torch' solver only"):
        make_extractor(ConceptConfig(method="semi-nmf", solver="sklearn"))


# ---- the tolerance rule and the choice of the method ------------------------------------------


def test_rounding_noise_is_clipped_and_nmf_is_chosen():
    rng = np.random.default_rng(0)
    A = (rng.random((200, 5)) @ rng.random((5, 30))).astype(np.float32)
    A[0, :4] = -1.249e-13  # what a conv + BN + ReLU stack can leave behind
    assert is_nonnegative(float(A.min()), float(A.max()))
    assert choose_method("auto", float(A.min()), float(A.max())) == "nmf"
    res = nmf(A, 4)
    assert (res.U >= 0).all() and (res.W >= 0).all() and res.dead == 0
    fit = make_extractor(ConceptConfig(n_concepts=4)).fit(A)  # 'auto' unresolved: decides on A
    assert fit.attrs["method"] == "nmf"


def test_the_bound_is_relative_to_the_layer_magnitude():
    assert is_nonnegative(-0.9e-6, 1.0) and not is_nonnegative(-1.1e-6, 1.0)
    assert is_nonnegative(-0.9e-3, 1e3) and not is_nonnegative(-1e-2, 1e3)
    # a signed layer stays signed at any magnitude (EfficientNet's features at random init)
    assert not is_nonnegative(-1.6e-13, 1.7e-13)
    assert is_nonnegative(0.0, 0.0)


def test_a_signed_layer_picks_semi_nmf_and_explicit_nmf_is_refused_in_one_line():
    assert choose_method("auto", -3.2, 3.1) == "semi-nmf"
    assert choose_method("semi-nmf", 0.0, 3.1) == "semi-nmf"  # an explicit choice is kept
    assert choose_method("nmf", -1e-13, 3.1) == "nmf"
    with pytest.raises(SignedLayerError) as err:
        choose_method("nmf", -3.2, 3.1)
    text = str(err.value)
    assert "\n" not in text and "negative activations" in text and "semi-nmf" in text
    X = _gelu_like(0)
    auto = make_extractor(ConceptConfig(n_concepts=4))
    assert isinstance(auto, AutoExtractor)
    assert auto.fit(X).attrs["method"] == "semi-nmf"
    with pytest.raises(ValueError, match=r"non-negative \(NMF\).*semi-nmf"):
        NMFExtractor(4).fit(X)


def _tiny(tmp_path, **concepts):
    cfg = {
        **TINY,
        "data": {**TINY["data"], "toy_classes": 2},
        "concepts": {**TINY["concepts"], **concepts},
        "store": f"file://{tmp_path}/store",
        "publish": f"file://{tmp_path}/site",
    }
    return cfg


def test_set_up_resolves_the_method_once_per_run(tmp_path):
    """The toy CNN split after block4's BatchNorm (before its ReLU) is a signed layer: 'auto'
    chooses semi-NMF at set-up, records it, and the factorize marker says so; explicit 'nmf' is
    refused at set-up with one line; the shipped split (after the ReLU) stays NMF."""
    from lens_core import layout
    from lens_core.models import ModelError
    from lens_core.pipeline import prepare_run, run_class

    cfg = _tiny(tmp_path)
    info = prepare_run(make_config({**cfg, "model": {"layer": "block4.1"}}, classes=["0"]))
    assert info.config.concepts.method == "semi-nmf"
    run_json = info.store().read_json(layout.RUN_JSON)
    assert run_json["config"]["concepts"]["method"] == "semi-nmf"
    again = prepare_run(make_config({**cfg, "model": {"layer": "block4.1"}}, classes=["0"]))
    assert again.run_id == info.run_id and again.config.concepts.method == "semi-nmf"

    run_class(info, info.slugs[0])
    store = info.store()
    attrs = dict(store.zarr[layout.concepts(info.slugs[0])].attrs)
    assert attrs["method"] == "semi-nmf"
    assert (store.zarr[layout.concepts(info.slugs[0])]["U"][:] >= 0).all()
    assert (store.zarr[layout.concepts(info.slugs[0])]["W"][:] < 0).any()

    with pytest.raises(ModelError, match=r"block4\.1.*negative activations.*after a ReLU") as err:
        prepare_run(
            make_config(
                {
                    **cfg,
                    "model": {"layer": "block4.1"},
                    "concepts": {**cfg["concepts"], "method": "nmf"},
                }
            )
        )
    assert "\n" not in str(err.value)

    plain = prepare_run(make_config(cfg, classes=["0"]))
    assert plain.config.concepts.method == "nmf"
    explicit = make_config({**cfg, "concepts": {**cfg["concepts"], "method": "nmf"}})
    assert prepare_run(explicit).run_id != plain.run_id  # the setting is part of the run id


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["efficientnet_b0", "convnext_tiny"])
def test_signed_families_run_end_to_end_at_random_init(tmp_path, arch):
    """EfficientNet's and ConvNeXt's `features` (SiLU, LayerNorm: signed) at random init, on the
    toy data at tiny budgets: set-up picks semi-NMF, and the class gets concepts, importance and
    crops."""
    from lens_core import layout
    from lens_core.pipeline import prepare_run, run_class

    cfg = {**_tiny(tmp_path), "model": {"arch": arch, "layer": "features"}}
    info = prepare_run(make_config(cfg, classes=["0"]))
    assert info.config.concepts.method == "semi-nmf"
    slug = info.slugs[0]
    run_class(info, slug)
    store = info.store()
    con = store.zarr[layout.concepts(slug)]
    assert con.attrs["method"] == "semi-nmf" and con.attrs["dead"] == 0
    assert (con["U"][:] >= 0).all() and (con["W"][:] < 0).any()
    imp = store.zarr[layout.importance(slug)]
    sobol = imp["sobol"][:]
    assert sobol.shape == (TINY["concepts"]["n_concepts"],) and np.isfinite(sobol).all()
    index = store.read_json(layout.crops_index(slug))
    assert index["concepts"] and all(index["concepts"].values())
