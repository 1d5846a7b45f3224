"""Deployments end to end: a real `prefect server`, `prefect deploy --all` from deploy/prefect.yaml,
a process worker, checkpoints on a real S3 server (SeaweedFS, credentials enforced), the checkpoint
watcher (exactly one build-atlas run per new checkpoint, even when watchers overlap) and the
`lens.checkpoint.created` event trigger."""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import read_task_runs

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POOL = "lens-process"
BUILD = "build-atlas/build-atlas"
WATCH = "watch-checkpoints/watch-checkpoints"
STAGES = ("activations", "factorize", "importance", "crops")


# ---- processes ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    """A background process in its own process group, its output in a log file."""

    name: str
    popen: subprocess.Popen
    log: Path

    def tail(self, n: int = 6000) -> str:
        return f"--- {self.name} log ({self.log}) ---\n" + self.log.read_text(errors="replace")[-n:]

    def stop(self, signals: int = 2, grace: float = 15.0) -> None:
        """SIGTERM the group (again after `grace`: a worker may need two), then SIGKILL."""
        for _ in range(signals):
            if self.popen.poll() is not None:
                return
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)


def _start(name: str, argv: list[str], env: dict[str, str], logdir: Path) -> Proc:
    log = logdir / f"{name}.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen(
            argv,
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Proc(name, popen, log)


@dataclass
class Stack:
    """The server, the worker and what the tests share: URLs, env, the S3 layout."""

    api: str
    env: dict[str, str]
    home: Path
    bucket: str
    config_path: Path
    prefix: str
    s3: Any
    procs: list[Proc] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def logs(self) -> str:
        return "\n".join(p.tail() for p in self.procs)

    def wait(self, what: str, probe: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
        """Poll `probe` until it returns something truthy; fail with the server/worker logs."""
        deadline = time.monotonic() + timeout
        while True:
            value = probe()
            if value:
                return value
            for p in self.procs:
                if p.popen.poll() is not None:
                    pytest.fail(
                        f"{p.name} exited ({p.popen.returncode}) "
                        f"while waiting for {what}\n{self.logs()}"
                    )
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")
            time.sleep(every)

    def prefect(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "prefect"), "--no-prompt", *args],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def _clean_env() -> dict[str, str]:
    """This environment without Prefect settings or S3 credentials (each process gets its own)."""
    drop = ("PREFECT_", "AWS_", "LENS_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def _start_server(root: Path, settings: dict[str, str]) -> tuple[str, dict[str, str], Path, Proc]:
    """A Prefect server on a free loopback port, with a home of its own under `root` and
    `settings` added: its API URL, the environment its clients share, the home, the process."""
    home = root / "prefect-home"
    home.mkdir()
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    base = {
        **_clean_env(),
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_COLORS": "false",
    }
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    return api, base, home, _start("server", cmd, {**base, **settings}, root)


def _healthy(api: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _tiny_config(bucket: str, endpoint: str) -> str:
    """A quick build-atlas config (2 toy classes, 8 images each) with the store and site on S3."""
    return f"""
store = "s3://{bucket}/lens"
publish = "s3://{bucket}/site"
classes = ["0", "1"]
storage_options = {{ endpoint_url = "{endpoint}" }}
[data]
images_per_class = 8
toy_images_per_class = 8
[importance]
images = 2
n_designs = 8
[concepts]
n_concepts = 4
[crops]
per_concept = 2
attribution_images = 1
[maco]
steps = 4
image_size = 64
crops = 2
batch_size = 8
"""


def _drain_prefect_services() -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        service.drain_all(timeout=10)


@pytest.fixture(scope="module")
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """Server -> work pool -> worker + `prefect deploy --all`; stopped worker first, then server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = tmp_path_factory.mktemp("deploy")
    # the interval schedule is applied but not run by this server: only the test's triggers make
    # runs
    api, base, home, server = _start_server(
        root, {"PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"}
    )
    procs = [server]
    try:
        s3 = request.getfixturevalue("s3")  # SeaweedFS starts while the server boots
        bucket = s3.new_bucket()
        config_path = root / "atlas.toml"
        config_path.write_text(_tiny_config(bucket, s3.endpoint_url))
        st = Stack(api, base, home, bucket, config_path, f"s3://{bucket}/checkpoints", s3, procs)
        st.wait("the Prefect server's /api/health", lambda: _healthy(api), timeout=90, every=0.5)
        with temporary_settings(updates={PREFECT_API_URL: api}):
            from prefect.client.orchestration import get_client
            from prefect.client.schemas.actions import WorkPoolCreate
            from prefect.workers.process import ProcessWorker

            with get_client(sync_client=True) as client:
                client.create_work_pool(
                    WorkPoolCreate(
                        name=POOL,
                        type="process",
                        base_job_template=ProcessWorker.get_default_base_job_template(),
                    )
                )
        # credentials reach flow runs (and their Dask workers) through the worker's environment only
        worker_env = {
            **base,
            "LENS_WORKERS": "1",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_PREFETCH_SECONDS": "5",
            "AWS_ACCESS_KEY_ID": s3.key,
            "AWS_SECRET_ACCESS_KEY": s3.secret,
        }
        procs.append(
            _start(
                "worker",
                [str(BIN / "prefect"), "worker", "start", "--pool", POOL],
                worker_env,
                root,
            )
        )
        st.env = {
            **base,
            "LENS_REPO": str(REPO),
            "LENS_CONFIG": str(config_path),
            "LENS_CHECKPOINTS": st.prefix,
        }
        t0 = time.monotonic()
        deployed = st.prefect(
            "deploy", "--all", "--prefect-file", "deploy/prefect.yaml", timeout=180
        )
        st.facts["deploy_seconds"] = time.monotonic() - t0
        assert deployed.returncode == 0, (
            f"prefect deploy failed:\n{deployed.stdout}\n{deployed.stderr}\n{st.logs()}"
        )
        yield st
    finally:
        _drain_prefect_services()  # this process's logs and events go out while the server is up
        for p in reversed(procs):  # worker before server
            p.stop(signals=2 if p.name == "worker" else 1)


@pytest.fixture(scope="module")
def s3_creds(stack: Stack) -> Iterator[None]:
    """The in-process watcher reads S3 with credentials from the environment, as a worker would."""
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = (
        stack.s3.key,
        stack.s3.secret,
    )
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def api(stack: Stack) -> Iterator[Stack]:
    """The test's own Prefect client and in-process flows talk to the stack's server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack.api}):
        yield stack


