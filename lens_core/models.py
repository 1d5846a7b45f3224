"""Classifiers and their split at a layer: g (image -> activations) and h (activations -> logits).

Models come from a torchvision name, the embedded toy CNN, or a factory that whoever runs the
worker allowed (an entry point in the group ``lens.models``, or a "package.module:factory" listed in
``LENS_MODEL_FACTORIES``): a flow parameter alone never makes LENS import and call a function.
Weights come from a local path or any fsspec URL, loaded safely (weights_only / safetensors, no
compressed archive entries, bounded by the architecture's size) and checked against the
architecture before any work. The number of outputs is read from the checkpoint's head when the
config does not set it. A split is verified by construction: h(g(x)) must equal the logits; the
linear head behind the logit share is found by what h computes (`probe_linear_head`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import io
import logging
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lens_core import tokens
from lens_core.config import ModelConfig
from lens_core.settings import settings
from lens_core.store import StoreAccessError, call, filesystem
from lens_core.store.fs import NotRegularFile, TooLarge, iter_bounded, open_regular

log = logging.getLogger(__name__)

FACTORY_ENV = "LENS_MODEL_FACTORIES"  # comma-separated "package.module:factory" the worker allows
ENTRY_POINT_GROUP = "lens.models"  # installed packages register named factories here
# a checkpoint may hold the weights plus optimizer moments (Adam: 2 more copies) and a little more
CHECKPOINT_SIZE_FACTOR = 3.5
CHECKPOINT_SIZE_MARGIN = 64 << 20
# the most bytes read or hashed of any checkpoint before its architecture is known (the digest):
# 4x the largest torchvision weights (vit_h_14, 2.5 GB) with room; a device never ends
MAX_CHECKPOINT_BYTES = 16 << 30
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile
_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "net")
_SHOW = 10


class ModelError(ValueError):
    """The model cannot be built or split as configured; the message says why."""


class CheckpointError(ModelError):
    """A checkpoint is unreadable, unsafe, or does not match the architecture."""


@dataclass
class SplitModel:
    """A classifier cut at `layer`: logits = h(g(images)); `head` is set when h = avg-pool + linear."""

    g: nn.Module
    h: nn.Module
    layer: str
    input_size: int
    num_classes: int
    spatial: bool
    head: tuple[torch.Tensor, torch.Tensor] | None = None
    digest: str = ""
    min_activation: float = 0.0  # the least value g gave on the split's test batch (NMF needs >= 0)
    max_activation: float = 0.0
    norm_head: NormHead | None = None  # h = pool, LayerNorm, linear (ConvNeXt); then head is None

    def to(self, device: str | torch.device) -> SplitModel:
        """Move g, h (in place, channels_last conv weights) and the head to `device`."""
        g = self.g.to(device=device, memory_format=torch.channels_last)
        h = self.h.to(device=device, memory_format=torch.channels_last)
        head = None if self.head is None else (self.head[0].to(device), self.head[1].to(device))
        return dataclasses.replace(self, g=g, h=h, head=head)


@dataclass
class NormHead:
    """A head that normalizes the pooled activation p before its linear layer (ConvNeXt):
    logits = s(p) (p . weight.T) + bias exactly, with s(p) = 1 / sqrt(var(p) + eps) over channels,
    weight = the linear weight times the norm's scale, centred per row (so p's mean drops out), and
    bias = the linear bias plus the linear weight applied to the norm's shift. Held at an image's
    scale s(p), the logit is linear in p: the logit share splits it exactly (the method page)."""

    weight: torch.Tensor  # (K, C), float32 on the CPU
    bias: torch.Tensor  # (K,)
    eps: float

    def scale(self, pooled: Any) -> Any:
        """s(p) per row of pooled activations (N, C), numpy or torch."""
        p = torch.as_tensor(pooled, dtype=torch.float64)
        s = 1.0 / torch.sqrt(p.var(dim=1, unbiased=False) + self.eps)
        return s.numpy() if not isinstance(pooled, torch.Tensor) else s.to(pooled.dtype)

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        p = pooled.float()
        return self.scale(p)[:, None] * (p @ self.weight.T) + self.bias


class Normalize(nn.Module):
    """(x - mean) / std per channel, so g takes images in [0, 1]."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


# ---- building ------------------------------------------------------------------------------


