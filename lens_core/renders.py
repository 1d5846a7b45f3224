"""The concepts' feature visualizations over the run store: which are still to render, rendering
a batch of them (from any classes) with MACO, and marking a class's renders complete.

One call renders a batch of (class, concept) items in one pass through the network and writes
``viz/<class>/<concept>.png`` (RGBA: image + transparency map) and ``<concept>.webp`` (plain).
The magnitude spectrum is estimated once per run from the run's own images (``maco/magnitude.npy``).
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterator
from typing import NotRequired, TypedDict

import numpy as np
import torch

from lens_core import layout, maco
from lens_core.crops import encode, to_pil
from lens_core.data import list_images, read_image, sample_images
from lens_core.device import pick_device
from lens_core.model_cache import get_split
from lens_core.results import class_fingerprint
from lens_core.run import RunInfo
from lens_core.status import write_status
from lens_core.store import SUCCESS, RunStore, join_url

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
        return torch.from_numpy(
            np.load(io.BytesIO(store.read_bytes(layout.MAGNITUDE)), allow_pickle=False)
        )
    if cfg.maco.magnitude:
        mag = maco.load_magnitude(cfg.maco.magnitude, cfg.storage_options)
    else:
        per_class = max(1, max_images // max(1, len(info.classes)))
        urls: list[str] = []
        for cls in info.classes:
            urls += sample_images(
                list_images(info.data_url, cls, cfg.storage_options), per_class, cfg.data.seed
            )
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
    return store.exists(layout.viz_file(slug, concept, "png")) and store.exists(
        layout.viz_file(slug, concept, "webp")
    )


def _files_done(store: RunStore, slug: str) -> set[int]:
    """The concepts of a class with both render files, from one listing of its viz folder."""
    names = set(store.list(layout.viz(slug)))
    return {
        int(n[:-4])
        for n in names
        if n.endswith(".png") and n[:-4].isdigit() and f"{n[:-4]}.webp" in names
    }


def _concepts_ready(store: RunStore, slug: str) -> str | None:
    """The class fingerprint when its concepts are computed for its current activations, else
    None."""
    fp = class_fingerprint(store, slug)
    return fp if fp is not None and store.is_complete(layout.concepts(slug), fp) else None


def concept_order(store: RunStore, slug: str, fp: str | None = None) -> list[int]:
    """The class's concepts, most important first; in concept order while its importance is not
    computed for these concepts (a class that failed after factorize still renders)."""
    fp = fp if fp is not None else class_fingerprint(store, slug)
    k = store.zarr[layout.concepts(slug)]["W"].shape[0]
    if fp is not None and store.is_complete(layout.importance(slug), fp):
        order = [int(c) for c in store.zarr[layout.importance(slug)]["order"][:]]
        return order + [c for c in range(k) if c not in set(order)]
    return list(range(k))


def wanted_concepts(
    store: RunStore, slug: str, top_k: int | None, fp: str | None = None
) -> list[int]:
    """The concepts a run renders for the class, most important first: its top `top_k` (every
    concept when `top_k` is None or 0)."""
    order = concept_order(store, slug, fp)
    return order[:top_k] if top_k else order


def rendered_concepts(store: RunStore, slug: str, fp: str | None) -> set[int]:
    """The concepts whose renders are marked done for the class's concepts `fp` (what a page may
    show): those its `viz/<class>/_SUCCESS` marker lists; every concept for a marker written
    before `maco.top_k` existed (it was written only once all were rendered)."""
    if fp is None:
        return set()
    try:
        marker = store.read_json(join_url(layout.viz(slug), SUCCESS), None)
    except (ValueError, UnicodeDecodeError):  # a torn or foreign marker marks nothing
        return set()
    if not isinstance(marker, dict) or marker.get("inputs") != fp:
        return set()
    if isinstance(marker.get("concepts"), list):
        return {c for c in marker["concepts"] if isinstance(c, int) and not isinstance(c, bool)}
    return set(range(store.zarr[layout.concepts(slug)]["W"].shape[0]))


def _unrendered(
    store: RunStore, slugs: list[str], top_k: int | None
) -> Iterator[tuple[str, str, list[int]]]:
    """(class, fingerprint, wanted concepts by rank) of the classes with a wanted render not
    marked done."""
    for slug in slugs:
        fp = _concepts_ready(store, slug)
        if fp is None:
            continue
        wanted = wanted_concepts(store, slug, top_k, fp)
        if not set(wanted) <= rendered_concepts(store, slug, fp):
            yield slug, fp, wanted


def pending_items(info: RunInfo, slugs: list[str] | None = None) -> list[tuple[str, int]]:
    """(class, concept) pairs to render: each class's top `maco.top_k` concepts (all when unset)
    that have no render yet, the most important first across classes: every class's first
    concept, then every class's second, ... (ties in class order), so that a capped budget or an
    interrupted run has the concepts that matter most."""
    store = info.store()
    ranked = []
    for pos, (slug, _, wanted) in enumerate(
        _unrendered(store, slugs if slugs is not None else info.slugs, info.config.maco.top_k)
    ):
        done = _files_done(store, slug)
        ranked += [(rank, pos, slug, c) for rank, c in enumerate(wanted) if c not in done]
    return [(slug, c) for _, _, slug, c in sorted(ranked)]


def by_rank(items: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The same items, the most important first across classes, given each class's items in rank
    order (as `pending_items` returns them, class by class): the i-th item of every class before
    any class's (i+1)-th, ties by first appearance. For a queue that grows as classes finish."""
    first: dict[str, int] = {}
    seen: dict[str, int] = {}
    keyed = []
    for slug, c in items:
        first.setdefault(slug, len(first))
        keyed.append((seen.get(slug, 0), first[slug], slug, c))
        seen[slug] = seen.get(slug, 0) + 1
    return [(slug, c) for _, _, slug, c in sorted(keyed, key=lambda t: t[:2])]


