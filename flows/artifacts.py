"""What a build-atlas run shows in Prefect's UI: its progress bars, the per-class table, the
most changed classes, the most frequent mistakes and how to open the site. Prefect renders string
table cells as Markdown, so every cell goes through `md_cell`."""

from __future__ import annotations

import re
import shlex
import time
from typing import Any

from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from flows.runner import LensDaskTaskRunner
from lens_core import layout
from lens_core.confusions import concept_label, read_confusions
from lens_core.labels import read_labels
from lens_core.run import RunInfo
from lens_core.store import normalize_url
from lens_core.summary import class_summary

PROGRESS_EVERY_S = 2.0  # the progress artifact is updated at most this often (one API call each)
MISTAKE_ROWS = 20  # rows of the mistakes table artifact


class Progress:
    """Two progress artifacts: classes finished, and concepts rendered (renders go on after the
    last class). Until the Dask workers have started, the classes' one says so; once the first
    page is published, it gives the link to the site so far."""

    def __init__(self, info: RunInfo, runner: LensDaskTaskRunner | None):
        self.n = len(info.slugs)
        self.t0 = time.perf_counter()
        self.last = 0.0
        waiting = runner is not None and not runner.ready()
        self.classes_id = create_progress_artifact(
            0.0,
            key=f"lens-progress-{info.run_id}",
            description=(
                f"starting the Dask workers; then {self.n} classes"
                if waiting
                else f"0/{self.n} classes finished"
            ),
        )
        self.renders_id = create_progress_artifact(
            0.0,
            key=f"lens-renders-{info.run_id}",
            description="concept renders (MACO): they start as classes finish",
        )

    def workers_ready(self) -> None:
        update_progress_artifact(
            self.classes_id,
            0.0,
            description=(
                f"0/{self.n} classes finished "
                f"(workers started in {time.perf_counter() - self.t0:.0f} s)"
            ),
        )

    def update(
        self,
        classes_done: int,
        classes_failed: int,
        rendered: int,
        queued: int,
        force: bool = False,
        site: tuple[int, str] | None = None,
    ) -> None:
        """Both bars, at most every PROGRESS_EVERY_S unless `force`; `site`: (class pages, link)
        of the site so far, once its first page is out."""
        now = time.perf_counter()
        if not force and now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        failed = f", {classes_failed} failed" if classes_failed else ""
        left = " (renders go on)" if classes_done == self.n and rendered < queued else ""
        link = f"; site so far ({site[0]} class pages): {site[1]}" if site is not None else ""
        update_progress_artifact(
            self.classes_id,
            100.0 * classes_done / max(1, self.n),
            description=(f"{classes_done}/{self.n} classes finished{failed}{left}{link}"),
        )
        total = queued if classes_done == self.n else max(queued, 1)
        more = "" if classes_done == self.n else " so far (more as classes finish)"
        update_progress_artifact(
            self.renders_id,
            100.0 * rendered / max(1, total)
            if queued
            else (100.0 if classes_done == self.n else 0.0),
            description=f"{rendered}/{queued} concepts rendered{more}",
        )


def classes_artifact(info: RunInfo, rows: list[dict[str, Any]], description: str) -> None:
    """The per-class table artifact (`class_rows`), its cells escaped for the UI."""
    create_table_artifact(
        table_artifact_rows(rows), key=f"lens-classes-{info.run_id}", description=description
    )


def changes_artifact(info: RunInfo, changed: dict[str, Any]) -> None:
    """A table artifact of the most changed classes since the previous checkpoint (when there is
    one)."""
    if not changed.get("previous"):
        return
    top = info.config.changes.most_changed or 10
    rows = [
        {
            "class": r["slug"],
            "score": r["score"],
            "appeared": r["appeared"],
            "vanished": r["vanished"],
            "matched": r["matched"],
            "logit change": r["logit_change"],
            "accuracy change": r["accuracy_change"],
        }
        for r in changed["ranking"][:top]
    ]
    create_table_artifact(
        rows,
        key=f"lens-changes-{info.run_id}",
        description=(
            f"most changed classes since {changed['previous_label']} (run {changed['previous']})"
        ),
    )


def mistake_rows(
    report: dict[str, Any] | None, labels: dict[str, Any] | None = None, limit: int = MISTAKE_ROWS
) -> list[dict[str, Any]]:
    """The mistakes table: the most frequent (true, predicted) pairs, each with the predicted
    class's concept that carried most of the mistaken logit (its label when it has one) and its
    share. Cells are plain values; `table_artifact_rows` escapes them."""
    rows = []
    for pair in (report or {}).get("pairs", [])[:limit]:
        top = (pair.get("concepts") or [None])[0]
        concept = ""
        if top is not None:
            label = concept_label(labels or {}, pair.get("predicted") or "", top["concept"])
            concept = f"concept {top['concept']}" + (f" ({label})" if label else "")
        rows.append(
            {
                "true class": pair.get("true_name") or pair["true"],
                "predicted class": pair.get("predicted_name") or pair.get("predicted") or "",
                "images": pair["images"],
                "top concept of the predicted class": concept,
                "share of the mistaken logit (%)": top["share"] if top is not None else None,
                "basis": pair.get("basis") or "",
                "note": pair.get("note") or "",
            }
        )
    return rows


