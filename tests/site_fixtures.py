"""Synthetic site data with real small PIL images, for the site tests and bench/bench_site.py."""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable

from PIL import Image, ImageDraw

from lens_core.naming import class_slug, unique_slugs

# (name, synonyms, status, number of concepts): the hostile and edge cases come first
SPECIAL = [
    ("espresso", ["ristretto", "café crème"], "ok", 10),
    ("<script>alert(1)</script>", [], "ok", 10),
    ("../../etc", [], "ok", 4),
    ("tabby cat", ["house cat"], "failed", 0),
    ("great white shark", ["white pointer", "Carcharodon carcharias"], "ok", 12),
    ("tiger shark", [], "ok", 3),
]
FAILED_ERROR = "CUDA out of memory while rendering <b>concept 3</b> & friends"


def image_bytes(seed: int, size: int = 32, fmt: str = "WEBP", alpha: bool = False) -> bytes:
    """A small distinct image: a coloured background with a shape (RGBA with a radial alpha)."""
    rng = random.Random(seed)
    colour = tuple(rng.randrange(40, 230) for _ in range(3))
    img = Image.new("RGB", (size, size), colour)
    draw = ImageDraw.Draw(img)
    a, b = rng.randrange(0, size // 2), rng.randrange(size // 2, size)
    draw.ellipse((a, a, b, b), fill=tuple(255 - c for c in colour))
    if alpha:
        mask = Image.radial_gradient("L").resize((size, size)).point(lambda v: 255 - v)
        img = img.convert("RGBA")
        img.putalpha(mask)
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=70) if fmt != "PNG" else img.save(buf, format="PNG")
    return buf.getvalue()


class _Images:
    """Image bytes per path: distinct images, or a few shared ones (fast, for the bench)."""

    def __init__(self, distinct: bool, size: int):
        self.distinct, self.size, self.cache = distinct, size, {}
        self.assets: dict[str, bytes | Callable[[], bytes]] = {}

    def add(self, path: str, seed: int, fmt: str, alpha: bool = False) -> str:
        key = (seed if self.distinct else seed % 7, fmt, alpha)
        if key not in self.cache:
            self.cache[key] = image_bytes(key[0], self.size, fmt, alpha)
        data = self.cache[key]
        # both kinds of asset
        self.assets[path] = (lambda d=data: d) if len(self.assets) % 2 else data
        return path


def make_site(
    n_classes: int = 6,
    n_concepts: int = 10,
    n_crops: int = 10,
    n_points: int = 200,
    n_thumbs: int = 20,
    image_size: int = 32,
    distinct_images: bool = True,
    seed: int = 0,
) -> tuple[dict, dict[str, bytes | Callable[[], bytes]]]:
    """(site data, assets) for `n_classes` classes; the first six are SPECIAL's edge cases."""
    rng = random.Random(seed)
    specs = []
    for i in range(n_classes):
        if i < len(SPECIAL):
            specs.append(SPECIAL[i])
        else:
            specs.append((f"synthetic class {i:04d}", [f"alias {i:04d}"], "ok", n_concepts))
    ids = [f"n{i:08d}" for i in range(n_classes)]
    slugs = unique_slugs([class_slug(ids[i], s[0], i) for i, s in enumerate(specs)])
    ok = [i for i, s in enumerate(specs) if s[2] == "ok"]
    imgs = _Images(distinct_images, image_size)
    classes = []
    for i, (name, synonyms, status, k) in enumerate(specs):
        slug = slugs[i]
        entry = {
            "index": i,
            "id": ids[i],
            "name": name,
            "slug": slug,
            "synonyms": synonyms,
            "status": status,
            "error": FAILED_ERROR if status == "failed" else None,
            "n_images": 50 + i,
            "n_patches": 800 + 16 * i,
        }
        if status == "failed":
            entry.update(
                concepts=[],
                cluster={"points": []},
                concept_layout=[],
                attributions=[],
                fidelity=None,
            )
            classes.append(entry)
            continue
        weights = [rng.random() ** 2 + 0.01 for _ in range(k)]
        total = sum(weights)
        shares = [round(100 * w / total, 3) for w in weights]
        order = sorted(range(k), key=lambda j: -shares[j])
        concepts = []
        for j in range(k):  # listed by concept id, not by importance: the builder sorts
            base = (i * 100 + j) * 1000
            others = [o for o in ok if o != i] or [i]
            concepts.append(
                {
                    "id": j,
                    "rank": order.index(j),
                    "logit_share": shares[j],
                    "sobol": round(rng.random() * shares[j] / 50, 3),
                    "important": order.index(j) < 3,
                    "n_top_images": rng.randrange(1, 30),
                    "viz": imgs.add(f"assets/viz/{slug}/{j}.png", base, "PNG", alpha=True),
                    "viz_plain": imgs.add(f"assets/viz/{slug}/{j}.webp", base, "WEBP"),
                    "crops": [
                        imgs.add(f"assets/crops/{slug}/{j}_{c}.webp", base + 1 + c, "WEBP")
                        for c in range(n_crops)
                    ],
                    "similar": [
                        {
                            "slug": slugs[o],
                            "name": specs[o][0],
                            "concept": rng.randrange(max(specs[o][3], 1)),
                            "similarity": round(rng.random(), 3),
                        }
                        for o in rng.sample(others, min(3, len(others)))
                    ],
                    "aligned_classes": [
                        {"slug": slugs[o], "name": specs[o][0], "score": round(rng.random(), 3)}
                        for o in ([i] + rng.sample(others, min(4, len(others))))
                    ],
                }
            )
        thumbs = [
            imgs.add(f"assets/thumbs/{slug}/{t}.webp", i * 100_000 + 900 + t, "WEBP")
            for t in range(n_thumbs)
        ]
        centres = [(rng.gauss(0, 3), rng.gauss(0, 3)) for _ in range(k)]
        points = []
        for p in range(n_points):
            c = rng.randrange(k)
            points.append(
                {
                    "x": round(centres[c][0] + rng.gauss(0, 1), 3),
                    "y": round(centres[c][1] + rng.gauss(0, 1), 3),
                    "concept": c,
                    "image": thumbs[p % n_thumbs],
                }
            )
        curve = [math.exp(-4 * t / k) for t in range(k + 1)]
        rnd = [1 - t / k for t in range(k + 1)]
        entry.update(
            concepts=concepts,
            cluster={"points": points},
            concept_layout=[{"concept": j, "x": rng.random(), "y": rng.random()} for j in range(k)],
            attributions=[
                {
                    "image": imgs.add(
                        f"assets/attr/{slug}/{a}.webp", i * 100_000 + 950 + a, "WEBP"
                    ),
                    "heatmap": imgs.add(
                        f"assets/attr/{slug}/{a}_map.png", i * 100_000 + 970 + a, "PNG", alpha=True
                    ),
                    "caption": f"example {a}",
                }
                for a in range(3)
            ],
            fidelity={
                "curve": curve,
                "random_curve": rnd,
                "auc": sum(curve) / len(curve),
                "random_auc": sum(rnd) / len(rnd),
            },
        )
        classes.append(entry)
    run = {
        "run_id": "r0123456789ab",
        "model": "toy-cnn",
        "checkpoint_digest": "sha256:" + "ab" * 32,
        "layer": "block4",
        "data_url": "file:///data/toy/images",
        "created": "2026-11-22T10:00:00Z",
        "n_concepts": n_concepts,
        "config": {"concepts": {"n_concepts": n_concepts}, "storage_options": {"key": "***"}},
    }
    return {"run": run, "classes": classes}, imgs.assets
