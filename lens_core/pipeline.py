"""The per-class stages of a LENS run over the run store, usable from a notebook without Prefect.

Each stage reads what earlier stages wrote, writes its outputs, then its completion marker last,
and returns at once (``skipped``) when the marker is already there: a re-run resumes.
``prepare_run`` resolves the classes, the checkpoint digest and the run id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
import traceback
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import wraps
from typing import Any

import numpy as np
import torch

from lens_core import crops as crops_mod
from lens_core.activations import compute_class_activations
from lens_core.config import AtlasConfig, ConfigError, compute_run_id
from lens_core.data import (
    ClassInfo,
    DataError,
    list_classes,
    list_images,
    read_image,
    sample_images,
)
from lens_core.device import pick_device
from lens_core.factorize import nmf, project_nnls
from lens_core.importance import (
    concept_sobol,
    deletion_curve,
    logit_contributions,
    logit_share,
    random_deletion_baseline,
)
from lens_core.models import SplitModel, checkpoint_digest, load_split_model
from lens_core.status import write_status
from lens_core.store import RunStore, join_url, normalize_url

log = logging.getLogger("lens")

CLASS_STAGES = ("activations", "factorize", "importance", "crops")


class StageError(RuntimeError):
    """A stage failed for one class; the message says which and why."""


@dataclass
class RunInfo:
    """Everything a stage needs to find its inputs; small and picklable (sent to Dask workers)."""

    run_id: str
    config: AtlasConfig
    data_url: str
    checkpoint_digest: str
    num_classes: int
    classes: list[ClassInfo]
    all_classes: list[ClassInfo] = field(default_factory=list)  # the data set's, for cross-class links
    _by_slug: dict[str, ClassInfo] = field(default_factory=dict, repr=False)

    def store(self) -> RunStore:
        return RunStore(self.config.store, self.run_id, self.config.storage_options)

    def cls(self, slug: str) -> ClassInfo:
        if not self._by_slug:
            self._by_slug = {c.slug: c for c in self.classes}
        return self._by_slug[slug]

    @property
    def slugs(self) -> list[str]:
        return [c.slug for c in self.classes]

    def narrowed(self, slugs: Iterable[str]) -> RunInfo:
        """The same run restricted to these classes: what a per-class task needs, cheap to send.

        Prefect walks every task parameter (about 25 ms for a RunInfo of 1,000 classes, at
        submission and again on the worker); per-class stages only look up their own class.
        """
        keep = [self.cls(s) for s in slugs]
        return replace(self, classes=keep, all_classes=[], _by_slug={})


# ---- run set-up ---------------------------------------------------------------------------

def resolve_data_url(config: AtlasConfig) -> str:
    """The configured image folder, or the generated toy data set (written once per store)."""
    if config.data.url:
        return normalize_url(config.data.url)
    from lens_core.toy import ensure_toy_dataset

    d = config.data
    url = join_url(normalize_url(config.store), "toy-data", f"c{d.toy_classes}-n{d.toy_images_per_class}-s{d.seed}")
    return ensure_toy_dataset(url, d.toy_classes, d.toy_images_per_class, d.seed, config.storage_options)


def _select(classes: list[ClassInfo], wanted: Iterable[str] | None) -> list[ClassInfo]:
    if not wanted:
        return classes
    wanted = list(wanted)
    keys = {}
    for c in classes:
        for key in (c.id, c.name, c.slug, str(c.index)):
            keys.setdefault(key, c)
    missing = [w for w in wanted if w not in keys]
    if missing:
        known = ", ".join(c.slug for c in classes[:5]) + (", ..." if len(classes) > 5 else "")
        raise ConfigError(f"unknown classes: {', '.join(map(repr, missing[:10]))} "
                          f"(give ids, names, slugs or indices; {len(classes)} classes, e.g. {known})")
    seen, out = set(), []
    for w in wanted:
        c = keys[w]
        if c.slug not in seen:
            seen.add(c.slug)
            out.append(c)
    return sorted(out, key=lambda c: c.index)


def _model_digest(config: AtlasConfig) -> str:
    if config.model.checkpoint:
        return checkpoint_digest(config.model.checkpoint, config.storage_options)
    if config.model.arch == "toy":
        from lens_core.toy import TOY_CHECKPOINT

        return hashlib.sha256(TOY_CHECKPOINT.read_bytes()).hexdigest()
    return f"random-init:{config.model.arch}"


def prepare_run(config: AtlasConfig) -> RunInfo:
    """Resolve data, classes, checkpoint digest and run id; write run.json on first use."""
    data_url = resolve_data_url(config)
    all_classes = list_classes(data_url, config.storage_options, config.data.class_names)
    if not all_classes:
        raise DataError(f"no class folders found under {data_url}")
    classes = _select(all_classes, config.classes)
    digest = _model_digest(config)
    num_classes = config.model.num_classes or len(all_classes)
    run_id = compute_run_id(digest, data_url, config)
    info = RunInfo(run_id, config, data_url, digest, num_classes, classes, all_classes)
    store = info.store()
    meta = store.read_json("run.json")
    if meta is None:
        meta = {
            "run_id": run_id,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "checkpoint": config.model.checkpoint,
            "checkpoint_digest": digest,
            "data_url": data_url,
            "config": config.redacted(),
            "classes": [],
            "versions": {"python": platform.python_version(), "torch": torch.__version__},
        }
    known = {c["slug"] for c in meta["classes"]}
    new = [c for c in all_classes if c.slug not in known and c in classes]
    if new or not store.exists("run.json"):
        meta["classes"] = meta["classes"] + [
            {"index": c.index, "id": c.id, "name": c.name, "slug": c.slug, "synonyms": list(c.synonyms)}
            for c in new
        ]
        store.write_json("run.json", meta)
    store.zarr  # noqa: B018 - create lens.zarr's root here, before workers race to create it
    return info


def check_model(info: RunInfo) -> None:
    """Load the run's model once (CPU, cached in this process) so that a checkpoint that is missing,
    corrupt, hostile or for another architecture fails the run before any class is submitted."""
    get_split(info, "cpu")


# ---- model cache: one per worker process ---------------------------------------------------

_SPLITS: dict[tuple[str, str], SplitModel] = {}


def get_split(info: RunInfo, device: str | torch.device | None = None) -> SplitModel:
    """The run's split model, loaded once per process and device and reused across tasks."""
    dev = pick_device(device)
    key = (info.run_id, str(dev))
    if key not in _SPLITS:
        split = load_split_model(info.config.model, info.num_classes, info.config.storage_options)
        _SPLITS[key] = split.to(dev)
    return _SPLITS[key]


