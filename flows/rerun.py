"""A re-run of a finished run answers in seconds: no Prefect server, no Dask cluster (issue 24.4).

`lens run` on a run that is finished (`finished.json`) with the same inputs has nothing to
compute: the run id is the same (checkpoint digest, data URL, method settings), every class of
the selection is complete, no render is pending under the current `maco.top_k`, mistakes are
explained, and the site is at the publish URL. Checking that costs importing torch (the data
and stage modules need it), the checkpoint's sha256 and one listing of the class folders; the
model is not loaded (figures: docs/performance.md).

Anything else (a class missing or failed, a render pending, another publish URL without a site)
takes the normal path: the flow skips what is done, so the answer is the same, only slower.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from lens_core import layout
from lens_core.config import AtlasConfig
from lens_core.publish import site_url
from lens_core.run import RunInfo, planned_info
from lens_core.store import RunStore


@dataclass
class Finished:
    """A finished run with nothing left to compute for this config."""

    info: RunInfo  # the model not loaded: num_classes is provisional
    finished: dict[str, Any]  # finished.json
    site_written: bool  # the run's index page is at this config's publish URL


def finished_unchanged(config: AtlasConfig) -> Finished | None:
    """The finished run that `config` names when re-running it would compute nothing, else None
    (any error while checking: None, and the normal run says what is wrong)."""
    with contextlib.suppress(Exception):
        info = planned_info(config)
        store = RunStore(config.store, info.run_id, config.storage_options)
        finished = store.read_json(layout.FINISHED)
        if not isinstance(finished, dict) or not info.classes:
            return None
        from lens_core.renders import pending_items
        from lens_core.stages import class_complete

        if not all(class_complete(store, slug) for slug in info.slugs):
            return None
        if not store.exists(layout.CONFUSIONS) or pending_items(info):
            return None
        return Finished(info, finished, _site_exists(info))
    return None


def _site_exists(info: RunInfo) -> bool:
    from lens_core.store import filesystem

    url = f"{site_url(info)}/index.html"
    fs, path = filesystem(url, info.config.storage_options)
    return bool(fs.exists(path))


def republish(config: AtlasConfig) -> dict[str, Any]:
    """Publish a finished run's site again from its store, in this process (nothing recomputed):
    `lens run --force-publish`, or a finished run whose site is not at this publish URL."""
    from lens_core.publish import publish
    from lens_core.run import prepare_run

    info = prepare_run(config)  # the method as the run resolved it (the method page shows it)
    return {"info": info, **publish(info)}
