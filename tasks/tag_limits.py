"""Tag concurrency limits without one Prefect service per distinct tag set.

Prefect 3.8's task engine acquires a slot on ``tag:<tag>`` for every tag of a task run, through a
service (a thread and an API client) per distinct *set* of tags, made on first use and kept for
the life of the process. LENS tags every stage task with its class (``class:<slug>``), so each
task run paid for a new service: about 0.7 s per task run on 2 cores (4-5 per class), and
thousands of idle threads at 1,000 classes.

`install()` narrows the names the engine asks for to the tags that have a limit on the server
(listed once per process, refreshed every `REFRESH_S`): a limit on `gpu` or `stage:render` is
still honoured, and a task whose tags have no limit makes no call. When the limits cannot be
listed, nothing is filtered (Prefect's own behaviour).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

REFRESH_S = 60.0
_lock = threading.Lock()
_cache: dict[str, Any] = {"at": -1e9, "names": None}


def limited_names() -> frozenset[str] | None:
    """Names of the server's concurrency limits (`tag:<tag>` ones included); None if unknown."""
    now = time.monotonic()
    with _lock:
        if now - _cache["at"] < REFRESH_S:
            return _cache["names"]
    names: frozenset[str] | None = None
    with contextlib.suppress(Exception):
        from prefect.client.orchestration import SyncPrefectClient
        from prefect.context import get_run_context

        client = get_run_context().client  # the run's own client: no new connection, no new server
        if isinstance(client, SyncPrefectClient):
            found: list[str] = []
            while True:
                page = client.read_global_concurrency_limits(limit=200, offset=len(found))
                found += [limit.name for limit in page]
                if len(page) < 200:
                    break
            names = frozenset(found)
    with _lock:
        _cache.update(at=now, names=names)
    return names


def _narrowed(real: Any) -> Any:
    @contextlib.contextmanager
    def concurrency(names: str | list[str], *args: Any, **kwargs: Any) -> Iterator[None]:
        wanted = [names] if isinstance(names, str) else list(names)
        known = limited_names() if wanted else frozenset()
        if known is not None:
            wanted = [n for n in wanted if n in known]
        with real(wanted, *args, **kwargs):
            yield

    concurrency.lens_narrowed = True  # type: ignore[attr-defined]
    return concurrency


def install() -> None:
    """Patch Prefect's sync task engine (idempotent; LENS task processes only)."""
    import prefect.task_engine as engine

    if not getattr(engine._concurrency, "lens_narrowed", False):
        engine._concurrency = _narrowed(engine._concurrency)
