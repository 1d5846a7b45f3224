"""The embedded toy default: synthetic part-based classes and a small CNN trained on them.

TOY_CHECKPOINT is the shipped state_dict (safetensors) of ToyCNN(10); TOY_METRICS its json
(accuracy, seed, input size, training time). Retrain with `python -m lens_core.toy.train`.
"""

from pathlib import Path

from lens_core.toy.generator import (
    DISTRACTOR_PARTS,
    MASK_ENCODING,
    OWN_PARTS,
    PART_NAMES,
    class_names,
    class_parts,
    ensure_toy_dataset,
    image_seed,
    read_mask,
    render_image,
)
from lens_core.toy.model import ToyCNN

TOY_DIR = Path(__file__).resolve().parent
TOY_CHECKPOINT: Path = TOY_DIR / "toy_cnn.safetensors"
TOY_METRICS: Path = TOY_DIR / "toy_cnn.json"

__all__ = [
    "DISTRACTOR_PARTS",
    "MASK_ENCODING",
    "OWN_PARTS",
    "PART_NAMES",
    "TOY_CHECKPOINT",
    "TOY_METRICS",
    "ToyCNN",
    "class_names",
    "class_parts",
    "ensure_toy_dataset",
    "image_seed",
    "read_mask",
    "render_image",
]
