"""Benchmark the site builder: 1,000 synthetic classes (tiny images) to a temporary folder.

Prints seconds per 100 class pages, the largest class page, and two ratios measured in the same
run: writing vs rendering only (the templates without I/O), and per-page time at N vs N/10 classes
(linearity).  Usage: python bench/bench_site.py [--classes 1000] [--no-assets]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from site_fixtures import make_site  # noqa: E402

from lens_core.site import build_site, iter_class_files, normalize_site  # noqa: E402


def build(n: int, with_assets: bool, out: Path) -> dict:
    site, assets = make_site(n_classes=n, image_size=8, distinct_images=False)
    summary = build_site(site, str(out), None, assets if with_assets else {})
    summary["n_assets"] = len(assets) if with_assets else 0
    return summary


def render_only(n: int) -> float:
    """Seconds to render every class page and data file of n classes, writing nothing."""
    site, _ = make_site(n_classes=n, image_size=8, distinct_images=False)
    data = normalize_site(site)
    t = time.perf_counter()
    for _ in iter_class_files(data):
        pass
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--no-assets", action="store_true", help="pages and data only, no image copies")
    args = ap.parse_args()
    n, small = args.classes, max(args.classes // 10, 10)
    with tempfile.TemporaryDirectory(prefix="lens-bench-site-") as tmp:
        render_only(small)  # warm the template cache
        t_render = render_only(n)
        big = build(n, not args.no_assets, Path(tmp) / "big")
        little = build(small, not args.no_assets, Path(tmp) / "small")
    per100 = 100 * big["seconds"]["classes"] / n
    per100_small = 100 * little["seconds"]["classes"] / small
    render100 = 100 * t_render / n
    print(
        f"classes: {n}  files written: {big['files']}  "
        f"({big['n_assets']} assets)  bytes: {big['bytes'] / 1e6:.1f} MB"
    )
    print(
        f"total build: {big['seconds']['total']:.2f} s  (assets {big['seconds']['assets']:.2f} s, "
        f"class pages+data {big['seconds']['classes']:.2f} s, method+list+index "
        f"{big['seconds']['index']:.2f} s)"
    )
    print(f"seconds per 100 class pages (render + write page and data file): {per100:.3f}")
    print(
        f"max class-page HTML: {big['max_class_page_bytes'] / 1000:.1f} KB   index.html: "
        f"{big['index_bytes'] / 1000:.1f} KB"
    )
    print(
        f"baseline, render only (no I/O): {render100:.3f} s per "
        f"100 pages -> write/render ratio {per100 / render100:.2f}"
    )
    print(
        f"baseline, {small} classes: {per100_small:.3f} s per 100 pages -> linearity ratio ({n} vs "
        f"{small}) {per100 / per100_small:.2f}"
    )


if __name__ == "__main__":
    main()
