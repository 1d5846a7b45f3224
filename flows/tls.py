"""TLS for LENS Dask clusters: the certificates and keys, and the dask Security of each side.

A scheduler runs whatever code a connected client sends, so only holders of the cluster's
certificates may connect (docs/deploy.md, "Who can use a Dask cluster").
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import os
import weakref
from pathlib import Path
from typing import Any

import dask
from distributed.comm.addressing import get_address_host, parse_address
from distributed.security import Security

from lens_core.settings import settings

# A Dask scheduler runs any function a connected client sends, on workers that hold AWS_*
# credentials, and workers listen for the scheduler and for each other: a plaintext port is open
# to every user of the machine (loopback included) or of the network. LENS clusters speak TLS and
# refuse a peer without a certificate signed by the cluster's own CA (Dask verifies both ends).
# A local cluster gets fresh in-memory credentials (local_security); a multi-host one (Slurm,
# Kubernetes) the files that write_tls_files (`python -m flows.cluster tls-certs DIR`) generates,
# which the flow side finds through LENS_DASK_TLS_DIR.

TLS_DIR_ENV = "LENS_DASK_TLS_DIR"  # a directory written by write_tls_files: the flow side's certs
PLAINTEXT_ENV = "LENS_DASK_ALLOW_PLAINTEXT"  # "1": accept a tcp:// scheduler on another host
SECURITY_LOADER = "flows.tls.security_loader"
ROLES = ("scheduler", "worker", "client")
CA_FILE = "ca.pem"
_LOCAL: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def local_security() -> Security | None:
    """Fresh in-memory TLS credentials for a local cluster (None when LENS_DASK_LOCAL_TLS=0).

    Loopback is no boundary on a shared machine: every local user can connect to 127.0.0.1. Its
    cost is small against a LENS stage (docs/deploy.md).
    """
    if not settings().dask_local_tls:
        return None
    return Security.temporary()


def register_local(cluster: Any) -> Any:
    """Let clients of this process that connect by address alone find the cluster's credentials."""
    if cluster.scheduler_address.startswith("tls://"):
        _LOCAL[cluster.scheduler_address] = cluster
        if not dask.config.get("distributed.client.security-loader", None):
            dask.config.set({"distributed.client.security-loader": SECURITY_LOADER})
    return cluster


def cert_paths(directory: str | os.PathLike[str], role: str) -> tuple[Path, Path]:
    """(certificate, key) files of one role in a TLS directory."""
    d = Path(directory)
    return d / f"{role}.pem", d / f"{role}.key"


def write_tls_files(directory: str | os.PathLike[str], days: int = 365) -> Path:
    """A fresh CA and a certificate + key per role (scheduler, worker, client) in `directory`.

    The directory is made 0700 and each file 0600. The CA's key is never written: nobody can mint
    another certificate for this cluster; rotating means writing a new set and restarting.
    """
    from cryptography.hazmat.primitives.asymmetric import ec

    d = _private_dir(Path(directory).expanduser())
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate("LENS Dask CA", ca_key.public_key(), None, ca_key, days)
    _write_private(d / CA_FILE, _pem_cert(ca_cert))
    for role in ROLES:
        key = ec.generate_private_key(ec.SECP256R1())
        cert_file, key_file = cert_paths(d, role)
        _write_private(key_file, _pem_key(key))
        _write_private(
            cert_file,
            _pem_cert(_certificate(f"lens-dask-{role}", key.public_key(), ca_cert, ca_key, days)),
        )
    return d


def ensure_tls_files(directory: str | os.PathLike[str], days: int = 365) -> Path:
    """The TLS directory as it is when complete (and private), else a freshly written set."""
    d = Path(directory).expanduser()
    files = [d / CA_FILE, *(p for role in ROLES for p in cert_paths(d, role))]
    if all(p.is_file() for p in files):
        check_private(files)
        return d
    return write_tls_files(d, days)


def check_private(files: list[Path]) -> None:
    """Refuse TLS files that other users can read or change (as ssh refuses a readable key).

    Group read is allowed, and the directory is not checked: Kubernetes mounts a secret as
    group-readable files (the pod's fsGroup) in a world-writable, sticky directory.
    """
    for p in files:
        mode = p.stat().st_mode & 0o777
        if mode & 0o027:
            raise PermissionError(
                f"{p} is open to other users (mode {oct(mode)}): chmod 600 it, or write a new set"
            )


