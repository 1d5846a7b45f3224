"""LENS's Dask task runner: prefect-dask's DaskTaskRunner, submitting without Dask tokenization.

Dask's `Client.submit` hashes (tokenizes) a task's function and arguments unless `pure=False`;
for a Prefect task that is a cloudpickled closure over the task and its parameters, and a task
run is never submitted twice, so the hash buys nothing. `pure` is a public keyword of
`Client.submit`; the runner's public `client` property hands prefect-dask a client whose submit
passes it. bench/bench_runner.py measures what it buys per submitted task.
"""

from __future__ import annotations

from typing import Any

from prefect_dask import DaskTaskRunner


class _ImpureSubmits:
    """A Dask client whose `submit` passes `pure=False` (everything else is the client's own)."""

    def __init__(self, client: Any):
        self._client = client

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("pure", False)
        return self._client.submit(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class LensDaskTaskRunner(DaskTaskRunner):
    """DaskTaskRunner (same arguments) whose submissions skip Dask's tokenization (`pure=False`)."""

    @property
    def client(self) -> Any:
        return _ImpureSubmits(super().client)
