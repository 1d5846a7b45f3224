"""Safe names: URL/path slugs for classes and file names, unique across a class list."""

from __future__ import annotations

import re
import unicodedata

_UNSAFE = re.compile(r"[^a-z0-9]+")
MAX_SLUG = 120  # what the site accepts (lens_core.site.schema)
_BASE = 100  # room left for a "-<n>" suffix that makes a slug unique


def safe_token(text: str, max_len: int = 60) -> str:
    """Lowercase ASCII [a-z0-9-] token: no '/', '..', spaces or markup survive."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    token = _UNSAFE.sub("-", ascii_text.lower()).strip("-")
    return token[:max_len].strip("-")


def class_slug(class_id: str, name: str, index: int) -> str:
    """Slug = class id + name ('n02012849-crane'), at most 100 characters; the index when nothing is
    left."""
    parts = [safe_token(class_id)]
    name_token = safe_token(name)
    if name_token and name_token != parts[0]:
        parts.append(name_token)
    slug = "-".join(p for p in parts if p)[:_BASE].strip("-")
    return slug or f"class-{index:04d}"


def unique_slugs(slugs: list[str]) -> list[str]:
    """Make slugs unique by suffixing repeats with -2, -3, ... in order (never over MAX_SLUG)."""
    seen: dict[str, int] = {}
    out = []
    taken = set(slugs)
    for s in slugs:
        if s not in seen:
            seen[s] = 1
            out.append(s)
            continue
        n = seen[s] + 1
        while _suffixed(s, n) in taken:
            n += 1
        seen[s] = n
        taken.add(_suffixed(s, n))
        out.append(_suffixed(s, n))
    return out


def _suffixed(slug: str, n: int) -> str:
    suffix = f"-{n}"
    return slug[: MAX_SLUG - len(suffix)].rstrip("-") + suffix


def plain_text(text: str) -> str:
    """Text without format (Cf: bidi overrides, zero-width) or control (Cc) characters.

    Such characters let a label or class name reorder the page around it ("\u202e" reverses what
    follows), so names shown on the site, in `lens status` and in labels pass through this.
    """
    return "".join(ch for ch in text if unicodedata.category(ch) not in ("Cf", "Cc"))
