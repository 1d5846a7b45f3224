"""The top-level page of a publish URL: every published run side by side, by date and checkpoint.

Each run's site lives at `<publish>/<run_id>/` with a `run.json`; the top page is derived from
those files (no shared list to race on when two runs publish at once). Anyone who can write to
the publish URL can plant a run.json, so only well-formed runs are listed, field by field.
"""

from __future__ import annotations

import json
import numbers
import posixpath
import re
from typing import Any

from jinja2 import Environment, PackageLoader

from lens_core.store import filesystem, join_url

from .builder import SiteWriter

_ENV = Environment(loader=PackageLoader("lens_core.site", "templates"), autoescape=True)
RUN_ID_RE = re.compile(r"[0-9a-f]{12}")  # lens_core.config.short_hash: 12 lowercase hex digits
TEXT_FIELDS = ("published", "created", "model", "layer", "checkpoint", "checkpoint_digest")
COUNT_FIELDS = ("classes", "failed")
MAX_TEXT = 500


def is_run_id(value: Any) -> bool:
    """True for a run id of the form the project generates (12 lowercase hex digits)."""
    return isinstance(value, str) and RUN_ID_RE.fullmatch(value) is not None


def _text(value: Any) -> str:
    """A plain, bounded string for display (numbers are shown, anything else is dropped)."""
    if isinstance(value, str):
        return value[:MAX_TEXT]
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return str(value)
    return ""


def _count(value: Any) -> int | None:
    """A non-negative integer count, or None."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0:
        return int(value)
    return None


def clean_run(meta: Any, folder: str) -> dict[str, Any] | None:
    """The displayable fields of a run.json found in `folder`, or None unless it is a real run's.

    A run's id must be the project's form and the name of the folder holding its run.json.
    """
    if not isinstance(meta, dict) or not is_run_id(meta.get("run_id")) or meta["run_id"] != folder:
        return None
    run: dict[str, Any] = {"run_id": folder}
    run.update({key: _text(meta.get(key)) for key in TEXT_FIELDS})
    run.update({key: _count(meta.get(key)) for key in COUNT_FIELDS})
    return run


def _read_run(fs: Any, entry: str) -> dict[str, Any] | None:
    """The cleaned run.json under folder `entry`, or None (no file, not JSON, not a run)."""
    folder = posixpath.basename(entry.rstrip("/"))
    if not is_run_id(folder):
        return None
    try:
        meta = json.loads(fs.cat_file(posixpath.join(entry, "run.json")))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError, RecursionError):
        return None
    return clean_run(meta, folder)


def list_published_runs(
    publish_url: str, storage_options: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The cleaned run.json of every run published under `publish_url`, newest first."""
    fs, root = filesystem(publish_url, storage_options)
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    runs = [run for run in (_read_run(fs, entry) for entry in entries) if run]
    return sorted(runs, key=lambda r: r["published"], reverse=True)


def render_runs_page(runs: list[dict[str, Any]]) -> str:
    """The runs page HTML for cleaned run records (autoescaped)."""
    return _ENV.get_template("runs.html").render(runs=runs)


def write_runs_index(
    publish_url: str, run_meta: dict[str, Any], storage_options: dict[str, Any] | None = None
) -> str:
    """Record this run's `run.json` in its folder, then rewrite `<publish>/index.html`."""
    if not is_run_id(run_meta.get("run_id")):
        raise ValueError(f"not a run id: {run_meta.get('run_id')!r} (12 lowercase hex digits)")
    out = SiteWriter(*filesystem(publish_url, storage_options))
    out.write_many([(f"{run_meta['run_id']}/run.json", json.dumps(run_meta, indent=1).encode())])
    html = render_runs_page(list_published_runs(publish_url, storage_options))
    out.write_many([("index.html", html.encode())])
    return join_url(publish_url, "index.html")
