"""Mistakes explained by concepts: why the model assigns images of one class to another.

For every pair (true class t, predicted class p != t), over the sampled images of t that the model
assigns to p: how many, and which of **p's** concepts carried the mistaken logit. Each image is
coded on p's dictionary (ū of its pooled activation, as for p's own importance) and, for a
pooled-linear head, logit_p(x) = sum_k ū_k(x) (W_p,k . w_p) + residual(x) + b_p exactly; a
concept's share is its terms summed over the pair's images divided by their summed logit_p.
Other heads use Sobol total indices of p's concepts for logit_p over the images' spatial maps
(their share of the summed indices), with a note, as the class pages do.

A concept of p that carries the largest part of the mistaken logit for images of several other
classes is a *bias candidate*. The step runs once per run over every class's stored results,
and writes `atlas/confusions.json` last (with what it was computed from, so a re-run skips it).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lens_core import crops as crops_mod
from lens_core import layout
from lens_core.data import read_image
from lens_core.device import pick_device
from lens_core.extract import make_extractor
from lens_core.identity import short_hash
from lens_core.importance import concept_sobol, logit_contributions, logit_share
from lens_core.model_cache import get_split
from lens_core.models import SplitModel
from lens_core.results import complete_fingerprint, read_result
from lens_core.run import RunInfo
from lens_core.store import RunStore
from lens_core.tokens import extra_tokens

SOBOL_NOTE = (
    "the model's head is not a linear map of the pooled activations at this layer: "
    "percentages are shares of the summed Sobol total indices of the predicted class's "
    "concepts over these images"
)


@dataclass
class ClassImages:
    """What one class's stored results say about its images: predictions and pooled activations."""

    slug: str
    index: int
    name: str
    urls: list[str]
    pred: np.ndarray  # (n,) predicted label index of each sampled image
    pooled: Any  # lazily read (n, C) pooled activations (a Zarr array)


@dataclass
class Dictionary:
    """A class's concepts: W (k, C) and their order on its page (colours follow the rank)."""

    W: np.ndarray
    order: np.ndarray


def read_classes(info: RunInfo) -> tuple[dict[str, ClassImages], dict[int, str], dict[str, str]]:
    """Classes with finished importance: their images, {label index: slug}, {slug: fingerprint}."""
    store = info.store()
    images, by_index, prints = {}, {}, {}
    for cls in info.classes:
        fp = complete_fingerprint(store, cls.slug, "factorize", "importance")
        if fp is None:
            continue
        acts = store.zarr[layout.acts(cls.slug)]
        images[cls.slug] = ClassImages(
            cls.slug,
            cls.index,
            cls.name,
            list(acts.attrs["image_urls"]),
            np.asarray(acts["image_pred"][:]),
            acts["image_A"],
        )
        by_index[cls.index] = cls.slug
        prints[cls.slug] = fp
    return images, by_index, prints


def pair_split(
    U: np.ndarray,
    W: np.ndarray,
    pooled: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    predicted: int,
) -> dict[str, Any]:
    """The exact split of logit_predicted over the pair's images: shares (percent) of each concept,
    the residual and the bias, and each image's top concept (its largest term)."""
    parts = logit_contributions(U, W, pooled, weight, bias, predicted)
    share = logit_share(
        parts["contributions"], np.ones(len(U), bool), parts["residual"], parts["bias"]
    )
    return {
        "shares": share.concepts,
        "residual": share.residual,
        "bias": share.bias,
        "logit": share.denominator,
        "top": parts["contributions"].argmax(1),
        "terms": parts["contributions"],
    }


def _images_at(info: RunInfo, urls: list[str], size: int) -> torch.Tensor:
    return torch.stack([read_image(u, info.config.storage_options, size) for u in urls])


