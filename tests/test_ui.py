"""What a newcomer meets in the Prefect UI (issue 20, part 3) and how a run ends when classes or
cross-class steps fail (issue 25 item 5, issue 21 item 5, flow side).

The run form is checked against the rules of Prefect's own UI bundle (the schema form picks an
optional field's initial branch from its default; string cells of a table artifact are rendered
as Markdown). Flows run on a real Prefect API (test harness); the all-failed run goes through the
real `lens` command, its temporary API and its Dask cluster.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import read_artifact, read_task_runs
from tiny import TINY, run_isolated, tiny_config, write_toml

LENS = str(Path(sys.executable).with_name("lens"))


def _html(markdown: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").enable("table").render(markdown)


def _text(html: str) -> str:
    import html as html_lib

    return html_lib.unescape(re.sub(r"<[^>]+>", "", html)).strip()


# ---- the per-class table artifact ----------------------------------------------------------

NASTY = [
    "-",
    "1.",
    "* x",
    "# not a heading",
    "<root>/<class dir>",
    "a | b",
    "**bold**",
    "`code`",
    "[link](http://x)",
    "EmptyClassError: no readable image in s3://b/k_1/ (3 of 3)\nline 2",
    "&amp; &lt;",
    "+",
    "> quote",
    "_x_",
    "\\",
    "---",
    "1) x",
    "2024. a year",
    "= x",
    "~~gone~~",
    "![img](x.png)",
    "02-green-triangle",
]


@pytest.mark.parametrize("text", NASTY)
def test_a_table_cell_renders_as_its_own_text(text: str) -> None:
    """Prefect's UI renders string cells as Markdown: a cell must show its text, on one line,
    and never become a list, a heading, a link, emphasis or vanishing HTML."""
    from flows.artifacts import md_cell

    html = _html(md_cell(text))
    assert not re.search(r"<(ul|ol|li|h\d|a|em|strong|code|blockquote|table)\b", html), html
    assert _text(html) == " ".join(text.split()), html


def test_cells_keep_numbers_and_bound_their_text() -> None:
    from flows.artifacts import md_cell

    assert md_cell(53.242) == 53.242 and md_cell(3) == 3 and md_cell(None) == ""
    assert len(_text(_html(md_cell("x" * 5000)))) <= 300


def _outcome(
    stages: dict[str, str], ok: bool, error: str = "", top: Any = None, note: str = ""
) -> dict[str, Any]:
    return {
        "ok": ok,
        "error": error,
        "summary": {
            "stages": stages,
            "seconds": 1.5,
            "errors": {},
            "top_concept": top,
            "top_importance": 53.242 if top is not None else None,
            "importance_basis": "logit share" if top else None,
            "note": note,
        },
    }


def test_the_table_puts_what_matters_first_and_keeps_each_column_one_kind() -> None:
    """Class, state, failed stage, error and note come first (no horizontal scroll to find out why
    a class failed); stage columns hold stage states only; failed classes are the first rows."""
    from types import SimpleNamespace

    from flows.artifacts import STAGE_NOT_RUN, class_rows, table_artifact_rows
    from lens_core import layout

    done = dict.fromkeys(("activations", "factorize", "importance", "crops"), "completed")
    info = SimpleNamespace(slugs=["a", "b", "c"])
    outcomes = {
        "a": {**_outcome(done, True, top=4), "render": "completed"},
        "b": _outcome({"activations": "failed"}, False, error="EmptyClassError: no readable image"),
        "c": {**_outcome(done, True, top=1, note="- rarely predicted"), "render": "failed"},
    }
    rows = class_rows(info, outcomes)
    assert list(rows[0])[:5] == ["class", "state", "failed at", "note", "error"]
    assert [r["class"] for r in rows] == ["b", "c", "a"]  # failed (and failed renders) first
    assert rows[0]["failed at"] == "activations" and "EmptyClassError" in rows[0]["error"]
    states = {"completed", "failed", "running", "pending", "skipped", STAGE_NOT_RUN}
    for r in rows:
        assert {r[s] for s in layout.STATUS_STAGES} <= states, r  # stage columns: stage states only
    assert rows[2]["top concept score"] == 53.242 and rows[2]["importance"] == "completed"
    shown = table_artifact_rows(rows)
    assert (
        shown[0]["state"] == "FAILED"
        and shown[1]["state"] == "renders FAILED"
        and shown[2]["state"] == "completed"
    )
    assert all(
        _text(_html(v)) != "" or v == "" for r in shown for v in r.values() if isinstance(v, str)
    )
    assert "<li>" not in _html(shown[1]["note"])  # "- rarely predicted" is no bullet


# ---- the site link -------------------------------------------------------------------------


def _info(cfg: Any, run_id: str = "0123456789ab") -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(config=cfg, run_id=run_id)


def test_the_site_link_is_lens_serve_for_a_local_site(tmp_path: Path) -> None:
    from flows.artifacts import site_link
    from lens_core.config import make_config

    cfg = make_config({"publish": f"file://{tmp_path}/site"})
    url, how = site_link(_info(cfg), config_path="my atlas.toml")
    assert url == "http://127.0.0.1:8000/0123456789ab/index.html"
    assert (
        "file://" not in how
        and "lens serve --config 'my atlas.toml' --publish " + str(tmp_path / "site") in how
    )
    assert url in _text(_html(how))


def test_the_site_link_is_the_public_address_when_one_is_configured() -> None:
    from flows.artifacts import site_link
    from lens_core.config import ConfigError, make_config
    from lens_core.identity import compute_run_id

    base = {"publish": "s3://bucket/site"}
    cfg = make_config({**base, "publish_base_url": "https://bucket.example.org/site/"})
    url, how = site_link(_info(cfg))
    assert url == "https://bucket.example.org/site/0123456789ab/index.html" and f"]({url})" in how
    # not the run's identity
    assert compute_run_id("d", "u", cfg) == compute_run_id("d", "u", make_config(base))
    for bad in ("ftp://x/site", "https://user:pw@x/site", "https://x/site?sig=abc", "x/site"):
        with pytest.raises(ConfigError, match="publish_base_url"):
            make_config({**base, "publish_base_url": bad})


# ---- the run form --------------------------------------------------------------------------


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    return schema["definitions"][ref.split("/")[-1]] if ref else node


def _initial_branch(prop: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """The branch of an `anyOf` that Prefect 3.8's schema form shows first (its bundle's logic:
    the value, else the default; no default: the first branch; null: the `null` branch)."""
    options = [_resolve(schema, o) for o in prop["anyOf"]]
    if "default" not in prop:
        return options[0]
    d = prop["default"]
    kind = (
        "null"
        if d is None
        else "string"
        if isinstance(d, str)
        else "array"
        if isinstance(d, list)
        else "object"
        if isinstance(d, dict)
        else "boolean"
        if isinstance(d, bool)
        else "number"
    )
    for o in options:
        if o.get("type") == kind or (kind == "number" and o.get("type") == "integer"):
            return o
    return options[0]


def _properties(schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    found = list(schema["properties"].items())
    for name, d in schema.get("definitions", {}).items():
        found += [(f"{name}.{k}", v) for k, v in d.get("properties", {}).items()]
    return found


@pytest.fixture(scope="module")
def form_schema() -> dict[str, Any]:
    """The parameter schema `prefect deploy` stores for build-atlas (prefect.cli.deploy._core)."""
    from prefect.utilities.callables import parameter_schema

    from flows.atlas import build_atlas

    return parameter_schema(build_atlas).model_dump_for_openapi()


def test_no_form_field_starts_as_property_is_type_none(form_schema: dict[str, Any]) -> None:
    """The UI shows 'Property is type "None"' for a field on its `null` branch:
    none may start there."""
    assert _optional_fields_not_starting_as_none(form_schema) >= 6  # config and the top-level ones


def _optional_fields_not_starting_as_none(schema: dict[str, Any]) -> int:
    """How many optional fields `schema` has, once checked that none (nor any field) starts on
    its null branch."""
    checked = 0
    for name, prop in _properties(schema):
        assert prop.get("type") != "null", name
        if "anyOf" in prop:
            assert _initial_branch(prop, schema).get("type") != "null", (name, prop)
            checked += 1
    return checked


def test_optional_fields_stay_optional_for_prefects_validation(form_schema: dict[str, Any]) -> None:
    """An empty field is left unset and null still validates (Prefect's server-side validator)."""
    from prefect.utilities.schema_tools.validation import preprocess_schema, validate

    schema = preprocess_schema(form_schema)
    empty = {
        "config_path": None,
        "checkpoint": None,
        "classes": None,
        "store": None,
        "publish": None,
        "config": {"model": {"checkpoint": None}, "data": {"url": None}, "classes": None},
    }
    assert validate(empty, schema, raise_on_error=False, preprocess=False) == []
    assert "url" not in form_schema["definitions"]["DataConfig"].get("required", [])


@pytest.fixture(scope="module")
def watch_schema() -> dict[str, Any]:
    """The same for the watch-checkpoints flow's form."""
    from prefect.utilities.callables import parameter_schema

    from flows.watch import watch_checkpoints

    return parameter_schema(watch_checkpoints).model_dump_for_openapi()


def test_the_watch_form_has_no_field_starting_as_none_and_empties_mean_unset(watch_schema) -> None:
    from prefect.utilities.schema_tools.validation import preprocess_schema, validate

    checked = _optional_fields_not_starting_as_none(watch_schema)
    assert checked >= 5  # config_path, config, classes, store, publish
    schema = preprocess_schema(watch_schema)
    assert (
        validate(
            {"prefix": "s3://b/ckpt", "config_path": None, "classes": None},
            schema,
            raise_on_error=False,
            preprocess=False,
        )
        == []
    )
    for name, prop in _properties(watch_schema):
        if prop.get("description") and "*" in prop["description"]:
            assert "<em>" not in _html(prop["description"]), name  # `*.pt` stays a glob


def test_descriptions_survive_markdown_and_classes_hints_valid_names(
    form_schema: dict[str, Any],
) -> None:
    for name, prop in _properties(form_schema):
        if prop.get("description"):
            shown = _text(_html(prop["description"]))
            # every `<` survives (markdown would take `<root>` for an HTML tag and drop it)
            assert shown.count("<") == prop["description"].count("<"), (name, shown)
    url = form_schema["definitions"]["DataConfig"]["properties"]["url"]["description"]
    assert "<root>/<class dir>" in _text(_html(url))
    hint = _text(_html(form_schema["properties"]["classes"]["description"]))
    assert "n01440764" in hint and "0 to 9" in hint and "lens status" in hint
    assert "differs from the default" in form_schema["properties"]["config"]["description"]


def test_the_form_and_config_path_merge_field_by_field(tmp_path: Path) -> None:
    """config_path is the base; a form field wins where it differs from the default; a field the
    form submits at its default (the form submits them all) keeps the file's value."""
    from lens_core.config import AtlasConfig, config_from_parameters

    toml = tmp_path / "atlas.toml"
    toml.write_text('store = "file:///from/file"\n[maco]\nsteps = 7\n[concepts]\nn_concepts = 4\n')
    form = AtlasConfig().model_dump(mode="json")  # what the UI submits: every field
    form["concepts"]["n_concepts"] = 5
    form["crops"]["size"] = 64
    cfg = config_from_parameters(str(toml), AtlasConfig.model_validate(form))
    # the file's, form left at default
    assert cfg.maco.steps == 7 and cfg.store == "file:///from/file"
    assert cfg.concepts.n_concepts == 5 and cfg.crops.size == 64  # the form's, changed there
    # without a file: the form
    alone = config_from_parameters(None, AtlasConfig.model_validate(form))
    assert alone.maco.steps == AtlasConfig().maco.steps and alone.concepts.n_concepts == 5
    top = config_from_parameters(str(toml), None, store="file:///top")
    assert top.store == "file:///top"  # a top-level parameter wins over both


def test_form_empties_mean_unset() -> None:
    from flows.atlas import _given

    assert (
        _given("") is None and _given("  ") is None and _given([]) is None and _given(None) is None
    )
    assert _given(" s3://b/x ") == "s3://b/x" and _given(["0"]) == ["0"]


# ---- render names --------------------------------------------------------------------------


def test_render_names_say_what_they_hold_and_never_repeat() -> None:
    from flows.atlas import render_label

    chunk = [("00-red-disc", 0), ("00-red-disc", 1), ("01-blue-square", 0)]
    assert render_label(3, chunk) == "render 3: 3 concepts of 00-red-disc (2), 01-blue-square (1)"
    many = [(f"{i:02d}-c", 0) for i in range(6)]
    assert render_label(1, many).endswith("and 3 more classes")
    assert len({render_label(i, chunk) for i in range(1, 50)}) == 49


# ---- flows on a real Prefect API -----------------------------------------------------------


def _flow_logs(flow_run_id: Any, wait_for: str | None = None) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    messages: list[str] = []
    with get_client(sync_client=True) as client:
        for _ in range(20):
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            )
            messages = [log.message for log in logs]
            if messages and (wait_for is None or any(wait_for in m for m in messages)):
                break
            time.sleep(0.5)
    return messages


