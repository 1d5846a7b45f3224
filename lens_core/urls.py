"""URL strings: every store and publish location is an fsspec URL (file://, s3://, ...)."""

from __future__ import annotations

import os
import posixpath


def normalize_url(url: str) -> str:
    """Absolute URL with a protocol: plain and relative paths become file:///abs/path."""
    if "://" not in url:
        return "file://" + os.path.abspath(url)
    proto, rest = url.split("://", 1)
    if proto == "file":
        return "file://" + os.path.abspath(rest)
    return url.rstrip("/")


def join_url(base: str, *parts: str) -> str:
    """`base` and path parts joined by single slashes (empty parts skipped)."""
    return posixpath.join(base.rstrip("/"), *[p.strip("/") for p in parts if p])
