"""Write the static site through fsspec: assets, class pages and data, method page, index last."""

from __future__ import annotations

import asyncio
import json
import os
import posixpath
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any

from fsspec.asyn import sync
from fsspec.implementations.local import LocalFileSystem

from ..store import filesystem, join_url, normalize_url, write_beside
from . import render
from .headers import object_headers, takes_headers
from .schema import SiteError, check_asset_path, normalize_site, referenced_paths

Asset = bytes | Callable[[], bytes]
BATCH = 64  # files per concurrent put on object stores
_Group = tuple[dict[str, str], dict[str, bytes]]  # (put arguments, {path: bytes})


class SiteWriter:
    """Whole-file writes under a root: atomic rename on disk, batched concurrent puts elsewhere.

    On S3 each object is stored with its Content-Type and Cache-Control (`headers.py`).
    """

    def __init__(self, fs: Any, root: str):
        self.fs, self.root = fs, root.rstrip("/")
        self.local = isinstance(fs, LocalFileSystem)
        self.headers = takes_headers(fs)
        self.immutable = render.immutable_paths()
        self.order: list[str] = []
        self.bytes = 0
        self._dirs: set[str] = set()

    def write_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        """Write files; all are complete when this returns (order within a call is not promised)."""
        items = list(items)
        if not items:
            return
        if self.local:
            for rel, data in items:
                self._write_local(posixpath.join(self.root, rel), data)
        else:
            self._put(items)
        for rel, data in items:
            self.order.append(rel)
            self.bytes += len(data)

    def _write_local(self, path: str, data: bytes) -> None:
        parent = os.path.dirname(path)
        if parent not in self._dirs:
            os.makedirs(parent, exist_ok=True)
            self._dirs.add(parent)
        os.replace(write_beside(path, data, make_parent=False), path)

    def _groups(self, items: list[tuple[str, bytes]]) -> list[_Group]:
        """The files by header set: `pipe` gives every file of one call the same put arguments."""
        groups: dict[tuple[tuple[str, str], ...], dict[str, bytes]] = {}
        for rel, data in items:
            headers = object_headers(rel, self.immutable) if self.headers else {}
            files = groups.setdefault(tuple(sorted(headers.items())), {})
            files[posixpath.join(self.root, rel)] = data
        return [(dict(key), files) for key, files in groups.items()]

    def _put(self, items: list[tuple[str, bytes]]) -> None:
        """One concurrent batch: on an async filesystem, all groups' puts are in flight at once."""
        groups = self._groups(items)
        if len(groups) > 1 and getattr(self.fs, "async_impl", False):
            sync(self.fs.loop, _pipe_groups, self.fs, groups)
            return
        for headers, files in groups:
            self.fs.pipe(files, **headers)


async def _pipe_groups(fs: Any, groups: list[_Group]) -> None:
    """Each group's `_pipe` with its put arguments, all at once (as one `pipe` of the batch was)."""
    await asyncio.gather(*(fs._pipe(files, **headers) for headers, files in groups))


def _check_assets(assets: Mapping[str, Asset]) -> None:
    """Every asset key is a safe path under assets/ that replaces none of the site's own files."""
    reserved = render.reserved_paths()
    for rel in assets:
        check_asset_path(rel)
        if rel in reserved:
            raise SiteError(f"asset path {rel!r} is one of the site's own files")


