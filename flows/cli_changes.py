"""`lens diff`, `lens label` and `lens publish`: what changed between checkpoints, concept labels,
and re-publishing a run's pages (after labelling) without recomputing anything."""

from __future__ import annotations

import argparse
import json
from typing import Any

from lens_core.config import ConfigError, load_config
from lens_core.store import RunStore, normalize_url


def _store(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    cfg = load_config(args.config, store=args.store)
    return cfg.store, cfg.storage_options


def _latest(store_url: str, storage_options: dict[str, Any]) -> Any:
    from lens_core.lineage import list_runs

    runs = list_runs(store_url, storage_options)
    if not runs:
        raise ConfigError(f"no run found under {normalize_url(store_url)}/runs")
    return runs[-1]


def _pair(args: argparse.Namespace, store_url: str, so: dict[str, Any]) -> tuple[Any, Any]:
    """(before, after) RunRecords: both named, or the named/latest run and its previous run."""
    from lens_core.lineage import find_run, previous_run

    try:
        if len(args.runs) == 2:
            return find_run(store_url, args.runs[0], so), find_run(store_url, args.runs[1], so)
        after = find_run(store_url, args.runs[0], so) if args.runs else _latest(store_url, so)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    before = previous_run(store_url, after.run_id, so)
    if before is None:
        raise ConfigError(f"run {after.run_id} has no previous run to compare with (a finished run of the "
                          "same data and method on another checkpoint); name both runs")
    return before, after


def cmd_diff(args: argparse.Namespace) -> int:
    """Per-class changes between two runs, most changed first (a table, or JSON with --json)."""
    from rich.console import Console
    from rich.table import Table

    from flows.cli import _cell
    from lens_core.changes import compare

    if len(args.runs) > 2:
        raise ConfigError("lens diff takes at most two runs: RUN_A (before) RUN_B (after)")
    store_url, so = _store(args)
    before, after = _pair(args, store_url, so)
    summary, reports = compare(store_url, so, before, after, args.threshold, write=False)
    rows = [{**row, "class": row["class"], "previous_slug": reports[row["slug"]]["prev_slug"],
             "matched_pairs": reports[row["slug"]]["matched"], "appeared_concepts": reports[row["slug"]]["appeared"],
             "vanished_concepts": reports[row["slug"]]["vanished"]} for row in summary["ranking"]]
    if args.json:
        print(json.dumps(rows, indent=1, allow_nan=False))
        return 0
    table = Table(title=_cell(f"changes {before.label} ({before.run_id}) -> {after.label} ({after.run_id})"))
    columns = ("class", "slug", "score", "matched", "appeared", "vanished", "logit_change", "accuracy_change")
    for col in columns:
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*(_cell("-" if r[c] is None else r[c]) for c in columns))
    Console(width=max(120, Console().width)).print(table)
    if summary["not_compared"]:
        print(f"not compared (missing in one run): {', '.join(summary['not_compared'][:20])}")
    for row in summary.get("not_comparable", [])[:20]:
        print(_cell(f"not comparable: {row['slug']} ({row['reason']})"))
    return 0


def _run_record(args: argparse.Namespace, store_url: str, so: dict[str, Any]) -> Any:
    from lens_core.lineage import find_run

    try:
        return find_run(store_url, args.run, so) if args.run else _latest(store_url, so)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def cmd_label(args: argparse.Namespace) -> int:
    """Label one concept, or import many from a JSON/TOML file; then `lens publish` shows them."""
    from lens_core.data import ClassInfo
    from lens_core.labels import import_labels, parse_label_file, set_label

    store_url, so = _store(args)
    record = _run_record(args, store_url, so)
    store = RunStore(store_url, record.run_id, so)
    classes = [ClassInfo(c["index"], c["id"], c["name"], c["slug"], tuple(c.get("synonyms", ())))
               for c in record.meta.get("classes", [])]
    if args.import_file:
        if args.target:
            raise ConfigError("give either CLASS CONCEPT TEXT or --import FILE, not both")
        n = import_labels(store, classes, parse_label_file(args.import_file))
        print(f"{n} labels set in run {record.run_id}; `lens publish` shows them on the site")
        return 0
    if len(args.target) != 3:
        raise ConfigError('usage: lens label CLASS CONCEPT "text"  (or lens label --import labels.json)')
    key, concept, text = args.target
    by_key = {}
    for c in classes:
        for k in (c.id, c.name, c.slug, str(c.index)):
            by_key.setdefault(k, c.slug)
    if key not in by_key:
        raise ConfigError(f"unknown class {key!r} in run {record.run_id}")
    if not concept.isdigit():
        raise ConfigError(f"concept must be a concept number, not {concept!r}")
    set_label(store, by_key[key], int(concept), text)
    print(f"{by_key[key]} concept {concept}: {text!r} (run {record.run_id}); `lens publish` shows it on the site")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    """Re-render a run's site from its store (labels, changes): computes nothing."""
    from lens_core.publish import publish, site_url
    from lens_core.run import prepare_run

    classes = [c for c in (args.classes or "").split(",") if c] or None
    cfg = load_config(args.config, classes=classes, store=args.store, publish=args.publish)
    info = prepare_run(cfg)
    summary = publish(info)
    print(f"published {summary['classes']} classes ({summary['failed']} failed) at {site_url(info)}/index.html")
    return 0


def add_commands(sub: Any) -> None:
    """Register diff, label and publish on the `lens` parser's subcommands."""
    diff = sub.add_parser("diff", help="what changed between two runs (checkpoints), most changed class first")
    diff.add_argument("runs", nargs="*", metavar="RUN", help="RUN_A RUN_B (default: the latest run and its previous)")
    diff.add_argument("--store", help="run store URL")
    diff.add_argument("--config", help="AtlasConfig TOML (store and storage options)")
    diff.add_argument("--threshold", type=float, default=0.5, help="similarity from which concepts match")
    diff.add_argument("--json", action="store_true", help="print JSON (a list of per-class objects)")
    diff.set_defaults(fn=cmd_diff)
    label = sub.add_parser("label", help='name a concept: lens label CLASS CONCEPT "text"')
    label.add_argument("target", nargs="*", metavar="ARG", help="CLASS CONCEPT TEXT")
    label.add_argument("--import", dest="import_file", help="JSON or TOML file {class: {concept: label}}")
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
