"""The build-atlas flow on a real Prefect server (test harness) and a real 2-worker Dask cluster,
with the store and the site on a real S3 server (SeaweedFS, authentication on)."""

from __future__ import annotations

import os

import pytest
from conftest import read_artifact, read_task_runs

pytestmark = pytest.mark.slow

SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@pytest.fixture(scope="module")
def s3_env(s3):
    """Credentials reach s3fs (flow process and Dask workers) through the environment only."""
    old = {k: os.environ.get(k) for k in SECRET_ENV}
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = s3.key, s3.secret
    yield {"endpoint_url": s3.endpoint_url}
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _config(bucket: str, options: dict) -> dict:
    return {
        "data": {"images_per_class": 8, "toy_images_per_class": 8},
        "importance": {"images": 4, "n_designs": 16},
        "concepts": {"n_concepts": 6},
        "crops": {"per_concept": 4, "attribution_images": 1},
        "maco": {"steps": 6, "image_size": 64, "crops": 2, "batch_size": 12},
        "store": f"s3://{bucket}/lens",
        "publish": f"s3://{bucket}/site",
        "storage_options": options,
    }


def test_build_atlas_on_dask_and_s3_with_a_failing_class(prefect_api, s3, s3_env):
    import json

    import s3fs

    from flows.atlas import build_atlas, make_task_runner
    from flows.cli import status_table
    from lens_core.config import make_config
    from lens_core.pipeline import prepare_run

    bucket = s3.new_bucket()
    cfg_dict = _config(bucket, s3_env)
    classes = ["0", "1", "2", "3"]
    info = prepare_run(make_config(cfg_dict, classes=classes))
    fs = s3fs.S3FileSystem(
        endpoint_url=s3.endpoint_url, key=s3.key, secret=s3.secret, skip_instance_cache=True
    )
    victim = info.classes[2]
    victim_dir = f"{info.data_url[len('s3://') :]}/{victim.id}"
    originals = {p: fs.cat_file(p) for p in fs.ls(victim_dir, detail=False)}
    for path in originals:  # every image of one class is corrupt: that class must fail alone
        fs.pipe_file(path, b"not an image")

    flow = build_atlas.with_options(task_runner=make_task_runner(workers=2))
    state = flow(config=cfg_dict, classes=classes, return_state=True)
    assert state.is_completed() and state.name == "PartiallyCompleted", state.message
    assert victim.slug in state.message
    result = state.result()
    assert result["failed"] == [victim.slug]

    store = info.store()
    ok = [c for c in info.classes if c.slug != victim.slug]
    for cls in ok:
        assert store.is_complete(f"importance/{cls.slug}")
        assert store.zarr[f"acts/{cls.slug}/A"].shape == (
            8 * 16,
            store.zarr[f"concepts/{cls.slug}/W"].shape[1],
        )
        assert store.files_complete(f"crops/{cls.slug}") and store.files_complete(f"viz/{cls.slug}")
        assert fs.exists(f"{bucket}/site/{info.run_id}/classes/{cls.slug}/index.html")
        assert fs.exists(f"{bucket}/site/{info.run_id}/assets/viz/{cls.slug}/0.png")
    assert not store.is_complete(f"acts/{victim.slug}")
    classes_json = json.loads(fs.cat_file(f"{bucket}/site/{info.run_id}/data/classes.json"))
    listed = {
        c["slug"]: c
        for c in (classes_json["classes"] if isinstance(classes_json, dict) else classes_json)
    }
    assert listed[victim.slug]["status"] == "failed"

    flow_run_id = state.state_details.flow_run_id
    runs = read_task_runs(flow_run_id)
    by_name = {r.name: r for r in runs}
    for cls in ok:
        for stage in ("activations", "factorize", "importance", "crops"):
            run = by_name[f"{stage}[{cls.slug}]"]
            assert run.state.is_completed(), (run.name, run.state)
            assert not run.tags  # no concurrency limit names a tag: no slot request per task run
    assert by_name[f"activations[{victim.slug}]"].state.is_failed()
    assert f"factorize[{victim.slug}]" not in by_name  # the chain stopped at the failed stage
    renders = [name for name in by_name if name.startswith("render ")]
    assert renders and all(" concept" in name for name in renders)
    for name in ("cross-class", "publish-pages", "publish-index"):
        assert by_name[name].state.is_completed(), (name, by_name[name].state)
    # the index only after the pages
    assert by_name["publish-index"].start_time >= by_name["publish-pages"].end_time

    table = read_artifact(f"lens-classes-{info.run_id}")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert len(rows) == len(classes) and all(
        {"note", "score basis", "failed at"} <= set(r) for r in rows
    )
    # failed classes first
    assert rows[0]["class"] == victim.slug and rows[0]["state"].endswith("FAILED")
    assert rows[0]["failed at"] == "activations" and "EmptyClassError" in rows[0]["error"]
    assert "1 FAILED" in table.description and state.message.startswith(
        "PARTIAL: 3/4 classes explained"
    )
    site_artifact = read_artifact(f"lens-site-{info.run_id}")
    assert "lens serve" in site_artifact.data and f"s3://{bucket}/site" in site_artifact.data

    # lens status agrees with the flow, and shows why the class failed
    status = {r["class"]: r for r in status_table(store)}
    assert (
        status[victim.slug]["state"] == "failed"
        and "no readable image" in status[victim.slug]["error"]
    )
    assert all(status[c.slug]["state"] == "completed" for c in ok)

    # credentials never reach flow parameters, artifacts or status files
    for text in (json.dumps(cfg_dict), str(table.data), json.dumps(store.read_json("run.json"))):
        assert s3.secret not in text and s3.key not in text

    # repair the data and re-run: only the failed class does work
    for path, blob in originals.items():
        fs.pipe_file(path, blob)
    state2 = flow(config=cfg_dict, classes=classes, return_state=True)
    assert state2.is_completed() and state2.name == "Completed", state2.message
    computed = state2.result()["computed"]
    assert computed == {victim.slug: ["activations", "factorize", "importance", "crops"]}, computed
    status2 = {r["class"]: r for r in status_table(store)}
    assert all(r["state"] == "completed" for r in status2.values()), [
        r for r in status2.values() if r["state"] != "completed"
    ]
    assert fs.exists(f"{bucket}/site/{info.run_id}/classes/{victim.slug}/index.html")
    top_page = fs.cat_file(f"{bucket}/site/index.html").decode()
    assert f'href="{info.run_id}/index.html"' in top_page


