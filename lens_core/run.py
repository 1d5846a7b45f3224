"""Run set-up: the data, the classes with their label indices, the checkpoint digest, the run id.

``prepare_run`` is called once per run in the flow process (or a notebook); it loads the model
once (a checkpoint that is missing, corrupt, hostile or for another architecture fails here,
before any class is submitted) and checks that the class folders match the model's outputs.
"""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, NamedTuple

import torch

from lens_core import layout
from lens_core.config import AtlasConfig, ConfigError
from lens_core.data import (
    ClassIndex,
    ClassInfo,
    DataError,
    class_keys,
    list_classes,
    read_class_index,
)
from lens_core.extract import SignedLayerError, choose_method
from lens_core.identity import compute_run_id, planned_data_url, toy_data_url
from lens_core.lineage import find_run, lineage_key
from lens_core.model_cache import remember
from lens_core.models import ModelError, SplitModel, checkpoint_digest, load_split_model
from lens_core.store import RunStore


@dataclass
class RunInfo:
    """Everything a stage needs to find its inputs; small and picklable (sent to Dask workers)."""

    run_id: str
    config: AtlasConfig
    data_url: str
    checkpoint_digest: str
    num_classes: int  # the model's outputs
    classes: list[ClassInfo]
    # the data set's, for cross-class links
    all_classes: list[ClassInfo] = field(default_factory=list)
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

        Prefect walks every task parameter (at submission and again on the worker, which is costly
        for a RunInfo of 1,000 classes); per-class stages only look up their own class.
        """
        keep = [self.cls(s) for s in slugs]
        return replace(self, classes=keep, all_classes=[], _by_slug={})


def resolve_data_url(config: AtlasConfig) -> str:
    """The configured image folder, or the generated toy data set (written once per store)."""
    url = planned_data_url(config)
    if config.data.url:
        return url
    from lens_core.toy import ensure_toy_dataset

    d = config.data
    root = toy_data_url(config.store, d.toy_classes, d.toy_images_per_class, d.seed)
    made = ensure_toy_dataset(
        root, d.toy_classes, d.toy_images_per_class, d.seed, config.storage_options
    )
    if made != url:  # the watcher computes run ids from planned_data_url: they must agree
        raise RuntimeError(f"toy data set written at {made}, planned at {url}")
    return url


def select_classes(classes: list[ClassInfo], wanted: Iterable[str] | None) -> list[ClassInfo]:
    """The classes named by id, name, slug or label index (all when `wanted` is empty), in label
    order."""
    if not wanted:
        return classes
    wanted = list(wanted)
    keys = class_keys(classes)
    missing = [w for w in wanted if w not in keys]
    if missing:
        known = ", ".join(c.slug for c in classes[:5]) + (", ..." if len(classes) > 5 else "")
        raise ConfigError(
            f"unknown classes: {', '.join(map(repr, missing[:10]))} "
            f"(give ids, names, slugs or indices; {len(classes)} classes, e.g. {known})"
        )
    seen, out = set(), []
    for w in wanted:
        c = keys[w]
        if c.slug not in seen:
            seen.add(c.slug)
            out.append(c)
    return sorted(out, key=lambda c: c.index)


def model_digest(config: AtlasConfig) -> str:
    """sha256 of the checkpoint (the shipped toy weights by default), or a random-init tag."""
    if config.model.checkpoint:
        return checkpoint_digest(config.model.checkpoint, config.storage_options)
    if config.model.arch == "toy":
        from lens_core.toy import TOY_CHECKPOINT

        return hashlib.sha256(TOY_CHECKPOINT.read_bytes()).hexdigest()
    return f"random-init:{config.model.arch}"


def _toy_index(config: AtlasConfig) -> ClassIndex | None:
    """The generated toy data's class index: folder i holds the toy's class i, whatever the
    count."""
    if config.data.url:
        return None
    from lens_core.toy import class_names

    return ClassIndex(
        {name: i for i, name in enumerate(class_names(config.data.toy_classes))}, url="the toy data"
    )


def check_label_set(info: RunInfo, class_index: ClassIndex | None, outputs: int) -> None:
    """The model's number of outputs checked against the class folders; ConfigError on mismatch.

    Without a class index the label index is the sorted folder position, which is right only when
    the folders are exactly the model's label set: any other count is refused, never guessed.
    """
    n = len(info.all_classes)
    if class_index is None and outputs != n:
        raise ConfigError(
            f"the model has {outputs} outputs but {info.data_url} has {n} class folders, so the "
            "label index of each folder cannot be its sorted position: set data.class_index to a "
            'JSON file mapping each class folder to its label index ({"<class dir>": <index>}, or '
            "a list of class dirs in label order)"
        )
    beyond = [c for c in info.all_classes if c.index >= outputs]
    if beyond:
        shown = ", ".join(f"{c.id}={c.index}" for c in beyond[:5])
        raise ConfigError(
            f"data.class_index gives label indices beyond the model's {outputs} outputs: {shown}"
        )


def resolve_concept_method(config: AtlasConfig, split: SplitModel) -> AtlasConfig:
    """The config with concepts.method decided for the split layer, once per run.

    The decision reads the set-up probe (g on a fixed, seeded test batch, so it is reproducible)
    with the factorization's own tolerance rule: 'auto' becomes 'nmf' on a non-negative layer and
    'semi-nmf' on a signed one. The run id is computed from the setting as given ('auto'), which,
    with the checkpoint and the layer it hashes, determines the method; run.json's config and every
    stage see the method chosen. ModelError for 'nmf' on a signed layer, before any class runs.
    """
    concepts = config.concepts
    try:
        method = choose_method(concepts.method, split.min_activation, split.max_activation)
    except SignedLayerError as err:
        raise ModelError(f"layer {split.layer!r} {err}") from None
    if method == "semi-nmf" and concepts.solver != "torch":
        raise ConfigError(
            f"layer {split.layer!r} gives negative activations, so concepts are found by "
            f"semi-NMF, which has the 'torch' solver only: set concepts.solver = 'torch' "
            f"(not {concepts.solver!r})"
        )
    if method == concepts.method:
        return config
    return config.model_copy(update={"concepts": concepts.model_copy(update={"method": method})})


def _class_record(c: ClassInfo) -> dict[str, Any]:
    return {
        "index": c.index,
        "id": c.id,
        "name": c.name,
        "slug": c.slug,
        "synonyms": list(c.synonyms),
    }


class _Plan(NamedTuple):
    """What a run's classes are, before any model is loaded."""

    data_url: str
    class_index: ClassIndex | None
    all_classes: list[ClassInfo]
    classes: list[ClassInfo]  # the selected ones
    provisional: int  # the number of outputs the checkpoint should have


