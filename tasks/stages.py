"""Prefect tasks, one per stage: naming (`factorize[espresso]`), tags, retries on transient I/O.

Each task calls one lens_core function; skipping a finished stage happens there (completion
markers), so a re-run returns at once for everything already done.
"""

from __future__ import annotations

import errno
import socket
import time
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from lens_core import atlas, pipeline, publish, render
from lens_core.pipeline import RunInfo
from lens_core.store import LeaseLostError
from tasks import tag_limits

tag_limits.install()  # per-class tags would otherwise cost a Prefect service per task run (tag_limits.py)

# Exceptions worth another try: network and storage hiccups, not bad input or bad code.
_TRANSIENT = (ConnectionError, TimeoutError, socket.timeout, LeaseLostError)  # lost lease: retry, reuse
_TRANSIENT_ERRNO = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE, errno.EAGAIN}
_TRANSIENT_NAMES = {"ClientError", "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                    "ServerDisconnectedError", "ClientConnectorError", "ClientOSError", "ResponseStreamingError"}


def is_transient(err: BaseException | None) -> bool:
    """True for network/storage errors that a retry can fix (walks the exception chain)."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, _TRANSIENT) or type(err).__name__ in _TRANSIENT_NAMES:
            return True
        if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNO:
            return True
        err = err.__cause__ or err.__context__
        seen += 1
    return False


def retry_if_transient(task_obj: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry I/O hiccups only; bad input fails at once."""
    try:
        state.result(raise_on_failure=True)
    except BaseException as err:  # noqa: BLE001 - we only classify it
        return is_transient(err)
    return False


_COMMON = {"retries": 3, "retry_delay_seconds": [1, 4, 10], "retry_condition_fn": retry_if_transient,
           "cache_policy": NO_CACHE, "persist_result": False}


@task(name="activations", task_run_name="activations[{slug}]", tags=["stage:activations", "gpu"], **_COMMON)
def activations_task(info: RunInfo, slug: str, device: str | None = None) -> dict[str, Any]:
    return pipeline.stage_activations(info, slug, device)


@task(name="factorize", task_run_name="factorize[{slug}]", tags=["stage:factorize"], **_COMMON)
def factorize_task(info: RunInfo, slug: str, device: str | None = None) -> dict[str, Any]:
    return pipeline.stage_factorize(info, slug, device)


@task(name="importance", task_run_name="importance[{slug}]", tags=["stage:importance", "gpu"], **_COMMON)
def importance_task(info: RunInfo, slug: str, device: str | None = None) -> dict[str, Any]:
    return pipeline.stage_importance(info, slug, device)


@task(name="crops", task_run_name="crops[{slug}]", tags=["stage:crops"], **_COMMON)
def crops_task(info: RunInfo, slug: str, device: str | None = None) -> dict[str, Any]:
    return pipeline.stage_crops(info, slug, device)


@task(name="render", task_run_name="render[{label}]", tags=["stage:render", "gpu"], **_COMMON)
def render_task(info: RunInfo, items: list[tuple[str, int]], label: str, device: str | None = None) -> dict[str, Any]:
    """Render one pooled batch of concepts (from any classes) with MACO."""
    t0 = time.perf_counter()
    out = render.render_batch(info, items, device)
    out["marked"] = render.finalize_viz(info, sorted({s for s, _ in items}))
    out["seconds"] = time.perf_counter() - t0
    return out


@task(name="cross-class", task_run_name="cross-class", tags=["stage:cross-class"], **_COMMON)
def cross_class_task(info: RunInfo) -> dict[str, Any]:
    t0 = time.perf_counter()
    return {**atlas.build_cross_class(info), "task_seconds": time.perf_counter() - t0}


@task(name="publish-pages", task_run_name="publish-pages", tags=["stage:publish"], **_COMMON)
def publish_pages_task(info: RunInfo, publish_url: str | None = None) -> dict[str, Any]:
    """Class pages, data files and assets of the run's site (batched writes: one task, not one per page)."""
    t0 = time.perf_counter()
    return {**publish.publish_pages(info, publish_url), "task_seconds": time.perf_counter() - t0}


@task(name="publish-index", task_run_name="publish-index", tags=["stage:publish"], **_COMMON)
def publish_index_task(info: RunInfo, site: dict[str, Any], publish_url: str | None = None) -> dict[str, Any]:
    """The run's index, search data and method page, then the runs page: only after every page is written."""
    t0 = time.perf_counter()
    return {**publish.publish_index(info, site, publish_url), "task_seconds": time.perf_counter() - t0}
