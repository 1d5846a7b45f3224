"""Classifiers and their split at a layer: g (image -> activations) and h (activations -> logits).

The public API of the package; each name lives in the module of its part: `architectures`
(building a classifier by name), `checkpoints` (reading weights safely), `split` (g and h, the
head), `loading` (all three for a config). Patch a name where it lives, not here.
"""

from lens_core.models.architectures import (
    ENTRY_POINT_GROUP,
    FACTORY_ENV,
    allowed_factories,
    build_model,
    resolve_factory,
)
from lens_core.models.checkpoints import (
    CHECKPOINT_SIZE_FACTOR,
    CHECKPOINT_SIZE_MARGIN,
    MAX_CHECKPOINT_BYTES,
    check_archive,
    check_state_dict,
    checkpoint_digest,
    checkpoint_limit,
    expected_bytes,
    parse_state_dict,
)
from lens_core.models.errors import CheckpointError, ModelError
from lens_core.models.loading import checkpoint_outputs, load_model, load_split_model
from lens_core.models.split import (
    Normalize,
    NormHead,
    SplitModel,
    probe_linear_head,
    probe_norm_head,
    split_model,
)

__all__ = [
    "CHECKPOINT_SIZE_FACTOR",
    "CHECKPOINT_SIZE_MARGIN",
    "ENTRY_POINT_GROUP",
    "FACTORY_ENV",
    "MAX_CHECKPOINT_BYTES",
    "CheckpointError",
    "ModelError",
    "NormHead",
    "Normalize",
    "SplitModel",
    "allowed_factories",
    "build_model",
    "check_archive",
    "check_state_dict",
    "checkpoint_digest",
    "checkpoint_limit",
    "checkpoint_outputs",
    "expected_bytes",
    "load_model",
    "load_split_model",
    "parse_state_dict",
    "probe_linear_head",
    "probe_norm_head",
    "resolve_factory",
    "split_model",
]
