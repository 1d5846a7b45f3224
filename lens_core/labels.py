"""Concept labels: names people give concepts ("Stem", "Leaf Blade + Midrib"), kept in the store.

Labels live beside the run (`labels.json` in the run's folder), never in code: `lens label` sets
one, `import_labels` many (JSON or TOML). Publishing shows a concept's label in place of
"concept 3" and the search finds classes by label. On a new checkpoint's run, a label carries
over to the matched concept when their similarity reaches the threshold, marked as carried with
its source; the label of a concept that vanished is reported as lost.

Every change to `labels.json` is one `RunStore.update_json`: a read-modify-write that loses no
concurrent writer's labels (`lens label` while the changes step carries labels, or two `lens label`
at once), by the store's own means (S3 conditional puts, a file lock on disk; see there).
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lens_core import layout
from lens_core.data import class_keys
from lens_core.naming import plain_text
from lens_core.store import RunStore

MAX_LABEL = 120
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class LabelError(ValueError):
    """A label or a label file is malformed; the message says which and why."""


Labels = dict[str, dict[str, dict[str, Any]]]


def clean_label(text: Any) -> str:
    """A label as stored: a string, control characters refused, format characters (Unicode Cf:
    bidi overrides, zero-width) dropped, spaces collapsed, at most 120 characters.
    (HTML in a label is kept as text: every page escapes it.)"""
    if not isinstance(text, str):
        raise LabelError(f"a label must be text, got {type(text).__name__}")
    if _CONTROL.search(text):
        raise LabelError(f"label {text!r} contains control characters")
    text = " ".join(plain_text(text).split())
    if len(text) > MAX_LABEL:
        raise LabelError(f"label of {len(text)} characters is longer than {MAX_LABEL}")
    return text


def read_labels(store: RunStore) -> Labels:
    """{slug: {concept id (str): {"text", "source", ...}}} of a run ({} when none)."""
    labels = store.read_json(layout.LABELS, {})
    return labels if isinstance(labels, dict) else {}


def _update(store: RunStore, change: Any) -> Labels:
    """Apply `change(labels)` (in place) to the stored labels, atomically (module doc)."""

    def apply(labels: Any) -> Labels:
        labels = labels if isinstance(labels, dict) else {}
        change(labels)
        return {s: c for s, c in labels.items() if c}

    return store.update_json(layout.LABELS, apply, {})


def _concept_count(store: RunStore, slug: str) -> int:
    group = store.get_group(layout.concepts(slug))
    if group is None or "W" not in set(group.array_keys()):
        raise LabelError(f"class {slug!r} has no concepts in run {store.run_id}")
    return int(group["W"].shape[0])


def _concept_id(slug: str, concept: Any, k: int) -> str:
    """A concept number as stored (its decimal string), checked against the class's k concepts."""
    text = str(concept).strip()
    if not text.isdigit():
        raise LabelError(f"class {slug!r}: concept {concept!r} is not a concept number")
    if not 0 <= int(text) < k:
        raise LabelError(f"class {slug!r} has concepts 0..{k - 1}, not {concept}")
    return str(int(text))


def _put(entry: dict[str, dict[str, Any]], concept: str, text: str) -> None:
    if text:
        entry[concept] = {"text": text, "source": "user"}
    else:
        entry.pop(concept, None)


def set_label(store: RunStore, slug: str, concept: int, text: str) -> dict[str, Any] | None:
    """Label concept `concept` of class `slug` (an empty text removes the label); returns the
    record."""
    cid = _concept_id(slug, concept, _concept_count(store, slug))
    text = clean_label(text)
    labels = _update(store, lambda labels: _put(labels.setdefault(slug, {}), cid, text))
    return labels.get(slug, {}).get(cid)


