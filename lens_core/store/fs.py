"""URLs and filesystems: normalized fsspec URLs, one S3 client per process and credentials,
whole-file local writes (a temp name next to the file, then a rename or a link), and bounded
reads of regular files (`read_bounded`)."""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import stat
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeVar

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from lens_core.secrets import SECRET_ENV
from lens_core.urls import normalize_url

T = TypeVar("T")


_CACHE: dict[str, Any] = {}
_CACHE_LOCK = threading.Lock()
_CREDENTIAL_ENV = (*SECRET_ENV, "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


def _cached(kind: str, url: str, opts: dict[str, Any], make: Callable[[], T]) -> T:
    """One object per process, URL, options and credential environment (s3 clients are costly to
    create, and leaked sessions log errors); a credential change gives a new one."""
    env = [os.environ.get(k, "") for k in _CREDENTIAL_ENV]
    key = json.dumps([kind, url, opts, env, os.getpid()], sort_keys=True, default=str)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = make()
        return _CACHE[key]


def filesystem(
    url: str, storage_options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for a URL; s3 filesystems are shared per process and options."""
    url = normalize_url(url)
    opts = dict(storage_options or {})
    if url.startswith("s3://"):
        # our cache below keys on the env credentials too
        opts.setdefault("skip_instance_cache", True)
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


class ReadRefused(ValueError):
    """A file that is not a regular file (a device, a FIFO), or longer than its reader's cap."""


class NotRegularFile(ReadRefused):
    """A device, FIFO, socket or directory where a file was expected."""


class TooLarge(ReadRefused):
    """More bytes than the reader's cap were read."""


READ_BLOCK = 8 << 20


def _describe_mode(mode: int) -> str:
    kinds = (
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
    )
    return next((name for test, name in kinds if test(mode)), "not a plain file")


@contextlib.contextmanager
def open_regular(fs: fsspec.AbstractFileSystem, path: str, url: str) -> Iterator[IO[bytes]]:
    """A local file opened for reading only when it is a regular file (symlinks followed): a device
    (`/dev/zero`) never ends and reports size 0, a FIFO blocks on open. The check is made on the
    opened descriptor (non-blocking open), so a link swapped after a check cannot slip through.
    Remote files are opened as they are: their reads are bounded by the caller's count."""
    if isinstance(fs, LocalFileSystem):
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise NotRegularFile(f"{url} is not a regular file ({_describe_mode(mode)})")
            os.set_blocking(fd, True)
            f = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        with f:
            yield f
        return
    with fs.open(path, "rb") as f:
        yield f


def iter_bounded(f: IO[bytes], limit: int, url: str, block: int = READ_BLOCK) -> Iterator[bytes]:
    """The blocks of an open file, ReadRefused once more than `limit` bytes were read: the count
    is of the bytes actually read, never a size the filesystem reports."""
    total = 0
    while True:
        data = f.read(min(block, limit + 1 - total))
        if not data:
            return
        total += len(data)
        if total > limit:
            raise TooLarge(f"{url} holds more than {_size(limit)}")
        yield data


def read_bounded(url: str, storage_options: dict[str, Any] | None, limit: int) -> bytes:
    """All bytes of one regular file, at most `limit` of them (ReadRefused otherwise): the one
    reader of small side files (class names, class index, MACO spectrum) and checkpoints."""
    fs, path = filesystem(url, storage_options)
    with open_regular(fs, path, url) as f:
        return b"".join(iter_bounded(f, limit, url))


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 1 << 20 else f"{n} bytes"
