"""lens_core.models: safe checkpoint loading (local, s3), architecture checks, exact g/h splits."""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from lens_core.config import ModelConfig
from lens_core.models import (
    CheckpointError,
    ModelError,
    build_model,
    checkpoint_digest,
    load_model,
    load_split_model,
    split_model,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _cfg(arch: str, layer: str, checkpoint: str | None = None, size: int = 64) -> ModelConfig:
    return ModelConfig(
        arch=arch,
        layer=layer,
        checkpoint=checkpoint,
        num_classes=7,
        input_size=size,
        mean=MEAN,
        std=STD,
    )


def _perturbed(arch: str) -> nn.Module:
    """A model whose weights differ from the seeded default init, so a loader that ignores the
    checkpoint is caught: vectors (norm weights, biases, BN running stats) randomised, kernels
    scaled."""
    model = build_model(arch, 7)
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if t.ndim > 1:
                t.mul_(1.25)
            elif "running_var" in name:
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.add_(0.1 * torch.randn(t.shape, generator=gen))
    return model.eval()


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return model((x - mean) / std)


@pytest.fixture(scope="module")
def resnet50(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, dict[str, Path]]:
    """A perturbed resnet50 and its checkpoint in three formats."""
    model = _perturbed("resnet50")
    d = tmp_path_factory.mktemp("ckpt")
    state = model.state_dict()
    paths = {"plain": d / "r50.pt", "nested": d / "r50.pth", "safetensors": d / "r50.safetensors"}
    torch.save({f"module.{k}": v for k, v in state.items()}, paths["plain"])  # DataParallel prefix
    torch.save({"epoch": 3, "state_dict": state, "optimizer": {"lr": 0.1}}, paths["nested"])
    paths["safetensors"].write_bytes(
        save_safetensors({k: v.contiguous() for k, v in state.items()})
    )
    return model, paths


@pytest.fixture(scope="module")
def loaded50(resnet50) -> nn.Module:
    """The resnet50 checkpoint loaded back through the loader (once per module)."""
    _, paths = resnet50
    model, _ = load_model(_cfg("resnet50", "layer4", str(paths["safetensors"])), None, None)
    return model


@pytest.mark.parametrize("fmt", ["plain", "nested", "safetensors"])
def test_checkpoint_formats_load_exact_weights(resnet50, fmt: str) -> None:
    source, paths = resnet50
    path = paths[fmt]
    url = f"file://{path}" if fmt == "nested" else str(path)
    model, digest = load_model(_cfg("resnet50", "layer4", url), None, None)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() == checkpoint_digest(url)
    loaded, expected = model.state_dict(), source.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    ("layer", "shape"),
    [("layer3", (2, 1024, 4, 4)), ("layer4", (2, 2048, 2, 2)), ("avgpool", (2, 2048))],
)
def test_resnet50_split_reproduces_logits(
    resnet50, loaded50, layer: str, shape: tuple[int, ...]
) -> None:
    source, _ = resnet50
    split = split_model(loaded50, layer, _cfg("resnet50", layer))
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        acts = split.g(x)
        out = split.h(acts)
    assert tuple(acts.shape) == shape
    assert split.spatial == (len(shape) == 4)
    assert split.num_classes == 7 and split.layer == layer
    torch.testing.assert_close(out, _logits(source, x), rtol=1e-4, atol=1e-4)
    if layer == "layer3":
        assert split.head is None
    else:  # logits split exactly per channel: pool(a) @ W.T + b, W and b recovered by probing h
        weight, bias = split.head
        torch.testing.assert_close(weight, source.fc.weight.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bias, source.fc.bias.detach(), rtol=1e-4, atol=1e-5)
        pooled = acts.mean(dim=(2, 3)) if acts.ndim == 4 else acts
        torch.testing.assert_close(pooled @ weight.T + bias, out, rtol=1e-4, atol=1e-4)