def tls_security(directory: str | os.PathLike[str], roles: tuple[str, ...] = ROLES) -> Security:
    """Dask Security from a TLS directory: encryption required, the certificate of each role
    present."""
    d = Path(directory).expanduser()
    kwargs: dict[str, str] = {}
    for role in roles:
        cert_file, key_file = cert_paths(d, role)
        if cert_file.is_file() and key_file.is_file():
            kwargs[f"tls_{role}_cert"], kwargs[f"tls_{role}_key"] = str(cert_file), str(key_file)
    if not (d / CA_FILE).is_file() or not kwargs:
        raise FileNotFoundError(
            f"{d} holds no Dask TLS certificates for {'/'.join(roles)} "
            "(write them with `python -m flows.cluster tls-certs DIR`)"
        )
    check_private([d / CA_FILE, *map(Path, kwargs.values())])
    return Security(require_encryption=True, tls_ca_file=str(d / CA_FILE), **kwargs)


def client_security(address: str) -> Security | None:
    """Credentials to reach `address`: a local cluster of this process's, else
    LENS_DASK_TLS_DIR's."""
    local = _LOCAL.get(address)
    if local is not None:
        return local.security
    tls_dir = settings().dask_tls_dir or None
    if tls_dir and address.startswith("tls://"):
        return tls_security(tls_dir, roles=("client",))
    return None


def security_loader(info: dict[str, Any]) -> Security | None:
    """Dask's `distributed.client.security-loader`: a Client given only an address finds its
    certs."""
    return client_security(str(info.get("address") or ""))


def client_kwargs_for(address: str) -> dict[str, Any]:
    """Client arguments for the scheduler at `address`; plaintext to another host is refused.

    A tcp:// client sends every task (with the flow's settings) in clear to whoever answers, and
    such a scheduler runs anyone's code: LENS_DASK_ALLOW_PLAINTEXT=1 overrides, at your own risk.
    """
    scheme, _ = parse_address(address)
    if scheme == "tls":
        security = client_security(address) or Security()
        if not security.get_tls_config_for_role("client").get("cert"):
            raise ValueError(
                f"the Dask scheduler {address} requires a client certificate: set "
                f"{TLS_DIR_ENV} to the directory of the cluster's certificates (docs/deploy.md)"
            )
        return {"security": security}
    if scheme != "inproc" and not _is_loopback(address) and not settings().dask_allow_plaintext:
        raise ValueError(
            f"refusing the plaintext Dask scheduler {address}: whoever can reach it can run code "
            f"with this flow's credentials; start it with TLS (docs/deploy.md) "
            f"or set {PLAINTEXT_ENV}=1"
        )
    return {}


def _is_loopback(address: str) -> bool:
    try:
        host = get_address_host(address)
    except ValueError:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _private_dir(d: Path) -> Path:
    """`d`, created 0700 if missing; an existing one must be this user's and closed to others."""
    if not d.exists():
        d.parent.mkdir(parents=True, exist_ok=True)
        d.mkdir(mode=0o700)
        d.chmod(0o700)  # whatever the umask
    st = d.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(
            f"{d} is not a private directory of this user (mode {oct(st.st_mode & 0o777)}): "
            "choose a new path, or chmod 700 it"
        )
    return d


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` with mode 0600 from the start (a temporary file renamed over it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _certificate(name: str, public_key: Any, ca_cert: Any, ca_key: Any, days: int) -> Any:
    """An X.509 certificate for `name`: the CA's own (ca_cert None) or a leaf it signs for TLS
    both ways."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    is_ca = ca_cert is None
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if is_ca else ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks of other nodes may lag
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(
            x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if is_ca:
        usage = {"key_cert_sign": True, "crl_sign": True}
    else:
        usage = {"digital_signature": True}
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False
        )
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    flags = dict.fromkeys(
        (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    builder = builder.add_extension(x509.KeyUsage(**(flags | usage)), critical=True)
    return builder.sign(ca_key, hashes.SHA256())


def _pem_cert(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.cluster tls-certs DIR`: write a cluster's CA and certificates into DIR."""
    p = argparse.ArgumentParser(prog="python -m flows.cluster", description=main.__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    certs = sub.add_parser(
        "tls-certs", help="CA + scheduler/worker/client certificates (0700/0600)"
    )
    certs.add_argument("directory", type=Path)
    certs.add_argument("--days", type=int, default=365, help="validity of the certificates")
    args = p.parse_args(argv)
    d = write_tls_files(args.directory, args.days)
    print(
        f"wrote {CA_FILE} and {', '.join(f'{r}.pem/.key' for r in ROLES)} to {d}; "
        f"the flow side: {TLS_DIR_ENV}={d}"
    )
    return 0
