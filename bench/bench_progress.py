"""Progress of a run as a reader sees it (issue 24), paired against another checkout.

    git worktree add /tmp/lens-old <commit>
    .venv/bin/python bench/bench_progress.py --old /tmp/lens-old       # default + heavy, 1 pair
    .venv/bin/python bench/bench_progress.py --old /tmp/lens-old --mode heavy --pairs 2

Each run is `lens run` (`python -m flows.cli run --no-progress --workers 2`) in a subprocess on a
fresh store, with PYTHONPATH set to the checkout under test (same venv), old then new in each pair.
Read from the outside, so that old code needs nothing new:
- wall: the first run's wall time;
- first page: when the first class page appears (`<site>/<run>/classes/*/index.html`, polled);
- last chain: the latest `status/<class>/crops.json` "at" (the end of the last class chain);
- renders end: the latest `status/<class>/render.json` "at";
- no-op re-run: `lens run` again on the finished run (same config), wall time.
Modes: `default` = the embedded default (10 toy classes); `heavy` = 8 classes whose renders dominate
(maco.steps 192, batch 8). Ratios are new / old. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HEAVY = """\
classes = ["0", "1", "2", "3", "4", "5", "6", "7"]
[maco]
steps = 192
batch_size = 8
"""


def run_once(code: Path, mode: str, work: Path) -> dict[str, Any]:
    work.mkdir(parents=True)
    args = [sys.executable, "-m", "flows.cli", "run", "--no-progress", "--workers", "2"]
    if mode == "heavy":
        (work / "heavy.toml").write_text(HEAVY)
        args += ["--config", str(work / "heavy.toml")]
    env = {**os.environ, "PYTHONPATH": str(code)}
    seen: list[float] = []
    stop = threading.Event()

    def watch() -> None:  # the first class page to appear (a final publish rewrites them all)
        while not stop.is_set() and not seen:
            if any((work / "lens-out" / "site").glob("*/classes/*/index.html")):
                seen.append(time.time())
            stop.wait(0.2)

    t0 = time.time()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.time() - t0
    stop.set()
    watcher.join()
    if out.returncode != 0:
        raise SystemExit(f"{code}: lens run failed:\n{out.stdout}\n{out.stderr}")
    (run,) = (work / "lens-out" / "store" / "runs").iterdir()

    def latest(stage: str) -> float:
        return max(json.loads(p.read_text())["at"] for p in run.glob(f"status/*/{stage}.json")) - t0

    first_page = seen[0] - t0 if seen else float("nan")
    t1 = time.time()
    again = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    noop = time.time() - t1
    if again.returncode != 0:
        raise SystemExit(f"{code}: re-run failed:\n{again.stdout}\n{again.stderr}")
    return {
        "wall": wall,
        "first page": first_page,
        "last chain": latest("crops"),
        "renders end": latest("render"),
        "no-op re-run": noop,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--old", type=Path, required=True, help="the checkout to compare with")
    parser.add_argument("--new", type=Path, default=ROOT)
    parser.add_argument("--mode", choices=("default", "heavy", "both"), default="both")
    parser.add_argument("--pairs", type=int, default=1)
    args = parser.parse_args()
    modes = ("default", "heavy") if args.mode == "both" else (args.mode,)
    with tempfile.TemporaryDirectory(prefix="bench-progress-") as tmp:
        for mode in modes:
            results: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
            for i in range(args.pairs):
                for name, code in (("old", args.old), ("new", args.new)):
                    r = run_once(code.resolve(), mode, Path(tmp) / f"{mode}-{name}-{i}")
                    results[name].append(r)
                    print(
                        f"{mode} pair {i + 1} {name}: "
                        + ", ".join(f"{k} {v:.1f} s" for k, v in r.items()),
                        flush=True,
                    )
            print(f"\n{mode}: median over {args.pairs} pair(s), seconds from launch")
            print(f"{'':16}{'old':>8}{'new':>8}{'new/old':>9}")
            for key in results["old"][0]:
                old = statistics.median(r[key] for r in results["old"])
                new = statistics.median(r[key] for r in results["new"])
                print(f"{key:16}{old:8.1f}{new:8.1f}{new / old:9.2f}")
            print(flush=True)


if __name__ == "__main__":
    main()
