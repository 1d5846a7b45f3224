"""A classifier cut at a layer into g (images -> activations) and h (activations -> logits),
verified by construction (h(g(x)) must equal the logits); the linear head behind the logit share
is found by what h computes (`probe_linear_head`, `probe_norm_head`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lens_core import tokens
from lens_core.config import ModelConfig
from lens_core.models.errors import ModelError

log = logging.getLogger(__name__)


@dataclass
class SplitModel:
    """A classifier cut at `layer`: logits = h(g(images)); `head` is set when h = avg-pool +
    linear."""

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


def frozen(model: nn.Module) -> nn.Module:
    """Eval mode, no parameter grads (MACO needs input grads only), no in-place ops (g's output is
    kept)."""
    model.eval()
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False
    return model


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
    """Top-level children in order, with the flatten torchvision's forward does before a linear
    head."""
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
            f"cannot split inside {path[0]!r} for layer {full!r}: "
            f"it is a {type(inner).__name__}, not a Sequential"
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
        # float error grows with the terms that cancel, not with the logits: scale the tolerance
        # by them
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
    """Cut `model` after `layer` (dotted names reach inside Sequentials) and verify
    h(g(x)) == model(x).

    `model.lens_split(layer)` may supply (g, h) or (g, h, head), head an nn.Linear or (weight, bias)
    of a pooled linear h; without it the head is found by probing h (`probe_linear_head`).
    """
    frozen(model)
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
    g = frozen(nn.Sequential(norm, g_body))
    h = frozen(h)
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
            g = frozen(nn.Sequential(norm, g_body))
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
            "lens_split(layer) whose g returns the patch tokens arranged on their grid "
            "(N, C, H, W) and the other tokens aside, (map, extra), and whose h takes (map, extra)"
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
    """out equals ref up to float error: 1e-4 of the largest magnitude involved (logits, or
    `scale`)."""
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