def build_model(arch: str, num_classes: int) -> nn.Module:
    """A randomly initialised (deterministic, seed 0) classifier for an architecture name."""
    factory = resolve_factory(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if arch == "toy":
            from lens_core.toy.model import ToyCNN

            return ToyCNN(num_classes=num_classes)
        if factory is not None:
            return _call_factory(factory, arch, num_classes)
        import torchvision

        try:
            return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        except ValueError as err:
            raise ModelError(f"unknown architecture {arch!r}: {err}") from None


def allowed_factories() -> dict[str, str]:
    """{name or "module:attr": "module:attr"} of the factories this process may import and call:
    entry points of the group `lens.models`, and the LENS_MODEL_FACTORIES list."""
    from importlib.metadata import entry_points

    allowed = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        allowed[ep.name] = allowed[ep.value] = ep.value
    for item in settings().model_factories.split(","):
        if item.strip():
            allowed[item.strip()] = item.strip()
    return allowed


def resolve_factory(arch: str) -> Any | None:
    """The allowed factory callable named by `arch`, None for toy/torchvision names.

    ModelError, before anything is imported, for a "module:callable" nobody allowed: a flow
    parameter (the Prefect UI's form) must not be able to call arbitrary functions.
    """
    if arch == "toy":
        return None
    allowed = allowed_factories()
    target = allowed.get(arch)
    if target is None:
        if ":" in arch:
            raise ModelError(
                f"model factory {arch!r} is not allowed: register it as an entry point in the group "
                f"{ENTRY_POINT_GROUP!r} of an installed package, or list it in {FACTORY_ENV} in the "
                "worker's environment"
            )
        return None
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ModelError(f"cannot import model factory {arch!r} ({target}): {err}") from None
    if not callable(obj):
        raise ModelError(f"model factory {arch!r} ({target}) is not callable")
    return obj


def _call_factory(factory: Any, arch: str, num_classes: int) -> nn.Module:
    try:
        params = inspect.signature(factory).parameters
        takes_k = "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):  # builtins have no signature
        takes_k = False
    try:
        model = factory(num_classes=num_classes) if takes_k else factory()
    except Exception as err:  # noqa: BLE001 - any failure of user code is a model error
        raise ModelError(f"model factory {arch!r} failed: {type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model factory {arch!r} returned {type(model).__name__}, not an nn.Module"
        )
    return model


# ---- checkpoints ---------------------------------------------------------------------------


@contextmanager
def _reading(url: str) -> Iterator[None]:
    """Turn storage errors into a CheckpointError naming the URL (never the credentials).

    An unreachable store is retried first (lens_core.store.call) and then raises StoreError.
    """
    try:
        yield
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {url}") from None
    except NotRegularFile as err:
        raise CheckpointError(f"refusing checkpoint: {err}") from None
    except StoreAccessError:
        raise CheckpointError(
            f"access denied reading checkpoint {url} (check credentials)"
        ) from None
    except PermissionError as err:
        raise CheckpointError(
            f"access denied reading checkpoint {url} (check credentials): {err}"
        ) from None
    except (IsADirectoryError, NotADirectoryError) as err:
        raise CheckpointError(f"checkpoint {url} is not a file ({type(err).__name__})") from None
    except OSError as err:
        raise CheckpointError(
            f"cannot read checkpoint {url}: {type(err).__name__}: {err}"
        ) from None


def _too_large(url: str, size: str, limit: int | None) -> CheckpointError:
    if limit is None:
        return CheckpointError(
            f"refusing checkpoint {url}: {size} is more than any checkpoint LENS reads "
            f"({MAX_CHECKPOINT_BYTES >> 30} GiB)"
        )
    return CheckpointError(
        f"refusing checkpoint {url}: {size} is more than this architecture's weights can fill "
        f"({limit / 2**20:.1f} MiB with optimizer state); is it for another model?"
    )


def _read_bytes(
    url: str, storage_options: dict[str, Any] | None, limit: int | None = None
) -> bytes:
    """The checkpoint's bytes. CheckpointError for what is not a regular file (a device never ends)
    and for more than `limit` bytes (MAX_CHECKPOINT_BYTES without one): before reading when the
    reported size says so, and counted while reading, since a device reports 0."""
    cap = MAX_CHECKPOINT_BYTES if limit is None else min(limit, MAX_CHECKPOINT_BYTES)
    with _reading(url):
        fs, path = filesystem(url, storage_options)
        size = call(lambda: fs.size(path), url, "reading checkpoint", storage_options)
        if size is not None and size > cap:
            raise _too_large(url, f"{size / 2**20:.1f} MiB", limit)

        def read() -> bytes:
            with open_regular(fs, path, url) as f:
                return b"".join(iter_bounded(f, cap, url))

        try:
            return call(read, url, "reading checkpoint", storage_options)
        except TooLarge:
            raise _too_large(url, f"more than {cap / 2**20:.1f} MiB", limit) from None


def expected_bytes(model: nn.Module) -> int:
    """Bytes of a model's state dict: what a plain checkpoint of it holds."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def checkpoint_limit(model: nn.Module) -> int:
    """The most bytes a checkpoint of `model` may hold, unpacked (weights + optimizer + margin)."""
    return int(CHECKPOINT_SIZE_FACTOR * expected_bytes(model)) + CHECKPOINT_SIZE_MARGIN


def check_archive(data: bytes, url: str, limit: int) -> None:
    """Refuse a torch zip archive with compressed entries or more than `limit` unpacked bytes.

    torch.save writes stored (uncompressed) entries; a DEFLATE-recompressed 256 KiB file can
    unpack to gigabytes inside torch.load, before any architecture check.
    """
    if not data.startswith(b"PK"):
        return  # safetensors or torch's legacy format: never larger than the bytes read
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError) as err:
        raise CheckpointError(f"truncated or corrupt checkpoint {url}: {err}") from None
    packed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise CheckpointError(
            f"refusing checkpoint {url}: {len(packed)} compressed entries (e.g. {packed[0]}); torch.save "
            "writes uncompressed archives, re-save it with torch.save or as .safetensors"
        )
    total = sum(e.file_size for e in entries)
    if total > limit:
        raise CheckpointError(
            f"refusing checkpoint {url}: it unpacks to {total / 2**20:.1f} MiB, more "
            f"than this architecture can fill ({limit / 2**20:.1f} MiB)"
        )


def checkpoint_digest(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """sha256 hex of the checkpoint's bytes (the run id depends on it), streamed in 8 MiB blocks;
    a device or FIFO is refused and at most MAX_CHECKPOINT_BYTES are hashed (CheckpointError)."""

    def stream() -> str:
        digest = hashlib.sha256()
        with open_regular(fs, path, url) as f:
            for block in iter_bounded(f, MAX_CHECKPOINT_BYTES, url):
                digest.update(block)
        return digest.hexdigest()

    with _reading(url):
        fs, path = filesystem(url, storage_options)
        try:
            return call(stream, url, "reading checkpoint", storage_options)
        except TooLarge:
            raise _too_large(
                url, f"more than {MAX_CHECKPOINT_BYTES / 2**20:.1f} MiB", None
            ) from None


def _is_safetensors(data: bytes, url: str) -> bool:
    """By suffix, or by content: an 8-byte little-endian header length, then a JSON header."""
    if url.lower().endswith(".safetensors"):
        return True
    return len(data) > 9 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") < len(data)


def _unpickle(data: bytes, url: str) -> Any:
    """torch.load with weights_only=True; every failure becomes a one-line CheckpointError."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Weights only load failed" in text:
            found = re.search(r"GLOBAL ([\w.]+)", text)
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"refusing checkpoint {url}: it contains pickled code or objects{what}, not only "
                "tensors; re-save it as a plain state dict or .safetensors"
            ) from None
        raise CheckpointError(f"corrupt checkpoint {url}: {text[:200]}") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, ValueError, KeyError, OSError) as err:
        raise CheckpointError(
            f"truncated or corrupt checkpoint {url} ({len(data)} bytes): {type(err).__name__}: "
            f"{str(err).split('.')[0][:200]}"
        ) from None


