"""Activation stage: throughput vs a bare torch loop over the same patches, and peak memory vs images.

    python bench/bench_activations.py [--arch toy|resnet50] [--images 64]

Throughput: our stage (image decoding, patch cutting, g, Zarr appends) against a bare loop that
runs g over the same patches already in memory (no I/O at all), in the same process, same batch.
Memory: the stage runs in fresh subprocesses for N and 4N images; peak RSS should not grow.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _setup(arch: str, images: int, tmp: str):
    from lens_core.config import make_config
    from lens_core.data import list_classes, list_images
    from lens_core.models import load_split_model
    from lens_core.toy import ensure_toy_dataset

    url = ensure_toy_dataset(f"file://{tmp}/toy", 2, images, 0)
    cls = list_classes(url)[0]
    urls = list_images(url, cls)[:images]
    model = {"arch": arch} if arch == "toy" else {"arch": arch, "layer": "layer4", "input_size": 224,
                                                   "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    patches = {"image_size": 128 if arch == "toy" else 224, "batch_size": 64}
    cfg = make_config({"model": model, "patches": patches, "data": {"url": url}})
    split = load_split_model(cfg.model, 10 if arch == "toy" else 1000)
    return cfg, split, cls, urls


def _ours(cfg, split, cls, urls, tmp: str) -> float:
    import zarr

    from lens_core.activations import compute_class_activations

    group = zarr.open_group(f"{tmp}/bench-{time.time_ns()}.zarr", mode="w")
    t0 = time.perf_counter()
    compute_class_activations(split, cls.index, urls, group, cfg.patches, spatial_images=0)
    return time.perf_counter() - t0


def _bare(cfg, split, urls) -> float:
    import torch

    from lens_core.data import extract_patches, patch_boxes, read_image

    boxes = patch_boxes(cfg.patches.image_size, cfg.patches.fraction, cfg.patches.grid)
    imgs = torch.stack([read_image(u, None, cfg.patches.image_size) for u in urls])
    patches = extract_patches(imgs, boxes, split.input_size).contiguous(memory_format=torch.channels_last)
    bs = cfg.patches.batch_size
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(patches), bs):
            split.g(patches[i : i + bs]).mean(dim=(2, 3)).numpy()
    return time.perf_counter() - t0


def _peak_child(arch: str, images: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg, split, cls, urls = _setup(arch, images, tmp)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        _ours(cfg, split, cls, urls, tmp)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"images": images, "peak_mb": after / 1024, "growth_mb": (after - before) / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="toy")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _peak_child(args.arch, args.child)
        return
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        cfg, split, cls, urls = _setup(args.arch, args.images, tmp)
        n_patches = len(urls) * cfg.patches.grid**2
        _bare(cfg, split, urls[:4])  # warm-up
        # interleaved pairs: each ratio compares runs made seconds apart (the machine is noisy)
        pairs = [(_ours(cfg, split, cls, urls, tmp), _bare(cfg, split, urls)) for _ in range(args.repeats)]
        ours = min(o for o, _ in pairs)
        bare = min(b for _, b in pairs)
        pair_ratio = sorted(b / o for o, b in pairs)[len(pairs) // 2]
    print(f"activations ({args.arch}, {len(urls)} images, {n_patches} patches, best of {args.repeats} interleaved)")
    print(f"  ours (decode + patches + g + zarr): {n_patches / ours:8.1f} patches/s")
    print(f"  bare torch loop (g only, in RAM):   {n_patches / bare:8.1f} patches/s")
    print(f"  ratio ours/bare throughput: {bare / ours:.2f}x best-of, {pair_ratio:.2f}x median of "
          f"interleaved pairs  (goal >= 0.9x)")
    peaks = []
    for n in (args.images, 4 * args.images):
        out = subprocess.run([sys.executable, __file__, "--arch", args.arch, "--child", str(n)],
                             capture_output=True, text=True, check=True)
        peaks.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for p in peaks:
        print(f"  peak RSS with {p['images']:4d} images: {p['peak_mb']:7.1f} MB (stage grew it by {p['growth_mb']:.1f} MB)")
    print(f"  peak ratio 4x/1x images: {peaks[1]['peak_mb'] / peaks[0]['peak_mb']:.3f} (goal: ~1.0, no growth beyond the batch)")


if __name__ == "__main__":
    main()
