"""Synthetic toy data: classes built from known visual parts, a ground-truth part mask per image.

Each image is a low-salience background plus the class's own parts and 1-2 distractor parts shared
by all classes, placed without overlap. The mask holds the part id of every pixel (-1 =
background), so later stages (concepts, importance) can be checked against the truth.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import posixpath
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from lens_core.store import SUCCESS, filesystem, join_url, normalize_url

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Part:
    """One visual part: a shape (its silhouette) filled with a colour or a two-colour texture."""

    name: str
    shape: str
    fill: str
    colors: tuple[RGB, ...]


_C: dict[str, RGB] = {
    "red": (225, 30, 35),
    "yellow": (250, 215, 30),
    "black": (15, 15, 15),
    "blue": (35, 70, 225),
    "white": (245, 245, 245),
    "green": (30, 165, 55),
    "orange": (250, 135, 20),
    "navy": (20, 25, 90),
    "magenta": (225, 40, 200),
    "cyan": (40, 220, 230),
    "purple": (115, 40, 165),
    "lime": (165, 235, 40),
    "pink": (255, 155, 195),
    "teal": (0, 130, 130),
    "sky": (140, 200, 250),
    "slate": (70, 80, 95),
    "brown": (120, 70, 30),
    "olive": (120, 125, 30),
    "beige": (225, 205, 160),
    "umber": (60, 40, 25),
}

PARTS: tuple[Part, ...] = (
    # own parts: each of the 10 default classes owns two of them
    Part("red-disc", "disc", "solid", (_C["red"],)),
    Part("yellow-stripes", "square", "stripes", (_C["yellow"], _C["black"])),
    Part("blue-square", "square", "solid", (_C["blue"],)),
    Part("checker", "square", "checker", (_C["white"], _C["black"])),
    Part("green-triangle", "triangle", "solid", (_C["green"],)),
    Part("orange-dots", "disc", "dots", (_C["orange"], _C["navy"])),
    Part("magenta-cross", "cross", "solid", (_C["magenta"],)),
    Part("cyan-ring", "ring", "solid", (_C["cyan"],)),
    Part("purple-diamond", "diamond", "solid", (_C["purple"],)),
    Part("white-star", "star", "solid", (_C["white"],)),
    Part("lime-hexagon", "hexagon", "solid", (_C["lime"],)),
    Part("pink-crescent", "crescent", "solid", (_C["pink"],)),
    Part("teal-grid", "square", "grid", (_C["teal"], _C["white"])),
    Part("navy-waves", "square", "waves", (_C["navy"], _C["sky"])),
    Part("red-checker", "diamond", "checker", (_C["red"], _C["white"])),
    Part("green-stripes", "disc", "stripes", (_C["green"], _C["white"])),
    Part("blue-dots", "triangle", "dots", (_C["white"], _C["blue"])),
    Part("black-star", "star", "solid", (_C["black"],)),
    Part("orange-square", "square", "solid", (_C["orange"],)),
    Part("magenta-waves", "disc", "waves", (_C["magenta"], _C["white"])),
    # distractors: shared by every class, so they carry no class evidence
    Part("slate-blob", "blob", "solid", (_C["slate"],)),
    Part("brown-bar", "bar", "solid", (_C["brown"],)),
    Part("olive-wedge", "wedge", "solid", (_C["olive"],)),
    Part("beige-spots", "square", "dots", (_C["umber"], _C["beige"])),
)

PART_NAMES: tuple[str, ...] = tuple(p.name for p in PARTS)
OWN_PARTS: tuple[int, ...] = tuple(range(20))
DISTRACTOR_PARTS: tuple[int, ...] = (20, 21, 22, 23)

# The 10 hand-designed default classes: disjoint pairs of own parts.
DEFAULT_RECIPES: tuple[tuple[int, ...], ...] = tuple((2 * i, 2 * i + 1) for i in range(10))
MAX_OWN_PER_CLASS = 4
MASK_ENCODING = (
    "PNG, 8-bit grey (16-bit if more than 254 parts): value = part id + 1, 0 = background"
)
IMAGE_SIZE = 128


@lru_cache(maxsize=1)
def _recipes() -> tuple[tuple[int, ...], ...]:
    """All class recipes in index order: the 10 defaults, then combinations of 2, 3, 4 own parts."""
    extra = [
        combo
        for k in range(2, MAX_OWN_PER_CLASS + 1)
        for combo in itertools.combinations(OWN_PARTS, k)
        if combo not in DEFAULT_RECIPES
    ]
    return DEFAULT_RECIPES + tuple(extra)


def max_classes() -> int:
    """The largest n_classes the combinatorial recipes support (6165)."""
    return len(_recipes())


def _check(n_classes: int, class_index: int | None = None) -> None:
    if not 1 <= n_classes <= max_classes():
        raise ValueError(f"n_classes must be in 1..{max_classes()}, got {n_classes}")
    if class_index is not None and not 0 <= class_index < n_classes:
        raise ValueError(f"class_index {class_index} out of range for {n_classes} classes")


def class_parts(class_index: int, n_classes: int = 10) -> tuple[int, ...]:
    """Own part ids of a class; the recipe of an index does not depend on n_classes."""
    _check(n_classes, class_index)
    return _recipes()[class_index]


def class_names(n_classes: int = 10) -> list[str]:
    """Folder names, e.g. '00-red-disc-yellow-stripes': the index prefix keeps sorted order = label
    order."""
    _check(n_classes)
    width = max(2, len(str(n_classes - 1)))
    return [
        f"{i:0{width}d}-" + "-".join(PART_NAMES[p] for p in _recipes()[i]) for i in range(n_classes)
    ]


def image_seed(seed: int, index: int) -> int:
    """Seed of image `index` of a data set generated with `seed` (a 62-bit hash, disjoint in
    practice)."""
    state = np.random.SeedSequence([seed, index, 0x70E]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 30 | int(state[1]) >> 2


# ---- drawing -----------------------------------------------------------------------------------


def _rotated(points: np.ndarray, angle: float, center: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    rot = points @ np.array([[c, s], [-s, c]])
    return [(float(x) + center, float(y) + center) for x, y in rot]


def _polygon(n: int, radius: float, phase: float) -> np.ndarray:
    t = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _rect(half_w: float, half_h: float) -> np.ndarray:
    return np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]])


def _shape_mask(shape: str, s: int, angle: float) -> np.ndarray:
    """Boolean s x s silhouette of a shape, rotated by `angle` radians about the centre."""
    img = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(img)
    c, r = (s - 1) / 2, s / 2 - 0.5
    box = [0.5, 0.5, s - 1.5, s - 1.5]
    if shape == "disc":
        draw.ellipse(box, fill=1)
    elif shape == "ring":
        draw.ellipse(box, fill=1)
        inner = 0.42 * r
        draw.ellipse([c - inner, c - inner, c + inner, c + inner], fill=0)
    elif shape == "crescent":
        draw.ellipse(box, fill=1)
        dx, dy = 0.45 * r * math.cos(angle), 0.45 * r * math.sin(angle)
        draw.ellipse([0.5 + dx, 0.5 + dy, s - 1.5 + dx, s - 1.5 + dy], fill=0)
    elif shape == "square":
        half = r / (abs(math.cos(angle)) + abs(math.sin(angle)))
        draw.polygon(_rotated(_rect(half, half), angle, c), fill=1)
    elif shape == "diamond":
        draw.polygon(_rotated(_polygon(4, r, 0.0), angle, c), fill=1)
    elif shape == "triangle":
        draw.polygon(_rotated(_polygon(3, r, -math.pi / 2), angle, c), fill=1)
    elif shape == "wedge":
        draw.polygon(_rotated(_polygon(3, r, math.pi / 2), angle, c), fill=1)
    elif shape == "hexagon":
        draw.polygon(_rotated(_polygon(6, r, 0.0), angle, c), fill=1)
    elif shape == "star":
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)[:, None]
        draw.polygon(_rotated(_polygon(10, 1.0, -math.pi / 2) * radii, angle, c), fill=1)
    elif shape == "cross":
        arm = 0.2 * s
        draw.polygon(_rotated(_rect(r * 0.95, arm), angle, c), fill=1)
        draw.polygon(_rotated(_rect(arm, r * 0.95), angle, c), fill=1)
    elif shape == "bar":
        draw.polygon(_rotated(_rect(r, 0.22 * s), angle, c), fill=1)
    elif shape == "blob":
        t = 2 * math.pi * np.arange(32) / 32
        pts = np.stack([r * np.cos(t), 0.62 * r * np.sin(t)], axis=1)
        draw.polygon(_rotated(pts, angle, c), fill=1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(img, dtype=bool)


def _fill(part: Part, s: int, angle: float, rng: np.random.Generator) -> np.ndarray:
    """s x s x 3 float colours of a part's fill (texture phase drawn from rng)."""
    cols = [np.array(c, dtype=np.float32) / 255 for c in part.colors]
    if part.fill == "solid":
        return np.broadcast_to(cols[0], (s, s, 3))
    y, x = np.mgrid[0:s, 0:s].astype(np.float32)
    ph = rng.uniform(0, 8)
    if part.fill == "stripes":
        u = x * math.cos(angle + math.pi / 4) + y * math.sin(angle + math.pi / 4) + ph
        on = (u % 8) < 4
    elif part.fill == "checker":
        on = ((np.floor((x + ph) / 6) + np.floor((y + ph) / 6)) % 2) == 0
    elif part.fill == "dots":
        dx, dy = (x + ph) % 9 - 4.5, (y + ph) % 9 - 4.5
        on = dx * dx + dy * dy < 2.8**2
    elif part.fill == "grid":
        on = ((x + ph) % 8 < 2) | ((y + ph) % 8 < 2)
    elif part.fill == "waves":
        on = ((y + 3 * np.sin(2 * math.pi * x / 12) + ph) % 8) < 4
    else:
        raise ValueError(f"unknown fill {part.fill!r}")
    return np.where(on[..., None], cols[0], cols[1])


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, amp: float) -> np.ndarray:
    """Low-frequency noise: a coarse random grid, bilinearly upsampled to size x size x 3."""
    coarse = rng.normal(0, amp, (cells + 1, cells + 1, 3)).astype(np.float32)
    pos = np.linspace(0, cells, size, dtype=np.float32)
    lo = np.minimum(pos.astype(int), cells - 1)
    w = pos - lo
    m = np.zeros((size, cells + 1), dtype=np.float32)
    m[np.arange(size), lo] = 1 - w
    m[np.arange(size), lo + 1] += w
    rows = np.tensordot(m, coarse, axes=(1, 0))  # (size, cells + 1, 3)
    return np.tensordot(rows, m, axes=(1, 1)).transpose(0, 2, 1)