def parse_state_dict(
    data: bytes, url: str = "<bytes>", limit: int | None = None
) -> dict[str, torch.Tensor]:
    """Tensors by parameter name from checkpoint bytes (.pt/.pth or .safetensors, nested or not);
    zip archives are checked first (`check_archive`) when `limit` is given."""
    if limit is not None:
        check_archive(data, url, limit)
    if _is_safetensors(data, url):
        from safetensors.torch import load as load_safetensors

        try:
            obj: Any = load_safetensors(data)
        except Exception as err:  # safetensors raises its own SafetensorError
            raise CheckpointError(
                f"truncated or corrupt safetensors checkpoint {url}: {err}"
            ) from None
    else:
        obj = _unpickle(data, url)
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        nested = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        obj = nested
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {url} holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {url} has non-tensor entries: {_listing(bad)}")
    return {_strip(str(k)): v for k, v in obj.items()}


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return f"{len(items)} ({shown}{', ...' if len(items) > _SHOW else ''})"


def check_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], url: str, arch: str
) -> None:
    """Raise CheckpointError naming missing/unexpected keys and shape mismatches (a few of each)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        return
    parts = [f"checkpoint {url} does not match architecture {arch!r}"]
    if missing:
        parts.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_listing(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches: {_listing(shapes)}")
    raise CheckpointError("; ".join(parts))


def load_model(
    model_cfg: ModelConfig,
    num_classes: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> tuple[nn.Module, str]:
    """(model in eval mode, digest): weights from model_cfg.checkpoint, the shipped toy weights, or random."""
    k = model_cfg.num_classes or num_classes
    if not k:
        raise ModelError(
            "num_classes is unknown: set model.num_classes or pass the data set's class count"
        )
    model = build_model(model_cfg.arch, k)
    url = model_cfg.checkpoint
    if url is None and model_cfg.arch == "toy":
        from lens_core.toy import TOY_CHECKPOINT

        url = str(TOY_CHECKPOINT)
    if url is None:
        log.warning("no checkpoint for %s: using random (seeded) weights", model_cfg.arch)
        digest = f"random-init:{model_cfg.arch}"
    else:
        limit = checkpoint_limit(model)
        data = _read_bytes(url, storage_options, limit)
        digest = hashlib.sha256(data).hexdigest()
        state = parse_state_dict(data, url, limit)
        if model_cfg.num_classes is None:
            outputs = checkpoint_outputs(model_cfg.arch, model, state, k)
            if outputs is not None and outputs != k:
                model = build_model(model_cfg.arch, outputs)
        check_state_dict(model, state, url, model_cfg.arch)
        model.load_state_dict(state, strict=False)  # only num_batches_tracked may be absent
    return _freeze(model), digest


def checkpoint_outputs(
    arch: str, model: nn.Module, state: Mapping[str, torch.Tensor], k: int
) -> int | None:
    """The number of outputs the checkpoint's head has, or None when it cannot tell.

    The head's tensors are the ones whose shape changes with the number of classes (found by
    building the architecture with k + 1 outputs); their first dimension is the outputs.
    """
    mine = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    other = {name: tuple(t.shape) for name, t in build_model(arch, k + 1).state_dict().items()}
    head = [name for name, shape in mine.items() if other.get(name) != shape]
    found = {int(state[name].shape[0]) for name in head if name in state and state[name].ndim >= 1}
    return found.pop() if len(found) == 1 else None


def _freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no parameter grads (MACO needs input grads only), no in-place ops (g's output is kept)."""
    model.eval()
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False
    return model


