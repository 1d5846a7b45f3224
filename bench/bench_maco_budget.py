"""MACO budget study: the objective against steps and crops per step, early stopping on a plateau.

    # toy + resnet18, CPU, ~30 min
    .venv/bin/python bench/bench_maco_budget.py
    # a quick look
    .venv/bin/python bench/bench_maco_budget.py --models toy --crops 2,4 --steps 256
    # tables of a saved run
    .venv/bin/python bench/bench_maco_budget.py --report bench/out/maco_budget.json

docs/performance.md quotes `--models toy --k 3` and `--models resnet18 --k 2` (one thread each, side
by side: 7 and 13 minutes on the shared 2-core machine).

Subjects (both split by lens_core.models exactly as a run splits them, channels_last):
  toy       the shipped, trained toy CNN at block4, input 64 px;
  resnet18  torchvision resnet18 with weights=None (seeded random init: no pretrained weights can be
            fetched here) at layer4, ImageNet normalization, input reduced to 64 px (224 natively).
Concept directions are real CRAFT concepts: NMF (lens_core.factorize, k per class) of the pooled
activations of 16 CRAFT patches of each toy image (two toy classes, 16 images each, patches cut and
resized as the activation stage does); the top crops of a concept are its 10 patches of largest U.
Renders are 128 px (reduced from 512) with the default crop range, noise and lr; the magnitude
spectrum is that of the toy images. Everything else is `lens_core.maco.render_concepts`.

One 1000-step run per crops value gives the whole steps column: lr is constant and the random
draws of step t do not depend on the total, so the image after t steps of a 1000-step run is the
image of a t-step run (only the transparency map differs). Snapshots every 16 steps are evaluated
unaugmented (`maco.evaluate_images`, fp32). Reported per setting (mean over concepts):
  objective / ref  the concept's objective over its objective at the reference (1000 steps at the
                   largest crops value), then the mean (and the worst concept);
  viz / top crops  the concept activation (pooled activation . unit direction) of the render over
                   the mean activation of the concept's top-10 crops: how far the render drives the
                   concept beyond the data's strongest patches (1.0 = as much as they do).
Cost = steps x crops (forward+backward passes of g per concept). The cheapest setting reaching 95%
of the reference is named. Early stopping on a plateau of each concept's objective (stop when the
mean of its last `window` steps gains less than `tol` over the `window` before) is replayed on the
recorded per-step objective for a grid of (window, tol). Measured with a real run of an earlier
version (a concept that stopped handed its batch row to the next): 3.6x fewer steps than 1000 at
0.981 of the objective, no better than a fixed 256-step budget (0.990): not kept in lens_core.

Nothing here is asserted: the numbers are printed and saved (bench/out/maco_budget.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lens_core import maco  # noqa: E402
from lens_core.config import MacoConfig, ModelConfig, PatchConfig  # noqa: E402

STEPS = (64, 128, 256, 512, 1000)
TOP_CROPS = 10
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def model_config(name: str, input_size: int) -> ModelConfig:
    if name == "toy":
        return ModelConfig()  # shipped weights, block4, input 64
    return ModelConfig(arch=name, layer="layer4", input_size=input_size, **IMAGENET)


def subject(
    name: str, input_size: int, per_class: int, classes: int, k: int, device: torch.device
) -> dict[str, Any]:
    """g, input size, toy images, NMF concept directions and their top crops' activations."""
    from lens_core.data import extract_patches, patch_boxes
    from lens_core.factorize import nmf
    from lens_core.models import load_split_model
    from lens_core.toy import render_image

    mcfg = model_config(name, input_size)
    split = load_split_model(mcfg, 10).to(device)
    g = split.g
    pcfg = PatchConfig()
    boxes = patch_boxes(pcfg.image_size, pcfg.fraction, pcfg.grid)
    all_images, dirs, top_act = [], [], []
    for cls in range(classes):
        imgs = [
            torch.from_numpy(render_image(cls, 10, seed=s, size=pcfg.image_size)[0])
            for s in range(per_class)
        ]
        images = torch.stack(imgs).permute(0, 3, 1, 2).float() / 255
        all_images.append(images)
        patches = extract_patches(images, boxes, split.input_size).to(device)
        with torch.no_grad():
            A = maco.pool(g(patches.contiguous(memory_format=torch.channels_last))).float().cpu()
        res = nmf(A.numpy(), k, solver="torch", max_iter=500)
        for j in range(k):
            w = torch.from_numpy(res.W[j]).float()
            top = torch.from_numpy(res.U[:, j]).topk(TOP_CROPS).indices
            dirs.append(w)
            top_act.append(float((A[top] @ F.normalize(w, dim=0)).mean()))
    return {
        "name": name,
        "g": g,
        "input_size": split.input_size,
        "images": torch.cat(all_images),
        "directions": torch.stack(dirs),
        "top_act": torch.tensor(top_act),
    }


