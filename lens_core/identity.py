"""Run and class identity, in one place: what a run id and a class fingerprint are hashes of.

A run is one checkpoint of one model on one data set with one method configuration:
run_id = short hash(checkpoint digest, data URL, method config). A class is its directory id and
its label index, never its slug alone: the activations stage records a fingerprint of what it was
computed from (class dir, label index, the sampled image list) in its completion marker, and a
marker whose fingerprint differs from the current one is not complete (`lens_core.layout`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from typing import Any

from lens_core.urls import join_url, normalize_url

RUN_ID_RE = re.compile(r"[0-9a-f]{12}")  # matched whole (fullmatch): no trailing newline


def short_hash(obj: Any, n: int = 12) -> str:
    """Stable short hash of a JSON-serializable object."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def is_run_id(text: Any) -> bool:
    """True for the run ids this project generates (12 lowercase hex digits), nothing else."""
    return isinstance(text, str) and bool(RUN_ID_RE.fullmatch(text))


def run_id_inputs(checkpoint_digest: str, data_url: str, config: Any) -> dict[str, Any]:
    """What a run id hashes: checkpoint digest, data URL and the method config."""
    return {"ckpt": checkpoint_digest, "data": data_url, "method": config.method_dict()}


def compute_run_id(checkpoint_digest: str, data_url: str, config: Any) -> str:
    """run_id = short hash(checkpoint digest, data URL, method config): 12 hex digits."""
    return short_hash(run_id_inputs(checkpoint_digest, data_url, config))


def image_key(url: str) -> str:
    """An image's identity independent of the store it is read from: class dir + file name."""
    return "/".join(url.rstrip("/").split("/")[-2:])


def class_inputs(class_dir: str, label_index: int, image_urls: Iterable[str]) -> dict[str, Any]:
    """What a class's stages are computed from: recorded in their markers (see module doc)."""
    images = [image_key(u) for u in image_urls]
    return {
        "class_dir": class_dir,
        "label_index": int(label_index),
        "n_sampled": len(images),
        "fingerprint": short_hash(
            {"dir": class_dir, "index": int(label_index), "images": images}, 16
        ),
    }


def toy_data_url(store_url: str, toy_classes: int, toy_images_per_class: int, seed: int) -> str:
    """Root of the generated toy data set inside a store (its images are under `<root>/images`)."""
    return join_url(
        normalize_url(store_url), "toy-data", f"c{toy_classes}-n{toy_images_per_class}-s{seed}"
    )


def planned_data_url(config: Any) -> str:
    """The data URL a run of `config` reads (part of its run id), without generating anything."""
    if config.data.url:
        return normalize_url(config.data.url)
    d = config.data
    return join_url(
        toy_data_url(config.store, d.toy_classes, d.toy_images_per_class, d.seed), "images"
    )
