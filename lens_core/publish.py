"""Gather a run's outputs into the site's data (lens_core/site/SCHEMA.md) and publish it."""

from __future__ import annotations

import functools
import json
import posixpath
import threading
import time
from collections.abc import Callable, Collection, Iterable
from datetime import UTC, datetime
from typing import Any

import numpy as np

from lens_core import layout
from lens_core.changes import read_changes
from lens_core.confusions import concept_label, read_confusions
from lens_core.crops import concept_color
from lens_core.labels import read_labels
from lens_core.renders import rendered_concepts
from lens_core.results import read_result
from lens_core.run import RunInfo
from lens_core.settings import settings
from lens_core.stages import class_complete
from lens_core.status import class_note, class_state, read_status
from lens_core.store import RunStore, filesystem, join_url, normalize_url

TOP_CONCEPTS = 10


def embed_2d(X: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D PCA coordinates scaled to [0, 1] (the cluster graph of per-image importance vectors)."""
    from sklearn.decomposition import PCA

    if len(X) == 0:
        return np.zeros((0, 2))
    if len(X) < 3 or np.allclose(X, X[0]):
        xy = np.zeros((len(X), 2))
    else:
        xy = PCA(n_components=2, random_state=seed).fit_transform(X)
    lo, hi = xy.min(0), xy.max(0)
    return (xy - lo) / np.where(hi - lo > 0, hi - lo, 1)


def concept_layout(W: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D layout of concepts from their pairwise cosine dissimilarity (metric MDS), in [0, 1]."""
    from sklearn.manifold import MDS

    V = W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)
    D = np.clip(1 - V @ V.T, 0, 2)
    np.fill_diagonal(D, 0)
    if len(W) < 3:
        xy = np.stack([np.arange(len(W)), np.zeros(len(W))], 1).astype(float)
    else:
        xy = MDS(
            n_components=2,
            metric="precomputed",
            init="random",
            random_state=seed,
            n_init=1,
            normalized_stress="auto",
        ).fit_transform((D + D.T) / 2)
    lo, hi = xy.min(0), xy.max(0)
    return (xy - lo) / np.where(hi - lo > 0, hi - lo, 1)


def _asset(assets: dict, store: RunStore, src: str, dest: str) -> str:
    assets[dest] = functools.partial(store.read_bytes, src)
    return dest