# ---- stage bookkeeping ---------------------------------------------------------------------

def _short_error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:2000]


_STAGE_DONE: dict[str, Callable[[RunStore, str], bool]] = {
    "activations": lambda s, c: s.is_complete(f"acts/{c}"),
    "factorize": lambda s, c: s.is_complete(f"concepts/{c}"),
    "importance": lambda s, c: s.is_complete(f"importance/{c}"),
    "crops": lambda s, c: s.files_complete(f"crops/{c}"),
}


def tracked(stage: str) -> Callable:
    """Time a per-class stage and record running/completed/skipped/failed in its status file."""

    def wrap(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        @wraps(fn)
        def run(info: RunInfo, slug: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
            store = info.store()
            t0 = time.perf_counter()
            try:
                # one writer per (stage, class) across concurrent runs: a second run waits, then reuses
                done = _STAGE_DONE.get(stage, lambda s, c: False)(store, slug)
                with nullcontext() if done else store.lease(f"{stage}/{slug}"):
                    result = fn(info, slug, *args, **kwargs)
            except Exception as err:
                write_status(store, slug, stage, "failed", time.perf_counter() - t0, _short_error(err))
                log.debug("stage %s failed for %s:\n%s", stage, slug, traceback.format_exc())
                raise
            seconds = time.perf_counter() - t0
            state = "skipped" if result.get("skipped") else "completed"
            if state == "completed":
                write_status(store, slug, stage, state, seconds, **result.get("status", {}))
            elif not store.exists(f"status/{slug}/{stage}.json"):
                write_status(store, slug, stage, "completed", None)
            return {"stage": stage, "class": slug, "seconds": seconds, **result}

        return run

    return wrap


def _skipped() -> dict[str, Any]:
    return {"skipped": True}


# ---- per-class stages ----------------------------------------------------------------------

@tracked("activations")
def stage_activations(info: RunInfo, slug: str, device: str | None = None) -> dict[str, Any]:
    """Patches of the class's sampled images -> g -> acts/<class> (A, patches, image arrays)."""
    store, path = info.store(), f"acts/{slug}"
    if store.is_complete(path):
        return _skipped()
    cfg, cls = info.config, info.cls(slug)
    urls = sample_images(
        list_images(info.data_url, cls, cfg.storage_options), cfg.data.images_per_class, cfg.data.seed
    )
    if not urls:
        from lens_core.data import EmptyClassError

        raise EmptyClassError(f"class {cls.name!r} ({cls.id}) has no images")
    split = get_split(info, device)
    group = store.group(path, fresh=True)
    summary = compute_class_activations(
        split, cls.index, urls, group, cfg.patches, cfg.storage_options,
        spatial_images=max(cfg.importance.images, cfg.crops.attribution_images), device=device,
    )
    if summary.n_patches < cfg.concepts.n_concepts:
        raise StageError(
            f"class {cls.name!r}: {summary.n_patches} patches from {summary.n_images} readable images "
            f"is fewer than n_concepts={cfg.concepts.n_concepts}"
        )
    store.mark_complete(path)
    return {"status": {"n_images": summary.n_images, "n_patches": summary.n_patches, "skipped_images": summary.n_skipped}}


@tracked("factorize")
def stage_factorize(info: RunInfo, slug: str, device: str | None = None) -> dict[str, Any]:
    """NMF of the class's patch activations: concepts/<class>/U, W and the reconstruction error."""
    store, path = info.store(), f"concepts/{slug}"
    if store.is_complete(path):
        return _skipped()
    A = store.zarr[f"acts/{slug}/A"][:]
    c = info.config.concepts
    res = nmf(A, c.n_concepts, solver=c.solver, max_iter=c.max_iter, tol=c.tol, seed=c.seed,
              device=pick_device(device))
    group = store.group(path, fresh=True)
    group.create_array("U", data=np.asarray(res.U, dtype=np.float32), overwrite=True)
    group.create_array("W", data=np.asarray(res.W, dtype=np.float32), overwrite=True)
    attrs = {"rel_error": float(res.rel_error), "n_iter": int(res.n_iter), "dead": int(res.dead), "solver": c.solver}
    store.mark_complete(path, **attrs)
    return {"status": attrs}


def _importance_inputs(store: RunStore, slug: str) -> tuple[Any, np.ndarray, np.ndarray]:
    acts = store.zarr[f"acts/{slug}"]
    con = store.zarr[f"concepts/{slug}"]
    return acts, con["U"][:], con["W"][:]


def _class_acts(acts: Any, limit: int) -> torch.Tensor:
    """Activations that h accepts: the stored spatial maps, else pooled whole-image activations."""
    names = set(acts.array_keys())
    data = acts["spatial"][:limit] if "spatial" in names else acts["image_A"][:limit]
    return torch.from_numpy(np.ascontiguousarray(data))


@tracked("importance")
def stage_importance(info: RunInfo, slug: str, device: str | None = None) -> dict[str, Any]:
    """Sobol total indices, logit share, per-image importance and the deletion curve."""
    store, path = info.store(), f"importance/{slug}"
    if store.is_complete(path):
        return _skipped()
    cfg, cls = info.config, info.cls(slug)
    dev = pick_device(device)
    split = get_split(info, dev)
    acts, U, W = _importance_inputs(store, slug)
    k = W.shape[0]
    imp = cfg.importance
    class_acts = _class_acts(acts, imp.images)
    class_U = project_nnls(class_acts.permute(0, 2, 3, 1).reshape(-1, W.shape[1]) if class_acts.ndim == 4
                           else class_acts, W, device=dev)
    sobol = concept_sobol(split.h, class_acts, W, cls.index, n_designs=imp.n_designs, sampler=imp.sampler,
                          batch_size=imp.batch_size, seed=cfg.concepts.seed, device=dev, U=class_U)
    out: dict[str, np.ndarray] = {"sobol": np.asarray(sobol, dtype=np.float32)}
    attrs: dict[str, Any] = {}
    image_A = acts["image_A"][:]
    image_pred = acts["image_pred"][:]
    assigned = np.flatnonzero(image_pred == cls.index)
    if split.head is not None:
        weight, bias = (t.detach().cpu().numpy() for t in split.head)
        A = acts["A"][:]
        contrib = logit_contributions(U, W, A, weight, bias, cls.index)
        share = logit_share(contrib["contributions"], acts["patch_pred"][:] == cls.index,
                            contrib["residual"], contrib["bias"])
        out["logit_share"] = np.asarray(share.concepts, dtype=np.float32)
        attrs.update(share_residual=float(share.residual), share_bias=float(share.bias),
                     predicted_patches=int(share.n_points))
        order = np.argsort(-out["logit_share"], kind="stable")
        direction = W @ weight[cls.index]
    else:
        order = np.argsort(-out["sobol"], kind="stable")
        direction = np.asarray(sobol, dtype=np.float32)
    out["order"] = order.astype(np.int32)
    if len(assigned):
        image_U = np.asarray(project_nnls(image_A[assigned], W), dtype=np.float32)
    else:
        image_U = np.zeros((0, k), np.float32)
    image_importance = image_U * direction[None, :]
    out["image_positions"] = assigned.astype(np.int32)
    out["image_U"] = image_U
    out["image_importance"] = image_importance.astype(np.float32)
    top = image_importance.argmax(1) if len(image_importance) else np.zeros(0, int)
    n_top = np.bincount(top, minlength=k).astype(np.int32)
    out["n_top_images"] = n_top
    curve, auc = deletion_curve(split.h, class_acts, class_U, W, cls.index, order, device=dev)
    random_curve, random_auc = random_deletion_baseline(split.h, class_acts, class_U, W, cls.index,
                                                        seed=cfg.concepts.seed, device=dev)
    out["deletion"] = np.asarray(curve, dtype=np.float32)
    out["deletion_random"] = np.asarray(random_curve, dtype=np.float32)
    attrs.update(deletion_auc=float(auc), deletion_random_auc=float(random_auc),
                 important_min_images=imp.important_min_images, assigned_images=len(assigned))
    group = store.group(path, fresh=True)
    for name, arr in out.items():
        group.create_array(name, data=arr, overwrite=True)
    store.mark_complete(path, **attrs)
    top_c = int(order[0])
    return {"status": {"top_concept": top_c,
                       "top_importance": float(out.get("logit_share", out["sobol"])[top_c]),
                       "deletion_auc": attrs["deletion_auc"]}}


@tracked("crops")
def stage_crops(info: RunInfo, slug: str, device: str | None = None) -> dict[str, Any]:
    """Top crops per concept, attribution maps and thumbnails under crops/<class>/."""
    store, prefix = info.store(), f"crops/{slug}"
    if store.files_complete(prefix):
        return _skipped()
    cfg = info.config
    acts = store.zarr[f"acts/{slug}"]
    U = store.zarr[f"concepts/{slug}/U"][:]
    W = store.zarr[f"concepts/{slug}/W"][:]
    imp = store.zarr[f"importance/{slug}"]
    order = imp["order"][:]
    patches = acts["patches"][:]
    urls: list[str] = list(acts.attrs["image_urls"])
    size = int(acts.attrs["image_size"])
    ext = "webp" if cfg.crops.format == "webp" else "jpg"
    picks = {c: crops_mod.top_patches(U, patches[:, 0], c, cfg.crops.per_concept, cfg.crops.one_per_image)
             for c in range(U.shape[1])}
    thumbs_for = [int(p) for p in imp["image_positions"][:200]]
    attribution_for = list(range(min(cfg.crops.attribution_images, len(urls))))
    needed = sorted({int(patches[i, 0]) for ids in picks.values() for i in ids} | set(thumbs_for) | set(attribution_for))
    images = {pos: read_image(urls[pos], cfg.storage_options, size) for pos in needed}
    index: dict[str, Any] = {"concepts": {}, "thumbs": {}, "attributions": []}
    for c, ids in picks.items():
        names = []
        for j, pid in enumerate(ids):
            name = f"{c}_{j}.{ext}"
            img = crops_mod.crop_box(images[int(patches[pid, 0])], patches[pid, 1:], cfg.crops.size)
            store.write_bytes(f"{prefix}/{name}", crops_mod.encode(img, cfg.crops.format))
            names.append(name)
        index["concepts"][str(c)] = names
    for pos in thumbs_for:
        name = f"img_{pos}.{ext}"
        thumb = crops_mod.to_pil(torch.nn.functional.interpolate(images[pos][None], size=64, mode="bilinear", antialias=True)[0])
        store.write_bytes(f"{prefix}/{name}", crops_mod.encode(thumb, cfg.crops.format))
        index["thumbs"][str(pos)] = name
    if attribution_for and "spatial" in set(acts.array_keys()):
        spatial = acts["spatial"][: len(attribution_for)]
        n, C, h, w = spatial.shape
        flat = spatial.transpose(0, 2, 3, 1).reshape(-1, C)
        coeffs = np.asarray(project_nnls(flat, W)).reshape(n, h, w, -1).transpose(0, 3, 1, 2)
        for i, pos in enumerate(attribution_for):
            name = f"attr_{pos}.{ext}"
            img = crops_mod.attribution_map(images[pos], coeffs[i], order, cfg.crops.size * 2)
            store.write_bytes(f"{prefix}/{name}", crops_mod.encode(img, cfg.crops.format))
            index["attributions"].append({"image": pos, "file": name, "url": urls[pos]})
    store.write_json(f"{prefix}/index.json", index)
    store.mark_files_complete(prefix)
    return {"status": {"crops": sum(len(v) for v in picks.values())}}


def run_class(info: RunInfo, slug: str, device: str | None = None) -> list[dict[str, Any]]:
    """All per-class stages in order (a notebook convenience; the flow runs them as tasks)."""
    return [stage(info, slug, device) for stage in (stage_activations, stage_factorize, stage_importance, stage_crops)]


def class_has_concepts(store: RunStore, slug: str) -> bool:
    return store.is_complete(f"concepts/{slug}")


def classes_done(info: RunInfo) -> dict[str, bool]:
    """{slug: every per-class stage complete}."""
    store = info.store()
    return {
        s: store.is_complete(f"acts/{s}") and store.is_complete(f"concepts/{s}")
        and store.is_complete(f"importance/{s}") and store.files_complete(f"crops/{s}")
        for s in info.slugs
    }


def json_ready(obj: Any) -> Any:
    """numpy scalars/arrays -> plain Python (for JSON files)."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def class_summary(info: RunInfo, slug: str) -> dict[str, Any]:
    """Per-stage states, total seconds and the top concept of one class (from the store)."""
    from lens_core.status import read_status

    store = info.store()
    stages = read_status(store, [slug]).get(slug, {})
    top_concept = top_importance = None
    if store.is_complete(f"importance/{slug}"):
        imp = store.zarr[f"importance/{slug}"]
        order = imp["order"][:]
        scores = imp["logit_share"][:] if "logit_share" in set(imp.array_keys()) else imp["sobol"][:]
        top_concept, top_importance = int(order[0]), round(float(scores[order[0]]), 3)
    return {
        "stages": {s: rec.get("state", "-") for s, rec in stages.items()},
        "seconds": sum(rec.get("seconds") or 0.0 for rec in stages.values()),
        "errors": {s: rec["error"] for s, rec in stages.items() if rec.get("error")},
        "top_concept": top_concept,
        "top_importance": top_importance,
    }
