"""What changed between two checkpoints: each class's concepts matched across two runs.

Two runs of a lineage on the same data and method sample the same images and cut the same
patches, so a concept of one run and a concept of the other can be compared on the same patches
(`similarity`) and paired one-to-one (`match`). Per class the report (`compare_class`) gives the
matched pairs, the concepts that appeared and vanished, the class's logit and accuracy before and
after, and one change score (`change_score`): how much of the class's importance moved to other
patches. Measured on patches rather than on concept pairs, the score does not move when NMF
splits or merges concepts over the same patches (concept matching is less stable than the
evidence it describes), and a vanished top concept counts a lot while a minor one counts little;
on the ground truth of tests/test_changes.py it singles out the changed class, where a
concept-pair score (1 - sum of similarity x min(p_i, q_j)) did not.

The report does not depend on the order of either run's concepts (the assignment is optimal, the
score needs no assignment at all). The comparison is per class: a class whose two runs share no
patch (its images changed between them) is reported "not comparable", with the reason, and every
other class is still compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from lens_core import layout
from lens_core.identity import image_key
from lens_core.results import read_result
from lens_core.run import RunInfo
from lens_core.store import RunStore

DEFAULT_THRESHOLD = 0.5


class NotComparable(ValueError):
    """One class of two runs cannot be compared (they share no patch); the message says why."""


@dataclass
class ClassSide:
    """One run's explanation of one class, as the comparison needs it."""

    slug: str
    rows: list[tuple]  # (image key, x0, y0, x1, y1) of each patch, U's row order
    U: np.ndarray  # (n, k)
    shown: np.ndarray  # (k,) the importance percentages the page shows (logit or Sobol share)
    basis: str
    order: np.ndarray
    image_keys: list[str]
    image_logit: np.ndarray
    image_correct: np.ndarray  # bool per image: the model assigns it to the class
    fingerprint: str | None


def read_side(store: RunStore, slug: str) -> ClassSide | None:
    """A class's concepts, importance and logits from a run's store (None when not complete)."""
    result = read_result(store, slug, "activations", "factorize", "importance")
    if result is None:
        return None
    acts = store.zarr[layout.acts(slug)]
    shown, basis = result.shown
    urls = list(acts.attrs["image_urls"])
    keys = [image_key(u) for u in urls]
    patches = acts["patches"][:]
    rows = [(keys[int(p[0])], *(int(v) for v in p[1:])) for p in patches]
    index = int(acts.attrs.get("label_index", -1))
    return ClassSide(
        slug=slug,
        rows=rows,
        U=result.U.astype(np.float64),
        shown=np.asarray(shown, np.float64),
        basis=basis,
        order=np.asarray(result.order),
        image_keys=keys,
        image_logit=acts["image_logit"][:].astype(np.float64),
        image_correct=(acts["image_pred"][:] == index) if index >= 0 else np.zeros(len(keys), bool),
        fingerprint=result.fingerprint,
    )


def similarity(Ua: np.ndarray, Ub: np.ndarray) -> np.ndarray:
    """Cosine similarity of the columns of Ua (n, ka) and Ub (n, kb): (ka, kb).

    A U column says how strongly each patch expresses a concept, so two concepts that live on
    the same patches are similar whichever run they come from.
    """
    na = np.linalg.norm(Ua, axis=0)
    nb = np.linalg.norm(Ub, axis=0)
    S = (Ua.T @ Ub) / np.maximum(np.outer(na, nb), 1e-30)
    return np.clip(S, -1.0, 1.0)