def _class_entry(
    store: RunStore,
    cls: Any,
    status: dict,
    similar: dict,
    alignment: dict,
    names: dict[str, str],
    assets: dict,
    labels: dict[str, Any],
    top_k: int | None = None,
    partial: bool = False,
) -> dict[str, Any]:
    """A class's site entry. Renders show where `viz/<class>` marks them done; on a `partial`
    site, the top `top_k` concepts (all when None) not rendered yet are `viz_pending`."""
    slug = cls.slug
    entry: dict[str, Any] = {
        "index": cls.index,
        "id": cls.id,
        "name": cls.name,
        "slug": slug,
        "synonyms": list(cls.synonyms),
        "status": "ok",
        "error": None,
        "concepts": [],
    }
    result = read_result(store, slug, *layout.CLASS_STAGES)
    if class_state(status) == "failed" or result is None:
        errors = [
            f"{stage}: {rec.get('error')}"
            for stage, rec in status.items()
            if rec.get("state") == "failed"
        ]
        entry.update(status="failed", error="; ".join(errors) or "not finished in this run")
        return entry
    acts = store.zarr[layout.acts(slug)]
    imp, W, order, share = result.importance, result.W, result.order, result.logit_share
    crops_index = store.read_json(layout.crops_index(slug), {})
    sobol = imp["sobol"][:]
    sobol_share = imp["sobol_share"][:]
    n_top = imp["n_top_images"][:]
    min_top = int(imp.attrs.get("important_min_images", 3))
    rendered = rendered_concepts(store, slug, result.fingerprint)
    to_come = set(order[:top_k] if top_k else order) - rendered if partial else set()
    basis = result.shown[1]
    entry.update(
        n_images=int(acts.attrs["n_images"]),
        n_patches=int(acts.attrs["n_patches"]),
        skipped_images=len(acts.attrs.get("skipped", [])),
        assigned_images=imp.attrs.get("assigned_images"),
        assigned_patches=imp.attrs.get("assigned_patches"),
        importance_basis=basis,
        note=imp.attrs.get("note") or class_note(status) or None,
        share_residual=_rounded(imp.attrs.get("share_residual")),
        share_bias=_rounded(imp.attrs.get("share_bias")),
        flag="rarely-predicted" if imp.attrs.get("basis_reason") == "few-predicted" else None,
    )

    def asset(src: str) -> str:
        return _asset(assets, store, src, f"assets/{src}")

    for rank, c in enumerate(order[:TOP_CONCEPTS], start=1):
        concept: dict[str, Any] = {
            "id": c,
            "rank": rank,
            "color": concept_color(rank - 1),
            "logit_share": round(float(share[c]), 2) if share is not None else None,
            "sobol": round(float(sobol[c]), 4),
            "sobol_share": round(float(sobol_share[c]), 2),
            "n_top_images": int(n_top[c]),
            "important": bool(n_top[c] >= min_top),
            "crops": [
                asset(layout.crop_file(slug, f))
                for f in crops_index.get("concepts", {}).get(str(c), [])
            ],
            "similar": [
                dict(s, name=names.get(s["slug"], s["slug"]))
                for s in similar.get(slug, [[]] * len(W))[c]
            ],
            "aligned_classes": [
                {"slug": a["slug"], "name": names.get(a["slug"], a["slug"]), "score": a["score"]}
                for a in (alignment.get(slug) or [[]] * len(W))[c]
                if a["slug"]
            ],
            "viz": None,
            "viz_plain": None,
            "viz_pending": c in to_come,
            **_label_fields(labels.get(str(c))),
        }
        if c in rendered:
            concept["viz"] = asset(layout.viz_file(slug, c, "png"))
            concept["viz_plain"] = asset(layout.viz_file(slug, c, "webp"))
        entry["concepts"].append(concept)
    rank_of = {c: r for r, c in enumerate(order)}
    image_imp = imp["image_importance"][:]
    positions = imp["image_positions"][:]
    xy = embed_2d(image_imp)
    thumbs = crops_index.get("thumbs", {})
    entry["cluster"] = {
        "points": [
            {
                "x": round(float(x), 4),
                "y": round(float(y), 4),
                "concept": int(image_imp[i].argmax()),
                "rank": rank_of[int(image_imp[i].argmax())] + 1,
                "image": asset(layout.crop_file(slug, thumbs[str(int(p))]))
                if str(int(p)) in thumbs
                else None,
            }
            for i, ((x, y), p) in enumerate(zip(xy, positions, strict=True))
            if i < 200
        ]
    }
    layout_xy = concept_layout(W)
    entry["concept_layout"] = [
        {
            "concept": c,
            "rank": rank_of[c] + 1,
            "x": round(float(layout_xy[c, 0]), 4),
            "y": round(float(layout_xy[c, 1]), 4),
        }
        for c in range(len(W))
    ]
    entry["attributions"] = [
        {
            "heatmap": asset(layout.crop_file(slug, a["file"])),
            "image": asset(layout.crop_file(slug, a["plain"])) if a.get("plain") else None,
            "caption": f"image {a['image']}",
            "concepts": [
                {"concept": d["concept"], "rank": d["rank"], "share": d["share"]}
                for d in a.get("concepts", [])
            ],
        }
        for a in crops_index.get("attributions", [])
    ]
    entry["fidelity"] = {
        "curve": [round(float(v), 4) for v in imp["deletion"][:]],
        "random_curve": [round(float(v), 4) for v in imp["deletion_random"][:]],
        "auc": round(float(imp.attrs["deletion_auc"]), 4),
        "random_auc": round(float(imp.attrs["deletion_random_auc"]), 4),
    }
    return entry


def _rounded(value: Any) -> float | None:
    """A stored percentage for the page (two decimals), None when it was not computed."""
    return None if value is None else round(float(value), 2)


def _label_fields(label: dict[str, Any] | None) -> dict[str, Any]:
    """A concept's label as the site shows it: its text, and where a carried label came from."""
    if not label:
        return {"label": None, "label_source": None, "label_from": None}
    carried = label.get("source") == "carried"
    origin = (
        f"concept {label.get('from_concept')} of run {label.get('from_run')}" if carried else None
    )
    return {"label": label.get("text"), "label_source": label.get("source"), "label_from": origin}


def _concept_change(
    concept: dict[str, Any], matched: dict[int, dict], appeared: set[int]
) -> dict | None:
    m = matched.get(concept["id"])
    if m is not None:
        kind = "up" if m["delta"] >= 0.5 else "down" if m["delta"] <= -0.5 else "same"
        return {
            "kind": kind,
            "delta": m["delta"],
            "before": m["before"],
            "similarity": m["similarity"],
        }
    return (
        {"kind": "new", "delta": None, "before": None, "similarity": None}
        if concept["id"] in appeared
        else None
    )


