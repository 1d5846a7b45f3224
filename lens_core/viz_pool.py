"""The MACO render pool: feature visualizations of concepts from many classes, rendered in batches.

One call renders a batch of (class, concept) items in one pass through the network and writes
``viz/<class>/<concept>.png`` (RGBA: image + transparency map) and ``<concept>.webp`` (plain).
The magnitude spectrum is estimated once per run from the run's own images (``maco/magnitude.npy``).
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from lens_core import layout, maco
from lens_core.crops import encode, to_pil
from lens_core.data import list_images, read_image, sample_images
from lens_core.device import pick_device
from lens_core.model_cache import get_split
from lens_core.run import RunInfo
from lens_core.stages import class_fingerprint
from lens_core.status import write_status
from lens_core.store import RunStore

log = logging.getLogger("lens")


def _save_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def run_magnitude(info: RunInfo, max_images: int = 64) -> torch.Tensor:
    """The run's Fourier magnitude: a configured .npy file, else the mean spectrum of its images
    (estimated once per run and kept in the store)."""
    store = info.store()
    cfg = info.config
    if store.exists(layout.MAGNITUDE):
        return torch.from_numpy(np.load(io.BytesIO(store.read_bytes(layout.MAGNITUDE)), allow_pickle=False))
    if cfg.maco.magnitude:
        mag = maco.load_magnitude(cfg.maco.magnitude, cfg.storage_options)
    else:
        per_class = max(1, max_images // max(1, len(info.classes)))
        urls: list[str] = []
        for cls in info.classes:
            urls += sample_images(list_images(info.data_url, cls, cfg.storage_options), per_class, cfg.data.seed)
            if len(urls) >= max_images:
                break
        images = []
        for url in urls[:max_images]:
            try:
                images.append(read_image(url, cfg.storage_options, cfg.maco.image_size))
            except Exception as err:  # an unreadable image only drops out of the average
                log.warning("magnitude: skipping %s (%s)", url, err)
        if not images:
            raise RuntimeError("no readable image to estimate the MACO magnitude spectrum")
        mag = maco.estimate_magnitude(images, cfg.maco.image_size)
    store.write_bytes(layout.MAGNITUDE, _save_npy(mag.cpu().numpy().astype(np.float32)))
    return mag


def concept_seed(base: int, slug: str, concept: int) -> int:
    """A stable per-concept seed, independent of which batch the concept lands in."""
    return (int(hashlib.sha256(f"{base}:{slug}:{concept}".encode()).hexdigest()[:8], 16)) % (2**31)


def viz_done(store: RunStore, slug: str, concept: int) -> bool:
    return store.exists(layout.viz_file(slug, concept, "png")) and store.exists(layout.viz_file(slug, concept, "webp"))


def _concepts_ready(store: RunStore, slug: str) -> str | None:
    """The class fingerprint when its concepts are computed for its current activations, else None."""
    fp = class_fingerprint(store, slug)
    return fp if fp is not None and store.is_complete(layout.concepts(slug), fp) else None


def _unrendered(store: RunStore, slugs: list[str]) -> Iterator[tuple[str, str, int]]:
    """(class, fingerprint, concepts) of the classes whose renders are not all marked done."""
    for slug in slugs:
        fp = _concepts_ready(store, slug)
        if fp is not None and not store.files_complete(layout.viz(slug), fp):
            yield slug, fp, store.zarr[layout.concepts(slug)]["W"].shape[0]


def pending_items(info: RunInfo, slugs: list[str] | None = None) -> list[tuple[str, int]]:
    """(class, concept) pairs with concepts but no render yet, in class order."""
    store = info.store()
    items = []
    for slug, _, k in _unrendered(store, slugs if slugs is not None else info.slugs):
        items += [(slug, c) for c in range(k) if not viz_done(store, slug, c)]
    return items


def render_batch(info: RunInfo, items: list[tuple[str, int]], device: str | None = None) -> dict[str, Any]:
    """Render a batch of concepts (any classes) together and write their PNG/WebP files."""
    store = info.store()
    todo = [(s, c) for s, c in items if not viz_done(store, s, c)]
    if not todo:
        return {"rendered": 0, "skipped": len(items)}
    dev = pick_device(device)
    split = get_split(info, dev)
    magnitude = run_magnitude(info)
    W_cache: dict[str, np.ndarray] = {}
    directions = []
    for slug, c in todo:
        if slug not in W_cache:
            W_cache[slug] = store.zarr[layout.concepts(slug)]["W"][:]
        directions.append(W_cache[slug][c])
    seeds = [concept_seed(info.config.maco.seed, s, c) for s, c in todo]
    result = maco.render_concepts(
        split.g, torch.from_numpy(np.stack(directions)), info.config.maco, magnitude, seeds,
        split.input_size, device=dev, precision=info.config.model.precision,
    )
    for i, (slug, c) in enumerate(todo):
        store.write_bytes(layout.viz_file(slug, c, "webp"), encode(to_pil(result.images[i]), "webp", 90))
        store.write_bytes(layout.viz_file(slug, c, "png"), maco.encode_rgba_png(result.images[i], result.alpha[i]))
    return {"rendered": len(todo), "skipped": len(items) - len(todo),
            "objective": [float(v) for v in result.objective]}


def finalize_viz(info: RunInfo, slugs: list[str] | None = None) -> list[str]:
    """Mark viz/<class> complete where every concept is rendered; returns the classes marked."""
    store = info.store()
    marked = []
    for slug, fp, k in _unrendered(store, slugs if slugs is not None else info.slugs):
        if all(viz_done(store, slug, c) for c in range(k)):
            store.mark_files_complete(layout.viz(slug), fp)
            write_status(store, slug, "render", "completed", None, concepts=k)
            marked.append(slug)
    return marked
