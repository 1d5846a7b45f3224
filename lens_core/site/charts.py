"""Geometry for the inline SVG charts (numbers only; the templates draw them)."""

from __future__ import annotations

import math
import posixpath
from collections.abc import Sequence

PALETTE_SIZE = 10
OTHER = "o"


def _f(v: float) -> str:
    """Compact coordinate: one decimal, no trailing '.0'."""
    s = f"{v:.1f}"
    return s[:-2] if s.endswith(".0") else s


def _scaler(values: Sequence[float], lo: float, hi: float):
    vmin, vmax = (min(values), max(values)) if values else (0.0, 1.0)
    span = vmax - vmin or 1.0
    mid = (lo + hi) / 2
    if vmax == vmin:
        return lambda _v: mid
    return lambda v: lo + (v - vmin) / span * (hi - lo)


def cluster_chart(
    points: list[dict],
    colour: dict[int, int],
    prefix: str,
    width: int = 480,
    height: int = 300,
    pad: int = 10,
) -> dict:
    """Scatter grouped by concept colour; `images` follows the dots' order in the paths.

    Image paths share their folder as `base` (with the page's relative `prefix`) to keep pages
    small.
    """
    sx = _scaler([p["x"] for p in points], pad, width - pad)
    sy = _scaler([p["y"] for p in points], height - pad, pad)
    groups: dict[str, dict] = {}
    order: list[dict] = []
    for p in points:
        k = colour.get(p["concept"], OTHER) if p["concept"] is not None else OTHER
        key = str(k)
        if key not in groups:
            groups[key] = {
                "k": key,
                "concept": p["concept"] if k != OTHER else None,
                "circles": [],
                "points": [],
            }
            order.append(groups[key])
        groups[key]["circles"].append((_f(sx(p["x"])), _f(sy(p["y"]))))
        groups[key]["points"].append(p)
    order.sort(key=lambda g: (g["k"] == OTHER, int(g["k"]) if g["k"] != OTHER else 0))
    for g in order:  # one path per colour, a round zero-length segment per dot: a few bytes a point
        g["d"] = "".join(f"M{x} {y}h0" for x, y in g.pop("circles"))
    flat = [p for g in order for p in g.pop("points")]
    paths = [p["image"] or "" for p in flat]
    dirs = {posixpath.dirname(p) for p in paths if p}
    base = dirs.pop() + "/" if len(dirs) == 1 else ""
    images = [p[len(base) :] if p else "" for p in paths]
    concepts = [p["concept"] for p in flat]
    return {
        "width": width,
        "height": height,
        "groups": order,
        "data": {"base": prefix + base, "images": images, "concepts": concepts},
    }


def layout_chart(
    layout: list[dict],
    shares: dict[int, float | None],
    colour: dict[int, int],
    width: int = 320,
    height: int = 240,
    pad: int = 28,
) -> list[dict]:
    """Concept-similarity map: one node per concept, radius by the size of its share (a concept
    that argues against the class is as big as its share and marked `against`), same colours."""
    sx = _scaler([p["x"] for p in layout], pad, width - pad)
    sy = _scaler([p["y"] for p in layout], height - pad, pad)
    top = max([abs(s) for s in shares.values() if s] or [1.0])
    nodes = []
    for p in layout:
        share = shares.get(p["concept"]) or 0.0
        nodes.append(
            {
                "concept": p["concept"],
                "x": _f(sx(p["x"])),
                "y": _f(sy(p["y"])),
                "r": _f(6 + 16 * math.sqrt(abs(share) / top)),
                "k": colour.get(p["concept"], OTHER),
                "in_top": p["concept"] in colour,
                "against": share < 0,
            }
        )
    return nodes


def line_chart(
    curve: list[float],
    random_curve: list[float],
    width: int = 360,
    height: int = 200,
    pad: int = 30,
) -> dict:
    """Deletion curves as SVG polyline point lists on a shared y-scale (x = fraction deleted)."""
    values = list(curve) + list(random_curve)
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi == lo:
        hi = lo + 1.0

    def pts(ys: list[float]) -> str:
        n = max(len(ys) - 1, 1)
        return " ".join(
            f"{_f(pad + (width - 2 * pad) * i / n)},"
            f"{_f(height - pad - (height - 2 * pad) * (y - lo) / (hi - lo))}"
            for i, y in enumerate(ys)
        )

    return {
        "width": width,
        "height": height,
        "pad": pad,
        "curve": pts(curve),
        "random": pts(random_curve),
        "lo": f"{lo:.2g}",
        "hi": f"{hi:.2g}",
        "x1": width - pad,
        "y1": height - pad,
    }
