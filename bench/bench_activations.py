"""Activation stage: throughput vs a bare torch loop over the same patches, where the time goes,
and peak memory vs images.

    python bench/bench_activations.py [--archs toy,resnet18] [--precisions fp32,bf16] [--images 48]
                                      [--threads N] [--repeats 5] [--memory]

For each architecture and precision, interleaved runs (the machine is noisy) of
  prefetch    the LENS stage: read + decode (a pool two batches ahead) -> patches -> g + h per
              batch, whole images gathered into full batches -> float32 -> Zarr appends (writer
              thread);
  sequential  the same stage reading and decoding in its own thread (prefetch=0; the stage's
              default on CPU when torch's threads take every core);
  bare        a torch loop running g over the same patches already cut and in memory (no I/O,
              no whole images, no h), channels-last, same batch size, same autocast;
ratios are per interleaved triple (bare time / stage time), median over the repeats, best-of
beside. The stage also runs g on one whole image per 16 patches, so 16/17 = 0.94x is its ceiling.
Then: the share of a stage run its main thread waited for decoded images (what a GPU would idle
for), a per-part profile of one instrumented sequential pass (fetch, decode, resize, batching,
patch cutting, whole-image resize, layout, g, h, pooling and copies, Zarr), and with --memory the
peak RSS of the stage for N and 4N images in fresh subprocesses.

toy: the shipped toy CNN on the toy PNGs (128 px, input 64). Torchvision archs (random init):
the toy images re-encoded as 500 x 375 JPEGs (so decoding costs what a photo costs), resized to
224, 64-px patches resized to --input-size (default 112, so that CPU runs stay short).
sim:<ms>: resnet18's data path with g replaced by a stand-in accelerator that takes <ms> of wall
time per input without using the host CPU (it sleeps): whether decoding keeps up with a device.
--threads 1 runs g on one core and leaves the other(s) to the decoders: on a shared 2-core machine
two OpenMP threads were often slower than one (other processes take a core, and the threads wait
on each other), which makes two-thread figures noisy.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _jpegs(urls: list[str], tmp: str) -> list[str]:
    from PIL import Image

    out = []
    for i, url in enumerate(urls):
        with Image.open(url.removeprefix("file://")) as im:
            photo = im.convert("RGB").resize((500, 375), Image.Resampling.BICUBIC)
        path = f"{tmp}/photos/{i:04d}.jpg"
        Path(path).parent.mkdir(exist_ok=True)
        photo.save(path, quality=90)
        out.append(f"file://{path}")
    return out


def _setup(arch: str, images: int, tmp: str, input_size: int, precision: str = "fp32"):
    from lens_core.config import make_config
    from lens_core.data import list_classes, list_images
    from lens_core.models import load_split_model
    from lens_core.toy import ensure_toy_dataset

    url = ensure_toy_dataset(f"file://{tmp}/toy", 2, images, 0)
    urls = list_images(url, list_classes(url)[0])[:images]
    sim_ms = float(arch.split(":")[1]) if arch.startswith("sim:") else None
    if sim_ms is not None:
        arch = "resnet18"
    if arch == "toy":
        model = {"arch": "toy", "precision": precision}
        patches = {"image_size": 128, "batch_size": 64}
    else:
        urls = _jpegs(urls, tmp)
        model = {
            "arch": arch,
            "layer": "layer4",
            "input_size": input_size,
            "precision": precision,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
        }
        patches = {"image_size": 224, "batch_size": 64}
    cfg = make_config({"model": model, "patches": patches, "data": {"url": url}})
    split = load_split_model(cfg.model, 10 if arch == "toy" else 1000).to("cpu")
    if sim_ms is not None:
        import dataclasses

        import torch

        with torch.inference_mode():
            shape = split.g(torch.zeros(1, 3, input_size, input_size)).shape[1:]
        split = dataclasses.replace(split, g=_DeviceSim(sim_ms / 1000, tuple(shape)))
    return cfg, split, urls


def _device_sim():
    import torch

    class DeviceSim(torch.nn.Module):
        """Stands for an accelerator running g: `seconds` of wall time per input without using the
        host's CPU (it sleeps, the GIL released, as a host waiting on a GPU), then zeros."""

        def __init__(self, seconds: float, shape: tuple[int, ...]):
            super().__init__()
            self.seconds, self.shape = seconds, shape

        def forward(self, x):
            time.sleep(self.seconds * len(x))
            return torch.zeros((len(x), *self.shape)).contiguous(memory_format=torch.channels_last)

    return DeviceSim


# a class made lazily (torch imports late), hence its capitalized name
def _DeviceSim(seconds: float, shape: tuple[int, ...]):  # noqa: N802
    return _device_sim()(seconds, shape)


def _ours(cfg, split, urls, tmp: str, prefetch: int | None = None) -> float:
    import zarr

    from lens_core.activations import compute_class_activations

    group = zarr.open_group(f"{tmp}/bench-{time.time_ns()}.zarr", mode="w")
    t0 = time.perf_counter()
    compute_class_activations(
        split,
        0,
        urls,
        group,
        cfg.patches,
        spatial_images=0,
        precision=cfg.model.precision,
        prefetch=prefetch,
    )
    return time.perf_counter() - t0