def parse_label_file(path: str | Path) -> dict[str, dict[str, str]]:
    """{class (id, name or slug): {concept id: label}} from a JSON or TOML file."""
    p = Path(path)
    try:
        raw = (
            tomllib.loads(p.read_text())
            if p.suffix.lower() == ".toml"
            else json.loads(p.read_text())
        )
    except (OSError, ValueError) as err:
        raise LabelError(f"cannot read label file {p}: {err}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise LabelError(f"label file {p} must map classes to {{concept: label}} tables")
    return {str(k): {str(c): t for c, t in v.items()} for k, v in raw.items()}


def import_labels(
    store: RunStore, classes: Iterable[Any], mapping: dict[str, dict[str, str]]
) -> int:
    """Set many labels at once, all or nothing; classes are named by id, name, slug or label index.

    Every class, concept number and text is checked before anything is written; then the labels
    are written in one update of labels.json (one read and one write, whatever their number).
    Returns the count.
    """
    keys = {key: c.slug for key, c in class_keys(classes).items()}
    unknown = [k for k in mapping if k not in keys]
    if unknown:
        raise LabelError(f"unknown classes in the label file: {', '.join(map(repr, unknown[:10]))}")
    counts: dict[str, int] = {}
    planned: dict[str, dict[str, str]] = {}
    errors: list[str] = []
    for key, concepts in mapping.items():
        slug = keys[key]
        for concept, text in concepts.items():
            try:
                if slug not in counts:
                    counts[slug] = _concept_count(store, slug)
                planned.setdefault(slug, {})[_concept_id(slug, concept, counts[slug])] = (
                    clean_label(text)
                )
            except LabelError as err:
                errors.append(str(err))
                if len(errors) >= 10:
                    break
    if errors:
        raise LabelError("nothing imported: " + "; ".join(errors[:10]))

    def apply(labels: Labels) -> None:
        for slug, concepts in planned.items():
            entry = labels.setdefault(slug, {})
            for cid, text in concepts.items():
                _put(entry, cid, text)

    _update(store, apply)
    return sum(len(c) for c in planned.values())


def carry_labels(
    store: RunStore,
    previous: RunStore,
    slug: str,
    prev_slug: str,
    report: dict[str, Any],
    done: Iterable[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Carry the previous run's labels of `prev_slug` onto the matched concepts of `slug`.

    A matched pair at or above the report's threshold carries; a user label on the new concept
    wins. `done` lists what an earlier carry of the same comparison carried ({"concept",
    "from_concept", "text"}): those are not carried again (a carried label the user removed stays
    removed), while a label added to or changed in the previous run since then carries. Returns
    {"carried": [...], "lost": [...]} (carried: this call's and `done`'s; lost: labels of
    concepts that vanished).
    """
    old = read_labels(previous).get(prev_slug, {})
    before = {(int(d["concept"]), int(d["from_concept"]), d["text"]): d for d in done}
    lost = [
        {"concept": gone["concept"], "text": old[str(gone["concept"])]["text"]}
        for gone in report["vanished"]
        if old.get(str(gone["concept"]))
    ]
    wanted = []
    for pair in report["matched"]:
        label = old.get(str(pair["before"]))
        if not label or pair["similarity"] < report["threshold"]:
            continue
        if (int(pair["after"]), int(pair["before"]), label["text"]) in before:
            continue
        wanted.append((pair, label))
    carried: dict[int, dict[str, Any]] = {int(d["concept"]): dict(d) for d in before.values()}
    if not wanted:
        return {"carried": sorted(carried.values(), key=lambda d: d["concept"]), "lost": lost}
    fresh: list[dict[str, Any]] = []

    def apply(labels: Labels) -> None:
        fresh.clear()  # a retried update starts again from the labels stored now
        mine = labels.setdefault(slug, {})
        for pair, label in wanted:
            current = mine.get(str(pair["after"]))
            if current and current.get("source") == "user":
                continue
            mine[str(pair["after"])] = {
                "text": label["text"],
                "source": "carried",
                "from_run": previous.run_id,
                "from_concept": pair["before"],
                "similarity": pair["similarity"],
            }
            fresh.append(
                {"concept": pair["after"], "from_concept": pair["before"], "text": label["text"]}
            )

    _update(store, apply)
    carried.update({int(d["concept"]): d for d in fresh})
    return {"carried": sorted(carried.values(), key=lambda d: d["concept"]), "lost": lost}
