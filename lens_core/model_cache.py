"""The split model of a run, loaded once per worker process and device, and evicted (LRU).

A long-lived GPU worker sees one run per checkpoint: without eviction every new checkpoint would
add a model to GPU memory. At most `LENS_MODEL_CACHE` models (default 2) stay per device.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Protocol

import torch

from lens_core.config import AtlasConfig
from lens_core.device import pick_device
from lens_core.models import SplitModel, load_split_model
from lens_core.settings import settings


class RunModel(Protocol):
    """What the cache needs of a run (a RunInfo, which imports this module): its id, its model
    settings and its number of classes."""

    @property
    def run_id(self) -> str: ...

    @property
    def config(self) -> AtlasConfig: ...

    @property
    def num_classes(self) -> int: ...


_SPLITS: OrderedDict[tuple[str, str], SplitModel] = OrderedDict()
_LOCK = threading.Lock()


def get_split(info: RunModel, device: str | torch.device | None = None) -> SplitModel:
    """The split model of `info` on `device`, loaded on first use; the least recently
    used is evicted."""
    dev = pick_device(device)
    key = (info.run_id, str(dev))
    with _LOCK:
        if key in _SPLITS:
            _SPLITS.move_to_end(key)
            return _SPLITS[key]
    options = info.config.storage_options
    return _hold(key, load_split_model(info.config.model, info.num_classes, options).to(dev))


def remember(info: RunModel, device: str | torch.device | None, split: SplitModel) -> SplitModel:
    """Hold a split model loaded elsewhere (run set-up) as `info`'s on `device`: never loaded
    twice."""
    dev = pick_device(device)
    return _hold((info.run_id, str(dev)), split.to(dev))


def _hold(key: tuple[str, str], split: SplitModel) -> SplitModel:
    """Cache `split` under (run id, device) as the most recently used, evicting beyond the limit."""
    with _LOCK:
        _SPLITS[key] = split
        _SPLITS.move_to_end(key)
        _evict(key[1], settings().model_cache)
    return split


def _evict(device: str, keep: int) -> None:
    on_device = [k for k in _SPLITS if k[1] == device]
    for key in on_device[: max(0, len(on_device) - keep)]:
        del _SPLITS[key]
    if len(on_device) > keep and device.startswith("cuda"):
        torch.cuda.empty_cache()


def cached() -> list[tuple[str, str]]:
    """(run id, device) of the models held now, least recently used first."""
    with _LOCK:
        return list(_SPLITS)


def clear() -> None:
    """Drop every cached model."""
    with _LOCK:
        _SPLITS.clear()
