"""Activations stage: a class's images -> CRAFT patches -> g -> Zarr arrays, streamed in batches.

Peak memory is one batch of images and their patches, whatever the class size: arrays grow by
appending. Writes into a Zarr group (``acts/<class>``, lens_core.layout):
  A        (n_patches, C) float32   pooled activations of every patch (the NMF input)
  patches  (n_patches, 5) int32     image position, x0, y0, x1, y1 (pixels of the resized image)
  patch_logit (n_patches,) float32  class logit of each patch; patch_pred (n_patches,) int32 argmax
  image_A  (n_images, C) float32    pooled activations of each whole image
  image_logit, image_pred           the same for whole images
  spatial  (m, C, H, W) float32     spatial activations of the first m images (importance, maps)
  spatial_extra (m, T, C) float32   a token model's class/register tokens of those images (for h)
and attrs: image_urls (readable images in order), skipped [(url, reason)], layer, counts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import zarr

from lens_core.config import PatchConfig
from lens_core.data import (
    EmptyClassError,
    ReadStats,
    available_cpus,
    extract_patches,
    iter_images,
    patch_boxes,
)
from lens_core.device import autocast, inference, pick_device
from lens_core.models import SplitModel
from lens_core.tokens import extra_tokens


@dataclass
class ActivationSummary:
    n_images: int
    n_patches: int
    n_skipped: int
    channels: int


def pool(acts: torch.Tensor) -> torch.Tensor:
    """Spatial mean of (N,C,H,W) activations; (N,C) passes through."""
    return acts.mean(dim=(2, 3)) if acts.ndim == 4 else acts


def _batches(it, size: int):
    batch = []
    for item in it:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _Appender:
    """Appends row blocks to growing Zarr arrays, buffering up to `flush_rows` rows per array.

    Buffering keeps memory bounded by a constant (not by the class size) while cutting the Zarr
    appends, each of which rewrites metadata and a partial chunk, from one per batch to a few.
    The appends run on one writer thread (in order, so the arrays are the same as written inline)
    while the caller computes the next batches; at most `max_pending` flushes wait for it, and a
    write error raises at the next add or at close.
    """

    def __init__(
        self,
        group: zarr.Group,
        chunk_rows: int = 2048,
        flush_rows: int = 2048,
        max_pending: int = 2,
    ):
        self.group = group
        self.chunk_rows = chunk_rows
        self.flush_rows = flush_rows
        self.max_pending = max_pending
        self.arrays: dict[str, zarr.Array] = {}
        self.pending: dict[str, list[np.ndarray]] = {}
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lens-zarr")
        self._writes: deque[Future[None]] = deque()

    def add(self, name: str, block: np.ndarray) -> None:
        self.pending.setdefault(name, []).append(block)
        if sum(len(b) for b in self.pending[name]) >= self.flush_rows:
            self._flush(name)

    def _flush(self, name: str) -> None:
        blocks = self.pending.pop(name, [])
        if not blocks:
            return
        block = blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=0)
        while self._writes and (self._writes[0].done() or len(self._writes) >= self.max_pending):
            self._writes.popleft().result()  # bounded memory; re-raises a failed write
        self._writes.append(self._writer.submit(self._write, name, block))

    def _write(self, name: str, block: np.ndarray) -> None:
        arr = self.arrays.get(name)
        if arr is None:  # created with its first block: the same array as empty + append, faster
            chunks = (min(self.chunk_rows, max(1, block.shape[0])),) + block.shape[1:]
            self.arrays[name] = self.group.create_array(
                name, data=block, chunks=chunks, overwrite=True
            )
        else:
            arr.append(block, axis=0)

    def close(self) -> None:
        """Write what is still buffered and wait for it (call before marking the stage complete)."""
        try:
            for name in list(self.pending):
                self._flush(name)
            while self._writes:
                self._writes.popleft().result()
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop the writer thread: queued writes are dropped (the stage is not marked complete)."""
        for future in self._writes:
            future.cancel()
        self._writes.clear()
        self._writer.shutdown(wait=True, cancel_futures=True)