# ---- splitting -----------------------------------------------------------------------------

_POOLS = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool2d)


def _starts_with_linear(m: nn.Module) -> bool:
    """True for a Linear, or a Sequential whose first non-dropout module is Linear."""
    if isinstance(m, nn.Linear):
        return True
    if isinstance(m, nn.Sequential):
        for sub in m:
            if isinstance(sub, nn.Dropout | nn.Identity):
                continue
            return isinstance(sub, nn.Linear)
    return False


def _stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-level children in order, with the flatten torchvision's forward does before a linear head."""
    children = list(model.named_children())
    out: list[tuple[str, nn.Module]] = []
    for i, (name, child) in enumerate(children):
        out.append((name, child))
        nxt = children[i + 1][1] if i + 1 < len(children) else None
        if isinstance(child, _POOLS) and nxt is not None and _starts_with_linear(nxt):
            out.append(("_flatten", nn.Flatten(1)))
    return out


def _cut(stages: list[tuple[str, nn.Module]], path: list[str], full: str):
    """Split a stage list after the module at a dotted path, descending into Sequentials."""
    names = [n for n, _ in stages]
    if path[0] not in names:
        shown = ", ".join(n for n in names if not n.startswith("_"))
        raise ModelError(f"layer {full!r} not found: {path[0]!r} is not one of [{shown}]")
    i = names.index(path[0])
    if len(path) == 1:
        return stages[: i + 1], stages[i + 1 :]
    inner = stages[i][1]
    if not isinstance(inner, nn.Sequential):
        raise ModelError(
            f"cannot split inside {path[0]!r} for layer {full!r}: it is a {type(inner).__name__}, not a Sequential"
        )
    g_in, h_in = _cut(list(inner.named_children()), path[1:], full)
    g = stages[:i] + ([(path[0], _seq(g_in))] if g_in else [])
    h = ([(path[0], _seq(h_in))] if h_in else []) + stages[i + 1 :]
    return g, h


