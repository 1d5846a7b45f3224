"""Token models split at a layer: g gives the patch tokens arranged as a map, h runs the rest.

LENS works on maps (N, C, H, W): patches, crops, attribution maps, Sobol masks and MACO all read
a grid of locations. A vision transformer's layer gives a sequence of tokens instead, so here g
arranges the patch tokens on their grid (tokens x channels, row-major as the patch embedding
lays them out) and sets the class and register tokens aside, and h rebuilds the sequence the
model needs from a map and those set-aside tokens.

The set-aside tokens ("extra tokens", (N, T, C)) belong to an image: h on a modified map (U W,
as importance builds) uses the class token g produced for the same image, so h(g(x)) is the
model's logits exactly and a concept removed from the map changes the logits only through what
the later blocks read from the patch tokens. h finds them itself when handed g's last map
(h(g(x)), TokenH); any other map comes with them, h(map, extra) (the activations stage stores
them as `spatial_extra`).

Supported: torchvision's VisionTransformer at `conv_proj` or a whole block
`encoder.layers.encoder_layer_<i>` before the last (the last block, `encoder.layers`,
`encoder.ln` and `encoder` are refused: from there only the class token reaches the head),
torchvision's SwinTransformer at any layer under `features` and at `norm` (channels-last
(N, H, W, C) maps, permuted), and any model whose `lens_split(layer)` g returns (map, extra).
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class TokenError(ValueError):
    """A token model cannot be split at the layer asked for (turned into a ModelError)."""


class _Stash:
    """The extra tokens of the map g last returned, per thread, kept only while that map lives
    (so a map's autograd graph, e.g. MACO's, is not held past its use)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, tuple[weakref.ref, torch.Tensor]] = {}

    def put(self, m: torch.Tensor, extra: torch.Tensor) -> None:
        key, ref = threading.get_ident(), weakref.ref(m)
        with self._lock:
            self._held[key] = (ref, extra)
        weakref.finalize(m, self._drop, key, ref)

    def _drop(self, key: int, ref: weakref.ref) -> None:
        with self._lock:
            held = self._held.get(key)
            if held is not None and held[0] is ref:
                del self._held[key]

    def get(self, m: torch.Tensor) -> torch.Tensor | None:
        with self._lock:
            held = self._held.get(threading.get_ident())
        return held[1] if held is not None and held[0]() is m else None

    def __getstate__(self) -> dict[str, Any]:  # a lock cannot be pickled or copied
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()


class TokenG(nn.Module):
    """g of a token model: `body(x) -> (map (N, C, H, W), extra (N, T, C))`; returns the map and
    keeps the extra tokens for h (and for `extra_tokens`)."""

    def __init__(self, body: nn.Module | Callable[..., Any], stash: _Stash):
        super().__init__()
        self.body = body
        self.stash = stash

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, extra = self.body(x)
        self.stash.put(m, extra)
        return m