def _patches(cfg, split, urls):
    import torch

    from lens_core.data import extract_patches, patch_boxes, read_image

    boxes = patch_boxes(cfg.patches.image_size, cfg.patches.fraction, cfg.patches.grid)
    imgs = torch.stack([read_image(u, None, cfg.patches.image_size) for u in urls])
    return extract_patches(imgs, boxes, split.input_size).contiguous(
        memory_format=torch.channels_last
    )


def _bare(cfg, split, patches) -> float:
    from lens_core.device import inference

    bs = cfg.patches.batch_size
    dev = patches.device
    t0 = time.perf_counter()
    with inference(dev, cfg.model.precision):
        for i in range(0, len(patches), bs):
            split.g(patches[i : i + bs]).float().mean(dim=(2, 3)).numpy()
    return time.perf_counter() - t0


def _waiting(cfg, split, urls, tmp: str, prefetch: int | None) -> float:
    """Share of one stage run that its main thread (the one driving g) spent waiting for decoded
    images: what a GPU would sit idle for, waiting on JPEGs."""
    from lens_core import activations

    real = activations._batches
    waited = [0.0]

    def timed(stream, size):
        batches = real(stream, size)
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            waited[0] += time.perf_counter() - t0
            if batch is None:
                return
            yield batch

    activations._batches = timed
    try:
        total = _ours(cfg, split, urls, tmp, prefetch)
    finally:
        activations._batches = real
    return waited[0] / total


