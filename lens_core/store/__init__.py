"""The run store on any fsspec URL, in parts: errors, retries through outages (`retry`), URLs and
filesystems (`fs`), the Zarr store (`zarr_store`), leases (`lease`) and the run store itself
(`run_store`). Import what you need from here."""

from lens_core.secrets import scrub
from lens_core.store.errors import LeaseLostError, StoreAccessError, StoreError
from lens_core.store.fs import filesystem, write_beside
from lens_core.store.lease import Lease, check_leases_held
from lens_core.store.retry import acall, call, is_transient, is_unreachable, retry_seconds
from lens_core.store.run_store import SUCCESS, RunStore, dumps_json, finite
from lens_core.store.zarr_store import RetryingStore, zarr_store
from lens_core.urls import join_url, normalize_url

__all__ = [
    "SUCCESS",
    "Lease",
    "LeaseLostError",
    "RetryingStore",
    "RunStore",
    "StoreAccessError",
    "StoreError",
    "acall",
    "call",
    "check_leases_held",
    "dumps_json",
    "filesystem",
    "finite",
    "is_transient",
    "is_unreachable",
    "join_url",
    "normalize_url",
    "retry_seconds",
    "scrub",
    "write_beside",
    "zarr_store",
]
