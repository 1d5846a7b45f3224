"""The logit share summed over the images the model assigns to the class (issue 19).

Truths independent of the code under test: autograd's gradient x input through torchvision's own
pooling and linear layer, the full model's logit on the image, scipy's NNLS and a plain loop over
images, and counts of what the model predicts.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import load_file
from scipy.optimize import nnls
from tiny import tiny_config

from lens_core.config import ConceptConfig, ConfigError, ModelConfig, make_config
from lens_core.extract import make_extractor
from lens_core.importance import logit_contributions
from lens_core.models import load_split_model
from lens_core.pipeline import prepare_run, run_class
from lens_core.publish import publish
from lens_core.toy import TOY_CHECKPOINT, class_names, ensure_toy_dataset

OLD_MIN_PATCHES = 8  # the patch rule this replaced: below 8 assigned patches, Sobol fallback


def test_the_image_split_is_gradient_times_input_on_a_resnet_at_layer4(tmp_path: Path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=7).eval()
    ckpt = tmp_path / "r18.pt"
    torch.save(model.state_dict(), ckpt)
    cfg = ModelConfig(arch="resnet18", checkpoint=str(ckpt), layer="layer4", input_size=96)
    split = load_split_model(cfg, 7)
    x = torch.rand(6, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        spatial = split.g(x)  # (6, 512, 3, 3)
        rows = spatial.permute(0, 2, 3, 1).reshape(-1, spatial.shape[1]).numpy()
    fit = make_extractor(ConceptConfig(n_concepts=4, max_iter=200)).fit(rows)
    W = fit.W
    pooled = spatial.mean(dim=(2, 3)).numpy()
    U = np.asarray(make_extractor(ConceptConfig(n_concepts=4)).encode(pooled, W), np.float64)
    weight, bias = split.head
    parts = logit_contributions(U, W, pooled, weight, bias, class_index=3)

    # truth 1: the whole model's class logit on the (normalized) image
    mean = torch.tensor(cfg.mean)[:, None, None]
    std = torch.tensor(cfg.std)[:, None, None]
    with torch.no_grad():
        logits = model((x - mean) / std)[:, 3].double().numpy()
    total = parts["contributions"].sum(1) + parts["residual"] + parts["bias"]
    np.testing.assert_allclose(total, logits, rtol=1e-4, atol=1e-4)

    # truth 2: gradient x input on ū through torchvision's avgpool and fc, the map held at ū W + r
    u = torch.tensor(U, requires_grad=True)
    Wt = torch.tensor(W, dtype=torch.float64)
    r = torch.tensor(pooled, dtype=torch.float64) - u.detach() @ Wt
    fmap = (u @ Wt + r)[:, :, None, None].expand(-1, -1, 3, 3)
    out = model.double().fc(torch.flatten(model.avgpool(fmap), 1))[:, 3]
    out.sum().backward()
    np.testing.assert_allclose(
        parts["contributions"], (u.grad * u).detach().numpy(), rtol=1e-6, atol=1e-8
    )
    assert np.abs(parts["contributions"]).max() > 1e-3  # not trivially zero


@pytest.fixture(scope="module")
def small_patches(tmp_path_factory: pytest.TempPathFactory):
    """The toy CNN on 4 classes with tiny patches: it classifies every image, few patches."""
    root = tmp_path_factory.mktemp("small-patches")
    url = ensure_toy_dataset(f"file://{root}/toy", 10, 8, 0)
    cfg = tiny_config(  # TINY's concepts and maco
        root,
        data={"url": url, "images_per_class": 8},
        patches={"fraction": 0.08, "grid": 2},
        importance={"images": 4, "n_designs": 4},
        crops={"per_concept": 1, "attribution_images": 1},
    )
    info = prepare_run(make_config(cfg, classes=class_names(10)[:4]))
    for slug in info.slugs:
        run_class(info, slug)
    publish(info)
    return info, root / "site" / info.run_id


def test_a_class_whose_images_are_recognised_but_not_its_patches_gets_a_logit_share(small_patches):
    info, site = small_patches
    store = info.store()
    seen = 0
    for slug in info.slugs:
        acts = store.zarr[f"acts/{slug}"]
        imp = store.zarr[f"importance/{slug}"]
        index = info.cls(slug).index
        assigned_patches = int((acts["patch_pred"][:] == index).sum())
        assigned_images = int((acts["image_pred"][:] == index).sum())
        assert imp.attrs["assigned_patches"] == assigned_patches
        assert imp.attrs["assigned_images"] == assigned_images
        if assigned_patches < OLD_MIN_PATCHES <= assigned_images:
            seen += 1
            assert imp.attrs["importance_basis"] == "logit_share", imp.attrs.get("note")
            assert imp.attrs["share_images"] == assigned_images
            assert "logit_share" in set(imp.array_keys()) and not imp.attrs["note"]
            page = (site / "classes" / slug / "index.html").read_text()
            assert 'id="basis-note"' not in page and "rarely predicts" not in page
            assert re.search(r"residual of <b>-?[0-9.]+%</b>", page)
    assert seen >= 2, "the data must hold classes whose patches are rarely classified as the class"


def test_the_share_is_a_plain_sum_over_the_assigned_images(small_patches):
    """Brute force: scipy NNLS per image, the checkpoint's own fc row, a loop over images."""
    info, _ = small_patches
    store = info.store()
    state = load_file(str(TOY_CHECKPOINT))
    weight, bias = state["fc.weight"].double().numpy(), state["fc.bias"].double().numpy()
    for slug in info.slugs:
        c = info.cls(slug).index
        acts, imp = store.zarr[f"acts/{slug}"], store.zarr[f"importance/{slug}"]
        W = store.zarr[f"concepts/{slug}"]["W"][:].astype(np.float64)
        image_A = acts["image_A"][:].astype(np.float64)
        # the stored logits and predictions are the model's: ā . w + b for a pooled-linear head
        np.testing.assert_allclose(
            image_A @ weight[c] + bias[c], acts["image_logit"][:], rtol=1e-4, atol=1e-4
        )
        num, den, n = np.zeros(len(W)), 0.0, 0
        for i in range(len(image_A)):
            if int(np.argmax(image_A[i] @ weight.T + bias)) != c:
                continue
            u, _ = nnls(W.T, image_A[i])
            for k in range(len(W)):
                num[k] += u[k] * float(W[k] @ weight[c])
            den += float(image_A[i] @ weight[c] + bias[c])
            n += 1
        assert n == imp.attrs["share_images"] >= 3
        np.testing.assert_allclose(imp["logit_share"][:], 100 * num / den, rtol=1e-3, atol=0.05)
        total = (
            float(imp["logit_share"][:].sum())
            + imp.attrs["share_residual"]
            + imp.attrs["share_bias"]
        )
        assert total == pytest.approx(100.0, abs=1e-3)


