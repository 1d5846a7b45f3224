"""Token models and the modern families (issue 25): ViT, Swin, ConvNeXt, EfficientNet.

The truth is the unsplit model's own logits: g and h of a split must give them back (to float
tolerance) on images, and a ViT's h on a stored map with the stored class token must give back
what the model said of that image. Every family runs the whole atlas at random init on the toy
data at tiny budgets, and every unsupported split is one ModelError line naming the layer.
Architectures are torchvision's at random init (weights=None; nothing is downloaded); the runs use
small instances of the same classes (VisionTransformer, SwinTransformer, ConvNeXt) so that a
2-core CPU does them in seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from tiny import TINY
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

from lens_core import layout, tokens
from lens_core.config import ModelConfig, load_config, make_config
from lens_core.models import ModelError, split_model
from lens_core.pipeline import explain

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
K = 10


# ---- small instances of torchvision's classes (factories the runs are allowed to call) ---------


def tiny_vit(num_classes: int = K) -> nn.Module:
    """A 2-block ViT on 32 px images, 8 px patches (a 4x4 token grid). torchvision initialises the
    head to zeros (every logit 0): it gets random weights, as a trained head has."""
    torch.manual_seed(0)
    m = VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=3,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=num_classes,
    )
    nn.init.normal_(m.heads.head.weight, std=0.3)
    return m


def tiny_swin(num_classes: int = K) -> nn.Module:
    torch.manual_seed(0)
    return SwinTransformer(
        patch_size=[4, 4],
        embed_dim=24,
        depths=[1, 1],
        num_heads=[2, 2],
        window_size=[4, 4],
        num_classes=num_classes,
    )


def tiny_convnext(num_classes: int = K) -> nn.Module:
    """A 2-stage ConvNeXt whose head favours class 0 (the toy class the run explains), so the
    model classifies its images as the class and the logit share is defined."""
    torch.manual_seed(0)
    m = ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=num_classes)
    with torch.no_grad():
        m.classifier[-1].bias[0] = 3.0
    return m


class TokenNet(nn.Module):
    """A model of its own with a lens_split hook whose g returns (patch map, class token) and
    whose h takes them back: written here against torchvision's ViT internals, not lens_core's."""

    def __init__(self, num_classes: int = K):
        super().__init__()
        self.vit = tiny_vit(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)

    def lens_split(self, layer: str):
        if layer == "tokens":  # the mistake this test checks: g gives the token sequence itself
            return _Tokens(self.vit, 1), _Fn(lambda t: self.vit.heads(self.vit.encoder.ln(t)[:, 0]))
        cut = int(layer.removeprefix("block"))
        return _Grid(self.vit, cut), _Rest(self.vit, cut)


class _Tokens(nn.Module):
    """Image -> token sequence after the first `cut` blocks of a torchvision ViT."""

    def __init__(self, vit: VisionTransformer, cut: int):
        super().__init__()
        self.vit, self.cut = vit, cut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        t = vit._process_input(x)
        t = torch.cat([vit.class_token.expand(len(t), -1, -1), t], 1) + vit.encoder.pos_embedding
        for b in list(vit.encoder.layers)[: self.cut]:
            t = b(t)
        return t


class _Grid(_Tokens):
    """(patch tokens on their 4x4 grid, class token)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = super().forward(x)
        n, _, c = t.shape
        return t[:, 1:].transpose(1, 2).reshape(n, c, 4, 4), t[:, :1]


class _Rest(nn.Module):
    def __init__(self, vit: VisionTransformer, cut: int):
        super().__init__()
        self.vit, self.cut = vit, cut

    def forward(self, m: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        t = torch.cat([cls, m.flatten(2).transpose(1, 2)], 1)
        for b in list(vit.encoder.layers)[self.cut :]:
            t = b(t)
        return vit.heads(vit.encoder.ln(t)[:, 0])


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def token_net(num_classes: int = K) -> nn.Module:
    return TokenNet(num_classes)


def broken_token_net(num_classes: int = K) -> nn.Module:
    """lens_split fails on every layer (its own bug): a model error, never a traceback."""
    net = TokenNet(num_classes)
    net.lens_split = lambda layer: {}["no such layer " + layer]  # type: ignore[method-assign]
    return net


def flat_net(num_classes: int = K) -> nn.Module:
    """A plain Sequential whose `tok` layer flattens the map into a sequence (N, C, H*W)."""
    from collections import OrderedDict

    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 8, 3),
            tok=nn.Flatten(2),
            pool=nn.AdaptiveAvgPool1d(1),
            flat=nn.Flatten(1),
            fc=nn.Linear(8, num_classes),
        )
    )