def match(S: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> list[tuple[int, int, float]]:
    """The optimal one-to-one pairs (i, j, similarity) with similarity >= threshold.

    The assignment is the Hungarian algorithm's; a pair below `threshold` is no match.
    """
    rows, cols = linear_sum_assignment(-S)
    return [
        (int(i), int(j), float(S[i, j]))
        for i, j in zip(rows, cols, strict=True)
        if S[i, j] >= threshold
    ]


def weights(shown: np.ndarray) -> np.ndarray:
    """Importance as a distribution: positive percentages normalised to sum 1 (uniform if none)."""
    w = np.clip(np.nan_to_num(shown, nan=0.0), 0.0, None)
    total = w.sum()
    return w / total if total > 0 else np.full(len(w), 1.0 / max(len(w), 1))


def patch_importance(U: np.ndarray, shown: np.ndarray) -> np.ndarray:
    """The class's importance spread over its patches (sums to 1).

    Each concept's share p_k (`weights`) is spread over the patches in proportion to its
    coefficients: sum_k U[:, k] / sum(U[:, k]) * p_k.
    """
    columns = U / np.maximum(U.sum(axis=0, keepdims=True), 1e-30)
    d = columns @ weights(shown)
    total = d.sum()
    return d / total if total > 0 else np.full(len(d), 1.0 / max(len(d), 1))


def change_score(before: np.ndarray, after: np.ndarray) -> float:
    """Total variation distance of two patch-importance distributions, in [0, 1].

    0.5 * sum |P_a - P_b|: 0 when the model draws its evidence for the class from the same
    patches with the same weights, 1 when none of it stays.
    """
    return float(np.clip(0.5 * np.abs(before - after).sum(), 0.0, 1.0))


def _aligned(a: ClassSide, b: ClassSide) -> tuple[np.ndarray, np.ndarray]:
    """The patch rows the two runs share, in a's order (all of them when the data is the same)."""
    if a.rows == b.rows:
        return a.U, b.U
    where = {r: i for i, r in enumerate(b.rows)}
    common = [(i, where[r]) for i, r in enumerate(a.rows) if r in where]
    if not common:
        raise NotComparable("its images changed between the two runs: they share no patch")
    ia, ib = (np.array(x) for x in zip(*common, strict=True))
    return a.U[ia], b.U[ib]


def _same_images(a: ClassSide, b: ClassSide) -> tuple[np.ndarray, np.ndarray]:
    where = {k: i for i, k in enumerate(a.image_keys)}
    pairs = [(where[k], j) for j, k in enumerate(b.image_keys) if k in where]
    if not pairs:
        return np.zeros(0, int), np.zeros(0, int)
    ia, ib = (np.array(x) for x in zip(*pairs, strict=True))
    return ia, ib


def compare_class(
    before: ClassSide, after: ClassSide, threshold: float = DEFAULT_THRESHOLD
) -> dict[str, Any]:
    """The change report of one class (module doc); concept ids are each run's own.

    Matched pairs with their similarity and their importance before and after (points); the
    concepts that appeared (no match in the previous run) and that vanished; the class's mean
    logit on its own images and its accuracy (share of its images the model assigns to it),
    before and after; the change score.
    """
    Ua, Ub = _aligned(before, after)
    S = similarity(Ua, Ub)
    pairs = match(S, threshold)
    score = change_score(patch_importance(Ua, before.shown), patch_importance(Ub, after.shown))
    matched_a = {i for i, _, _ in pairs}
    matched_b = {j for _, j, _ in pairs}
    rank_a = {int(c): r + 1 for r, c in enumerate(before.order)}
    rank_b = {int(c): r + 1 for r, c in enumerate(after.order)}
    ia, ib = _same_images(before, after)

    def mean(x: np.ndarray) -> float | None:
        return float(x.mean()) if len(x) else None

    logit_a, logit_b = mean(before.image_logit[ia]), mean(after.image_logit[ib])
    acc_a, acc_b = (
        mean(before.image_correct[ia].astype(float)),
        mean(after.image_correct[ib].astype(float)),
    )
    return {
        "score": round(score, 4),
        "threshold": threshold,
        "matched": [
            {
                "before": i,
                "after": j,
                "similarity": round(s, 4),
                "importance_before": round(float(before.shown[i]), 2),
                "importance_after": round(float(after.shown[j]), 2),
                "delta": round(float(after.shown[j] - before.shown[i]), 2),
                "rank_before": rank_a[i],
                "rank_after": rank_b[j],
            }
            for i, j, s in sorted(pairs, key=lambda t: rank_b[t[1]])
        ],
        "appeared": [
            {
                "concept": j,
                "importance": round(float(after.shown[j]), 2),
                "rank": rank_b[j],
                "best_similarity": round(float(S[:, j].max()), 4) if S.shape[0] else 0.0,
            }
            for j in sorted(set(range(Ub.shape[1])) - matched_b, key=lambda c: rank_b[c])
        ],
        "vanished": [
            {
                "concept": i,
                "importance": round(float(before.shown[i]), 2),
                "rank": rank_a[i],
                "best_similarity": round(float(S[i].max()), 4) if S.shape[1] else 0.0,
            }
            for i in sorted(set(range(Ua.shape[1])) - matched_a, key=lambda c: rank_a[c])
        ],
        "basis_before": before.basis,
        "basis_after": after.basis,
        "logit_before": logit_a,
        "logit_after": logit_b,
        "logit_change": None if logit_a is None or logit_b is None else round(logit_b - logit_a, 4),
        "accuracy_before": acc_a,
        "accuracy_after": acc_b,
        "accuracy_change": None if acc_a is None or acc_b is None else round(acc_b - acc_a, 4),
        "images_compared": int(len(ia)),
    }


def ranked(reports: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per class, most changed first: what `lens diff` prints and the changes page lists."""
    rows = [
        {
            "slug": slug,
            **{k: r.get(k) for k in ("class", "name", "score", "logit_change", "accuracy_change")},
            "appeared": len(r["appeared"]),
            "vanished": len(r["vanished"]),
            "matched": len(r["matched"]),
        }
        for slug, r in reports.items()
    ]
    return sorted(rows, key=lambda r: (-(r["score"] or 0.0), r["slug"]))


def compare(
    store_url: str,
    storage_options: dict[str, Any] | None,
    before: Any,
    after: Any,
    threshold: float = DEFAULT_THRESHOLD,
    slugs: list[str] | None = None,
    write: bool = True,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(summary, {slug: report}) of the runs `before` -> `after` (RunRecords of one store).

    Classes are paired by class dir and label index (slugs may differ between runs); `slugs`
    restricts to some of `after`'s. With `write`, each report and the ranking are stored under
    `after`'s changes/<before>/ and labels carry over; a class whose two fingerprints are
    unchanged since its stored report is not recomputed, but labels added to `before` since then
    still carry. A class that cannot be compared is listed in the summary's `not_comparable` with
    its reason (and stored as such), never in the ranking; the other classes are compared.
    """
    from lens_core.identity import short_hash
    from lens_core.labels import carry_labels

    store = RunStore(store_url, after.run_id, storage_options)
    prev_store = RunStore(store_url, before.run_id, storage_options)
    prev_slugs = {
        (c.get("id"), c.get("index")): c.get("slug") for c in before.meta.get("classes", [])
    }
    wanted = set(slugs) if slugs is not None else None
    reports: dict[str, dict[str, Any]] = {}
    skipped, not_comparable = [], []
    for cls in after.meta.get("classes", []):
        slug = cls.get("slug")
        if wanted is not None and slug not in wanted:
            continue
        prev_slug = prev_slugs.get((cls.get("id"), cls.get("index")))
        side_after = read_side(store, slug)
        side_before = read_side(prev_store, prev_slug) if prev_slug else None
        if side_after is None or side_before is None:
            skipped.append(slug)
            continue
        path = layout.changes_file(before.run_id, slug)
        inputs = short_hash([side_before.fingerprint, side_after.fingerprint, threshold], 16)
        stored = store.read_json(path) if write else None
        cached = isinstance(stored, dict) and stored.get("inputs") == inputs
        report = dict(stored) if cached else _class_report(side_before, side_after, threshold)
        report.update(
            {
                "class": cls.get("id"),
                "name": cls.get("name"),
                "slug": slug,
                "prev_slug": prev_slug,
                "inputs": inputs,
            }
        )
        if report.get("comparable") is False:
            not_comparable.append(
                {"slug": slug, "name": cls.get("name"), "reason": report.get("reason")}
            )
        elif write:  # carried even when the report is cached: the previous run may have new labels
            done = (stored.get("labels") or {}).get("carried", []) if cached else []
            report["labels"] = carry_labels(store, prev_store, slug, prev_slug, report, done)
        if write and report != stored:
            store.write_json(path, report)
        if report.get("comparable") is not False:
            reports[slug] = report
    summary = {
        "run_id": after.run_id,
        "previous": before.run_id,
        "previous_label": before.label,
        "previous_created": before.created,
        "threshold": threshold,
        "ranking": ranked(reports),
        "not_compared": skipped,
        "not_comparable": not_comparable,
    }
    if write:
        store.write_json(layout.changes_summary(before.run_id), summary)
        store.write_json(layout.CHANGES_LATEST, {"previous": before.run_id})
    return summary, reports


def _class_report(before: ClassSide, after: ClassSide, threshold: float) -> dict[str, Any]:
    """One class's report, or {"comparable": False, "reason"} when its runs cannot be compared."""
    try:
        return {"comparable": True, **compare_class(before, after, threshold)}
    except NotComparable as err:
        return {"comparable": False, "reason": str(err)}


def read_changes(store: RunStore) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """(summary, {slug: report}) of the latest comparison recorded for a run, or (None, {})."""
    latest = store.read_json(layout.CHANGES_LATEST)
    if not isinstance(latest, dict) or not latest.get("previous"):
        return None, {}
    prev = str(latest["previous"])
    summary = store.read_json(layout.changes_summary(prev))
    if not isinstance(summary, dict):
        return None, {}
    reports = {
        row["slug"]: store.read_json(layout.changes_file(prev, row["slug"]), {})
        for row in summary["ranking"]
    }
    return summary, reports


def compare_with_previous(info: RunInfo) -> dict[str, Any]:
    """Compare the run with its previous run; {"previous": None} when there is none yet.

    The previous run is the configured one, else the latest finished run of its lineage on
    another checkpoint.
    """
    from lens_core.lineage import find_run, previous_run

    cfg = info.config
    if cfg.changes.previous_run:
        previous = find_run(cfg.store, cfg.changes.previous_run, cfg.storage_options)
    else:
        previous = previous_run(cfg.store, info.run_id, cfg.storage_options)
    if previous is None:
        return {"previous": None, "ranking": []}
    me = find_run(cfg.store, info.run_id, cfg.storage_options)
    summary, _ = compare(
        cfg.store, cfg.storage_options, previous, me, cfg.changes.threshold, info.slugs
    )
    return summary
