"""Activations stage: a class's images -> CRAFT patches -> g -> Zarr arrays, streamed in batches.

Peak memory is one batch of images and their patches, whatever the class size: arrays grow by
appending. Writes into a Zarr group (see DESIGN.md, ``acts/<class>``):
  A        (n_patches, C) float32   pooled activations of every patch (the NMF input)
  patches  (n_patches, 5) int32     image position, x0, y0, x1, y1 (pixels of the resized image)
  patch_logit (n_patches,) float32  class logit of each patch; patch_pred (n_patches,) int32 argmax
  image_A  (n_images, C) float32    pooled activations of each whole image
  image_logit, image_pred           the same for whole images
  spatial  (m, C, H, W) float32     spatial activations of the first m images (importance, maps)
and attrs: image_urls (readable images in order), skipped [(url, reason)], layer, counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import zarr

from lens_core.config import PatchConfig
from lens_core.data import EmptyClassError, ReadStats, extract_patches, iter_images, patch_boxes
from lens_core.device import inference, pick_device
from lens_core.models import SplitModel


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
    """

    def __init__(self, group: zarr.Group, chunk_rows: int = 2048, flush_rows: int = 2048):
        self.group = group
        self.chunk_rows = chunk_rows
        self.flush_rows = flush_rows
        self.arrays: dict[str, zarr.Array] = {}
        self.pending: dict[str, list[np.ndarray]] = {}

    def add(self, name: str, block: np.ndarray) -> None:
        self.pending.setdefault(name, []).append(block)
        if sum(len(b) for b in self.pending[name]) >= self.flush_rows:
            self._flush(name)

    def _flush(self, name: str) -> None:
        blocks = self.pending.pop(name, [])
        if not blocks:
            return
        block = np.concatenate(blocks, axis=0)
        arr = self.arrays.get(name)
        if arr is None:
            chunks = (min(self.chunk_rows, max(1, block.shape[0])),) + block.shape[1:]
            arr = self.group.create_array(
                name, shape=(0,) + block.shape[1:], chunks=chunks, dtype=block.dtype, overwrite=True
            )
            self.arrays[name] = arr
        arr.append(block, axis=0)

    def close(self) -> None:
        """Write what is still buffered (call before marking the stage complete)."""
        for name in list(self.pending):
            self._flush(name)


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
) -> ActivationSummary:
    """Stream one class's images through g and fill `group` (caller marks it complete)."""
    dev = pick_device(device)
    split = split.to(dev)
    boxes = patch_boxes(patches.image_size, patches.fraction, patches.grid)
    per_image = len(boxes)
    images_per_batch = max(1, patches.batch_size // per_image)
    stats = ReadStats()
    out = _Appender(group)
    read_urls: list[str] = []
    spatial_left = spatial_images
    n_patches = 0
    channels = 0
    stream = iter_images(image_urls, storage_options, patches.image_size, stats)
    for batch in _batches(stream, images_per_batch):
        urls = [u for _, u, _ in batch]
        images = torch.stack([t for _, _, t in batch]).to(dev)
        positions = np.arange(len(read_urls), len(read_urls) + len(batch), dtype=np.int32)
        read_urls.extend(urls)
        crops = extract_patches(images, boxes, split.input_size)
        whole = F.interpolate(images, size=split.input_size, mode="bilinear", antialias=True, align_corners=False)
        with inference(dev, precision):
            patch_acts = split.g(crops.contiguous(memory_format=torch.channels_last))
            patch_logits = split.h(patch_acts).float()
            whole_acts = split.g(whole.contiguous(memory_format=torch.channels_last))
            whole_logits = split.h(whole_acts).float()
        patch_A = pool(patch_acts).float().cpu().numpy()
        channels = patch_A.shape[1]
        rows = np.concatenate(
            [np.repeat(positions, per_image)[:, None], np.tile(boxes, (len(batch), 1))], axis=1
        ).astype(np.int32)
        out.add("A", np.ascontiguousarray(patch_A, dtype=np.float32))
        out.add("patches", rows)
        out.add("patch_logit", patch_logits[:, class_index].cpu().numpy().astype(np.float32))
        out.add("patch_pred", patch_logits.argmax(1).cpu().numpy().astype(np.int32))
        out.add("image_A", pool(whole_acts).float().cpu().numpy().astype(np.float32))
        out.add("image_logit", whole_logits[:, class_index].cpu().numpy().astype(np.float32))
        out.add("image_pred", whole_logits.argmax(1).cpu().numpy().astype(np.int32))
        if spatial_left > 0 and whole_acts.ndim == 4:
            take = whole_acts[:spatial_left].float().cpu().numpy()
            out.add("spatial", np.ascontiguousarray(take, dtype=np.float32))
            spatial_left -= len(take)
        n_patches += len(rows)
        if on_batch is not None:
            on_batch(len(batch))
    out.close()
    if not read_urls:
        raise EmptyClassError(
            f"no readable image among {len(image_urls)} listed"
            + (f" ({len(stats.skipped)} unreadable, e.g. {stats.skipped[0][1]})" if stats.skipped else "")
        )
    group.attrs.update(
        {
            "image_urls": read_urls,
            "skipped": [list(s) for s in stats.skipped],
            "layer": split.layer,
            "n_images": len(read_urls),
            "n_patches": n_patches,
            "patches_per_image": per_image,
            "image_size": patches.image_size,
            "channels": channels,
        }
    )
    return ActivationSummary(len(read_urls), n_patches, len(stats.skipped), channels)
