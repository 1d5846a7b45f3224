"""Faults on the toy run: a Dask worker or the flow process killed mid-stage, S3 going away for a
while or for good, two runs of one checkpoint at once. Real LocalCluster, Prefect test server and
SeaweedFS; every outcome is checked against a clean run of the same configuration.

Faults are injected across processes through `faultkit` (a model factory whose forward reads a
control file: stall, or SIGKILL its own process once) and by stopping the S3 server's processes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import faultkit
import numpy as np
import pytest
from s3server import S3Server, start_s3_server

from lens_core.config import make_config
from lens_core.pipeline import CLASS_STAGES, prepare_run, run_class
from lens_core.store import RunStore

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent
CLASSES = ["0", "1"]
MARKERS = {"activations": "acts", "factorize": "concepts", "importance": "importance"}


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The control file `faultkit` reads in every process (Dask workers inherit the variable)."""
    path = tmp_path_factory.mktemp("faults") / "faults.json"
    path.write_text("{}")
    old = {k: os.environ.get(k) for k in (faultkit.CONTROL_ENV, "LENS_MODEL_FACTORIES")}
    os.environ[faultkit.CONTROL_ENV] = str(path)
    os.environ["LENS_MODEL_FACTORIES"] = (
        "faultkit:toy"  # the worker's allow-list (inherited by its processes)
    )
    yield path
    path.write_text("{}")
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    from lens_core.toy import ensure_toy_dataset

    return ensure_toy_dataset(f"file://{tmp_path_factory.mktemp('toy')}", 10, 8, 0)


def _config(data_url: str, store: str, publish: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": faultkit.model_config(),
        "data": {"url": data_url, "images_per_class": 8},
        "importance": {"images": 4, "n_designs": 16},
        "concepts": {"n_concepts": 6},
        "crops": {"per_concept": 4, "attribution_images": 1},
        "maco": {"steps": 6, "image_size": 64, "crops": 2, "batch_size": 12},
        "store": store,
        "publish": publish,
        **extra,
    }


def _arrays(store: RunStore, slug: str) -> dict[str, np.ndarray]:
    out = {}
    for prefix in MARKERS.values():
        group = store.zarr[f"{prefix}/{slug}"]
        for name in sorted(group.array_keys()):
            out[f"{prefix}/{name}"] = group[name][:]
    return out


