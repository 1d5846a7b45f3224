"""The four per-class stages over the run store: activations, factorize, importance, crops.

Each is a `Stage` (lens_core.tracking): what it is computed from, and its body. The body writes
its outputs, then its completion marker last (recording the class fingerprint), so a re-run skips
what is done and recomputes what was computed for another class or another image sample.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lens_core import crops as crops_mod
from lens_core import layout
from lens_core.activations import compute_class_activations
from lens_core.data import ClassInfo, EmptyClassError, list_images, read_image, sample_images
from lens_core.device import pick_device
from lens_core.extract import make_extractor
from lens_core.identity import class_inputs
from lens_core.importance import (
    concept_sobol,
    deletion_curve,
    logit_contributions,
    logit_share,
    random_deletion_baseline,
    rank_concepts,
)
from lens_core.model_cache import get_split
from lens_core.models import SplitModel
from lens_core.results import complete_fingerprint
from lens_core.run import RunInfo
from lens_core.store import RunStore
from lens_core.tracking import (
    Inputs,
    Stage,
    StageError,
    StageOutput,
    StageResult,
    mark,
    run_stage,
    upstream_inputs,
)

# ---- activations ------------------------------------------------------------------------------


def _activation_inputs(info: RunInfo, slug: str) -> Inputs:
    """The class dir, its label index and the sampled images (listing the class folder)."""
    cfg, cls = info.config, info.cls(slug)
    urls = sample_images(
        list_images(info.data_url, cls, cfg.storage_options),
        cfg.data.images_per_class,
        cfg.data.seed,
    )
    return {**class_inputs(cls.id, cls.index, urls), "urls": urls}


def _record(inputs: Inputs) -> dict[str, Any]:
    """What a marker keeps of the inputs: the fingerprint and what it is made of, not the URLs."""
    return {k: v for k, v in inputs.items() if k not in ("urls", "fingerprint")}


def _activations(info: RunInfo, slug: str, inputs: Inputs, device: str | None) -> StageOutput:
    """Patches of the class's sampled images -> g -> acts/<class> (A, patches, image arrays)."""
    store, cfg, cls = info.store(), info.config, info.cls(slug)
    urls = inputs["urls"]
    if not urls:
        raise EmptyClassError(f"class {cls.name!r} ({cls.id}) has no images")
    split = get_split(info, device)
    group = store.group(layout.acts(slug), fresh=True)
    summary = compute_class_activations(
        split,
        cls.index,
        urls,
        group,
        cfg.patches,
        cfg.storage_options,
        spatial_images=max(cfg.importance.images, cfg.crops.attribution_images),
        device=device,
        precision=cfg.model.precision,
    )
    if summary.n_patches < cfg.concepts.n_concepts:
        raise StageError(
            f"class {cls.name!r}: {summary.n_patches} patches from {summary.n_images} "
            "readable images "
            f"is fewer than n_concepts={cfg.concepts.n_concepts}"
        )
    mark(store, "activations", slug, inputs, **_record(inputs))
    return {
        "status": {
            "n_images": summary.n_images,
            "n_patches": summary.n_patches,
            "skipped_images": summary.n_skipped,
        }
    }


ACTIVATIONS = Stage("activations", _activation_inputs, _activations)


# ---- factorize --------------------------------------------------------------------------------


def _factorize(info: RunInfo, slug: str, inputs: Inputs, device: str | None) -> StageOutput:
    """Concepts of the class's patch activations: concepts/<class>/U, W and the fit's error."""
    store = info.store()
    A = store.zarr[layout.acts(slug)]["A"][:]
    fit = make_extractor(info.config.concepts).fit(A, device=pick_device(device))
    # renders of earlier concepts of this slug are not these concepts'
    store.remove(layout.viz(slug))
    group = store.group(layout.concepts(slug), fresh=True)
    group.create_array("U", data=fit.U, overwrite=True)
    group.create_array("W", data=fit.W, overwrite=True)
    mark(store, "factorize", slug, inputs, **fit.attrs)
    return {"status": fit.attrs}


FACTORIZE = Stage("factorize", upstream_inputs, _factorize)


# ---- importance -------------------------------------------------------------------------------


def _class_acts(acts: Any, limit: int) -> torch.Tensor:
    """Activations that h accepts: the stored spatial maps, else pooled whole-image activations."""
    names = set(acts.array_keys())
    data = acts["spatial"][:limit] if "spatial" in names else acts["image_A"][:limit]
    return torch.from_numpy(np.ascontiguousarray(data))


