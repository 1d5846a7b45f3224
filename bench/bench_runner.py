"""What LENS's Dask task runner buys over prefect-dask's own, per submitted task.

    .venv/bin/python bench/bench_runner.py [--tasks 200] [--rounds 2]

A flow submits N tasks that each take a RunInfo of one class (what a class chain takes) and
return at once, on a 2-worker LocalCluster; the same flow runs with prefect-dask's DaskTaskRunner,
with flows.runner.LensDaskTaskRunner (submits with `pure=False`: no Dask tokenization), and with
an earlier LENS runner that also sent Prefect's settings to workers as objects instead of a dict
(a patch of Prefect's SettingsContext, measured here to decide whether it is worth keeping),
interleaved, rounds rotating which goes first. Prints seconds per task and the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.cli import QUIET_ENV  # noqa: E402

for _k, _v in QUIET_ENV.items():
    os.environ.setdefault(_k, _v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    import distributed
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_dask import DaskTaskRunner

    from flows.api import TemporaryAPI
    from flows.runner import LensDaskTaskRunner
    from lens_core.config import make_config
    from lens_core.run import RunInfo

    info = RunInfo("0123456789ab", make_config({}), "file:///data", "digest", 1000, [])
    settings_as_objects = _settings_variant(LensDaskTaskRunner)

    # info is unused: the RunInfo travels with the task, like a class chain's
    @task(cache_policy=NO_CACHE, persist_result=False)
    def noop(info: RunInfo, i: int) -> int:  # noqa: ARG001
        return i

    @flow(persist_result=False)
    def fan_out(n: int) -> float:
        t0 = time.perf_counter()
        futures = [noop.submit(info, i) for i in range(n)]
        for f in futures:
            f.result()
        return time.perf_counter() - t0

    api = TemporaryAPI().start()
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None)
    times: dict[str, list[float]] = {}
    try:
        with temporary_settings(updates={PREFECT_API_URL: api.wait()}):
            runners = {
                "prefect-dask": lambda: DaskTaskRunner(address=cluster.scheduler_address),
                "lens (pure=False)": lambda: LensDaskTaskRunner(address=cluster.scheduler_address),
                "+ settings objects": lambda: settings_as_objects(
                    address=cluster.scheduler_address
                ),
            }
            times = {name: [] for name in runners}
            # warm the workers' imports
            fan_out.with_options(task_runner=runners["prefect-dask"]())(10)
            names = list(runners)
            for r in range(args.rounds):
                order = names[r % len(names) :] + names[: r % len(names)]
                for name in order:
                    seconds = fan_out.with_options(task_runner=runners[name]())(args.tasks)
                    times[name].append(seconds / args.tasks)
                    print(
                        f"round {r}: {name:20s} {seconds:6.1f} s for {args.tasks} tasks", flush=True
                    )
    finally:
        cluster.close()
        api.stop()
    base = statistics.median(times["prefect-dask"])
    print(f"\n| runner | s per task (median of {args.rounds}) | vs prefect-dask |\n|---|---|---|")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.4f} | {med / base:.2f}x |")


def _settings_variant(base: type) -> type:
    """The earlier LENS runner's second change: the flow's settings reach workers as objects."""
    from contextlib import contextmanager

    from prefect.context import SettingsContext

    class AsObjects(SettingsContext):
        # Prefect's signature (include_secrets unused)
        def serialize(self, include_secrets: bool = True) -> dict:  # noqa: ARG002
            return {"profile": self.profile, "settings": self.settings}

    @contextmanager
    def as_objects():
        current = SettingsContext.get()
        with AsObjects.model_construct(profile=current.profile, settings=current.settings):
            yield

    class Runner(base):
        def submit(self, *args, **kwargs):
            with as_objects():
                return super().submit(*args, **kwargs)

    return Runner


if __name__ == "__main__":
    main()