@pytest.fixture(scope="module")
def reference(
    toy_data: str, faults: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, np.ndarray]]:
    """Every array of a clean in-process run of the same configuration (nothing killed or shared),
    on one thread like a Dask worker, so that the numbers match to the last bit."""
    import torch

    root = tmp_path_factory.mktemp("reference")
    info = prepare_run(
        make_config(
            _config(toy_data, f"file://{root}/store", f"file://{root}/site"), classes=CLASSES
        )
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for slug in info.slugs:
            run_class(info, slug)
    finally:
        torch.set_num_threads(threads)
    return {slug: _arrays(info.store(), slug) for slug in info.slugs}


def _assert_same_as_clean_run(store: RunStore, reference: dict[str, dict[str, np.ndarray]]) -> None:
    """Every class complete and whole: activations equal the clean run's; concepts and importance
    have its shapes and are internally consistent (U W reproduces A with the recorded error), so
    no group is torn, mixed from two writers, or marked complete while partial.

    (NMF stops on a tolerance, so last-bit differences between processes may move its result a
    little: concepts are compared by consistency, not bit for bit.)
    """
    for slug, ref in reference.items():
        for prefix in MARKERS.values():
            assert store.is_complete(f"{prefix}/{slug}"), (prefix, slug)
        assert store.files_complete(f"crops/{slug}"), slug
        got = _arrays(store, slug)
        assert got.keys() == ref.keys(), slug
        for key, want in ref.items():
            assert got[key].shape == want.shape, (slug, key, got[key].shape, want.shape)
            assert np.isfinite(got[key]).all(), (slug, key)
            if key.startswith("acts/") or key == "importance/image_positions":
                np.testing.assert_allclose(
                    got[key], want, rtol=1e-5, atol=1e-6, err_msg=f"{slug} {key}"
                )
        A, U, W = got["acts/A"], got["concepts/U"], got["concepts/W"]
        rel = np.linalg.norm(A - U @ W) / np.linalg.norm(A)
        recorded = store.zarr[f"concepts/{slug}"].attrs["rel_error"]
        assert abs(rel - recorded) < 1e-4 and abs(rel - _rel_error(ref)) < 0.01, (
            slug,
            rel,
            recorded,
        )
        assert sorted(got["importance/order"].tolist()) == list(range(W.shape[0]))


def _rel_error(arrays: dict[str, np.ndarray]) -> float:
    A, U, W = arrays["acts/A"], arrays["concepts/U"], arrays["concepts/W"]
    return float(np.linalg.norm(A - U @ W) / np.linalg.norm(A))


def _done(store: RunStore, slugs: list[str]) -> set[tuple[str, str]]:
    """(class, stage) pairs whose completion marker is in the store."""
    done = set()
    for slug in slugs:
        for stage in CLASS_STAGES:
            ok = (
                store.files_complete(f"crops/{slug}")
                if stage == "crops"
                else store.is_complete(f"{MARKERS[stage]}/{slug}")
            )
            if ok:
                done.add((slug, stage))
    return done


def _computed(result: dict[str, Any]) -> set[tuple[str, str]]:
    return {(slug, stage) for slug, stages in result["computed"].items() for stage in stages}


def _spawn_flow(
    api: str, cfg: dict[str, Any], workdir: Path, name: str, classes: list[str]
) -> subprocess.Popen:
    """The build-atlas flow in its own process group (its Dask cluster too), on the test API."""
    spec = workdir / f"{name}.spec.json"
    spec.write_text(json.dumps({"config": cfg, "classes": classes, "workers": 1}))
    home = workdir / f"{name}.prefect"
    home.mkdir(exist_ok=True)
    env = {
        "PREFECT_API_URL": api,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    result = workdir / f"{name}.result.json"
    return _faultkit("flow", spec, result, workdir / f"{name}.log", env, start_new_session=True)


def _faultkit(
    mode: str, spec: Path, result: Path, log: Path, env: dict[str, str], **popen: Any
) -> subprocess.Popen:
    """`faultkit.py MODE SPEC RESULT` in a child process (tests/ importable, `env` added to this
    environment), its output in `log`."""
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    with open(log, "wb") as out:  # the child holds its own copy of the file
        return subprocess.Popen(
            [sys.executable, str(TESTS / "faultkit.py"), mode, str(spec), str(result)],
            env={**os.environ, "PYTHONPATH": path, **env},
            cwd=TESTS.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
            **popen,
        )


def _outcome(
    proc: subprocess.Popen, workdir: Path, name: str, timeout: float = 300
) -> dict[str, Any]:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    result = workdir / f"{name}.result.json"
    log = (workdir / f"{name}.log").read_text(errors="replace")[-4000:]
    assert result.exists(), f"flow process {name} wrote no result (rc {proc.returncode}):\n{log}"
    return json.loads(result.read_text())


# ---- leases: one writer per stage and class ------------------------------------------------------


@pytest.fixture(params=["file", "s3"])
def lease_store(request: pytest.FixtureRequest, tmp_path: Path) -> RunStore:
    if request.param == "file":
        return RunStore(f"file://{tmp_path}/store", "run1")
    s3 = request.getfixturevalue("s3")
    return RunStore(f"s3://{s3.new_bucket()}/lens", "run1", s3.storage_options)


def test_lease_is_exclusive_and_taken_over_from_dead_holders(lease_store):
    """Six contenders never overlap; a holder whose pid is gone, or that stopped beating,
    is replaced."""
    inside, overlap, order = [0], [], []
    lock = threading.Lock()
    start = threading.Barrier(6)

    def work(i: int) -> None:
        start.wait()  # all at once on a free lease: only an atomic create lets exactly one in
        with lease_store.lease("activations/cls", poll=0.02):
            with lock:
                inside[0] += 1
                overlap.append(inside[0])
            time.sleep(0.05)
            with lock:
                inside[0] -= 1
                order.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(order) == list(range(6)) and max(overlap) == 1, overlap
    assert not [
        n for n in lease_store.list("locks/activations/cls") if n.endswith(".json")
    ]  # released

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    record = {
        "token": "dead",
        "host": socket.gethostname(),
        "pid": int(dead.stdout),
        "beats": 0,
        "ttl": 3600,
    }
    lease_store.write_json("locks/factorize/cls/00000000.json", record)
    t0 = time.monotonic()
    with lease_store.lease("factorize/cls", poll=0.05) as lease:
        assert lease.generation == 1 and time.monotonic() - t0 < 5
    silent = {"token": "silent", "host": "another-host", "pid": 1, "beats": 7, "ttl": 0.5}
    lease_store.write_json("locks/crops/cls/00000004.json", silent)
    t0 = time.monotonic()
    with lease_store.lease("crops/cls", poll=0.05) as lease:
        assert lease.generation == 5 and 0.5 <= time.monotonic() - t0 < 10
        assert lease.held()


def test_a_holder_whose_lease_was_taken_over_cannot_mark_its_stage_complete(lease_store):
    """A holder that stalled past its TTL was replaced; waking up, its completion marker is refused
    (LeaseLostError, retried as transient) and the group stays unmarked for the new holder."""
    from lens_core.store import LeaseLostError
    from tasks.wrapping import is_transient

    with lease_store.lease("activations/cls", ttl=3600) as lease:
        lease_store.group("acts/cls").create_array("A", shape=(2,), dtype="f4")
        lease_store.mark_files_complete("crops/mine")  # still ours: allowed
        taker = {"token": "new-holder", "host": "another-host", "pid": 1, "beats": 0, "ttl": 3600}
        lease_store.write_json(f"locks/activations/cls/{lease.generation + 1:08d}.json", taker)
        with pytest.raises(LeaseLostError) as err:
            lease_store.mark_complete("acts/cls")
        with pytest.raises(LeaseLostError):
            lease_store.mark_files_complete("crops/cls")
    assert is_transient(err.value)
    assert not lease_store.is_complete("acts/cls") and not lease_store.files_complete("crops/cls")
    assert lease_store.files_complete("crops/mine")
    lease_store.mark_complete("acts/cls")  # outside any lease: no fence
    assert lease_store.is_complete("acts/cls")


# ---- a Dask worker dies mid-stage ----------------------------------------------------------------


def test_worker_killed_mid_stage_is_retried_and_loses_nothing(
    prefect_api, faults, toy_data, reference, tmp_path
):
    """A worker SIGKILLs itself between two batches of an activations stage (half its arrays
    written): the nanny restarts it, the scheduler reruns the class, the run completes, and every
    array equals the clean run's: the half-written group was redone, never marked complete."""
    from flows.atlas import build_atlas, make_task_runner
    from flows.cli import status_table

    marker = tmp_path / "killed"
    faults.write_text(json.dumps({"kill": str(marker), "after": 3}))  # the 2nd batch of a class
    cfg = _config(toy_data, f"file://{tmp_path}/store", f"file://{tmp_path}/site")
    try:
        state = build_atlas.with_options(task_runner=make_task_runner(workers=2))(
            config=cfg, classes=CLASSES, return_state=True
        )
    finally:
        faults.write_text("{}")
    assert marker.exists(), "no worker was killed: the fault did not fire"
    assert state.is_completed() and state.name == "Completed", state.message
    info = prepare_run(make_config(cfg, classes=CLASSES))
    store = info.store()
    _assert_same_as_clean_run(store, reference)
    assert all(r["state"] == "completed" for r in status_table(store))
    assert not any(store.list(f"locks/{stage}") for stage in CLASS_STAGES)  # leases released


# ---- the flow process dies and is started again --------------------------------------------------


def test_flow_process_killed_and_restarted_reruns_only_unfinished_stages(
    prefect_api, faults, toy_data, tmp_path
):
    cfg = _config(toy_data, f"file://{tmp_path}/store", f"file://{tmp_path}/site")
    info = prepare_run(make_config(cfg, classes=CLASSES))
    store = info.store()
    every = {(s, st) for s in info.slugs for st in CLASS_STAGES}
    faults.write_text(json.dumps({"slow": 0.25}))  # seconds per batch: the kill lands mid-run
    proc = _spawn_flow(prefect_api, cfg, tmp_path, "first", CLASSES)
    deadline = time.monotonic() + 240
    try:
        while True:
            done = _done(store, info.slugs)
            finished = {s for s in info.slugs if all((s, st) in done for st in CLASS_STAGES)}
            if finished and len(done) < len(every):
                break
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the first run made no progress"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the flow process and its Dask cluster
        proc.wait()
        faults.write_text("{}")
    done_at_kill = _done(store, info.slugs)
    assert done_at_kill and done_at_kill != every

    restarted = time.time()
    out = _outcome(_spawn_flow(prefect_api, cfg, tmp_path, "second", CLASSES), tmp_path, "second")
    assert out["state"] == "Completed", out["message"]
    todo = every - done_at_kill
    assert _computed(out["result"]) == todo  # unfinished stages, and only those, ran again
    records = {(s, st): store.read_json(f"status/{s}/{st}.json") or {} for s, st in every}
    timed = {
        key
        for key, rec in records.items()
        if rec.get("at", 0) > restarted and rec.get("seconds") is not None
    }
    assert timed == todo  # the status files agree: fresh timings for the recomputed stages only
    assert _done(store, info.slugs) == every


# ---- two runs of the same checkpoint at once -----------------------------------------------------


def test_two_runs_of_one_checkpoint_at_once_share_the_work(faults, toy_data, reference, tmp_path):
    """Two processes run every stage of the same run on one store, starting the same instant (the
    stage code the flow's tasks call). Each stage of each class is computed by exactly one of them:
    the other waits on the stage's lease, then finds the marker and reuses the result; the store
    ends whole and consistent."""
    cfg = _config(toy_data, f"file://{tmp_path}/store", f"file://{tmp_path}/site")
    info = prepare_run(make_config(cfg, classes=CLASSES))
    env = {"LENS_LEASE_POLL_S": "0.1"}
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"config": cfg, "classes": CLASSES}))
    faults.write_text(json.dumps({"slow": 0.5}))  # activations take seconds: both meet on them
    procs = {}
    try:
        for name in ("a", "b"):
            result, log = tmp_path / f"{name}.json", tmp_path / f"{name}.log"
            procs[name] = _faultkit("stages", spec, result, log, env)
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"{name}.json.ready").exists() for name in procs):
            assert all(p.poll() is None for p in procs.values()) and time.monotonic() < deadline
            time.sleep(0.05)
        (tmp_path / "spec.go").write_text("")
        for name, proc in procs.items():
            proc.wait(timeout=240)
            assert proc.returncode == 0, (
                name,
                (tmp_path / f"{name}.log").read_text(errors="replace")[-4000:],
            )
    finally:
        faults.write_text("{}")
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    a, b = (_computed(json.loads((tmp_path / f"{n}.json").read_text())) for n in ("a", "b"))
    assert not a & b, f"computed twice: {sorted(a & b)}"
    assert a | b == {(s, st) for s in info.slugs for st in CLASS_STAGES}
    _assert_same_as_clean_run(info.store(), reference)