def test_too_few_assigned_images_fall_back_to_sobol_with_the_counts(tmp_path: Path):
    url = ensure_toy_dataset(f"file://{tmp_path}/toy", 10, 3, 0)
    cfg = {
        "data": {"url": url, "images_per_class": 3},
        "patches": {"grid": 2},
        "concepts": {"n_concepts": 3},
        "importance": {"images": 2, "n_designs": 4, "min_share_images": 4},
        "crops": {"per_concept": 1, "attribution_images": 1},
        "store": f"file://{tmp_path}/store",
    }
    info = prepare_run(make_config(cfg, classes=class_names(10)[:1]))
    run_class(info, info.slugs[0])
    imp = info.store().zarr[f"importance/{info.slugs[0]}"]
    assert imp.attrs["assigned_images"] == 3 < 4
    assert imp.attrs["basis_reason"] == "few-predicted" and imp.attrs["importance_basis"] == "sobol"
    assert "3 of 3 images" in imp.attrs["note"] and "logit_share" not in set(imp.array_keys())


def test_the_old_patch_setting_is_refused_with_the_new_name():
    with pytest.raises(ConfigError, match="min_share_images"):
        make_config({"importance": {"min_share_patches": 8}})


def test_every_concept_has_a_circle_in_the_similarity_chart(tmp_path: Path, browser):
    """A negative share used to give a complex radius ("6.0+0.7j"): a label with no circle."""
    from site_fixtures import make_site

    from lens_core.site import build_site

    site, assets = make_site(n_classes=2, n_points=5)
    cls = site["classes"][0]
    cls["concepts"][-1]["logit_share"] = -2.1
    cls["concepts"][-2]["logit_share"] = -0.4
    build_site(site, str(tmp_path / "pub"), None, assets)
    page = browser.new_page()
    console: list[str] = []
    page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: console.append(str(e)))
    page.goto((tmp_path / "pub" / "classes" / cls["slug"] / "index.html").as_uri())
    nodes = page.eval_on_selector_all(
        "svg.layout circle",
        "els => els.map(e => [e.nextElementSibling.textContent, e.r.baseVal.value,"
        " e.getAttribute('r'), e.classList.contains('against')])",
    )
    page.close()
    assert console == []
    ids = sorted(int(label) for label, *_ in nodes)
    assert ids == sorted(p["concept"] for p in cls["concept_layout"])
    assert all(drawn > 0 and float(attr) == pytest.approx(drawn) for _, drawn, attr, _ in nodes)
    against = {int(label) for label, _, _, neg in nodes if neg}
    assert against == {cls["concepts"][-1]["id"], cls["concepts"][-2]["id"]}
    radius = {int(label): drawn for label, drawn, _, _ in nodes}
    # size follows the share's magnitude: 2.1% draws a bigger circle than 0.4%
    assert radius[cls["concepts"][-1]["id"]] > radius[cls["concepts"][-2]["id"]]