# ---- Prefect API helpers ----------------------------------------------------------------------


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _runs_of(deployment: str, tag: str | None = None) -> list[Any]:
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterTags,
    )

    with _client() as c:
        dep = c.read_deployment_by_name(deployment)
        flt = FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[dep.id]),
            tags=FlowRunFilterTags(all_=[tag]) if tag else None,
        )
        return c.read_flow_runs(flow_run_filter=flt, limit=100)


def _flow_run(flow_run_id: Any) -> Any:
    with _client() as c:
        return c.read_flow_run(flow_run_id)


def _final(st: Stack, flow_run_id: Any, what: str, timeout: float) -> Any:
    return st.wait(
        what, lambda: (fr := _flow_run(flow_run_id)).state and fr.state.is_final() and fr, timeout
    )


def _put_checkpoint(st: Stack, url: str, epoch: int | None) -> str:
    """The shipped toy checkpoint, or the same weights re-saved with metadata (a new digest)."""
    from safetensors.torch import load, save

    from lens_core.toy import TOY_CHECKPOINT

    blob = TOY_CHECKPOINT.read_bytes()
    if epoch is not None:
        blob = save(load(blob), metadata={"epoch": str(epoch)})
    st.s3.filesystem().pipe_file(url[len("s3://") :], blob)
    return url


def _planned(st: Stack, ckpt: str) -> tuple[str, Any]:
    from flows.watch import planned_run_id
    from lens_core.config import config_from_parameters
    from lens_core.models import checkpoint_digest

    cfg = config_from_parameters(str(st.config_path), checkpoint=ckpt)
    return planned_run_id(
        cfg,
        checkpoint_digest(ckpt, {**cfg.storage_options, "key": st.s3.key, "secret": st.s3.secret}),
    ), cfg


# ---- unit tests (no server) --------------------------------------------------------------------


