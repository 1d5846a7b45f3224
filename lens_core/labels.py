"""Concept labels: names people give concepts ("Stem", "Leaf Blade + Midrib"), kept in the store.

Labels live beside the run (`labels.json` in the run's folder), never in code: `lens label` sets
one, `import_labels` many (JSON or TOML). Publishing shows a concept's label in place of
"concept 3" and the search finds classes by label. On a new checkpoint's run, a label carries
over to the matched concept when their similarity reaches the threshold, marked as carried with
its source; the label of a concept that vanished is reported as lost.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

from lens_core import layout
from lens_core.store import RunStore

MAX_LABEL = 120
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class LabelError(ValueError):
    """A label or a label file is malformed; the message says which and why."""


def clean_label(text: Any) -> str:
    """A label as stored: a string, control characters refused, spaces collapsed, at most 120 characters.
    (HTML in a label is kept as text: every page escapes it.)"""
    if not isinstance(text, str):
        raise LabelError(f"a label must be text, got {type(text).__name__}")
    if _CONTROL.search(text):
        raise LabelError(f"label {text!r} contains control characters")
    text = " ".join(text.split())
    if len(text) > MAX_LABEL:
        raise LabelError(f"label of {len(text)} characters is longer than {MAX_LABEL}")
    return text


def read_labels(store: RunStore) -> dict[str, dict[str, dict[str, Any]]]:
    """{slug: {concept id (str): {"text", "source", ...}}} of a run ({} when none)."""
    labels = store.read_json(layout.LABELS, {})
    return labels if isinstance(labels, dict) else {}


def _write(store: RunStore, labels: dict[str, dict[str, dict[str, Any]]]) -> None:
    store.write_json(layout.LABELS, {s: c for s, c in labels.items() if c})


def _concept_count(store: RunStore, slug: str) -> int:
    group = store.get_group(layout.concepts(slug))
    if group is None or "W" not in set(group.array_keys()):
        raise LabelError(f"class {slug!r} has no concepts in run {store.run_id}")
    return int(group["W"].shape[0])


def set_label(store: RunStore, slug: str, concept: int, text: str) -> dict[str, Any] | None:
    """Label concept `concept` of class `slug` (an empty text removes the label); returns the record."""
    k = _concept_count(store, slug)
    if not 0 <= int(concept) < k:
        raise LabelError(f"class {slug!r} has concepts 0..{k - 1}, not {concept}")
    labels = read_labels(store)
    text = clean_label(text)
    entry = labels.setdefault(slug, {})
    if text:
        entry[str(int(concept))] = {"text": text, "source": "user"}
    else:
        entry.pop(str(int(concept)), None)
    _write(store, labels)
    return entry.get(str(int(concept)))


def parse_label_file(path: str | Path) -> dict[str, dict[str, str]]:
    """{class (id, name or slug): {concept id: label}} from a JSON or TOML file."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text()) if p.suffix.lower() == ".toml" else json.loads(p.read_text())
    except (OSError, ValueError) as err:
        raise LabelError(f"cannot read label file {p}: {err}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise LabelError(f"label file {p} must map classes to {{concept: label}} tables")
    return {str(k): {str(c): t for c, t in v.items()} for k, v in raw.items()}


def import_labels(store: RunStore, classes: list[Any], mapping: dict[str, dict[str, str]]) -> int:
    """Set many labels at once; classes are named by id, name, slug or label index. Returns the count."""
    keys: dict[str, str] = {}
    for c in classes:
        for key in (c.id, c.name, c.slug, str(c.index)):
            keys.setdefault(key, c.slug)
    unknown = [k for k in mapping if k not in keys]
    if unknown:
        raise LabelError(f"unknown classes in the label file: {', '.join(map(repr, unknown[:10]))}")
    n = 0
    for key, concepts in mapping.items():
        for concept, text in concepts.items():
            if not str(concept).isdigit():
                raise LabelError(f"class {key!r}: concept {concept!r} is not a concept number")
            set_label(store, keys[key], int(concept), text)
            n += 1
    return n


def carry_labels(store: RunStore, previous: RunStore, slug: str, prev_slug: str, report: dict[str, Any]) -> dict[str, Any]:
    """Carry the previous run's labels of `prev_slug` onto the matched concepts of `slug`.

    A matched pair at or above the report's threshold carries; a user label on the new concept
    wins. Returns {"carried": [...], "lost": [...]} (lost: labels of concepts that vanished).
    """
    old = read_labels(previous).get(prev_slug, {})
    if not old:
        return {"carried": [], "lost": []}
    labels = read_labels(store)
    mine = labels.setdefault(slug, {})
    carried, lost = [], []
    for pair in report["matched"]:
        label = old.get(str(pair["before"]))
        if not label or pair["similarity"] < report["threshold"]:
            continue
        current = mine.get(str(pair["after"]))
        if current and current.get("source") == "user":
            continue
        mine[str(pair["after"])] = {"text": label["text"], "source": "carried", "from_run": previous.run_id,
                                    "from_concept": pair["before"], "similarity": pair["similarity"]}
        carried.append({"concept": pair["after"], "from_concept": pair["before"], "text": label["text"]})
    for gone in report["vanished"]:
        label = old.get(str(gone["concept"]))
        if label:
            lost.append({"concept": gone["concept"], "text": label["text"]})
    _write(store, labels)
    return {"carried": carried, "lost": lost}