class RenderResult(TypedDict):
    """What a render batch did: concepts rendered and skipped (already rendered); the render task
    adds the classes it marked complete and its seconds."""

    rendered: int
    skipped: int
    objective: NotRequired[list[float]]
    marked: NotRequired[list[str]]
    seconds: NotRequired[float]


def render_batch(
    info: RunInfo, items: list[tuple[str, int]], device: str | None = None
) -> RenderResult:
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
        split.g,
        torch.from_numpy(np.stack(directions)),
        info.config.maco,
        magnitude,
        seeds,
        split.input_size,
        device=dev,
        precision=info.config.model.precision,
    )
    for i, (slug, c) in enumerate(todo):
        store.write_bytes(
            layout.viz_file(slug, c, "webp"), encode(to_pil(result.images[i]), "webp", 90)
        )
        store.write_bytes(
            layout.viz_file(slug, c, "png"), maco.encode_rgba_png(result.images[i], result.alpha[i])
        )
    return {
        "rendered": len(todo),
        "skipped": len(items) - len(todo),
        "objective": [float(v) for v in result.objective],
    }


def finalize_viz(info: RunInfo, slugs: list[str] | None = None) -> list[str]:
    """Mark viz/<class> complete where every wanted concept (the top `maco.top_k`, or all) is
    rendered; the marker lists the concepts rendered, so that a later run with a larger top_k
    renders only the missing ones. Returns the classes marked."""
    store = info.store()
    marked = []
    for slug, fp, wanted in _unrendered(
        store, slugs if slugs is not None else info.slugs, info.config.maco.top_k
    ):
        done = _files_done(store, slug)
        if set(wanted) <= done:
            k = store.zarr[layout.concepts(slug)]["W"].shape[0]
            concepts = sorted(c for c in done if c < k)
            store.mark_files_complete(
                layout.viz(slug), fp, concepts=concepts, top_k=info.config.maco.top_k
            )
            write_status(store, slug, "render", "completed", None, concepts=len(concepts))
            marked.append(slug)
    return marked
