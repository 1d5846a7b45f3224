"""Flow benchmark: orchestration overhead per class, embedded default end to end, 1 vs 2 workers.

    .venv/bin/python bench/bench_flow.py          # 100 and 1,000 synthetic classes; full default
    .venv/bin/python bench/bench_flow.py --quick  # 100 synthetic classes; default on 3 classes

1. Overhead per class. A synthetic run: the toy CNN architecture with a random-init checkpoint for
   N classes (written here, safetensors), the generated toy data with N classes, tiny budgets.
   overhead = flow wall time - compute / workers, where compute is every stage's own time (the
   per-class status files, plus render, cross-class and publish timed inside their tasks).
2. The embedded default end to end: `lens run` in a subprocess on a fresh store, against the same
   stages run one after the other in one process without Prefect or Dask (torch on every core).
3. 1 vs 2 Dask workers on the default toy run (fresh stores, one Prefect API for both).

Everything is measured in this run; nothing is asserted (timings don't belong in tests).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.cli import QUIET_ENV  # noqa: E402

for _k, _v in QUIET_ENV.items():
    os.environ.setdefault(_k, _v)
warnings.filterwarnings("ignore", message="Port .* is already in use")

STAGES = ("activations", "factorize", "importance", "crops")


def synthetic_config(root: Path, n_classes: int) -> dict[str, Any]:
    """Toy architecture, random-init checkpoint for n_classes, generated data, tiny budgets."""
    import torch
    from safetensors.torch import save_file

    from lens_core.toy import ToyCNN

    root.mkdir(parents=True, exist_ok=True)
    ckpt = root / f"toy-random-{n_classes}.safetensors"
    if not ckpt.exists():
        torch.manual_seed(0)
        save_file({k: v.contiguous() for k, v in ToyCNN(n_classes).state_dict().items()}, str(ckpt))
    return {
        "model": {"arch": "toy", "checkpoint": str(ckpt)},
        "data": {"toy_classes": n_classes, "toy_images_per_class": 2, "images_per_class": 2},
        "patches": {"grid": 2},
        "concepts": {"n_concepts": 3},
        "importance": {"n_designs": 4, "images": 2},
        "crops": {"per_concept": 2, "attribution_images": 1},
        "maco": {"steps": 2, "image_size": 64, "crops": 2},
        "store": f"file://{root}/store",
        "publish": f"file://{root}/site",
    }


def compute_seconds(cfg_dict: dict[str, Any], timings: dict[str, Any]) -> tuple[float, float]:
    """(per-class stage seconds from the status files,
    render + cross-class + publish task seconds)."""
    from lens_core.config import make_config
    from lens_core.pipeline import prepare_run
    from lens_core.status import read_status

    info = prepare_run(make_config(cfg_dict))
    statuses = read_status(info.store(), info.slugs)
    stages = sum(
        rec.get("seconds") or 0.0
        for st in statuses.values()
        for s, rec in st.items()
        if s in STAGES
    )
    tasks = (
        timings.get("render_compute", 0.0)
        + timings.get("cross_class_compute", 0.0)
        + timings.get("publish_compute", 0.0)
    )
    return stages, tasks


def run_flow(cfg_dict: dict[str, Any], workers: int) -> tuple[float, dict[str, Any]]:
    """Wall seconds of one build_atlas call (its own Dask cluster) and its result."""
    from flows.atlas import build_atlas, make_task_runner

    t0 = time.perf_counter()
    state = build_atlas.with_options(task_runner=make_task_runner(workers=workers))(
        config=cfg_dict, return_state=True
    )
    wall = time.perf_counter() - t0
    result = state.result(raise_on_failure=False)
    if not isinstance(result, dict) or result.get("failed"):
        raise RuntimeError(f"flow did not complete: {state.name} {state.message}")
    return wall, result


def overhead(root: Path, n_classes: int, workers: int) -> dict[str, Any]:
    from lens_core.config import make_config
    from lens_core.pipeline import prepare_run

    cfg_dict = synthetic_config(root, n_classes)
    t0 = time.perf_counter()
    prepare_run(make_config(cfg_dict))  # generates the data set: set-up, not timed below
    gen = time.perf_counter() - t0
    wall, result = run_flow(cfg_dict, workers)
    stages, tasks = compute_seconds(cfg_dict, result["timings"])
    ideal = (stages + tasks) / workers
    return {
        "classes": n_classes,
        "workers": workers,
        "data_s": gen,
        "wall": wall,
        "stages": stages,
        "tasks": tasks,
        "overhead": wall - ideal,
        "per_class": (wall - ideal) / n_classes,
        "timings": result["timings"],
    }


def pure_compute(cfg_dict: dict[str, Any]) -> float:
    """The same stages, renders, cross-class step and publish in this process,
    no Prefect or Dask."""
    from lens_core import cross_class, publish, renders
    from lens_core.config import make_config
    from lens_core.pipeline import prepare_run, run_class

    cfg = make_config(cfg_dict)
    t0 = time.perf_counter()
    info = prepare_run(cfg)
    for slug in info.slugs:
        run_class(info, slug)
    items = renders.pending_items(info)
    for i in range(0, len(items), cfg.maco.batch_size):
        renders.render_batch(info, items[i : i + cfg.maco.batch_size])
    renders.finalize_viz(info)
    cross_class.build_cross_class(info)
    publish.publish(info)
    return time.perf_counter() - t0


def end_to_end(root: Path, classes: list[str] | None) -> dict[str, Any]:
    """`lens run` on the embedded default (fresh store: the toy data is generated too)."""
    cmd = [
        str(ROOT / ".venv/bin/lens"),
        "run",
        "--store",
        f"file://{root}/e2e/store",
        "--publish",
        f"file://{root}/e2e/site",
        "--no-progress",
    ]
    if classes:
        cmd += ["--classes", ",".join(classes)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(
            f"lens run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
    m = re.search(r"explained in (\d+) s", proc.stdout)
    noise = [line for line in proc.stderr.splitlines() if line.strip()]
    return {
        "wall": wall,
        "flow": float(m.group(1)) if m else float("nan"),
        "stderr_lines": len(noise),
        "stdout": proc.stdout.strip().splitlines(),
    }


def table(headers: list[str], rows: list[list[Any]]) -> None:
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for r in rows:
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in r) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="100 synthetic classes; default run on 3 classes"
    )
    ap.add_argument("--sizes", help="synthetic class counts (default 100,1000; quick: 100)")
    ap.add_argument("--workers", type=int, default=2, help="Dask workers of the synthetic runs")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: overhead,e2e,workers")
    args = ap.parse_args()
    sizes = [int(s) for s in (args.sizes or ("100" if args.quick else "100,1000")).split(",")]
    skip = set(filter(None, args.skip.split(",")))
    toy_classes = ["0", "1", "2"] if args.quick else None
    print(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at start\n")

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.api import TemporaryAPI, drain_prefect_queues

    api = TemporaryAPI().start()  # one Prefect API for every in-process flow run below
    try:
        with (
            temporary_settings(updates={PREFECT_API_URL: api.wait()}),
            tempfile.TemporaryDirectory() as tmp,
        ):
            tmp_path = Path(tmp)
            if "overhead" not in skip:
                rows = []
                for n in sizes:
                    r = overhead(tmp_path / f"synthetic-{n}", n, args.workers)
                    rows.append(r)
                    print(
                        f"  {n} classes: wall {r['wall']:.1f} s, timings {r['timings']}", flush=True
                    )
                print(
                    f"\n## Orchestration overhead per class ({args.workers} "
                    "workers, synthetic toy, tiny budgets)\n"
                )
                table(
                    [
                        "classes",
                        "flow wall s",
                        "stage compute s",
                        "render+cross+publish s",
                        "overhead s",
                        "overhead / class s",
                        "vs smallest",
                    ],
                    [
                        [
                            r["classes"],
                            r["wall"],
                            r["stages"],
                            r["tasks"],
                            r["overhead"],
                            r["per_class"],
                            f"{r['per_class'] / rows[0]['per_class']:.2f}x",
                        ]
                        for r in rows
                    ],
                )
                print(
                    "\n(data set generation, not timed above: "
                    + ", ".join(f"{r['classes']} classes {r['data_s']:.0f} s" for r in rows)
                    + ")"
                )
            if "workers" not in skip:
                walls = {}
                for w in (1, 2):
                    cfg_dict = {
                        "store": f"file://{tmp}/toy-w{w}/store",
                        "publish": f"file://{tmp}/toy-w{w}/site",
                        **({"classes": toy_classes} if toy_classes else {}),
                    }
                    wall, result = run_flow(cfg_dict, w)
                    walls[w] = (wall, result["timings"])
                print(
                    "\n## 1 vs 2 Dask workers (embedded toy "
                    f"default{', 3 classes' if toy_classes else ''})\n"
                )
                table(
                    ["workers", "flow wall s", "classes+renders s", "vs 1 worker"],
                    [
                        [
                            w,
                            walls[w][0],
                            walls[w][1]["classes_and_renders"],
                            f"{walls[1][0] / walls[w][0]:.2f}x",
                        ]
                        for w in (1, 2)
                    ],
                )
            if "e2e" not in skip:
                e2e = end_to_end(tmp_path, toy_classes)
                cfg_dict = {
                    "store": f"file://{tmp}/pure/store",
                    "publish": f"file://{tmp}/pure/site",
                    **({"classes": toy_classes} if toy_classes else {}),
                }
                pure = pure_compute(cfg_dict)
                print(
                    "\n## Embedded default end to end (`lens "
                    f"run`{', 3 classes' if toy_classes else ''}, fresh store)\n"
                )
                table(
                    ["run", "wall s", "vs one process"],
                    [
                        [
                            "lens run (Prefect + Dask, 2 workers, includes start-up)",
                            e2e["wall"],
                            f"{e2e['wall'] / pure:.2f}x",
                        ],
                        ["  of which the flow", e2e["flow"], f"{e2e['flow'] / pure:.2f}x"],
                        ["same stages in one process, no Prefect/Dask", pure, "1.00x"],
                    ],
                )
                print(
                    f"\n`lens run` printed {len(e2e['stdout'])} lines on stdout and "
                    f"{e2e['stderr_lines']} on stderr:"
                )
                for line in e2e["stdout"]:
                    print(f"    {line}")
        drain_prefect_queues()
    except BaseException:
        if api.proc is not None and api.proc.poll() is not None:  # say why the API went away
            print(
                f"the Prefect API server exited ({api.proc.returncode}); its log:\n"
                + api.log.read_text(errors="replace")[-3000:],
                file=sys.stderr,
            )
            api.stop(keep_log=True)
        raise
    finally:
        api.stop(keep_log=api.proc is None)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
