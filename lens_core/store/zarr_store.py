"""Zarr v3 stores over fsspec URLs: LocalStore on disk, FsspecStore elsewhere, every operation
retried while the store is unreachable (`RetryingStore`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import zarr
from zarr.abc.store import Store
from zarr.storage import WrapperStore

from lens_core.store.retry import acall
from lens_core.urls import join_url, normalize_url

T = TypeVar("T")


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

    async def get_partial_values(
        self, prototype: Any, key_ranges: Iterable[tuple[str, Any]]
    ) -> list[Any]:
        ranges = list(key_ranges)
        key = ranges[0][0] if ranges else ""
        return await self._do(
            "reading", key, lambda: self._store.get_partial_values(prototype, ranges)
        )

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

    async def _listed(
        self, prefix: str, listing: Callable[[], AsyncIterator[str]]
    ) -> AsyncIterator[str]:
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
    """A zarr v3 store for a URL: LocalStore on disk, FsspecStore (async s3fs) elsewhere;
    retried."""
    url = normalize_url(url)
    if url.startswith("file://"):
        return zarr.storage.LocalStore(url[len("file://") :], read_only=read_only)
    opts = dict(storage_options or {})
    opts.setdefault("skip_instance_cache", True)
    inner = zarr.storage.FsspecStore.from_url(url, storage_options=opts, read_only=read_only)
    return RetryingStore(inner, url, storage_options)
