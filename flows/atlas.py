"""The `build-atlas` flow: fan out per-class chains on Dask, pool MACO renders, aggregate, publish.

What keeps orchestration small (its costs: docs/performance.md, bench/bench_flow.py): one Dask
submission per class (tasks/chain.py) carrying a RunInfo narrowed to that class; the stage task
runs nested in it, tagged only with what a concurrency limit names (flows/limits.py); submissions
without Dask tokenization (flows/runner.py); task runs on the workers reporting to this flow's
API, never to servers of their own (`_shared_api`). A class's renders are queued when its chain
ends and submitted in batches across classes (the last ones split over the workers);
completions are handled as they come (a queue fed by future callbacks).
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dask
from prefect import flow, get_run_logger
from prefect.context import get_run_context
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Completed, Failed
from prefect_dask import DaskTaskRunner

from flows.artifacts import (
    Progress,
    changes_artifact,
    class_rows,
    classes_artifact,
    mistakes_artifact,
    site_artifact,
    site_link,
)
from flows.forms import FormClasses, FormConfig, FormText, given
from flows.limits import limited_tags
from flows.runner import LensDaskTaskRunner
from lens_core.config import AtlasConfig, ConfigError, config_from_parameters
from lens_core.data import DataError
from lens_core.models import ModelError
from lens_core.publish import PartialSite, published
from lens_core.publish import site_url as run_site_url
from lens_core.renders import by_rank, pending_items
from lens_core.run import RunInfo, mark_finished, prepare_run
from lens_core.secrets import error_text, scrub
from lens_core.settings import settings
from lens_core.status import write_status
from lens_core.store import StoreError, normalize_url
from tasks.chain import class_chain_task
from tasks.class_tasks import render_task
from tasks.run_tasks import (
    changes_task,
    cross_class_task,
    mistakes_task,
    publish_index_task,
    publish_pages_task,
)
from tasks.wrapping import tagged

ProgressFn = Callable[[str, int, int], None]
_LISTENERS: list[ProgressFn] = []
_PREPARED: dict[str, RunInfo] = {}  # runs `lens run` prepared, by their config's JSON
CHAIN_PRIORITY = 10  # Dask priority of class chains: before any queued render batch (default 0)


# ---- task runner ---------------------------------------------------------------------------


def cluster_spec(workers: int | None = None, gpu: bool | None = None) -> tuple[str, dict[str, Any]]:
    """(cluster factory, kwargs) of the local cluster: one worker per GPU, else `workers` CPU
    workers.

    The factory (flows/cluster.py) sets the workers' environment: torch threads = cores // workers
    and no malloc trim threshold (it tripled MACO time on CPU).
    """
    if gpu is None:
        gpu = settings().gpu
    if gpu:
        return "flows.cluster.local_cluster", {
            "gpu": True,
            "resources": {"GPU": 1},
            "dashboard_address": None,
        }
    n = workers or settings().workers or max(1, min(os.cpu_count() or 1, 4))
    return "flows.cluster.local_cluster", {
        "n_workers": n,
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": None,
    }


def make_task_runner(
    workers: int | None = None, dask_address: str | None = None, gpu: bool | None = None
) -> DaskTaskRunner:
    """Dask runner: an existing scheduler, one worker per GPU (dask-cuda), or a LocalCluster.

    An existing scheduler is reached over TLS with LENS_DASK_TLS_DIR's client certificate; a
    plaintext one on another host is refused (flows.tls.client_kwargs_for). Local clusters
    speak TLS with credentials of their own (flows.cluster.local_cluster).
    """
    from flows.tls import client_kwargs_for

    dask_address = dask_address or settings().dask_address or None
    if dask_address:
        return LensDaskTaskRunner(
            address=dask_address, client_kwargs=client_kwargs_for(dask_address)
        )
    cluster_class, kwargs = cluster_spec(workers, gpu)
    return LensDaskTaskRunner(cluster_class=cluster_class, cluster_kwargs=kwargs)


def _gpu_annotation() -> dict[str, Any]:
    """Pin tensor work to workers that have a GPU when running on a GPU cluster."""
    return {"resources": {"GPU": 1}} if settings().gpu else {}


@contextlib.contextmanager
def _shared_api() -> Iterator[None]:
    """Point task runs on Dask workers at this flow's API.

    Without a configured API URL the flow talks to an ephemeral server; the settings that travel
    to Dask workers carry no URL, so each worker would start its own server (seconds of CPU
    each) and report its task runs there, out of sight of the flow's API.
    """
    if PREFECT_API_URL.value():
        yield
        return
    url = str(get_run_context().client.api_url).rstrip("/")
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield


@contextlib.contextmanager
def progress_listener(fn: ProgressFn) -> Iterator[None]:
    """Call fn(kind, done, total) as classes ('classes') and renders ('concepts') finish in this
    process."""
    _LISTENERS.append(fn)
    try:
        yield
    finally:
        _LISTENERS.remove(fn)


@contextlib.contextmanager
def prepared_run(config: AtlasConfig, info: RunInfo) -> Iterator[None]:
    """Hand the flow a run prepared in this process from `config` (`lens run` prepares it before
    starting Prefect or Dask, to fail fast): the flow takes it instead of preparing it again."""
    key = config.model_dump_json()
    _PREPARED[key] = info
    try:
        yield
    finally:
        _PREPARED.pop(key, None)


def _prepare(config: AtlasConfig) -> RunInfo:
    """The run of `config`: the one `prepared_run` handed over, else prepared here (the
    checkpoint read, hashed and checked once, before any class is submitted)."""
    return _PREPARED.pop(config.model_dump_json(), None) or prepare_run(config)


def _notify(kind: str, done: int, total: int) -> None:
    for fn in list(_LISTENERS):
        with contextlib.suppress(Exception):
            fn(kind, done, total)


# ---- the flow ------------------------------------------------------------------------------

# Errors whose message says it all (bad config, data, checkpoint or store): the run fails with
# that message alone, before any class is submitted, and no traceback is logged.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, ModelError, StoreError)

# The run form (Prefect UI): flows/forms.py (no field starts as 'Property is type "None"').
_given = given


@flow(name="build-atlas", task_runner=make_task_runner(), log_prints=True, persist_result=False)
def build_atlas(
    config_path: FormText = None,
    config: FormConfig = None,
    checkpoint: FormText = None,
    classes: FormClasses = None,
    store: FormText = None,
    publish: FormText = None,
) -> Any:
    """Explain a classifier class by class and publish the LENS site.

    Args:
        config_path: a TOML AtlasConfig file on the worker (local path); empty = the embedded toy
            default.
        config: AtlasConfig fields (sections model, data, patches, concepts, importance, maco,
            crops, changes; store, publish). With `config_path` too, the file is the base and a
            field here wins only where it differs from the default shown; a field left at its
            default keeps the file's value.
        checkpoint: checkpoint URL (local, `file://` or `s3://`); wins over `model.checkpoint`.
        classes: restrict the run to these classes: folder names (`n01440764`), names from
            `class_names` (`tench`), label indices (`0`) or the slugs `lens status` lists; toy
            data: `0` to `9`. Empty = every class. Wins over `config.classes`.
        store: run store URL (fsspec), e.g. `s3://bucket/lens`; wins over the config's.
        publish: site URL (fsspec), e.g. `s3://bucket/site`; wins over the config's.
    """
    logger = get_run_logger()
    try:
        cfg = config_from_parameters(
            _given(config_path),
            config,
            _given(checkpoint),
            _given(classes),
            _given(store),
            _given(publish),
        )
    except USER_ERRORS as err:
        return _refused(logger, err, {})
    runner = _lens_runner()
    if runner is not None:
        runner.start_in_background()  # the workers start while the run is set up below
    t0 = time.perf_counter()
    try:
        info = _prepare(cfg)
    except USER_ERRORS as err:
        return _refused(logger, err, cfg.storage_options)
    t_prepare = time.perf_counter() - t0
    logger.info(
        "run %s: %d classes, model %s (%s), store %s",
        info.run_id,
        len(info.slugs),
        cfg.model.arch,
        info.checkpoint_digest[:12],
        normalize_url(cfg.store),
    )
    steps: dict[str, str] = {}  # cross-class step -> error, for those that failed
    changed: dict[str, Any] = {}
    site: dict[str, Any] | None = None
    mistakes: dict[str, Any] | None = None
    live = _LiveSite(info, cfg.publish, logger, t0, config_path=_given(config_path))
    with _shared_api():
        limited = limited_tags(logger)
        try:
            outcomes, timings = _explain_classes(info, cfg, logger, limited, runner, live)
        finally:
            live.close()  # every partial page written before the final publish
        timings["prepare"] = t_prepare
        timings.update(live.timings())
        if any(
            o["ok"] for o in outcomes.values()
        ):  # with no class explained there is nothing to compare or publish
            step = _Steps(info, logger, limited, steps, timings)
            cross = step.run("cross-class", cross_class_task, info)
            timings["cross_class_compute"] = (cross or {}).get("task_seconds", 0.0)
            changed = step.run("changes", changes_task, info) or {}
            timings["changes_compute"] = changed.pop("task_seconds", 0.0)
            mistakes = step.run("mistakes", mistakes_task, info, gpu=True)
            timings["mistakes_compute"] = (mistakes or {}).get("task_seconds", 0.0)
            t = time.perf_counter()
            pages = step.run(
                "publish-pages", publish_pages_task, info, cfg.publish, sorted(live.written)
            )
            index = (
                step.run("publish-index", publish_index_task, info, pages["site"], cfg.publish)
                if pages
                else None
            )
            timings["publish"] = time.perf_counter() - t
            if pages and index:
                timings["publish_compute"] = pages.pop("task_seconds") + index.pop("task_seconds")
                site = published(pages, index)
    if changed:
        changes_artifact(info, changed)
    if mistakes is not None:
        mistakes_artifact(info)
    return _finish(info, outcomes, site, timings, t0, changed, steps, _given(config_path), mistakes)


def _refused(logger: Any, err: BaseException, storage_options: dict[str, Any]) -> Any:
    """Bad input: the run fails with the error's message alone (one log line, no traceback)."""
    message = scrub(str(err), storage_options)
    logger.error(message)
    return Failed(message=message)