def test_convnext_split_inside_features() -> None:
    model = _perturbed("convnext_tiny")
    split = split_model(model, "features.5", _cfg("convnext_tiny", "features.5", size=32))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        acts = split.g(x)
        out = split.h(acts)
    assert acts.shape == (2, 384, 2, 2) and split.spatial and split.head is None
    torch.testing.assert_close(out, _logits(model, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("layer", "shape"), [("block4", (2, 128, 8, 8)), ("pool", (2, 128))])
def test_toy_split_from_checkpoint(tmp_path: Path, layer: str, shape: tuple[int, ...]) -> None:
    source = _perturbed("toy")
    torch.save({"model": source.state_dict()}, tmp_path / "toy.pt")
    split = load_split_model(_cfg("toy", layer, str(tmp_path / "toy.pt")), None, None)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        acts = split.g(x)
    assert tuple(acts.shape) == shape and split.head is not None
    weight, bias = split.head
    pooled = acts.mean(dim=(2, 3)) if acts.ndim == 4 else acts
    torch.testing.assert_close(split.h(acts), _logits(source, x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pooled @ weight.T + bias, _logits(source, x), rtol=1e-4, atol=1e-4)


def test_toy_default_checkpoint_and_block4_split() -> None:
    from lens_core.toy import TOY_CHECKPOINT

    cfg = ModelConfig()  # toy, shipped weights, block4, 64 px
    split = load_split_model(cfg, 10, None)
    assert split.digest == hashlib.sha256(TOY_CHECKPOINT.read_bytes()).hexdigest()
    model, _ = load_model(cfg, 10, None)
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        acts = split.g(x)
        ref = model((x - 0.5) / 0.25)
    assert acts.shape == (3, 128, 8, 8) and split.head is not None
    weight, bias = split.head
    torch.testing.assert_close(split.h(acts), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(acts.mean(dim=(2, 3)) @ weight.T + bias, ref, rtol=1e-4, atol=1e-4)


def test_random_init_is_seeded_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="lens_core.models"):
        a, digest = load_model(_cfg("resnet18", "layer4"), None, None)
    b, _ = load_model(_cfg("resnet18", "layer4"), None, None)
    assert digest == "random-init:resnet18"
    assert "random" in caplog.text
    assert torch.equal(a.conv1.weight, b.conv1.weight)  # every worker gets the same weights


def test_mismatched_checkpoint_names_keys(tmp_path: Path) -> None:
    path = tmp_path / "r18.pt"
    torch.save(build_model("resnet18", 7).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        load_model(_cfg("resnet50", "layer4", str(path)), None, None)
    msg = str(info.value)
    assert "missing keys" in msg and "layer1.0.conv3.weight" in msg
    assert "shape mismatches" in msg and "layer1.0.conv1.weight" in msg
    assert "..." in msg and len(msg) < 3000  # a few of each, with counts, not every key


def test_unexpected_keys_and_wrong_num_classes(tmp_path: Path) -> None:
    state = build_model("resnet18", 5).state_dict()
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "x.pt")
    with pytest.raises(
        CheckpointError,
        match=r"unexpected keys: 1 \(extra.weight\).*"
        r"fc.weight: checkpoint \(5, 512\) vs model \(7, 512\)",
    ):
        load_model(_cfg("resnet18", "layer4", str(tmp_path / "x.pt")), None, None)


class _Payload:
    """Unpickling this would run os.system and create a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Custom:
    pass


@pytest.mark.parametrize("kind", ["callable", "class"])
def test_pickled_code_is_refused_and_never_run(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    obj = _Payload(marker) if kind == "callable" else _Custom()
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "f": obj}, path)
    with pytest.raises(CheckpointError, match="refusing checkpoint") as info:
        load_model(_cfg("resnet18", "layer4", str(path)), None, None)
    assert not marker.exists()
    assert "Traceback" not in str(info.value) and info.value.__cause__ is None


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_checkpoint(tmp_path: Path, suffix: str) -> None:
    state = build_model("resnet18", 7).state_dict()
    blob = save_safetensors(state) if suffix == ".safetensors" else _torch_bytes(state)
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(_cfg("resnet18", "layer4", str(path)), None, None)


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_model(_cfg("resnet18", "layer4", str(tmp_path / "nope.pt")), None, None)


def _torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class _Residual(nn.Module):
    """Children conv, pool, fc, but forward adds a skip connection: no sequential split exists."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv(x) + x).flatten(1))


def test_unsupported_split_is_an_error_not_wrong_logits() -> None:
    with pytest.raises(ModelError, match="not a plain sequence"):
        split_model(_Residual(), "conv", _cfg("custom", "conv", size=16))
    with pytest.raises(ModelError, match="not one of"):
        split_model(build_model("resnet18", 7), "layer9", _cfg("resnet18", "layer9"))


class _TwoPath(nn.Module):
    """A custom model whose forward is not sequential: it supplies its own split."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((self.a(x) + self.b(x)).mean(dim=(2, 3)))

    def lens_split(self, layer: str) -> tuple[nn.Module, nn.Module]:
        outer = self

        class G(nn.Module):
            def forward(self, x):
                return outer.a(x) + outer.b(x)

        return G(), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), outer.fc)


def make_two_path(num_classes: int = 3) -> nn.Module:
    return _TwoPath(num_classes)


def test_factory_model_with_lens_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LENS_MODEL_FACTORIES", f"{__name__}:make_two_path")
    cfg = ModelConfig(arch=f"{__name__}:make_two_path", layer="sum", num_classes=3, input_size=16)
    split = load_split_model(cfg, None, None)
    assert split.head is not None and split.spatial and split.num_classes == 3
    assert split.digest == f"random-init:{__name__}:make_two_path"


def test_s3_checkpoint_and_wrong_secret(s3, bucket: str) -> None:
    source = _perturbed("toy")
    blob = save_safetensors(source.state_dict())
    s3.filesystem().pipe(f"{bucket}/ckpt/toy.safetensors", blob)
    url = f"s3://{bucket}/ckpt/toy.safetensors"
    split = load_split_model(_cfg("toy", "block4", url), None, s3.storage_options)
    assert (
        split.digest
        == hashlib.sha256(blob).hexdigest()
        == checkpoint_digest(url, s3.storage_options)
    )
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(split.h(split.g(x)), _logits(source, x), rtol=1e-4, atol=1e-4)
    bad = {**s3.storage_options, "secret": "wrong-" + s3.secret[::-1]}
    with pytest.raises(CheckpointError, match="access denied") as info:
        load_model(_cfg("toy", "block4", url), None, bad)
    assert bad["secret"] not in str(info.value) and s3.secret not in str(info.value)
