"""CRAFT's patches: the grid of square boxes over an image, and the crops cut and resized from a
batch of images."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def patch_boxes(image_size: int, fraction: float, grid: int) -> np.ndarray:
    """int64 (grid*grid, 4) boxes [x0, y0, x1, y1], row-major, of side round(fraction*image_size).

    Stride is CRAFT's int(0.8 * side) (224 px, 64 px patches: 0, 51, 102, 153), shrunk when the
    grid would not fit in the image; a 1x1 grid is centred.
    """
    side = int(round(fraction * image_size))
    if not 1 <= side <= image_size or grid < 1:
        raise ValueError(f"invalid patches: side {side} px of a {image_size} px image, grid {grid}")
    if grid == 1:
        starts = np.array([(image_size - side) // 2])
    else:
        stride = min(max(1, int(side * 0.8)), (image_size - side) // (grid - 1))
        if stride < 1:
            raise ValueError(
                f"a {grid}x{grid} grid of {side} px patches does not fit {image_size} px"
            )
        starts = np.arange(grid) * stride
    ys, xs = np.meshgrid(starts, starts, indexing="ij")
    x0, y0 = xs.ravel(), ys.ravel()
    return np.stack([x0, y0, x0 + side, y0 + side], axis=1).astype(np.int64)


def extract_patches(
    images: torch.Tensor, boxes: np.ndarray | torch.Tensor, out_size: int
) -> torch.Tensor:
    """(N,3,S,S) images, (P,4) boxes -> (N*P,3,out,out) crops resized (bilinear, antialiased),
    image-major; vectorised per distinct box size (one size for patch_boxes)."""
    b = torch.as_tensor(np.asarray(boxes), dtype=torch.long).cpu()
    n, c = images.shape[:2]
    out = images.new_empty((n, len(b), c, out_size, out_size))
    widths, heights = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    for w, h in sorted({(int(w), int(h)) for w, h in zip(widths, heights, strict=True)}):
        sel = torch.nonzero((widths == w) & (heights == h)).flatten()
        rows = (b[sel, 1, None] + torch.arange(h)).to(images.device)  # (p, h)
        cols = (b[sel, 0, None] + torch.arange(w)).to(images.device)  # (p, w)
        crops = images[:, :, rows[:, :, None], cols[:, None, :]]  # (N, C, p, h, w)
        crops = crops.permute(0, 2, 1, 3, 4).reshape(n * len(sel), c, h, w)
        resized = F.interpolate(
            crops, size=(out_size, out_size), mode="bilinear", align_corners=False, antialias=True
        )
        out[:, sel.to(images.device)] = resized.reshape(n, len(sel), c, out_size, out_size)
    return out.reshape(n * len(b), c, out_size, out_size)
