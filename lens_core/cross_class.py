"""Across classes (once per run): nearest concepts in other classes, concept-to-class alignment."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lens_core import layout
from lens_core.model_cache import get_split
from lens_core.results import read_result
from lens_core.run import RunInfo


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)


def nearest_concepts(
    W_by_class: dict[str, np.ndarray], top: int = 5, block: int = 2048
) -> dict[str, list[list[dict[str, Any]]]]:
    """For every concept, the `top` most cosine-similar concepts of *other* classes.

    Blocked over rows so 1,000 classes x 10 concepts never build the full similarity matrix at once.
    """
    slugs = list(W_by_class)
    owner = np.concatenate([np.full(W_by_class[s].shape[0], i) for i, s in enumerate(slugs)])
    local = np.concatenate([np.arange(W_by_class[s].shape[0]) for s in slugs])
    V = torch.from_numpy(_unit(np.concatenate([W_by_class[s] for s in slugs]).astype(np.float32)))
    out: dict[str, list[list[dict[str, Any]]]] = {
        s: [[] for _ in range(W_by_class[s].shape[0])] for s in slugs
    }
    owner_t = torch.from_numpy(owner)
    k = min(top, int((owner != owner[0]).sum()) if len(slugs) > 1 else 0)
    if k == 0:
        return out
    for start in range(0, len(V), block):
        sims = V[start : start + block] @ V.T
        same = owner_t[start : start + block, None] == owner_t[None, :]
        sims = sims.masked_fill(same, -2.0)
        vals, idx = sims.topk(k, dim=1)
        for r in range(len(vals)):
            row = start + r
            out[slugs[owner[row]]][local[row]] = [
                {
                    "slug": slugs[owner[j]],
                    "concept": int(local[j]),
                    "similarity": round(float(v), 4),
                }
                for v, j in zip(vals[r].tolist(), idx[r].tolist(), strict=True)
            ]
    return out


def class_alignment(
    W_by_class: dict[str, np.ndarray],
    head_weight: np.ndarray,
    class_slugs: list[str | None],
    top: int = 5,
) -> dict[str, list[list[dict[str, Any]]]]:
    """For every concept, the `top` classes whose classifier weight vectors align best (cosine)."""
    H = _unit(head_weight.astype(np.float32))
    out = {}
    for slug, W in W_by_class.items():
        sims = _unit(W.astype(np.float32)) @ H.T
        rows = []
        for i in range(len(sims)):
            order = np.argsort(-sims[i], kind="stable")[:top]
            rows.append(
                [
                    {
                        "class_index": int(j),
                        "slug": class_slugs[j] if j < len(class_slugs) else None,
                        "score": round(float(sims[i, j]), 4),
                    }
                    for j in order
                ]
            )
        out[slug] = rows
    return out


def build_cross_class(info: RunInfo, device: str | None = None) -> dict[str, Any]:
    """Write atlas/similar.json and atlas/alignment.json over every class that has concepts."""
    store = info.store()
    W_by_class = {}
    for s in info.slugs:
        result = read_result(store, s, "factorize")
        if result is not None:
            W_by_class[s] = result.W
    similar = nearest_concepts(W_by_class)
    store.write_json(layout.SIMILAR, similar)
    alignment: dict[str, Any] = {}
    split = get_split(info, device)
    if split.head is not None and W_by_class:
        by_index: list[str | None] = [None] * info.num_classes
        for c in info.all_classes or info.classes:
            if c.index < len(by_index):
                by_index[c.index] = c.slug
        alignment = class_alignment(W_by_class, split.head[0].detach().cpu().numpy(), by_index)
    store.write_json(layout.ALIGNMENT, alignment)
    return {"classes": len(W_by_class)}