class TokenH(nn.Module):
    """h of a token model: `rest(map, extra) -> logits`; extra defaults to the tokens g set aside
    for this very map, and must be given for any other map."""

    needs_extra = True

    def __init__(self, rest: nn.Module | Callable[..., Any], stash: _Stash):
        super().__init__()
        self.rest = rest
        self.stash = stash

    def forward(self, m: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        if extra is None:
            extra = self.stash.get(m)
        if extra is None:
            raise TokenError(
                "h of a token model needs the class (and register) tokens of the images its maps "
                "come from: call h(map, extra) with the tokens stored next to the maps"
            )
        if extra.shape[0] != m.shape[0]:
            raise TokenError(f"{m.shape[0]} maps but {extra.shape[0]} sets of extra tokens")
        return self.rest(m, extra.to(m.dtype))


def needs_extra(h: nn.Module) -> bool:
    """True when h takes the set-aside tokens of each map (a token model's h)."""
    return bool(getattr(h, "needs_extra", False))


def extra_tokens(g: nn.Module, m: torch.Tensor) -> torch.Tensor | None:
    """The class/register tokens g set aside for the map `m` it returned, or None (not a token
    model, or `m` is not g's last output in this thread)."""
    for mod in g.modules():
        if isinstance(mod, TokenG):
            return mod.stash.get(m)
    return None


def wrap(
    body: nn.Module | Callable[..., Any], rest: nn.Module | Callable[..., Any]
) -> tuple[TokenG, TokenH]:
    """(g, h) of a token model from body: x -> (map, extra) and rest: (map, extra) -> logits."""
    stash = _Stash()
    return TokenG(body, stash), TokenH(rest, stash)


# ---- maps <-> tokens ------------------------------------------------------------------------


def tokens_to_map(t: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(N, H*W, C) patch tokens, row-major -> (N, C, H, W)."""
    n, _, c = t.shape
    return t.transpose(1, 2).reshape(n, c, grid[0], grid[1])


def map_to_tokens(m: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H*W, C) patch tokens, row-major (the inverse of tokens_to_map)."""
    return m.flatten(2).transpose(1, 2)


class ChannelsFirst(nn.Module):
    """(N, H, W, C) -> (N, C, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise TokenError(f"expected a channels-last map (N, H, W, C), got {tuple(x.shape)}")
        return x.permute(0, 3, 1, 2)


class ChannelsLast(nn.Module):
    """(N, C, H, W) -> (N, H, W, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


# ---- torchvision's VisionTransformer --------------------------------------------------------


class _ViTBody(nn.Module):
    """Image -> tokens after `blocks` (and the final norm when given) -> (map, class token)."""

    def __init__(self, vit: nn.Module, blocks: nn.Module, ln: nn.Module | None):
        super().__init__()
        self.conv_proj = vit.conv_proj
        self.class_token = vit.class_token
        self.pos_embedding = vit.encoder.pos_embedding
        self.dropout = vit.encoder.dropout
        self.blocks = blocks
        self.ln = ln if ln is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.conv_proj(x)  # (N, C, H', W')
        grid = (p.shape[2], p.shape[3])
        t = map_to_tokens(p)
        t = torch.cat([self.class_token.expand(t.shape[0], -1, -1).to(t.dtype), t], dim=1)
        t = self.ln(self.blocks(self.dropout(t + self.pos_embedding)))
        return tokens_to_map(t[:, 1:], grid), t[:, :1]


class _ViTRest(nn.Module):
    """(patch map, class token) at a block -> the later blocks, the final norm, the head on the
    class token."""

    def __init__(self, vit: nn.Module, blocks: nn.Module, ln: nn.Module | None):
        super().__init__()
        self.blocks = blocks
        self.ln = ln if ln is not None else nn.Identity()
        self.heads = vit.heads

    def forward(self, m: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        t = torch.cat([extra, map_to_tokens(m)], dim=1)
        return self.heads(self.ln(self.blocks(t))[:, 0])


class _ViTFromEmbedding(nn.Module):
    """h at `conv_proj`: the patch-embedding map -> class token, encoder, head (no extra tokens)."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.class_token = vit.class_token
        self.encoder = vit.encoder
        self.heads = vit.heads

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        t = map_to_tokens(m)
        t = torch.cat([self.class_token.expand(t.shape[0], -1, -1).to(t.dtype), t], dim=1)
        return self.heads(self.encoder(t)[:, 0])


def _vit_layers(n_blocks: int) -> str:
    if n_blocks < 2:
        return "'conv_proj'"
    return (
        f"'conv_proj' or a whole block 'encoder.layers.encoder_layer_0' .. "
        f"'encoder.layers.encoder_layer_{n_blocks - 2}'"
    )


def vit_split(vit: nn.Module, layer: str, input_size: int) -> tuple[nn.Module, nn.Module]:
    """(g body, h) of torchvision's VisionTransformer at `layer` (see the module docstring).

    TokenError when the layer is not one of those, when the input size is not the model's, or
    when the layer is past the last block: from there only the class token reaches the head, so
    the patch tokens (the concepts' map) could not change the logits.
    """
    name = type(vit).__name__
    if input_size != vit.image_size:
        raise TokenError(
            f"{name} (layer {layer!r}) takes {vit.image_size}x{vit.image_size} images (its "
            f"position embedding has one entry per patch of that size): set model.input_size = "
            f"{vit.image_size}"
        )
    blocks = list(vit.encoder.layers.named_children())
    n = len(blocks)
    if layer == "conv_proj":
        return vit.conv_proj, _ViTFromEmbedding(vit)
    match = re.fullmatch(r"encoder\.layers\.encoder_layer_(\d+)", layer)
    if match and int(match.group(1)) < n and blocks[int(match.group(1))][0] == layer.split(".")[-1]:
        cut = int(match.group(1)) + 1
    elif layer in ("encoder.layers", "encoder.ln", "encoder"):
        cut = n
    elif layer.startswith(("encoder.layers.encoder_layer_", "encoder.layers.")):
        raise TokenError(
            f"layer {layer!r} of {name} is not a whole block (a split inside attention or the MLP "
            f"gives no map of patch tokens): pick {_vit_layers(n)}"
        )
    else:
        raise TokenError(f"layer {layer!r} of {name} cannot be split: pick {_vit_layers(n)}")
    if cut == n:
        raise TokenError(
            f"layer {layer!r} of {name} is the last block's output or after it: from there only "
            "the class token reaches the head, so the patch tokens (where concepts are found) "
            f"cannot change the logits; pick {_vit_layers(n)}"
        )
    return vit_tokens_split(vit, cut, final_ln=False)


def vit_tokens_split(vit: nn.Module, upto: int, final_ln: bool) -> tuple[nn.Module, nn.Module]:
    """(g, h) of a VisionTransformer after its first `upto` blocks (and the final norm), with no
    check that the patch tokens still matter: what `vit_split` refuses past the last block."""
    blocks = [m for _, m in vit.encoder.layers.named_children()]
    ln = vit.encoder.ln
    before = nn.Sequential(*blocks[:upto])
    after = nn.Sequential(*blocks[upto:])
    return wrap(
        _ViTBody(vit, before, ln if final_ln else None),
        _ViTRest(vit, after, None if final_ln else ln),
    )


# ---- torchvision's SwinTransformer ----------------------------------------------------------


def swin_channels_last(layer: str) -> bool:
    """True when a SwinTransformer layer's output is a channels-last (N, H, W, C) map: everything
    under `features` after the patch embedding's convolution, and `norm`."""
    if layer == "norm":
        return True
    return (layer == "features" or layer.startswith("features.")) and layer != "features.0.0"


def is_vit(model: nn.Module) -> bool:
    from torchvision.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def is_swin(model: nn.Module) -> bool:
    from torchvision.models.swin_transformer import SwinTransformer

    return isinstance(model, SwinTransformer)
