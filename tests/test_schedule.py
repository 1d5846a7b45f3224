"""Scheduled runs fire: a real `prefect server` with its scheduler on (short loops) creates the runs
of an interval deployment, a served flow completes them, and the server logs no scheduler error.

This is what a fresh install broke once (SQLAlchemy 2.1 under Prefect 3.8.8: "Can't evaluate bulk
DML statement" on every scheduler loop, so an interval deployment never got a run). The deploy tests
start runs by hand or by event, so only a test that waits for the schedule itself can see it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_deploy import BIN, Stack, _healthy, _start, _start_server

DEPLOYMENT = "tick/every-3s"
INTERVAL = 3  # seconds between scheduled runs
WANT_COMPLETED = 2

FLOW = f"""
from prefect import flow


@flow
def tick() -> str:
    return "tock"


if __name__ == "__main__":
    tick.serve(name="every-3s", interval={INTERVAL}, limit=1)
"""

# what a broken scheduler writes to the server log (seen with SQLAlchemy 2.1.9: an ERROR line for
# each failed schedule_deployments / schedule_recent_deployments, then the traceback), and any crash
SCHEDULER_ERRORS = ("Can't evaluate bulk DML", "InvalidRequestError", "Traceback")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A server whose scheduler loops every second, and `flow.serve` of a 3-second interval flow."""
    root = tmp_path_factory.mktemp("schedule")
    scheduler = {
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "true",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
        "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1",
        "PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS": "20",
    }
    api, base, home, server = _start_server(root, scheduler)
    st = Stack(api, base, home, bucket="", config_path=root, prefix="", s3=None, procs=[server])
    try:
        script = root / "tick_flow.py"
        script.write_text(FLOW)
        st.wait("the Prefect server's /api/health", lambda: _healthy(api), timeout=90, every=0.5)
        st.procs.append(
            _start(
                "serve",
                [str(BIN / "python"), str(script)],
                {**base, "PREFECT_RUNNER_POLL_FREQUENCY": "1"},
                root,
            )
        )
        yield st
    finally:
        for p in reversed(st.procs):  # the served flow before the server
            p.stop(signals=2 if p.name == "serve" else 1)


def _deployment_runs() -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(DEPLOYMENT)
        except ObjectNotFound:
            return []
        flt = FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[dep.id]))
        return client.read_flow_runs(flow_run_filter=flt, limit=200)


@pytest.mark.slow
def test_an_interval_deployment_gets_its_runs_created_and_completed(served: Stack) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    t0 = time.monotonic()
    with temporary_settings(updates={PREFECT_API_URL: served.api}):

        def completed() -> list[Any]:
            runs = _deployment_runs()
            done = [r for r in runs if r.state is not None and r.state.is_completed()]
            return done if len(done) >= WANT_COMPLETED else []

        done = served.wait(
            f"{WANT_COMPLETED} completed scheduled runs of {DEPLOYMENT}",
            completed,
            timeout=75,
            every=1.0,
        )
        runs = _deployment_runs()
    scheduled = [r for r in runs if r.auto_scheduled]
    # the scheduler made them (nothing here creates a run by hand), several intervals ahead
    assert all(r.auto_scheduled for r in done), [(r.name, r.auto_scheduled) for r in done]
    assert len(scheduled) >= WANT_COMPLETED + 1, f"{len(scheduled)} scheduled runs"
    times = sorted(r.expected_start_time for r in scheduled)
    assert {round((b - a).total_seconds()) for a, b in zip(times, times[1:], strict=False)} == {
        INTERVAL
    }
    log = served.procs[0].log.read_text(errors="replace")
    bad = [
        line
        for line in log.splitlines()
        if any(e in line for e in SCHEDULER_ERRORS) or ("| ERROR" in line and "schedul" in line)
    ]
    assert not bad, (
        "scheduler errors in the server log:\n" + "\n".join(bad[:5]) + "\n" + served.logs()
    )
    print(
        f"{len(scheduled)} runs scheduled, {len(done)} "
        f"completed within {time.monotonic() - t0:.0f} s"
    )
