"""Ground truth on the toy data: which visual part a concept is, read from the part masks."""

from __future__ import annotations

from typing import Any

import numpy as np

from lens_core.toy import read_mask


def concept_parts(info: Any, slug: str, top: int = 8) -> dict[int, int]:
    """{concept: the toy part that dominates its top patches} (a vote over its `top` patches)."""
    store = info.store()
    acts = store.zarr[f"acts/{slug}"]
    urls, patches = list(acts.attrs["image_urls"]), acts["patches"][:]
    U = store.zarr[f"concepts/{slug}/U"][:]
    size = int(acts.attrs["image_size"])
    masks: dict[int, np.ndarray] = {}
    out = {}
    for c in range(U.shape[1]):
        votes = []
        for pid in np.argsort(-U[:, c])[:top]:
            pos = int(patches[pid, 0])
            if pos not in masks:
                masks[pos] = read_mask(urls[pos].replace("/images/", "/masks/"))
            scale = masks[pos].shape[0] / size
            x0, y0, x1, y1 = (int(v * scale) for v in patches[pid, 1:])
            ids, counts = np.unique(masks[pos][y0:y1, x0:x1], return_counts=True)
            keep = ids >= 0
            votes.append(int(ids[keep][np.argmax(counts[keep])]) if keep.any() else -1)
        out[c] = max(set(votes), key=votes.count)
    return out