def test_planned_run_id_is_build_atlas_run_id_without_side_effects(tmp_path: Path) -> None:
    from flows.watch import planned_data_url, planned_run_id
    from lens_core.config import config_from_parameters
    from lens_core.models import checkpoint_digest
    from lens_core.pipeline import prepare_run
    from lens_core.toy import TOY_CHECKPOINT

    ckpt = tmp_path / "ckpt" / "a.safetensors"
    ckpt.parent.mkdir()
    ckpt.write_bytes(TOY_CHECKPOINT.read_bytes())
    store = tmp_path / "store"
    inline = {
        "data": {"toy_classes": 2, "toy_images_per_class": 2, "images_per_class": 2},
        "concepts": {"n_concepts": 4},
    }
    cfg = config_from_parameters(
        None, inline, f"file://{ckpt}", ["0"], str(store), str(tmp_path / "site")
    )
    planned = planned_run_id(cfg, checkpoint_digest(str(ckpt)))
    assert not store.exists()  # the watcher writes nothing, not even the toy data set
    info = prepare_run(cfg)
    assert (info.run_id, info.data_url) == (planned, planned_data_url(cfg))
    # a real data URL is taken as is; another checkpoint digest is another run
    real = config_from_parameters(
        None, {**inline, "data": {**inline["data"], "url": info.data_url}}, f"file://{ckpt}"
    )
    assert planned_data_url(real) == info.data_url
    assert planned_run_id(cfg, "0" * 64) != planned


def test_atlas_config_merges_like_build_atlas(tmp_path: Path) -> None:
    from lens_core.config import config_from_parameters

    toml = tmp_path / "a.toml"
    toml.write_text('store = "s3://b/lens"\nclasses = ["x"]\n[maco]\nsteps = 9\nimage_size = 32\n')
    cfg = config_from_parameters(
        str(toml), {"maco": {"steps": 5}}, "s3://b/c.pt", ["0", "1"], None, "s3://b/site"
    )
    # inline fields over the file, per section
    assert (cfg.maco.steps, cfg.maco.image_size) == (
        5,
        32,
    )
    assert cfg.model.checkpoint == "s3://b/c.pt" and cfg.classes == ["0", "1"]
    assert cfg.store == "s3://b/lens" and cfg.publish == "s3://b/site"
    assert config_from_parameters(str(toml)).classes == ["x"]


def test_list_checkpoints_finds_checkpoint_files_recursively(tmp_path: Path) -> None:
    from flows.watch import list_checkpoints

    for name in (
        "a.pt",
        "sub/b.safetensors",
        "sub/deeper/c.CKPT",
        "d.pth",
        "notes.txt",
        "e.pt.tmp",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = list_checkpoints(str(tmp_path))
    assert found == sorted(
        f"file://{tmp_path}/{n}"
        for n in ("a.pt", "d.pth", "sub/b.safetensors", "sub/deeper/c.CKPT")
    )
    assert list_checkpoints(f"file://{tmp_path}/sub/b.safetensors") == [
        f"file://{tmp_path}/sub/b.safetensors"
    ]
    assert list_checkpoints(str(tmp_path / "missing")) == []


def test_digest_cache_reads_a_checkpoint_again_only_when_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    import flows.watch as watch

    reads: list[str] = []
    real = watch.checkpoint_digest
    monkeypatch.setattr(
        watch, "checkpoint_digest", lambda url, so=None: reads.append(url) or real(url, so)
    )
    ckpt = tmp_path / "ckpt" / "a.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"weights-1")
    store = f"file://{tmp_path}/store"

    def digest_all() -> dict[str, str]:
        cache = watch.DigestCache(store)
        out = {
            url: cache.digest(url, fp)
            for url, fp in watch.find_checkpoints(str(ckpt.parent)).items()
        }
        cache.save()
        return out

    url = f"file://{ckpt}"
    assert digest_all() == {url: hashlib.sha256(b"weights-1").hexdigest()} and reads == [url]
    assert digest_all()[url] == hashlib.sha256(b"weights-1").hexdigest() and reads == [
        url
    ]  # from the cache
    ckpt.write_bytes(b"weights-2, retrained")
    assert digest_all()[url] == hashlib.sha256(b"weights-2, retrained").hexdigest() and reads == [
        url,
        url,
    ]


def test_an_empty_prefix_is_refused_not_read_as_the_working_directory() -> None:
    from flows.watch import check_prefix

    assert check_prefix(" s3://b/ckpt ") == "s3://b/ckpt"
    for unset in (
        "",
        "  ",
        None,
        "{{ $LENS_CHECKPOINTS }}",
    ):  # `prefect deploy` turns an unset variable into ""
        with pytest.raises(ValueError, match="LENS_CHECKPOINTS"):
            check_prefix(unset)


def test_checkpoint_event_resource_is_an_absolute_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.events import checkpoint_resource

    monkeypatch.chdir(tmp_path)
    res = checkpoint_resource("ckpt/ep1.pt")
    assert res["prefect.resource.id"] == f"file://{tmp_path}/ckpt/ep1.pt"
    assert res["prefect.resource.name"] == "ep1.pt"
    assert (
        checkpoint_resource("s3://b/x/ep2.safetensors")["prefect.resource.id"]
        == "s3://b/x/ep2.safetensors"
    )


def test_slurm_cluster_gives_each_job_one_gpu_worker_with_the_gpu_resource() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "slurm_cluster", REPO / "deploy" / "slurm_cluster.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    kw = mod.cluster_kwargs(
        mod.parse_args(
            [
                "--partition",
                "gpu",
                "--account",
                "p",
                "--gpus",
                "2",
                "--sbatch=--constraint=a100",
                "--port",
                "9000",
            ]
        )
    )
    assert kw["processes"] == 1 and (kw["queue"], kw["account"]) == ("gpu", "p")
    assert kw["job_extra_directives"] == ["--gres=gpu:2", "--constraint=a100"]
    assert kw["worker_extra_args"] == ["--resources", "GPU=2"]  # what LENS_GPU=1's annotations need
    assert kw["scheduler_options"]["port"] == 9000