def concept_activation(
    g, images: torch.Tensor, directions: torch.Tensor, input_size: int
) -> torch.Tensor:
    """Pooled activation of whole images (resized to the input) on each concept's unit direction."""
    x = F.interpolate(
        images, size=(input_size, input_size), mode="bilinear", align_corners=False, antialias=True
    )
    with torch.no_grad():
        acts = maco.pool(g(x)).float()
    return (acts * F.normalize(directions.to(acts.device), dim=1)).sum(1).cpu()


def run_setting(
    sub: dict[str, Any],
    cfg: MacoConfig,
    magnitude: torch.Tensor,
    every: int,
    device: torch.device,
    precision: str,
) -> dict[str, Any]:
    """One render of every concept with snapshots: per-step history,
    snapshot objective/activation."""
    dirs, n = sub["directions"], len(sub["directions"])
    marks = sorted(set(range(every, cfg.steps + 1, every)) | {s for s in STEPS if s <= cfg.steps})
    snap_obj = {t: [float("nan")] * n for t in marks}
    snap_act = {t: [float("nan")] * n for t in marks}

    def on_snapshot(t: int, concepts: list[int], images: torch.Tensor) -> None:
        d = dirs[concepts].to(images.device)
        obj = maco.evaluate_images(
            sub["g"], images, d, sub["input_size"], cfg.objective, cfg.cossim_power
        ).cpu()
        act = concept_activation(sub["g"], images, dirs[concepts], sub["input_size"])
        for i, c in enumerate(concepts):
            snap_obj[t][c], snap_act[t][c] = float(obj[i]), float(act[i])

    t0 = time.perf_counter()
    res = maco.render_concepts(
        sub["g"],
        dirs,
        cfg,
        magnitude,
        list(range(n)),
        sub["input_size"],
        device,
        precision=precision,
        snapshot_steps=marks,
        on_snapshot=on_snapshot,
    )
    seconds = time.perf_counter() - t0
    start = maco.evaluate_images(
        sub["g"],
        maco.random_phase_images(magnitude, list(range(n)), cfg.image_size, device),
        dirs.to(device),
        sub["input_size"],
    ).cpu()
    return {
        "crops": cfg.crops,
        "steps": cfg.steps,
        "seconds": seconds,
        "history": res.history.T.tolist(),
        "final": res.objective.tolist(),
        "start": start.tolist(),
        "snap_obj": {str(t): v for t, v in snap_obj.items()},
        "snap_act": {str(t): v for t, v in snap_act.items()},
    }


# ---------------------------------------------------------------- analysis


def _obj_at(run: dict[str, Any], t: int) -> np.ndarray:
    return np.array(run["snap_obj"][str(t)], dtype=float)


def steps_table(model: dict[str, Any]) -> tuple[list[list[Any]], dict[str, Any]]:
    """Rows (crops, steps, cost, mean obj/ref, worst, viz/top crops)
    and the cheapest setting >= 95%."""
    runs = sorted(model["runs"], key=lambda r: r["crops"])
    ref_run = runs[-1]
    ref = _obj_at(ref_run, ref_run["steps"])
    top = np.array(model["top_act"], dtype=float)
    rows, best = [], None
    for run in runs:
        for t in STEPS:
            if str(t) not in run["snap_obj"]:
                continue
            ratio = _obj_at(run, t) / ref
            agree = np.array(run["snap_act"][str(t)], dtype=float) / top
            cost = t * run["crops"]
            rows.append(
                [
                    run["crops"],
                    t,
                    cost,
                    float(ratio.mean()),
                    float(ratio.min()),
                    float(agree.mean()),
                ]
            )
            if ratio.mean() >= 0.95 and (best is None or cost < best["cost"]):
                best = {
                    "crops": run["crops"],
                    "steps": t,
                    "cost": cost,
                    "ratio": float(ratio.mean()),
                    "worst": float(ratio.min()),
                }
    start = np.array(ref_run["start"], dtype=float) / ref
    return rows, {
        "best": best,
        "ref": {"crops": ref_run["crops"], "steps": ref_run["steps"]},
        "random_start": float(start.mean()),
        "ref_cost": ref_run["crops"] * ref_run["steps"],
    }


def plateau_reached(history: torch.Tensor, window: int, tol: float) -> bool:
    """Whether a concept's objective has levelled off: the mean of its last `window` steps gains
    less than `tol` (relative to that mean) over the mean of the `window` steps before them."""
    t = history.shape[0]
    if window <= 0 or t < 2 * window:
        return False
    last = float(history[t - window :].mean())
    prev = float(history[t - 2 * window : t - window].mean())
    return last - prev <= tol * abs(last)


