"""The per-class chain: one Dask submission per class that runs its four stage tasks in order.

Why a chain task: every task submitted to Dask pays an orchestration round trip (its cost is in
docs/performance.md). Submitting one chain per class and calling the stage tasks inside it keeps
every stage a named, retried task run in the Prefect UI (`factorize[espresso]`) while paying the
Dask round trip once per class.

The flow sends each chain `info.narrowed([slug])`: Prefect walks every task parameter, and a
RunInfo of every class would be walked at submission and again in each task run.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from lens_core.run import RunInfo
from lens_core.summary import class_summary
from lens_core.viz_pool import pending_items
from tasks.stages import (
    activations_task,
    crops_task,
    factorize_task,
    importance_task,
    scrubbed,
    tagged,
)

STAGE_TASKS = (activations_task, factorize_task, importance_task, crops_task)


@task(name="class", task_run_name="class[{slug}]", cache_policy=NO_CACHE, persist_result=False)
@scrubbed
def class_chain_task(
    info: RunInfo, slug: str, device: str | None = None, limited: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Run activations -> factorize -> importance -> crops for one class; the first failure stops it.

    limited: the tags that have a Prefect concurrency limit (`tasks.stages.tagged`).

    Returns per-stage skipped/seconds, the class's summary (`class_summary`: stage states, top
    concept) and the (class, concept) renders still to do.
    """
    results = [tagged(stage_task, limited)(info, slug, device) for stage_task in STAGE_TASKS]
    stages = {
        r["stage"]: {"skipped": bool(r.get("skipped")), "seconds": r["seconds"]} for r in results
    }
    # read here, on the worker and in parallel, rather than class by class in the flow
    return {
        "class": slug,
        "stages": stages,
        "summary": class_summary(info, slug),
        "render_items": pending_items(info, [slug]),
    }