FACTORIES = ",".join(
    f"{__name__}:{f}"
    for f in ("tiny_vit", "tiny_swin", "tiny_convnext", "token_net", "broken_token_net")
)


def _cfg(layer: str, size: int) -> ModelConfig:
    return ModelConfig(
        arch="x",
        layer=layer,
        input_size=size,
        num_classes=K,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )


def _images(n: int, size: int) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _logits(model: nn.Module, x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """What the model itself says of images in [0, 1] (normalized as g does)."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (cfg.mean, cfg.std))
    with torch.no_grad():
        return model((x - mean) / std)


def _max_error(split, model, x, cfg) -> float:
    ref = _logits(model, x, cfg)
    assert ref.abs().max() > 1e-3  # a head of zeros would make any h look right
    with torch.no_grad():
        out = split.h(split.g(x))
    return float((out - ref).abs().max() / ref.abs().max())


def _checked_split(model, layer: str, size: int, n: int):
    """`model` split at `layer`, h(g(x)) checked to be the model on `n` images of `size` px: the
    split, the images, the model config and g's map of the images."""
    cfg = _cfg(layer, size)
    split = split_model(model, layer, cfg)
    x = _images(n, size)
    assert _max_error(split, model, x, cfg) < 1e-5
    with torch.no_grad():
        return split, x, cfg, split.g(x)


# ---- h(g(x)) is the model ---------------------------------------------------------------------


def _vit_b16() -> nn.Module:
    """torchvision's ViT-B/16 (12 blocks of 768 channels) on 64 px images (a 4x4 token grid: the
    224 px default costs a minute per test on two cores), its zero-initialised head made random."""
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None, num_classes=K, image_size=64).eval()
    nn.init.normal_(model.heads.head.weight, std=0.05)
    return model


def test_vit_b16_split_at_a_block_is_the_model_and_keeps_the_class_token_per_image():
    torch.manual_seed(0)
    model = _vit_b16()
    split, x, cfg, m = _checked_split(model, "encoder.layers.encoder_layer_10", 64, 2)
    with torch.no_grad():
        extra = tokens.extra_tokens(split.g, m)
        assert tuple(m.shape) == (2, 768, 4, 4) and tuple(extra.shape) == (2, 1, 768)
        # a stored map (another tensor) with its stored class token gives the same logits;
        # without the class token h refuses rather than guess one
        ref = _logits(model, x, cfg)
        torch.testing.assert_close(split.h(m.clone(), extra.clone()), ref, rtol=1e-5, atol=1e-5)
        with pytest.raises(tokens.TokenError, match="class"):
            split.h(m.clone())
        # the patch tokens reach the logits through the last block: a changed map changes them
        # (not a rescaled or permuted one: each block normalizes tokens and attends over a set)
        noise = torch.randn(m.shape, generator=torch.Generator().manual_seed(2))
        assert (split.h(m + noise, extra) - ref).abs().max() > 1e-3
    assert split.head is None  # the logits read the class token: no pooled-linear head


def test_vit_b16_at_encoder_is_the_model_but_its_patch_tokens_never_reach_the_head():
    """At `encoder` (after the final norm) h(g(x)) is the model, but h reads only the class
    token: the split is refused with one line that says which layers to pick."""
    torch.manual_seed(0)
    model = _vit_b16()
    cfg = _cfg("encoder", 64)
    g, h = tokens.vit_tokens_split(model, 12, final_ln=True)
    x = _images(2, 64)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (cfg.mean, cfg.std))
    ref = _logits(model, x, cfg)
    with torch.no_grad():
        m = g((x - mean) / std)
        torch.testing.assert_close(h(m), ref, rtol=1e-5, atol=1e-5)
        extra = tokens.extra_tokens(g, m)
        torch.testing.assert_close(h(torch.zeros_like(m), extra), ref, rtol=1e-6, atol=1e-6)
    for layer in ("encoder", "encoder.ln", "encoder.layers", "encoder.layers.encoder_layer_11"):
        with pytest.raises(ModelError) as err:
            split_model(model, layer, _cfg(layer, 64))
        text = str(err.value)
        assert "\n" not in text and repr(layer) in text and "encoder_layer_10" in text


