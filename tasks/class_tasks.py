"""The per-class Prefect tasks, generated from lens_core's stage registry (`stages.CHAIN`), and
the render task (a pooled batch of concepts from any classes).

Each stage task runs one `lens_core.stages` stage for one class (`factorize[espresso]`); skipping
a finished stage happens there (completion markers), so a re-run returns at once for everything
already done.
"""

from __future__ import annotations

import time

from prefect import Task, task

from lens_core import renders
from lens_core.renders import RenderResult
from lens_core.run import RunInfo
from lens_core.stages import CHAIN
from lens_core.tracking import Stage, StageResult, run_stage
from tasks.wrapping import TASK_OPTIONS, scrubbed


def stage_task(stage: Stage) -> Task:
    """The Prefect task of one lens_core stage: named after it, its runs after the class."""

    def run(info: RunInfo, slug: str, device: str | None = None) -> StageResult:
        return run_stage(stage, info, slug, device)

    run.__name__ = run.__qualname__ = f"{stage.name}_task"  # Prefect keys a task by its qualname
    run.__doc__ = f"The {stage.name} stage of one class (lens_core.stages)."
    return task(name=stage.name, task_run_name=f"{stage.name}[{{slug}}]", **TASK_OPTIONS)(
        scrubbed(run)
    )


# a class's stage tasks, in the chain's order, by stage name
STAGE_TASKS: dict[str, Task] = {stage.name: stage_task(stage) for stage in CHAIN}


@task(name="render", task_run_name="{label}", **TASK_OPTIONS)
@scrubbed
def render_task(
    info: RunInfo,
    items: list[tuple[str, int]],
    label: str,  # noqa: ARG001 - names the task run
    device: str | None = None,
) -> RenderResult:
    """Render one pooled batch of concepts (from any classes) with MACO."""
    t0 = time.perf_counter()
    out = renders.render_batch(info, items, device)
    out["marked"] = renders.finalize_viz(info, sorted({s for s, _ in items}))
    out["seconds"] = time.perf_counter() - t0
    return out
