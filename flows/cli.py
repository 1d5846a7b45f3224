"""The `lens` command: `lens run`, `lens status`, `lens serve`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import warnings
from typing import TYPE_CHECKING, Any

from flows.cli_common import class_list, print_table
from lens_core import layout
from lens_core.config import (
    AtlasConfig,
    ConfigError,
    load_config,
    refuse_secrets,
    split_secrets,
)
from lens_core.identity import is_run_id
from lens_core.settings import settings
from lens_core.store import RunStore, normalize_url

if TYPE_CHECKING:  # run pulls in torch, which `lens --help` and the table commands do not need
    from prefect.client.schemas.objects import State

    from lens_core.run import RunInfo

log = logging.getLogger("lens")


def _config(args: argparse.Namespace) -> AtlasConfig:
    """The run's config: the TOML file, then the command-line overrides, validated once."""
    return load_config(
        args.config,
        checkpoint=getattr(args, "checkpoint", None),
        classes=class_list(args.classes),
        store=getattr(args, "store", None),
        publish=getattr(args, "publish", None),
    )


QUIET_ENV = {
    # INFO logs still reach the API (task run logs)
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
    "DASK_LOGGING__DISTRIBUTED": "warning",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no telemetry errors without network
}


def _quiet_console() -> None:
    """Console output of `lens run`: the progress bars and the summary; warnings and errors still
    show.

    LENS_LOG=INFO (or DEBUG) keeps every library's INFO lines.
    """
    if settings().log in ("INFO", "DEBUG"):
        return
    for key, value in QUIET_ENV.items():
        # before Prefect and Dask configure logging; workers inherit it
        os.environ.setdefault(key, value)
    # Dask's scheduler HTTP port
    warnings.filterwarnings("ignore", message="Port .* is already in use")


class _Bars:
    """Rich progress bars fed by the flow (classes finished, concepts rendered)."""

    def __init__(self, n_classes: int, enabled: bool, link: str = ""):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]{task.description:<8}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            disable=not enabled,
        )
        self.tasks = {
            "classes": self.progress.add_task("classes", total=n_classes),
            "concepts": self.progress.add_task("renders", total=None),
        }
        self.link, self.linked = link, False

    def update(self, kind: str, done: int, total: int) -> None:
        if kind == "site":  # the first pages are out: say where, once
            if not self.linked and self.link:
                self.linked = True
                self.progress.console.print(
                    f"site so far (pages appear as classes finish): {self.link}", soft_wrap=True
                )
            return
        self.progress.update(self.tasks[kind], completed=done, total=total)


class _Cluster:
    """The local Dask cluster of `lens run`, started in the background (workers import torch
    meanwhile)."""

    def __init__(self, workers: int | None):
        from flows.atlas import cluster_spec

        self.kwargs = cluster_spec(workers)[1]
        self.cluster: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._start, name="lens-dask-start", daemon=True)
        self.thread.start()

    def _start(self) -> None:
        from flows.cluster import local_cluster

        try:
            self.cluster = local_cluster(**self.kwargs)
        except BaseException as err:  # noqa: BLE001 - re-raised in runner()
            self.error = err

    def runner(self) -> Any:
        from flows.runner import LensDaskTaskRunner

        self.thread.join()
        if self.error is not None:
            raise self.error
        return LensDaskTaskRunner(address=self.cluster.scheduler_address)

    def close(self) -> None:
        self.thread.join()
        if self.cluster is not None:
            self.cluster.close()


