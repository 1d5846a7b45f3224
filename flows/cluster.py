"""Local Dask clusters for LENS: the workers' environment, their torch threads, a fast exit.

Measured on 2 cores (toy default, 100 MACO concepts): Dask's nanny starts workers with
``MALLOC_TRIM_THRESHOLD_=65536``, which also turns off glibc's adaptive mmap threshold, so every
large torch buffer is a fresh mmap: the renders spent 67 s in the kernel instead of 5 s and took
3x longer. These workers start without it. Each worker gets cores // workers torch threads
(the nanny's default is 1, which leaves cores idle with one worker). A worker imports the task
code (torch, Prefect) as it starts, and exits with ``os._exit`` once Prefect
has drained its event and log queues, skipping the 1-3 s interpreter teardown of torch + prefect
after which the nanny killed it ("Worker process still alive after 4.0 seconds, killing").
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
from typing import Any

import dask
import distributed  # noqa: F401 - loads its config defaults before we override one of them

PRELOAD = "flows.cluster"  # this module, run by every worker at start (`dask_setup`)
TRIM = "MALLOC_TRIM_THRESHOLD_"


def worker_env(n_workers: int) -> dict[str, str]:
    """Environment set before a worker process starts (no malloc trim threshold on purpose)."""
    threads = str(max(1, (os.cpu_count() or 1) // max(1, n_workers)))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}


def local_cluster(gpu: bool = False, **kwargs: Any) -> Any:
    """A LocalCluster (or dask-cuda LocalCUDACluster with gpu) whose workers start with worker_env()."""
    if gpu:
        import torch

        n = torch.cuda.device_count() or 1
    else:
        n = int(kwargs.get("n_workers") or 1)
    kwargs.setdefault("preload", [PRELOAD])
    env = worker_env(n)
    # the nanny prefers os.environ over its config and writes its values back into os.environ:
    # set ours for the spawn, then give this process its environment back
    saved = {k: os.environ.get(k) for k in (*env, TRIM)}
    os.environ.pop(TRIM, None)
    os.environ.update(env)
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
            if gpu:
                from dask_cuda import LocalCUDACluster

                return LocalCUDACluster(**kwargs)
            return distributed.LocalCluster(**kwargs)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def dask_setup(worker: Any) -> None:
    """Worker preload: import the task code now; at exit, skip the interpreter teardown.

    The import runs before the worker registers (in a thread it raced the first task's own
    imports: Python's import deadlock detection fired); a cluster started in the background
    (`lens run`) overlaps it with the rest of the start-up.
    """
    atexit.register(os._exit, 0)  # runs after Prefect's queue drains (threading's exit hooks)
    with contextlib.suppress(Exception):
        importlib.import_module("tasks.chain")  # torch, Prefect, the stages
