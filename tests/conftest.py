"""Shared fixtures: a real S3 server (SeaweedFS on loopback, credentials enforced), a real Prefect
API (the test harness), a headless Chromium, and reading task runs and artifacts back from Prefect.

Test helper modules (s3server, site_fixtures, faultkit) are importable through pytest's
`pythonpath` setting (pyproject.toml).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from s3server import S3Server, start_s3_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [  # no sandbox as root, and no background connections on a machine without internet
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS S3 for the session: .endpoint_url, .key, .secret, .storage_options,
    .new_bucket()."""
    server = start_s3_server(tmp_path_factory.mktemp("weed"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def bucket(s3: S3Server) -> str:
    """A fresh, empty bucket for one test."""
    return s3.new_bucket()


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[str]:
    """A real temporary Prefect server (SQLite) for the module; yields its API URL."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def read_task_runs(flow_run_id: Any) -> list[Any]:
    """The task runs of a flow run,
    once they are all final (they reach the API shortly after the flow)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs: list[Any] = []
    with get_client(sync_client=True) as client:
        flt = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        for _ in range(20):
            runs = client.read_task_runs(flow_run_filter=flt, limit=200)
            if runs and all(r.state is not None and r.state.is_final() for r in runs):
                return runs
            time.sleep(0.5)
    return runs


def read_artifact(key: str) -> Any:
    """The latest artifact with this key, or None."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    return arts[0] if arts else None


@pytest.fixture
def task_runs() -> Callable[[Any], list[Any]]:
    """read_task_runs, for tests on a real Prefect API."""
    return read_task_runs


@pytest.fixture
def artifact() -> Callable[[str], Any]:
    """read_artifact, for tests on a real Prefect API."""
    return read_artifact


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Debian Chromium driven by Playwright (never Playwright's own browser download)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()
