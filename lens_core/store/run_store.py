"""The run store: everything one run computes, under ``<store>/runs/<run_id>/``.

Plain files (whole writes, atomic creates), JSON that browsers parse (no NaN), the run's Zarr
group, and completion markers: a stage writes its outputs, then its marker last (the Zarr group
attribute ``complete: true``, or a ``_SUCCESS`` object under a file prefix), recording the inputs
it was computed from. The paths themselves are lens_core.layout's.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import math
import os
import posixpath
import random
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import zarr
from zarr.errors import ContainsGroupError

from lens_core import layout
from lens_core.store.errors import StoreError
from lens_core.store.fs import _cached, filesystem, write_beside
from lens_core.store.lease import Lease, check_leases_held
from lens_core.store.retry import call, retry_seconds
from lens_core.store.zarr_store import zarr_store
from lens_core.urls import join_url, normalize_url

SUCCESS = layout.SUCCESS
T = TypeVar("T")


def finite(obj: Any) -> Any:
    """`obj` with NaN/inf floats (numpy scalars and arrays too) replaced by None, ready for JSON."""
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, str | bytes):
        return finite(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps_json(obj: Any, **kwargs: Any) -> str:
    """json.dumps of `finite(obj)` with allow_nan=False: valid JSON for browsers, sorted keys."""
    return json.dumps(finite(obj), sort_keys=True, default=str, allow_nan=False, **kwargs)


def _precondition_failed(err: BaseException) -> bool:
    """An S3 conditional put refused because the object exists (412 / PreconditionFailed)."""
    if isinstance(err, FileExistsError):
        return True
    cause = getattr(err, "__cause__", None) or err
    response = getattr(cause, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


def _not_implemented(err: BaseException) -> bool:
    """An S3 server that does not implement conditional writes (501 NotImplemented)."""
    cause = getattr(err, "__cause__", None) or err
    response = getattr(cause, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    return (
        code == "NotImplemented"
        or response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 501
    )


class RunStore:
    """Everything one run computes, under ``<store>/runs/<run_id>/``."""

    def __init__(self, store_url: str, run_id: str, storage_options: dict[str, Any] | None = None):
        self.store_url = normalize_url(store_url)
        self.run_id = run_id
        self.storage_options = dict(storage_options or {})
        self.root = layout.run_root(self.store_url, run_id)
        self.fs, self.root_path = filesystem(self.root, self.storage_options)
        self._zarr: zarr.Group | None = None

    @property
    def local(self) -> bool:
        proto = self.fs.protocol
        return "file" in (proto if isinstance(proto, tuple | list) else (proto,))

    def _call(self, op: Callable[[], T], rel: str, action: str) -> T:
        return call(op, self.url(rel), action, self.storage_options)

    # ---- plain files -------------------------------------------------------------------
    def url(self, rel: str) -> str:
        return join_url(self.root, rel)

    def path(self, rel: str) -> str:
        return posixpath.join(self.root_path, rel.strip("/"))

    def exists(self, rel: str) -> bool:
        return self._call(lambda: self.fs.exists(self.path(rel)), rel, "checking")

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a file whole: local writes go through a temp name and a rename."""
        path = self.path(rel)
        if self.local:
            os.replace(write_beside(path, data), path)
        else:
            self._call(lambda: self.fs.pipe_file(path, data), rel, "writing")

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create a file with `data` unless it exists, atomically; True when we created it."""
        path = self.path(rel)
        if self.local:
            tmp = write_beside(path, data)
            try:
                os.link(tmp, path)  # fails if the name exists: the file appears whole or not at all
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)

        def put() -> bool:
            try:
                self.fs.pipe_file(path, data, mode="create")
                return True
            except OSError as err:
                if _precondition_failed(err):
                    return False
                raise

        return self._call(put, rel, "creating")

    def read_bytes(self, rel: str) -> bytes:
        return self._call(lambda: self.fs.cat_file(self.path(rel)), rel, "reading")

    def write_json(self, rel: str, obj: Any) -> None:
        """Write JSON that any browser parses: NaN and infinities become null, never bare NaN."""
        self.write_bytes(rel, dumps_json(obj, indent=1).encode())

    def read_json(self, rel: str, default: Any = None) -> Any:
        try:
            return json.loads(self.read_bytes(rel))
        except FileNotFoundError:
            return default

    def update_json(self, rel: str, change: Callable[[Any], Any], default: Any = None) -> Any:
        """Read-modify-write one JSON file without losing what a concurrent writer wrote.

        `change(current)` gets the stored value (a fresh copy of `default` when the file is absent;
        it may be called again, on a fresh copy, when another writer got in first) and returns the
        value to store; nothing is written when it equals the stored one. An exception from
        `change` aborts with nothing written. Returns the value stored.

        Each store uses its own means (issue 21):
        - S3: a conditional put, ``If-Match`` the ETag that was read (``If-None-Match: *`` when
          the file was absent). A put refused because another writer changed the file re-reads
          and re-applies `change`. Two round trips, no lock state to go stale. SeaweedFS 4.48 (the
          test server) honours both conditions atomically: 8 puts racing with one ETag, exactly 1
          accepted in each of 10 trials; AWS S3 and MinIO honour them too.
        - local disk: an exclusive ``flock`` on ``locks/files/<rel>.lock`` around the read and the
          rename; the kernel drops it when its holder dies, so it never goes stale.
        - any other filesystem, or an S3 server that answers 501 to conditional puts: a lease
          (``files/<rel>``) held for the read-modify-write.
        """
        if self.local:
            return self._update_locked(rel, change, default)
        if self._is_s3():
            try:
                return self._update_conditional(rel, change, default)
            except OSError as err:
                if not _not_implemented(err):
                    raise
        with self.lease(f"files/{rel}"):
            return self._apply(rel, change, default)

    def _is_s3(self) -> bool:
        proto = self.fs.protocol
        return bool({"s3", "s3a"} & set(proto if isinstance(proto, tuple | list) else (proto,)))

    def _apply(self, rel: str, change: Callable[[Any], Any], default: Any) -> Any:
        """One read-modify-write under a lock held by the caller."""
        try:
            current = json.loads(self.read_bytes(rel))
        except FileNotFoundError:
            current = None
        # `change` may edit in place
        before = None if current is None else dumps_json(current, indent=1)
        new = change(copy.deepcopy(default) if current is None else current)
        text = dumps_json(new, indent=1)
        if text != before:
            self.write_bytes(rel, text.encode())
        return new

    def _update_locked(self, rel: str, change: Callable[[Any], Any], default: Any) -> Any:
        lock = self.path(f"{layout.LOCKS}/files/{rel}.lock")
        os.makedirs(posixpath.dirname(lock), exist_ok=True)
        with open(lock, "a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # released on close, or when we die
            return self._apply(rel, change, default)

    def _read_with_etag(self, rel: str) -> tuple[bytes | None, str | None]:
        """(bytes, ETag) of one S3 object, or (None, None) when it is absent, through s3fs's public
        API: the ETag is read first, so bytes newer than it only make the conditional put fail
        and the update retry, never overwrite a write it did not see."""
        path = self.path(rel)

        def get() -> tuple[bytes | None, str | None]:
            try:
                etag = self.fs.info(path, refresh=True)["ETag"]
                return self.fs.cat_file(path), etag
            except FileNotFoundError:
                return None, None

        return self._call(get, rel, "reading")

    def _update_conditional(self, rel: str, change: Callable[[Any], Any], default: Any) -> Any:
        path = self.path(rel)
        deadline = time.monotonic() + retry_seconds()
        attempt = 0
        while True:
            data, etag = self._read_with_etag(rel)
            current = None if data is None else json.loads(data)
            before = None if current is None else dumps_json(current, indent=1)
            new = change(copy.deepcopy(default) if current is None else current)
            text = dumps_json(new, indent=1)
            if text == before:
                return new
            condition = {"mode": "create"} if etag is None else {"IfMatch": etag}

            def put(payload: bytes = text.encode(), condition: dict = condition) -> bool:
                try:
                    self.fs.pipe_file(path, payload, **condition)
                    return True
                except FileNotFoundError:  # If-Match on an object deleted meanwhile (AWS: 404)
                    return False
                except OSError as err:
                    if _precondition_failed(err):
                        return False
                    raise

            if self._call(put, rel, "writing"):
                return new
            attempt += 1  # another writer got in first: read again, apply again
            if time.monotonic() > deadline:
                raise StoreError(
                    f"gave up updating {self.url(rel)}: {attempt} concurrent writes won over ours"
                )
            time.sleep(random.uniform(0, min(0.02 * 2 ** min(attempt, 6), 1.0)))

    def list(self, rel: str) -> list[str]:
        """Names directly under a prefix ([] when absent)."""
        try:
            found = self._call(lambda: self.fs.ls(self.path(rel), detail=False), rel, "listing")
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in found)

    def delete(self, rel: str) -> None:
        """Delete one file (a lease generation, a marker)."""
        self._call(lambda: self.fs.rm(self.path(rel)), rel, "deleting")

    def prune(self, rel: str) -> None:
        """Remove an empty folder on disk (object stores have no folders); OSError if not empty."""
        if self.local:
            os.rmdir(self.path(rel))

    def remove(self, rel: str) -> None:
        if self.exists(rel):
            self._call(lambda: self.fs.rm(self.path(rel), recursive=True), rel, "deleting")

    def files_complete(self, prefix: str, inputs: str | None = None) -> bool:
        """True when the prefix's `_SUCCESS` marker exists (and records `inputs`, when given)."""
        if inputs is None:
            return self.exists(join_url(prefix, SUCCESS))
        try:
            marker = json.loads(self.read_bytes(join_url(prefix, SUCCESS)) or b"{}")
        except FileNotFoundError:
            return False
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
        return isinstance(marker, dict) and marker.get("inputs") == inputs

    def mark_files_complete(self, prefix: str, inputs: str | None = None, **attrs: Any) -> None:
        """Write the prefix's `_SUCCESS` marker last, recording what the files were computed
        from."""
        check_leases_held()
        self.write_bytes(
            join_url(prefix, SUCCESS), dumps_json({"inputs": inputs, **attrs}).encode()
        )

    @contextlib.contextmanager
    def lease(
        self, name: str, ttl: float | None = None, poll: float | None = None
    ) -> Iterator[Lease]:
        """Hold the lease `name` (e.g. 'activations/<class>') for the block; waits while another has
        it."""
        with Lease(self, layout.lease_prefix(name), ttl, poll) as held:
            yield held

    # ---- zarr ----------------------------------------------------------------------------
    @property
    def zarr(self) -> zarr.Group:
        """The root group of lens.zarr (opened once per process: groups re-read metadata on
        access)."""
        if self._zarr is None:
            url = self.url(layout.ZARR_ROOT)

            def open_root() -> zarr.Group:
                store = zarr_store(url, self.storage_options)
                try:
                    return zarr.open_group(store=store, mode="a", zarr_format=3)
                except ContainsGroupError:
                    # another worker created it between zarr's look and its create
                    return zarr.open_group(store=store, mode="r+", zarr_format=3)

            self._zarr = (
                open_root() if self.local else _cached("zarr", url, self.storage_options, open_root)
            )
        return self._zarr

    def group(self, path: str, fresh: bool = False) -> zarr.Group:
        """The Zarr group at `path` (created if missing); `fresh` drops leftovers of a partial
        run."""
        root = self.zarr
        if fresh and path in root:
            del root[path]
        return root.require_group(path)

    def get_group(self, path: str) -> zarr.Group | None:
        try:
            node = self.zarr[path]
        except KeyError:
            return None
        return node if isinstance(node, zarr.Group) else None

    def is_complete(self, path: str, inputs: str | None = None) -> bool:
        """True when the group is marked complete (and was computed from `inputs`, when given)."""
        g = self.get_group(path)
        if g is None or not g.attrs.get("complete", False):
            return False
        return inputs is None or g.attrs.get("inputs") == inputs

    def mark_complete(self, path: str, inputs: str | None = None, **attrs: Any) -> None:
        """Record the stage's summary attributes and its inputs, then `complete: true` last."""
        check_leases_held()
        g = self.zarr.require_group(path)
        g.attrs.update(finite({**attrs, "inputs": inputs}))
        g.attrs.update({"complete": True})