def _seq(stages: list[tuple[str, nn.Module]]) -> nn.Module:
    return nn.Sequential(OrderedDict(stages)) if stages else nn.Identity()


def _sequential_split(model: nn.Module, layer: str) -> tuple[nn.Module, nn.Module]:
    g, h = _cut(_stages(model), layer.split("."), layer)
    while h and isinstance(h[0][1], nn.Flatten):  # the pooled layer: g returns (N, C)
        g, h = g + [h[0]], h[1:]
    return _seq(g), _seq(h)


def probe_linear_head(
    h: nn.Module, acts: torch.Tensor, ref: torch.Tensor | None = None, chunk: int = 64
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weight (K, C), bias (K,)) when h(a) = mean_hw(a) @ weight.T + bias, else None.

    Found by what h computes, whatever its modules: h must ignore where a value sits (shuffled
    locations, or every location set to the mean, give the same logits), its weight and bias are
    read off by probing h with constant maps (bias = h(0), column j = h(e_j) - h(0)), and the
    recovered affine map must reproduce h on `acts` (tolerance as the split check).
    """
    a = acts.detach().float()
    spatial = a.ndim == 4
    with torch.no_grad():
        ref = h(a).float() if ref is None else ref.float()
        if ref.ndim != 2:
            return None
        if spatial:
            n, c, hh, ww = a.shape
            perm = torch.randperm(hh * ww, generator=torch.Generator().manual_seed(0)).to(a.device)
            if not _close(ref, h(a.flatten(2)[:, :, perm].reshape(a.shape)).float()):
                return None

            def constant(v: torch.Tensor) -> torch.Tensor:
                return v[:, :, None, None].expand(-1, -1, hh, ww).contiguous()

            pooled = a.mean(dim=(2, 3))
        else:
            c = a.shape[1]

            def constant(v: torch.Tensor) -> torch.Tensor:
                return v

            pooled = a.reshape(a.shape[0], -1)
        bias = h(constant(torch.zeros(1, c, device=a.device))).float()[0]
        columns = []
        eye = torch.eye(c, device=a.device)
        for s in range(0, c, chunk):
            columns.append((h(constant(eye[s : s + chunk])).float() - bias).T)
        weight = torch.cat(columns, dim=1)
        # float error grows with the terms that cancel, not with the logits: scale the tolerance by them
        terms = (pooled.abs() @ weight.abs().T + bias.abs()).max().item()
        if not _close(ref, pooled @ weight.T + bias, terms):
            return None
    return weight, bias


def _as_head(spec: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A head handed over by lens_split: an nn.Linear or (weight, bias)."""
    if spec is None:
        return None
    if isinstance(spec, nn.Linear):
        weight = spec.weight.detach()
        bias = (
            spec.bias.detach()
            if spec.bias is not None
            else torch.zeros(weight.shape[0], device=weight.device)
        )
        return weight, bias
    weight, bias = spec
    return torch.as_tensor(weight).detach(), torch.as_tensor(bias).detach()