@pytest.mark.parametrize(
    "layer, shape, exact",
    [
        ("features", (768, 2, 2), False),
        ("norm", (768, 2, 2), True),
        ("features.3", (192, 8, 8), False),
    ],
)
def test_swin_t_split_permutes_its_channels_last_maps_and_is_the_model(layer, shape, exact):
    torch.manual_seed(0)
    model = torchvision.models.swin_t(weights=None, num_classes=K).eval()
    split, x, cfg, m = _checked_split(model, layer, 64, 2)
    assert tuple(m.shape[1:]) == shape  # (N, C, H, W): channels first, the stage's token grid
    # only after the final LayerNorm is h pooled-linear: then its head is the model's own; before
    # it, the LayerNorm acts on every token before the pooling: no exact split of the logit at all
    assert (split.head is not None) == exact and split.norm_head is None
    if exact:
        torch.testing.assert_close(split.head[0], model.head.weight, rtol=1e-3, atol=1e-4)


def test_a_lens_split_model_whose_g_sets_the_class_token_aside(monkeypatch):
    monkeypatch.setenv("LENS_MODEL_FACTORIES", FACTORIES)
    model = token_net()
    for layer in ("block1", "block2"):
        split, x, cfg, m = _checked_split(model, layer, 32, 3)
        with torch.no_grad():
            extra = tokens.extra_tokens(split.g, m)
            torch.testing.assert_close(
                split.h(m.clone(), extra), _logits(model, x, cfg), rtol=1e-5, atol=1e-5
            )
        assert tuple(m.shape) == (3, 32, 4, 4) and split.head is None


def test_convnext_head_normalizes_then_is_linear_so_each_images_logit_splits_exactly():
    """ConvNeXt's h = avgpool, LayerNorm2d, Linear is not pooled-linear, but at each image's
    normalization scale it is: scale * (pooled . w_hat) + b_hat is the model's logit, and the
    share's terms (any concepts U, W; the residual takes the rest) add up to it."""
    from lens_core.importance import logit_contributions
    from lens_core.stages import _linear_head

    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny(weights=None, num_classes=K).eval()
    cfg = _cfg("features", 64)
    split = split_model(model, "features", cfg)
    assert split.head is None and split.norm_head is not None
    x = _images(3, 64)
    ref = _logits(model, x, cfg)
    with torch.no_grad():
        pooled = split.g(x).mean(dim=(2, 3)).numpy()
    weight, bias, scale = _linear_head(split, pooled)
    rng = np.random.default_rng(0)
    W = rng.normal(size=(4, pooled.shape[1])).astype(np.float32)
    U = rng.uniform(size=(3, 4)).astype(np.float32)
    for c in (0, 7):
        parts = logit_contributions(U * scale[:, None], W, pooled * scale[:, None], weight, bias, c)
        total = parts["contributions"].sum(1) + parts["residual"] + parts["bias"]
        np.testing.assert_allclose(total, ref[:, c].numpy(), rtol=1e-4, atol=1e-5)
    # the scale is the normalization's: doubling the pooled activation leaves the logits alone
    np.testing.assert_allclose(
        split.norm_head.logits(torch.from_numpy(2 * pooled)).numpy(),
        ref.numpy(),
        rtol=1e-4,
        atol=1e-5,
    )


# ---- unsupported splits: one line, never a traceback -------------------------------------------

UNSUPPORTED = [
    (tiny_vit, "encoder.layers.encoder_layer_0.self_attention", 32, "not a whole block"),
    (tiny_vit, "encoder.layers.encoder_layer_0.mlp.0", 32, "not a whole block"),
    (tiny_vit, "heads", 32, "cannot be split"),
    (tiny_vit, "encoder", 32, "only the class token"),
    (tiny_vit, "encoder.layers.encoder_layer_0", 64, "input_size = 32"),
    (tiny_swin, "features.1.0.attn", 32, "SwinTransformerBlock"),
    (tiny_swin, "nowhere", 32, "not found"),
    (tiny_convnext, "features.1.0.block", 32, "CNBlock"),
    (token_net, "tokens", 32, "gives tokens"),
    (broken_token_net, "block1", 32, "lens_split"),
    (flat_net, "tok", 32, "not a map"),
]


@pytest.mark.parametrize(
    "factory, layer, size, says",
    UNSUPPORTED,
    ids=[f"{f.__name__}-{layer}-{s}" for f, layer, s, _ in UNSUPPORTED],
)
def test_an_unsupported_split_is_one_clear_line(factory, layer, size, says):
    with pytest.raises(ModelError) as err:
        split_model(factory(), layer, _cfg(layer, size))
    text = str(err.value)
    assert "\n" not in text and repr(layer) in text and says in text, text
    assert err.value.__suppress_context__ or err.value.__cause__ is None  # no chained traceback


# ---- every family through the whole atlas at random init ---------------------------------------