def _class_changes(
    entry: dict[str, Any],
    report: dict[str, Any],
    summary: dict[str, Any],
    rank: int,
    marked: bool,
    old_labels: dict[str, Any],
) -> None:
    """Add what changed since the previous checkpoint to a class entry (and to its concepts)."""
    matched = {m["after"]: m for m in report["matched"]}
    appeared = {a["concept"] for a in report["appeared"]}
    for concept in entry["concepts"]:
        concept["change"] = _concept_change(concept, matched, appeared)
    entry["changes"] = {
        "score": report["score"],
        "rank": rank,
        "marked": marked,
        "previous_run": summary["previous"],
        "previous_label": summary["previous_label"],
        "prev_slug": report["prev_slug"],
        "vanished": [
            {
                "concept": v["concept"],
                "importance": v["importance"],
                "label": (old_labels.get(str(v["concept"])) or {}).get("text"),
            }
            for v in report["vanished"]
        ],
        "carried_labels": len(report.get("labels", {}).get("carried", [])),
        "logit_change": report["logit_change"],
        "accuracy_before": report["accuracy_before"],
        "accuracy_after": report["accuracy_after"],
    }


def _previous_page(
    info: RunInfo, previous: str, prev_slug: str, base: str
) -> dict[str, Any] | None:
    """The previous run's published data file of a class (its concepts' viz and crops).

    None unless that run's site is published here.
    """
    url = join_url(base, previous, "data", f"{prev_slug}.json")
    try:
        fs, path = filesystem(url, info.config.storage_options)
        data = json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError, OSError):
        return None
    return data if isinstance(data, dict) else None


def _previous_site(info: RunInfo, previous: str, base: str) -> tuple[bool, set[str]]:
    """(whether the previous run's site index exists beside this one, the slugs of its class pages
    there): pages link to the previous run's pages only when those exist (issue 21)."""
    try:
        fs, root = filesystem(join_url(base, previous), info.config.storage_options)
        index = fs.exists(posixpath.join(root, "index.html"))
        classes = posixpath.join(root.rstrip("/"), "classes")
        found = fs.find(classes)  # one listing, whatever the number of classes
    except (FileNotFoundError, OSError):
        return False, set()
    pages = (posixpath.dirname(p) for p in found if posixpath.basename(p) == "index.html")
    return index, {posixpath.basename(d) for d in pages if posixpath.dirname(d) == classes}


def _site_changes(
    info: RunInfo,
    entries: list[dict[str, Any]],
    summary: dict[str, Any],
    reports: dict[str, dict[str, Any]],
    prev_store: RunStore,
    base: str,
) -> dict[str, Any]:
    """The changes page's data, and each compared class's changes (added to `entries`)."""
    top = info.config.changes.most_changed
    previous_site, previous_pages = _previous_site(info, summary["previous"], base)
    rank_of = {row["slug"]: i + 1 for i, row in enumerate(summary["ranking"])}
    old_labels = read_labels(prev_store)
    by_slug = {e["slug"]: e for e in entries}
    ranking = []
    for row in summary["ranking"]:
        entry, report = by_slug.get(row["slug"]), reports.get(row["slug"])
        if entry is None or report is None or entry["status"] != "ok":
            continue
        rank = rank_of[row["slug"]]
        marked = rank <= top and row["score"] > 0
        _class_changes(
            entry, report, summary, rank, marked, old_labels.get(report["prev_slug"], {})
        )
        entry["changes"]["previous_page"] = report["prev_slug"] in previous_pages
        before = _previous_page(info, summary["previous"], report["prev_slug"], base)
        ranking.append(
            {
                **{k: row[k] for k in ("slug", "score", "appeared", "vanished", "matched")},
                "name": entry["name"],
                "marked": marked,
                "prev_slug": report["prev_slug"],
                "logit_change": report["logit_change"],
                "before": _top_concepts(before) if before else None,
                "after": _top_concepts(entry),
            }
        )
    names = {e["slug"]: e["name"] for e in entries}
    not_comparable = [
        {"slug": row["slug"], "name": names.get(row["slug"], row["slug"]), "reason": row["reason"]}
        for row in summary.get("not_comparable", [])
        if row.get("slug") in names
    ]
    return {
        "previous_run": summary["previous"],
        "previous_label": summary["previous_label"],
        "previous_site": previous_site,
        "threshold": summary["threshold"],
        "ranking": ranking,
        "not_comparable": not_comparable,
    }