def _spatial(split: SplitModel, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """g of whole images, resized to the model input exactly as the activations stage does."""
    return _spatial_extra(split, images, device)[0]


def _spatial_extra(
    split: SplitModel, images: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(g's maps, a token model's class tokens set aside for them, which its h needs, or None)."""
    x = F.interpolate(
        images, size=split.input_size, mode="bilinear", antialias=True, align_corners=False
    ).to(device)
    with torch.inference_mode():
        m = split.g(x)
        extra = extra_tokens(split.g, m)
        return m.float().cpu(), None if extra is None else extra.float().cpu()


def _percent(scores: np.ndarray) -> np.ndarray:
    total = float(np.clip(scores, 0, None).sum())
    return 100.0 * scores / total if total > 0 else np.zeros_like(scores)


def concept_label(labels: dict[str, Any], slug: str, concept: int) -> str | None:
    """The label people gave a concept now (read at display time: labels change after a run)."""
    entry = labels.get(slug, {}).get(str(concept))
    return entry.get("text") if isinstance(entry, dict) else None


def build_confusions(info: RunInfo, device: str | None = None) -> dict[str, Any]:
    """Every (true, predicted) pair of the run's classes, explained by the predicted class's
    concepts.

    Skipped when `atlas/confusions.json` records the same inputs (the classes' fingerprints and the
    settings); returns {"pairs", "mistaken", "skipped"}.
    """
    store, cfg = info.store(), info.config
    classes, by_index, prints = read_classes(info)
    inputs = short_hash({"classes": prints, "mistakes": cfg.mistakes.model_dump()})
    done = store.read_json(layout.CONFUSIONS)
    if isinstance(done, dict) and done.get("inputs") == inputs:
        return {
            "pairs": len(done.get("pairs", [])),
            "mistaken": done.get("mistaken", 0),
            "skipped": True,
        }
    report = explain_confusions(info, classes, by_index, device)
    report["inputs"] = inputs
    store.write_json(layout.CONFUSIONS, report)
    return {"pairs": len(report["pairs"]), "mistaken": report["mistaken"], "skipped": False}


def explain_confusions(
    info: RunInfo,
    classes: dict[str, ClassImages],
    by_index: dict[int, str],
    device: str | None = None,
) -> dict[str, Any]:
    """The confusions report (module doc) over `classes`; example images written to the store."""
    store, cfg = info.store(), info.config
    dev = pick_device(device)
    split = get_split(info, dev)
    extractor = make_extractor(cfg.concepts)
    names = {c.index: c.name for c in (info.all_classes or info.classes)}
    groups: dict[tuple[str, int], np.ndarray] = {}
    n_images = 0
    for slug, ci in classes.items():
        n_images += len(ci.pred)
        for p in np.unique(ci.pred):
            if int(p) != ci.index:
                groups[(slug, int(p))] = np.flatnonzero(ci.pred == p)
    dictionaries: dict[str, Dictionary] = {}

    def dictionary(p_slug: str) -> Dictionary:
        if p_slug not in dictionaries:
            result = read_result(store, p_slug, "factorize", "importance")
            if result is None:  # `classes` holds only classes with finished importance
                raise ValueError(f"class {p_slug!r}: its concepts are not computed")
            dictionaries[p_slug] = Dictionary(result.W, np.asarray(result.order))
        return dictionaries[p_slug]

    codes = (
        {} if split.head is None else _codes(groups, classes, by_index, dictionary, extractor, dev)
    )
    pairs = []
    for (t_slug, p_index), positions in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        t = classes[t_slug]
        p_slug = by_index.get(p_index)
        pair: dict[str, Any] = {
            "true": t_slug,
            "true_name": t.name,
            "predicted": p_slug,
            "predicted_index": p_index,
            "predicted_name": names.get(p_index, f"class {p_index}"),
            "images": len(positions),
            "image_positions": [int(i) for i in positions],
            "basis": None,
            "note": None,
            "concepts": [],
            "residual": None,
            "bias": None,
            "top_by_image": [],
            "examples": [],
        }
        if p_slug is None:
            pair["note"] = "the predicted class is not explained in this run"
            pairs.append(pair)
            continue
        d = dictionary(p_slug)
        if split.head is not None:
            weight, bias = (x.detach().cpu().float().numpy() for x in split.head)
            res = pair_split(
                codes[(t_slug, p_index)], d.W, _pooled(t)[positions], weight, bias, p_index
            )
            shares, tops = res["shares"], [int(k) for k in res["top"]]
            pair.update(
                basis="logit_share", residual=float(res["residual"]), bias=float(res["bias"])
            )
        else:
            chosen = positions[: cfg.importance.images]
            spatial, extra = _spatial_extra(
                split, _images_at(info, [t.urls[i] for i in chosen], cfg.patches.image_size), dev
            )
            sobol = np.asarray(
                concept_sobol(
                    split.h,
                    spatial,
                    d.W,
                    p_index,
                    n_designs=cfg.importance.n_designs,
                    sampler=cfg.importance.sampler,
                    batch_size=cfg.importance.batch_size,
                    seed=cfg.concepts.seed,
                    device=dev,
                    precision=cfg.model.precision,
                    extra=extra,
                )
            )
            shares = _percent(sobol)
            tops = [int(np.argmax(sobol))] * len(positions)
            pair.update(basis="sobol", note=SOBOL_NOTE)
        rank = {int(c): r for r, c in enumerate(d.order)}
        pair["concepts"] = sorted(
            (
                {"concept": k, "share": round(float(shares[k]), 2), "rank": rank[k]}
                for k in range(len(d.W))
            ),
            key=lambda c: -c["share"],
        )
        pair["top_by_image"] = tops
        pairs.append(pair)
    _examples(info, split, extractor, classes, dictionaries, pairs, dev)
    return {
        "pairs": pairs,
        "mistaken": int(sum(p["images"] for p in pairs)),
        "n_images": n_images,
        "bias": bias_candidates(pairs, cfg.mistakes.bias_min_classes),
    }


def _pooled(ci: ClassImages) -> np.ndarray:
    """A class's pooled image activations, read from the store once."""
    if not isinstance(ci.pooled, np.ndarray):
        ci.pooled = np.asarray(ci.pooled[:], np.float32)
    return ci.pooled


def _codes(
    groups: dict[tuple[str, int], np.ndarray],
    classes: dict[str, ClassImages],
    by_index: dict[int, str],
    dictionary: Any,
    extractor: Any,
    dev: torch.device,
) -> dict[tuple[str, int], np.ndarray]:
    """ū of every pair's images on the predicted class's dictionary: one NNLS call per predicted
    class, not per pair (the per-call cost dominates at ImageNet's ~4,600 pairs)."""
    by_pred: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for key in groups:
        if key[1] in by_index:
            by_pred[key[1]].append(key)
    out = {}
    for p_index, keys in by_pred.items():
        rows = np.concatenate([_pooled(classes[t])[groups[(t, p)]] for t, p in keys])
        U = np.asarray(
            extractor.encode(rows, dictionary(by_index[p_index]).W, device=dev), np.float32
        )
        ends = np.cumsum([len(groups[key]) for key in keys])
        for key, part in zip(keys, np.split(U, ends[:-1]), strict=True):
            out[key] = part
    return out


def bias_candidates(pairs: list[dict[str, Any]], min_classes: int) -> dict[str, dict[str, Any]]:
    """{predicted slug: {concept: {images, classes, pairs}}} for concepts that are the top concept
    of mistaken images from at least `min_classes` other classes."""
    seen: dict[tuple[str, int], dict[str, int]] = defaultdict(dict)
    for pair in pairs:
        if pair["predicted"] is None:
            continue
        for k in pair["top_by_image"]:
            by_true = seen[(pair["predicted"], k)]
            by_true[pair["true"]] = by_true.get(pair["true"], 0) + 1
    out: dict[str, dict[str, Any]] = {}
    for (p_slug, k), by_true in sorted(seen.items()):
        if len(by_true) >= min_classes:
            out.setdefault(p_slug, {})[str(k)] = {
                "images": sum(by_true.values()),
                "classes": len(by_true),
                "pairs": sorted(by_true, key=lambda s: (-by_true[s], s)),
            }
    return out


def _examples(
    info: RunInfo,
    split: SplitModel,
    extractor: Any,
    classes: dict[str, ClassImages],
    dictionaries: dict[str, Dictionary],
    pairs: list[dict[str, Any]],
    dev: torch.device,
) -> None:
    """Up to `mistakes.examples` images of the most frequent pairs, each with the overlay of the
    predicted class's concepts in that class's page colours (and the plain image beside it)."""
    store, cfg = info.store(), info.config
    fmt = cfg.crops.format
    ext = "webp" if fmt == "webp" else "jpg"
    side = cfg.crops.size * 2
    explained = [p for p in pairs if p["predicted"] is not None][: cfg.mistakes.example_pairs]
    for pair in explained:
        t, d = classes[pair["true"]], dictionaries[pair["predicted"]]
        chosen = pair["image_positions"][: cfg.mistakes.examples]
        if not chosen:
            continue
        images = _images_at(info, [t.urls[i] for i in chosen], cfg.patches.image_size)
        spatial = _spatial(split, images, dev)
        if spatial.ndim != 4:
            continue
        n, C, h, w = spatial.shape
        rows = spatial.permute(0, 2, 3, 1).reshape(-1, C)
        coeffs = np.asarray(extractor.encode(rows, d.W, device=dev), np.float32)
        coeffs = coeffs.reshape(n, h, w, -1).transpose(0, 3, 1, 2)
        for j, pos in enumerate(chosen):
            overlay = crops_mod.attribution_map(images[j], coeffs[j], d.order, side)
            files = {}
            for kind, img in (
                ("overlay", overlay),
                ("plain", crops_mod.thumbnail(images[j], side)),
            ):
                name = f"{kind}_{pos}.{ext}"
                store.write_bytes(
                    layout.confusion_file(pair["true"], pair["predicted"], name),
                    crops_mod.encode(img, fmt),
                )
                files[kind] = name
            pair["examples"].append(
                {
                    "image": int(pos),
                    **files,
                    "concepts": crops_mod.dominant_concepts(coeffs[j], d.order),
                }
            )


def read_confusions(store: RunStore) -> dict[str, Any] | None:
    """The stored confusions report, or None before the step ran."""
    report = store.read_json(layout.CONFUSIONS)
    return report if isinstance(report, dict) else None