def simulate_plateau(run: dict[str, Any], window: int, tol: float) -> tuple[float, float, float]:
    """(mean steps, mean objective at the stop / at the full run, worst) of plateau rules, replayed
    on the recorded per-step objective; stops land on snapshots (windows are multiples of them)."""
    hist = torch.tensor(run["history"], dtype=torch.float64)
    full = _obj_at(run, run["steps"])
    stops, ratios = [], []
    for c in range(hist.shape[0]):
        stop = run["steps"]
        for t in range(2 * window, run["steps"], window):
            if plateau_reached(hist[c, :t], window, tol):
                stop = t
                break
        stops.append(stop)
        ratios.append(run["snap_obj"][str(stop)][c] / full[c])
    return float(np.mean(stops)), float(np.mean(ratios)), float(np.min(ratios))


def print_table(head: list[str], rows: list[list[Any]]) -> None:
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r) + " |")


def report(data: dict[str, Any]) -> None:
    for model in data["models"]:
        rows, summary = steps_table(model)
        print(
            f"\n## {model['name']} ({model['concepts']} NMF "
            f"concepts, render {data['image_size']} px, "
            f"input {model['input_size']} px, {data['device']}, {data['precision']})\n"
        )
        print_table(
            ["crops", "steps", "cost (passes)", "objective / ref", "worst", "viz / top crops"], rows
        )
        ref = summary["ref"]
        print(
            f"\nreference: {ref['steps']} steps x {ref['crops']} "
            "crops; random phase (step 0) scores "
            f"{summary['random_start']:.3f} of it"
        )
        best = summary["best"]
        if best:
            print(
                "cheapest setting >= 95% of the reference: "
                f"{best['steps']} steps x {best['crops']} crops = "
                f"{best['cost']} passes ({best['ratio']:.3f}, worst concept {best['worst']:.3f}), "
                f"{summary['ref_cost'] / best['cost']:.1f}x cheaper than the reference"
            )
        else:
            print("no setting reaches 95% of the reference below it")
        secs = ", ".join(
            f"{r['crops']} crops {r['seconds'] / model['concepts'] / r['steps'] * 1000:.1f} ms"
            for r in sorted(model["runs"], key=lambda r: r["crops"])
        )
        print(f"time per concept-step ({data['threads']} threads): {secs}")
        sim = []
        for run in sorted(model["runs"], key=lambda r: r["crops"]):
            for window in (16, 32, 64, 128):
                for tol in (0.0, 0.005, 0.01, 0.02):
                    steps, ratio, worst = simulate_plateau(run, window, tol)
                    sim.append(
                        [
                            run["crops"],
                            window,
                            tol,
                            steps,
                            f"{run['steps'] / steps:.2f}x",
                            ratio,
                            worst,
                        ]
                    )
        print(
            "\nEarly stop on a plateau, replayed on the recorded "
            "objective (stop vs the full run of the same crops):\n"
        )
        print_table(
            ["crops", "window", "tol", "mean steps", "steps saved", "objective / full", "worst"],
            sim,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="toy,resnet18")
    ap.add_argument(
        "--crops", default="1,2,4", help="crops per step (the largest is the reference)"
    )
    ap.add_argument(
        "--model-crops", default="", help="per-model override, e.g. resnet18=2,4;toy=1,2"
    )
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--size", type=int, default=128, help="rendered image side")
    ap.add_argument("--input", type=int, default=64, help="torchvision models' input side")
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--per-class", type=int, default=16, help="toy images per class for the NMF")
    ap.add_argument("--k", type=int, default=3, help="NMF concepts per class")
    ap.add_argument("--every", type=int, default=16, help="snapshot every this many steps")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench/out/maco_budget.json"))
    ap.add_argument("--report", help="print the tables of a saved JSON and exit")
    args = ap.parse_args()
    if args.report:
        report(json.loads(Path(args.report).read_text()))
        return
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    overrides = dict(item.split("=") for item in args.model_crops.split(";") if item)
    data: dict[str, Any] = {
        "image_size": args.size,
        "device": str(device),
        "precision": args.precision,
        "threads": args.threads,
        "models": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        sub = subject(name, args.input, args.per_class, args.classes, args.k, device)
        magnitude = maco.estimate_magnitude([sub["images"]], args.size)
        model = {
            "name": name,
            "input_size": sub["input_size"],
            "concepts": len(sub["directions"]),
            "top_act": sub["top_act"].tolist(),
            "runs": [],
        }
        data["models"].append(model)
        crops = [int(c) for c in overrides.get(name, args.crops).split(",")]
        for c in crops:
            cfg = MacoConfig(
                steps=args.steps, image_size=args.size, crops=c, batch_size=len(sub["directions"])
            )
            run = run_setting(sub, cfg, magnitude, args.every, device, args.precision)
            model["runs"].append(run)
            print(f"{name}: crops {c}, {args.steps} steps in {run['seconds']:.0f} s", flush=True)
            out.write_text(json.dumps(data))
    out.write_text(json.dumps(data))
    report(data)
    print(f"\nsaved: {out}")


if __name__ == "__main__":
    main()