# ---- integration tests ---------------------------------------------------------------------------


@pytest.mark.slow
def test_deploy_applies_both_deployments_with_described_parameters(api: Stack) -> None:
    from flows.events import CHECKPOINT_CREATED

    print(f"prefect deploy --all: {api.facts['deploy_seconds']:.1f} s")
    with _client() as c:
        build = c.read_deployment_by_name(BUILD)
        watch = c.read_deployment_by_name(WATCH)
        automations = c.read_automations()
    assert build.entrypoint == "flows.atlas:build_atlas" and build.work_pool_name == POOL
    assert watch.entrypoint == "flows.watch:watch_checkpoints" and watch.work_pool_name == POOL
    # the UI's run form shows each parameter with the description from the flow's docstring
    props = build.parameter_openapi_schema["properties"]
    for name in ("config_path", "config", "checkpoint", "classes", "store", "publish"):
        assert len(props[name].get("description") or "") > 10, (name, props[name])
    assert "checkpoint URL" in props["checkpoint"]["description"]
    # `config` is the typed AtlasConfig: the form shows its sections and fields, with defaults and
    # limits
    defs = build.parameter_openapi_schema["definitions"]
    assert props["config"]["anyOf"][0]["$ref"].endswith("/AtlasConfig")
    sections = defs["AtlasConfig"]["properties"]
    assert {
        "model",
        "data",
        "patches",
        "concepts",
        "importance",
        "maco",
        "crops",
        "store",
        "publish",
    } <= set(sections)
    arch = defs["ModelConfig"]["properties"]["arch"]
    assert arch["default"] == "toy" and "torchvision" in arch["description"]
    assert defs["MacoConfig"]["properties"]["image_size"]["maximum"] == 2048
    assert defs["ModelConfig"]["properties"]["precision"]["enum"] == ["fp32", "bf16", "fp16"]
    assert all(
        watch.parameter_openapi_schema["properties"][p].get("description")
        for p in ("prefix", "config_path")
    )
    # {{ $VAR }} filled from the environment of `prefect deploy`
    assert watch.parameters == {"prefix": api.prefix, "config_path": str(api.config_path)}
    assert build.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
    ]
    [schedule] = watch.schedules
    assert schedule.active and schedule.schedule.interval.total_seconds() == 600
    [auto] = [a for a in automations if CHECKPOINT_CREATED in getattr(a.trigger, "expect", set())]
    [action] = auto.actions
    assert action.deployment_id == watch.id and action.parameters == {
        "prefix": "{{ event.resource.id }}"
    }


