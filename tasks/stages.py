"""Prefect tasks, one per stage: naming (`factorize[espresso]`, `render 3: 12 concepts of ...`), tags,
retries on transient I/O.

Each task calls one lens_core function; skipping a finished stage happens there (completion
markers), so a re-run returns at once for everything already done. A task's failure reaches
Prefect (its state message, its logs) as `StageFailed` with the error text scrubbed of
credentials: Prefect stores task states.

Tags are for concurrency limits only (`tagged`): `stage:<stage>` on every task, and `gpu` on the
units that compute on the GPU (the activations, importance and render tasks), once: a Prefect
concurrency limit on `gpu` bounds them without deadlocking the class chains that contain them
(the chain's only candidate is `stage:class`). A tag that no limit names is left off.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Collection
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from lens_core import changes, confusions, cross_class, publish, stages, viz_pool
from lens_core.run import RunInfo
from lens_core.secrets import error_text
from lens_core.store import is_transient

__all__ = ["StageFailed", "is_transient"]


class StageFailed(RuntimeError):
    """A stage task failed; the message is the scrubbed `Type: message` of the cause."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def scrubbed(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Re-raise any failure of `fn` as StageFailed: no credential reaches Prefect's task states."""

    @functools.wraps(fn)
    def run(info: RunInfo, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(info, *args, **kwargs)
        except StageFailed:
            raise
        except Exception as err:
            raise StageFailed(
                error_text(err, info.config.storage_options), is_transient(err)
            ) from None

    return run


def retry_if_transient(_task: Any, _task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry I/O hiccups (and lost leases) only; bad input fails at once."""
    try:
        state.result(raise_on_failure=True)
    except StageFailed as err:
        return err.transient
    except BaseException as err:  # noqa: BLE001 - we only classify it
        return is_transient(err)
    return False


# The tags each task may carry, by task name; `tagged` applies those that a limit names.
CANDIDATE_TAGS: dict[str, tuple[str, ...]] = {
    "class": ("stage:class",),
    "activations": ("stage:activations", "gpu"),
    "factorize": ("stage:factorize",),
    "importance": ("stage:importance", "gpu"),
    "crops": ("stage:crops",),
    "render": ("stage:render", "gpu"),
    "cross-class": ("stage:cross-class",),
    "changes": ("stage:changes",),
    "mistakes": ("stage:mistakes", "gpu"),
    "publish-pages": ("stage:publish",),
    "publish-index": ("stage:publish",),
}
_VARIANTS: dict[tuple[str, tuple[str, ...]], Any] = {}


def tagged(task_obj: Any, limited: Collection[str]) -> Any:
    """`task_obj` carrying those of its candidate tags that a Prefect concurrency limit names.

    Prefect 3.8 asks the API for a slot on every tag of a task run; on the default SQLite server
    that call met SQLITE_BUSY (a 503, retried after ~2 s) for nearly every tagged task run under
    two Dask workers: 2.45 s of overhead per class against 0.62 untagged (bench/bench_flow.py,
    20 classes). A tag that nothing limits buys nothing there, so it is left off.
    """
    tags = tuple(t for t in CANDIDATE_TAGS[task_obj.name] if t in limited)
    if not tags:
        return task_obj
    key = (task_obj.name, tags)
    if key not in _VARIANTS:
        _VARIANTS[key] = task_obj.with_options(tags=list(tags))
    return _VARIANTS[key]


_COMMON = {
    "retries": 3,
    "retry_delay_seconds": [1, 4, 10],
    "retry_condition_fn": retry_if_transient,
    "cache_policy": NO_CACHE,
    "persist_result": False,
}


@task(name="activations", task_run_name="activations[{slug}]", **_COMMON)
@scrubbed
def activations_task(info: RunInfo, slug: str, device: str | None = None) -> dict[str, Any]:
    return stages.stage_activations(info, slug, device)


@task(name="factorize", task_run_name="factorize[{slug}]", **_COMMON)
@scrubbed
def factorize_task(info: RunInfo, slug: str, device: str | None = None) -> dict[str, Any]:
    return stages.stage_factorize(info, slug, device)


@task(name="importance", task_run_name="importance[{slug}]", **_COMMON)
@scrubbed
def importance_task(info: RunInfo, slug: str, device: str | None = None) -> dict[str, Any]:
    return stages.stage_importance(info, slug, device)


@task(name="crops", task_run_name="crops[{slug}]", **_COMMON)
@scrubbed
def crops_task(info: RunInfo, slug: str, device: str | None = None) -> dict[str, Any]:
    return stages.stage_crops(info, slug, device)


@task(name="render", task_run_name="{label}", **_COMMON)
@scrubbed
def render_task(
    info: RunInfo,
    items: list[tuple[str, int]],
    label: str,  # noqa: ARG001 - names the task run
    device: str | None = None,
) -> dict[str, Any]:
    """Render one pooled batch of concepts (from any classes) with MACO."""
    t0 = time.perf_counter()
    out = viz_pool.render_batch(info, items, device)
    out["marked"] = viz_pool.finalize_viz(info, sorted({s for s, _ in items}))
    out["seconds"] = time.perf_counter() - t0
    return out


@task(name="cross-class", task_run_name="cross-class", **_COMMON)
@scrubbed
def cross_class_task(info: RunInfo) -> dict[str, Any]:
    t0 = time.perf_counter()
    return {**cross_class.build_cross_class(info), "task_seconds": time.perf_counter() - t0}


@task(name="changes", task_run_name="changes", **_COMMON)
@scrubbed
def changes_task(info: RunInfo) -> dict[str, Any]:
    """What changed since the previous checkpoint, every class at once (milliseconds per class: one
    task for all costs less to orchestrate than one per class); labels carry over here."""
    t0 = time.perf_counter()
    return {**changes.compare_with_previous(info), "task_seconds": time.perf_counter() - t0}


@task(name="mistakes", task_run_name="mistakes", **_COMMON)
@scrubbed
def mistakes_task(info: RunInfo, device: str | None = None) -> dict[str, Any]:
    """Mistakes explained by concepts, every pair of classes at once (`atlas/confusions.json`;
    skipped when it records the same inputs). It runs g on example images: tagged `gpu`."""
    t0 = time.perf_counter()
    return {**confusions.build_confusions(info, device), "task_seconds": time.perf_counter() - t0}


@task(name="publish-pages", task_run_name="publish-pages", **_COMMON)
@scrubbed
def publish_pages_task(
    info: RunInfo, publish_url: str | None = None, skip: list[str] | None = None
) -> dict[str, Any]:
    """Class pages, data files and assets of the run's site (batched writes: one task, not one per
    page); `skip`: assets already written while the run went on (`PartialSite.written`)."""
    t0 = time.perf_counter()
    out = publish.publish_pages(info, publish_url, skip=set(skip) if skip else ())
    return {**out, "task_seconds": time.perf_counter() - t0}


@task(name="publish-index", task_run_name="publish-index", **_COMMON)
@scrubbed
def publish_index_task(
    info: RunInfo, site: dict[str, Any], publish_url: str | None = None
) -> dict[str, Any]:
    """The run's index, search data and method page, then the runs page: only after every page is written."""
    t0 = time.perf_counter()
    return {
        **publish.publish_index(info, site, publish_url),
        "task_seconds": time.perf_counter() - t0,
    }