def _class_extra(acts: Any, limit: int) -> torch.Tensor | None:
    """A token model's class/register tokens of the stored spatial maps (None for other models)."""
    if "spatial_extra" not in set(acts.array_keys()):
        return None
    return torch.from_numpy(np.ascontiguousarray(acts["spatial_extra"][:limit]))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C) in (image, y, x) order; (N, C) unchanged."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) if x.ndim == 4 else x


def _percent(scores: np.ndarray) -> np.ndarray:
    """Scores as percent of their (positive) total: what the page shows without a logit share."""
    total = float(np.clip(scores, 0, None).sum())
    return (100.0 * scores / total if total > 0 else np.zeros_like(scores)).astype(np.float32)


def _share_or_reason(
    info: RunInfo, split: SplitModel, acts: Any, cls: ClassInfo, image_U: np.ndarray, W: np.ndarray
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Each concept's percent share of the class logit summed over the images the model assigns to
    the class (Lens's points), or None with the reason it is not defined.

    An image's coefficients ū are those of its pooled activation (image_U), so that
    logit_c(x) = sum_k ū_k (W_k . w_c) + residual(x) + bias exactly for a pooled-linear head; for
    a head that normalizes the pooled activation first (NormHead), each image's terms are scaled by
    its normalization scale s(x), which keeps the split exact.
    """
    linear = _linear_head(split, acts["image_A"][:])
    if linear is None:
        return None, {"basis_reason": "no-linear-head"}
    weight, bias, scale = linear
    contrib = logit_contributions(
        image_U * scale[:, None], W, acts["image_A"][:] * scale[:, None], weight, bias, cls.index
    )
    share = logit_share(
        contrib["contributions"],
        acts["image_pred"][:] == cls.index,
        contrib["residual"],
        contrib["bias"],
    )
    if share.n_points < info.config.importance.min_share_images:
        return None, {"basis_reason": "few-predicted"}
    if share.denominator <= 0:
        return None, {"basis_reason": "non-positive-logit"}
    extra = {"share_head": "normalized-linear"} if split.head is None else {}
    return np.asarray(share.concepts, np.float32), {
        "share_residual": float(share.residual),
        "share_bias": float(share.bias),
        "share_images": int(share.n_points),
        **extra,
    }


def _linear_head(
    split: SplitModel, pooled: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(weight, bias, per-image scale) with logits = scale * (pooled @ weight.T) + bias, exactly:
    scale 1 for a pooled-linear head, the normalization's 1/std for a NormHead; None otherwise."""
    if split.head is not None:
        weight, bias = (t.detach().cpu().float().numpy() for t in split.head)
        return weight, bias, np.ones(len(pooled), np.float32)
    norm = getattr(split, "norm_head", None)
    if norm is None:
        return None
    return (
        norm.weight.numpy(),
        norm.bias.numpy(),
        np.asarray(norm.scale(np.asarray(pooled, np.float64)), np.float32),
    )


def _importance(info: RunInfo, slug: str, inputs: Inputs, device: str | None) -> StageOutput:
    """Sobol total indices, logit share (or why not), per-image importance and the deletion
    curve."""
    store, cfg, cls = info.store(), info.config, info.cls(slug)
    dev = pick_device(device)
    split = get_split(info, dev)
    acts = store.zarr[layout.acts(slug)]
    con = store.zarr[layout.concepts(slug)]
    W = con["W"][:]
    k = W.shape[0]
    imp = cfg.importance
    extractor = make_extractor(cfg.concepts)
    class_acts = _class_acts(acts, imp.images)
    extra = _class_extra(acts, imp.images)
    class_U = extractor.encode(_rows(class_acts), W, device=dev)
    sobol = np.asarray(
        concept_sobol(
            split.h,
            class_acts,
            W,
            cls.index,
            n_designs=imp.n_designs,
            sampler=imp.sampler,
            batch_size=imp.batch_size,
            seed=cfg.concepts.seed,
            device=dev,
            U=class_U,
            precision=cfg.model.precision,
            extra=extra,
        ),
        np.float32,
    )
    image_pred, patch_pred = acts["image_pred"][:], acts["patch_pred"][:]
    counts = {
        "assigned_images": int((image_pred == cls.index).sum()),
        "n_images": int(len(image_pred)),
        "assigned_patches": int((patch_pred == cls.index).sum()),
        "n_patches": int(len(patch_pred)),
    }
    image_A = acts["image_A"][:]
    image_U = np.asarray(extractor.encode(image_A, W, device=dev), np.float32)
    share, why = _share_or_reason(info, split, acts, cls, image_U, W)
    out: dict[str, np.ndarray] = {"sobol": sobol, "sobol_share": _percent(sobol)}
    if share is not None:
        out["logit_share"] = share
    basis = "logit_share" if share is not None else "sobol"
    order = rank_concepts(share if share is not None else sobol)
    out["order"] = order.astype(np.int32)
    linear = _linear_head(split, image_A)
    if linear is not None:  # each image's exact logit terms (times its normalization scale, if any)
        direction = W @ linear[0][cls.index]
        per_image = image_U * linear[2][:, None]
    else:
        direction, per_image = sobol, image_U
    assigned = np.flatnonzero(image_pred == cls.index)
    image_importance = (per_image[assigned] * direction[None, :]).astype(np.float32)
    out["image_positions"] = assigned.astype(np.int32)
    out["image_U"] = image_U[assigned]
    out["image_importance"] = image_importance
    top = image_importance.argmax(1) if len(image_importance) else np.zeros(0, int)
    out["n_top_images"] = np.bincount(top, minlength=k).astype(np.int32)
    curve, auc = deletion_curve(
        split.h,
        class_acts,
        class_U,
        W,
        cls.index,
        order,
        device=dev,
        precision=cfg.model.precision,
        extra=extra,
    )
    random_curve, random_auc = random_deletion_baseline(
        split.h,
        class_acts,
        class_U,
        W,
        cls.index,
        seed=cfg.concepts.seed,
        device=dev,
        precision=cfg.model.precision,
        extra=extra,
    )
    out["deletion"] = np.asarray(curve, dtype=np.float32)
    out["deletion_random"] = np.asarray(random_curve, dtype=np.float32)
    note = basis_note(why.get("basis_reason"), counts) or (
        NORMALIZED_NOTE if why.get("share_head") == "normalized-linear" else ""
    )
    attrs = {
        **counts,
        **why,
        "importance_basis": basis,
        "note": note,
        "deletion_auc": float(auc),
        "deletion_random_auc": float(random_auc),
        "important_min_images": imp.important_min_images,
    }
    group = store.group(layout.importance(slug), fresh=True)
    for name, arr in out.items():
        group.create_array(name, data=arr, overwrite=True)
    mark(store, "importance", slug, inputs, **attrs)
    scores = out.get("logit_share", out["sobol_share"])
    top_c = int(order[0])
    return {
        "status": {
            "top_concept": top_c,
            "top_importance": round(float(scores[top_c]), 3),
            "importance_basis": basis,
            "deletion_auc": float(auc),
            "note": note,
            **counts,
        }
    }


NORMALIZED_NOTE = (
    "the model's head normalizes the pooled activation (LayerNorm) before its "
    "linear layer: each image's terms are taken at its own normalization scale, so "
    "shares, residual and bias still add up to the class logit exactly"
)


def basis_note(reason: str | None, counts: dict[str, int]) -> str:
    """One line on why a class's percentages are Sobol-based (empty when they are logit shares)."""
    if reason is None:
        return ""
    if reason == "no-linear-head":
        return (
            "the model's head is not a linear map of the pooled activations at this layer, so the "
            "logit cannot be split exactly across concepts: percentages are shares of the summed "
            "Sobol total indices"
        )
    seen = (
        f"the model classifies {counts['assigned_images']} of {counts['n_images']} images "
        f"of this class as the class"
    )
    if reason == "few-predicted":
        return (
            f"rarely predicted: {seen}, too few to define the share of its logit; concepts are "
            "ranked by Sobol importance instead"
        )
    return (
        f"{seen}, and their summed class logit is not positive: "
        "concepts are ranked by Sobol importance"
    )


IMPORTANCE = Stage("importance", upstream_inputs, _importance)


# ---- crops ------------------------------------------------------------------------------------


def _crops(info: RunInfo, slug: str, inputs: Inputs, _device: str | None) -> StageOutput:
    """Top crops per concept, thumbnails, attribution overlays and their plain images under
    crops/<class>/."""
    store, cfg = info.store(), info.config
    store.remove(layout.crops(slug))  # files of an earlier computation of this slug
    acts = store.zarr[layout.acts(slug)]
    U = store.zarr[layout.concepts(slug)]["U"][:]
    W = store.zarr[layout.concepts(slug)]["W"][:]
    imp = store.zarr[layout.importance(slug)]
    order = imp["order"][:]
    patches = acts["patches"][:]
    urls: list[str] = list(acts.attrs["image_urls"])
    size = int(acts.attrs["image_size"])
    ext = "webp" if cfg.crops.format == "webp" else "jpg"
    picks = {
        c: crops_mod.top_patches(
            U, patches[:, 0], c, cfg.crops.per_concept, cfg.crops.one_per_image
        )
        for c in range(U.shape[1])
    }
    thumbs_for = [int(p) for p in imp["image_positions"][:200]]
    attribution_for = list(range(min(cfg.crops.attribution_images, len(urls))))
    needed = sorted(
        {int(patches[i, 0]) for ids in picks.values() for i in ids}
        | set(thumbs_for)
        | set(attribution_for)
    )
    images = {pos: read_image(urls[pos], cfg.storage_options, size) for pos in needed}
    index: dict[str, Any] = {"concepts": {}, "thumbs": {}, "attributions": []}

    def put(name: str, img: Any) -> str:
        store.write_bytes(layout.crop_file(slug, name), crops_mod.encode(img, cfg.crops.format))
        return name

    for c, ids in picks.items():
        index["concepts"][str(c)] = [
            put(
                f"{c}_{j}.{ext}",
                crops_mod.crop_box(images[int(patches[pid, 0])], patches[pid, 1:], cfg.crops.size),
            )
            for j, pid in enumerate(ids)
        ]
    for pos in thumbs_for:
        index["thumbs"][str(pos)] = put(f"img_{pos}.{ext}", crops_mod.thumbnail(images[pos], 64))
    if attribution_for and "spatial" in set(acts.array_keys()):
        spatial = acts["spatial"][: len(attribution_for)]
        n, C, h, w = spatial.shape
        coeffs = np.asarray(
            make_extractor(cfg.concepts).encode(spatial.transpose(0, 2, 3, 1).reshape(-1, C), W)
        )
        coeffs = coeffs.reshape(n, h, w, -1).transpose(0, 3, 1, 2)
        side = cfg.crops.size * 2
        for i, pos in enumerate(attribution_for):
            overlay = crops_mod.attribution_map(images[pos], coeffs[i], order, side)
            index["attributions"].append(
                {
                    "image": pos,
                    "url": urls[pos],
                    "file": put(f"attr_{pos}.{ext}", overlay),
                    "plain": put(f"plain_{pos}.{ext}", crops_mod.thumbnail(images[pos], side)),
                    "concepts": crops_mod.dominant_concepts(coeffs[i], order),
                }
            )
    store.write_json(layout.crops_index(slug), index)
    mark(store, "crops", slug, inputs)
    return {"status": {"crops": sum(len(v) for v in picks.values())}}


CROPS = Stage("crops", upstream_inputs, _crops)

CHAIN: tuple[Stage, ...] = (ACTIVATIONS, FACTORIZE, IMPORTANCE, CROPS)  # a class's stages, in order


def stage_activations(info: RunInfo, slug: str, device: str | None = None) -> StageResult:
    return run_stage(ACTIVATIONS, info, slug, device)


def stage_factorize(info: RunInfo, slug: str, device: str | None = None) -> StageResult:
    return run_stage(FACTORIZE, info, slug, device)


def stage_importance(info: RunInfo, slug: str, device: str | None = None) -> StageResult:
    return run_stage(IMPORTANCE, info, slug, device)


def stage_crops(info: RunInfo, slug: str, device: str | None = None) -> StageResult:
    return run_stage(CROPS, info, slug, device)


def run_class(info: RunInfo, slug: str, device: str | None = None) -> list[StageResult]:
    """All per-class stages in order (a notebook convenience; the flow runs them as tasks)."""
    return [run_stage(stage, info, slug, device) for stage in CHAIN]


def class_complete(store: RunStore, slug: str) -> bool:
    """Every per-class stage is complete for the class's current activations."""
    return complete_fingerprint(store, slug, *(s.name for s in CHAIN)) is not None