def _agrees_with_lens_status(
    st: Stack, run_id: str, flow_run_id: Any, cfg: Any, capsys, monkeypatch
) -> Any:
    """Per-class task-run states of the build in Prefect and `lens status` tell the same story."""
    from flows.cli import main as lens_main
    from flows.cli import status_table
    from lens_core.store import RunStore

    store = RunStore(
        cfg.store, run_id, {**cfg.storage_options, "key": st.s3.key, "secret": st.s3.secret}
    )
    by_name = {r.name: r for r in read_task_runs(flow_run_id)}
    rows = {r["class"]: r for r in status_table(store)}
    assert len(rows) == 2, rows
    for slug, row in rows.items():
        for stage in STAGES:
            task = by_name[f"{stage}[{slug}]"]
            expected = {"COMPLETED": {"completed", "skipped"}, "FAILED": {"failed"}}[
                task.state.type.value
            ]
            assert row[stage] in expected, (slug, stage, task.state, row)
            assert task.state.is_completed(), (task.name, task.state)
        assert row["state"] == "completed", row
    capsys.readouterr()
    monkeypatch.setenv("COLUMNS", "300")  # rich folds narrow columns: keep each slug on one line
    assert lens_main(["status", "--config", str(st.config_path), "--run", run_id]) == 0
    out = capsys.readouterr().out
    assert f"LENS run {run_id}" in out and "2 classes, 0 failed" in out, out
    assert all(slug in out for slug in rows), out
    return store


