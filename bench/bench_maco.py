"""MACO benchmark: batching gain (time per concept for B = 1, 4, 16) and LENS vs Horama 0.3.0.

Both sides use the same model (the shipped toy CNN split at block4), the same concept
directions, image size, steps, crops, crop sizes, noise and magnitude spectrum; final objectives
are evaluated identically (whole image resized to the model input, no augmentation).

    .venv/bin/python bench/bench_maco.py [--steps 64] [--size 128] [--concepts 16]
        [--threads 1] [--device cpu]

Horama is bench-only: install it beside the venv, never into it:
    .venv/bin/pip install --no-deps --target /tmp/horama_pkg horama==0.3.0
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lens_core import maco  # noqa: E402
from lens_core.config import MacoConfig  # noqa: E402

HORAMA_PATH = os.environ.get("HORAMA_PATH", "/tmp/horama_pkg")


class _Normalize(nn.Module):
    def __init__(self, mean: float, std: float):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def load_subject(device: torch.device) -> tuple[str, nn.Module, int, torch.Tensor]:
    """(name, g, input size, sample images in [0,1]): the shipped toy CNN split at block4."""
    from safetensors.torch import load_file

    from lens_core.toy import TOY_CHECKPOINT, ToyCNN, render_image

    state = load_file(str(TOY_CHECKPOINT))
    n_cls = state["fc.weight"].shape[0]
    model = ToyCNN(num_classes=n_cls)
    model.load_state_dict(state)
    g = nn.Sequential(_Normalize(0.5, 0.25), model.block1, model.block2, model.block3, model.block4)
    imgs = [
        torch.from_numpy(render_image(c % n_cls, n_cls, seed=c, size=128)[0]) for c in range(32)
    ]
    images = torch.stack(imgs).permute(0, 3, 1, 2).float() / 255
    return "toy CNN (block4)", g.eval().requires_grad_(False).to(device), 64, images


def concept_directions(g: nn.Module, images: torch.Tensor, n: int, input_size: int) -> torch.Tensor:
    """n non-negative directions:
    NMF-like parts from per-image pooled activations (excess over mean)."""
    x = torch.nn.functional.interpolate(images, size=input_size, mode="bilinear", antialias=True)
    dev = next(g.parameters()).device
    with torch.no_grad():
        acts = maco.pool(g(x.to(dev))).cpu()
    reps = acts[torch.arange(n) % len(acts)]
    return (reps - acts.mean(0)).clamp(min=0) + 1e-3


REPEATS = 3  # each timing is the best of this many runs (the machine is shared)


def timed(
    fn: Callable[[], object], device: torch.device, repeats: int = REPEATS
) -> tuple[float, object]:
    """(best wall time of `repeats` runs, last output)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, out


def import_horama():
    """horama 0.3.0 from HORAMA_PATH; matplotlib (used only by its plots module) is stubbed."""
    sys.path.insert(0, HORAMA_PATH)
    for name in ("matplotlib", "matplotlib.pyplot"):
        sys.modules.setdefault(name, types.ModuleType(name))
    import horama.maco_fv as hm

    hm.tqdm = lambda iterable, **_: iterable  # no progress bar in the table
    return hm