def compute_class_activations(
    split: SplitModel,
    class_index: int,
    image_urls: Sequence[str],
    group: zarr.Group,
    patches: PatchConfig,
    storage_options: dict[str, Any] | None = None,
    spatial_images: int = 16,
    device: str | torch.device | None = None,
    on_batch: Callable[[int], None] | None = None,
    precision: str = "fp32",
    prefetch: int | None = None,
) -> ActivationSummary:
    """Stream one class's images through g and fill `group` (caller marks it complete).

    precision: autocast dtype of g and h ("fp32", "bf16", "fp16"; see lens_core.device); whatever
    it is, the stored arrays are float32. prefetch: images read and decoded ahead by a thread pool
    while g runs; 0 reads in this thread. Default: two batches when something other than torch's
    CPU threads runs g (a GPU, or CPUs left over by torch.get_num_threads()), else 0: decoders
    competing with torch for the same cores gain nothing and often slow it down.

    Throughput (bench/bench_activations.py): g and h run on full channels-last batches of
    `patches.batch_size` inputs: a batch's patches, and the whole images of several batches
    gathered into one call (on CPU, a call on a batch's few whole images is slower per input, and
    so is adding them to the patches' call; figures in docs/performance.md). Batch i+1 is
    launched before batch i's results are stored, and on CUDA inputs and results cross over
    pinned, non-blocking copies, so the device has the next batch queued while the host stores
    the last; Zarr appends run on a writer thread. Per-image results are those of the plain
    sequential loop (tests/test_precision.py).
    """
    dev = pick_device(device)
    autocast(dev, precision)  # an unknown precision fails here, before any image is read
    split = split.to(dev)
    boxes = patch_boxes(patches.image_size, patches.fraction, patches.grid)
    per_image = len(boxes)
    images_per_batch = max(1, patches.batch_size // per_image)
    stats = ReadStats()
    read_urls: list[str] = []
    ahead = _default_prefetch(dev, images_per_batch) if prefetch is None else prefetch
    stream = iter_images(image_urls, storage_options, patches.image_size, stats, prefetch=ahead)
    run = _Run(split, boxes, dev, precision, class_index, patches.batch_size, spatial_images)
    out = _Appender(group)
    launched: _Launched | None = None
    try:
        for batch in _batches(stream, images_per_batch):
            positions = np.arange(len(read_urls), len(read_urls) + len(batch), dtype=np.int32)
            read_urls.extend(u for _, u, _ in batch)
            nxt = run.launch(
                _stacked([t for _, _, t in batch], pinned=dev.type == "cuda"), positions
            )
            if launched is not None:
                _store(out, launched, boxes, on_batch)
            launched = nxt
        last = run.launch(None, np.zeros(0, np.int32))  # the whole images still gathered
        for pending in (launched, last):
            if pending is not None:
                _store(out, pending, boxes, on_batch)
        out.close()
    finally:
        out.abort()
        stream.close()  # stops the decoder pool when g or a write failed
    if not read_urls:
        raise EmptyClassError(
            f"no readable image among {len(image_urls)} listed"
            + (
                f" ({len(stats.skipped)} unreadable, e.g. {stats.skipped[0][1]})"
                if stats.skipped
                else ""
            )
        )
    group.attrs.update(
        {
            "image_urls": read_urls,
            "skipped": [list(s) for s in stats.skipped],
            "layer": split.layer,
            "n_images": len(read_urls),
            "n_patches": len(read_urls) * per_image,
            "patches_per_image": per_image,
            "image_size": patches.image_size,
            "channels": run.channels,
        }
    )
    return ActivationSummary(
        len(read_urls), len(read_urls) * per_image, len(stats.skipped), run.channels
    )


def _default_prefetch(dev: torch.device, images_per_batch: int) -> int:
    """Images to decode ahead: two batches when the host has cores that g does not use."""
    if dev.type != "cpu" or available_cpus() > torch.get_num_threads():
        return 2 * images_per_batch
    return 0


def _stacked(images: list[torch.Tensor], pinned: bool) -> torch.Tensor:
    """The batch as one (N, 3, S, S) tensor, in pinned memory for an asynchronous copy to CUDA (a
    copy from pageable memory makes the host wait for the work already queued on the device)."""
    if not pinned:
        return torch.stack(images)
    out = torch.empty((len(images), *images[0].shape), dtype=images[0].dtype, pin_memory=True)
    return torch.stack(images, out=out)


@dataclass
class _Launched:
    """A batch whose forwards are queued: its image positions (patch rows), its results by array
    name (host tensors, valid once `ready` has completed on CUDA)."""

    positions: np.ndarray
    results: dict[str, torch.Tensor]
    ready: Any


class _Run:
    """The forwards of one class: patches batch by batch, whole images gathered into full
    batches."""

    def __init__(
        self,
        split: SplitModel,
        boxes: np.ndarray,
        dev: torch.device,
        precision: str,
        class_index: int,
        batch_size: int,
        spatial_images: int,
    ):
        self.split, self.boxes, self.dev, self.precision = split, boxes, dev, precision
        self.class_index, self.batch_size = class_index, batch_size
        self.spatial_left = spatial_images
        self.wholes: list[torch.Tensor] = []
        self.channels = 0

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(activations, float32 logits) of inputs x, one channels-last g call and one h call."""
        x = x.contiguous(memory_format=torch.channels_last)
        with inference(self.dev, self.precision):
            acts = self.split.g(x)
            logits = self.split.h(acts).float()
        return acts, logits

    def launch(self, images: torch.Tensor | None, positions: np.ndarray) -> _Launched | None:
        """Queue a batch's patches (None: no more batches) and, once `batch_size` whole images are
        gathered or at the end, the whole images; results copied to the host (non-blocking on
        CUDA)."""
        cuda = self.dev.type == "cuda"
        results: dict[str, torch.Tensor] = {}
        if images is not None:
            # from pinned memory: the host does not wait
            images = images.to(self.dev, non_blocking=cuda)
            crops = extract_patches(images, self.boxes, self.split.input_size)
            acts, logits = self._forward(crops)
            with torch.inference_mode():  # float32 from here on: pooled after the cast, not before
                results.update(
                    A=pool(acts.float()),
                    patch_logit=logits[:, self.class_index],
                    patch_pred=logits.argmax(1),
                )
            self.wholes.append(
                F.interpolate(
                    images,
                    size=self.split.input_size,
                    mode="bilinear",
                    antialias=True,
                    align_corners=False,
                )
            )
        if self.wholes and (images is None or sum(len(w) for w in self.wholes) >= self.batch_size):
            acts, logits = self._forward(
                torch.cat(self.wholes) if len(self.wholes) > 1 else self.wholes[0]
            )
            self.wholes = []
            with torch.inference_mode():
                results.update(
                    image_A=pool(acts.float()),
                    image_logit=logits[:, self.class_index],
                    image_pred=logits.argmax(1),
                )
                if self.spatial_left > 0 and acts.ndim == 4:
                    results["spatial"] = acts[: self.spatial_left].float()
                    extra = extra_tokens(self.split.g, acts)  # a token model's class token
                    if extra is not None:
                        results["spatial_extra"] = extra[: self.spatial_left].float()
                    self.spatial_left -= len(results["spatial"])
        if not results:
            return None
        if "A" in results:
            self.channels = results["A"].shape[1]
        with torch.inference_mode():
            results = {k: v.to("cpu", non_blocking=cuda) for k, v in results.items()}
        ready = None
        if cuda:
            ready = torch.cuda.Event()
            ready.record()
        return _Launched(positions, results, ready)


def _store(
    out: _Appender, batch: _Launched, boxes: np.ndarray, on_batch: Callable[[int], None] | None
) -> None:
    """Hand a launched batch's results to the appender (waiting for them on CUDA)."""
    if batch.ready is not None:
        batch.ready.synchronize()
    r = {k: v.numpy() for k, v in batch.results.items()}
    if "A" in r:
        n = len(batch.positions)
        rows = np.concatenate(
            [np.repeat(batch.positions, len(boxes))[:, None], np.tile(boxes, (n, 1))], axis=1
        ).astype(np.int32)
        out.add("A", np.ascontiguousarray(r["A"], dtype=np.float32))
        out.add("patches", rows)
        out.add("patch_logit", r["patch_logit"].astype(np.float32))
        out.add("patch_pred", r["patch_pred"].astype(np.int32))
    if "image_A" in r:
        out.add("image_A", r["image_A"].astype(np.float32))
        out.add("image_logit", r["image_logit"].astype(np.float32))
        out.add("image_pred", r["image_pred"].astype(np.int32))
    if "spatial" in r:
        out.add("spatial", np.ascontiguousarray(r["spatial"], dtype=np.float32))
    if "spatial_extra" in r:
        out.add("spatial_extra", np.ascontiguousarray(r["spatial_extra"], dtype=np.float32))
    if on_batch is not None and len(batch.positions):
        on_batch(len(batch.positions))