def _top_concepts(entry: dict[str, Any], n: int = 3) -> list[dict[str, Any]]:
    """A class's first concepts as the changes page shows them.

    Each with its id, label, share, viz and three crops.
    """
    basis = entry.get("importance_basis")
    return [
        {
            "id": c["id"],
            "label": c.get("label"),
            "viz": c.get("viz_plain") or c.get("viz"),
            "crops": list(c.get("crops") or [])[:3],
            "shown": c.get("sobol_share") if basis == "sobol" else c.get("logit_share"),
        }
        for c in (entry.get("concepts") or [])[:n]
    ]


def _site_mistakes(
    store: RunStore, entries: list[dict[str, Any]], assets: dict, labels: dict[str, Any]
) -> dict[str, Any] | None:
    """The mistakes page's data from the stored confusions (example images as assets), and each
    bias candidate flagged on its concept card (`bias`)."""
    report = read_confusions(store)
    if report is None:
        return None
    ok = {e["slug"]: e for e in entries if e["status"] == "ok"}
    pairs = []
    for pair in report.get("pairs", []):
        if pair["true"] not in ok:
            continue
        predicted = pair["predicted"] if pair["predicted"] in ok else None
        examples = (
            [
                {
                    "concepts": ex.get("concepts", []),
                    **{
                        kind: _asset(
                            assets,
                            store,
                            layout.confusion_file(pair["true"], pair["predicted"], ex[kind]),
                            "assets/"
                            f"{layout.confusion_file(pair['true'], pair['predicted'], ex[kind])}",
                        )
                        for kind in ("overlay", "plain")
                        if ex.get(kind)
                    },
                }
                for ex in pair.get("examples", [])
            ]
            if predicted
            else []
        )
        pairs.append(
            {
                **{
                    k: pair.get(k)
                    for k in (
                        "true",
                        "true_name",
                        "predicted_name",
                        "images",
                        "basis",
                        "note",
                        "residual",
                        "bias",
                    )
                },
                "predicted": predicted,
                "examples": examples,
                "concepts": [
                    {**c, "label": concept_label(labels, predicted, c["concept"])}
                    for c in pair.get("concepts", [])
                ]
                if predicted
                else [],
            }
        )
    for slug, flags in report.get("bias", {}).items():
        for concept in ok.get(slug, {}).get("concepts", []):
            flag = flags.get(str(concept["id"]))
            if flag:
                concept["bias"] = {**flag, "pairs": [t for t in flag["pairs"] if t in ok]}
    return {
        "mistaken": report.get("mistaken", 0),
        "n_images": report.get("n_images", 0),
        "pairs": pairs,
    }


def collect_site_data(
    info: RunInfo, publish_url: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(site data, assets {publish path: loader}) from everything the run stored, for a site
    published under `publish_url` (default: the configured one)."""
    store = info.store()
    meta = store.read_json(layout.RUN_JSON, {})
    statuses = read_status(store, info.slugs)
    similar = store.read_json(layout.SIMILAR, {})
    alignment = store.read_json(layout.ALIGNMENT, {})
    names = {c.slug: c.name for c in info.all_classes or info.classes}
    assets: dict[str, Any] = {}
    labels = read_labels(store)
    classes = [
        _class_entry(
            store,
            c,
            statuses.get(c.slug, {}),
            similar,
            alignment,
            names,
            assets,
            labels.get(c.slug, {}),
            info.config.maco.top_k,
        )
        for c in info.classes
    ]
    summary, reports = read_changes(store)
    changes = None
    if summary is not None:
        prev_store = RunStore(info.config.store, summary["previous"], info.config.storage_options)
        changes = _site_changes(
            info,
            classes,
            summary,
            reports,
            prev_store,
            normalize_url(publish_url or info.config.publish),
        )
    site = {
        "run": _run_data(info, meta),
        "classes": classes,
        "changes": changes,
        "mistakes": _site_mistakes(store, classes, assets, labels),
    }
    return site, assets


def _run_data(info: RunInfo, meta: dict[str, Any]) -> dict[str, Any]:
    """The site's `run` record (run.json's `meta` gives its creation time)."""
    cfg = info.config
    return {
        "run_id": info.run_id,
        "model": cfg.model.arch,
        "checkpoint": cfg.model.checkpoint,
        "checkpoint_digest": info.checkpoint_digest,
        "layer": cfg.model.layer,
        "data_url": info.data_url,
        "created": meta.get("created"),
        "n_concepts": cfg.concepts.n_concepts,
        "config": cfg.redacted(),
    }


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
                new[slug] = _class_entry(
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
            self._run = _run_data(self.info, self.info.store().read_json(layout.RUN_JSON, {}))
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
