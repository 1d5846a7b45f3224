"""LENS's Dask task runner: prefect-dask's DaskTaskRunner, with a cluster that starts in the
background, no announced dashboard that is not served, and submissions without Dask tokenization.

Dask's `Client.submit` hashes (tokenizes) a task's function and arguments unless `pure=False`;
for a Prefect task that is a cloudpickled closure over the task and its parameters, and a task
run is never submitted twice, so the hash buys nothing. `pure` is a public keyword of
`Client.submit`; the runner's public `client` property hands prefect-dask a client whose submit
passes it (what it buys per submitted task: bench/bench_runner.py).

prefect-dask starts its cluster on the first submission, in the flow's thread: the flow then
waits for every worker to start (each imports torch and Prefect) before anything else happens.
`start_in_background()` starts it in a thread instead, so that the flow sets up its run (data,
checkpoint digest, model check) meanwhile; the first submission waits for what is left.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from typing import Any

from prefect_dask import DaskTaskRunner

DASHBOARD_LINE = "The Dask dashboard is available at"


class _ImpureSubmits:
    """A Dask client whose `submit` passes `pure=False` (everything else is the client's own)."""

    def __init__(self, client: Any):
        self._client = client

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("pure", False)
        return self._client.submit(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def dashboard_served(link: str, timeout: float = 2.0) -> bool:
    """True when the Dask dashboard's page answers (a scheduler without one serves /health only)."""
    import httpx

    try:
        return httpx.get(link, timeout=timeout, follow_redirects=True).status_code == 200
    except httpx.HTTPError:
        return False


class _NoDeadDashboard(logging.Filter):
    """Drop prefect-dask's 'The Dask dashboard is available at <link>' when <link> gives 404."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(DASHBOARD_LINE):
            return True
        return dashboard_served(message[len(DASHBOARD_LINE) :].strip())


class LensDaskTaskRunner(DaskTaskRunner):
    """DaskTaskRunner (same arguments): submissions skip Dask's tokenization (`pure=False`), the
    cluster can start in the background (`start_in_background`), and the dashboard is announced
    only when it is served."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._client_lock = threading.Lock()
        self._starter: threading.Thread | None = None
        self._start_error: BaseException | None = None
        if not any(isinstance(f, _NoDeadDashboard) for f in self.logger.filters):
            self.logger.addFilter(_NoDeadDashboard())

    @property
    def client(self) -> Any:
        with self._client_lock:
            return _ImpureSubmits(super().client)

    def start_in_background(self) -> None:
        """Start (or connect to) the cluster in a thread; `client` waits for it. Idempotent."""
        if self._starter is not None or self._client:
            return

        def start() -> None:
            try:
                _ = self.client
            except BaseException as err:  # noqa: BLE001 - the next `client` access raises it again
                self._start_error = err

        self._starter = threading.Thread(target=start, name="lens-dask-start", daemon=True)
        self._starter.start()

    def ready(self) -> bool:
        """True once the cluster is up (or its start failed): a submission will not wait."""
        return bool(self._client) or (self._starter is not None and not self._starter.is_alive())

    def __getstate__(self) -> dict[str, Any]:
        # the flow (and its task runner) travels with every task sent to a Dask worker: no lock
        # or thread there (they are rebuilt empty on unpickle)
        state = self.__dict__.copy()
        state.pop("_client_lock", None)
        state["_starter"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._client_lock = threading.Lock()

    def __exit__(self, *args: Any) -> None:
        if self._starter is not None:
            self._starter.join()  # the cluster it starts is closed by the exit stack below
        super().__exit__(*args)


# ---- console output: a stage's failure is one line, not a traceback --------------------------


class _OneLineFailures(logging.Formatter):
    """Console formatter: records of a failed task run print without their traceback.

    Prefect logs every task run that fails for good at ERROR with its traceback. A class whose
    images are unreadable is a finding of the run (its status, the table artifact and the final
    message say it), not a crash of LENS: on the console it is one line. The traceback still
    reaches the Prefect API (the UI's task run logs): only the console's formatter skips it.
    """

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and "Task run failed" in str(record.msg):
            record = copy.copy(record)
            record.exc_info, record.exc_text = None, None
        return self.inner.format(record)


def quiet_task_failures() -> None:
    """Install `_OneLineFailures` on Prefect's console handlers in this process (idempotent)."""
    import prefect.logging  # noqa: F401 - Prefect configures its handlers on import

    for name in ("prefect", "prefect.task_runs", "prefect.flow_runs", ""):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(
                handler.formatter, _OneLineFailures
            ):
                with contextlib.suppress(Exception):
                    handler.setFormatter(_OneLineFailures(handler.formatter))
