"""What every LENS task shares: its failure scrubbed of credentials, retries on transient I/O
only, and the concurrency tags that a Prefect limit names.

A task's failure reaches Prefect (its state message, its logs) as `StageFailed` with the error
text scrubbed of credentials: Prefect stores task states.

Tags are for concurrency limits only (`tagged`): `stage:<stage>` on every task, and `gpu` on the
units that compute on the GPU (the activations, importance and render tasks), once: a Prefect
concurrency limit on `gpu` bounds them without deadlocking the class chains that contain them
(the chain's only candidate is `stage:class`). A tag that no limit names is left off.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from typing import Any

from prefect.cache_policies import NO_CACHE

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
    """Prefect retry condition: retry I/O hiccups (and lost leases) only; bad input fails at
    once."""
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

    Prefect 3.8 asks the API for a slot on every tag of a task run, which costs a round trip
    (and busy retries on the default SQLite server: docs/performance.md). A tag that nothing
    limits buys nothing, so it is left off.
    """
    tags = tuple(t for t in CANDIDATE_TAGS[task_obj.name] if t in limited)
    if not tags:
        return task_obj
    key = (task_obj.name, tags)
    if key not in _VARIANTS:
        _VARIANTS[key] = task_obj.with_options(tags=list(tags))
    return _VARIANTS[key]


# Every LENS task: retried on transient I/O only, no result cache (the run store is the cache).
TASK_OPTIONS: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": [1, 4, 10],
    "retry_condition_fn": retry_if_transient,
    "cache_policy": NO_CACHE,
    "persist_result": False,
}
