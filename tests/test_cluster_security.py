"""Who can use a LENS Dask cluster: only holders of its certificates (real LocalClusters, real TLS).

A Dask scheduler runs whatever a connected client submits, on workers that hold the run's
credentials: a client without the cluster's certificate must fail to connect, never run code.
"""

from __future__ import annotations

import importlib.util
import os
import stat
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import distributed
import pytest
from distributed.security import Security

from flows.cluster import local_cluster
from flows.tls import ROLES, client_kwargs_for, tls_security, write_tls_files

REPO = Path(__file__).resolve().parents[1]
REFUSED = (OSError, TimeoutError, distributed.comm.CommClosedError)  # what a refused client raises


def _touch(path: str) -> int:
    """Runs on a worker: leaves a mark that code ran there."""
    Path(path).write_text("ran")
    return 42


def _assert_cannot_run_code(address: str, tmp_path: Path, **client_kwargs: Any) -> None:
    """A client at `address` with these credentials fails to connect, and no code of it runs."""
    mark = tmp_path / f"mark-{len(list(tmp_path.iterdir()))}"
    with (
        pytest.raises(REFUSED),
        distributed.Client(address, timeout=5, set_as_default=False, **client_kwargs) as client,
    ):
        client.submit(_touch, str(mark), pure=False).result(timeout=10)
    assert not mark.exists()


def _assert_runs_code(client: distributed.Client, tmp_path: Path) -> None:
    mark = tmp_path / "ran-here"
    assert client.submit(_touch, str(mark), pure=False).result(timeout=30) == 42
    assert mark.read_text() == "ran"


def _http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture
def tls_dir(tmp_path: Path) -> Path:
    return write_tls_files(tmp_path / "tls")


@pytest.fixture
def lens_local_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The flow's own local cluster factory (one worker process), without the worker preload."""
    monkeypatch.delenv("LENS_DASK_LOCAL_TLS", raising=False)
    with local_cluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None, preload=[]
    ) as cluster:
        yield cluster


def test_local_cluster_serves_only_clients_with_its_certificate(
    lens_local_cluster: Any, tmp_path: Path
) -> None:
    """The flow's LocalCluster speaks TLS: its own client (and one connecting by address, as
    `lens run` does) runs code; plain tcp:// and a client with another CA's certificate cannot.
    Its HTTP port (no dashboard) answers /health only."""
    address = lens_local_cluster.scheduler_address
    assert address.startswith("tls://127.0.0.1:")
    with distributed.Client(lens_local_cluster, set_as_default=False) as client:
        _assert_runs_code(client, tmp_path)
    with distributed.Client(address, set_as_default=False) as client:  # the security loader
        assert client.submit(sum, [1, 2], pure=False).result(timeout=30) == 3
        http_port = client.scheduler_info()["services"]["dashboard"]
    assert _http_status(http_port, "/health") == 200  # no dashboard: its HTTP port says no more
    assert (
        _http_status(http_port, "/info/main/workers.html")
        == _http_status(http_port, "/json/identity.json")
        == 404
    )
    _assert_cannot_run_code("tcp://" + address.split("://", 1)[1], tmp_path)
    _assert_cannot_run_code(address, tmp_path, security=Security.temporary())


def test_generated_certificates_are_private_and_admit_only_their_holders(
    tls_dir: Path, tmp_path: Path
) -> None:
    """write_tls_files: a 0700 directory of 0600 files, no CA key; a cluster started with them
    (mutual TLS, as on Slurm/Kubernetes) runs code for the client certificate only."""
    assert stat.S_IMODE(tls_dir.stat().st_mode) == 0o700
    names = sorted(p.name for p in tls_dir.iterdir())
    assert names == sorted(["ca.pem", *(f"{r}.{ext}" for r in ROLES for ext in ("pem", "key"))])
    for p in tls_dir.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    server = tls_security(tls_dir)
    assert server.require_encryption
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None, security=server
    ) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tls://")
        with distributed.Client(
            address, security=tls_security(tls_dir, roles=("client",)), set_as_default=False
        ) as client:
            _assert_runs_code(client, tmp_path)
        _assert_cannot_run_code("tcp://" + address.split("://", 1)[1], tmp_path)
        _assert_cannot_run_code(address, tmp_path, security=Security.temporary())
        other = write_tls_files(tmp_path / "other-tls")  # same layout, another CA
        _assert_cannot_run_code(address, tmp_path, security=tls_security(other, roles=("client",)))


