"""Device choice and the precision contexts of the tensor stages (model.precision).

fp32 runs as is; bf16/fp16 run g and h under `torch.autocast` (CUDA, and CPU for bf16), and
callers cast results back to float32: NMF and the Sobol statistics always work in fp32.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device, else CUDA when present, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(
    device: torch.device | str, precision: str = "fp32"
) -> contextlib.AbstractContextManager:
    """Mixed precision for model forwards (and their backward, for MACO) on `device`.

    fp16 on CPU runs in fp32 (noted once in the log): torch's CPU autocast accepts fp16 but has no
    fast kernels for it: fp16 runs slower than fp32 even on a CPU where bf16 runs faster (figures
    in docs/performance.md). Any other unknown value is a ValueError.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {PRECISIONS}")
    dev = torch.device(device)
    if dev.type == "cpu" and precision == "fp16":
        _note_once(
            "model.precision fp16 is not an autocast dtype on CPU: running in fp32 (bf16 is)"
        )
        return contextlib.nullcontext()
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=_DTYPES[precision])


_NOTED: set[str] = set()


def _note_once(message: str) -> None:
    if message not in _NOTED:
        _NOTED.add(message)
        log.warning(message)


@contextlib.contextmanager
def inference(device: torch.device, precision: str = "fp32") -> Iterator[None]:
    """inference_mode under the run's precision; callers cast results back to float32."""
    with torch.inference_mode(), autocast(device, precision):
        yield
