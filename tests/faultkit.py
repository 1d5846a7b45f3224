"""Test-only fault injection for LENS runs that cross process boundaries (Dask workers, flow
processes).

`toy` is a model factory (`model.arch = "faultkit:toy"`, allowed through LENS_MODEL_FACTORIES,
which the `faults` fixture sets for every process of a test): the embedded toy CNN whose first block
reads a control file (path in env ``LENS_TEST_FAULTS``, JSON) on every real batch:
  {"slow": seconds}                      sleep that long per batch (stretch a stage)
  {"kill": "/path/marker", "after": n}   on the n-th batch of a process, create the marker file
                                         (exclusively: it fires once in all processes), then SIGKILL
                                         its own process: a worker dying mid-stage, mid-write.
Run as a script, it runs the build-atlas flow and writes its outcome as JSON (a flow process the
tests can kill): ``python faultkit.py flow SPEC.json RESULT.json``; or, with ``stages``, every
stage of every class in order through lens_core.pipeline (what the flow's tasks call): it writes
``RESULT.ready`` once set up and starts when ``SPEC.go`` (SPEC's suffix replaced) appears, so that
two such runs start their work at the same moment.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

CONTROL_ENV = "LENS_TEST_FAULTS"
_batches = 0


def control() -> dict[str, Any]:
    path = os.environ.get(CONTROL_ENV)
    if not path or not os.path.exists(path):
        return {}
    try:
        return json.loads(Path(path).read_text() or "{}")
    except json.JSONDecodeError:
        return {}


def _fault_hook(module: Any, args: tuple) -> None:
    global _batches
    if args[0].shape[0] <= 4:  # split_model's four-image check, not real work
        return
    _batches += 1
    ctl = control()
    if ctl.get("slow"):
        time.sleep(float(ctl["slow"]))
    marker = ctl.get("kill")
    if marker and _batches >= int(ctl.get("after", 2)):
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)


def toy(num_classes: int = 10):
    """The toy CNN with the fault hook on its first block (same weights and state-dict keys)."""
    from lens_core.toy.model import ToyCNN

    model = ToyCNN(num_classes=num_classes)
    model.block1.register_forward_pre_hook(_fault_hook)
    return model


def model_config() -> dict[str, Any]:
    """The [model] section that runs the shipped toy weights through `toy`."""
    from lens_core.toy import TOY_CHECKPOINT

    return {
        "arch": "faultkit:toy",
        "checkpoint": str(TOY_CHECKPOINT),
        "layer": "block4",
        "input_size": 64,
    }


def run_stages(spec_path: str, result_path: str) -> int:
    """Run every class's stages in one process (one torch thread, like a Dask worker)."""
    import torch

    from lens_core.config import make_config
    from lens_core.pipeline import prepare_run, run_class

    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    info = prepare_run(make_config(spec["config"], classes=spec.get("classes")))
    Path(result_path + ".ready").write_text("")
    while not Path(spec_path).with_suffix(".go").exists():
        time.sleep(0.01)
    computed = {
        slug: [r["stage"] for r in run_class(info, slug) if not r.get("skipped")]
        for slug in info.slugs
    }
    Path(result_path).write_text(json.dumps({"computed": computed}))
    return 0


def main(spec_path: str, result_path: str) -> int:
    """Run build-atlas from a spec {config, classes, workers}; write {state, message, result}."""
    from flows.atlas import build_atlas, make_task_runner

    spec = json.loads(Path(spec_path).read_text())
    runner = make_task_runner(workers=int(spec.get("workers", 1)))
    state = build_atlas.with_options(task_runner=runner)(
        config=spec["config"], classes=spec.get("classes"), return_state=True
    )
    result = state.result(raise_on_failure=False)
    out = {
        "state": state.name,
        "failed": state.is_failed(),
        "message": state.message,
        "result": result if isinstance(result, dict) else None,
    }
    Path(result_path).write_text(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit({"flow": main, "stages": run_stages}[sys.argv[1]](sys.argv[2], sys.argv[3]))