def test_tls_files_open_to_other_users_are_refused(tls_dir: Path) -> None:
    """A key readable by others or a CA anyone can replace is refused, and so is writing into a
    directory that others can read."""
    os.chmod(tls_dir / "client.key", 0o644)
    with pytest.raises(PermissionError, match="client.key"):
        tls_security(tls_dir, roles=("client",))
    os.chmod(tls_dir / "client.key", 0o600)
    os.chmod(tls_dir / "ca.pem", 0o666)  # anyone could swap the CA
    with pytest.raises(PermissionError, match="ca.pem"):
        tls_security(tls_dir, roles=("client",))
    os.chmod(tls_dir, 0o755)
    with pytest.raises(PermissionError):
        write_tls_files(tls_dir)  # will not write keys into a directory others can read


def test_task_runner_reaches_a_remote_scheduler_with_the_client_certificate(
    tls_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """make_task_runner(dask_address=tls://...) carries LENS_DASK_TLS_DIR's client certificate,
    which a real TLS cluster accepts; without it, or for tcp:// to another host, it refuses."""
    from flows.atlas import make_task_runner

    monkeypatch.delenv("LENS_DASK_ADDRESS", raising=False)
    monkeypatch.delenv("LENS_DASK_ALLOW_PLAINTEXT", raising=False)
    monkeypatch.delenv("LENS_DASK_TLS_DIR", raising=False)
    with pytest.raises(ValueError, match="LENS_DASK_TLS_DIR"):
        make_task_runner(dask_address="tls://10.1.2.3:8786")
    with pytest.raises(ValueError, match="plaintext"):
        make_task_runner(dask_address="tcp://10.1.2.3:8786")
    assert make_task_runner(dask_address="tcp://127.0.0.1:8786").client_kwargs == {
        "set_as_default": False
    }
    monkeypatch.setenv("LENS_DASK_ALLOW_PLAINTEXT", "1")
    make_task_runner(dask_address="tcp://10.1.2.3:8786")  # the explicit opt-out

    monkeypatch.setenv("LENS_DASK_TLS_DIR", str(tls_dir))
    with distributed.LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        security=tls_security(tls_dir),
    ) as cluster:
        runner = make_task_runner(dask_address=cluster.scheduler_address)
        security = runner.client_kwargs["security"]
        assert security.require_encryption and security.tls_client_cert == str(
            tls_dir / "client.pem"
        )
        # the client's only
        assert security.tls_worker_key is None and security.tls_scheduler_key is None
        with distributed.Client(cluster.scheduler_address, **runner.client_kwargs) as client:
            _assert_runs_code(client, tmp_path)
    assert client_kwargs_for("tls://10.1.2.3:8786")["security"].tls_client_key == str(
        tls_dir / "client.key"
    )


def _slurm_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "slurm_cluster", REPO / "deploy" / "slurm_cluster.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_slurm_cluster_is_tls_only_with_private_certificates_and_no_open_dashboard(
    tmp_path: Path,
) -> None:
    """deploy/slurm_cluster.py: tls://, mutual-TLS Security from a generated 0700 directory, the
    scheduler dashboard off (HTTP on 127.0.0.1 only), workers without a dashboard."""
    mod = _slurm_module()
    args = mod.parse_args(
        ["--partition", "gpu", "--tls-dir", str(tmp_path / "tls"), "--port", "9000"]
    )
    kw = mod.secure_cluster_kwargs(args)
    assert kw["protocol"] == "tls://"
    sec = kw["security"]
    assert isinstance(sec, Security) and sec.require_encryption
    assert sec.tls_worker_cert == str(tmp_path / "tls" / "worker.pem") and sec.tls_ca_file
    assert stat.S_IMODE((tmp_path / "tls").stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in (tmp_path / "tls").iterdir())
    opts = kw["scheduler_options"]
    assert (
        opts["port"] == 9000
        and opts["dashboard"] is False
        and opts["dashboard_address"].startswith("127.0.0.1:")
    )
    assert "--no-dashboard" in kw["worker_extra_args"]
    assert kw["worker_extra_args"][:2] == ["--resources", "GPU=1"]
    again = mod.secure_cluster_kwargs(args)["security"]  # a restart reuses the certificates
    assert again.tls_client_cert == sec.tls_client_cert
    assert (tmp_path / "tls" / "ca.pem").read_bytes() == Path(again.tls_ca_file).read_bytes()


def test_slurm_dry_run_job_script_uses_tls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The rendered job script starts each worker on tls:// with the worker certificate."""
    mod = _slurm_module()
    tls = tmp_path / "tls"
    assert (
        mod.main(
            [
                "--dry-run",
                "--tls-dir",
                str(tls),
                "--port",
                "0",
                "--log-directory",
                str(tmp_path / "logs"),
            ]
        )
        == 0
    )
    script = capsys.readouterr().out
    assert " tls://" in script and "--protocol tls://" in script and "tcp://" not in script
    assert (
        f"--tls-cert {tls / 'worker.pem'}" in script and f"--tls-key {tls / 'worker.key'}" in script
    )
    assert "--no-dashboard" in script


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
