"""The run store: `<store>/runs/<run_id>/` on any fsspec URL, its Zarr v3 group and completion markers.

Layout (DESIGN.md): run.json, lens.zarr/{acts,concepts}/<class>/..., crops/<class>/...,
viz/<class>/..., status/<class>.json, locks/<stage>/<class>/. A stage writes its outputs, then its
marker last: the Zarr group attribute ``complete: true`` or a ``_SUCCESS`` object under a file prefix.

Faults. Every store operation (files and Zarr chunks) is retried while the store is unreachable
(connection refused or reset, timeouts, HTTP 5xx) for ``LENS_STORE_RETRY_S`` seconds (default 60),
then fails with a ``StoreError`` naming the URL; a refused credential fails at once with a
``StoreAccessError``. Neither message carries credentials.

Concurrency. Two runs of the same checkpoint share a run id and so a store. A stage takes a
*lease* (`RunStore.lease`) before it writes: an object created atomically (local: hard link, which
fails if the name exists; S3: a conditional put, ``If-None-Match: *``), kept alive by a heartbeat
and released when the stage ends. A second run waits for the lease, then finds the marker and
reuses the result. A lease whose holder died (same host and its pid is gone, or no heartbeat for
its TTL) is taken over by creating the next generation, which again only one process can do.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import math
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

import fsspec
import zarr
from fsspec.core import url_to_fs
from zarr.abc.store import Store
from zarr.errors import ContainsGroupError
from zarr.storage import WrapperStore

from lens_core.secrets import SECRET_ENV, scrub
from lens_core.settings import settings

SUCCESS = "_SUCCESS"
T = TypeVar("T")
log = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """The store cannot be reached or written; the message names the URL, never credentials."""


class StoreAccessError(StoreError, PermissionError):
    """The store refuses these credentials; the message names the URL, never the credentials."""


class LeaseLostError(RuntimeError):
    """Another process took over our lease (we stalled past its TTL): our work is not marked complete."""


# ---- fault classification and retries -----------------------------------------------------------

_UNREACHABLE_TYPES = (ConnectionError, TimeoutError, socket.timeout, asyncio.TimeoutError)
_UNREACHABLE_NAMES = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ProxyConnectionError", "HTTPClientError", "ClientConnectorError", "ServerDisconnectedError",
    "ClientOSError", "ClientPayloadError", "ResponseStreamingError", "FSTimeoutError",
}
_UNREACHABLE_ERRNO = {
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EAGAIN, errno.EBUSY, errno.EREMOTEIO,
}


def is_unreachable(err: BaseException | None) -> bool:
    """True for errors that say the store did not answer (network, timeouts, HTTP 5xx)."""
    for _ in range(8):
        if err is None or isinstance(err, StoreError | FileNotFoundError | PermissionError):
            return False
        if isinstance(err, _UNREACHABLE_TYPES) or type(err).__name__ in _UNREACHABLE_NAMES:
            return True
        if isinstance(err, OSError) and err.errno in _UNREACHABLE_ERRNO:
            return True
        err = err.__cause__ or err.__context__
    return False


def is_transient(err: BaseException | None) -> bool:
    """True for failures a task retry can fix: an unreachable store, or a lease taken over from us
    (the retry finds the stage done, or takes the lease). Refusals (403), missing objects (404)
    and bad input are final."""
    for _ in range(8):
        if err is None:
            return False
        if isinstance(err, LeaseLostError):
            return True
        if is_unreachable(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def retry_seconds() -> float:
    """How long an unreachable store is retried before giving up (env LENS_STORE_RETRY_S)."""
    return settings().store_retry_s


def _describe(err: BaseException, storage_options: dict[str, Any] | None) -> str:
    return scrub(f"{type(err).__name__}: {err}", storage_options)[:300]


class _Retry:
    """Bookkeeping of one retried operation: deadline, backoff, the final error."""

    def __init__(self, url: str, action: str, storage_options: dict[str, Any] | None,
                 access_error: type[StoreAccessError] = StoreAccessError):
        self.url, self.action, self.opts = url, action, storage_options
        self.access_error = access_error
        self.start = time.monotonic()
        self.delay = 0.5

    def next_delay(self, err: BaseException) -> float | None:
        """Seconds to wait before the next try, or None when the error is final."""
        if not is_unreachable(err):
            return None
        elapsed = time.monotonic() - self.start
        if elapsed + self.delay > retry_seconds():
            return None
        delay, self.delay = self.delay, min(self.delay * 2, 4.0)
        log.warning("storage unreachable %s %s (%s); retrying in %.1f s",
                    self.action, self.url, _describe(err, self.opts), delay)
        return delay

    def final(self, err: BaseException) -> BaseException:
        """The error to raise: StoreError/StoreAccessError naming the URL, or `err` itself."""
        if isinstance(err, StoreError):
            return err
        if isinstance(err, PermissionError):
            return self.access_error(
                f"access denied {self.action} {self.url} (check storage credentials): "
                f"{_describe(err, self.opts)}"
            )
        if is_unreachable(err):
            return StoreError(
                f"storage unreachable {self.action} {self.url} "
                f"(gave up after {time.monotonic() - self.start:.0f} s): {_describe(err, self.opts)}"
            )
        return err


def call(op: Callable[[], T], url: str, action: str, storage_options: dict[str, Any] | None = None,
         access_error: type[StoreAccessError] = StoreAccessError) -> T:
    """Run a storage operation, retrying while the store is unreachable; errors name `url`."""
    retry = _Retry(url, action, storage_options, access_error)
    while True:
        try:
            return op()
        except Exception as err:  # noqa: BLE001 - classified below
            failure = err
        delay = retry.next_delay(failure)
        if delay is None:
            break
        time.sleep(delay)
    final = retry.final(failure)
    if final is failure:
        raise failure
    raise final  # raised outside the handler: no chained traceback soup, nothing to retry again


async def acall(op: Callable[[], Awaitable[T]], url: str, action: str,
                storage_options: dict[str, Any] | None = None) -> T:
    """`call` for coroutines (the Zarr store runs on an event loop)."""
    retry = _Retry(url, action, storage_options)
    while True:
        try:
            return await op()
        except Exception as err:  # noqa: BLE001 - classified below
            failure = err
        delay = retry.next_delay(failure)
        if delay is None:
            break
        await asyncio.sleep(delay)
    final = retry.final(failure)
    if final is failure:
        raise failure
    raise final


# ---- URLs and filesystems -------------------------------------------------------------------------

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


class RetryingStore(WrapperStore):
    """A Zarr store whose every operation is retried while the store is unreachable (see `call`)."""

    def __init__(self, store: Store, url: str = "", storage_options: dict[str, Any] | None = None):
        super().__init__(store)
        self._url = url
        self._opts = storage_options

    def _with_store(self, store: Store) -> RetryingStore:
        return type(self)(store, self._url, self._opts)

    def _key_url(self, key: str) -> str:
        return join_url(self._url, key) if key else self._url

    async def _do(self, action: str, key: str, op: Callable[[], Awaitable[T]]) -> T:
        return await acall(op, self._key_url(key), action, self._opts)

    async def _open(self) -> None:
        await self._do("opening", "", self._store._open)

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        return await self._do("reading", key, lambda: self._store.get(key, prototype, byte_range))

    async def get_partial_values(self, prototype: Any, key_ranges: Iterable[tuple[str, Any]]) -> list[Any]:
        ranges = list(key_ranges)
        key = ranges[0][0] if ranges else ""
        return await self._do("reading", key, lambda: self._store.get_partial_values(prototype, ranges))

    async def exists(self, key: str) -> bool:
        return await self._do("checking", key, lambda: self._store.exists(key))

    async def set(self, key: str, value: Any) -> None:
        await self._do("writing", key, lambda: self._store.set(key, value))

    async def set_if_not_exists(self, key: str, value: Any) -> None:
        await self._do("writing", key, lambda: self._store.set_if_not_exists(key, value))

    async def _set_many(self, values: Iterable[tuple[str, Any]]) -> None:
        await asyncio.gather(*(self.set(k, v) for k, v in values))

    async def _get_many(self, requests: Iterable[tuple[str, Any, Any]]):  # type: ignore[override]
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    async def delete(self, key: str) -> None:
        await self._do("deleting", key, lambda: self._store.delete(key))

    async def delete_dir(self, prefix: str) -> None:
        await self._do("deleting", prefix, lambda: self._store.delete_dir(prefix))

    async def is_empty(self, prefix: str) -> bool:
        return await self._do("listing", prefix, lambda: self._store.is_empty(prefix))

    async def _listed(self, prefix: str, listing: Callable[[], AsyncIterator[str]]) -> AsyncIterator[str]:
        async def collect() -> list[str]:
            return [k async for k in listing()]

        for key in await self._do("listing", prefix, collect):
            yield key

    def list(self) -> AsyncIterator[str]:
        return self._listed("", self._store.list)

    def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        return self._listed(prefix, lambda: self._store.list_prefix(prefix))

    def list_dir(self, prefix: str) -> AsyncIterator[str]:
        return self._listed(prefix, lambda: self._store.list_dir(prefix))


def zarr_store(url: str, storage_options: dict[str, Any] | None = None, read_only: bool = False):
    """A zarr v3 store for a URL: LocalStore on disk, FsspecStore (async s3fs) elsewhere; retried."""
    url = normalize_url(url)
    if url.startswith("file://"):
        return zarr.storage.LocalStore(url[len("file://"):], read_only=read_only)
    opts = dict(storage_options or {})
    opts.setdefault("skip_instance_cache", True)
    inner = zarr.storage.FsspecStore.from_url(url, storage_options=opts, read_only=read_only)
    return RetryingStore(inner, url, storage_options)


# ---- leases ---------------------------------------------------------------------------------------

def _lease_ttl() -> float:
    return settings().lease_ttl_s


def _lease_poll() -> float:
    return settings().lease_poll_s


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_HELD: ContextVar[tuple[Lease, ...]] = ContextVar("lens_leases_held", default=())


def check_leases_held() -> None:
    """Fence for completion markers: raise LeaseLostError if a lease held in this context was taken over.

    A holder frozen past the TTL (a paused process, a stalled host) is replaced; when it wakes it must
    not mark the stage complete over the new holder's work.
    """
    for lease in _HELD.get():
        if not lease.held():
            raise LeaseLostError(f"lease {lease.prefix} was taken over by another process; "
                                 "this attempt's work is left unmarked")


class Lease:
    """An exclusive claim on one unit of work (a stage of a class) across every process on the store.

    Objects ``locks/<name>/<generation>.json``; the highest generation is the lease. Acquire by
    creating generation 0 (none exists) or the next one (the current holder is gone), atomically.
    """

    def __init__(self, store: RunStore, name: str, ttl: float | None = None, poll: float | None = None):
        self.store = store
        self.prefix = f"locks/{name.strip('/')}"
        self.ttl = ttl if ttl is not None else _lease_ttl()
        self.poll = poll if poll is not None else _lease_poll()
        self.token = uuid.uuid4().hex
        self.generation: int | None = None
        self.waited = 0.0
        self._beats = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: dict[tuple[int, str], tuple[int, float]] = {}

    def _rel(self, gen: int) -> str:
        return f"{self.prefix}/{gen:08d}.json"

    def _record(self) -> bytes:
        return json.dumps({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "beats": self._beats, "ttl": self.ttl, "at": time.time()}).encode()

    def _generations(self) -> list[int]:
        gens = []
        for name in self.store.list(self.prefix):
            stem = name[: -len(".json")] if name.endswith(".json") else ""
            if stem.isdigit():
                gens.append(int(stem))
        return sorted(gens)

    def _stale(self, gen: int, rec: dict[str, Any]) -> bool:
        if rec.get("host") == socket.gethostname() and not _pid_alive(int(rec.get("pid", 0))):
            return True
        key, now = (gen, str(rec.get("token"))), time.monotonic()
        beats = int(rec.get("beats", 0))
        seen = self._seen.get(key)
        if seen is None or seen[0] != beats:
            self._seen[key] = (beats, now)
            return False
        return now - seen[1] >= float(rec.get("ttl", self.ttl))

    def acquire(self) -> Lease:
        """Block until this process holds the lease."""
        t0 = time.monotonic()
        logged = False
        while True:
            gens = self._generations()
            target = 0
            if gens:
                top = gens[-1]
                try:
                    rec = json.loads(self.store.read_bytes(self._rel(top)))
                except FileNotFoundError:
                    continue  # released while we looked
                except (json.JSONDecodeError, UnicodeDecodeError):
                    rec = {}
                if not self._stale(top, rec):
                    if not logged:
                        log.info("waiting for %s: held by %s pid %s", self.prefix, rec.get("host"), rec.get("pid"))
                        logged = True
                    time.sleep(self.poll)
                    continue
                target = top + 1
            if self.store.create_exclusive(self._rel(target), self._record()):
                self.generation = target
                self.waited = time.monotonic() - t0
                for old in gens:  # generations of dead holders
                    with contextlib.suppress(Exception):
                        self.store.fs.rm(self.store.path(self._rel(old)))
                self._start_heartbeat()
                return self

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease:{self.prefix}", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(0.05, self.ttl / 4)):
            try:
                if not self.held():
                    log.warning("lease %s was taken over by another process", self.prefix)
                    return
                self._beats += 1
                self.store.write_bytes(self._rel(self.generation), self._record())
            except Exception as err:  # noqa: BLE001 - a missed beat is only a missed beat
                log.debug("lease heartbeat %s failed: %s", self.prefix, type(err).__name__)

    def held(self) -> bool:
        """True while our generation is the highest one and still carries our token."""
        if self.generation is None:
            return False
        gens = self._generations()
        if not gens or gens[-1] != self.generation:
            return False
        try:
            return json.loads(self.store.read_bytes(self._rel(self.generation))).get("token") == self.token
        except (FileNotFoundError, json.JSONDecodeError):
            return False

    def release(self) -> None:
        """Stop the heartbeat and delete our generation (only if it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.generation is not None:
            with contextlib.suppress(Exception):
                rec = json.loads(self.store.read_bytes(self._rel(self.generation)))
                if rec.get("token") == self.token:
                    self.store.fs.rm(self.store.path(self._rel(self.generation)))
            if self.store.local:  # no empty lock folders left behind
                with contextlib.suppress(OSError):
                    os.rmdir(self.store.path(self.prefix))
            self.generation = None

    def __enter__(self) -> Lease:
        self.acquire()
        self._ctx = _HELD.set((*_HELD.get(), self))
        return self

    def __exit__(self, *exc: object) -> None:
        _HELD.reset(self._ctx)
        self.release()


def write_beside(path: str, data: bytes, make_parent: bool = True) -> str:
    """Write `data` to a fresh temp file next to the local `path` and return its name: renamed or
    linked onto `path` afterwards, the file appears whole or not at all."""
    if make_parent:
        os.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
    return tmp


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


# ---- the run store --------------------------------------------------------------------------------

def _precondition_failed(err: BaseException) -> bool:
    """An S3 conditional put refused because the object exists (412 / PreconditionFailed)."""
    if isinstance(err, FileExistsError):
        return True
    cause = getattr(err, "__cause__", None) or err
    response = getattr(cause, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


class RunStore:
    """Everything one run computes, under ``<store>/runs/<run_id>/``."""

    def __init__(self, store_url: str, run_id: str, storage_options: dict[str, Any] | None = None):
        self.store_url = normalize_url(store_url)
        self.run_id = run_id
        self.storage_options = dict(storage_options or {})
        self.root = join_url(self.store_url, "runs", run_id)
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

    def list(self, rel: str) -> list[str]:
        """Names directly under a prefix ([] when absent)."""
        try:
            found = self._call(lambda: self.fs.ls(self.path(rel), detail=False), rel, "listing")
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in found)

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
        """Write the prefix's `_SUCCESS` marker last, recording what the files were computed from."""
        check_leases_held()
        self.write_bytes(join_url(prefix, SUCCESS), dumps_json({"inputs": inputs, **attrs}).encode())

    @contextlib.contextmanager
    def lease(self, name: str, ttl: float | None = None, poll: float | None = None) -> Iterator[Lease]:
        """Hold the lease `name` (e.g. 'activations/<class>') for the block; waits while another has it."""
        with Lease(self, name, ttl, poll) as held:
            yield held

    # ---- zarr ----------------------------------------------------------------------------
    @property
    def zarr(self) -> zarr.Group:
        """The root group of lens.zarr (opened once per process: groups re-read metadata on access)."""
        if self._zarr is None:
            url = self.url("lens.zarr")

            def open_root() -> zarr.Group:
                store = zarr_store(url, self.storage_options)
                try:
                    return zarr.open_group(store=store, mode="a", zarr_format=3)
                except ContainsGroupError:  # another worker created it between zarr's look and its create
                    return zarr.open_group(store=store, mode="r+", zarr_format=3)

            self._zarr = open_root() if self.local else _cached("zarr", url, self.storage_options, open_root)
        return self._zarr

    def group(self, path: str, fresh: bool = False) -> zarr.Group:
        """The Zarr group at `path` (created if missing); `fresh` drops leftovers of a partial run."""
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
