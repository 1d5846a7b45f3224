"""Reading a class's images: file bytes bounded by decode.MAX_IMAGE_BYTES, and a pass that decodes
in order on a thread pool ahead of the caller, skipping unreadable images into ReadStats."""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from fsspec.implementations.local import LocalFileSystem

from lens_core.data import decode
from lens_core.data.decode import decode_image, resize_square
from lens_core.data.errors import EmptyClassError, ImageReadError, data_call
from lens_core.store import filesystem
from lens_core.store.fs import ReadRefused, open_regular

log = logging.getLogger(__name__)

_READ_AHEAD = 16  # images in flight from remote stores
_REMOTE_READERS = 8  # threads reading a remote store
T = TypeVar("T")
R = TypeVar("R")


@dataclass
class ReadStats:
    """Counts of a read pass: images decoded, and (url, reason) for every skipped one."""

    read: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def require(self, what: str) -> None:
        """Raise EmptyClassError naming `what` when nothing was read (call after the pass)."""
        if self.read == 0:
            reason = (
                f"; {len(self.skipped)} unreadable, e.g. {self.skipped[0][1]}"
                if self.skipped
                else ""
            )
            raise EmptyClassError(f"class {what} has no readable image{reason}")


def _fetch(url: str, storage_options: dict[str, Any] | None) -> bytes:
    fs, path = filesystem(url, storage_options)
    return _cat(fs, path, url, storage_options)


def _capped_read(fs: Any, path: str) -> bytes:
    """At most decode.MAX_IMAGE_BYTES + 1 bytes of a file, in one ranged read (no size lookup); a
    local device or FIFO is refused (ReadRefused) before it is opened for a blocking read."""
    if isinstance(fs, LocalFileSystem):
        with open_regular(fs, path, path) as f:
            return f.read(decode.MAX_IMAGE_BYTES + 1)
    try:
        return fs.cat_file(path, start=0, end=decode.MAX_IMAGE_BYTES + 1)
    except OSError as err:
        if "range" in str(err).lower() and "satisfiable" in str(err).lower():
            return b""  # S3 answers 416 to any range of an empty object
        raise


def _cat(fs: Any, path: str, url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The file's bytes, at most decode.MAX_IMAGE_BYTES + 1 of them."""
    try:
        return data_call(lambda: _capped_read(fs, path), url, "reading", storage_options)
    except FileNotFoundError:
        raise ImageReadError(url, "file not found") from None
    except IsADirectoryError:
        raise ImageReadError(url, "is a directory") from None
    except ReadRefused as err:
        raise ImageReadError(url, str(err).removeprefix(f"{path} ")) from None


def read_image(
    url: str, storage_options: dict[str, Any] | None = None, size: int | None = None
) -> torch.Tensor:
    """One image as a float tensor (3, size, size) in [0, 1] (original size when size is None)."""
    image = decode_image(_fetch(url, storage_options), url, size)
    return image if size is None else resize_square(image, size)


def _reader(
    urls: Sequence[str], storage_options: dict[str, Any] | None
) -> tuple[Any, Callable[[str], bytes | ImageReadError]]:
    """(filesystem of the first URL, get): get(url) is the file's bytes or its ImageReadError
    (access errors and an unreachable store raise)."""
    fs, _ = filesystem(urls[0], storage_options)

    def get(url: str) -> bytes | ImageReadError:
        try:
            return _cat(fs, fs._strip_protocol(url), url, storage_options)
        except ImageReadError as err:
            return err

    return fs, get


def _is_local(fs: Any) -> bool:
    return "file" in fs.protocol


def _in_order(
    fn: Callable[[T], R], items: Iterable[T], ahead: int, workers: int
) -> Iterator[tuple[T, R]]:
    """(item, fn(item)) in the order of `items`, fn running on a thread pool of `workers` threads.

    At most `ahead` items are submitted and not yet yielded (memory stays bounded whatever the
    number of items); an exception of fn raises here at its item's position, as a plain loop would.
    Closing the generator early cancels what has not started and does not wait for the rest.
    """
    ahead, workers = max(1, ahead), max(1, min(workers, ahead))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lens-read")
    pending: deque[tuple[T, Future[R]]] = deque()
    finished = False
    try:
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= ahead:
                first, future = pending.popleft()
                yield first, future.result()
        while pending:
            first, future = pending.popleft()
            yield first, future.result()
        finished = True
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=finished, cancel_futures=True)


def _decoded(data: bytes | ImageReadError, url: str, size: int) -> torch.Tensor | ImageReadError:
    """The (3, size, size) image of a file's bytes, or why it is unreadable."""
    if isinstance(data, ImageReadError):
        return data
    try:
        return resize_square(decode_image(data, url, size), size)
    except ImageReadError as err:
        return err


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def decode_workers() -> int:
    """Decoder threads for local files: half the CPUs this process may use (the rest run the
    model on CPU), at least 1 and at most 8."""
    return max(1, min(8, available_cpus() // 2))


def _images(
    urls: Sequence[str],
    storage_options: dict[str, Any] | None,
    size: int,
    prefetch: int,
    workers: int | None,
) -> Iterator[tuple[str, torch.Tensor | ImageReadError]]:
    """(url, image or read error) in order (see iter_images for prefetch and workers). Without
    prefetch, a remote store is still read _READ_AHEAD files at a time (its latency overlaps) and
    decoded here; local files are read and decoded here, one by one."""
    if not urls:
        return
    fs, get = _reader(urls, storage_options)
    local = _is_local(fs)
    if prefetch > 0:
        ahead = prefetch if local else max(prefetch, _READ_AHEAD)
        if workers is None:
            workers = decode_workers() if local else _REMOTE_READERS
        yield from _in_order(lambda url: _decoded(get(url), url, size), urls, ahead, workers)
    elif local:
        yield from ((url, _decoded(get(url), url, size)) for url in urls)
    else:
        yield from (
            (url, _decoded(data, url, size))
            for url, data in _in_order(get, urls, _READ_AHEAD, _REMOTE_READERS)
        )


def iter_images(
    urls: Sequence[str],
    storage_options: dict[str, Any] | None,
    size: int,
    stats: ReadStats,
    *,
    prefetch: int = 0,
    workers: int | None = None,
) -> Iterator[tuple[int, str, torch.Tensor]]:
    """Yield (position in urls, url, (3,size,size) tensor), skipping unreadable images into `stats`.

    Access errors (wrong credentials) are raised, not skipped. Call stats.require(name) after the
    pass to turn "nothing readable" into EmptyClassError.

    prefetch > 0: a pool of `workers` threads (default: `decode_workers()` for local files, 8 for
    remote stores) reads, decodes and resizes up to `prefetch` images ahead while the caller works
    on the current ones (Pillow and torch release the GIL). The images, their order, the skipped
    list and the errors raised are exactly those of the sequential pass (prefetch=0).
    """
    results = _images(list(urls), storage_options, size, prefetch, workers)
    try:
        for pos, (url, image) in enumerate(results):
            if isinstance(image, ImageReadError):
                log.warning("skipping unreadable image %s: %s", url, image.reason)
                stats.skipped.append((url, image.reason))
                continue
            stats.read += 1
            yield pos, url, image
    finally:
        results.close()  # closing this pass early stops its readers now, not at garbage collection
