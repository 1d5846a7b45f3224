"""The LENS_* environment settings, read in one place (whoever runs a worker sets them).

They are operational knobs (retries, leases, workers, caches, logging), never part of a run's
identity: the method lives in AtlasConfig. Read them with `settings()`, at the moment of use, so
that a test or a worker environment that sets a variable is seen.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    try:
        return int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None


@dataclass(frozen=True)
class Settings:
    """Every LENS_* variable, with its default."""

    store_retry_s: float = 60.0  # LENS_STORE_RETRY_S: how long an unreachable store is retried
    lease_ttl_s: float = 120.0  # LENS_LEASE_TTL_S: a lease not renewed for this long is taken over
    lease_poll_s: float = 1.0  # LENS_LEASE_POLL_S: how often a waiter looks at a held lease
    workers: int = 0  # LENS_WORKERS: local Dask workers (0 = min(cores, 4))
    dask_address: str = ""  # LENS_DASK_ADDRESS: an existing scheduler instead of a local cluster
    gpu: bool = False  # LENS_GPU=1: one dask-cuda worker per GPU, tensor stages pinned there
    log: str = "WARNING"  # LENS_LOG: console level of `lens` (INFO/DEBUG show library logs)
    model_cache: int = 2  # LENS_MODEL_CACHE: models kept per device in a worker (LRU)
    model_factories: str = ""  # LENS_MODEL_FACTORIES: "module:factory" list a worker allows
    dask_tls_dir: str = ""  # LENS_DASK_TLS_DIR: the flow side's certificates of a TLS cluster
    dask_local_tls: bool = (
        True  # LENS_DASK_LOCAL_TLS=0: local clusters without TLS (not recommended)
    )
    dask_allow_plaintext: bool = (
        False  # LENS_DASK_ALLOW_PLAINTEXT=1: a tcp:// scheduler on another host
    )
    index_interval_s: float = (
        10.0  # LENS_INDEX_INTERVAL_S: at most one index update per this many seconds
    )


def settings() -> Settings:
    """The current LENS_* settings (read from the environment now; defaults: `Settings`'s)."""
    d = Settings()
    return Settings(
        store_retry_s=_float("LENS_STORE_RETRY_S", d.store_retry_s),
        lease_ttl_s=_float("LENS_LEASE_TTL_S", d.lease_ttl_s),
        lease_poll_s=_float("LENS_LEASE_POLL_S", d.lease_poll_s),
        workers=_int("LENS_WORKERS", d.workers),
        dask_address=os.environ.get("LENS_DASK_ADDRESS", d.dask_address).strip(),
        gpu=os.environ.get("LENS_GPU", "").strip() == "1",
        log=os.environ.get("LENS_LOG", d.log).strip().upper() or d.log,
        model_cache=max(1, _int("LENS_MODEL_CACHE", d.model_cache)),
        model_factories=os.environ.get("LENS_MODEL_FACTORIES", d.model_factories),
        dask_tls_dir=os.environ.get("LENS_DASK_TLS_DIR", d.dask_tls_dir).strip(),
        dask_local_tls=os.environ.get("LENS_DASK_LOCAL_TLS", "1").strip() != "0",
        dask_allow_plaintext=os.environ.get("LENS_DASK_ALLOW_PLAINTEXT", "").strip() == "1",
        index_interval_s=max(0.0, _float("LENS_INDEX_INTERVAL_S", d.index_interval_s)),
    )