def _chunks(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def iter_class_files(
    data: dict,
    max_concepts: int = 10,
    slugs: Collection[str] | None = None,
    known: Collection[str] | None = None,
) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of each class's data file and page, class by class: of `slugs` only when
    given; pages link only to the classes in `known` (default: every class of the site)."""
    known = set(known) if known is not None else {c["slug"] for c in data["classes"]}
    for i, cls in enumerate(data["classes"]):
        if slugs is not None and cls["slug"] not in slugs:
            continue
        yield f"data/{cls['slug']}.json", render.class_json(data, i)
        yield (
            f"classes/{cls['slug']}/index.html",
            render.render_class(data, i, known, max_concepts).encode(),
        )


def build_pages(
    site: dict,
    publish_url: str,
    storage_options: dict[str, Any] | None = None,
    assets: Mapping[str, Asset] | None = None,
    max_concepts: int = 10,
    slugs: Collection[str] | None = None,
    known: Collection[str] | None = None,
    skip: Collection[str] = (),
) -> dict[str, Any]:
    """Write everything but the index: static files, assets, each class's data file and page.

    The data is validated before anything is written (`SiteError` on unsafe slugs or paths).
    `slugs`: write only these classes' pages (a partial site, `lens_core.publish.PartialSite`);
    `known`: the classes whose pages exist, the only ones pages link to (default: all);
    `skip`: static files and assets already published with these bytes (not written again).
    """
    t0 = time.perf_counter()
    data = normalize_site(site)
    assets = dict(assets or {})
    _check_assets(assets)
    url = normalize_url(publish_url)
    fs, root = filesystem(url, storage_options)
    out = SiteWriter(fs, root)
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    skip = set(skip)
    out.write_many((rel, b) for rel, b in render.static_files().items() if rel not in skip)
    for chunk in _chunks(((rel, a) for rel, a in assets.items() if rel not in skip), BATCH):
        out.write_many((rel, a() if callable(a) else bytes(a)) for rel, a in chunk)
    seconds["assets"] = time.perf_counter() - t

    t = time.perf_counter()
    max_page = 0
    for chunk in _chunks(iter_class_files(data, max_concepts, slugs, known), BATCH):
        max_page = max([max_page] + [len(b) for rel, b in chunk if rel.endswith(".html")])
        out.write_many(chunk)
    seconds["classes"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0

    written = [c for c in data["classes"] if slugs is None or c["slug"] in slugs]
    missing = sorted({p for c in written for p in referenced_paths(c)} - set(assets))
    return {
        "url": url,
        "classes": len(written),
        "failed": sum(c["status"] == "failed" for c in written),
        "concepts": sum(len(c["concepts"]) for c in written if c["status"] == "ok"),
        "files": len(out.order),
        "bytes": out.bytes,
        "max_class_page_bytes": max_page,
        "missing_assets": missing[:20],
        "n_missing_assets": len(missing),
        "written": out.order,
        "seconds": seconds,
    }


def build_index(
    site: dict, publish_url: str, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write the method page, the class list (search data) and, last, index.html.

    Called once the pages exist, so that the index links only to written pages.
    """
    t0 = time.perf_counter()
    data = normalize_site(site)
    url = normalize_url(publish_url)
    out = SiteWriter(*filesystem(url, storage_options))
    listing = render.class_list(data)
    classes_json = json.dumps(listing, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    pages = [
        ("method.html", render.render_method(data).encode()),
        ("data/classes.json", classes_json.encode()),
        ("data/classes.js", f"window.LENS_CLASSES={render.json_for_html(listing)};\n".encode()),
    ]
    if data["changes"]:
        pages.append(("changes.html", render.render_changes(data).encode()))
    if data["mistakes"] is not None:
        pages.append(("mistakes.html", render.render_mistakes(data).encode()))
    out.write_many(pages)
    index = render.render_index(data).encode()
    out.write_many([("index.html", index)])
    return {
        "index_url": join_url(url, "index.html"),
        "index_bytes": len(index),
        "files": len(out.order),
        "bytes": out.bytes,
        "written": out.order,
        "seconds": time.perf_counter() - t0,
    }


def build_site(
    site: dict,
    publish_url: str,
    storage_options: dict[str, Any] | None = None,
    assets: Mapping[str, Asset] | None = None,
    max_concepts: int = 10,
) -> dict[str, Any]:
    """Render and publish the site: `build_pages`, then `build_index` (index.html written last).

    Returns one summary of both, with the write order (`written`).
    """
    pages = build_pages(site, publish_url, storage_options, assets, max_concepts)
    return merge_summaries(pages, build_index(site, publish_url, storage_options))


def merge_summaries(pages: dict[str, Any], index: dict[str, Any]) -> dict[str, Any]:
    """One summary of a whole site from `build_pages`'s and `build_index`'s.

    Either may be a subset of its keys.
    """
    seconds = {
        **pages["seconds"],
        "index": index["seconds"],
        "total": pages["seconds"]["total"] + index["seconds"],
    }
    merged = {
        **pages,
        "index_url": index["index_url"],
        "index_bytes": index["index_bytes"],
        "seconds": seconds,
    }
    for key in ("files", "bytes", "written"):
        if key in pages and key in index:
            merged[key] = pages[key] + index[key]
    return merged
