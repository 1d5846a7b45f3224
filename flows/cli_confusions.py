"""`lens confusions`: the pairs of classes a run's model confuses, and the concepts that carried
it."""

from __future__ import annotations

import argparse
import json
from typing import Any

from flows.cli_common import find_record
from lens_core.config import ConfigError, load_config
from lens_core.naming import plain_text


def _rows(
    report: dict[str, Any], labels: dict[str, Any], wanted: str | None
) -> list[dict[str, Any]]:
    """The pairs as `lens confusions --json` prints them, most images first; one class's with
    `wanted`; concept labels as they are now."""
    from lens_core.confusions import concept_label

    rows = []
    for pair in report.get("pairs", []):
        if wanted and wanted not in (pair["true"], pair["predicted"]):
            continue
        rows.append(
            {
                "true": pair["true"],
                "predicted": pair["predicted"],
                "predicted_index": pair["predicted_index"],
                "true_name": pair["true_name"],
                "predicted_name": pair["predicted_name"],
                "images": pair["images"],
                "basis": pair["basis"],
                "concepts": [
                    {
                        "concept": c["concept"],
                        "share": c["share"],
                        "label": concept_label(labels, pair["predicted"], c["concept"]),
                    }
                    for c in pair["concepts"]
                ],
                "residual": pair["residual"],
                "bias": pair["bias"],
                "note": pair["note"],
                "examples": [
                    {"image": e["image"], "overlay": e.get("overlay"), "plain": e.get("plain")}
                    for e in pair["examples"]
                ],
            }
        )
    return sorted(rows, key=lambda r: -r["images"])


def _line(row: dict[str, Any]) -> str:
    top = ", ".join(
        f"{c['label'] or 'concept ' + str(c['concept'])} {c['share']:.1f}%"
        for c in row["concepts"][:3]
    ) or (row["note"] or "")
    return plain_text(f"{row['images']:>5}  {row['true_name']} -> {row['predicted_name']}  {top}")


def cmd_confusions(args: argparse.Namespace) -> int:
    """Print the confusions of the latest (or a named) run: a line per pair, or JSON."""
    from lens_core.confusions import read_confusions
    from lens_core.data import ClassInfo, class_keys
    from lens_core.labels import read_labels
    from lens_core.store import RunStore

    cfg = load_config(args.config, store=args.store)
    record = find_record(cfg.store, cfg.storage_options, args.run)
    store = RunStore(cfg.store, record.run_id, cfg.storage_options)
    report = read_confusions(store)
    if report is None:
        raise ConfigError(
            f"run {record.run_id} has no confusions yet (they are computed after "
            "every class has finished)"
        )
    wanted = None
    if args.cls:
        classes = [
            ClassInfo(c["index"], c["id"], c["name"], c["slug"])
            for c in record.meta.get("classes", [])
        ]
        match = class_keys(classes).get(args.cls)
        if match is None:
            raise ConfigError(f"no class {args.cls!r} in run {record.run_id}")
        wanted = match.slug
    rows = _rows(report, read_labels(store), wanted)
    if args.json:
        print(json.dumps(rows, indent=1, allow_nan=False, ensure_ascii=False))
        return 0
    print(
        f"run {record.run_id}: {report.get('mistaken', 0)} of {report.get('n_images', 0)} sampled "
        "images assigned to another class"
    )
    for row in rows:
        print(_line(row))
    return 0


def add_confusions_command(sub: Any) -> None:
    """Register `lens confusions` on the CLI's subparsers."""
    p = sub.add_parser("confusions", help="which classes the model confuses, explained by concepts")
    p.add_argument("--store", help="run store URL")
    p.add_argument("--config", help="AtlasConfig TOML (store and storage options)")
    p.add_argument("--run", help="run id (default: the latest run in the store)")
    p.add_argument("--class", dest="cls", help="only the pairs of this class (slug, id or name)")
    p.add_argument(
        "--json", action="store_true", help="print JSON: a list of pairs, most images first"
    )
    p.set_defaults(fn=cmd_confusions)