def split_model(model: nn.Module, layer: str, model_cfg: ModelConfig) -> SplitModel:
    """Cut `model` after `layer` (dotted names reach inside Sequentials) and verify h(g(x)) == model(x).

    `model.lens_split(layer)` may supply (g, h) or (g, h, head), head an nn.Linear or (weight, bias)
    of a pooled linear h; without it the head is found by probing h (`probe_linear_head`).
    """
    _freeze(model)
    head_spec = None
    if hasattr(model, "lens_split"):
        try:
            parts = model.lens_split(layer)
        except Exception as err:  # noqa: BLE001 - the model's own code: one clear line
            raise ModelError(
                f"{type(model).__name__}.lens_split({layer!r}) failed: "
                f"{type(err).__name__}: {_first_line(err)}"
            ) from None
        g_body, h = parts[0], parts[1]
        head_spec = parts[2] if len(parts) > 2 else None
        if not (isinstance(g_body, nn.Module) and isinstance(h, nn.Module)):
            raise ModelError(
                f"{type(model).__name__}.lens_split({layer!r}) must return nn.Modules "
                f"(g, h), got ({type(g_body).__name__}, {type(h).__name__})"
            )
    else:
        g_body, h = _token_or_sequential_split(model, layer, model_cfg.input_size)
    norm = Normalize(model_cfg.mean, model_cfg.std)
    g = _freeze(nn.Sequential(norm, g_body))
    h = _freeze(h)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    g.to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, model_cfg.input_size, model_cfg.input_size, generator=gen).to(
        device, dtype
    )
    with torch.no_grad():
        try:
            ref = model(norm(x))
        except Exception as err:  # noqa: BLE001 - any failure of the model itself is a model error
            raise ModelError(
                f"{type(model).__name__} fails on a test batch of {model_cfg.input_size}x"
                f"{model_cfg.input_size} images ({type(err).__name__}: {_first_line(err)}): check "
                "model.input_size"
            ) from None
        if hasattr(model, "lens_split") and _gives_extra(g_body, norm(x)):
            g_body, h = tokens.wrap(g_body, h)  # lens_split's g returns (map, extra tokens)
            g = _freeze(nn.Sequential(norm, g_body))
        try:
            acts = g(x)
            _check_map(acts, model, layer)
            out = h(acts)
        except ModelError:
            raise
        except Exception as err:  # noqa: BLE001 - one clear line, never a traceback
            raise ModelError(
                f"split of {type(model).__name__} at {layer!r} fails on a test batch "
                f"({type(err).__name__}: {_first_line(err)}): its forward is not a plain sequence "
                "of its children there; give the model a lens_split(layer) -> (g, h) method or "
                "pick another layer"
            ) from None
    _verify(ref, out, f"split of {type(model).__name__} at {layer!r}")
    spatial = acts.ndim == 4
    head = _as_head(head_spec)
    if tokens.needs_extra(h):  # h reads the class token too: not a map of the pooled activations
        head_spec = head = None
    pooled = acts.float().mean(dim=(2, 3)) if spatial else acts.float().flatten(1)
    if head is not None and not _close(ref, pooled @ head[0].float().T + head[1].float()):
        log.warning(
            "the head handed over by lens_split(%r) does not reproduce h: probing h instead", layer
        )
        head = None
    if head is None and not tokens.needs_extra(h):
        head = probe_linear_head(h, acts, ref)
    norm_head = None if head is not None or tokens.needs_extra(h) else probe_norm_head(h, acts, ref)
    if head is None and norm_head is None:
        log.info(
            "h at %r is not a linear map of the pooled activations: concepts are ranked by "
            "Sobol importance (no logit share)",
            layer,
        )
    return SplitModel(
        g,
        h,
        layer,
        model_cfg.input_size,
        int(ref.shape[1]),
        spatial,
        head,
        min_activation=float(acts.min()),
        max_activation=float(acts.max()),
        norm_head=norm_head,
    )


def probe_norm_head(h: nn.Module, acts: torch.Tensor, ref: torch.Tensor) -> NormHead | None:
    """The NormHead of h when h = spatial mean, LayerNorm over channels, linear layer (ConvNeXt's
    avgpool + classifier), else None.

    The candidate is read off h's only LayerNorm and only Linear, then must hold for what h
    computes: h ignores where a value sits (shuffled locations give the same logits) and the
    candidate reproduces h on `acts` (tolerance as the split check). A LayerNorm applied per
    location before the pooling (Swin's `norm` seen from `features`) fails that check.
    """
    if acts.ndim != 4:
        return None
    norms = [m for m in h.modules() if isinstance(m, nn.LayerNorm)]
    linears = [m for m in h.modules() if isinstance(m, nn.Linear)]
    c = acts.shape[1]
    if len(norms) != 1 or len(linears) != 1:
        return None
    ln, lin = norms[0], linears[0]
    if tuple(ln.normalized_shape) != (c,) or lin.in_features != c:
        return None
    with torch.no_grad():
        w = lin.weight.detach().float().cpu()
        gamma = ln.weight.detach().float().cpu() if ln.weight is not None else torch.ones(c)
        beta = ln.bias.detach().float().cpu() if ln.bias is not None else torch.zeros(c)
        b = lin.bias.detach().float().cpu() if lin.bias is not None else torch.zeros(w.shape[0])
        wg = w * gamma[None, :]
        head = NormHead(wg - wg.mean(dim=1, keepdim=True), b + w @ beta, float(ln.eps))
        a = acts.detach().float()
        n, _, hh, ww = a.shape
        perm = torch.randperm(hh * ww, generator=torch.Generator().manual_seed(0)).to(a.device)
        if not _close(ref, h(a.flatten(2)[:, :, perm].reshape(a.shape)).float()):
            return None
        pooled = a.mean(dim=(2, 3)).cpu()
        terms = (head.scale(pooled)[:, None] * (pooled.abs() @ head.weight.abs().T)).max().item()
        if not _close(ref.cpu(), head.logits(pooled), terms + head.bias.abs().max().item()):
            return None
    return head


