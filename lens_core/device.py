"""Device choice and the mixed-precision context used by the GPU stages."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device, else CUDA when present, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def inference(device: torch.device, mixed_precision: bool = True) -> Iterator[None]:
    """inference_mode, plus fp16 autocast on CUDA; callers cast results back to float32."""
    with torch.inference_mode():
        if device.type == "cuda" and mixed_precision:
            with torch.autocast("cuda", dtype=torch.float16):
                yield
        else:
            yield