def _api_url_configured() -> bool:
    if os.environ.get("PREFECT_API_URL"):
        return True
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def _finished_answer(cfg: AtlasConfig, force_publish: bool) -> int | None:
    """A finished run with nothing to compute: answered here, without Prefect or Dask (the site
    published again in this process when asked to or when it is not at this publish URL)."""
    from flows.rerun import finished_unchanged, republish

    done = finished_unchanged(cfg)
    if done is None:
        return None
    info = done.info
    print(
        f"LENS run {info.run_id}: finished, {len(info.slugs)} classes, nothing to recompute "
        "(no Prefect server or Dask cluster started)"
    )
    if force_publish or not done.site_written:
        import time

        t0 = time.perf_counter()
        out = republish(cfg)
        print(
            f"published again from the store: {out.get('files', '?')} files in "
            f"{time.perf_counter() - t0:.1f} s"
        )
    link = cfg.publish_base_url and f"{cfg.publish_base_url}/{info.run_id}/index.html"
    _print_site(cfg, info, link, f"{normalize_url(cfg.publish)}/{info.run_id}")
    if not force_publish:
        print("(`lens run --force-publish` publishes the site again)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _config(args)  # a bad config fails here, before anything starts
    public_options, secret_env = split_secrets(cfg.storage_options)
    # the config is a flow parameter (stored by the Prefect API): credentials go by the environment
    refuse_secrets({"storage_options": public_options}, "storage options")
    _quiet_console()
    os.environ.update(secret_env)  # the store is read below, and the Dask workers inherit them
    cfg = cfg.model_copy(update={"storage_options": public_options})
    answered = _finished_answer(cfg, args.force_publish)
    if answered is not None:
        return answered
    from flows.api import TemporaryAPI, drain_prefect_queues

    # the API boots while we import and prepare
    api = None if _api_url_configured() else TemporaryAPI().start()
    cluster: _Cluster | None = None
    try:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from flows.atlas import build_atlas, make_task_runner, prepared_run, progress_listener
        from lens_core.run import prepare_run

        address = args.dask_address or settings().dask_address
        if not address and not settings().gpu:
            cluster = _Cluster(args.workers)
            print("starting Dask workers (they import torch and Prefect) while the run is set up")
        # unknown classes or a foreign checkpoint fail here, before Prefect or Dask is reached;
        # the flow takes this run as it is (`prepared_run`): the checkpoint is read once
        info = prepare_run(cfg)
        print(
            f"LENS run {info.run_id}: {len(info.classes)} classes, model {cfg.model.arch}, "
            f"store {normalize_url(cfg.store)}"
        )
        api_settings = {PREFECT_API_URL: api.wait()} if api else {}
        if cluster is not None and cluster.thread.is_alive():
            print("waiting for the Dask workers to start ...")
        runner = (
            cluster.runner()
            if cluster
            else make_task_runner(workers=args.workers, dask_address=address)
        )
        bars = _Bars(len(info.slugs), enabled=not args.no_progress, link=_partial_link(cfg, info))
        if settings().log not in ("INFO", "DEBUG"):
            from flows.runner import quiet_task_failures

            quiet_task_failures()  # a failed class is one line here; its traceback goes to the API
        with (
            temporary_settings(updates=api_settings),
            prepared_run(cfg, info),
            progress_listener(bars.update),
            bars.progress,
        ):
            state = build_atlas.with_options(task_runner=runner)(config=cfg, return_state=True)
            drain_prefect_queues()
    finally:
        if cluster is not None:
            cluster.close()
        if api is not None:
            api.stop()
    return _report(state, info, cfg)


def _flow_result(state: Any) -> dict[str, Any]:
    """The flow's result dict (also carried by a Failed state), or {}."""
    try:
        result = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - a crashed run has no result to show
        return {}
    return result if isinstance(result, dict) else {}


def _report(state: State, info: RunInfo, cfg: AtlasConfig) -> int:
    """What `lens run` prints at the end, and its exit code: 0 when every class was explained and
    the site published, 2 when some or every class failed or a cross-class step failed (a
    `lens:` line says which), 1 when the run crashed. The site is named only when it was written."""
    result = _flow_result(state)
    if state.is_failed():
        print(f"lens: {state.message}", file=sys.stderr)
        return 2 if result.get("failed") else 1  # every class failed: a finding, not a crash
    print(f"{state.name}: {state.message}")
    timings = result.get("timings") or {}
    if "classes_and_renders" in timings:
        print(
            f"time: classes and renders {timings['classes_and_renders']:.0f} s "
            f"({timings['concepts_rendered']} concepts in "
            f"{timings['render_batches']} render batches), "
            f"cross-class {timings.get('cross_class', 0.0):.1f} s, "
            f"mistakes {timings.get('mistakes', 0.0):.1f} s, "
            f"publish {timings.get('publish', 0.0):.1f} s"
            + (
                f"; first pages {timings['first_page']:.0f} s after the flow started"
                if timings.get("first_page", -1) >= 0
                else ""
            )
        )
    if result.get("site_written"):
        _print_site(cfg, info, result.get("site_link"), result["site"])
    if result.get("failed") or result.get("steps_failed"):
        what = (
            [f"{len(result.get('failed') or [])} of {result.get('classes')} classes failed"]
            if result.get("failed")
            else []
        )
        what += [f"the {name} step failed" for name in result.get("steps_failed") or {}]
        print(f"lens: {', '.join(what)} (see above; `lens status` for each class)", file=sys.stderr)
        return 2
    return 0


def _print_site(cfg: AtlasConfig, info: RunInfo, link: str | None, site: str) -> None:
    base = normalize_url(cfg.publish)
    if cfg.publish_base_url:
        print(f"site: {link}")
    elif base.startswith("file://"):
        print(f"site: {site[len('file://') :]}/index.html")
        print(
            f"serve it with: .venv/bin/lens serve --publish {base[len('file://') :]}  -> "
            f"http://127.0.0.1:8000/{info.run_id}/index.html"
        )
    else:
        print(f"site: {site}/index.html (serve it with: .venv/bin/lens serve --publish {base})")


def _partial_link(cfg: AtlasConfig, info: RunInfo) -> str:
    """Where the site so far can be read (its pages appear as classes finish)."""
    site = f"{normalize_url(cfg.publish)}/{info.run_id}/index.html"
    if cfg.publish_base_url:
        return f"{cfg.publish_base_url}/{info.run_id}/index.html"
    return site[len("file://") :] if site.startswith("file://") else site


def status_table(store: RunStore) -> list[dict[str, Any]]:
    """Rows of (class, state, per-stage state, seconds, note, error) for every class of a run."""
    from lens_core.status import STAGES, class_note, class_state, read_status

    meta = store.read_json(layout.RUN_JSON, {})
    slugs = [c["slug"] for c in meta.get("classes", [])] or store.list(layout.STATUS)
    rows = []
    for slug, stages in read_status(store, slugs).items():
        errors = [f"{s}: {r['error']}" for s, r in stages.items() if r.get("error")]
        rows.append(
            {
                "class": slug,
                "state": class_state(stages),
                **{s: stages.get(s, {}).get("state", "-") for s in STAGES},
                "seconds": round(sum(r.get("seconds") or 0 for r in stages.values()), 2),
                "note": class_note(stages),
                "error": "; ".join(errors),
            }
        )
    return rows


def cmd_status(args: argparse.Namespace) -> int:
    from lens_core.lineage import list_runs

    cfg = load_config(args.config, store=args.store)
    if args.run and not is_run_id(args.run):
        raise ConfigError(f"--run: {args.run!r} is not a run id (12 hexadecimal digits)")
    runs = [] if args.run else list_runs(normalize_url(cfg.store), cfg.storage_options)
    run_id = args.run or (runs[-1].run_id if runs else None)
    if not run_id:
        print(f"no run found under {normalize_url(cfg.store)}/runs", file=sys.stderr)
        return 1
    store = RunStore(cfg.store, run_id, cfg.storage_options)
    rows = status_table(store)
    print_table(
        f"LENS run {run_id}",
        ("class", "state", *layout.STATUS_STAGES, "seconds", "note", "error"),
        rows,
    )
    failed = sum(r["state"] == "failed" for r in rows)
    flagged = sum(bool(r["note"]) for r in rows)
    print(
        f"{len(rows)} classes, {failed} failed"
        + (f", {flagged} flagged (see note)" if flagged else "")
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.serve import serve

    cfg = load_config(args.config, publish=args.publish)
    serve(normalize_url(cfg.publish), cfg.storage_options, port=args.port)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lens", description="LENS: explain a classifier class by class."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="build the atlas (embedded toy default with no arguments)")
    run.add_argument("--config", help="AtlasConfig TOML file")
    run.add_argument("--classes", help="comma-separated class ids/names/slugs")
    run.add_argument("--store", help="run store URL (file://, s3://...)")
    run.add_argument("--publish", help="site URL (file://, s3://...)")
    run.add_argument("--checkpoint", help="checkpoint URL overriding the config")
    run.add_argument("--workers", type=int, help="Dask workers of the local cluster")
    run.add_argument("--dask-address", help="address of an existing Dask scheduler")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--force-publish",
        action="store_true",
        help="publish the site again (a finished run: from its store, nothing recomputed)",
    )
    run.set_defaults(fn=cmd_run)
    status = sub.add_parser("status", help="per-class, per-stage state of a run")
    status.add_argument("--config")
    status.add_argument("--store")
    status.add_argument("--run", help="run id (default: the latest run in the store)")
    status.set_defaults(fn=cmd_status)
    serve = sub.add_parser("serve", help="serve the published site on 127.0.0.1")
    serve.add_argument("--config")
    serve.add_argument("--publish")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(fn=cmd_serve)
    from flows.cli_changes import add_commands
    from flows.cli_confusions import add_confusions_command

    add_commands(sub)
    add_confusions_command(sub)
    args = parser.parse_args(argv)
    level = settings().log
    handler = logging.StreamHandler()
    handler.setLevel(level)  # the root level alone lets other loggers' INFO records through
    logging.basicConfig(level=level, handlers=[handler])
    try:
        return args.fn(args)
    except Exception as err:
        if not _user_error(err):
            raise
        print(f"lens: {err}", file=sys.stderr)
        return 2


def _user_error(err: BaseException) -> bool:
    """Errors whose message says it all (config, data, checkpoint, store): no traceback soup."""
    from lens_core.store import StoreError

    kinds: list[type] = [ConfigError, StoreError]
    for module, name in (
        ("lens_core.data", "DataError"),
        ("lens_core.models", "ModelError"),
        ("lens_core.labels", "LabelError"),
    ):
        if module in sys.modules:  # raised from there only if it was imported
            kinds.append(getattr(sys.modules[module], name))
    return isinstance(err, tuple(kinds))


if __name__ == "__main__":
    raise SystemExit(main())