# magnitude is unused: Horama reads the spectrum from its file
def horama_render(hm, g, direction, cfg: MacoConfig, magnitude, input_size, device, seed):  # noqa: ARG001
    """One concept with horama.maco, reading our spectrum file from a temp cwd (no download)."""
    lo, hi = cfg.value_range
    c_lo, c_hi = cfg.crop_range
    w = direction.to(device)

    def objective_fn(images: torch.Tensor) -> torch.Tensor:
        # Horama feeds standardized values in value_range; g takes [0,1]: same affine map as LENS.
        acts = maco.pool(g((images - lo) / (hi - lo)))
        return maco.objective(acts, w, cfg.objective, cfg.cossim_power).mean()

    torch.manual_seed(seed)
    image, alpha = hm.maco(
        objective_fn,
        total_steps=cfg.steps,
        learning_rate=cfg.lr,
        image_size=cfg.image_size,
        model_input_size=input_size,
        noise=cfg.noise,
        values_range=cfg.value_range,
        crops_per_iteration=cfg.crops,
        # Horama draws a side of U(box[1], 2*box[1]-box[0]): this box gives U(crop_range).
        box_size=(2 * c_lo - c_hi, c_lo),
        device=str(device),
    )
    return ((image.detach() - lo) / (hi - lo)).clamp(0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--crops", type=int, default=4)
    ap.add_argument("--concepts", type=int, default=16, help="concepts in the Horama comparison")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-horama", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name, g, input_size, images = load_subject(device)
    cfg = MacoConfig(steps=args.steps, image_size=args.size, crops=args.crops, batch_size=64)
    magnitude = maco.estimate_magnitude([images], args.size)
    batches = [int(b) for b in args.batches.split(",")]
    dirs = concept_directions(g, images, max(batches + [args.concepts]), input_size)
    print(
        f"model: {name}, input {input_size}px; image {args.size}px, {args.steps} steps, "
        f"{args.crops} crops, device {device}, {args.threads} thread(s)"
    )

    # warm-up (allocator, oneDNN kernels)
    maco.render_concepts(
        g, dirs[:2], cfg.model_copy(update={"steps": 2}), magnitude, [0, 1], input_size, device
    )

    print("\n| batch B | s / concept | vs B=1 |")
    print("|---|---|---|")
    per_concept = {}
    for b in batches:
        dt, _ = timed(
            lambda b=b: maco.render_concepts(
                g, dirs[:b], cfg, magnitude, list(range(b)), input_size, device
            ),
            device,
        )
        per_concept[b] = dt / b
        print(f"| {b} | {per_concept[b]:.3f} | {per_concept[batches[0]] / per_concept[b]:.2f}x |")

    if args.no_horama:
        return
    hm = import_horama()
    k = args.concepts
    seeds = list(range(k))
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)  # Horama reads ./spectrum_decorrelated.npy (downloads it when missing)
        try:
            np.save(hm.MACO_SPECTRUM_FILENAME, magnitude.numpy())
            runs = [
                timed(
                    lambda i=i: horama_render(
                        hm, g, dirs[i], cfg, magnitude, input_size, device, i
                    ),
                    device,
                    1,
                )
                for i in seeds
            ]
        finally:
            os.chdir(cwd)
    eval_dirs = dirs[:k].to(device)
    obj_h = maco.evaluate_images(
        g, torch.stack([im for _, im in runs]).to(device), eval_dirs, input_size
    ).cpu()
    t_h = sum(t for t, _ in runs) / k
    ones = [
        timed(
            lambda i=i: maco.render_concepts(
                g, dirs[i : i + 1], cfg, magnitude, [i], input_size, device
            ),
            device,
            1,
        )
        for i in seeds
    ]
    t_b, batch = timed(
        lambda: maco.render_concepts(g, dirs[:k], cfg, magnitude, seeds, input_size, device),
        device,
        1,
    )
    rand = maco.random_phase_images(magnitude, seeds, args.size, device)
    rows = [
        ("Horama 0.3.0, one by one", t_h, obj_h),
        (
            "LENS, one by one (B=1)",
            sum(t for t, _ in ones) / k,
            torch.cat([r.objective for _, r in ones]),
        ),
        (f"LENS, batched (B={k})", t_b / k, batch.objective),
        (
            "random phase, no optimization",
            float("nan"),
            maco.evaluate_images(g, rand, eval_dirs, input_size).cpu(),
        ),
    ]
    print(
        f"\n{k} concepts (one run each), same model / directions "
        f"/ spectrum / {args.steps} steps / {args.size}px"
    )
    print(
        "| method | s / concept | speed vs Horama | mean objective | vs Horama | geo-mean "
        "objective | vs Horama | worst |"
    )
    print("|---|---|---|---|---|---|---|---|")
    geo = lambda o: float(o.clamp_min(1e-6).log().mean().exp())  # noqa: E731
    for label, t, obj in rows:
        speed = f"{t_h / t:.2f}x" if t == t else "-"
        print(
            f"| {label} | {t:.3f} | {speed} | {obj.mean():.3f} "
            f"| {obj.mean() / obj_h.mean():.2f}x | "
            f"{geo(obj):.3f} | {geo(obj) / geo(obj_h):.2f}x | {obj.min():.3f} |"
        )
    print(
        "Objectives differ in their random starts (Horama "
        "draws from torch's global RNG), so compare "
        "means over concepts, not concept by concept."
    )


if __name__ == "__main__":
    main()
