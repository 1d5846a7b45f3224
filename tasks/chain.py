"""The per-class chain: one Dask submission per class that runs its four stage tasks in order.

Why a chain task: every task submitted to Dask pays an orchestration round trip (its cost is in
docs/performance.md). Submitting one chain per class and calling the stage tasks inside it keeps
every stage a named, retried task run in the Prefect UI (`factorize[espresso]`) while paying the
Dask round trip once per class.

The flow sends each chain `info.narrowed([slug])`: Prefect walks every task parameter, and a
RunInfo of every class would be walked at submission and again in each task run.
"""

from __future__ import annotations

from typing import Any, TypedDict

from prefect import task
from prefect.cache_policies import NO_CACHE

from lens_core.renders import pending_items
from lens_core.run import RunInfo
from lens_core.summary import class_summary
from tasks.class_tasks import STAGE_TASKS
from tasks.wrapping import scrubbed, tagged


class StageRecord(TypedDict):
    """One stage of a chain: whether it was skipped (done before) and its seconds."""

    skipped: bool
    seconds: float


# What a class chain returns to the flow: the class's slug, its stages, its summary (stage
# states, top concept) and the (class, concept) renders still to do.
ChainResult = TypedDict(
    "ChainResult",
    {
        "class": str,
        "stages": dict[str, StageRecord],
        "summary": dict[str, Any],
        "render_items": list[tuple[str, int]],
    },
)


@task(name="class", task_run_name="class[{slug}]", cache_policy=NO_CACHE, persist_result=False)
@scrubbed
def class_chain_task(
    info: RunInfo, slug: str, device: str | None = None, limited: tuple[str, ...] = ()
) -> ChainResult:
    """Run the class's stages in order (activations -> factorize -> importance -> crops); the
    first failure stops it.

    limited: the tags that have a Prefect concurrency limit (`tasks.wrapping.tagged`).

    """
    results = [tagged(t, limited)(info, slug, device) for t in STAGE_TASKS.values()]
    stages = {r["stage"]: StageRecord(skipped=r["skipped"], seconds=r["seconds"]) for r in results}
    # read here, on the worker and in parallel, rather than class by class in the flow
    return {
        "class": slug,
        "stages": stages,
        "summary": class_summary(info, slug),
        "render_items": pending_items(info, [slug]),
    }
