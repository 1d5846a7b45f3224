"""`lens diff`, `lens label` and `lens publish`: what changed between checkpoints, concept labels,
and re-publishing a run's pages (after labelling) without recomputing anything."""

from __future__ import annotations

import argparse
import json
from typing import Any

from flows.cli_common import cell, class_list, find_record, print_table
from lens_core.config import ConfigError, load_config
from lens_core.store import RunStore


def _store(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    cfg = load_config(args.config, store=args.store)
    return cfg.store, cfg.storage_options


def _pair(args: argparse.Namespace, store_url: str, so: dict[str, Any]) -> tuple[Any, Any]:
    """(before, after) RunRecords: both named, or the named/latest run and its previous run."""
    from lens_core.lineage import find_run, previous_run

    try:
        if len(args.runs) == 2:
            return find_run(store_url, args.runs[0], so), find_run(store_url, args.runs[1], so)
        after = find_run(store_url, args.runs[0], so) if args.runs else find_record(store_url, so)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    before = previous_run(store_url, after.run_id, so)
    if before is None:
        raise ConfigError(
            f"run {after.run_id} has no previous run to compare with (a finished run of the "
            "same data and method on another checkpoint); name both runs"
        )
    return before, after


def cmd_diff(args: argparse.Namespace) -> int:
    """Per-class changes between two runs, most changed first (a table, or JSON with --json)."""
    from lens_core.changes import compare

    if len(args.runs) > 2:
        raise ConfigError("lens diff takes at most two runs: RUN_A (before) RUN_B (after)")
    store_url, so = _store(args)
    before, after = _pair(args, store_url, so)
    summary, reports = compare(store_url, so, before, after, args.threshold, write=False)
    rows = [
        {
            **row,
            "class": row["class"],
            "previous_slug": reports[row["slug"]]["prev_slug"],
            "matched_pairs": reports[row["slug"]]["matched"],
            "appeared_concepts": reports[row["slug"]]["appeared"],
            "vanished_concepts": reports[row["slug"]]["vanished"],
        }
        for row in summary["ranking"]
    ]
    if args.json:
        print(json.dumps(rows, indent=1, allow_nan=False))
        return 0
    print_table(
        f"changes {before.label} ({before.run_id}) -> {after.label} ({after.run_id})",
        (
            "class",
            "slug",
            "score",
            "matched",
            "appeared",
            "vanished",
            "logit_change",
            "accuracy_change",
        ),
        rows,
    )
    if summary["not_compared"]:
        print(f"not compared (missing in one run): {', '.join(summary['not_compared'][:20])}")
    for row in summary.get("not_comparable", [])[:20]:
        print(cell(f"not comparable: {row['slug']} ({row['reason']})").plain)
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    """Label one concept, or import many from a JSON/TOML file; then `lens publish` shows them."""
    from lens_core.data import ClassInfo, class_keys
    from lens_core.labels import import_labels, parse_label_file, set_label

    store_url, so = _store(args)
    record = find_record(store_url, so, args.run)
    store = RunStore(store_url, record.run_id, so)
    classes = [
        ClassInfo(c["index"], c["id"], c["name"], c["slug"], tuple(c.get("synonyms", ())))
        for c in record.meta.get("classes", [])
    ]
    if args.import_file:
        if args.target:
            raise ConfigError("give either CLASS CONCEPT TEXT or --import FILE, not both")
        n = import_labels(store, classes, parse_label_file(args.import_file))
        print(f"{n} labels set in run {record.run_id}; `lens publish` shows them on the site")
        return 0
    if len(args.target) != 3:
        raise ConfigError(
            'usage: lens label CLASS CONCEPT "text"  (or lens label --import labels.json)'
        )
    key, concept, text = args.target
    by_key = {k: c.slug for k, c in class_keys(classes).items()}
    if key not in by_key:
        raise ConfigError(f"unknown class {key!r} in run {record.run_id}")
    if not concept.isdigit():
        raise ConfigError(f"concept must be a concept number, not {concept!r}")
    set_label(store, by_key[key], int(concept), text)
    print(
        f"{by_key[key]} concept {concept}: {text!r} (run {record.run_id}); "
        "`lens publish` shows it on the site"
    )
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    """Re-render a run's site from its store (labels, changes): computes nothing."""
    from lens_core.publish import publish, site_url
    from lens_core.run import prepare_run

    cfg = load_config(
        args.config, classes=class_list(args.classes), store=args.store, publish=args.publish
    )
    info = prepare_run(cfg)
    summary = publish(info)
    print(
        f"published {summary['classes']} classes ({summary['failed']} failed) "
        f"at {site_url(info)}/index.html"
    )
    return 0


def add_commands(sub: Any) -> None:
    """Register diff, label and publish on the `lens` parser's subcommands."""
    diff = sub.add_parser(
        "diff", help="what changed between two runs (checkpoints), most changed class first"
    )
    diff.add_argument(
        "runs",
        nargs="*",
        metavar="RUN",
        help="RUN_A RUN_B (default: the latest run and its previous)",
    )
    diff.add_argument("--store", help="run store URL")
    diff.add_argument("--config", help="AtlasConfig TOML (store and storage options)")
    diff.add_argument(
        "--threshold", type=float, default=0.5, help="similarity from which concepts match"
    )
    diff.add_argument(
        "--json", action="store_true", help="print JSON (a list of per-class objects)"
    )
    diff.set_defaults(fn=cmd_diff)
    label = sub.add_parser("label", help='name a concept: lens label CLASS CONCEPT "text"')
    label.add_argument("target", nargs="*", metavar="ARG", help="CLASS CONCEPT TEXT")
    label.add_argument(
        "--import", dest="import_file", help="JSON or TOML file {class: {concept: label}}"
    )
    label.add_argument("--store", help="run store URL")
    label.add_argument("--config", help="AtlasConfig TOML (store and storage options)")
    label.add_argument("--run", help="run id (default: the latest run in the store)")
    label.set_defaults(fn=cmd_label)
    pub = sub.add_parser("publish", help="re-render a run's site from its store (computes nothing)")
    pub.add_argument("--config", help="AtlasConfig TOML file (the run's)")
    pub.add_argument("--classes", help="comma-separated class ids/names/slugs")
    pub.add_argument("--store", help="run store URL")
    pub.add_argument("--publish", help="site URL")
    pub.set_defaults(fn=cmd_publish)