def test_two_whole_flows_of_one_checkpoint_at_once_share_the_work_and_the_site(
    prefect_api, faults, own_s3, toy_data, reference, tmp_path
):
    """Two build-atlas flows (each its own process and Dask cluster) of one configuration, started
    together on one S3 store and one S3 publish URL, overlap in time; between them every stage of
    every class is computed exactly once, both complete, the store equals a clean run, no lease is
    left behind and the published site is whole (every class page, viz and the runs page)."""
    import s3fs

    bucket = own_s3.new_bucket()
    cfg = _config(
        toy_data,
        f"s3://{bucket}/lens",
        f"s3://{bucket}/site",
        storage_options={"endpoint_url": own_s3.endpoint_url},
    )
    info = prepare_run(make_config(cfg, classes=CLASSES))
    every = {(s, st) for s in info.slugs for st in CLASS_STAGES}
    faults.write_text(json.dumps({"slow": 0.5}))  # activations take seconds: the flows meet on them
    procs: dict[str, subprocess.Popen] = {}
    out, ended = {}, {}
    try:
        procs = {
            name: _spawn_flow(prefect_api, cfg, tmp_path, name, CLASSES) for name in ("a", "b")
        }
        for name, proc in procs.items():
            out[name] = _outcome(proc, tmp_path, name)
            ended[name] = (tmp_path / f"{name}.result.json").stat().st_mtime
    finally:
        faults.write_text("{}")
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for name, o in out.items():
        assert o["state"] == "Completed", (name, o["message"])
    started = {name: ended[name] - out[name]["result"]["seconds"] for name in out}
    assert max(started.values()) < min(ended.values()), (
        "the two flows did not overlap",
        started,
        ended,
    )
    a, b = (_computed(out[name]["result"]) for name in ("a", "b"))
    assert not a & b, f"computed twice: {sorted(a & b)}"
    assert a | b == every
    store = info.store()
    _assert_same_as_clean_run(store, reference)
    # no lease record left (SeaweedFS keeps emptied folders, so look for the records themselves)
    left = [p for p in store.fs.find(store.path("locks")) if p.endswith(".json")]
    assert not left, left
    fs = s3fs.S3FileSystem(
        endpoint_url=own_s3.endpoint_url,
        key=own_s3.key,
        secret=own_s3.secret,
        skip_instance_cache=True,
    )
    site = f"{bucket}/site/{info.run_id}"
    for slug in info.slugs:
        assert store.files_complete(f"viz/{slug}")
        page = fs.cat_file(f"{site}/classes/{slug}/index.html").decode()
        k = store.zarr[f"concepts/{slug}/W"].shape[0]
        for c in range(k):
            assert fs.exists(f"{site}/assets/viz/{slug}/{c}.png"), (slug, c)
        assert page.count('<li id="concept-') == min(k, 10), slug
    assert f'href="{info.run_id}/index.html"' in fs.cat_file(f"{bucket}/site/index.html").decode()
    assert json.loads(fs.cat_file(f"{site}/run.json"))["run_id"] == info.run_id


