"""Publish a run's site: its pages, data files and assets (gathered by lens_core.site.collect),
its index and its line on the runs page, all at once or class by class while the run goes on."""

from __future__ import annotations

import posixpath
import threading
import time
from collections.abc import Callable, Collection, Iterable
from datetime import UTC, datetime
from typing import Any

from lens_core import layout
from lens_core.labels import read_labels
from lens_core.run import RunInfo
from lens_core.settings import settings
from lens_core.site.collect import class_entry, collect_site_data, run_data
from lens_core.stages import class_complete
from lens_core.status import class_state, read_status
from lens_core.store import filesystem, join_url, normalize_url


def site_url(info: RunInfo, publish_url: str | None = None) -> str:
    """Where a run's site lives: `<publish>/<run_id>/`, so checkpoints sit side by side."""
    return join_url(normalize_url(publish_url or info.config.publish), info.run_id)


_KEEP = (
    "url",
    "index_url",
    "classes",
    "failed",
    "concepts",
    "files",
    "bytes",
    "max_class_page_bytes",
    "n_missing_assets",
    "seconds",
)


def publish_pages(
    info: RunInfo, publish_url: str | None = None, skip: Collection[str] = ()
) -> dict[str, Any]:
    """Write the run's class pages, data files and assets under `<publish>/<run_id>/`.

    No index yet: `publish_index` writes it once the pages exist.

    `skip`: static files and assets a `PartialSite` of this run already wrote (not written again).
    Returns a summary; its `site` is the site data that `publish_index` takes.
    """
    from lens_core.site.builder import build_pages

    base = normalize_url(publish_url or info.config.publish)
    site, assets = collect_site_data(info, base)
    summary = build_pages(
        site, site_url(info, base), info.config.storage_options, assets, skip=skip
    )
    return {
        **{k: summary[k] for k in _KEEP if k in summary},
        "site": site,
        "failed_classes": [c["slug"] for c in site["classes"] if c["status"] != "ok"],
    }


def publish_index(
    info: RunInfo, site: dict[str, Any], publish_url: str | None = None
) -> dict[str, Any]:
    """Write the run's index, then the runs page above it.

    The index is the search data, the method page and, last, index.html.
    """
    from lens_core.site.builder import build_index

    base = normalize_url(publish_url or info.config.publish)
    summary = build_index(site, site_url(info, base), info.config.storage_options)
    failed = sum(c["status"] != "ok" for c in site["classes"])
    _add_to_runs_page(base, info, site["run"], len(site["classes"]), failed)
    return {k: summary[k] for k in ("index_url", "index_bytes", "files", "bytes", "seconds")}


def _add_to_runs_page(
    base: str, info: RunInfo, run: dict[str, Any], classes: int, failed: int
) -> None:
    """Record the run (`<run id>/run.json`: its model, checkpoint and counts) on the runs page
    above its site, `<base>/index.html`."""
    from lens_core.site.runs import write_runs_index

    meta = {"run_id": info.run_id, "published": datetime.now(UTC).isoformat(timespec="seconds")}
    meta |= {k: run[k] for k in ("created", "model", "layer", "checkpoint", "checkpoint_digest")}
    write_runs_index(
        base, {**meta, "classes": classes, "failed": failed}, info.config.storage_options
    )


def published(pages: dict[str, Any], index: dict[str, Any]) -> dict[str, Any]:
    """One summary of a publish: `publish_pages`'s, without the site data, and `publish_index`'s."""
    from lens_core.site.builder import merge_summaries

    return merge_summaries({k: v for k, v in pages.items() if k != "site"}, index)


def publish(info: RunInfo, publish_url: str | None = None) -> dict[str, Any]:
    """Build the run's site at `<publish>/<run_id>/` (pages, then its index), then the runs page.

    The runs page lives above the run's site, at the publish root.
    """
    pages = publish_pages(info, publish_url)
    return published(pages, publish_index(info, pages["site"], publish_url))


_SLIM = ("cluster", "concept_layout", "attributions", "fidelity")  # what the index never shows


