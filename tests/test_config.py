"""AtlasConfig: defaults, TOML loading, field-named errors, run ids, credential redaction."""

import pytest

from lens_core.config import (
    AtlasConfig,
    ConfigError,
    load_config,
    make_config,
    split_secrets,
)
from lens_core.identity import compute_run_id
from lens_core.naming import class_slug, safe_token, unique_slugs
from lens_core.secrets import public_options


def test_embedded_default_needs_no_file():
    cfg = load_config()
    assert cfg.model.arch == "toy" and cfg.data.url is None
    assert cfg.concepts.n_concepts == 10


def test_toml_round_trip(tmp_path):
    path = tmp_path / "atlas.toml"
    path.write_text(
        'store = "s3://bucket/lens"\n'
        '[model]\narch = "resnet50"\nlayer = "layer4"\ninput_size = 224\n'
        "[concepts]\nn_concepts = 12\n"
    )
    cfg = load_config(path)
    assert (cfg.model.arch, cfg.model.layer, cfg.model.input_size) == ("resnet50", "layer4", 224)
    assert cfg.concepts.n_concepts == 12 and cfg.store == "s3://bucket/lens"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"concepts": {"n_concepts": "many"}}, "concepts.n_concepts"),
        ({"maco": {"steps": -5}}, "maco.steps"),
        ({"model": {"std": [0.2, 0.0, 0.2]}}, "model.std"),
        ({"patches": {"fraction": 1.5}}, "patches.fraction"),
        ({"concepts": {"n_concepts": 10_000}}, "n_concepts"),  # more concepts than patches
        ({"modle": {}}, "modle"),  # a typo is an error, not silently ignored
    ],
)
def test_invalid_values_name_the_field(data, field):
    with pytest.raises(ConfigError) as err:
        make_config(data)
    assert field in str(err.value)
    assert "Traceback" not in str(err.value)


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\narch=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_run_id_depends_on_method_not_on_location():
    a = make_config({})
    moved = make_config({"store": "s3://elsewhere/x", "publish": "s3://elsewhere/site"})
    other_k = make_config({"concepts": {"n_concepts": 8}})
    rid = compute_run_id("digest", "file:///data", a)
    assert rid == compute_run_id("digest", "file:///data", moved)
    assert rid != compute_run_id("digest", "file:///data", other_k)
    assert rid != compute_run_id("other-digest", "file:///data", a)
    assert rid != compute_run_id("digest", "file:///data2", a)


def test_credentials_are_redacted_and_moved_to_env():
    opts = {
        "endpoint_url": "http://127.0.0.1:9",
        "key": "AKID",
        "secret": "s3cr3t",
        "client_kwargs": {"aws_secret_access_key": "x"},
    }
    cfg = AtlasConfig(storage_options=opts)
    text = str(cfg.redacted())
    assert "s3cr3t" not in text and "AKID" not in text and "http://127.0.0.1:9" in text
    assert public_options(opts)["client_kwargs"]["aws_secret_access_key"] == "***"
    public, env = split_secrets(opts)
    assert (
        "key" not in public
        and "secret" not in public
        and "aws_secret_access_key" not in public["client_kwargs"]
    )
    assert env == {"AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "s3cr3t"}
    assert opts["client_kwargs"] == {
        "aws_secret_access_key": "x"
    }  # the caller's dict is left alone


def test_slugs_are_safe_and_unique():
    assert class_slug("n02012849", "crane", 134) == "n02012849-crane"
    assert class_slug("n03126707", "crane", 517) == "n03126707-crane"
    evil = class_slug("../../etc", "<script>alert(1)</script>", 3)
    assert set(evil) <= set("abcdefghijklmnopqrstuvwxyz0123456789-") and ".." not in evil
    assert class_slug("../", "", 7) == "class-0007"
    assert safe_token("Café crème") == "cafe-creme"
    assert unique_slugs(["a", "a", "a-2", "b"]) == ["a", "a-3", "a-2", "b"]