FAMILIES = {
    # family: (arch, layer, input size, whether h is pooled-linear)
    "vit": (f"{__name__}:tiny_vit", "encoder.layers.encoder_layer_1", 32, False),
    "swin": (f"{__name__}:tiny_swin", "features", 32, False),
    "convnext": (f"{__name__}:tiny_convnext", "features", 32, True),  # a normalized-linear head
    "efficientnet": ("efficientnet_b0", "features", 64, True),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_runs_the_whole_atlas(family, tmp_path, monkeypatch):
    """Concepts (the signed extractor: no layer here is non-negative), importance, crops, renders
    and the site, for one toy class; a ViT's stored class tokens give back the model's logits."""
    monkeypatch.setenv("LENS_MODEL_FACTORIES", FACTORIES)
    arch, layer, size, pooled_linear = FAMILIES[family]
    cfg = make_config(
        {
            **TINY,
            "data": {**TINY["data"], "toy_classes": 2},
            "model": {"arch": arch, "layer": layer, "input_size": size},
            "store": f"file://{tmp_path}/store",
            "publish": f"file://{tmp_path}/site",
        },
        classes=["0"],
    )
    result = explain(cfg)
    assert result["failed"] == []
    info = result["info"]
    store, slug = info.store(), info.slugs[0]
    # no layer here comes after a ReLU: signed, semi-NMF; EfficientNet's SiLU at random init may
    # dip below 0 by rounding only (then NMF, negatives clipped)
    method = info.config.concepts.method
    assert method == "semi-nmf" if family != "efficientnet" else method in ("nmf", "semi-nmf")
    con = store.zarr[layout.concepts(slug)]
    U, W = con["U"][:], con["W"][:]
    assert U.shape[1] == W.shape[0] == 3 and (U >= 0).all() and np.isfinite(W).all()
    imp = store.zarr[layout.importance(slug)]
    assert np.isfinite(imp["sobol"][:]).all() and sorted(imp["order"][:]) == [0, 1, 2]
    if pooled_linear:
        assert imp.attrs.get("basis_reason") != "no-linear-head"
        if family == "convnext":  # its head favours the class: the share is defined
            assert imp.attrs["importance_basis"] == "logit_share"
        if "logit_share" in set(imp.array_keys()):  # enough images predicted as the class
            total = (
                imp["logit_share"][:].sum() + imp.attrs["share_residual"] + imp.attrs["share_bias"]
            )
            assert total == pytest.approx(100, abs=1e-3)
            assert ("normalizes" in imp.attrs["note"]) == (family == "convnext")
    else:
        assert imp.attrs["importance_basis"] == "sobol"
        assert imp.attrs["basis_reason"] == "no-linear-head"
    acts = store.zarr[layout.acts(slug)]
    spatial = acts["spatial"][:]
    assert spatial.ndim == 4 and spatial.shape[1] == W.shape[1]
    if family == "vit":
        extra = acts["spatial_extra"][:]
        assert extra.shape == (len(spatial), 1, W.shape[1])
        model = tiny_vit(info.num_classes).eval()
        split = split_model(model, layer, info.config.model)
        with torch.no_grad():
            logits = split.h(torch.from_numpy(spatial), torch.from_numpy(extra))
        np.testing.assert_allclose(
            logits[:, info.classes[0].index].numpy(),
            acts["image_logit"][: len(spatial)],
            rtol=1e-4,
            atol=1e-5,
        )
    else:
        assert "spatial_extra" not in set(acts.array_keys())
    run = Path(str(tmp_path / "store" / "runs" / info.run_id))
    assert list((run / "crops" / slug).glob("*.webp"))  # top crops and attribution maps
    assert len(list((run / "viz" / slug).glob("*.png"))) == 3  # one MACO render per concept
    site = tmp_path / "site" / info.run_id
    page = (site / "classes" / slug / "index.html").read_text()
    # the class page says when its shares are taken at each image's normalization scale
    assert ("normalizes the pooled activation" in page) == (family == "convnext")


# ---- the shipped examples -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, arch, layer",
    [
        ("vit-b16.toml", "vit_b_16", "encoder.layers.encoder_layer_10"),
        ("convnext-tiny.toml", "convnext_tiny", "features"),
    ],
)
def test_the_token_and_convnext_examples_load_with_their_stated_values(name, arch, layer):
    cfg = load_config(EXAMPLES / name)
    assert (cfg.model.arch, cfg.model.layer, cfg.model.input_size) == (arch, layer, 224)
    assert cfg.model.num_classes == 1000 and cfg.concepts.method in ("auto", "semi-nmf")
    # the layer the example names splits its architecture (random init, small stand-in for speed)
    if arch == "vit_b_16":
        with pytest.raises(ModelError, match="input_size = 224"):
            split_model(torchvision.models.vit_b_16(weights=None), layer, _cfg(layer, 64))
