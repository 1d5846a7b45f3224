"""The static site: Jinja2 pages, CSS/JS and data files, published over fsspec (SCHEMA.md)."""

from .builder import build_site, iter_class_files
from .schema import SiteError, check_slug, normalize_site

__all__ = ["SiteError", "build_site", "check_slug", "iter_class_files", "normalize_site"]