def mistakes_artifact(info: RunInfo) -> None:
    """A table artifact of the most frequent mistakes (true -> predicted class), if any."""
    store = info.store()
    report = read_confusions(store)
    rows = mistake_rows(report, read_labels(store))
    if not rows:
        return
    n = len(report.get("pairs", []))
    create_table_artifact(
        table_artifact_rows(rows),
        key=f"lens-mistakes-{info.run_id}",
        description=(
            f"LENS run {info.run_id}: {report.get('mistaken', 0)} mistaken images in "
            f"{n} pairs of classes; the top {len(rows)} by count "
            "(`lens confusions` for all)"
        ),
    )


# a stage with no state in this run (never "-": Markdown makes it a bullet)
STAGE_NOT_RUN = "not run"
_MD_INLINE = re.compile(r"([\\`*_\[\]<>|~&])")  # emphasis, code, links, HTML, entities, tables
_MD_BLOCK = re.compile(r"^(\d{1,9}(?=[.)])|(?=[-+#>=]))")  # what starts a list, heading or quote


def md_cell(value: Any, limit: int = 300) -> Any:
    """A table-artifact cell: Prefect's UI renders string cells as Markdown, so text is one line
    with what Markdown would act on escaped (a "-" or "1." would start a list, `<x>` vanish as
    HTML, `_x_` turn italic); a class slug like `02-green-triangle` stays as it is.
    Numbers stay numbers; None is an empty cell."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        value = str(value)
    if not isinstance(value, str):
        return value
    text = " ".join(value.split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    text = _MD_INLINE.sub(r"\\\1", text)
    match = _MD_BLOCK.match(text)
    if match:  # "- x", "1. x", "# x", "> x": escape the marker itself
        at = match.end()
        text = text[:at] + "\\" + text[at:]
    return text


STATE_MARK = {"failed": "FAILED", "render failed": "renders FAILED"}  # words: no emoji font needed


def class_rows(info: RunInfo, outcomes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-class table: what matters first (class, state, the stage that failed, the note, the
    error: the UI's table does not wrap, so the short cells come before the long one), then the top
    concept, time and one column per stage holding that stage's state only. Failed classes come
    first. Cells are plain values; `table_artifact_rows` escapes and bounds them for the UI."""
    rows = []
    for slug in info.slugs:
        out = outcomes[slug]
        # chains read their summary on the worker; a class without one is read here
        summary = out.get("summary") or class_summary(info, slug)
        stages = {**summary["stages"], **({"render": out["render"]} if out.get("render") else {})}
        failed_at = next((s for s in layout.STATUS_STAGES if stages.get(s) == "failed"), "")
        errors = summary.get("errors") or {}
        state = "completed" if out["ok"] else "failed"
        if out["ok"] and stages.get("render") == "failed":
            state = "render failed"
        rows.append(
            {
                "class": slug,
                "state": state,
                "failed at": failed_at,
                "note": summary.get("note") or "",
                "error": out.get("error") or errors.get(failed_at) or "",
                "top concept": summary["top_concept"],
                "top concept score": summary["top_importance"],
                "score basis": summary.get("importance_basis") or "",
                "seconds": round(summary["seconds"], 2),
                **{s: stages.get(s) or STAGE_NOT_RUN for s in layout.STATUS_STAGES},
            }
        )
    return sorted(rows, key=lambda r: r["state"] == "completed")  # stable: failed first


def table_artifact_rows(rows: list[dict[str, Any]], error_chars: int = 160) -> list[dict[str, Any]]:
    """The rows as the UI shows them: escaped cells, a FAILED state in capitals, errors cut short
    (the whole text is in `lens status` and the class's status file)."""
    return [
        {
            k: md_cell(
                STATE_MARK.get(v, v) if k == "state" else v, error_chars if k == "error" else 300
            )
            for k, v in r.items()
        }
        for r in rows
    ]


def site_link(info: RunInfo, config_path: str | None = None) -> tuple[str, str]:
    """(address, how to open it) of the run's site: the public address under `publish_base_url`
    when one is configured, else `lens serve`'s address on 127.0.0.1 and the command that serves
    it. A browser will not open a `file://` link from the Prefect UI."""
    cfg = info.config
    if cfg.publish_base_url:
        url = f"{cfg.publish_base_url}/{info.run_id}/index.html"
        return url, f"[{url}]({url})"
    base = normalize_url(cfg.publish)
    where = base[len("file://") :] if base.startswith("file://") else base
    command = [
        "lens",
        "serve",
        *(["--config", config_path] if config_path else []),
        "--publish",
        where,
    ]
    url = f"http://127.0.0.1:8000/{info.run_id}/index.html"
    how = (
        f"The site is written at `{where}/{info.run_id}/`. Serve it on this machine with\n\n"
        f"```\n{shlex.join(command)}\n```\n\nthen open {url}\n\n"
        "(To link to it from here instead, publish to a bucket served over http and set "
        "`publish_base_url` to its public address.)"
    )
    return url, how


def site_artifact(info: RunInfo, config_path: str | None) -> str:
    url, how = site_link(info, config_path)
    if info.config.publish_base_url:
        create_link_artifact(url, link_text="LENS atlas site", key=f"lens-site-{info.run_id}")
    else:
        create_markdown_artifact(
            f"## LENS atlas site\n\n{how}\n",
            key=f"lens-site-{info.run_id}",
            description=f"how to open the site of run {info.run_id}",
        )
    return url