def _plan(config: AtlasConfig) -> _Plan:
    """The data URL, class index, every class, the selected ones and the provisional outputs."""
    data_url = resolve_data_url(config)
    so = config.storage_options
    class_index = (
        read_class_index(config.data.class_index, so)
        if config.data.class_index
        else _toy_index(config)
    )
    all_classes = list_classes(data_url, so, config.data.class_names, class_index)
    if not all_classes:
        raise DataError(f"no class folders found under {data_url}")
    classes = select_classes(all_classes, config.classes)
    provisional = config.model.num_classes or max(c.index for c in all_classes) + 1
    return _Plan(data_url, class_index, all_classes, classes, provisional)


def _run_info(config: AtlasConfig, plan: _Plan, digest: str) -> RunInfo:
    run_id = compute_run_id(digest, plan.data_url, config)
    return RunInfo(
        run_id,
        config,
        plan.data_url,
        digest,
        plan.provisional,
        plan.classes,
        plan.all_classes,
    )


def planned_info(config: AtlasConfig) -> RunInfo:
    """The RunInfo `prepare_run` would build, without loading the model or writing run.json (the
    checkpoint is hashed, not loaded; num_classes stays provisional)."""
    return _run_info(config, _plan(config), model_digest(config))


def prepare_run(config: AtlasConfig) -> RunInfo:
    """Resolve data, classes, checkpoint digest and run id; load and check the model (once);
    write run.json."""
    _check_previous_run(config)
    plan = _plan(config)
    # the checkpoint is read, hashed and checked once: its digest (the run id's input) comes with it
    split = load_split_model(config.model, plan.provisional, config.storage_options)
    info = _run_info(config, plan, split.digest)
    split = remember(info, "cpu", split)  # this process's stages use it from the cache
    info.config = resolve_concept_method(info.config, split)
    check_label_set(info, plan.class_index, split.num_classes)
    info.num_classes = split.num_classes
    _record_run(info)
    return info


def _record_run(info: RunInfo) -> None:
    """Write run.json on first use, and keep its class records current (a slug's class may change).

    Several processes of one run (`lens run --classes a`, `--classes b`, ...) record their classes
    at once: one `RunStore.update_json` (S3 conditional put, a file lock on disk) merges each
    process's classes into what is stored, so none is lost.
    """
    store = info.store()
    config = info.config
    current = {c.slug: _class_record(c) for c in info.classes}

    def merge(meta: dict[str, Any] | None) -> dict[str, Any]:
        if not isinstance(meta, dict):
            meta = {
                "run_id": info.run_id,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "checkpoint": config.model.checkpoint,
                "checkpoint_digest": info.checkpoint_digest,
                "data_url": info.data_url,
                "config": config.redacted(),
                "classes": [],
                "versions": {"python": platform.python_version(), "torch": torch.__version__},
            }
        if "lineage" not in meta:  # run.json written before runs had a lineage
            meta["lineage"] = lineage_key(info.data_url, config)
        merged = {**{c["slug"]: c for c in meta.get("classes", [])}, **current}
        meta["classes"] = sorted(merged.values(), key=lambda c: (c["index"], c["slug"]))
        return meta

    store.update_json(layout.RUN_JSON, merge)
    store.zarr  # noqa: B018 - create lens.zarr's root here, before workers race to create it


def _check_previous_run(config: AtlasConfig) -> None:
    """`changes.previous_run` must name a run of the store: refused at set-up, before any class
    is computed (else the comparison fails after every class's work)."""
    wanted = config.changes.previous_run
    if not wanted:
        return
    try:
        find_run(config.store, wanted, config.storage_options)
    except ValueError as err:
        raise ConfigError(
            f"changes.previous_run: {err} (give the id of a run in this store, or leave "
            "it unset to compare with the latest finished run of the same data and method)"
        ) from None


def mark_finished(info: RunInfo, site: str) -> None:
    """Record that every class of the run succeeded (what the checkpoint watcher and the changes of
    later runs look for): finished.json, written last."""
    info.store().write_json(
        layout.FINISHED,
        {
            "run_id": info.run_id,
            "classes": len(info.slugs),
            "site": site,
            "checkpoint_digest": info.checkpoint_digest,
        },
    )
