"""A temporary Prefect API for one `lens run`, started early and stopped quietly.

Without `PREFECT_API_URL`, Prefect starts an ephemeral server when the flow begins (seconds
during which nothing else happens: docs/performance.md) and prints its log lines and telemetry
errors.
`lens run` starts the same server (uvicorn + Prefect's app factory, SQLite under PREFECT_HOME)
as its very first step, so it boots while the CLI imports torch and prepares the run; its output
goes to a log file, named in the error if it fails to start.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TemporaryAPI:
    """`start()` returns at once; `wait()` blocks until /api/health answers, then returns the
    API URL."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        fd, name = tempfile.mkstemp(prefix="lens-prefect-api-", suffix=".log")
        os.close(fd)
        self.log = Path(name)
        self.proc: subprocess.Popen | None = None
        self._ready = threading.Event()
        self._error: str | None = None

    def start(self) -> TemporaryAPI:
        # no import here: the server loads in its own process
        spec = importlib.util.find_spec("prefect")
        app_dir = Path(spec.origin).parent.parent if spec and spec.origin else Path(".")
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "--app-dir",
                    str(app_dir),
                    "--factory",
                    "prefect.server.api.server:create_app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--log-level",
                    "error",
                    "--lifespan",
                    "on",
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        threading.Thread(target=self._poll, name="lens-api-health", daemon=True).start()
        return self

    def _poll(self) -> None:
        import httpx

        while self.proc is not None and self.proc.poll() is None:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    self._ready.set()
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self._error = (
            f"the Prefect API server exited (code {self.proc.returncode if self.proc else '?'})"
        )
        self._ready.set()

    def wait(self, timeout: float = 120.0) -> str:
        if not self._ready.wait(timeout) or self._error:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            self.stop(keep_log=True)
            raise RuntimeError(
                f"{self._error or 'the Prefect API server did not start in time'}; "
                f"log {self.log}:\n{tail}"
            )
        return self.url

    def stop(self, keep_log: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if not keep_log:
            self.log.unlink(missing_ok=True)


def drain_prefect_queues(timeout: float = 10.0) -> None:
    """Deliver the events and logs this process still holds to the API (before stopping it)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):  # best effort at shutdown
            service.drain_all(timeout=timeout)
