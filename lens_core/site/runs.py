"""The top-level page of a publish URL: every published run side by side, by date and checkpoint.

Each run's site lives at `<publish>/<run_id>/` with a `run.json`; the top page is derived from
those files (no shared list to race on when two runs publish at once).
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from lens_core.store import filesystem, join_url

_ENV = Environment(loader=PackageLoader("lens_core.site", "templates"), autoescape=select_autoescape(["html"]))


def list_published_runs(publish_url: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """run.json of every run published under `publish_url`, newest first."""
    fs, root = filesystem(publish_url, storage_options)
    runs = []
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    for entry in entries:
        try:
            runs.append(json.loads(fs.cat_file(posixpath.join(entry, "run.json"))))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, json.JSONDecodeError):
            continue
    return sorted(runs, key=lambda r: str(r.get("published", "")), reverse=True)


def write_runs_index(publish_url: str, run_meta: dict[str, Any], storage_options: dict[str, Any] | None = None) -> str:
    """Record this run's `run.json` in its folder, then rewrite `<publish>/index.html`."""
    fs, root = filesystem(publish_url, storage_options)
    fs.pipe_file(posixpath.join(root, run_meta["run_id"], "run.json"), json.dumps(run_meta, indent=1).encode())
    runs = list_published_runs(publish_url, storage_options)
    html = _ENV.get_template("runs.html").render(runs=runs)
    fs.pipe_file(posixpath.join(root, "index.html"), html.encode())
    return join_url(publish_url, "index.html")
