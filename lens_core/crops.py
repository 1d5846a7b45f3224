"""Top-activating crops per concept and concept attribution maps, encoded for the web."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# The colour of the concept of rank i on maps and on the site: the site's --k0..--k9 (lens.css,
# Tableau 10); concepts ranked 10th and later share OTHER_COLOR (--ko). A test keeps them equal.
CONCEPT_COLORS = [
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bcbd22",
]
OTHER_COLOR = "#d6d3d1"


def concept_color(rank: int) -> str:
    """Colour of the concept at `rank` (0 = most important); OTHER_COLOR past the palette."""
    return CONCEPT_COLORS[rank] if 0 <= rank < len(CONCEPT_COLORS) else OTHER_COLOR


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
    patch = F.interpolate(
        patch, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return to_pil(patch[0])


def thumbnail(image: torch.Tensor, size: int) -> Image.Image:
    """The whole (3,H,W) image resized to size x size (antialiased)."""
    return to_pil(
        F.interpolate(
            image[None].float(),
            size=(size, size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )[0]
    )


def _hex_rgb(color: str) -> np.ndarray:
    return np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.float32) / 255


def _ranks(concept_rank: Sequence[int], k: int) -> np.ndarray:
    rank_of = np.empty(k, dtype=int)
    rank_of[np.asarray(concept_rank)] = np.arange(k)
    return rank_of


def dominance(coeffs: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dominant concept (S,S), strength in [0,1] (S,S)) of coefficient maps (k,h,w) upsampled to
    size.

    Each concept's map is upsampled (bilinear) before the argmax, so regions have smooth borders
    and one colour each; strength is the dominant coefficient scaled from its 40th percentile (0:
    the weakest locations stay clear) to its 99th (1), so the overlay shows where concepts are.
    """
    maps = torch.from_numpy(np.ascontiguousarray(coeffs, dtype=np.float32))[None]
    up = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)[0].clamp_(
        min=0
    )
    strength, dominant = up.max(0)
    lo, hi = (float(v) for v in torch.quantile(strength.flatten(), torch.tensor([0.4, 0.99])))
    scaled = (strength - lo) / (hi - lo) if hi > lo else (strength > 0).float()
    return dominant.numpy(), scaled.clamp_(0, 1).numpy()


def attribution_map(
    image: torch.Tensor, coeffs: np.ndarray, concept_rank: Sequence[int], size: int
) -> Image.Image:
    """The image, faded to grey, under a concept-coloured overlay: each region takes the colour of
    its dominant concept (the colours of the concept cards, by rank), opacity by its strength."""
    k = coeffs.shape[0]
    rank_of = _ranks(concept_rank, k)
    dominant, strength = dominance(coeffs, size)
    palette = np.stack([_hex_rgb(concept_color(int(r))) for r in rank_of])  # concept -> colour
    colour = torch.from_numpy(palette[dominant]).permute(2, 0, 1)  # (3, S, S)
    alpha = torch.from_numpy(0.85 * strength**0.75)[None]
    base = F.interpolate(
        image[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )[0]
    grey = (0.299 * base[0] + 0.587 * base[1] + 0.114 * base[2])[None]
    faded = 0.85 * (0.3 * base + 0.7 * grey)  # colours of the overlay stand out from the photo's
    return to_pil(faded * (1 - alpha) + colour * alpha)


def dominant_concepts(
    coeffs: np.ndarray, concept_rank: Sequence[int], min_share: float = 0.02
) -> list[dict]:
    """The legend of an overlay: concepts that dominate at least `min_share` of the image's
    locations (weighted by strength), by rank: [{"concept", "rank", "share"}]."""
    k, h, w = coeffs.shape
    rank_of = _ranks(concept_rank, k)
    dominant, strength = dominance(coeffs, max(h, w))
    total = float(strength.sum()) or 1.0
    out = []
    for c in range(k):
        share = float(strength[dominant == c].sum()) / total
        if share >= min_share:
            out.append({"concept": c, "rank": int(rank_of[c]) + 1, "share": round(share, 3)})
    return sorted(out, key=lambda d: d["rank"])
