"""The `build-atlas` flow: fan out per-class chains on Dask, pool MACO renders, aggregate, publish."""

from __future__ import annotations

import os
import time
from typing import Any

import dask
from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed, wait
from prefect.states import Completed, Failed
from prefect_dask import DaskTaskRunner

from lens_core.config import load_config, make_config
from lens_core.pipeline import RunInfo, class_summary, prepare_run
from lens_core.publish import site_url as run_site_url
from lens_core.render import pending_items
from lens_core.status import write_status
from lens_core.store import normalize_url
from tasks.chain import class_chain_task
from tasks.stages import cross_class_task, publish_task, render_task


def make_task_runner(workers: int | None = None, dask_address: str | None = None, gpu: bool | None = None) -> DaskTaskRunner:
    """Dask runner: an existing scheduler, one worker per GPU (dask-cuda), or a LocalCluster."""
    dask_address = dask_address or os.environ.get("LENS_DASK_ADDRESS") or None
    if dask_address:
        return DaskTaskRunner(address=dask_address)
    if gpu is None:
        gpu = os.environ.get("LENS_GPU", "") == "1"
    if gpu:
        return DaskTaskRunner(cluster_class="dask_cuda.LocalCUDACluster",
                              cluster_kwargs={"resources": {"GPU": 1}, "dashboard_address": None})
    n = workers or int(os.environ.get("LENS_WORKERS", "0")) or max(1, min(os.cpu_count() or 1, 4))
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={"n_workers": n, "threads_per_worker": 1, "processes": True, "dashboard_address": None},
    )


def _gpu_annotation(info: RunInfo) -> dict[str, Any]:
    """Pin tensor work to workers that have a GPU when running on a GPU cluster."""
    return {"resources": {"GPU": 1}} if os.environ.get("LENS_GPU", "") == "1" else {}


@flow(name="build-atlas", task_runner=make_task_runner(), log_prints=True, persist_result=False)
def build_atlas(
    config_path: str | None = None,
    config: dict[str, Any] | None = None,
    checkpoint: str | None = None,
    classes: list[str] | None = None,
    store: str | None = None,
    publish: str | None = None,
) -> Any:
    """Explain a classifier class by class and publish the LENS site.

    Args:
        config_path: a TOML AtlasConfig file (local path); empty = the embedded toy default.
        config: inline AtlasConfig fields (nested dict), applied over the file.
        checkpoint: checkpoint URL (local, file:// or s3://) overriding model.checkpoint.
        classes: restrict to these class ids/names/slugs.
        store: run store URL (fsspec), e.g. s3://bucket/lens.
        publish: site URL (fsspec), e.g. s3://bucket/site.
    """
    logger = get_run_logger()
    data: dict[str, Any] = load_config(config_path).model_dump(mode="json") if config_path else {}
    for key, value in (config or {}).items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    if checkpoint:
        data["model"] = {**data.get("model", {}), "checkpoint": checkpoint}
    cfg = make_config(data, classes=classes or None, store=store, publish=publish)
    t0 = time.perf_counter()
    info = prepare_run(cfg)
    slugs = info.slugs
    logger.info("run %s: %d classes, model %s (%s), store %s", info.run_id, len(slugs), cfg.model.arch,
                info.checkpoint_digest[:12], normalize_url(cfg.store))
    progress_id = create_progress_artifact(0.0, key=f"lens-progress-{info.run_id}",
                                           description=f"classes finished in run {info.run_id}")
    with dask.annotate(**_gpu_annotation(info)):
        futures = {class_chain_task.with_options(tags=[f"class:{s}"]).submit(info, s): s for s in slugs}
    outcomes: dict[str, dict[str, Any]] = {}
    render_futures = []
    queue: list[tuple[str, int]] = []
    batch = cfg.maco.batch_size

    def submit_renders(final: bool) -> None:
        while len(queue) >= batch or (final and queue):
            chunk, queue[:] = queue[:batch], queue[batch:]
            label = f"{chunk[0][0]}+{len(chunk) - 1}"
            with dask.annotate(**_gpu_annotation(info)):
                render_futures.append((chunk, render_task.submit(info, chunk, label)))

    for fut in as_completed(list(futures)):
        slug = futures[fut]
        try:
            outcomes[slug] = {"ok": True, **fut.result()}
        except Exception as err:  # one bad class never sinks the run
            outcomes[slug] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:500]}
            logger.warning("class %s failed: %s", slug, outcomes[slug]["error"])
        queue.extend(pending_items(info, [slug]))
        submit_renders(final=False)
        update_progress_artifact(progress_id, 100.0 * len(outcomes) / len(slugs),
                                 description=f"{len(outcomes)}/{len(slugs)} classes finished")
    submit_renders(final=True)
    wait([f for _, f in render_futures])
    store_obj = info.store()
    for chunk, fut in render_futures:
        if fut.state.is_failed():
            err = str(fut.state.message)[:500]
            for slug in sorted({s for s, _ in chunk}):
                write_status(store_obj, slug, "render", "failed", None, err)
                logger.warning("render failed for %s: %s", slug, err)
    cross_class_task.submit(info).result()
    site = publish_task.submit(info, cfg.publish).result()
    elapsed = time.perf_counter() - t0

    rows = []
    for slug in slugs:
        summary = class_summary(info, slug)
        out = outcomes[slug]
        rows.append({"class": slug, "status": "ok" if out["ok"] else "failed",
                     **{s: summary["stages"].get(s, "-") for s in ("activations", "factorize", "importance", "crops", "render")},
                     "seconds": round(summary["seconds"], 2), "top_concept": summary["top_concept"],
                     "importance": summary["top_importance"], "error": out.get("error") or ""})
    create_table_artifact(rows, key=f"lens-classes-{info.run_id}", description=f"LENS run {info.run_id}: per-class status")
    site_url = run_site_url(info)
    create_link_artifact(site_url + "/index.html", link_text="LENS atlas site", key=f"lens-site-{info.run_id}")
    failed = [r["class"] for r in rows if r["status"] != "ok"]
    computed = {s: [st for st, r in o.get("stages", {}).items() if not r["skipped"]] for s, o in outcomes.items()}
    result = {"run_id": info.run_id, "classes": len(slugs), "failed": failed, "site": site_url,
              "computed": {s: st for s, st in computed.items() if st},
              "seconds": round(elapsed, 1), "published": site}
    # the run's finished marker (read by the checkpoint watcher): written last, only when whole
    if not failed:
        store_obj.write_json("finished.json", {"run_id": info.run_id, "classes": len(slugs), "site": site_url,
                                               "checkpoint_digest": info.checkpoint_digest})
    message = f"{len(slugs) - len(failed)}/{len(slugs)} classes explained in {elapsed:.0f} s; site {site_url}"
    if failed and len(failed) == len(slugs):
        return Failed(message="every class failed: " + "; ".join(outcomes[s]["error"] for s in failed[:3]), data=result)
    if failed:
        return Completed(name="PartiallyCompleted", message=message + f"; failed: {', '.join(failed[:20])}", data=result)
    return Completed(message=message, data=result)
