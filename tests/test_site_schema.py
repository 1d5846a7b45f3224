"""The site data is described once (pydantic models in lens_core/site/schema.py): SCHEMA.md is
generated from them, and nothing publish emits is dropped on the way to the data files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tiny import TINY

from lens_core.site.schema import SiteError, normalize_site, schema_markdown


def test_schema_md_is_generated_from_the_models():
    committed = (
        Path(__file__).resolve().parents[1] / "lens_core" / "site" / "SCHEMA.md"
    ).read_text()
    assert committed == schema_markdown(), "run scripts/site-schema.sh"


def _keys(obj: Any, path: str = "") -> set[str]:
    """Every dotted key path of nested dicts (list items share their list's path)."""
    out: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.add(f"{path}.{k}" if path else k)
            out |= _keys(v, f"{path}.{k}" if path else k)
    elif isinstance(obj, list):
        for v in obj:
            out |= _keys(v, path + "[]")
    return out


def test_every_field_publish_emits_reaches_the_data_file(tmp_path):
    from lens_core import renders
    from lens_core.config import make_config
    from lens_core.pipeline import prepare_run, run_class
    from lens_core.publish import publish
    from lens_core.site.collect import collect_site_data

    info = prepare_run(
        make_config(
            {**TINY, "store": f"file://{tmp_path}/store", "publish": f"file://{tmp_path}/site"},
            classes=["0"],
        )
    )
    run_class(info, info.slugs[0])
    renders.render_batch(info, renders.pending_items(info))
    renders.finalize_viz(info)
    site, _ = collect_site_data(info)
    emitted = _keys(site["classes"][0])
    publish(info)
    written = json.loads(
        (tmp_path / "site" / info.run_id / "data" / f"{info.slugs[0]}.json").read_text()
    )
    assert emitted - _keys(written) == set()
    for field in (
        "color",
        "skipped_images",
        "rank",
        "sobol_share",
        "assigned_images",
        "importance_basis",
    ):
        assert any(k.endswith(field) for k in _keys(written)), field


def test_bad_values_name_their_field():
    site = {
        "run": {"run_id": "abcdefabcdef"},
        "classes": [
            {
                "name": "x",
                "slug": "x",
                "concepts": [{"id": 0, "logit_share": float("nan"), "crops": ["../etc/passwd"]}],
            }
        ],
    }
    with pytest.raises(SiteError, match=r"classes\[0\]\.concepts\[0\]\.crops\[0\]: unsafe"):
        normalize_site(site)
    site["classes"][0]["concepts"][0]["crops"] = []
    # NaN never reaches JSON
    assert normalize_site(site)["classes"][0]["concepts"][0]["logit_share"] is None
