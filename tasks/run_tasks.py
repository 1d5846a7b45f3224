"""The once-per-run Prefect tasks: cross-class, changes, mistakes and the site's publication.

Each runs every class at once (milliseconds per class: one task for all costs less to
orchestrate than one per class) and reports its own compute time as `task_seconds`.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import task

from lens_core import changes, confusions, cross_class, publish
from lens_core.run import RunInfo
from tasks.wrapping import TASK_OPTIONS, scrubbed


@task(name="cross-class", task_run_name="cross-class", **TASK_OPTIONS)
@scrubbed
def cross_class_task(info: RunInfo) -> dict[str, Any]:
    """Concepts compared across classes (the run's similarity data)."""
    t0 = time.perf_counter()
    return {**cross_class.build_cross_class(info), "task_seconds": time.perf_counter() - t0}


@task(name="changes", task_run_name="changes", **TASK_OPTIONS)
@scrubbed
def changes_task(info: RunInfo) -> dict[str, Any]:
    """What changed since the previous checkpoint; labels carry over here."""
    t0 = time.perf_counter()
    return {**changes.compare_with_previous(info), "task_seconds": time.perf_counter() - t0}


@task(name="mistakes", task_run_name="mistakes", **TASK_OPTIONS)
@scrubbed
def mistakes_task(info: RunInfo, device: str | None = None) -> dict[str, Any]:
    """Mistakes explained by concepts, every pair of classes at once (`atlas/confusions.json`;
    skipped when it records the same inputs). It runs g on example images: tagged `gpu`."""
    t0 = time.perf_counter()
    out = confusions.build_confusions(info, device)
    return {**out, "task_seconds": time.perf_counter() - t0}


@task(name="publish-pages", task_run_name="publish-pages", **TASK_OPTIONS)
@scrubbed
def publish_pages_task(
    info: RunInfo, publish_url: str | None = None, skip: list[str] | None = None
) -> dict[str, Any]:
    """Class pages, data files and assets of the run's site (batched writes: one task, not one per
    page); `skip`: assets already written while the run went on (`PartialSite.written`)."""
    t0 = time.perf_counter()
    out = publish.publish_pages(info, publish_url, skip=set(skip) if skip else ())
    return {**out, "task_seconds": time.perf_counter() - t0}


@task(name="publish-index", task_run_name="publish-index", **TASK_OPTIONS)
@scrubbed
def publish_index_task(
    info: RunInfo, site: dict[str, Any], publish_url: str | None = None
) -> dict[str, Any]:
    """The run's index, search data and method page, then the runs page: only after every page
    is written."""
    t0 = time.perf_counter()
    out = publish.publish_index(info, site, publish_url)
    return {**out, "task_seconds": time.perf_counter() - t0}
