"""The `build-atlas` flow: fan out per-class chains on Dask, pool MACO renders, aggregate, publish.

Orchestration costs measured on 2 cores and what keeps them small (bench/bench_flow.py):
one Dask submission per class (tasks/chain.py) carrying a RunInfo narrowed to that class; the
stage task runs nested in it, tagged only with what a concurrency limit names (flows/limits.py:
each tag costs an API call per task run); submissions without Dask tokenization
(flows/runner.py); workers
started without Dask's malloc trim threshold (flows/cluster.py); task runs on the workers
reporting to this flow's API, never to servers of their own (`_shared_api`). A class's renders
are queued when its chain ends and submitted in batches across classes (the last ones split over
the workers); completions are handled as they come (a queue fed by future callbacks). On CPU the
workers stay busy: the flow takes about the stages' compute divided by the workers.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import time
from collections.abc import Callable, Iterator
from typing import Any

import dask
from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import get_run_context
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Completed, Failed
from prefect_dask import DaskTaskRunner

from flows.limits import limited_tags
from flows.runner import LensDaskTaskRunner
from lens_core import layout
from lens_core.config import AtlasConfig, config_from_parameters
from lens_core.publish import published
from lens_core.publish import site_url as run_site_url
from lens_core.run import RunInfo, check_model, mark_finished, prepare_run
from lens_core.secrets import error_text
from lens_core.settings import settings
from lens_core.status import write_status
from lens_core.store import normalize_url
from lens_core.summary import class_summary
from lens_core.viz_pool import pending_items
from tasks.chain import class_chain_task
from tasks.stages import (
    changes_task,
    cross_class_task,
    publish_index_task,
    publish_pages_task,
    render_task,
    tagged,
)

ProgressFn = Callable[[str, int, int], None]
_LISTENERS: list[ProgressFn] = []
PROGRESS_EVERY_S = 2.0  # the progress artifact is updated at most this often (one API call each)


# ---- task runner ---------------------------------------------------------------------------

def cluster_spec(workers: int | None = None, gpu: bool | None = None) -> tuple[str, dict[str, Any]]:
    """(cluster factory, kwargs) of the local cluster: one worker per GPU, else `workers` CPU workers.

    The factory (flows/cluster.py) sets the workers' environment: torch threads = cores // workers
    and no malloc trim threshold (it tripled MACO time on CPU).
    """
    if gpu is None:
        gpu = settings().gpu
    if gpu:
        return "flows.cluster.local_cluster", {"gpu": True, "resources": {"GPU": 1}, "dashboard_address": None}
    n = workers or settings().workers or max(1, min(os.cpu_count() or 1, 4))
    return "flows.cluster.local_cluster", {"n_workers": n, "threads_per_worker": 1, "processes": True,
                                           "dashboard_address": None}


def make_task_runner(workers: int | None = None, dask_address: str | None = None, gpu: bool | None = None) -> DaskTaskRunner:
    """Dask runner: an existing scheduler, one worker per GPU (dask-cuda), or a LocalCluster.

    An existing scheduler is reached over TLS with LENS_DASK_TLS_DIR's client certificate; a
    plaintext one on another host is refused (flows.cluster.client_kwargs_for). Local clusters
    speak TLS with credentials of their own (flows.cluster.local_cluster).
    """
    from flows.cluster import client_kwargs_for

    dask_address = dask_address or settings().dask_address or None
    if dask_address:
        return LensDaskTaskRunner(address=dask_address, client_kwargs=client_kwargs_for(dask_address))
    cluster_class, kwargs = cluster_spec(workers, gpu)
    return LensDaskTaskRunner(cluster_class=cluster_class, cluster_kwargs=kwargs)


def _gpu_annotation() -> dict[str, Any]:
    """Pin tensor work to workers that have a GPU when running on a GPU cluster."""
    return {"resources": {"GPU": 1}} if settings().gpu else {}


@contextlib.contextmanager
def _shared_api() -> Iterator[None]:
    """Point task runs on Dask workers at this flow's API.

    Without a configured API URL the flow talks to an ephemeral server; the settings that travel
    to Dask workers carry no URL, so each worker would start its own server (~15 s of CPU each)
    and report its task runs there, out of sight of the flow's API.
    """
    if PREFECT_API_URL.value():
        yield
        return
    url = str(get_run_context().client.api_url).rstrip("/")
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield


@contextlib.contextmanager
def progress_listener(fn: ProgressFn) -> Iterator[None]:
    """Call fn(kind, done, total) as classes ('classes') and renders ('concepts') finish in this process."""
    _LISTENERS.append(fn)
    try:
        yield
    finally:
        _LISTENERS.remove(fn)


def _notify(kind: str, done: int, total: int) -> None:
    for fn in list(_LISTENERS):
        with contextlib.suppress(Exception):
            fn(kind, done, total)


# ---- the flow ------------------------------------------------------------------------------

@flow(name="build-atlas", task_runner=make_task_runner(), log_prints=True, persist_result=False)
def build_atlas(
    config_path: str | None = None,
    config: AtlasConfig | None = None,
    checkpoint: str | None = None,
    classes: list[str] | None = None,
    store: str | None = None,
    publish: str | None = None,
) -> Any:
    """Explain a classifier class by class and publish the LENS site.

    Args:
        config_path: a TOML AtlasConfig file (local path); empty = the embedded toy default.
        config: AtlasConfig fields (the form's sections: model, data, patches, concepts,
            importance, maco, crops, store, publish); the fields you set apply over the file.
        checkpoint: checkpoint URL (local, file:// or s3://) overriding model.checkpoint.
        classes: restrict to these class ids/names/slugs.
        store: run store URL (fsspec), e.g. s3://bucket/lens.
        publish: site URL (fsspec), e.g. s3://bucket/site.
    """
    logger = get_run_logger()
    cfg = config_from_parameters(config_path, config, checkpoint, classes, store, publish)
    t0 = time.perf_counter()
    info = prepare_run(cfg)
    check_model(info)  # a bad checkpoint fails the run once, before any class is submitted
    t_prepare = time.perf_counter() - t0
    logger.info("run %s: %d classes, model %s (%s), store %s", info.run_id, len(info.slugs), cfg.model.arch,
                info.checkpoint_digest[:12], normalize_url(cfg.store))
    with _shared_api():
        limited = limited_tags(logger)
        outcomes, timings = _explain_classes(info, cfg, logger, limited)
        timings["prepare"] = t_prepare
        t = time.perf_counter()
        cross = tagged(cross_class_task, limited).submit(info).result()
        timings.update(cross_class=time.perf_counter() - t, cross_class_compute=cross.get("task_seconds", 0.0))
        t = time.perf_counter()
        changed = tagged(changes_task, limited).submit(info).result()
        timings.update(changes=time.perf_counter() - t, changes_compute=changed.pop("task_seconds", 0.0))
        t = time.perf_counter()
        pages = tagged(publish_pages_task, limited).submit(info, cfg.publish).result()
        index = tagged(publish_index_task, limited).submit(info, pages["site"], cfg.publish).result()
        timings.update(publish=time.perf_counter() - t,
                       publish_compute=pages.pop("task_seconds") + index.pop("task_seconds"))
        site = published(pages, index)
    _changes_artifact(info, changed)
    return _finish(info, outcomes, site, timings, t0, changed)


class _RenderPool:
    """MACO renders pooled across classes: batches of `batch` concepts, submitted as classes finish."""

    def __init__(self, info: RunInfo, batch: int, track: Callable[[Any, str, Any], None],
                 limited: tuple[str, ...] = ()):
        self.info, self.batch, self.track = info, batch, track
        self.render = tagged(render_task, limited)
        self.queue: list[tuple[str, int]] = []
        self.left: dict[str, int] = {}  # concepts of a class not rendered yet in this run
        self.failed: set[str] = set()
        self.batches = self.rendered = self.queued = 0
        self.seconds = 0.0

    def add(self, items: list[tuple[str, int]], final: bool) -> int:
        """Queue a class's renders; submit full batches (all of them once `final`). Returns batches submitted."""
        self.queue += items
        self.queued += len(items)
        for slug, _ in items:
            self.left[slug] = self.left.get(slug, 0) + 1
        size = self.batch
        if final and self.queue:  # the tail: spread it over the workers rather than one big batch
            size = max(1, min(self.batch, math.ceil(len(self.queue) / _n_workers())))
        submitted = 0
        while len(self.queue) >= size or (final and self.queue):
            chunk, self.queue = self.queue[:size], self.queue[size:]
            with dask.annotate(**_gpu_annotation()):
                fut = self.render.submit(self.info, chunk, f"{chunk[0][0]}+{len(chunk) - 1}")
            self.track(fut, "render", chunk)
            submitted += 1
        self.batches += submitted
        return submitted

    def done(self, chunk: list[tuple[str, int]], fut: Any, logger: Any) -> None:
        try:
            self.seconds += float(fut.result().get("seconds", 0.0))
            self.rendered += len(chunk)
            for slug, _ in chunk:
                self.left[slug] -= 1
        except Exception as exc:  # a failed batch marks its classes; the run goes on
            err = error_text(exc, self.info.config.storage_options, 500)
            for slug in sorted({s for s, _ in chunk} - self.failed):
                self.failed.add(slug)
                write_status(self.info.store(), slug, "render", "failed", None, err)
                logger.warning("render failed for %s: %s", slug, err)

    def state(self, slug: str) -> str | None:
        """This run's render state of a class, or None when it had nothing to render here."""
        if slug in self.failed:
            return "failed"
        if slug not in self.left:
            return None
        return "completed" if self.left[slug] == 0 else "pending"


def _explain_classes(info: RunInfo, cfg: AtlasConfig, logger: Any,
                     limited: tuple[str, ...] = ()) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Per-class chains, and the pooled renders submitted as soon as a class has its concepts."""
    slugs = info.slugs
    t_start = time.perf_counter()
    progress_id = create_progress_artifact(0.0, key=f"lens-progress-{info.run_id}",
                                           description=f"classes finished in run {info.run_id}")
    done_q: queue.Queue = queue.Queue()

    def track(fut: Any, kind: str, payload: Any) -> None:
        fut.add_done_callback(lambda f: done_q.put((kind, payload, f)))

    chain = tagged(class_chain_task, limited)
    with dask.annotate(**_gpu_annotation()):
        for s in slugs:  # each chain gets a RunInfo of its own class: cheap to send and to walk
            track(chain.submit(info.narrowed([s]), s, limited=limited), "class", s)
    outcomes: dict[str, dict[str, Any]] = {}
    pool = _RenderPool(info, cfg.maco.batch_size, track, limited)
    pending = len(slugs)
    last_progress = 0.0
    while pending:
        kind, payload, fut = done_q.get()
        pending -= 1
        if kind == "render":
            pool.done(payload, fut, logger)
        else:
            slug = payload
            try:
                outcomes[slug] = {"ok": True, **fut.result()}
                items = [tuple(x) for x in outcomes[slug].pop("render_items", [])]
            except Exception as err:  # one bad class never sinks the run
                outcomes[slug] = {"ok": False, "error": error_text(err, cfg.storage_options, 500)}
                logger.warning("class %s failed: %s", slug, outcomes[slug]["error"])
                items = pending_items(info, [slug])  # a class that failed after factorize still renders
            pending += pool.add(items, final=len(outcomes) == len(slugs))
            _notify("classes", len(outcomes), len(slugs))
            now = time.perf_counter()
            if now - last_progress >= PROGRESS_EVERY_S or len(outcomes) == len(slugs):
                last_progress = now
                update_progress_artifact(progress_id, 100.0 * len(outcomes) / len(slugs),
                                         description=f"{len(outcomes)}/{len(slugs)} classes finished")
        _notify("concepts", pool.rendered, pool.queued)
    for slug, out in outcomes.items():
        out["render"] = pool.state(slug)
    timings = {"classes_and_renders": time.perf_counter() - t_start, "render_compute": pool.seconds,
               "render_batches": pool.batches, "concepts_rendered": pool.rendered}
    return outcomes, timings


def _n_workers() -> int:
    """Workers of the Dask cluster this flow runs on (1 when it cannot tell)."""
    with contextlib.suppress(Exception):
        client = get_run_context().task_runner.client
        return max(1, len(client.scheduler_info(n_workers=-1)["workers"]))
    return 1


def _changes_artifact(info: RunInfo, changed: dict[str, Any]) -> None:
    """A table artifact of the most changed classes since the previous checkpoint (when there is one)."""
    if not changed.get("previous"):
        return
    top = info.config.changes.most_changed or 10
    rows = [{"class": r["slug"], "score": r["score"], "appeared": r["appeared"], "vanished": r["vanished"],
             "matched": r["matched"], "logit change": r["logit_change"], "accuracy change": r["accuracy_change"]}
            for r in changed["ranking"][:top]]
    create_table_artifact(rows, key=f"lens-changes-{info.run_id}",
                          description=f"most changed classes since {changed['previous_label']} (run {changed['previous']})")


def _finish(info: RunInfo, outcomes: dict[str, dict[str, Any]], site: dict[str, Any], timings: dict[str, Any],
            t0: float, changed: dict[str, Any]) -> Any:
    """Table, link and final state (partial success when some classes failed)."""
    slugs = info.slugs
    t_rows = time.perf_counter()
    rows = []
    for slug in slugs:
        out = outcomes[slug]
        summary = out.get("summary") or class_summary(info, slug)  # chains read theirs on the worker
        stages = {**summary["stages"], **({"render": out["render"]} if out.get("render") else {})}
        rows.append({"class": slug, "status": "ok" if out["ok"] else "failed",
                     **{s: stages.get(s, "-") for s in layout.STATUS_STAGES},
                     "seconds": round(summary["seconds"], 2), "top_concept": summary["top_concept"],
                     "importance": summary["top_importance"], "basis": summary.get("importance_basis") or "",
                     "note": summary.get("note") or "", "error": out.get("error") or ""})
    create_table_artifact(rows, key=f"lens-classes-{info.run_id}", description=f"LENS run {info.run_id}: per-class status")
    site_url = run_site_url(info)
    create_link_artifact(site_url + "/index.html", link_text="LENS atlas site", key=f"lens-site-{info.run_id}")
    timings["summary"] = time.perf_counter() - t_rows
    elapsed = time.perf_counter() - t0
    failed = [r["class"] for r in rows if r["status"] != "ok"]
    computed = {s: [st for st, r in o.get("stages", {}).items() if not r["skipped"]] for s, o in outcomes.items()}
    result = {"run_id": info.run_id, "classes": len(slugs), "failed": failed, "site": site_url,
              "computed": {s: st for s, st in computed.items() if st},
              "seconds": round(elapsed, 1), "published": site,
              "changes": {"previous": changed.get("previous"),
                          "most_changed": [r["slug"] for r in changed.get("ranking", [])[:info.config.changes.most_changed]]},
              "timings": {k: round(v, 3) if isinstance(v, float) else v for k, v in timings.items()}}
    # the run's finished marker (read by the checkpoint watcher): written last, only when whole
    if not failed:
        mark_finished(info, site_url)
    message = f"{len(slugs) - len(failed)}/{len(slugs)} classes explained in {elapsed:.0f} s; site {site_url}"
    if failed and len(failed) == len(slugs):
        return Failed(message="every class failed: " + "; ".join(outcomes[s]["error"] for s in failed[:3]), data=result)
    if failed:
        return Completed(name="PartiallyCompleted", message=message + f"; failed: {', '.join(failed[:20])}", data=result)
    return Completed(message=message, data=result)
