"""Security hardening (issue 12): secrets never published, untrusted parameters refused, bounded
resources, odd input that used to break the site or the terminal. Each test reproduces the attack
as an outsider would try it, through the real pipeline, site writer and `lens` command.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import TINY

from lens_core.config import AtlasConfig, ConfigError, config_from_parameters, make_config
from lens_core.models import CheckpointError, ModelError, build_model, load_model
from lens_core.secrets import error_text, public_options, scrub

BEARER = "Bearer eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXBheWxvYWQ.sig-abc123"
ACCOUNT_KEY = "Zm9vYmFyYmF6cXV4c2VjcmV0a2V5MTIzNDU2Nzg5MA=="
CREDENTIAL = "sekrit-credential-42"
PRESIGNED = "https://bucket.s3.amazonaws.com/x.pt?X-Amz-Credential=AKIAXYZ%2F2026&X-Amz-Signature=deadbeefcafe"
SECRETS = (BEARER.split()[1], ACCOUNT_KEY, CREDENTIAL, "deadbeefcafe", "AKIAXYZ", "hunter2")
LENS = str(Path(sys.executable).with_name("lens"))


def _hostile_options() -> dict:
    return {
        "endpoint_url": "http://127.0.0.1:9",
        "client_kwargs": {"headers": {"Authorization": BEARER}, "region_name": "eu-west-1"},
        "connection_string": (
            f"DefaultEndpointsProtocol=https;AccountName=a;AccountKey={ACCOUNT_KEY}"
        ),
        "credential": CREDENTIAL,
        "config_kwargs": {"signature_version": "s3v4"},
    }


# ---- secrets ------------------------------------------------------------------------------------


def test_only_allow_listed_storage_options_are_stored_or_published(tmp_path):
    from lens_core.pipeline import prepare_run, run_class
    from lens_core.publish import publish
    from lens_core.site.runs import list_published_runs

    opts = _hostile_options()
    cfg = make_config(
        {**TINY, "store": f"file://{tmp_path}/store", "publish": f"file://{tmp_path}/site"},
        classes=["0"],
    )
    shown = AtlasConfig.model_validate({**cfg.model_dump(), "storage_options": opts}).redacted()
    assert shown["storage_options"] == {
        "endpoint_url": "http://127.0.0.1:9",
        "client_kwargs": {"headers": {"Authorization": "***"}, "region_name": "eu-west-1"},
        "connection_string": "***",
        "credential": "***",
        "config_kwargs": {"signature_version": "s3v4"},
    }
    # a whole run whose (local) store is given the hostile options: nothing secret lands anywhere
    cfg = cfg.model_copy(update={"storage_options": opts})
    info = prepare_run(cfg)
    run_class(info, info.slugs[0])
    publish(info)
    everything = "".join(
        p.read_text(errors="replace")
        for p in tmp_path.rglob("*")
        if p.is_file() and p.suffix in (".json", ".html", ".js")
    )
    assert "run.json" in {p.name for p in tmp_path.rglob("run.json")}
    for secret in SECRETS:
        assert secret not in everything, secret
    method = next((tmp_path / "site").rglob("method.html")).read_text()
    assert "eu-west-1" in method and "***" in method  # public values shown, the rest masked
    assert list_published_runs(f"file://{tmp_path}/site")


@pytest.mark.parametrize(
    "url",
    [
        "s3://user:hunter2@bucket/lens",
        PRESIGNED,
        "https://storage.googleapis.com/b/x.pt?X-Goog-Signature=abc&X-Goog-Credential=me",
        "https://acct.blob.core.windows.net/c/x.pt?sv=2020&sig=abcdef",
    ],
)
def test_urls_with_credentials_are_refused_everywhere(url):
    for field in ({"store": url}, {"model": {"checkpoint": url}}, {"data": {"url": url}}):
        with pytest.raises(ConfigError, match="credentials in URLs are refused") as err:
            make_config(field)
        assert "hunter2" not in str(err.value) and "deadbeefcafe" not in str(err.value)
    with pytest.raises(ConfigError, match="storage_options.*endpoint_url: credentials in URLs"):
        make_config({"storage_options": {"endpoint_url": "https://admin:hunter2@minio.local"}})


def test_flow_parameters_holding_secrets_are_refused_with_the_way_out():
    for params in (
        {"config": {"storage_options": _hostile_options()}},
        {"config": {"storage_options": {"key": "AKIA", "secret": "hunter2"}}},
        {"checkpoint": PRESIGNED},
    ):
        with pytest.raises(ConfigError) as err:
            config_from_parameters(**params)
        text = str(err.value)
        # each refusal names the way out (a bare "credentials in URLs" refusal does not)
        assert "environment" in text and "Prefect Secret block" in text, (params, text)
        for secret in SECRETS:
            assert secret not in text
    ok = config_from_parameters(config={"storage_options": {"endpoint_url": "http://127.0.0.1:9"}})
    assert ok.storage_options == {"endpoint_url": "http://127.0.0.1:9"}


def test_every_error_text_goes_through_one_scrubber(tmp_path, monkeypatch):
    from lens_core import stages
    from lens_core.pipeline import prepare_run, run_class
    from lens_core.publish import publish
    from lens_core.status import read_status

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-value-123")
    text = (
        f"failed GET {PRESIGNED} with {BEARER}; AccountKey={ACCOUNT_KEY}; "
        "s3://user:hunter2@b/k; env-secret-value-123"
    )
    cleaned = scrub(text)
    for secret in (*SECRETS, "env-secret-value-123"):
        assert secret not in cleaned
    assert "X-Amz-Signature=***" in cleaned and "Bearer ***" in cleaned

    cfg = make_config(
        {**TINY, "store": f"file://{tmp_path}/store", "publish": f"file://{tmp_path}/site"},
        classes=["0", "1"],
    )
    info = prepare_run(cfg)

    def leaky(*args, **kwargs):
        raise RuntimeError(text)

    monkeypatch.setattr(stages, "concept_sobol", leaky)
    with pytest.raises(RuntimeError):
        run_class(info, info.slugs[0])
    record = read_status(info.store(), [info.slugs[0]])[info.slugs[0]]["importance"]
    assert record["state"] == "failed" and "RuntimeError: failed GET" in record["error"]
    assert error_text(RuntimeError(text)) == record["error"]
    publish(info)
    page = next((tmp_path / "site").rglob(f"classes/{info.slugs[0]}/index.html")).read_text()
    assert "failed GET" in page
    for where in (record["error"], page):
        for secret in (*SECRETS, "env-secret-value-123"):
            assert secret not in where


def test_public_options_masks_what_is_not_allow_listed():
    assert public_options(
        {
            "endpoint_url": "https://s3.example.org",
            "anon": False,
            "profile": "prod",
            "client_kwargs": {"verify": False, "aws_session_token": "t0k3n"},
        }
    ) == {
        "endpoint_url": "https://s3.example.org",
        "anon": False,
        "profile": "***",
        "client_kwargs": {"verify": False, "aws_session_token": "***"},
    }


# ---- untrusted parameters ------------------------------------------------------------------------


def test_a_model_factory_needs_the_workers_allow_list(tmp_path, monkeypatch):
    monkeypatch.delenv("LENS_MODEL_FACTORIES", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for arch in ("tempfile:mkdtemp", "os:system", "builtins:dict"):
        with pytest.raises(ModelError, match="not allowed.*lens.models.*LENS_MODEL_FACTORIES"):
            build_model(arch, 3)
    assert list(tmp_path.iterdir()) == []  # mkdtemp was never called
    monkeypatch.setenv("LENS_MODEL_FACTORIES", "builtins:dict,tempfile:mkdtemp")
    with pytest.raises(ModelError, match="returned dict, not an nn.Module"):
        build_model("builtins:dict", 3)
    with pytest.raises(ModelError, match="not an nn.Module"):
        build_model("tempfile:mkdtemp", 3)


def test_an_entry_point_names_an_allowed_factory(tmp_path, monkeypatch):
    """A package that registers `lens.models` entry points is allowed by being installed."""
    (tmp_path / "leafnets.py").write_text(
        "from lens_core.toy import ToyCNN\n\ndef "
        "leafnet(num_classes=5):\n    return ToyCNN(num_classes)\n"
    )
    dist = tmp_path / "leafnets-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: leafnets\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[lens.models]\nleafnet = leafnets:leafnet\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("LENS_MODEL_FACTORIES", raising=False)
    model = build_model("leafnet", 7)
    assert model.fc.out_features == 7
    assert build_model("leafnets:leafnet", 4).fc.out_features == 4  # its target is allowed too


def test_the_cli_checkpoint_goes_through_validation(tmp_path):
    env = {
        **os.environ,
        "PREFECT_API_URL": "http://127.0.0.1:9/api",
        "LENS_DASK_ADDRESS": "tcp://127.0.0.1:9",
    }
    for bad, words in (
        (PRESIGNED, "credentials in URLs are refused"),
        ("gopher2://x/ckpt.pt", "unknown storage protocol"),
    ):
        out = subprocess.run(
            [LENS, "run", "--checkpoint", bad, "--store", str(tmp_path / "s"), "--no-progress"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
        )
        assert out.returncode == 2 and words in out.stderr, out.stderr[-2000:]
        assert "Traceback" not in out.stderr and "deadbeefcafe" not in out.stderr + out.stdout
        assert not (tmp_path / "s").exists()  # refused before anything was written


# ---- bounded resources ------------------------------------------------------------------------


def _toy_zip_checkpoint(tmp_path: Path, compress: bool) -> Path:
    plain = tmp_path / "plain.pt"
    state = build_model("toy", 10).state_dict()
    state["padding"] = torch.zeros(96 << 18)  # 96 MiB of zeros: DEFLATE makes it a few hundred KiB
    torch.save(state, plain)
    if not compress:
        return plain
    packed = tmp_path / "packed.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            dst.writestr(item.filename, src.read(item.filename))
    return packed


def test_compressed_and_oversized_checkpoints_are_refused_before_loading(tmp_path):
    from lens_core.config import ModelConfig

    packed = _toy_zip_checkpoint(tmp_path, compress=True)
    assert packed.stat().st_size < 2 << 20
    with pytest.raises(CheckpointError, match="compressed entries"):
        load_model(ModelConfig(checkpoint=str(packed)), 10)
    big = tmp_path / "big.pt"
    with open(big, "wb") as f:  # sparse: larger than any toy checkpoint can be, read never
        f.truncate(200 << 20)
    with pytest.raises(CheckpointError, match="more than this architecture's weights can fill"):
        load_model(ModelConfig(checkpoint=str(big)), 10)
    # stored, but 96 MiB more than the toy holds
    plain = _toy_zip_checkpoint(tmp_path, compress=False)
    with pytest.raises(CheckpointError, match="more than this architecture"):
        load_model(ModelConfig(checkpoint=str(plain)), 10)


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ("patches", "image_size"),
        ("model", "input_size"),
        ("maco", "image_size"),
        ("crops", "size"),
        ("importance", "n_designs"),
    ],
)
def test_sizes_have_an_upper_bound(section, field):
    with pytest.raises(
        ConfigError, match=rf"{section}\.{field}: Input should be less than or equal to"
    ):
        make_config({section: {field: 10**6}})


def test_a_huge_image_is_decoded_toward_the_target_size(tmp_path):
    """A 34 KiB PNG of 6000 x 6000 pixels: decoded at a bounded cost, and still right."""
    from lens_core.data import MAX_PIXELS, decode_image, resize_square

    y, x = np.mgrid[0:6000, 0:6000]
    img = np.stack([(x * 255 // 5999), (y * 255 // 5999), np.full_like(x, 90)], -1).astype(np.uint8)
    path = tmp_path / "huge.png"
    Image.fromarray(img).save(path)
    assert MAX_PIXELS > 6000 * 6000
    script = (
        "import resource, sys; from lens_core.data import decode_image, resize_square;"
        "import torch; base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        f"t = resize_square(decode_image(open({str(path)!r}, 'rb').read(), 'x', 128), 128);"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base;"
        "torch.save(t, sys.argv[1]); print(peak // 1024)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "t.pt")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    peak_mib = int(out.stdout.strip())
    assert peak_mib < 300, f"decoding took {peak_mib} MiB over the interpreter's baseline (was 824)"
    got = torch.load(tmp_path / "t.pt")
    small = np.asarray(Image.fromarray(img).resize((128, 128), Image.BOX), np.float32) / 255
    np.testing.assert_allclose(got.permute(1, 2, 0).numpy(), small, atol=0.02)
    with pytest.raises(Exception, match="larger than"):
        from lens_core.data import decode

        decode.MAX_IMAGE_BYTES, saved = 1000, decode.MAX_IMAGE_BYTES
        try:
            decode_image(path.read_bytes(), "x", 64)
        finally:
            decode.MAX_IMAGE_BYTES = saved
    assert resize_square(decode_image(path.read_bytes(), "x", 64), 64).shape == (3, 64, 64)


def test_the_model_cache_keeps_at_most_two_models_per_device(monkeypatch):
    from dataclasses import replace

    from lens_core import model_cache
    from lens_core.run import RunInfo

    model_cache.clear()
    base = RunInfo("000000000000", make_config({}), "file:///x", "d", 10, [])
    for i in range(4):
        model_cache.get_split(replace(base, run_id=f"{i:012d}"), "cpu")
    assert model_cache.cached() == [("000000000002", "cpu"), ("000000000003", "cpu")]
    model_cache.get_split(replace(base, run_id=f"{2:012d}"), "cpu")  # a hit refreshes it
    model_cache.get_split(replace(base, run_id=f"{5:012d}"), "cpu")
    assert model_cache.cached() == [("000000000002", "cpu"), ("000000000005", "cpu")]
    monkeypatch.setenv("LENS_MODEL_CACHE", "1")
    model_cache.get_split(replace(base, run_id=f"{6:012d}"), "cpu")
    assert model_cache.cached() == [("000000000006", "cpu")]
    model_cache.clear()


# ---- odd input --------------------------------------------------------------------------------


def test_a_long_class_name_gets_a_short_safe_slug_and_the_site_publishes(tmp_path):
    from lens_core.data import list_classes
    from lens_core.site import build_site
    from lens_core.site.schema import MAX_SLUG, SLUG_RE

    root = tmp_path / "images"
    long_id = "n" + "x" * 70
    for d in (long_id, long_id + "y", "short"):
        (root / d).mkdir(parents=True)
    name = (
        ("Supercalifragilisticexpialidocious" * 2)[:60]
        + " "
        + ("Pneumonoultramicroscopic" * 3)[:60]
    )
    (tmp_path / "names.json").write_text(json.dumps({long_id: name, long_id + "y": name}))
    classes = list_classes(str(root), None, str(tmp_path / "names.json"))
    slugs = [c.slug for c in classes]
    assert len(set(slugs)) == 3 and all(
        len(s) <= MAX_SLUG and SLUG_RE.fullmatch(s) for s in slugs
    ), slugs
    site = {
        "run": {"run_id": "abcdefabcdef"},
        "classes": [
            {
                "index": c.index,
                "id": c.id,
                "name": c.name,
                "slug": c.slug,
                "status": "failed",
                "error": "x",
            }
            for c in classes
        ],
    }
    build_site(site, str(tmp_path / "site"), None, {})
    assert all((tmp_path / "site" / "classes" / s / "index.html").exists() for s in slugs)


def test_lens_status_shows_markup_and_escapes_as_plain_text(tmp_path):
    from lens_core.status import write_status
    from lens_core.store import RunStore

    store = RunStore(f"file://{tmp_path}/store", "0123456789ab")
    store.write_json(
        "run.json",
        {
            "run_id": "0123456789ab",
            "created": "x",
            "classes": [{"slug": "evil", "index": 0, "id": "[/]", "name": "n"}],
        },
    )
    write_status(
        store,
        "evil",
        "activations",
        "failed",
        0.1,
        "boom [/] [link=https://evil.example]click[/link] "
        "\x1b[31mred\x1b]8;;https://x\x07 \u202eevil",
    )
    out = subprocess.run(
        [LENS, "status", "--store", f"file://{tmp_path}/store", "--run", "0123456789ab"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[/]" in out.stdout and "[link=https://evil.example]click[/link]" in out.stdout
    assert "\x1b" not in out.stdout and "\x07" not in out.stdout and "\u202e" not in out.stdout
    bad = subprocess.run(
        [LENS, "status", "--store", f"file://{tmp_path}/store", "--run", "../../etc"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "is not a run id" in bad.stderr
    assert re.search(r"1 classes, 1 failed", out.stdout)


def test_json_never_carries_nan(tmp_path):
    from lens_core.status import write_status
    from lens_core.store import RunStore

    store = RunStore(f"file://{tmp_path}/s", "0123456789ab")
    write_status(
        store,
        "c",
        "importance",
        "completed",
        float("nan"),
        top_importance=float("inf"),
        shares=np.array([1.0, np.nan]),
    )
    text = (
        tmp_path / "s" / "runs" / "0123456789ab" / "status" / "c" / "importance.json"
    ).read_text()
    record = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert (
        record["seconds"] is None
        and record["top_importance"] is None
        and record["shares"] == [1.0, None]
    )
    assert io.StringIO(text).read().count("NaN") == 0


# ---- issue 21: what still leaked or hung ------------------------------------------------------

# credentials in query parameters whose names no deny-list knew (issue 21, item 7)
HIDDEN_QUERIES = (
    "sas_token=s3cr3t-sas",
    "access_key=s3cr3t-ak",
    "client_secret=s3cr3t-cs",
    "refresh_token=s3cr3t-rt",
    "private_token=s3cr3t-pt",
    "code=s3cr3t-code",
    "auth=s3cr3t-auth",
    "credential=s3cr3t-cred",
    "sig[]=s3cr3t-sig",
    "sig%20=s3cr3t-sp",
    "%73ig=s3cr3t-esc",
    "versionId=1&api-secret=s3cr3t-2nd",
    "versionId=1;sig=s3cr3t-semi",
    "s3cr3t-bare-token",
)


@pytest.mark.parametrize("query", HIDDEN_QUERIES)
def test_a_url_query_survives_only_when_every_parameter_is_allow_listed(query):
    secret = query.rsplit("=", 1)[-1]
    for url in (f"https://models.example.org/ckpt/model.pt?{query}", f"s3://bucket/data?{query}"):
        for field in (
            {"store": url},
            {"publish": url},
            {"model": {"checkpoint": url}},
            {"data": {"url": url}},
            {"data": {"class_names": url}},
            {"maco": {"magnitude": url}},
        ):
            with pytest.raises(ConfigError, match="credentials in URLs are refused") as err:
                make_config(field)
            assert secret not in str(err.value)
        with pytest.raises(ConfigError) as err:  # a Prefect parameter is stored on the server
            config_from_parameters(checkpoint=url)
        assert secret not in str(err.value)
        with pytest.raises(ConfigError, match="credentials in URLs"):
            make_config({"storage_options": {"endpoint_url": url}})


def test_allow_listed_query_parameters_still_name_an_object_version():
    for url in (
        "s3://bucket/ckpt/model.pt?versionId=3HL4kqtJlcpXroDTDmJ.rmSp-Xd3_dIbrHY",
        "gs://bucket/model.pt?generation=1700000000000000",
        "https://models.example.org/model.pt?revision=v2&version=7",
    ):
        assert make_config({"model": {"checkpoint": url}}).model.checkpoint == url


def test_the_changes_label_of_a_run_never_shows_its_query():
    from lens_core.lineage import RunRecord

    rec = RunRecord(
        "0123456789ab",
        {"checkpoint": "https://h.example/ck/epoch-7.pt?access_key=AK&x=s3cr3t"},
        True,
    )
    assert rec.label == "epoch-7.pt"


@pytest.mark.parametrize(
    "name",
    [
        "passphrase",
        "pkey",
        "sastoken",
        "jwt",
        "bearer",
        "cred",
        "creds",
        "oauth2_refresh",
        "sig",
        "ssh_passphrase",
        "client_kwargs.pkey",
    ],
)
def test_scrub_masks_the_values_of_every_credential_like_option(name):
    from lens_core.secrets import is_secret_key

    value = "opt-value-9f8e7d6c"
    options: dict = {}
    node = options
    *parents, leaf = name.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    assert is_secret_key(leaf)
    assert value not in scrub(f"connect failed with {value}", options)
    assert public_options(options) != options


def test_scrub_decodes_percent_escapes_and_masks_any_query_not_allow_listed():
    for query in HIDDEN_QUERIES:
        secret = query.rsplit("=", 1)[-1]
        text = scrub(f"GET https://h.example/x.pt?{query} failed; retry GET s3://b/k?{query}")
        assert secret not in text, (query, text)
    assert scrub("GET https://h.example/x.pt?%2573ig=s3cr3t-twice").count("s3cr3t") == 0
    kept = scrub("GET s3://bucket/model.pt?versionId=abc123 failed")
    assert "versionId=abc123" in kept
    public = {"endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"signature_version": "s3v4"}}
    assert public_options(public) == public


# a checkpoint, class-name file, class index or spectrum that is a device or a FIFO (item 8)
_DEVICE_SCRIPT = """
import resource, sys, json
from lens_core.config import make_config
from lens_core.pipeline import prepare_run
from lens_core import data, maco, models