# ---- S3 goes away --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> S3Server:
    """A SeaweedFS server of this module's own, which the tests stop and start again."""
    server = start_s3_server(tmp_path_factory.mktemp("weed-faults"))
    yield server
    server.stop()


@pytest.fixture
def own_s3(weed: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The module's server, running (a previous test may have stopped it);
    credentials in the env."""
    weed.start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", weed.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", weed.secret)
    return weed


def test_store_operations_wait_out_an_outage(own_s3):
    """Files and Zarr writes issued while the server is down complete once it is back."""
    bucket = own_s3.new_bucket()
    store = RunStore(f"s3://{bucket}/lens", "run1", own_s3.storage_options)
    store.write_json("before.json", {"n": 1})
    group = store.group("acts/x", fresh=True)
    own_s3.kill()
    back = threading.Timer(10.0, own_s3.start)  # longer than botocore's own retries (~6 s)
    back.start()
    t0 = time.monotonic()
    try:
        store.write_json("during.json", {"n": 2})
        group.create_array("A", data=np.arange(12, dtype=np.float32).reshape(3, 4))
        store.mark_complete("acts/x", n=3)
    finally:
        back.join()
    assert time.monotonic() - t0 > 8
    again = RunStore(f"s3://{bucket}/lens", "run1", own_s3.storage_options)
    assert again.read_json("during.json") == {"n": 2} and again.is_complete("acts/x")
    np.testing.assert_array_equal(again.zarr["acts/x/A"][:], np.arange(12).reshape(3, 4))


def _stop_when_a_class_has_activations(
    server: S3Server,
    store: RunStore,
    slugs: list[str],
    down_for: float | None,
    log: dict[str, float],
) -> None:
    """Kill the S3 server once any class has finished activations;
    start it again after `down_for`."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if any(
            (store.read_json(f"status/{s}/activations.json") or {}).get("state") == "completed"
            for s in slugs
        ):
            break
        time.sleep(0.2)
    server.kill()
    log["down"] = time.time()
    if down_for is not None:
        time.sleep(down_for)
        server.start()
        log["up"] = time.time()


