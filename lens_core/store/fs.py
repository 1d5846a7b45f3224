"""URLs and filesystems: normalized fsspec URLs, one S3 client per process and credentials,
and whole-file local writes (a temp name next to the file, then a rename or a link)."""

from __future__ import annotations

import json
import os
import posixpath
import threading
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

from lens_core.secrets import SECRET_ENV

T = TypeVar("T")


def normalize_url(url: str) -> str:
    """Absolute URL with a protocol: plain and relative paths become file:///abs/path."""
    if "://" not in url:
        return "file://" + os.path.abspath(url)
    proto, rest = url.split("://", 1)
    if proto == "file":
        return "file://" + os.path.abspath(rest)
    return url.rstrip("/")


def join_url(base: str, *parts: str) -> str:
    return posixpath.join(base.rstrip("/"), *[p.strip("/") for p in parts if p])


_CACHE: dict[str, Any] = {}
_CACHE_LOCK = threading.Lock()
_CREDENTIAL_ENV = (*SECRET_ENV, "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


def _cached(kind: str, url: str, opts: dict[str, Any], make: Callable[[], T]) -> T:
    """One object per process, URL, options and credential environment (s3 clients are costly:
    about 0.3 s each, and leaked sessions log errors); a credential change gives a new one."""
    env = [os.environ.get(k, "") for k in _CREDENTIAL_ENV]
    key = json.dumps([kind, url, opts, env, os.getpid()], sort_keys=True, default=str)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = make()
        return _CACHE[key]


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for a URL; s3 filesystems are shared per process and options."""
    url = normalize_url(url)
    opts = dict(storage_options or {})
    if url.startswith("s3://"):
        opts.setdefault("skip_instance_cache", True)  # our cache below keys on the env credentials too
        # markers and status files are polled across processes: a cached listing would be stale
        opts.setdefault("use_listings_cache", False)
        fs = _cached("s3fs", "s3", opts, lambda: url_to_fs(url, **opts)[0])
        return fs, fs._strip_protocol(url)
    return url_to_fs(url, **opts)


def write_beside(path: str, data: bytes, make_parent: bool = True) -> str:
    """Write `data` to a fresh temp file next to the local `path` and return its name: renamed or
    linked onto `path` afterwards, the file appears whole or not at all."""
    if make_parent:
        os.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
    return tmp
