"""The GPU benchmark behind bench/gpu.sh: activations, MACO (vs Horama), NMF, `lens run` end to end.

    bench/gpu.sh                  # on a GPU machine: at most ~8 minutes on one GPU
    bench/gpu.sh --cpu-smoke      # every part at tiny sizes on the CPU (< 3 minutes): the same
                                  # code paths

Writes <out>/gpu.json (every figure, per part) and <out>/gpu.md (the tables). A part that fails is
recorded under "errors" and the others still run. Baselines are measured in the same run:
  activations  ResNet50 (random init) on synthetic 224-px JPEGs written here: the LENS stage
               (lens_core.activations.compute_class_activations: decode, patches, g, Zarr appends)
               against a bare torch loop over the same patches already on the device, same dtype,
               fp32 and bf16.
  maco         seconds per concept at 512 px and 256 steps for B = 1, 8, 32, 64 concepts per batch
               (bf16), LENS B = 1 in fp32 and Horama 0.3.0 (one by one, fp32; when importable) on
               the same model, directions, spectrum, steps and crops; final objectives evaluated
               alike.
  nmf          lens_core.factorize.nmf(solver="torch") on the device against scikit-learn on the
               CPU, 4,800 x 2,048, k = 10, at equal error (torch stops at sklearn's error).
  e2e          `python -m flows.cli run` (the `lens run` command) on 20 synthetic classes with a
               random-init ResNet50 checkpoint written here, LENS_GPU=1 (one pinned Dask worker per
               GPU; flows.cluster falls back to a plain LocalCluster without dask-cuda); per-class
               stage seconds from the status files, GPU utilisation sampled by nvidia-smi, and the
               extrapolated GPU-hours of 1,000 classes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
PARTS = ("activations", "maco", "nmf", "e2e")

# Sizes of a real run (GPU) and of the smoke run (CPU, tiny, same code paths).
SIZES: dict[str, dict[str, Any]] = {
    "gpu": {
        "input": 224,
        "act_images": 256,
        "act_batch": 256,
        "act_repeats": 3,
        "maco_size": 512,
        "maco_steps": 256,
        "maco_crops": 6,
        "maco_batches": [1, 8, 32, 64],
        "maco_fp32_batches": [1],
        "horama_concepts": 2,
        "nmf_shape": [4800, 2048],
        "nmf_k": 10,
        "e2e_classes": 20,
        "e2e_images": 50,
        "e2e_timeout": 300,
        "e2e_config": {
            "patches": {"image_size": 224, "grid": 4, "batch_size": 256},
            "concepts": {"n_concepts": 10},
            "importance": {"n_designs": 32, "images": 16},
            "crops": {"per_concept": 10, "attribution_images": 3},
            # the budget chosen in docs/performance.md (bench_maco_budget.py): 256 steps x 2 crops
            # at 512 px
            "maco": {
                "steps": 256,
                "crops": 2,
                "image_size": 512,
                "crop_range": [0.25, 0.30],
                "batch_size": 64,
            },
        },
    },
    "cpu-smoke": {
        "input": 32,
        "act_images": 2,
        "act_batch": 16,
        "act_repeats": 1,
        "maco_size": 32,
        "maco_steps": 2,
        "maco_crops": 1,
        "maco_batches": [1, 2],
        "maco_fp32_batches": [1],
        "horama_concepts": 1,
        "nmf_shape": [200, 32],
        "nmf_k": 3,
        "e2e_classes": 2,
        "e2e_images": 2,
        "e2e_timeout": 170,
        "e2e_config": {
            "patches": {"image_size": 32, "grid": 2, "batch_size": 16},
            "concepts": {"n_concepts": 2},
            "importance": {"n_designs": 4, "images": 1},
            "crops": {"per_concept": 1, "attribution_images": 1, "size": 32},
            "maco": {"steps": 1, "crops": 1, "image_size": 32, "batch_size": 4},
        },
    },
}


# ---------------------------------------------------------------- helpers


def sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int = 1) -> tuple[float, Any]:
    """(best wall seconds of `repeats` runs, last output)."""
    best, out = math.inf, None
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


def write_jpegs(folder: Path, class_index: int, n: int, size: int) -> list[str]:
    """n synthetic JPEGs (toy part-based images rendered at `size`) of one class."""
    from PIL import Image

    from lens_core.toy import render_image

    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for i in range(n):
        path = folder / f"img{i:04d}.jpg"
        if not path.exists():
            pixels = render_image(class_index % 10, 10, seed=1000 * class_index + i, size=size)[0]
            Image.fromarray(pixels).save(path, quality=90)
        urls.append(f"file://{path}")
    return urls


_SPLITS: dict[tuple[int, str], Any] = {}


def resnet50_split(input_size: int, device: Any, num_classes: int = 20):
    """ResNet50 (seeded random init) split at layer4 as a run splits it;
    built once per size and device."""
    from lens_core.config import ModelConfig
    from lens_core.models import load_split_model

    key = (input_size, str(device))
    if key not in _SPLITS:
        cfg = ModelConfig(
            arch="resnet50",
            layer="layer4",
            input_size=input_size,
            num_classes=num_classes,
            **IMAGENET,
        )
        _SPLITS[key] = load_split_model(cfg).to(device)
    return _SPLITS[key]


# ---------------------------------------------------------------- parts


def part_activations(s: dict[str, Any], device, tmp: Path) -> dict[str, Any]:
    import torch
    import zarr

    from lens_core.activations import compute_class_activations, pool
    from lens_core.config import PatchConfig
    from lens_core.data import extract_patches, patch_boxes, read_image
    from lens_core.device import inference

    split = resnet50_split(s["input"], device)
    image_size = s["input"]  # CRAFT: 16 patches of 64/224 of a 224-px image
    urls = write_jpegs(tmp / "act-images" / "c0", 0, s["act_images"], image_size)
    patches = PatchConfig(image_size=image_size, grid=4, batch_size=s["act_batch"])
    boxes = patch_boxes(patches.image_size, patches.fraction, patches.grid)
    imgs = torch.stack([read_image(u, None, image_size) for u in urls]).to(device)
    crops = extract_patches(imgs, boxes, split.input_size).contiguous(
        memory_format=torch.channels_last
    )
    n_patches = crops.shape[0]
    rows = []
    for precision in ("fp32", "bf16"):

        def ours(precision=precision) -> None:
            group = zarr.open_group(str(tmp / f"acts-{precision}-{time.time_ns()}.zarr"), mode="w")
            compute_class_activations(
                split, 0, urls, group, patches, spatial_images=0, device=device, precision=precision
            )

        def bare(precision=precision) -> None:
            with inference(device, precision):
                for i in range(0, n_patches, patches.batch_size):
                    acts = split.g(crops[i : i + patches.batch_size])
                    split.h(acts)  # the stage computes patch logits too
                    pool(acts).float()

        bare()  # warm-up (cuDNN autotuning, allocator)
        ours()
        t_ours = timed(ours, device, s["act_repeats"])[0]
        t_bare = timed(bare, device, s["act_repeats"])[0]
        rows.append(
            {
                "precision": precision,
                "ours_patches_s": n_patches / t_ours,
                "bare_patches_s": n_patches / t_bare,
                "ours_vs_bare": t_bare / t_ours,
            }
        )
    return {
        "images": len(urls),
        "patches": n_patches,
        "batch": patches.batch_size,
        "rows": rows,
        "note": "ours = decode JPEGs + cut patches + g + h + Zarr appends; bare = g + h on patches "
        "already on the device (no I/O); ours_vs_bare = throughput ratio",
    }


def _maco_subject(s: dict[str, Any], device, tmp: Path):
    """ResNet50 g, NMF concept directions of its layer4 activations on synthetic images,
    a spectrum."""
    import torch

    from lens_core import maco
    from lens_core.data import extract_patches, patch_boxes, read_image
    from lens_core.factorize import nmf

    split = resnet50_split(s["input"], device)
    urls = write_jpegs(tmp / "maco-images" / "c0", 1, 16, s["input"])
    imgs = torch.stack([read_image(u, None, s["input"]) for u in urls])
    boxes = patch_boxes(s["input"], 64 / 224, 4)
    with torch.no_grad():
        A = (
            maco.pool(split.g(extract_patches(imgs, boxes, split.input_size).to(device)))
            .float()
            .cpu()
        )
    n = max(s["maco_batches"])
    k = min(n, A.shape[0], A.shape[1], 16)
    W = torch.from_numpy(nmf(A.numpy(), k, solver="torch", max_iter=200).W)
    directions = W[torch.arange(n) % k] + 1e-3 * torch.rand(
        n, W.shape[1], generator=torch.Generator().manual_seed(0)
    )
    magnitude = maco.estimate_magnitude([imgs], s["maco_size"])
    return split, directions, magnitude


def part_maco(s: dict[str, Any], device, tmp: Path) -> dict[str, Any]:
    from lens_core import maco
    from lens_core.config import MacoConfig

    split, dirs, magnitude = _maco_subject(s, device, tmp)
    cfg = MacoConfig(
        steps=s["maco_steps"],
        image_size=s["maco_size"],
        crops=s["maco_crops"],
        crop_range=(0.25, 0.30),
        batch_size=max(s["maco_batches"]),
    )
    warm = cfg.model_copy(update={"steps": 2})
    for p in ("fp32", "bf16"):
        maco.render_concepts(
            split.g, dirs[:2], warm, magnitude, [0, 1], split.input_size, device, precision=p
        )
    rows = []
    runs = [("bf16", b) for b in s["maco_batches"]] + [("fp32", b) for b in s["maco_fp32_batches"]]
    for precision, b in runs:
        c = cfg.model_copy(update={"batch_size": b})
        t, res = timed(
            lambda c=c, b=b, precision=precision: maco.render_concepts(
                split.g,
                dirs[:b],
                c,
                magnitude,
                list(range(b)),
                split.input_size,
                device,
                precision=precision,
            ),
            device,
        )
        rows.append(
            {
                "impl": "lens",
                "precision": precision,
                "B": b,
                "s_per_concept": t / b,
                "objective_mean": float(res.objective.mean()),
            }
        )
    out: dict[str, Any] = {
        "image_size": cfg.image_size,
        "steps": cfg.steps,
        "crops": cfg.crops,
        "crop_range": list(cfg.crop_range),
        "input_size": split.input_size,
        "rows": rows,
    }
    try:
        import bench_maco

        hm = bench_maco.import_horama()
    except Exception as err:  # noqa: BLE001 - a bench-only extra
        out["horama"] = f"not installed ({type(err).__name__}: {err})"[:200]
        return out
    import numpy as np
    import torch

    n = s["horama_concepts"]
    cwd = os.getcwd()
    hdir = tmp / "horama"
    hdir.mkdir(exist_ok=True)
    os.chdir(hdir)  # Horama reads ./spectrum_decorrelated.npy (and downloads it when missing)
    try:
        np.save(hm.MACO_SPECTRUM_FILENAME, magnitude.numpy())
        bench_maco.horama_render(
            hm,
            split.g,
            dirs[0],
            cfg.model_copy(update={"steps": 2}),
            magnitude,
            split.input_size,
            device,
            0,
        )
        times, images = [], []
        for i in range(n):
            t, im = timed(
                lambda i=i: bench_maco.horama_render(
                    hm, split.g, dirs[i], cfg, magnitude, split.input_size, device, i
                ),
                device,
            )
            times.append(t)
            images.append(im)
    finally:
        os.chdir(cwd)
    obj = maco.evaluate_images(
        split.g, torch.stack(images).to(device), dirs[:n].to(device), split.input_size
    )
    rows.append(
        {
            "impl": "horama 0.3.0",
            "precision": "fp32",
            "B": 1,
            "s_per_concept": sum(times) / n,
            "objective_mean": float(obj.mean()),
        }
    )
    out["horama"] = "installed"
    return out


def part_nmf(s: dict[str, Any], device, _tmp: Path) -> dict[str, Any]:
    import bench_nmf

    from lens_core.factorize import nmf

    n, c = s["nmf_shape"]
    k = s["nmf_k"]
    A = bench_nmf.activation_like(n, c)
    nmf(A[:200, :32], 4, solver="torch", device=device, max_iter=5)  # warm-up (imports, kernels)
    nmf(A[:200, :32], 4, solver="sklearn", max_iter=5)
    t0 = time.perf_counter()
    ref = nmf(A, k, solver="sklearn", max_iter=500, tol=1e-4)
    t_sk = time.perf_counter() - t0
    torch_run = None
    for _ in range(2):  # the second run is timed without first-call set-up
        sync(device)
        t0 = time.perf_counter()
        torch_run = nmf(
            A, k, solver="torch", device=device, max_iter=4096, tol=0.0, target_error=ref.rel_error
        )
        sync(device)
        t_torch = time.perf_counter() - t0
    reached = torch_run.rel_error <= ref.rel_error * (1 + 1e-3)  # equal error, to 0.1%
    return {
        "shape": [n, c],
        "k": k,
        "cpu_threads": os.cpu_count(),
        "sklearn": {
            "seconds": t_sk,
            "rel_error": ref.rel_error,
            "iters": ref.n_iter,
            "device": "cpu",
        },
        "torch": {
            "seconds": t_torch,
            "rel_error": torch_run.rel_error,
            "iters": torch_run.n_iter,
            "device": str(device),
            "reached_sklearn_error": bool(reached),
        },
        "speedup": t_sk / t_torch,
    }


class GpuSampler:
    """nvidia-smi sampled in the background (utilization %, memory MiB);
    nothing without nvidia-smi."""

    def __init__(self, period_ms: int = 250):
        self.exe = shutil.which("nvidia-smi")
        self.period_ms = period_ms
        self.samples: list[tuple[float, float]] = []
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if self.exe:
            self.proc = subprocess.Popen(
                [
                    self.exe,
                    "--query-gpu=utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits",
                    f"--loop-ms={self.period_ms}",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                util, mem = (float(v) for v in line.strip().split(",")[:2])
            except ValueError:
                continue
            self.samples.append((util, mem))

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def summary(self) -> dict[str, Any] | None:
        if not self.exe:
            return None
        utils = [u for u, _ in self.samples]
        return {
            "samples": len(utils),
            "period_ms": self.period_ms,
            "util_mean": statistics.fmean(utils) if utils else None,
            "util_busy_share": sum(u > 0 for u in utils) / len(utils) if utils else None,
            "mem_max_mib": max((m for _, m in self.samples), default=None),
        }


def _toml(cfg: dict[str, Any]) -> str:
    """A flat-enough TOML writer for the e2e config (tables of scalars and lists)."""

    def val(v: Any) -> str:
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list | tuple):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return repr(v)

    lines = [f"{k} = {val(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    for k, v in cfg.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {val(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def part_e2e(s: dict[str, Any], _device, tmp: Path, mode: str) -> dict[str, Any]:
    import torch
    import torchvision

    from lens_core import layout
    from lens_core.config import load_config
    from lens_core.run import prepare_run
    from lens_core.status import read_status

    n_cls, n_img = s["e2e_classes"], s["e2e_images"]
    root = tmp / "e2e"
    data = root / "data"
    size = s["e2e_config"]["patches"]["image_size"]
    t0 = time.perf_counter()
    for c in range(n_cls):
        write_jpegs(data / f"class{c:03d}", c, n_img, size)
    ckpt = root / "resnet50-random.pt"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50(weights=None, num_classes=n_cls).state_dict(), ckpt)
    setup_s = time.perf_counter() - t0
    gpu = mode == "gpu"
    cfg = {
        "store": f"file://{root}/store",
        "publish": f"file://{root}/site",
        "model": {
            "arch": "resnet50",
            "checkpoint": str(ckpt),
            "layer": "layer4",
            "input_size": s["input"],
            "precision": "bf16" if gpu else "fp32",
            **IMAGENET,
        },
        "data": {"url": f"file://{data}", "images_per_class": n_img},
        **s["e2e_config"],
    }
    cfg_path = root / "atlas.toml"
    cfg_path.write_text(_toml(cfg))
    env = {
        **os.environ,
        "PREFECT_HOME": str(root / "prefect-home"),
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    if gpu:
        env["LENS_GPU"] = "1"
    else:
        env.pop("LENS_GPU", None)
        env["LENS_WORKERS"] = "1"
    cmd = [sys.executable, "-m", "flows.cli", "run", "--config", str(cfg_path), "--no-progress"]
    with GpuSampler() as sampler:
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=s["e2e_timeout"]
        )
        wall = time.perf_counter() - t0
    out: dict[str, Any] = {
        "classes": n_cls,
        "images_per_class": n_img,
        "config": cfg,
        "returncode": proc.returncode,
        "wall_s": wall,
        "data_setup_s": setup_s,
        "lens_gpu": gpu,
        "stdout_tail": proc.stdout.strip().splitlines()[-8:],
        "stderr_tail": proc.stderr.strip().splitlines()[-12:],
    }
    if proc.returncode != 0:
        raise RuntimeError(
            f"lens run exited {proc.returncode}: "
            + " | ".join(out["stderr_tail"][-4:] or out["stdout_tail"])
        )
    info = prepare_run(load_config(cfg_path))
    statuses = read_status(info.store(), info.slugs)
    per_stage: dict[str, list[float]] = {}
    for st in statuses.values():
        for stage, rec in st.items():
            if rec.get("seconds") is not None:
                per_stage.setdefault(stage, []).append(float(rec["seconds"]))
    out["stage_s_per_class"] = {k: statistics.fmean(v) for k, v in per_stage.items()}
    out["stage_classes"] = {k: len(v) for k, v in per_stage.items()}
    done = sum(
        1
        for st in statuses.values()
        if all(
            (st.get(x) or {}).get("state") in ("completed", "skipped")
            for x in (*layout.CLASS_STAGES, "render")
        )
    )
    out["classes_completed"] = done
    for line in (
        proc.stdout.splitlines()
    ):  # "time: classes and renders 12 s (200 concepts in 4 render batches), ..."
        if line.startswith("time: classes and renders"):
            out["timings_line"] = line
            with contextlib.suppress(ValueError):
                out["classes_and_renders_s"] = float(line.split("renders", 1)[1].split("s", 1)[0])
    out["gpu_util"] = sampler.summary()
    if out["gpu_util"] is None:
        out["gpu_util_note"] = "no nvidia-smi on this machine"
    busy = out.get("classes_and_renders_s", wall)
    stage_sum = sum(out["stage_s_per_class"].get(k, 0.0) for k in layout.CLASS_STAGES)
    out["per_class_s"] = {"flow": busy / n_cls, "class_stages": stage_sum}
    out["gpu_hours_1000_classes"] = {
        "from_flow_time": busy / n_cls * 1000 / 3600,
        "from_wall_incl_startup": wall / n_cls * 1000 / 3600,
    }
    return out


# ---------------------------------------------------------------- report


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def markdown(res: dict[str, Any]) -> str:
    lines = [
        f"# LENS GPU benchmark ({res['mode']})",
        "",
        f"device: {res['device_name']}; torch {res['torch']}; python {res['python']}; "
        f"dask-cuda: {res['dask_cuda']}; total {res['seconds']:.0f} s",
        "",
    ]
    a = res.get("activations")
    if a:
        lines += [
            f"## Activations: ResNet50 (random init), {a['images']} JPEGs, {a['patches']} patches, "
            f"batch {a['batch']}",
            "",
            "| precision | LENS stage patches/s | bare loop patches/s | LENS / bare |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['precision']} | {_fmt(r['ours_patches_s'])} | {_fmt(r['bare_patches_s'])} | "
            f"{r['ours_vs_bare']:.2f} |"
            for r in a["rows"]
        ]
        lines.append("")
    m = res.get("maco")
    if m:
        lines += [
            f"## MACO: {m['image_size']} px, {m['steps']} "
            f"steps, {m['crops']} crops of {m['crop_range']}, "
            f"input {m['input_size']} (Horama: {m['horama']})",
            "",
            "| implementation | precision | B | s / concept | mean final objective |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['impl']} | {r['precision']} | {r['B']} | {_fmt(r['s_per_concept'])} | "
            f"{_fmt(r['objective_mean'])} |"
            for r in m["rows"]
        ]
        lines.append("")
    n = res.get("nmf")
    if n:
        lines += [
            f"## NMF: {n['shape'][0]} x {n['shape'][1]}, k = {n['k']}, at equal error",
            "",
            "| solver | device | seconds | rel. error | iterations |",
            "|---|---|---|---|---|",
            f"| scikit-learn | cpu ({n['cpu_threads']} cores) | {_fmt(n['sklearn']['seconds'])} | "
            f"{n['sklearn']['rel_error']:.4f} | {n['sklearn']['iters']} |",
            f"| lens torch HALS | {n['torch']['device']} | {_fmt(n['torch']['seconds'])} | "
            f"{n['torch']['rel_error']:.4f} | {n['torch']['iters']} |",
            "",
            f"torch / sklearn speed-up: {_fmt(n['speedup'], 2)}x (reached sklearn's error: "
            f"{n['torch']['reached_sklearn_error']})",
            "",
        ]
    e = res.get("e2e")
    if e:
        util = e.get("gpu_util") or {}
        lines += [
            f"## End to end: `lens run`, {e['classes']} classes x {e['images_per_class']} images, "
            f"ResNet50, LENS_GPU={'1' if e['lens_gpu'] else 'unset'}",
            "",
            "| stage | seconds per class |",
            "|---|---|",
        ]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in e["stage_s_per_class"].items()]
        lines += [
            "",
            f"wall {e['wall_s']:.1f} s (incl. API and cluster start-up); classes and renders "
            f"{_fmt(e.get('classes_and_renders_s', float('nan')))} s; {e['classes_completed']} of "
            f"{e['classes']} classes complete",
            "GPU utilisation: "
            + (
                f"mean {util['util_mean']:.0f}%, busy {100 * util['util_busy_share']:.0f}% "
                f"of {util['samples']} samples, memory max {util['mem_max_mib']:.0f} MiB"
                if util.get("util_mean") is not None
                else e.get("gpu_util_note", "no samples")
            ),
            "extrapolated GPU-hours for 1,000 classes: "
            f"{e['gpu_hours_1000_classes']['from_flow_time']:.2f} "
            f"(flow time), {e['gpu_hours_1000_classes']['from_wall_incl_startup']:.2f} "
            "(wall incl. start-up)",
            "",
        ]
    if res["errors"]:
        lines += ["## Errors", ""] + [
            f"- {k}: {v.splitlines()[-1] if v else v}" for k, v in res["errors"].items()
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--cpu-smoke", action="store_true", help="tiny sizes on the CPU (same code paths)"
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--parts", default=",".join(PARTS))
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    import torch

    mode = "cpu-smoke" if args.cpu_smoke else "gpu"
    if mode == "gpu" and not torch.cuda.is_available():
        print(
            "no CUDA device: run `bench/gpu.sh --cpu-smoke` here, or this on a GPU machine",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda" if mode == "gpu" else "cpu")
    if mode == "gpu":
        torch.backends.cudnn.benchmark = True
    else:  # one thread: OpenMP threads spin-waiting on a shared 2-core machine cost 10x and more
        torch.set_num_threads(1)
    from flows.cluster import _dask_cuda

    s = SIZES[mode]
    res: dict[str, Any] = {
        "mode": mode,
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(0)
        if mode == "gpu"
        else f"CPU ({os.cpu_count()} cores)",
        "dask_cuda": "installed"
        if _dask_cuda()
        else "not installed (flows.cluster.GPUCluster fallback)",
        "sizes": s,
        "errors": {},
        "part_seconds": {},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fns = {
        "activations": part_activations,
        "maco": part_maco,
        "nmf": part_nmf,
        "e2e": lambda s, d, t: part_e2e(s, d, t, mode),
    }
    with tempfile.TemporaryDirectory(prefix="lens-gpu-bench-") as tmp:
        for part in [p for p in args.parts.split(",") if p]:
            t0 = time.perf_counter()
            print(f"[{time.perf_counter() - t_start:6.1f} s] {part} ...", flush=True)
            try:
                res[part] = fns[part](s, device, Path(tmp))
            except Exception:  # noqa: BLE001 - one failing part must not lose the others
                res["errors"][part] = traceback.format_exc()[-3000:]
                print(res["errors"][part], file=sys.stderr, flush=True)
            res["part_seconds"][part] = time.perf_counter() - t0
            res["seconds"] = time.perf_counter() - t_start
            (out / "gpu.json").write_text(json.dumps(res, indent=1, default=str))
    res["seconds"] = time.perf_counter() - t_start
    (out / "gpu.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "gpu.md").write_text(markdown(res))
    print(markdown(res))
    print(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'}")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
