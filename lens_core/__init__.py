"""LENS, the method without an orchestrator: usable from a notebook (no Prefect, no Dask).

    from lens_core import make_config, explain
    config = make_config({"data": {"url": "/data/val"}, "model": {"arch": "resnet50", ...}})
    result = explain(config)

The names below are the public API; each is imported on first use (PEP 562), so `import
lens_core` stays cheap (no torch) and a piece of it can be used alone.
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    # configuration and runs
    "AtlasConfig": "lens_core.config",
    "make_config": "lens_core.config",
    "load_config": "lens_core.config",
    "ConfigError": "lens_core.config",
    "RunInfo": "lens_core.run",
    "prepare_run": "lens_core.run",
    "run_class": "lens_core.stages",
    "explain": "lens_core.pipeline",
    "publish": "lens_core.publish",
    "build_confusions": "lens_core.confusions",
    "compute_run_id": "lens_core.identity",
    # a class's stored results
    "read_result": "lens_core.results",
    "ClassResult": "lens_core.results",
    # models
    "load_split_model": "lens_core.models",
    "SplitModel": "lens_core.models",
    "ModelError": "lens_core.models",
    # the method's pieces
    "make_extractor": "lens_core.extract",
    "ConceptExtractor": "lens_core.extract",
    "nmf": "lens_core.factorize",
    "project_nnls": "lens_core.factorize",
    "semi_nmf": "lens_core.seminmf",
    "concept_sobol": "lens_core.importance",
    "logit_contributions": "lens_core.importance",
    "logit_share": "lens_core.importance",
    "deletion_curve": "lens_core.importance",
    "render_concepts": "lens_core.maco",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'lens_core' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)


def __dir__() -> list[str]:
    return __all__