def test_bad_input_ends_with_its_message_only(prefect_api, tmp_path):
    """An unknown class fails the run with the ConfigError's message: no traceback in its logs."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.atlas import build_atlas

    flow = build_atlas.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))
    state = flow(config=tiny_config(tmp_path), classes=["no-such-class"], return_state=True)
    assert state.is_failed() and "no-such-class" in state.message
    logs = _flow_logs(state.state_details.flow_run_id, wait_for="Finished in state")
    assert any("no-such-class" in m for m in logs), logs
    assert not any("Traceback" in m for m in logs), logs
    assert read_task_runs(state.state_details.flow_run_id) == []


def _corrupt_classes(cfg: dict[str, Any], classes: list[str]) -> Any:
    """Every image of these toy classes made unreadable (a real data fault,
    found at activations)."""
    from lens_core.config import make_config
    from lens_core.pipeline import prepare_run

    info = prepare_run(make_config(cfg, classes=classes))
    root = Path(info.data_url.removeprefix("file://"))
    for cls in info.classes:
        for image in (root / cls.id).iterdir():
            image.write_bytes(b"not an image")
    return info


def test_a_failing_cross_class_step_never_discards_the_classes(prefect_api, tmp_path, monkeypatch):
    """Both cross-class steps fail (any failure: here the comparison and the cross-class task
    raise): every class is still published, the failure is in the final message, the table's
    description and the result; the run is PartiallyCompleted and not marked finished. The
    progress artifacts count classes and renders apart, and render task runs have distinct names."""
    from prefect import task
    from prefect.task_runners import ThreadPoolTaskRunner

    import flows.atlas as atlas

    @task(name="changes", task_run_name="changes")
    def broken_changes(info: Any) -> dict[str, Any]:
        raise RuntimeError("the two runs share no patch")

    @task(name="cross-class", task_run_name="cross-class")
    def broken_cross(info: Any) -> dict[str, Any]:
        raise RuntimeError("cross-class broke")

    monkeypatch.setattr(atlas, "changes_task", broken_changes)
    monkeypatch.setattr(atlas, "cross_class_task", broken_cross)
    cfg = tiny_config(tmp_path, maco={**TINY["maco"], "batch_size": 2})
    flow = atlas.build_atlas.with_options(task_runner=ThreadPoolTaskRunner(max_workers=2))
    state = flow(config=cfg, classes=["0", "1"], return_state=True)
    assert state.is_completed() and state.name == "PartiallyCompleted", state.message
    assert state.message.startswith("PARTIAL: 2/2 classes explained")
    assert "changes step FAILED" in state.message and "share no patch" in state.message
    assert "cross-class step FAILED" in state.message
    result = state.result()
    run_id = result["run_id"]
    assert result["site_written"] and set(result["steps_failed"]) == {"changes", "cross-class"}
    site = tmp_path / "site" / run_id
    assert (site / "index.html").exists()
    assert (
        all((site / "classes" / slug / "index.html").exists() for slug in ("0", "1"))
        or len(list((site / "classes").iterdir())) == 2
    )
    assert not (tmp_path / "store" / "runs" / run_id / "finished.json").exists()
    table = read_artifact(f"lens-classes-{run_id}")
    assert (
        "changes step FAILED" in table.description and "2/2 classes explained" in table.description
    )
    link = read_artifact(f"lens-site-{run_id}")
    assert link.type == "markdown" and "lens serve" in link.data and "file://" not in link.data
    classes_progress = read_artifact(f"lens-progress-{run_id}")
    renders_progress = read_artifact(f"lens-renders-{run_id}")
    assert "2/2 classes finished" in classes_progress.description
    assert re.search(r"\d+/\d+ concepts rendered", renders_progress.description), (
        renders_progress.description
    )
    runs = read_task_runs(state.state_details.flow_run_id)
    renders = [r.name for r in runs if r.name.startswith("render")]
    assert len(renders) >= 2 and len(set(renders)) == len(renders), renders
    assert all(re.fullmatch(r"render \d+: \d+ concepts? of .+", n) for n in renders), renders


def test_a_run_whose_every_class_failed_fails_cleanly(prefect_api, tmp_path):
    """No class explained: no cross-class step, no publish, no site link; a Failed state whose
    message names the classes and their errors."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.atlas import build_atlas

    cfg = tiny_config(tmp_path)
    info = _corrupt_classes(cfg, ["0", "1"])
    flow = build_atlas.with_options(task_runner=ThreadPoolTaskRunner(max_workers=2))
    state = flow(config=cfg, classes=["0", "1"], return_state=True)
    assert state.is_failed()
    assert state.message.startswith("every class failed (2/2), nothing was published")
    assert "activations" in state.message and "EmptyClassError" in state.message
    names = {r.name for r in read_task_runs(state.state_details.flow_run_id)}
    assert not names & {"cross-class", "changes", "publish-pages", "publish-index"}, names
    assert not (tmp_path / "site").exists()
    assert read_artifact(f"lens-site-{info.run_id}") is None
    table = read_artifact(f"lens-classes-{info.run_id}")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["failed at"] for r in rows] == ["activations", "activations"]


