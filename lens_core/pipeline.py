"""A LENS run from a notebook, without Prefect or Dask: set up a run, then run its stages.

    info = prepare_run(make_config(...))
    for slug in info.slugs:
        run_class(info, slug)

Where the parts live: run set-up (`lens_core.run`), the model cache (`lens_core.model_cache`),
stage bookkeeping (`lens_core.tracking`), the stage bodies (`lens_core.stages`), summaries
(`lens_core.summary`), the store layout (`lens_core.layout`).
"""

from typing import Any

from lens_core.config import AtlasConfig
from lens_core.layout import CLASS_STAGES
from lens_core.model_cache import get_split
from lens_core.run import RunInfo, prepare_run, resolve_data_url
from lens_core.stages import (
    class_complete,
    run_class,
    stage_activations,
    stage_crops,
    stage_factorize,
    stage_importance,
)
from lens_core.summary import class_summary
from lens_core.tracking import StageError

__all__ = [
    "CLASS_STAGES",
    "explain",
    "RunInfo",
    "StageError",
    "class_complete",
    "class_summary",
    "get_split",
    "prepare_run",
    "resolve_data_url",
    "run_class",
    "stage_activations",
    "stage_crops",
    "stage_factorize",
    "stage_importance",
]


def explain(config: AtlasConfig, device: str | None = None) -> dict[str, Any]:
    """The whole atlas in this process, in the flow's order (every class, renders, cross-class,
    changes since the previous checkpoint, mistakes explained by concepts, the site): what
    `lens run` does without Prefect or Dask."""
    from lens_core import changes, confusions, cross_class, publish, renders
    from lens_core.run import mark_finished

    info = prepare_run(config)
    failed = []
    for slug in info.slugs:
        try:
            run_class(info, slug, device)
        # one bad class never sinks the run (its status says why)
        except Exception as err:  # noqa: BLE001
            failed.append((slug, err))
    items = renders.pending_items(info)
    for i in range(0, len(items), config.maco.batch_size):
        renders.render_batch(info, items[i : i + config.maco.batch_size], device)
    renders.finalize_viz(info)
    cross_class.build_cross_class(info, device)
    changed = changes.compare_with_previous(info)
    mistakes = confusions.build_confusions(info, device)
    site = publish.publish(info)
    if not failed:
        mark_finished(info, publish.site_url(info))
    return {
        "info": info,
        "failed": [s for s, _ in failed],
        "changes": changed,
        "mistakes": mistakes,
        "site": site,
    }
