"""Local Dask clusters for LENS: the workers' environment, their torch threads, a fast exit.

Their TLS (certificates, dask Security, who may connect) is flows/tls.py.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import logging
import os
from typing import Any

import dask
import distributed  # noqa: F401 - loads its config defaults before we override one of them

from flows.tls import local_security, register_local
from lens_core.settings import settings

PRELOAD = "flows.cluster"  # this module, run by every worker at start (`dask_setup`)
# Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also turns off glibc's
# adaptive mmap threshold: every large torch buffer is then a fresh mmap, and the renders spend
# most of their time in the kernel. LENS workers start without it.
TRIM = "MALLOC_TRIM_THRESHOLD_"
HEALTH_ROUTES = [
    "distributed.http.health"
]  # the scheduler's HTTP routes when there is no dashboard


def worker_env(n_workers: int) -> dict[str, str]:
    """Environment set before a worker process starts (no malloc trim threshold on purpose).

    Each worker gets cores // workers torch threads (the nanny's default is 1, which leaves cores
    idle with one worker).
    """
    threads = str(max(1, (os.cpu_count() or 1) // max(1, n_workers)))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}


def local_cluster(gpu: bool = False, **kwargs: Any) -> Any:
    """A LocalCluster (or dask-cuda LocalCUDACluster with gpu) whose workers start with
    worker_env().

    It speaks TLS with fresh credentials (`flows.tls.local_security`) unless `security` is given;
    clients in this process that connect by its address alone get them through
    `flows.tls.security_loader`. No dashboard unless `dashboard_address` is given. With gpu and no
    dask-cuda installed, a `GPUCluster`: one plain worker per visible GPU, pinned to it
    (`gpu_devices`).
    """
    devices: list[str] | None = None
    cuda_cluster = _dask_cuda() if gpu else None
    if gpu and cuda_cluster is None:
        devices = gpu_devices()
        n = len(devices)
    elif gpu:
        import torch

        n = torch.cuda.device_count() or 1
    else:
        n = int(kwargs.get("n_workers") or 1)
    kwargs.setdefault("preload", [PRELOAD])
    kwargs.setdefault("security", local_security())
    kwargs.setdefault("dashboard_address", None)  # Dask's default serves it on every interface
    env = worker_env(n)
    # the nanny prefers os.environ over its config and writes its values back into os.environ:
    # set ours for the spawn, then give this process its environment back
    saved = {k: os.environ.get(k) for k in (*env, TRIM)}
    os.environ.pop(TRIM, None)
    os.environ.update(env)
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": env, **_http_routes(kwargs)}):
            if devices is not None:
                return register_local(GPUCluster(devices, **kwargs))
            if cuda_cluster is not None:
                return register_local(cuda_cluster(**kwargs))
            return register_local(distributed.LocalCluster(**kwargs))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _dask_cuda() -> Any | None:
    """dask-cuda's LocalCUDACluster, or None when dask-cuda is not installed."""
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        return None
    return LocalCUDACluster


def gpu_devices(visible: str | None = None, count: int | None = None) -> list[str]:
    """The GPUs of this machine a GPU cluster starts one worker for: CUDA_VISIBLE_DEVICES's entries
    (ids or UUIDs) when it is set, else 0..count-1 (count: torch.cuda.device_count()).

    No GPU is an error that says so, rather than a cluster of workers that cannot run GPU tasks.
    """
    if visible is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if count is None:
        import torch

        count = torch.cuda.device_count()
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible is not None else []
    devices = ids[:count] if visible is not None else [str(i) for i in range(count)]
    if not devices:
        seen = (
            f"CUDA_VISIBLE_DEVICES={visible!r}"
            if visible is not None
            else "torch.cuda.device_count() = 0"
        )
        raise RuntimeError(
            f"LENS_GPU=1 but no CUDA device is visible ({seen}): unset LENS_GPU to run on the CPU"
        )
    return devices


class GPUCluster(distributed.LocalCluster):
    """dask-cuda's worker pinning for a plain LocalCluster (used when dask-cuda is not installed):
    one worker per device, started with CUDA_VISIBLE_DEVICES set to that device alone (it is
    cuda:0 inside the worker) and `resources={"GPU": 1}` (the tensor stages are annotated with it).
    """

    def __init__(self, devices: list[str], **kwargs: Any):
        self.devices = list(devices)
        kwargs["n_workers"] = 0  # then scaled through new_worker_spec, as dask-cuda does
        kwargs.setdefault("threads_per_worker", 1)
        kwargs.setdefault("processes", True)
        kwargs.setdefault("resources", {"GPU": 1})
        super().__init__(**kwargs)
        self.scale(len(self.devices))
        self.wait_for_workers(len(self.devices))

    def new_worker_spec(self) -> dict[Any, dict[str, Any]]:
        spec = super().new_worker_spec()
        name, worker = next(iter(spec.items()))
        used = {
            s["options"].get("env", {}).get("CUDA_VISIBLE_DEVICES")
            for s in self.worker_spec.values()
        }
        free = [d for d in self.devices if d not in used] or self.devices
        options = dict(worker["options"])
        options["env"] = {**(options.get("env") or {}), "CUDA_VISIBLE_DEVICES": free[0]}
        return {name: {**worker, "options": options}}


class _NoDashboardLine(logging.Filter):
    """The scheduler logs "dashboard at: http://...:8787/status" for its HTTP port even when that
    port serves /health only (no dashboard): a link that gives 404. Dropped while such a
    scheduler starts (the routes are set for the duration of `local_cluster`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "dashboard at" not in record.getMessage():
            return True
        return dask.config.get("distributed.scheduler.http.routes", None) != HEALTH_ROUTES


_SCHEDULER_LOG = logging.getLogger("distributed.scheduler")
if not any(isinstance(f, _NoDashboardLine) for f in _SCHEDULER_LOG.filters):
    _SCHEDULER_LOG.addFilter(_NoDashboardLine())


def _http_routes(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Without a dashboard, the scheduler's HTTP port serves /health only (no worker logs, stacks
    or JSON state for other local users to read)."""
    if kwargs.get("dashboard_address") is not None:
        return {}
    return {"distributed.scheduler.http.routes": HEALTH_ROUTES}


def dask_setup(worker: Any) -> None:  # noqa: ARG001 - Dask's preload API passes the worker
    """Worker preload: import the task code now; at exit, skip the interpreter teardown.

    The import runs before the worker registers (in a thread it raced the first task's own
    imports: Python's import deadlock detection fired); a cluster started in the background
    (`lens run`) overlaps it with the rest of the start-up. The worker exits with `os._exit` once
    Prefect has drained its event and log queues, skipping the interpreter teardown of torch and
    Prefect, which outlasted the nanny's patience (it killed the worker: "Worker process still
    alive after 4.0 seconds, killing").
    """
    atexit.register(os._exit, 0)  # runs after Prefect's queue drains (threading's exit hooks)
    with contextlib.suppress(Exception):
        importlib.import_module("tasks.chain")  # torch, Prefect, the stages
    if settings().log not in (
        "INFO",
        "DEBUG",
    ):  # a failed stage is one console line (flows/runner.py)
        with contextlib.suppress(Exception):
            from flows.runner import quiet_task_failures

            quiet_task_failures()


if __name__ == "__main__":  # `python -m flows.cluster tls-certs DIR` (flows/tls.py)
    from flows.tls import main

    raise SystemExit(main())
