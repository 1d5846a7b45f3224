"""Top-activating crops per concept and concept attribution maps, encoded for the web."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# tab10: the colour of concept i on maps and on the site (rank order).
CONCEPT_COLORS = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
]


def concept_color(i: int) -> str:
    return CONCEPT_COLORS[i % len(CONCEPT_COLORS)]


def top_patches(
    U: np.ndarray, image_of_patch: np.ndarray, concept: int, n: int, one_per_image: bool = True
) -> list[int]:
    """Indices of the patches with the highest coefficient for `concept` (at most one per image)."""
    order = np.argsort(-U[:, concept], kind="stable")
    picked: list[int] = []
    seen: set[int] = set()
    for idx in order:
        if U[idx, concept] <= 0:
            break
        img = int(image_of_patch[idx])
        if one_per_image and img in seen:
            continue
        seen.add(img)
        picked.append(int(idx))
        if len(picked) == n:
            break
    return picked


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3,H,W) float [0,1] -> RGB PIL image."""
    arr = (image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def encode(img: Image.Image, fmt: str = "webp", quality: int = 82) -> bytes:
    """Web thumbnail bytes: WebP or JPEG (PNG only where alpha is needed, elsewhere)."""
    buf = io.BytesIO()
    if fmt == "webp":
        img.save(buf, format="WEBP", quality=quality, method=4)
    else:
        img.save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def crop_box(image: torch.Tensor, box: Sequence[int], size: int) -> Image.Image:
    """Cut box (x0, y0, x1, y1) out of a (3,H,W) image and resize it to size x size."""
    x0, y0, x1, y1 = (int(v) for v in box)
    patch = image[:, y0:y1, x0:x1].unsqueeze(0)
    patch = F.interpolate(patch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return to_pil(patch[0])


def _hex_rgb(color: str) -> np.ndarray:
    return np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.float32) / 255


def attribution_map(image: torch.Tensor, coeffs: np.ndarray, concept_rank: Sequence[int], size: int) -> Image.Image:
    """Overlay per-location concept coefficients (k,H,W) on the image: each location takes the
    colour of its dominant concept (by rank colour), with opacity from its coefficient."""
    k, h, w = coeffs.shape
    rank_of = np.empty(k, dtype=int)
    rank_of[np.asarray(concept_rank)] = np.arange(k)
    dominant = coeffs.argmax(0)
    strength = coeffs.max(0)
    scale = np.percentile(strength, 99) or 1.0
    alpha = np.clip(strength / scale, 0, 1)
    palette = np.stack([_hex_rgb(concept_color(r)) for r in rank_of])  # concept -> colour
    colour = palette[dominant]  # (h, w, 3)
    layer = torch.from_numpy(np.concatenate([colour, alpha[..., None]], -1)).permute(2, 0, 1)[None]
    layer = F.interpolate(layer.float(), size=(size, size), mode="bilinear", align_corners=False)[0]
    base = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True)[0]
    a = layer[3:4] * 0.6
    blended = base * (1 - a) + layer[:3] * a
    return to_pil(blended)
