"""HTTP headers of published objects: Content-Type by file type, Cache-Control by role.

Object stores serve what was stored with each object, and s3fs's `pipe` stores no Content-Type
(served as binary/octet-stream: a browser downloads the page). The site writer passes these.
"""

from __future__ import annotations

import mimetypes
import posixpath
from collections.abc import Collection
from typing import Any

# content-addressed (the name changes with the bytes): keep forever
IMMUTABLE = "public, max-age=31536000, immutable"
# entry points: a cache must ask (a cheap 304) before reusing its copy
REVALIDATE = "no-cache"
# class pages, per-class data, method page: change only when the same run is published again
PAGE = "public, max-age=300"
# renders and crops: written once under a run's folder, but under fixed names
IMAGE = "public, max-age=86400"

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".json": "application/json; charset=utf-8",
    ".webp": "image/webp",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
}
# what a browser must always fetch fresh: the pages that name everything else
ENTRY_POINTS = frozenset({"index.html", "data/classes.json", "data/classes.js", "changes.html"})


def content_type(path: str) -> str:
    """The Content-Type of a published file, from its extension (UTF-8 for text)."""
    ext = posixpath.splitext(path)[1].lower()
    if ext in CONTENT_TYPES:
        return CONTENT_TYPES[ext]
    guessed = mimetypes.guess_type(path)[0] or "application/octet-stream"
    return f"{guessed}; charset=utf-8" if guessed.startswith("text/") else guessed


def cache_control(rel: str, immutable: Collection[str] = ()) -> str:
    """How long a cache may reuse the file at publish-relative `rel` without asking.

    `immutable` names the content-addressed files; a run's `run.json` (`<run_id>/run.json`
    relative to the publish root) and the entry points are revalidated on every use.
    """
    if rel in immutable:
        return IMMUTABLE
    if rel in ENTRY_POINTS or posixpath.basename(rel) == "run.json":
        return REVALIDATE
    if rel.startswith("assets/"):
        return IMAGE
    return PAGE


def object_headers(rel: str, immutable: Collection[str] = ()) -> dict[str, str]:
    """put_object keyword arguments (`ContentType`, `CacheControl`) for the file at `rel`."""
    return {"ContentType": content_type(rel), "CacheControl": cache_control(rel, immutable)}


def takes_headers(fs: Any) -> bool:
    """True for S3 filesystems (s3fs forwards put_object arguments); others store no headers."""
    protocol = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    return any(p in ("s3", "s3a") for p in protocol)
