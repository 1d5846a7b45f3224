"""The run store: `<store>/runs/<run_id>/` on any fsspec URL, its Zarr v3 group and completion markers.

Layout (DESIGN.md): run.json, lens.zarr/{acts,concepts}/<class>/..., crops/<class>/...,
viz/<class>/..., status/<class>.json. A stage writes its outputs, then its marker last: the Zarr
group attribute ``complete: true`` or a ``_SUCCESS`` object under a file prefix.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any

import fsspec
import zarr
from fsspec.core import url_to_fs

SUCCESS = "_SUCCESS"


class StoreError(RuntimeError):
    """The store cannot be reached or written; the message names the URL, never credentials."""


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


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for a URL; the s3 cache is skipped so options always apply."""
    url = normalize_url(url)
    opts = dict(storage_options or {})
    if url.startswith("s3://"):
        opts.setdefault("skip_instance_cache", True)
        # markers and status files are polled across processes: a cached listing would be stale
        opts.setdefault("use_listings_cache", False)
    return url_to_fs(url, **opts)


def zarr_store(url: str, storage_options: dict[str, Any] | None = None, read_only: bool = False):
    """A zarr v3 store for a URL: LocalStore on disk, FsspecStore (async s3fs) elsewhere."""
    url = normalize_url(url)
    if url.startswith("file://"):
        return zarr.storage.LocalStore(url[len("file://"):], read_only=read_only)
    opts = dict(storage_options or {})
    opts.setdefault("skip_instance_cache", True)
    return zarr.storage.FsspecStore.from_url(url, storage_options=opts, read_only=read_only)


class RunStore:
    """Everything one run computes, under ``<store>/runs/<run_id>/``."""

    def __init__(self, store_url: str, run_id: str, storage_options: dict[str, Any] | None = None):
        self.store_url = normalize_url(store_url)
        self.run_id = run_id
        self.storage_options = dict(storage_options or {})
        self.root = join_url(self.store_url, "runs", run_id)
        self.fs, self.root_path = filesystem(self.root, self.storage_options)
        self._zarr: zarr.Group | None = None

    # ---- plain files -------------------------------------------------------------------
    def url(self, rel: str) -> str:
        return join_url(self.root, rel)

    def path(self, rel: str) -> str:
        return posixpath.join(self.root_path, rel.strip("/"))

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a file whole: local writes go through a temp name and a rename."""
        path = self.path(rel)
        if self.fs.protocol in ("file", ("file", "local")) or "file" in self.fs.protocol:
            os.makedirs(posixpath.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def read_json(self, rel: str, default: Any = None) -> Any:
        try:
            return json.loads(self.read_bytes(rel))
        except FileNotFoundError:
            return default

    def list(self, rel: str) -> list[str]:
        """Names directly under a prefix ([] when absent)."""
        try:
            return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path(rel), detail=False))
        except FileNotFoundError:
            return []

    def remove(self, rel: str) -> None:
        if self.fs.exists(self.path(rel)):
            self.fs.rm(self.path(rel), recursive=True)

    def files_complete(self, prefix: str) -> bool:
        return self.exists(join_url(prefix, SUCCESS))

    def mark_files_complete(self, prefix: str) -> None:
        self.write_bytes(join_url(prefix, SUCCESS), b"")

    # ---- zarr ----------------------------------------------------------------------------
    @property
    def zarr(self) -> zarr.Group:
        if self._zarr is None:
            store = zarr_store(self.url("lens.zarr"), self.storage_options)
            self._zarr = zarr.open_group(store=store, mode="a", zarr_format=3)
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

    def is_complete(self, path: str) -> bool:
        g = self.get_group(path)
        return bool(g is not None and g.attrs.get("complete", False))

    def mark_complete(self, path: str, **attrs: Any) -> None:
        """Record the stage's summary attributes, then `complete: true` last."""
        g = self.zarr.require_group(path)
        if attrs:
            g.attrs.update(attrs)
        g.attrs.update({"complete": True})