def vm_bytes():
    return int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + (1 << 30), resource.RLIM_INFINITY))
cfg, fifo, zero = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "read"
    except Exception as err:
        out[name] = type(err).__name__ + ": " + str(err)
attempt("prepare_run", lambda: prepare_run(make_config(cfg)))
attempt("load_model", lambda: models.load_model(make_config(cfg).model, 10))
attempt("digest fifo", lambda: models.checkpoint_digest(fifo))
attempt("class_names", lambda: data.read_class_names(fifo))
attempt("class_index", lambda: data.read_class_index(zero))
attempt("magnitude", lambda: maco.load_magnitude(fifo))
attempt("image", lambda: data.reader._fetch(fifo, None))
print(json.dumps(out))
"""


def test_a_device_or_fifo_is_refused_not_read_forever(tmp_path):
    zero = tmp_path / "model.pt"
    zero.symlink_to("/dev/zero")
    fifo = tmp_path / "names.json"
    os.mkfifo(fifo)
    cfg = {**TINY, "model": {"checkpoint": str(zero)}, "store": f"file://{tmp_path}/store"}
    try:
        out = subprocess.run(
            [sys.executable, "-c", _DEVICE_SCRIPT, json.dumps(cfg), str(fifo), str(zero)],
            capture_output=True,
            text=True,
            timeout=240,
            cwd=tmp_path,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("reading a device or a FIFO never ended")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for name, got in result.items():
        assert "not a regular file" in got, (name, got)
    assert (
        result["prepare_run"].startswith("CheckpointError") and "model.pt" in result["prepare_run"]
    )
    assert result["class_names"].startswith("DataError")
    assert result["image"].startswith("ImageReadError")  # the image is skipped with its reason
    assert not (tmp_path / "store" / "runs").exists()


def test_reads_are_bounded_by_the_bytes_read_not_the_size_reported(tmp_path, monkeypatch):
    """fs.size() says 0 for a device: the cap must count what is read."""
    from fsspec.implementations.local import LocalFileSystem

    from lens_core import data, maco
    from lens_core.data import DataError, listing
    from lens_core.models import checkpoints

    monkeypatch.setattr(LocalFileSystem, "size", lambda self, path: 0)
    ckpt = tmp_path / "ck.pt"
    torch.save(build_model("toy", 10).state_dict(), ckpt)
    with pytest.raises(CheckpointError, match="more than"):
        checkpoints._read_bytes(str(ckpt), None, 1000)
    monkeypatch.setattr(checkpoints, "MAX_CHECKPOINT_BYTES", 1000, raising=False)
    with pytest.raises(CheckpointError, match="more than"):
        checkpoints.checkpoint_digest(str(ckpt))
    names = tmp_path / "names.json"
    names.write_text(json.dumps({f"c{i}": f"name {i}" for i in range(1000)}))
    monkeypatch.setattr(listing, "MAX_JSON_BYTES", 1000, raising=False)
    with pytest.raises(DataError, match="more than"):
        data.read_class_names(str(names))
    with pytest.raises(DataError, match="more than"):
        data.read_class_index(str(names))
    spectrum = tmp_path / "mag.npy"
    maco.save_magnitude(torch.ones(3, 64, 33), str(spectrum))
    monkeypatch.setattr(maco, "MAX_MAGNITUDE_BYTES", 1000, raising=False)
    with pytest.raises(ValueError, match="more than"):
        maco.load_magnitude(str(spectrum))


# Unicode format characters (bidi overrides) never reach a page or the terminal (item 9)
BIDI = "stem \u202e1 tnatropmi\u2066\u200b"


def test_class_names_drop_unicode_format_characters(tmp_path):
    import unicodedata

    from lens_core.data import list_classes, read_class_index, read_class_names

    (tmp_path / "names.json").write_text(json.dumps({"a": BIDI, "b": ["ok", "syn\u202eonym"]}))
    names = read_class_names(str(tmp_path / "names.json"))
    (tmp_path / "index.json").write_text(json.dumps({"0": ["a", BIDI], "1": ["b\u202e", "bee"]}))
    index = read_class_index(str(tmp_path / "index.json"))
    root = tmp_path / "images"
    for d in ("a", "b\u202e"):
        (root / d).mkdir(parents=True)
    classes = list_classes(str(root), None, None, str(tmp_path / "index.json"))
    shown = [
        *names["a"],
        *names["b"],
        *index.names["a"],
        *[c.name for c in classes],
        *[s for c in classes for s in c.synonyms],
    ]
    for text in shown:
        assert not any(unicodedata.category(ch) == "Cf" for ch in text), ascii(text)
    assert names["a"] == ["stem 1 tnatropmi"] and names["b"] == ["ok", "synonym"]
    assert "b\u202e" in index.index  # the folder is still found by its real name


def test_lens_status_cells_drop_unicode_format_characters():
    from flows.cli_common import cell as _cell

    assert _cell(f"boom {BIDI}").plain == "boom stem 1 tnatropmi"
    assert "\u202e" not in _cell("x\u202e\x1b[31m").plain


# validators match the whole value: no trailing newline slips through (item 10)
@pytest.mark.parametrize("bad", ["\n"])
def test_validators_refuse_a_trailing_newline(bad):
    from lens_core.identity import is_run_id
    from lens_core.site.schema import SiteError, check_path, check_slug

    assert is_run_id("4701adbed259") and not is_run_id("4701adbed259" + bad)
    assert check_slug("n01440764-tench") and check_path("classes/a/index.html")
    with pytest.raises(SiteError):
        check_slug("n01440764-tench" + bad)
    with pytest.raises(SiteError):
        check_path("classes/a/index.html" + bad)
