"""The errors of reading a data set, and the storage call that raises them: apart so that listing
and reading raise the same classes without importing each other."""

from __future__ import annotations

from typing import Any

from lens_core.store import StoreAccessError, call


class DataError(ValueError):
    """The data set cannot be listed or is malformed; the message names the URL."""


class ImageReadError(DataError):
    """One image cannot be read or decoded (it is skipped); `.url` and `.reason` say which and
    why."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"cannot read image {url}: {reason}")
        self.url = url
        self.reason = reason


class EmptyClassError(DataError):
    """A class has no (readable) image; the message names the class."""


class DataAccessError(StoreAccessError):
    """The data URL refuses these credentials; the message names the URL, never the credentials."""


def data_call(op: Any, url: str, action: str, storage_options: dict[str, Any] | None) -> Any:
    """A storage call on the data set: retried while unreachable, DataAccessError when refused."""
    return call(op, url, action, storage_options, access_error=DataAccessError)