def test_lens_run_whose_every_class_failed_exits_2_with_one_lens_line(tmp_path):
    """The real command (its own temporary API and Dask cluster): exit 2, a last `lens:` line,
    no traceback anywhere, and no site printed (none was written)."""
    cfg = tiny_config(tmp_path)
    _corrupt_classes(cfg, ["0", "1"])
    toml = write_toml(cfg, tmp_path / "atlas.toml")
    proc = run_isolated(
        [LENS, "run", "--config", str(toml), "--classes", "0,1", "--no-progress"], tmp_path
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert proc.stderr.strip().splitlines()[-1].startswith("lens: every class failed (2/2)"), out
    assert "Traceback" not in out, out
    assert "site:" not in out and "serve it with" not in out, out
    assert not (tmp_path / "site").exists()


def test_workers_start_in_the_background_and_a_dead_dashboard_is_not_announced(prefect_api):
    """The cluster starts in a thread while the run is set up; until it is up the progress
    artifact says the workers are starting. prefect-dask's 'The Dask dashboard is available at'
    line is dropped: that address answers 404 (LENS clusters serve no dashboard)."""
    import logging
    from types import SimpleNamespace

    from flows.artifacts import Progress
    from flows.atlas import make_task_runner
    from flows.runner import DASHBOARD_LINE, dashboard_served

    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    runner = make_task_runner(workers=1)
    runner.logger.addHandler(handler)
    # runs in this process (LocalCluster)
    scheduler_log = logging.getLogger("distributed.scheduler")
    scheduler_log.addHandler(handler)
    old_level = scheduler_log.level
    scheduler_log.setLevel(logging.INFO)
    info = SimpleNamespace(slugs=["a", "b"], run_id="0123456789ab")
    try:
        with runner:
            runner.start_in_background()
            progress = Progress(info, runner)
            starting = read_artifact("lens-progress-0123456789ab").description
            client = runner.client  # waits for the background start
            assert runner.ready()
            progress.workers_ready()
            link = client.dashboard_link
    finally:
        runner.logger.removeHandler(handler)
        scheduler_log.removeHandler(handler)
        scheduler_log.setLevel(old_level)
    assert starting.startswith("starting the Dask workers"), starting
    assert read_artifact("lens-progress-0123456789ab").description.startswith(
        "0/2 classes finished (workers"
    )
    assert read_artifact("lens-renders-0123456789ab") is not None
    # the handler saw the runner's lines
    assert any("Creating a new Dask cluster" in m for m in said), said
    assert not any(m.startswith(DASHBOARD_LINE) for m in said), said
    assert any("Scheduler at" in m for m in said) and not any("dashboard at" in m for m in said), (
        said
    )
    assert link and not dashboard_served(link)  # what the line would have announced gives 404


def test_a_plain_slug_is_left_as_it_is() -> None:
    from flows.artifacts import md_cell

    assert md_cell("02-green-triangle-orange-dots") == "02-green-triangle-orange-dots"
    assert md_cell("n01440764") == "n01440764"


# ---- in Prefect's own UI (Chromium) --------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_ui(tmp_path_factory: pytest.TempPathFactory):
    """A real Prefect server with its UI (`prefect server start`, own PREFECT_HOME);
    yields its base URL."""
    import signal
    import socket

    import httpx

    home = tmp_path_factory.mktemp("prefect-ui")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="true",
        PREFECT_UI_API_URL=f"{base}/api",
    )
    with (home / "server.log").open("wb") as log:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        for _ in range(240):
            try:
                if httpx.get(f"{base}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, (home / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_the_run_form_and_the_table_in_prefects_ui(prefect_ui, browser, tmp_path):
    """Chromium on Prefect's own UI: the build-atlas run form (as `prefect deploy` registers it)
    shows no 'Property is type "None"' and keeps `<root>/<class dir>`; the per-class table shows
    its columns in order and each cell as its text (no bullet from "- ...", no HTML)."""
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from prefect.artifacts import create_table_artifact
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.artifacts import class_rows, table_artifact_rows
    from flows.atlas import build_atlas

    done = dict.fromkeys(("activations", "factorize", "importance", "crops"), "completed")
    outcomes = {
        "02-green-triangle": {**_outcome(done, True, top=4), "render": "completed"},
        "n05-broken": _outcome(
            {"activations": "failed"},
            False,
            error="EmptyClassError: no image <b>read</b> in 1. - y",
        ),
        "c": {**_outcome(done, True, top=1, note="- rarely predicted"), "render": "failed"},
    }

    def register() -> tuple[Any, Any]:  # in a thread: Playwright's event loop runs in this one
        with temporary_settings({PREFECT_API_URL: f"{prefect_ui}/api"}):
            deployment = build_atlas.to_deployment(name="form-check").apply()
            rows = table_artifact_rows(class_rows(SimpleNamespace(slugs=list(outcomes)), outcomes))
            return deployment, create_table_artifact(rows, key="ui-check")

    with ThreadPoolExecutor(1) as pool:
        deployment, artifact = pool.submit(register).result()
    page = browser.new_page(viewport={"width": 1400, "height": 2400})
    try:
        page.goto(f"{prefect_ui}/deployments/deployment/{deployment}/run", wait_until="networkidle")
        page.get_by_text("config_path", exact=False).first.wait_for(timeout=30_000)
        page.get_by_text("Class Index", exact=False).first.wait_for(timeout=30_000)
        form = page.inner_text("body")
        page.screenshot(path=str(tmp_path / "run-form.png"), full_page=True)
        assert 'Property is type "None"' not in form
        assert "<root>/<class dir>/*.jpg|png|webp" in form and "n01440764" in form

        page.goto(f"{prefect_ui}/artifacts/artifact/{artifact}", wait_until="networkidle")
        page.locator(".artifact-data-table__cell").first.wait_for(timeout=30_000)
        page.screenshot(path=str(tmp_path / "table.png"), full_page=True)
        headers = [h.strip() for h in page.locator(".artifact-data-table th").all_inner_texts()]
        cells = [c.strip() for c in page.locator(".artifact-data-table__cell").all_inner_texts()]
        assert headers[:5] == ["class", "state", "failed at", "note", "error"], headers
        assert page.locator(".artifact-data-table li, .artifact-data-table b").count() == 0
        assert (
            "- rarely predicted" in cells
            and "EmptyClassError: no image <b>read</b> in 1. - y" in cells
        )
        assert cells[:3] == ["n05-broken", "FAILED", "activations"], cells
    finally:
        page.close()