def _token_or_sequential_split(
    model: nn.Module, layer: str, input_size: int
) -> tuple[nn.Module, nn.Module]:
    """(g body, h): a vision transformer's patch tokens as a map (lens_core.tokens), a Swin's
    channels-last maps permuted to (N, C, H, W), else the plain sequence of children."""
    try:
        if tokens.is_vit(model):
            return tokens.vit_split(model, layer, input_size)
        g_body, h = _sequential_split(model, layer)
        if tokens.is_swin(model) and tokens.swin_channels_last(layer):
            return nn.Sequential(g_body, tokens.ChannelsFirst()), nn.Sequential(
                tokens.ChannelsLast(), h
            )
        return g_body, h
    except tokens.TokenError as err:
        raise ModelError(str(err)) from None


def _gives_extra(g_body: nn.Module, x: torch.Tensor) -> bool:
    """True when a lens_split g returns (map, extra tokens) rather than a map."""
    try:
        out = g_body(x)
    except Exception:  # noqa: BLE001 - reported by the split's own test batch
        return False
    return (
        isinstance(out, tuple | list)
        and len(out) == 2
        and all(isinstance(t, torch.Tensor) for t in out)
    )


def _check_map(acts: Any, model: nn.Module, layer: str) -> None:
    """ModelError unless g gives a map (N, C, H, W) or a vector (N, C) per image."""
    where = f"layer {layer!r} of {type(model).__name__}"
    if not isinstance(acts, torch.Tensor):
        raise ModelError(
            f"{where} gives a {type(acts).__name__}, not a tensor: pick a layer whose output is "
            "a map (N, C, H, W), or give the model a lens_split(layer) -> (g, h) method"
        )
    if acts.ndim == 3:
        raise ModelError(
            f"{where} gives tokens {tuple(acts.shape)}, not a map (N, C, H, W): give the model a "
            "lens_split(layer) whose g returns the patch tokens arranged on their grid (N, C, H, W) "
            "and the other tokens aside, (map, extra), and whose h takes (map, extra)"
        )
    if acts.ndim not in (2, 4):
        raise ModelError(
            f"{where} gives an output of shape {tuple(acts.shape)}: LENS needs a map (N, C, H, W) "
            "or a vector (N, C) per image; pick another layer"
        )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else ""


def _close(ref: torch.Tensor, out: torch.Tensor, scale: float | None = None) -> bool:
    """out equals ref up to float error: 1e-4 of the largest magnitude involved (logits, or `scale`)."""
    if ref.shape != out.shape:
        return False
    err = (ref.float() - out.float()).abs().max().item()
    return err <= 1e-4 * (1.0 + max(ref.abs().max().item(), scale or 0.0))


def _verify(ref: torch.Tensor, out: torch.Tensor, what: str) -> None:
    if _close(ref, out):
        return
    if ref.shape == out.shape:
        detail = f"max |difference| {(ref.float() - out.float()).abs().max().item():.3g}"
    else:
        detail = f"shape {tuple(out.shape)} vs logits {tuple(ref.shape)}"
    raise ModelError(
        f"{what} does not reproduce the model's logits ({detail}): its forward is not a plain "
        "sequence of its children there; give the model a lens_split(layer) -> (g, h) method "
        "or pick another layer"
    )


def load_split_model(
    model_cfg: ModelConfig,
    num_classes: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> SplitModel:
    """load_model then split_model at model_cfg.layer, carrying the checkpoint digest."""
    model, digest = load_model(model_cfg, num_classes, storage_options)
    return dataclasses.replace(split_model(model, model_cfg.layer, model_cfg), digest=digest)