@pytest.mark.slow
def test_new_checkpoints_build_exactly_once_from_watcher_and_event(
    api: Stack,
    s3_creds: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import flows.watch as watch
    from flows.watch import watch_checkpoints

    t_start = time.monotonic()
    ckpt = _put_checkpoint(api, f"{api.prefix}/toy-a.safetensors", epoch=None)
    run_id, cfg = _planned(api, ckpt)
    params = {"prefix": api.prefix, "config_path": str(api.config_path)}

    # two watchers overlap: both list, digest and find no run before either asks for one
    real = watch.run_deployment
    barrier = threading.Barrier(2, timeout=90)

    def gated(*args: Any, **kwargs: Any) -> Any:
        barrier.wait()
        return real(*args, **kwargs)

    monkeypatch.setattr(watch, "run_deployment", gated)
    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(contextvars.copy_context().run, watch_checkpoints, **params)
            for _ in range(2)
        ]
        results = [f.result(timeout=180) for f in futures]
    monkeypatch.setattr(watch, "run_deployment", real)
    entries = [r["checkpoints"] for r in results]
    assert all(len(e) == 1 and e[0]["run_id"] == run_id for e in entries), results
    assert sorted(e[0]["action"] for e in entries) == ["existing", "triggered"], results
    assert entries[0][0]["flow_run_id"] == entries[1][0]["flow_run_id"]
    runs = _runs_of(BUILD, f"lens-run:{run_id}")
    assert len(runs) == 1 and len(_runs_of(BUILD)) == 1, [(r.name, r.tags) for r in runs]
    flow_run = runs[0]
    assert str(flow_run.id) == entries[0][0]["flow_run_id"]
    assert flow_run.parameters["checkpoint"] == ckpt
    assert api.s3.secret not in json.dumps(flow_run.parameters) and api.s3.key not in json.dumps(
        flow_run.parameters
    )

    # a watcher while the build is queued or running asks again and gets the same run
    again = watch_checkpoints(**params)
    assert [c["action"] for c in again["checkpoints"]] == ["existing"], again
    assert len(_runs_of(BUILD)) == 1
    timings = {"three watchers, one build-atlas run": time.monotonic() - t_start}

    # a training job announces another checkpoint of the same model (outside the watched prefix)
    ckpt_b = _put_checkpoint(api, f"s3://{api.bucket}/incoming/toy-b.safetensors", epoch=2)
    run_b, cfg_b = _planned(api, ckpt_b)
    assert run_b != run_id
    t_event = time.monotonic()
    sent = subprocess.run(
        [sys.executable, "-m", "flows.events", ckpt_b, "--payload", '{"epoch": 2}'],
        env=api.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sent.returncode == 0 and ckpt_b in sent.stdout, (sent.stdout, sent.stderr)
    # the trigger runs the watcher deployment on that checkpoint; that watcher triggers build-atlas
    watcher = api.wait(
        "a watch-checkpoints run created by the lens.checkpoint.created trigger",
        lambda: _runs_of(WATCH),
        timeout=90,
    )
    assert len(watcher) == 1 and watcher[0].parameters["prefix"] == ckpt_b, [
        r.parameters for r in watcher
    ]
    timings["event -> watcher run"] = time.monotonic() - t_event
    watched = _final(api, watcher[0].id, "the event's watcher run", timeout=120)
    assert watched.state.is_completed(), (watched.state, api.logs())
    [build_b] = api.wait(
        f"a build-atlas run for run {run_b}",
        lambda: _runs_of(BUILD, f"lens-run:{run_b}"),
        timeout=10,
    )
    assert build_b.parameters["checkpoint"] == ckpt_b
    timings["event -> build-atlas run"] = time.monotonic() - t_event

    # the first build finishes where the watcher predicted; later watchers create nothing
    done = _final(api, flow_run.id, f"build-atlas run {flow_run.name} to finish", timeout=300)
    timings["first build finished"] = time.monotonic() - t_start
    assert done.state.is_completed() and done.state.name == "Completed", (done.state, api.logs())
    store = _agrees_with_lens_status(api, run_id, flow_run.id, cfg, capsys, monkeypatch)
    assert store.read_json("finished.json")["run_id"] == run_id
    later = watch_checkpoints(**params)
    assert [c["action"] for c in later["checkpoints"]] == ["finished"], later

    done_b = _final(api, build_b.id, f"build-atlas run {build_b.name} to finish", timeout=300)
    timings["second build finished"] = time.monotonic() - t_start
    assert done_b.state.is_completed() and done_b.state.name == "Completed", (
        done_b.state,
        api.logs(),
    )
    _agrees_with_lens_status(api, run_b, build_b.id, cfg_b, capsys, monkeypatch)
    # the event again: nothing
    replay = watch_checkpoints(prefix=ckpt_b, config_path=str(api.config_path))
    assert [c["action"] for c in replay["checkpoints"]] == ["finished"], replay
    assert len(_runs_of(BUILD)) == 2

    # two checkpoints of one model: two sites side by side, the top page lists both, newest first
    fs = api.s3.filesystem()
    site = f"{api.bucket}/site"
    published = {}
    for rid, url in ((run_id, ckpt), (run_b, ckpt_b)):
        assert fs.exists(f"{site}/{rid}/index.html") and fs.exists(f"{site}/{rid}/classes")
        published[rid] = json.loads(fs.cat_file(f"{site}/{rid}/run.json"))
        assert published[rid]["checkpoint"] == url
    top = fs.cat_file(f"{site}/index.html").decode()
    assert published[run_id]["checkpoint_digest"] != published[run_b]["checkpoint_digest"]
    for rid, meta in published.items():
        assert f'href="{rid}/index.html"' in top and meta["checkpoint"] in top, rid
        assert meta["checkpoint_digest"][:12] in top and meta["published"] in top
    newest, oldest = sorted(published, key=lambda r: published[r]["published"], reverse=True)
    assert top.index(f'href="{newest}/') < top.index(f'href="{oldest}/')
    print("; ".join(f"{k}: {v:.1f} s" for k, v in timings.items()))  # after the last capsys read


@pytest.mark.slow
def test_a_run_that_ended_unfinished_is_retried_up_to_max_attempts(
    api: Stack, s3_creds: None
) -> None:
    from prefect.client.schemas.actions import WorkPoolUpdate
    from prefect.states import Failed

    from flows.watch import RUN_TAG, idempotency_key, request_build
    from lens_core.config import config_from_parameters

    cfg = config_from_parameters(str(api.config_path))
    run_id = "retrytest000"  # no such run in the store: never finished
    with _client() as c:
        dep = c.read_deployment_by_name(BUILD)
        c.update_work_pool(POOL, WorkPoolUpdate(is_paused=True))  # nothing here may really run
        created = []
        try:
            failed = c.create_flow_run_from_deployment(
                dep.id,
                parameters={},
                state=Failed(),
                tags=[RUN_TAG + run_id],
                idempotency_key=idempotency_key(run_id, 0),
            )
            created.append(failed.id)
            retry = request_build(BUILD, "s3://x/c.pt", run_id, {}, cfg, max_attempts=3)
            assert (retry.action, retry.attempt, retry.flow_run_name) == (
                "triggered",
                1,
                f"atlas-{run_id}-1",
            ), retry
            created.append(retry.flow_run_id)
            again = request_build(BUILD, "s3://x/c.pt", run_id, {}, cfg, max_attempts=3)
            assert (again.action, again.flow_run_id) == ("existing", retry.flow_run_id), again
            assert (
                request_build(BUILD, "s3://x/c.pt", run_id, {}, cfg, max_attempts=1).action
                == "gave-up"
            )
            assert len(_runs_of(BUILD, RUN_TAG + run_id)) == 2
        finally:
            for flow_run_id in created:
                c.delete_flow_run(flow_run_id)
            c.update_work_pool(POOL, WorkPoolUpdate(is_paused=False))