class PartialSite:
    """A run's site published while the run goes on: class pages as classes finish, the index
    rate-limited, the final publish (`finish`) making the site whole.

    Guarantees: the index and every page link only to pages that exist (classes without a page are
    `pending` cards without a link and are left out of the search data); a class's assets and data
    file are written before its page, pages before the index that links them, and the first page
    only once an index and a method page exist (a skeleton index, every class pending, when the
    site has none). Each file is one whole write (rename on disk, one PUT on object stores), so a
    reader never sees half a page. Concepts to be rendered in this run show "rendering" until
    `finalize_viz` marks their class. Cross-class links, changes and mistakes come with `finish`.

    Call from one process (the flow's; thread-safe): `pages(slugs)` when a class's chain ends (ok
    or failed) and when `finalize_viz` marks its renders; `flush()` when `due_in()` seconds have
    passed (a pending index update); `finish()` once everything else is done.
    """

    def __init__(
        self,
        info: RunInfo,
        publish_url: str | None = None,
        interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.info = info
        self.base = normalize_url(publish_url or info.config.publish)
        self.url = site_url(info, self.base)
        self.interval = (
            settings().index_interval_s if interval_s is None else max(0.0, float(interval_s))
        )
        self.clock = clock
        self.entries: dict[
            str, dict[str, Any]
        ] = {}  # classes with a page: their entry, for the index
        self.written: set[str] = set()  # static files and assets written by this publisher
        self.stats = {"writes": 0, "bytes": 0, "seconds": 0.0, "page_writes": 0, "index_writes": 0}
        self._classes = list(info.classes)
        self._dirty = False
        self._last_index: float | None = None
        self._has_index: bool | None = None
        self._listed = False
        self._run: dict[str, Any] | None = None
        self._lock = threading.Lock()

    @property
    def index_url(self) -> str:
        """The run's index page (the link to give once `published` is not empty)."""
        return join_url(self.url, "index.html")

    @property
    def published(self) -> set[str]:
        """The classes whose pages are on the site."""
        return set(self.entries)

    def pages(self, slugs: Iterable[str]) -> dict[str, Any]:
        """Publish these classes' pages now (with their data files and new assets), then the index
        if an update is due. A class still running (neither complete nor failed) stays pending."""
        with self._lock:
            t0 = time.perf_counter()
            store = self.info.store()
            by_slug = {c.slug: c for c in self._classes}
            wanted = [s for s in dict.fromkeys(slugs) if s in by_slug]
            statuses = read_status(store, wanted)
            labels = read_labels(store)
            names = {c.slug: c.name for c in self.info.all_classes or self._classes}
            assets: dict[str, Any] = {}
            new: dict[str, dict[str, Any]] = {}
            for slug in wanted:
                status = statuses.get(slug, {})
                if class_state(status) != "failed" and not class_complete(store, slug):
                    continue
                new[slug] = class_entry(
                    store,
                    by_slug[slug],
                    status,
                    {},
                    {},
                    names,
                    assets,
                    labels.get(slug, {}),
                    self.info.config.maco.top_k,
                    partial=True,
                )
            out: dict[str, Any] = {"pages": sorted(new), "index": None}
            if new:
                from lens_core.site.builder import build_pages
                from lens_core.site.render import static_files

                if not self._index_exists():
                    self._write_index()  # pages link index.html and method.html: they come first
                site = self._site({**self.entries, **new}, full=new)
                summary = build_pages(
                    site,
                    self.url,
                    self.info.config.storage_options,
                    assets,
                    slugs=set(new),
                    known=set(self.entries) | set(new),
                    skip=self.written,
                )
                self.written |= set(assets) | set(static_files())
                self.entries.update(
                    {s: {k: v for k, v in e.items() if k not in _SLIM} for s, e in new.items()}
                )
                self._dirty = True
                self._count(summary, "page_writes")
            self.stats["seconds"] += time.perf_counter() - t0
            out["index"] = self._flush(False)
            return out

    def due_in(self) -> float | None:
        """Seconds until the pending index update may be written (0: now).

        None when no update is pending.
        """
        with self._lock:
            if not self._dirty:
                return None
            if self._last_index is None:
                return 0.0
            return max(0.0, self.interval - (self.clock() - self._last_index))

    def flush(self, force: bool = False) -> dict[str, Any] | None:
        """Write the pending index update if it is due (`force`: now); its summary, or None."""
        with self._lock:
            return self._flush(force)

    def finish(self) -> dict[str, Any]:
        """The final publish: the whole site as `publish` writes it.

        Every page, cross-class links, changes, mistakes, the index and the runs page, without
        rewriting the assets already written.
        """
        with self._lock:
            t0 = time.perf_counter()
            pages = publish_pages(self.info, self.base, skip=self.written)
            summary = published(pages, publish_index(self.info, pages["site"], self.base))
            self.stats["writes"] += summary["files"] + 2  # + run.json and the runs page
            self.stats["bytes"] += summary["bytes"]
            self.stats["seconds"] += time.perf_counter() - t0
            self._dirty = False
            return summary

    # ---- internals (called with the lock held) ----------------------------------------------
    def _site(
        self, entries: dict[str, dict[str, Any]], full: dict[str, dict[str, Any]] | None = None
    ) -> dict:
        """Site data over every class: `entries` where given, a pending card elsewhere; with `full`,
        only those classes carry their entry (the others are names for previous/next links)."""
        if self._run is None:
            self._run = run_data(self.info, self.info.store().read_json(layout.RUN_JSON, {}))
        chosen = entries if full is None else full
        classes = [
            chosen.get(c.slug)
            or {
                "index": c.index,
                "id": c.id,
                "name": c.name,
                "slug": c.slug,
                "synonyms": list(c.synonyms),
                "status": "pending",
            }
            for c in self._classes
        ]
        return {"run": self._run, "classes": classes, "changes": None, "mistakes": None}

    def _index_exists(self) -> bool:
        if self._has_index is None:
            fs, root = filesystem(self.url, self.info.config.storage_options)
            self._has_index = bool(fs.exists(posixpath.join(root, "index.html")))
        return self._has_index

    def _flush(self, force: bool) -> dict[str, Any] | None:
        if not self._dirty:
            return None
        if (
            not force
            and self._last_index is not None
            and self.clock() - self._last_index < self.interval
        ):
            return None
        return self._write_index()

    def _write_index(self) -> dict[str, Any]:
        """The index over the pages written so far (method page and search data first, index.html
        last), and the runs page above it once, when the first class is on it."""
        from lens_core.site.builder import SiteWriter, build_index
        from lens_core.site.render import static_files

        t0 = time.perf_counter()
        static = {p: b for p, b in static_files().items() if p not in self.written}
        if static:  # the CSS, JS and icon the index links
            SiteWriter(*filesystem(self.url, self.info.config.storage_options)).write_many(
                static.items()
            )
            self.written |= set(static)
            self.stats["writes"] += len(static)
            self.stats["index_writes"] += len(static)
        site = self._site(self.entries)
        summary = build_index(site, self.url, self.info.config.storage_options)
        self._count(summary, "index_writes")
        if self.entries and not self._listed:
            failed = sum(e["status"] == "failed" for e in self.entries.values())
            _add_to_runs_page(self.base, self.info, site["run"], len(self._classes), failed)
            self._listed = True
            self.stats["writes"] += 2
        self._has_index = True
        self._dirty = False
        if self.entries:  # a skeleton index (no page yet) does not hold back the first real one
            self._last_index = self.clock()
        self.stats["seconds"] += time.perf_counter() - t0
        return {k: summary[k] for k in ("index_url", "files", "bytes", "seconds")}

    def _count(self, summary: dict[str, Any], kind: str) -> None:
        self.stats["writes"] += summary["files"]
        self.stats["bytes"] += summary["bytes"]
        self.stats[kind] += summary["files"]
