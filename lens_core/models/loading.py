"""A model for a config: its architecture built, its checkpoint read and checked (the number of
outputs read from the checkpoint's head when the config does not set it), then split at the layer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lens_core.config import ModelConfig
from lens_core.models.architectures import build_model
from lens_core.models.checkpoints import (
    _read_bytes,
    check_state_dict,
    checkpoint_limit,
    parse_state_dict,
)
from lens_core.models.errors import ModelError
from lens_core.models.split import SplitModel, frozen, split_model

log = logging.getLogger(__name__)


def load_model(
    model_cfg: ModelConfig,
    num_classes: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> tuple[nn.Module, str]:
    """(model in eval mode, digest): weights from model_cfg.checkpoint, the shipped toy weights,
    or random."""
    k = model_cfg.num_classes or num_classes
    if not k:
        raise ModelError(
            "num_classes is unknown: set model.num_classes or pass the data set's class count"
        )
    model = build_model(model_cfg.arch, k)
    url = model_cfg.checkpoint
    if url is None and model_cfg.arch == "toy":
        from lens_core.toy import TOY_CHECKPOINT

        url = str(TOY_CHECKPOINT)
    if url is None:
        log.warning("no checkpoint for %s: using random (seeded) weights", model_cfg.arch)
        digest = f"random-init:{model_cfg.arch}"
    else:
        limit = checkpoint_limit(model)
        data = _read_bytes(url, storage_options, limit)
        digest = hashlib.sha256(data).hexdigest()
        state = parse_state_dict(data, url, limit)
        if model_cfg.num_classes is None:
            outputs = checkpoint_outputs(model_cfg.arch, model, state, k)
            if outputs is not None and outputs != k:
                model = build_model(model_cfg.arch, outputs)
        check_state_dict(model, state, url, model_cfg.arch)
        model.load_state_dict(state, strict=False)  # only num_batches_tracked may be absent
    return frozen(model), digest


def checkpoint_outputs(
    arch: str, model: nn.Module, state: Mapping[str, torch.Tensor], k: int
) -> int | None:
    """The number of outputs the checkpoint's head has, or None when it cannot tell.

    The head's tensors are the ones whose shape changes with the number of classes (found by
    building the architecture with k + 1 outputs); their first dimension is the outputs.
    """
    mine = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    other = {name: tuple(t.shape) for name, t in build_model(arch, k + 1).state_dict().items()}
    head = [name for name, shape in mine.items() if other.get(name) != shape]
    found = {int(state[name].shape[0]) for name in head if name in state and state[name].ndim >= 1}
    return found.pop() if len(found) == 1 else None


def load_split_model(
    model_cfg: ModelConfig,
    num_classes: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> SplitModel:
    """load_model then split_model at model_cfg.layer, carrying the checkpoint digest."""
    model, digest = load_model(model_cfg, num_classes, storage_options)
    return dataclasses.replace(split_model(model, model_cfg.layer, model_cfg), digest=digest)