def _layout(rng: np.random.Generator, sizes: list[int], size: int) -> list[tuple[int, int, int]]:
    """Non-overlapping boxes (x, y, side) for squares of the given sides (rejection, then a
    grid)."""
    gap = max(1, size // 64)
    for _ in range(30):
        boxes: list[tuple[int, int, int]] = []
        for s in sizes:
            for _ in range(60):
                x, y = (int(v) for v in rng.integers(0, size - s + 1, 2))
                if all(
                    x + s + gap <= bx
                    or bx + bs + gap <= x
                    or y + s + gap <= by
                    or by + bs + gap <= y
                    for bx, by, bs in boxes
                ):
                    boxes.append((x, y, s))
                    break
            else:
                break
        if len(boxes) == len(sizes):
            return boxes
    cell = size // 3  # fallback: distinct cells of a 3 x 3 grid, sides clipped to the cell
    out = []
    for c, s in zip(rng.permutation(9)[: len(sizes)], sizes, strict=False):
        s = min(s, cell)
        x0, y0 = int(c % 3) * cell, int(c // 3) * cell
        out.append(
            (x0 + int(rng.integers(0, cell - s + 1)), y0 + int(rng.integers(0, cell - s + 1)), s)
        )
    return out


def render_image(
    class_index: int,
    n_classes: int = 10,
    seed: int = 0,
    size: int = IMAGE_SIZE,
    parts: tuple[int, ...] | None = None,
    distractors: tuple[int, ...] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One image of a class: (uint8 H x W x 3, int16 H x W part-id mask, -1 = background).

    Deterministic for (class_index, seed); parts are about 30-45 px at size 128 (scaled with size).
    `parts` replaces the class's own parts and `distractors` the shared ones (a changed world:
    what a model is fine-tuned on, or a probe data set); the defaults give the standard images.
    """
    own = class_parts(class_index, n_classes) if parts is None else tuple(parts)
    rng = np.random.default_rng([seed, class_index, 0x70C])
    n_distract = int(rng.integers(1, 3)) if len(own) <= 2 else 1
    pool = (
        DISTRACTOR_PARTS if distractors is None else tuple(d for d in distractors if d not in own)
    )
    distract = [int(d) for d in rng.choice(pool, n_distract, replace=False)]
    parts = list(own) + distract
    lo, hi = (30, 45) if len(parts) <= 4 else (28, 36)
    sizes = [max(4, round(int(rng.integers(lo, hi + 1)) * size / IMAGE_SIZE)) for _ in parts]
    order = np.argsort(sizes)[::-1]  # place the largest first
    boxes = _layout(rng, [sizes[i] for i in order], size)

    base = rng.uniform(0.35, 0.6) + rng.normal(0, 0.03, 3)
    img = base + _smooth_noise(rng, size, 4, 0.06)
    mask = np.full((size, size), -1, dtype=np.int16)
    for i, (x, y, s) in zip(order, boxes, strict=True):
        pid = parts[i]
        angle = math.radians(rng.uniform(-20, 20))
        sil = _shape_mask(PARTS[pid].shape, s, angle)
        colour = _fill(PARTS[pid], s, angle, rng) * rng.uniform(0.88, 1.08)
        region = img[y : y + s, x : x + s]
        region[sil] = colour[sil]
        mask[y : y + s, x : x + s][sil] = pid
    img = img + rng.normal(0, 0.02, img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), mask


# ---- the data set on any fsspec URL -----------------------------------------------------------


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    """PNG bytes of a part-id mask: part id + 1 per pixel, 0 = background (8-bit, or 16-bit if
    needed)."""
    shifted = mask.astype(np.int32) + 1
    dtype = np.uint8 if len(PARTS) < 255 else np.uint16
    return _png(shifted.astype(dtype))


def read_mask(url: str, storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """The int16 part-id mask stored at url (-1 = background), as render_image returned it."""
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb") as f, Image.open(f) as im:
        return (np.asarray(im).astype(np.int32) - 1).astype(np.int16)


def toy_manifest(n_classes: int, n_per_class: int, seed: int) -> dict[str, Any]:
    """The toy.json content: parts, class recipes, seeds and the mask encoding."""
    return {
        "seed": seed,
        "n_classes": n_classes,
        "n_per_class": n_per_class,
        "image_size": IMAGE_SIZE,
        "image_seeds": "image i of every class is "
        "render_image(class, n_classes, image_seed(seed, i))",
        "mask_encoding": MASK_ENCODING,
        "parts": [
            {
                "id": i,
                "name": p.name,
                "shape": p.shape,
                "fill": p.fill,
                "kind": "distractor" if i in DISTRACTOR_PARTS else "own",
            }
            for i, p in enumerate(PARTS)
        ],
        "distractors": list(DISTRACTOR_PARTS),
        "classes": [
            {
                "index": c,
                "name": name,
                "parts": list(class_parts(c, n_classes)),
                "part_names": [PART_NAMES[p] for p in class_parts(c, n_classes)],
            }
            for c, name in enumerate(class_names(n_classes))
        ],
    }


def ensure_toy_dataset(
    url: str,
    n_classes: int = 10,
    n_per_class: int = 40,
    seed: int = 0,
    storage_options: dict[str, Any] | None = None,
    recipes: dict[int, tuple[int, ...]] | None = None,
) -> str:
    """Write the toy set under url unless its `_SUCCESS` marker exists; return `<url>/images`.

    Layout: images/<class>/<i:04d>.png, masks/<class>/<i:04d>.png (see MASK_ENCODING), toy.json,
    then _SUCCESS last.
    """
    url = normalize_url(url)
    fs, root = filesystem(url, storage_options)
    images_url = join_url(url, "images")
    marker = posixpath.join(root, SUCCESS)
    if fs.exists(marker):
        return images_url
    for c, name in enumerate(class_names(n_classes)):
        files: dict[str, bytes] = {}
        for kind in ("images", "masks"):
            fs.makedirs(posixpath.join(root, kind, name), exist_ok=True)
        for i in range(n_per_class):
            img, mask = render_image(
                c, n_classes, image_seed(seed, i), parts=(recipes or {}).get(c)
            )
            files[posixpath.join(root, "images", name, f"{i:04d}.png")] = _png(img)
            files[posixpath.join(root, "masks", name, f"{i:04d}.png")] = encode_mask(mask)
        fs.pipe(files)
    manifest = toy_manifest(n_classes, n_per_class, seed)
    for c, parts in (recipes or {}).items():  # a probe data set says which classes it changed
        manifest["classes"][c].update(
            parts=list(parts), part_names=[PART_NAMES[p] for p in parts], changed=True
        )
    manifest = json.dumps(manifest, indent=1).encode()
    fs.pipe_file(posixpath.join(root, "toy.json"), manifest)
    fs.pipe_file(marker, b"")
    return images_url
