"""The Dask task runner of LENS: prefect-dask's, with cheaper submissions and task-run starts.

Measured per task run submitted to Dask (2 cores, trivial task, one worker): about 55 ms in the
flow process, of which ~20 ms serialize Prefect's whole settings model (the same settings every
time) and ~20 ms are Dask tokenizing the submitted closure (cloudpickle, by value) to name the
task; and about 130 ms on the worker, half of it rebuilding those settings from the serialized
dict (pydantic-settings re-reads every environment source). At 1,000 classes that is minutes of
CPU taken from the two cores the stages compute on.

`LensDaskTaskRunner` submits with ``pure=False`` (a random Dask key instead of a hash: a Prefect
task run is never submitted twice, its run id is in the arguments) and sends the flow's settings
object itself, once built, instead of a dict to re-validate: 12 ms per submission and ~80 ms per
task run on the worker. The worker then uses exactly the flow's settings (the serialized dict
carried every value the flow had set anyway).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from prefect.context import SettingsContext
from prefect_dask import DaskTaskRunner
from prefect_dask.task_runners import PrefectDaskFuture


class _AsObjects(SettingsContext):
    """A settings context that serializes to its own objects: the worker's SettingsContext takes them as they are."""

    def serialize(self, include_secrets: bool = True) -> dict[str, Any]:
        return {"profile": self.profile, "settings": self.settings}  # what Prefect's dict rebuilds, secrets included


@contextmanager
def _settings_as_objects() -> Iterator[None]:
    current = SettingsContext.get()
    if current is None:
        yield
        return
    with _AsObjects.model_construct(profile=current.profile, settings=current.settings):
        yield


class LensDaskTaskRunner(DaskTaskRunner):
    """DaskTaskRunner (same arguments): submissions without Dask tokenization, settings sent as objects."""

    def submit(self, task: Any, parameters: dict[str, Any], wait_for: Iterable[Any] | None = None,
               dependencies: dict[str, Any] | None = None) -> PrefectDaskFuture:
        if not self._started:
            raise RuntimeError("The task runner must be started before submitting work.")
        parameters = self._optimize_futures(parameters)
        wait_for = self._optimize_futures(wait_for) if wait_for else None
        with _settings_as_objects():
            future = self.client.submit(task, parameters=parameters, wait_for=wait_for, dependencies=dependencies,
                                        return_type="state", pure=False)
        return PrefectDaskFuture(wrapped_future=future, task_run_id=future.task_run_id)
