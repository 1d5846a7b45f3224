"""Shared fixtures: a real S3 server (SeaweedFS on loopback, credentials enforced)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from s3server import S3Server, start_s3_server  # noqa: E402


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS S3 for the session: .endpoint_url, .key, .secret, .storage_options, .new_bucket()."""
    server = start_s3_server(tmp_path_factory.mktemp("weed"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def bucket(s3: S3Server) -> str:
    """A fresh, empty bucket for one test."""
    return s3.new_bucket()
