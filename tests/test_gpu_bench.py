"""bench/gpu.sh cannot rot: its --cpu-smoke run (every part, tiny sizes, CPU) writes a gpu.json with
every part and sane values; and the GPU cluster works without dask-cuda (one pinned worker per
GPU)."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import distributed
import pytest

import flows.cluster as cluster_mod
from lens_core import layout

REPO = Path(__file__).resolve().parents[1]


def _finite_positive(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_cpu_smoke_writes_every_part_with_sane_values(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LENS_GPU", "LENS_DASK_ADDRESS")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    proc = subprocess.run(
        [str(REPO / "bench/gpu.sh"), "--cpu-smoke", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert res["mode"] == "cpu-smoke" and res["device"] == "cpu"
    assert res["errors"] == {}
    assert set(res["part_seconds"]) == {"activations", "maco", "nmf", "e2e"}
    sizes = res["sizes"]

    act = res["activations"]
    assert [r["precision"] for r in act["rows"]] == ["fp32", "bf16"]
    assert act["patches"] == act["images"] * 16
    for r in act["rows"]:
        assert _finite_positive(r["ours_patches_s"]) and _finite_positive(r["bare_patches_s"])
        assert 0.01 < r["ours_vs_bare"] < 100

    mac = res["maco"]
    lens_rows = [r for r in mac["rows"] if r["impl"] == "lens"]
    assert sorted(r["B"] for r in lens_rows if r["precision"] == "bf16") == sizes["maco_batches"]
    assert any(r["precision"] == "fp32" for r in lens_rows)
    for r in mac["rows"]:
        assert _finite_positive(r["s_per_concept"]) and math.isfinite(r["objective_mean"])
    assert mac["horama"] == "installed" or mac["horama"].startswith("not installed")
    assert (mac["horama"] == "installed") == any(
        r["impl"].startswith("horama") for r in mac["rows"]
    )

    nmf = res["nmf"]
    assert nmf["shape"] == sizes["nmf_shape"] and nmf["k"] == sizes["nmf_k"]
    assert nmf["torch"]["reached_sklearn_error"]
    assert abs(nmf["torch"]["rel_error"] - nmf["sklearn"]["rel_error"]) < 1e-3
    assert 0 < nmf["sklearn"]["rel_error"] < 1 and _finite_positive(nmf["speedup"])

    e2e = res["e2e"]
    assert e2e["returncode"] == 0 and not e2e["lens_gpu"]
    assert e2e["classes_completed"] == e2e["classes"] == sizes["e2e_classes"]
    assert set(layout.CLASS_STAGES) <= set(e2e["stage_s_per_class"])
    assert all(e2e["stage_classes"][s] == e2e["classes"] for s in layout.CLASS_STAGES)
    assert all(_finite_positive(v) for v in e2e["stage_s_per_class"].values())
    assert e2e["gpu_util"] is None and "nvidia-smi" in e2e["gpu_util_note"]
    assert (
        _finite_positive(e2e["classes_and_renders_s"])
        and e2e["classes_and_renders_s"] <= e2e["wall_s"]
    )
    assert all(_finite_positive(v) for v in e2e["gpu_hours_1000_classes"].values())

    md = (tmp_path / "gpu.md").read_text()
    for title in ("## Activations", "## MACO", "## NMF", "## End to end"):
        assert title in md


def test_gpu_devices_follow_cuda_visible_devices_and_refuse_none() -> None:
    assert cluster_mod.gpu_devices(None, 2) == ["0", "1"]
    assert cluster_mod.gpu_devices("3, 5", 2) == ["3", "5"]
    assert cluster_mod.gpu_devices("GPU-ab12,GPU-cd34", 1) == ["GPU-ab12"]  # what torch sees
    with pytest.raises(RuntimeError, match="no CUDA device.*unset LENS_GPU"):
        cluster_mod.gpu_devices(None, 0)
    with pytest.raises(RuntimeError, match="CUDA_VISIBLE_DEVICES=''"):
        cluster_mod.gpu_devices("", 0)


def test_gpu_cluster_without_dask_cuda_pins_one_worker_per_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """LENS_GPU=1 without dask-cuda: a plain LocalCluster (TLS, as every LENS cluster), one worker
    per visible GPU with CUDA_VISIBLE_DEVICES set to it alone and resources {"GPU": 1}; no GPU at
    all is a clear error. (Fake device ids: the workers only see the variable on this CPU
    machine.)"""
    monkeypatch.setattr(cluster_mod, "_dask_cuda", lambda: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("LENS_DASK_LOCAL_TLS", raising=False)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        cluster_mod.local_cluster(
            gpu=True, resources={"GPU": 1}, dashboard_address=None, preload=[]
        )
    monkeypatch.setattr(cluster_mod, "gpu_devices", lambda: ["3", "5"])
    with cluster_mod.local_cluster(
        gpu=True, resources={"GPU": 1}, dashboard_address=None, preload=[]
    ) as cluster:
        assert isinstance(cluster, cluster_mod.GPUCluster)
        assert cluster.scheduler_address.startswith("tls://")
        with distributed.Client(cluster, set_as_default=False) as client:
            seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
            workers = client.scheduler_info()["workers"].values()
        assert sorted(seen.values()) == ["3", "5"]
        assert [w["resources"] for w in workers] == [{"GPU": 1}, {"GPU": 1}]
        assert all(w["nthreads"] == 1 for w in workers)


def test_gpu_sampler_parses_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The e2e part's utilisation sampler reads nvidia-smi's CSV loop (a stand-in script here)."""
    import sys
    import time

    sys.path.insert(0, str(REPO / "bench"))
    import gpu_bench

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '37, 1024\\n55, 2048\\nnot a sample\\n'\nexec sleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with gpu_bench.GpuSampler(period_ms=100) as sampler:
        deadline = time.monotonic() + 10
        while len(sampler.samples) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    summary = sampler.summary()
    assert summary is not None and summary["samples"] == 2
    assert (
        summary["util_mean"] == 46
        and summary["mem_max_mib"] == 2048
        and summary["util_busy_share"] == 1
    )
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with gpu_bench.GpuSampler() as none:
        pass
    assert none.summary() is None
