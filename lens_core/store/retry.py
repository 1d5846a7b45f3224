"""Store faults: which errors mean "the store did not answer", and retrying through them.

Every store operation (files and Zarr chunks) is retried while the store is unreachable
(connection refused or reset, timeouts, HTTP 5xx) for ``LENS_STORE_RETRY_S`` seconds (default 60),
then fails with a ``StoreError`` naming the URL; a refused credential fails at once with a
``StoreAccessError``. Neither message carries credentials.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from lens_core.secrets import scrub
from lens_core.settings import settings
from lens_core.store.errors import LeaseLostError, StoreAccessError, StoreError

T = TypeVar("T")
log = logging.getLogger("lens_core.store")


_UNREACHABLE_TYPES = (ConnectionError, TimeoutError, socket.timeout, asyncio.TimeoutError)
_UNREACHABLE_NAMES = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ProxyConnectionError",
    "HTTPClientError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ClientOSError",
    "ClientPayloadError",
    "ResponseStreamingError",
    "FSTimeoutError",
}
_UNREACHABLE_ERRNO = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EPIPE,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EAGAIN,
    errno.EBUSY,
    errno.EREMOTEIO,
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

    def __init__(
        self,
        url: str,
        action: str,
        storage_options: dict[str, Any] | None,
        access_error: type[StoreAccessError] = StoreAccessError,
    ):
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
        log.warning(
            "storage unreachable %s %s (%s); retrying in %.1f s",
            self.action,
            self.url,
            _describe(err, self.opts),
            delay,
        )
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
                f"(gave up after {time.monotonic() - self.start:.0f} s): "
                f"{_describe(err, self.opts)}"
            )
        return err


def call(
    op: Callable[[], T],
    url: str,
    action: str,
    storage_options: dict[str, Any] | None = None,
    access_error: type[StoreAccessError] = StoreAccessError,
) -> T:
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


async def acall(
    op: Callable[[], Awaitable[T]],
    url: str,
    action: str,
    storage_options: dict[str, Any] | None = None,
) -> T:
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