def _profile(cfg, split, urls, tmp: str) -> dict[str, float]:
    """Seconds per part of one sequential pass that does what the stage does, timed part by part."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    import zarr

    from lens_core.activations import _Appender, pool
    from lens_core.data import decode_image, extract_patches, patch_boxes, resize_square
    from lens_core.data.reader import _fetch
    from lens_core.device import inference

    boxes = patch_boxes(cfg.patches.image_size, cfg.patches.fraction, cfg.patches.grid)
    per_batch = max(1, cfg.patches.batch_size // len(boxes))
    size = cfg.patches.image_size
    parts: dict[str, float] = defaultdict(float)
    clock = [time.perf_counter()]

    def tick(name: str) -> None:
        now = time.perf_counter()
        parts[name] += now - clock[0]
        clock[0] = now

    out = _Appender(zarr.open_group(f"{tmp}/profile-{time.time_ns()}.zarr", mode="w"))
    cpu = torch.device("cpu")
    wholes: list = []

    def run_wholes() -> None:
        x = torch.cat(wholes).contiguous(memory_format=torch.channels_last)
        wholes.clear()
        tick("channels-last batch")
        with inference(cpu, cfg.model.precision):
            acts = split.g(x)
            logits = split.h(acts).float()
        tick("g + h (whole images)")
        for name, block in (
            ("image_A", pool(acts.float()).numpy()),
            ("image_logit", logits[:, 0].numpy()),
            ("image_pred", logits.argmax(1).numpy().astype(np.int32)),
        ):
            out.add(name, block)
        tick("Zarr appends")

    start = clock[0] = time.perf_counter()
    for s in range(0, len(urls), per_batch):
        batch = []
        for url in urls[s : s + per_batch]:
            data = _fetch(url, None)
            tick("fetch (file bytes)")
            image = decode_image(data, url, size)
            tick("decode (PIL, to float)")
            batch.append(resize_square(image, size))
            tick("resize to image_size")
        images = torch.stack(batch)
        tick("stack batch")
        crops = extract_patches(images, boxes, split.input_size)
        tick("cut + resize patches")
        x = crops.contiguous(memory_format=torch.channels_last)
        tick("channels-last batch")
        with inference(cpu, cfg.model.precision):
            acts = split.g(x)
            tick("g (patches)")
            logits = split.h(acts).float()
            tick("h (patches)")
        A = pool(acts.float()).numpy()
        tick("pool, float32, numpy")
        for name, block in (
            ("A", A),
            ("patches", np.zeros((len(A), 5), np.int32)),
            ("patch_logit", logits[:, 0].numpy()),
            ("patch_pred", logits.argmax(1).numpy().astype(np.int32)),
        ):
            out.add(name, block)
        tick("Zarr appends")
        wholes.append(
            F.interpolate(
                images, size=split.input_size, mode="bilinear", antialias=True, align_corners=False
            )
        )
        tick("resize whole images")
        if sum(len(w) for w in wholes) >= cfg.patches.batch_size:
            run_wholes()
    if wholes:
        run_wholes()
    out.close()
    tick("Zarr appends")
    parts["total"] = time.perf_counter() - start
    return dict(parts)


def _peak_child(arch: str, images: int, input_size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg, split, urls = _setup(arch, images, tmp, input_size)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        _ours(cfg, split, urls, tmp)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {"images": images, "peak_mb": after / 1024, "growth_mb": (after - before) / 1024}
        )
    )


def _measure(arch: str, precision: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg, split, urls = _setup(arch, args.images, tmp, args.input_size, precision)
        patches = _patches(cfg, split, urls)
        ahead = 2 * max(1, cfg.patches.batch_size // cfg.patches.grid**2)
        _bare(cfg, split, patches[:64])  # warm-up
        _ours(cfg, split, urls[:4], tmp)
        runs = defaultdict(list)
        for _ in range(args.repeats):  # interleaved: each ratio compares runs made seconds apart
            runs["bare"].append(_bare(cfg, split, patches))
            runs["prefetch"].append(_ours(cfg, split, urls, tmp, prefetch=ahead))
            runs["sequential"].append(_ours(cfg, split, urls, tmp, prefetch=0))
            runs["bare2"].append(_bare(cfg, split, patches))
        profile = _profile(cfg, split, urls, tmp)
        waits = {
            name: _waiting(cfg, split, urls, tmp, prefetch)
            for name, prefetch in (("prefetch", ahead), ("sequential", 0))
        }
    bare = [(a + b) / 2 for a, b in zip(runs["bare"], runs["bare2"], strict=True)]
    n = len(patches)
    row = {
        "arch": arch,
        "precision": precision,
        "images": len(urls),
        "patches": n,
        "bare_pps": n / min(bare),
        "profile": profile,
        "waits": waits,
    }
    for name in ("prefetch", "sequential"):
        row[f"{name}_pps"] = n / min(runs[name])
        row[f"{name}_ratio"] = statistics.median(
            b / o for b, o in zip(bare, runs[name], strict=True)
        )
        row[f"{name}_best_ratio"] = min(bare) / min(runs[name])
    return row


def _decoders() -> int:
    from lens_core.data import decode_workers

    return decode_workers()


def _print_profile(row: dict) -> None:
    prof = dict(row["profile"])
    total = prof.pop("total")
    print(
        f"\nprofile: {row['arch']} {row['precision']}, "
        f"one sequential pass of {row['images']} images "
        f"({total:.2f} s)"
    )
    print(f"  {'part':26s} {'ms/image':>9s} {'share':>7s}")
    for name, sec in sorted(prof.items(), key=lambda kv: -kv[1]):
        print(f"  {name:26s} {1000 * sec / row['images']:9.2f} {100 * sec / total:6.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="toy,resnet18")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--input-size", type=int, default=112, help="model input of torchvision archs")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default); 1 = g on one core, decoding on the others",
    )
    ap.add_argument(
        "--memory", action="store_true", help="also measure peak RSS for N and 4N images"
    )
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--arch", default="toy", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _peak_child(args.arch, args.child, args.input_size)
        return
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}, decoder threads: {_decoders()}")
    rows = [
        _measure(arch, prec, args)
        for arch in args.archs.split(",")
        for prec in args.precisions.split(",")
    ]
    for row in rows:
        _print_profile(row)
    from lens_core.activations import _default_prefetch

    default = "prefetch" if _default_prefetch(torch.device("cpu"), 1) else "sequential"
    print(
        "\nactivation stage vs bare g loop over the same "
        f"patches (median of {args.repeats} interleaved "
        f"ratios; best-of in brackets; goal >= 0.9x). The stage's default here: {default}"
    )
    print(
        f"  {'arch':10s} {'prec':5s} {'patches':>7s} "
        f"{'bare p/s':>9s} {'stage p/s':>9s} {'prefetch/bare':>15s} "
        f"{'sequential/bare':>16s} {'waiting for images: prefetch, sequential':>42s}"
    )
    for r in rows:
        print(
            f"  {r['arch']:10s} {r['precision']:5s} {r['patches']:7d} {r['bare_pps']:9.1f} "
            f"{r[default + '_pps']:9.1f} {r['prefetch_ratio']:6.2f}x "
            f"({r['prefetch_best_ratio']:.2f}x) "
            f"{r['sequential_ratio']:7.2f}x ({r['sequential_best_ratio']:.2f}x) "
            f"{100 * r['waits']['prefetch']:28.1f}% {100 * r['waits']['sequential']:11.1f}%"
        )
    if args.memory:
        arch = args.archs.split(",")[0]
        peaks = []
        for n in (args.images, 4 * args.images):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--arch",
                    arch,
                    "--child",
                    str(n),
                    "--input-size",
                    str(args.input_size),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            peaks.append(json.loads(out.stdout.strip().splitlines()[-1]))
        for p in peaks:
            print(
                f"  peak RSS with {p['images']:4d} images: {p['peak_mb']:7.1f} "
                f"MB (stage grew it by {p['growth_mb']:.1f} MB)"
            )
        print(
            "  peak ratio 4x/1x images: "
            f"{peaks[1]['peak_mb'] / peaks[0]['peak_mb']:.3f} (goal: ~1.0)"
        )


if __name__ == "__main__":
    main()
