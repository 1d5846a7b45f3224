"""The smallest configuration that runs every stage of the toy atlas, shared by the tests that
need a whole run but not its numbers."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

TINY: dict[str, Any] = {
    "data": {"toy_images_per_class": 3, "images_per_class": 3},
    "patches": {"grid": 2},
    "concepts": {"n_concepts": 3},
    "importance": {"n_designs": 4, "images": 2},
    "crops": {"per_concept": 2, "attribution_images": 1},
    "maco": {"steps": 2, "image_size": 64, "crops": 2},
}


def tiny_config(root: Path, **sections: Any) -> dict[str, Any]:
    """TINY with its store and site under `root`; `sections` replace TINY's whole sections."""
    return {
        **TINY,
        "store": f"file://{root}/store",
        "publish": f"file://{root}/site",
        **sections,
    }


def write_toml(cfg: dict[str, Any], path: Path) -> Path:
    """`cfg` (top-level scalars and one level of sections) as a TOML file: JSON scalars are TOML."""
    top = [f"{k} = {json.dumps(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    sections = [
        f"[{k}]\n" + "\n".join(f"{kk} = {json.dumps(vv)}" for kk, vv in v.items())
        for k, v in cfg.items()
        if isinstance(v, dict)
    ]
    path.write_text("\n".join(top) + "\n" + "\n".join(sections) + "\n")
    return path


def run_isolated(cmd: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`cmd` (a `lens run`) with its own Prefect home and temporary API, one Dask worker, quiet
    logs; stdout and stderr captured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), LENS_WORKERS="1", LENS_LOG="WARNING")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