def test_a_gpu_limit_of_one_is_honoured_without_deadlock(prefect_api, tmp_path):
    """`gpu` tags the units that compute on the GPU, once: with a real Prefect concurrency limit of
    1 on it, a two-class run on two Dask workers completes, and no two gpu task runs overlap."""
    from prefect.client.orchestration import get_client

    from flows.atlas import build_atlas, make_task_runner

    cfg = {
        **_config("unused", {}),
        "store": f"file://{tmp_path}/store",
        "publish": f"file://{tmp_path}/site",
        "storage_options": {},
    }
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag="gpu", concurrency_limit=1)
    try:
        state = build_atlas.with_options(task_runner=make_task_runner(workers=2))(
            config=cfg, classes=["0", "1"], return_state=True
        )
        assert state.is_completed() and state.name == "Completed", state.message
        runs = read_task_runs(state.state_details.flow_run_id)
    finally:
        with get_client(sync_client=True) as client:
            client.delete_concurrency_limit_by_tag("gpu")
    gpu = sorted((r for r in runs if "gpu" in r.tags), key=lambda r: r.start_time)
    assert {r.name.split("[")[0].split(" ")[0] for r in gpu} == {
        "activations",
        "importance",
        "render",
        "mistakes",
    }
    # the chain holds no slot
    assert not any("gpu" in r.tags for r in runs if r.name.startswith("class["))
    assert all(set(r.tags) <= {"gpu"} for r in runs)  # only the limited tag is applied
    for a, b in zip(gpu, gpu[1:], strict=False):
        assert a.end_time <= b.start_time, (a.name, b.name)  # one at a time


def test_tags_fall_back_to_all_candidates_when_the_limits_cannot_be_listed():
    """If the API cannot list its limits, every candidate tag is applied (Prefect's own behaviour:
    slower, never unbounded), and the reason is logged; the tagged variant carries them."""
    import logging

    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    from flows.limits import limited_tags
    from tasks.class_tasks import STAGE_TASKS
    from tasks.wrapping import CANDIDATE_TAGS, tagged

    activations_task, factorize_task = STAGE_TASKS["activations"], STAGE_TASKS["factorize"]

    said: list[str] = []
    handler = logging.Handler()
    # Prefect reconfigures root logging
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("lens.test.limits")
    logger.addHandler(handler)
    with temporary_settings(
        {PREFECT_API_URL: "http://127.0.0.1:9/api", PREFECT_CLIENT_MAX_RETRIES: 0}
    ):
        limited = limited_tags(logger)
    logger.removeHandler(handler)
    assert set(limited) == {t for tags in CANDIDATE_TAGS.values() for t in tags}
    assert any("could not list Prefect concurrency limits" in m for m in said), said
    assert set(tagged(activations_task, limited).tags) == {"stage:activations", "gpu"}
    # nothing limited on it: the task as defined
    assert tagged(factorize_task, ("gpu",)) is factorize_task
    assert not factorize_task.tags