def test_flow_rides_out_an_s3_outage(prefect_api, own_s3, toy_data, reference, tmp_path):
    """S3 dies mid-run (writes in flight) for ~12 s and comes back: the run completes,
    nothing lost."""
    from flows.atlas import build_atlas, make_task_runner

    bucket = own_s3.new_bucket()
    cfg = _config(
        toy_data,
        f"s3://{bucket}/lens",
        f"file://{tmp_path}/site",
        storage_options={"endpoint_url": own_s3.endpoint_url},
    )
    info = prepare_run(make_config(cfg, classes=CLASSES))
    times: dict[str, float] = {}
    outage = threading.Thread(
        target=_stop_when_a_class_has_activations,
        args=(own_s3, info.store(), info.slugs, 8.0, times),
    )
    outage.start()
    state = build_atlas.with_options(task_runner=make_task_runner(workers=2))(
        config=cfg, classes=CLASSES, return_state=True
    )
    ended = time.time()
    outage.join()
    assert times["down"] < ended, "the outage came after the run"
    assert state.is_completed() and state.name == "Completed", state.message
    _assert_same_as_clean_run(info.store(), reference)


def test_store_down_for_good_fails_clearly_and_keeps_the_published_site(
    prefect_api, own_s3, toy_data, tmp_path, monkeypatch
):
    """S3 dies mid-run and stays down: the run fails with a message naming the store URL (and no
    credential), and the published site is left exactly as it was: no partial index."""
    from flows.atlas import build_atlas, make_task_runner

    monkeypatch.setenv("LENS_STORE_RETRY_S", "2")  # give up quickly (workers inherit it) ...
    site = tmp_path / "site"
    (site / "old-run").mkdir(parents=True)
    (site / "index.html").write_text("<p>the atlas published before</p>")
    (site / "old-run" / "index.html").write_text("<p>old run</p>")
    before = {p: p.read_bytes() for p in site.rglob("*") if p.is_file()}
    bucket = own_s3.new_bucket()
    fast = {"retries": {"total_max_attempts": 1}}  # ... and so does botocore
    cfg = _config(
        toy_data,
        f"s3://{bucket}/lens",
        f"file://{site}",
        storage_options={"endpoint_url": own_s3.endpoint_url, "config_kwargs": fast},
    )
    info = prepare_run(make_config(cfg, classes=CLASSES))
    times: dict[str, float] = {}
    outage = threading.Thread(
        target=_stop_when_a_class_has_activations,
        args=(own_s3, info.store(), info.slugs, None, times),
    )
    outage.start()
    state = build_atlas.with_options(task_runner=make_task_runner(workers=2))(
        config=cfg, classes=CLASSES, return_state=True
    )
    outage.join()
    assert state.is_failed(), (state.name, state.message)
    message = state.message or ""
    assert f"s3://{bucket}/lens" in message and "unreachable" in message, message
    assert own_s3.secret not in message and own_s3.key not in message
    assert {p: p.read_bytes() for p in site.rglob("*") if p.is_file()} == before
