"""Which task tags a Prefect concurrency limit names, read once per flow run.

A tag on a task run costs a slot request to the API (tasks.wrapping.tagged says what it cost), so
the flow tags its tasks only with what some limit names. A limit made while a run is going is
honoured from the next run on.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect.client.orchestration import get_client

from tasks.wrapping import CANDIDATE_TAGS

PAGE = 200


def limited_tags(logger: Any = None) -> tuple[str, ...]:
    """Candidate tags that a concurrency limit names on the run's API (`tag:<tag>` limits).

    When the limits cannot be listed, every candidate tag (Prefect's own behaviour: slower, never
    unbounded).
    """
    candidates = sorted({t for tags in CANDIDATE_TAGS.values() for t in tags})
    try:
        names: list[str] = []
        with get_client(sync_client=True) as client:
            while True:
                page = client.read_global_concurrency_limits(limit=PAGE, offset=len(names))
                names += [limit.name for limit in page]
                if len(page) < PAGE:
                    break
    except Exception as exc:  # noqa: BLE001 - any failure falls back to tagging everything
        (logger or logging.getLogger(__name__)).warning(
            "could not list Prefect concurrency limits (%s): tagging every task", type(exc).__name__
        )
        return tuple(candidates)
    limited = {n.removeprefix("tag:") for n in names if n.startswith("tag:")}
    return tuple(t for t in candidates if t in limited)
