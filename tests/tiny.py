"""The smallest configuration that runs every stage of the toy atlas, shared by the tests that
need a whole run but not its numbers."""

from __future__ import annotations

from typing import Any

TINY: dict[str, Any] = {
    "data": {"toy_images_per_class": 3, "images_per_class": 3},
    "patches": {"grid": 2},
    "concepts": {"n_concepts": 3},
    "importance": {"n_designs": 4, "images": 2},
    "crops": {"per_concept": 2, "attribution_images": 1},
    "maco": {"steps": 2, "image_size": 64, "crops": 2},
}