def test_an_invalid_config_parameter_fails_before_the_run_starts(prefect_api, tmp_path):
    """The typed `config` parameter is validated by Prefect against AtlasConfig: a bad field is
    refused before the flow's body runs (no store, no task run)."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.atlas import build_atlas

    bad = {"store": f"file://{tmp_path}/store", "maco": {"image_size": 10**6}}
    state = build_atlas.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))(
        config=bad, return_state=True
    )
    assert state.is_failed() and "image_size" in (state.message or "")
    assert not (tmp_path / "store").exists()


def test_parameters_holding_credentials_are_refused(prefect_api, tmp_path):
    """Prefect stores flow parameters: a credential in one fails the run with the way out, and
    the stored parameters are the only place it went (no task run, no store, no site)."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.atlas import build_atlas
    from flows.watch import watch_checkpoints

    cfg = {
        "store": f"file://{tmp_path}/store",
        "publish": f"file://{tmp_path}/site",
        "storage_options": {
            "client_kwargs": {"headers": {"Authorization": "Bearer abc.def.ghi-123456"}}
        },
    }
    state = build_atlas.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))(
        config=cfg, return_state=True
    )
    assert state.is_failed()
    with pytest.raises(Exception, match="Prefect Secret block") as err:
        state.result()
    assert "abc.def.ghi" not in str(err.value) and "storage_options.client_kwargs.headers" in str(
        err.value
    )
    assert (
        read_task_runs(state.state_details.flow_run_id) == [] and not (tmp_path / "store").exists()
    )
    state = watch_checkpoints(
        prefix=str(tmp_path), config={"storage_options": {"secret": "hunter2"}}, return_state=True
    )
    assert state.is_failed()
    with pytest.raises(Exception, match="environment") as err:
        state.result()
    assert "hunter2" not in str(err.value)


def test_a_checkpoint_for_another_architecture_fails_the_run_once_before_any_class(
    prefect_api, tmp_path
):
    """The model is loaded once in the flow before the fan-out: one clear failure,
    no class task runs."""
    import torch
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.atlas import build_atlas
    from lens_core.models import build_model

    ckpt = tmp_path / "resnet18.pt"
    torch.save(build_model("resnet18", 10).state_dict(), ckpt)
    cfg = {"store": f"file://{tmp_path}/store", "publish": f"file://{tmp_path}/site"}
    state = build_atlas.with_options(task_runner=ThreadPoolTaskRunner(max_workers=2))(
        config=cfg, checkpoint=str(ckpt), return_state=True
    )
    assert state.is_failed()
    with pytest.raises(Exception, match="does not match architecture 'toy'") as err:
        state.result()
    assert str(ckpt) in str(err.value)
    assert read_task_runs(state.state_details.flow_run_id) == []
    assert not (tmp_path / "site").exists()


def test_a_second_checkpoint_publishes_what_changed(prefect_api, tmp_path):
    """build-atlas on a second checkpoint of the same lineage compares it with the first: a
    `changes` task run, a table artifact of the most changed classes, and the changes page."""
    import json

    from prefect.task_runners import ThreadPoolTaskRunner
    from safetensors.torch import load_file, save_file

    from flows.atlas import build_atlas
    from lens_core.toy import TOY_CHECKPOINT

    state = load_file(str(TOY_CHECKPOINT))
    state["fc.weight"][1] *= 0.5  # another checkpoint: class 1 relies less on everything
    ckpt = tmp_path / "epoch-2.safetensors"
    save_file(state, str(ckpt))
    cfg = {
        **_config("unused", {}),
        "store": f"file://{tmp_path}/store",
        "publish": f"file://{tmp_path}/site",
        "storage_options": {},
    }
    flow = build_atlas.with_options(task_runner=ThreadPoolTaskRunner(max_workers=2))
    first = flow(config=cfg, classes=["0", "1"], return_state=True)
    assert first.is_completed() and first.result()["changes"]["previous"] is None
    second = flow(config=cfg, classes=["0", "1"], checkpoint=str(ckpt), return_state=True)
    assert second.is_completed() and second.name == "Completed", second.message
    result = second.result()
    run1, run2 = first.result()["run_id"], result["run_id"]
    assert result["changes"]["previous"] == run1 and len(result["changes"]["most_changed"]) == 2
    names = {r.name: r for r in read_task_runs(second.state_details.flow_run_id)}
    assert names["changes"].state.is_completed()
    table = read_artifact(f"lens-changes-{run2}")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["class"] for r in rows] and {"score", "appeared", "vanished", "matched"} <= set(
        rows[0]
    )
    assert "toy_cnn.safetensors" in table.description or run1 in table.description
    changes = (tmp_path / "site" / run2 / "changes.html").read_text()
    assert f"../{run1}/index.html" in changes and all(
        f'id="changed-{r["class"]}"' in changes for r in rows
    )