def _lens_runner() -> LensDaskTaskRunner | None:
    with contextlib.suppress(Exception):
        runner = get_run_context().task_runner
        if isinstance(runner, LensDaskTaskRunner):
            return runner
    return None


class _Steps:
    """The cross-class steps, each a task run whose failure is recorded, never fatal: the classes'
    work is published whatever happens to the comparison with the previous checkpoint."""

    def __init__(
        self,
        info: RunInfo,
        logger: Any,
        limited: tuple[str, ...],
        failed: dict[str, str],
        timings: dict[str, Any],
    ):
        self.info, self.logger, self.limited, self.failed, self.timings = (
            info,
            logger,
            limited,
            failed,
            timings,
        )

    def run(self, name: str, task_obj: Any, *args: Any, gpu: bool = False) -> dict[str, Any] | None:
        t = time.perf_counter()
        try:
            with dask.annotate(**(_gpu_annotation() if gpu else {})):
                fut = tagged(task_obj, self.limited).submit(*args)
            return fut.result()
        except Exception as err:  # noqa: BLE001 - recorded in the table, the message and the result
            self.failed[name] = error_text(err, self.info.config.storage_options, 500)
            self.logger.warning("%s step failed: %s", name, self.failed[name])
            return None
        finally:
            self.timings[name.replace("-", "_")] = time.perf_counter() - t


