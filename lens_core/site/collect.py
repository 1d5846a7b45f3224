"""A run's site data (lens_core/site/SCHEMA.md) gathered from its store: the class entries with
their concepts, importance, renders and crops, the changes since the previous checkpoint, the
mistakes; and the assets each entry points to, to be copied by the publisher."""

from __future__ import annotations

import functools
import json
import posixpath
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


def class_entry(
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
        class_entry(
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
        "run": run_data(info, meta),
        "classes": classes,
        "changes": changes,
        "mistakes": _site_mistakes(store, classes, assets, labels),
    }
    return site, assets


def run_data(info: RunInfo, meta: dict[str, Any]) -> dict[str, Any]:
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
