"""A LENS run from a notebook, without Prefect or Dask: set up a run, then run its stages.

    info = prepare_run(make_config(...))
    for slug in info.slugs:
        run_class(info, slug)

Where the parts live: run set-up (`lens_core.run`), the model cache (`lens_core.model_cache`),
stage bookkeeping (`lens_core.tracking`), the stage bodies (`lens_core.stages`), summaries
(`lens_core.summary`), the store layout (`lens_core.layout`).
"""

from lens_core.layout import CLASS_STAGES
from lens_core.model_cache import get_split
from lens_core.run import RunInfo, check_model, prepare_run, resolve_data_url
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
    "RunInfo",
    "StageError",
    "check_model",
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