class _LiveSite:
    """The site published while the run goes on (`PartialSite`): a class's page when its chain
    ends, again when its renders are marked, the index at most once per LENS_INDEX_INTERVAL_S.

    Each `pages()` call blocks on the store's reads and writes: it runs on one thread of its
    own, in submission order, never in the flow's loop. A failure here is logged and never
    fails the run: the final publish writes the whole site anyway.
    """

    def __init__(
        self,
        info: RunInfo,
        publish_url: str,
        logger: Any,
        t0: float,
        config_path: str | None = None,
    ):
        self.site = PartialSite(info, publish_url)
        self.logger, self.t0 = logger, t0
        self.link = site_link(info, config_path)[0]
        self.n = len(info.slugs)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="lens-site")
        self.flush_at: float | None = None  # monotonic time of a held-back index update
        self.first_page_s: float | None = None
        self.errors = 0
        self.any_ok = False
        self.held: list[str] = []  # failed classes, published with the first class explained

    @property
    def written(self) -> set[str]:
        return self.site.written

    def so_far(self) -> tuple[int, str] | None:
        """(class pages, link) of the site so far, once its first page is out."""
        if self.first_page_s is None:
            return None
        return len(self.site.published), self.link

    def pages(self, slugs: Iterable[str], ok: bool = True) -> None:
        """Publish these classes' pages. Failed classes wait for the first class explained: a
        run whose every class fails publishes nothing (its final message says so)."""
        if not ok and not self.any_ok:
            self.held += list(slugs)
            return
        slugs, self.any_ok = [*self.held, *slugs], True
        self.held = []
        if slugs:
            self.executor.submit(self._run, self.site.pages, slugs)

    def flush_if_due(self) -> None:
        if self.flush_at is not None and time.monotonic() >= self.flush_at:
            self.flush_at = None
            self.executor.submit(self._run, self.site.flush)

    def _run(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            out = fn(*args)
            if self.first_page_s is None and self.site.published:
                self.first_page_s = time.perf_counter() - self.t0
                self.logger.info("first pages of the site: %s", self.link)
            if out is not None and out.get("pages"):
                _notify("site", len(self.site.published), self.n)
        except Exception as err:  # noqa: BLE001 - the final publish writes the whole site anyway
            self.errors += 1
            if self.errors == 1:
                why = error_text(err, self.site.info.config.storage_options, 300)
                self.logger.warning(
                    "publishing pages while the run goes on failed (the final "
                    "publish still writes the site): %s",
                    why,
                )
        due = self.site.due_in()
        self.flush_at = None if due is None else time.monotonic() + due

    def close(self) -> None:
        self.executor.shutdown(wait=True)

    def timings(self) -> dict[str, Any]:
        stats = self.site.stats
        return {
            "first_page": self.first_page_s if self.first_page_s is not None else -1.0,
            "partial_publish": stats["seconds"],
            "partial_page_writes": stats["page_writes"],
            "partial_index_writes": stats["index_writes"],
        }


class _RenderBatches:
    """The render queue: concepts of every class, submitted as render tasks in batches of `batch`
    as classes finish."""

    def __init__(
        self,
        info: RunInfo,
        batch: int,
        track: Callable[[Any, str, Any], None],
        limited: tuple[str, ...] = (),
    ):
        self.info, self.batch, self.track = info, batch, track
        self.render = tagged(render_task, limited)
        self.queue: list[tuple[str, int]] = []
        self.left: dict[str, int] = {}  # concepts of a class not rendered yet in this run
        self.failed: set[str] = set()
        self.batches = self.rendered = self.queued = 0
        self.seconds = 0.0

    def add(self, items: list[tuple[str, int]], final: bool, hold: bool = False) -> int:
        """Queue a class's renders; submit full batches (all of them once `final`; none while
        `hold`), the queue ordered by rank across classes (every class's first concept, then
        second, ...). Returns the batches submitted."""
        self.queue = by_rank(self.queue + items)
        self.queued += len(items)
        for slug, _ in items:
            self.left[slug] = self.left.get(slug, 0) + 1
        if hold and not final:
            return 0
        size = self.batch
        if final and self.queue:  # the tail: spread it over the workers rather than one big batch
            size = max(1, min(self.batch, math.ceil(len(self.queue) / _n_workers())))
        submitted = 0
        while len(self.queue) >= size or (final and self.queue):
            chunk, self.queue = self.queue[:size], self.queue[size:]
            with dask.annotate(**_gpu_annotation()):
                fut = self.render.submit(
                    self.info, chunk, render_label(self.batches + submitted + 1, chunk)
                )
            self.track(fut, "render", chunk)
            submitted += 1
        self.batches += submitted
        return submitted

    def done(self, chunk: list[tuple[str, int]], fut: Any, logger: Any) -> list[str]:
        """Count a finished batch; returns the classes whose renders it marked complete."""
        try:
            out = fut.result()
            self.seconds += float(out.get("seconds", 0.0))
            self.rendered += len(chunk)
            for slug, _ in chunk:
                self.left[slug] -= 1
            return list(out.get("marked") or [])
        except Exception as exc:  # a failed batch marks its classes; the run goes on
            err = error_text(exc, self.info.config.storage_options, 500)
            for slug in sorted({s for s, _ in chunk} - self.failed):
                self.failed.add(slug)
                write_status(self.info.store(), slug, "render", "failed", None, err)
                logger.warning("render failed for %s: %s", slug, err)
        return []

    def state(self, slug: str) -> str | None:
        """This run's render state of a class, or None when it had nothing to render here."""
        if slug in self.failed:
            return "failed"
        if slug not in self.left:
            return None
        return "completed" if self.left[slug] == 0 else "pending"


def render_label(number: int, chunk: list[tuple[str, int]], max_classes: int = 3) -> str:
    """The name of a render task run: its number in the run (names never repeat within a flow
    run), how many concepts, and of which classes, e.g. `render 3: 12 concepts of red-disc (8),
    blue-square (4)`."""
    counts: dict[str, int] = {}
    for slug, _ in chunk:
        counts[slug] = counts.get(slug, 0) + 1
    shown = ", ".join(f"{slug} ({n})" for slug, n in list(counts.items())[:max_classes])
    more = f" and {len(counts) - max_classes} more classes" if len(counts) > max_classes else ""
    noun = "concept" if len(chunk) == 1 else "concepts"
    return f"render {number}: {len(chunk)} {noun} of {shown}{more}"


def _explain_classes(
    info: RunInfo,
    cfg: AtlasConfig,
    logger: Any,
    limited: tuple[str, ...] = (),
    runner: LensDaskTaskRunner | None = None,
    live: _LiveSite | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Per-class chains, and the pooled renders submitted as soon as a class has its concepts.

    Class chains first, so that every class's page and any failure surface early: render batches
    are held while more chains are left than workers (docs/performance.md says why a Dask
    priority alone does not do it), and chains carry a higher Dask priority than the batches
    queued with them. `live` publishes pages as chains end and renders are marked."""
    slugs = info.slugs
    t_start = time.perf_counter()
    progress = Progress(info, runner)
    done_q: queue.Queue = queue.Queue()

    def track(fut: Any, kind: str, payload: Any) -> None:
        fut.add_done_callback(lambda f: done_q.put((kind, payload, f)))

    chain = tagged(class_chain_task, limited)
    waited = runner is not None and not runner.ready()
    with dask.annotate(priority=CHAIN_PRIORITY, **_gpu_annotation()):
        for s in slugs:  # each chain gets a RunInfo of its own class: cheap to send and to walk
            track(chain.submit(info.narrowed([s]), s, limited=limited), "class", s)
            if waited:  # the first submission waited for the workers
                waited = False
                progress.workers_ready()
    outcomes: dict[str, dict[str, Any]] = {}
    batches = _RenderBatches(info, cfg.maco.batch_size, track, limited)
    pending = len(slugs)
    t_chains = 0.0
    workers = 0
    while pending:
        try:
            kind, payload, fut = done_q.get(timeout=1.0 if live is not None else None)
        except queue.Empty:  # nothing finished: a held-back index update may be due
            live.flush_if_due()
            continue
        pending -= 1
        if kind == "render":
            marked = batches.done(payload, fut, logger)
            if live is not None:  # a marking alone never makes the first page (see _LiveSite.pages)
                live.pages(marked, ok=False)
        else:
            slug = payload
            try:
                outcomes[slug] = {"ok": True, **fut.result()}
                items = [tuple(x) for x in outcomes[slug].pop("render_items", [])]
            except Exception as err:  # one bad class never sinks the run
                outcomes[slug] = {"ok": False, "error": error_text(err, cfg.storage_options, 500)}
                logger.warning("class %s failed: %s", slug, outcomes[slug]["error"])
                # a class that failed after factorize still renders
                items = pending_items(info, [slug])
            if live is not None:
                live.pages([slug], ok=outcomes[slug]["ok"])
            if len(outcomes) == len(slugs):
                t_chains = time.perf_counter() - t_start
            # renders wait while more chains are left than workers: a batch handed to a worker
            # fills its slot and Dask's queue keeps the chains behind it (chains are root-ish
            # and queued, the first few batches are not), whatever their priority
            workers = workers or _n_workers()
            pending += batches.add(
                items, final=len(outcomes) == len(slugs), hold=len(slugs) - len(outcomes) > workers
            )
            _notify("classes", len(outcomes), len(slugs))
        _notify("concepts", batches.rendered, batches.queued)
        if live is not None:
            live.flush_if_due()
        n_failed = sum(not o["ok"] for o in outcomes.values())
        progress.update(
            len(outcomes),
            n_failed,
            batches.rendered,
            batches.queued,
            force=not pending or (kind != "render" and len(outcomes) == len(slugs)),
            site=live.so_far() if live is not None else None,
        )
    if live is not None:  # its last pages written, the progress gives the link to them
        live.close()
        n_failed = sum(not o["ok"] for o in outcomes.values())
        progress.update(
            len(outcomes), n_failed, batches.rendered, batches.queued, True, live.so_far()
        )
    for slug, out in outcomes.items():
        out["render"] = batches.state(slug)
    timings = {
        "classes_and_renders": time.perf_counter() - t_start,
        "last_chain": t_chains,
        "render_compute": batches.seconds,
        "render_batches": batches.batches,
        "concepts_rendered": batches.rendered,
    }
    return outcomes, timings


def _n_workers() -> int:
    """Workers of the Dask cluster this flow runs on (1 when it cannot tell)."""
    with contextlib.suppress(Exception):
        client = get_run_context().task_runner.client
        return max(1, len(client.scheduler_info(n_workers=-1)["workers"]))
    return 1


def _finish(
    info: RunInfo,
    outcomes: dict[str, dict[str, Any]],
    site: dict[str, Any] | None,
    timings: dict[str, Any],
    t0: float,
    changed: dict[str, Any],
    steps: dict[str, str],
    config_path: str | None = None,
    mistakes: dict[str, Any] | None = None,
) -> Any:
    """Table, site artifact and final state: Completed, PartiallyCompleted (some classes or a
    cross-class step failed: the message says which, first), or Failed (every class failed)."""
    slugs = info.slugs
    t_rows = time.perf_counter()
    rows = class_rows(info, outcomes)
    failed = [r["class"] for r in rows if r["state"] == "failed"]
    why = {
        r["class"]: f"{r['failed at'] or 'class'}: {r['error']}"
        for r in rows
        if r["state"] == "failed"
    }
    headline = f"{len(slugs) - len(failed)}/{len(slugs)} classes explained" + (
        f", {len(failed)} FAILED ({', '.join(failed[:5])}{', ...' if len(failed) > 5 else ''})"
        if failed
        else ""
    )
    step_text = "; ".join(f"{name} step FAILED: {err}" for name, err in steps.items())
    classes_artifact(
        info, rows, f"LENS run {info.run_id}: {headline}" + (f"; {step_text}" if steps else "")
    )
    written = site is not None
    url = site_artifact(info, config_path) if written else None
    timings["summary"] = time.perf_counter() - t_rows
    elapsed = time.perf_counter() - t0
    computed = {
        s: [st for st, r in o.get("stages", {}).items() if not r["skipped"]]
        for s, o in outcomes.items()
    }
    result = {
        "run_id": info.run_id,
        "classes": len(slugs),
        "failed": failed,
        "errors": why,
        "site": run_site_url(info),
        "site_written": written,
        "site_link": url,
        "steps_failed": steps,
        "computed": {s: st for s, st in computed.items() if st},
        "seconds": round(elapsed, 1),
        "published": site or {},
        "changes": {
            "previous": changed.get("previous"),
            "most_changed": [
                r["slug"] for r in changed.get("ranking", [])[: info.config.changes.most_changed]
            ],
        },
        "mistakes": {k: (mistakes or {}).get(k) for k in ("pairs", "mistaken", "skipped")},
        "timings": {k: round(v, 3) if isinstance(v, float) else v for k, v in timings.items()},
    }
    # the run's finished marker (read by the checkpoint watcher): written last, only when whole
    if not failed and not steps and written:
        mark_finished(info, run_site_url(info))
    if len(failed) == len(slugs):
        detail = "; ".join(f"{s} ({why[s]})" for s in failed[:3]) + (
            "; ..." if len(failed) > 3 else ""
        )
        return Failed(
            message=(
                f"every class failed ({len(failed)}/{len(slugs)}), nothing was published: {detail}"
            ),
            data=result,
        )
    tail = (
        "the site was NOT published"
        if not written
        else f"site {url}"
        if info.config.publish_base_url
        else f"site {url} once `lens serve` runs (see the site artifact)"
    )
    if failed or steps:
        detail = "; ".join(f"{s} ({why[s]})" for s in failed[:5])
        parts = [f"PARTIAL: {headline} in {elapsed:.0f} s", detail, step_text, tail]
        return Completed(
            name="PartiallyCompleted", message="; ".join(p for p in parts if p), data=result
        )
    return Completed(message=f"{headline} in {elapsed:.0f} s; {tail}", data=result)
