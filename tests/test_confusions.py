"""Mistakes explained by concepts (issue 23), on a ground truth.

The probe data set draws classes 0 and 2 with the lime hexagon, a signature part of class 5
(lime hexagon + pink crescent), in place of one of their own parts; the shipped toy CNN, which
learned the hexagon as evidence for class 5, then calls many of their images class 5. The part
masks say which of class 5's concepts is the hexagon (as in tests/test_changes.py): it must be
the concept that carried the mistaken logit, and a bias candidate (images of two other classes).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from part_masks import concept_parts
from safetensors.torch import load_file

from lens_core.config import make_config
from lens_core.confusions import build_confusions, read_confusions
from lens_core.labels import set_label
from lens_core.pipeline import explain
from lens_core.publish import publish
from lens_core.toy import TOY_CHECKPOINT, class_names, ensure_toy_dataset

A, A2, B = 0, 2, 5
RED_DISC, GREEN_TRIANGLE, HEXAGON = 0, 4, 10
HOSTILE_NAME = '<img src=x onerror="window.__xss=1">'
HOSTILE_LABEL = "<script>window.__xss=2</script> & hexagon"
LENS = str(Path(sys.executable).with_name("lens"))
BASE = {
    "concepts": {"n_concepts": 6},
    "importance": {"images": 4, "n_designs": 8},
    "crops": {"per_concept": 2, "attribution_images": 1},
    "maco": {"steps": 2, "image_size": 64, "crops": 2},
}


@pytest.fixture(scope="module")
def mistaken(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("mistakes")
    data = ensure_toy_dataset(
        f"file://{root}/probe",
        10,
        10,
        0,
        recipes={A: (RED_DISC, HEXAGON), A2: (GREEN_TRIANGLE, HEXAGON)},
    )
    names = class_names(10)
    (root / "names.json").write_text(json.dumps({names[B]: HOSTILE_NAME}))
    cfg = make_config(
        {
            **BASE,
            "data": {"url": data, "images_per_class": 10, "class_names": str(root / "names.json")},
            "store": f"file://{root}/store",
            "publish": f"file://{root}/site",
        }
    )
    out = explain(cfg)
    assert not out["failed"]
    info = out["info"]
    b_slug = info.slugs[B]
    parts = concept_parts(info, b_slug)
    hexagon = [c for c, part in parts.items() if part == HEXAGON]
    assert hexagon, parts
    set_label(info.store(), b_slug, hexagon[0], HOSTILE_LABEL)
    # labels are read when shown: nothing to recompute
    assert build_confusions(info)["skipped"] is True
    publish(info)
    return {
        "root": root,
        "info": info,
        "cfg": cfg,
        "b": b_slug,
        "hexagon": set(hexagon),
        "report": read_confusions(info.store()),
        "site": root / "site" / info.run_id,
    }


def test_images_that_carry_another_class_part_go_there_because_of_that_part(mistaken):
    info, report = mistaken["info"], mistaken["report"]
    pairs = {(p["true"], p["predicted"]): p for p in report["pairs"]}
    for a in (A, A2):
        pair = pairs.get((info.slugs[a], mistaken["b"]))
        assert pair is not None and pair["images"] >= 6, report["pairs"]  # most of its 10 images
        top = pair["concepts"][0]
        assert top["concept"] in mistaken["hexagon"], (pair["concepts"], mistaken["hexagon"])
        assert top["share"] > 50
    # nothing else is mistaken at this scale: the other classes are drawn as the model learned them
    assert sum(p["images"] for p in report["pairs"]) == pairs[(info.slugs[A], mistaken["b"])][
        "images"
    ] + pairs[(info.slugs[A2], mistaken["b"])]["images"] + sum(
        p["images"] for k, p in pairs.items() if k[1] != mistaken["b"]
    )
    assert all(p["images"] <= 1 for k, p in pairs.items() if k[1] != mistaken["b"])
    flag = report["bias"][mistaken["b"]]
    ((concept, entry),) = flag.items()
    assert int(concept) in mistaken["hexagon"]
    assert entry["classes"] == 2 and set(entry["pairs"]) == {info.slugs[A], info.slugs[A2]}


def test_every_split_sums_to_the_models_logit(mistaken):
    """Per pair: shares + residual + bias = 100%, and the summed logit is the checkpoint's own."""
    info, report = mistaken["info"], mistaken["report"]
    state = load_file(str(TOY_CHECKPOINT))
    weight, bias = state["fc.weight"].double().numpy(), state["fc.bias"].double().numpy()
    store = info.store()
    checked = 0
    for pair in report["pairs"]:
        if pair["basis"] != "logit_share":
            continue
        total = sum(c["share"] for c in pair["concepts"]) + pair["residual"] + pair["bias"]
        assert total == pytest.approx(100.0, abs=0.05)
        pooled = store.zarr[f"acts/{pair['true']}"]["image_A"][:][pair["image_positions"]].astype(
            np.float64
        )
        logits = pooled @ weight.T + bias
        p = pair["predicted_index"]
        assert (logits.argmax(1) == p).all()  # the model's own prediction
        assert pair["bias"] == pytest.approx(
            100 * bias[p] * len(pooled) / logits[:, p].sum(), rel=1e-4
        )
        checked += 1
    assert checked >= 2


def test_a_model_with_no_mistakes_lists_none(tmp_path):
    data = ensure_toy_dataset(f"file://{tmp_path}/toy", 10, 4, 0)
    cfg = make_config(
        {
            **BASE,
            "data": {"url": data, "images_per_class": 4},
            "store": f"file://{tmp_path}/store",
            "publish": f"file://{tmp_path}/site",
        },
        classes=class_names(10)[:3],
    )
    out = explain(cfg)
    report = read_confusions(out["info"].store())
    assert report["pairs"] == [] and report["mistaken"] == 0 and report["n_images"] == 12
    page = (tmp_path / "site" / out["info"].run_id / "mistakes.html").read_text()
    assert 'id="no-mistakes"' in page and 'id="pairs"' not in page
    assert build_confusions(out["info"])["skipped"] is True  # resumable: nothing changed


def test_the_cli_lists_pairs_by_count_as_json(mistaken):
    info = mistaken["info"]
    store = mistaken["cfg"].store
    res = subprocess.run(
        [LENS, "confusions", "--store", store, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [r["images"] for r in rows] == sorted((r["images"] for r in rows), reverse=True)
    first = rows[0]
    assert first["predicted"] == mistaken["b"] and first["true"] in (info.slugs[A], info.slugs[A2])
    assert (
        first["concepts"][0]["label"] == HOSTILE_LABEL
        and first["concepts"][0]["concept"] in mistaken["hexagon"]
    )
    assert set(first) >= {"true", "predicted", "images", "concepts", "examples"}
    one = subprocess.run(
        [LENS, "confusions", "--store", store, "--class", info.slugs[A2], "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert one.returncode == 0, one.stderr
    assert {r["true"] for r in json.loads(one.stdout)} | {
        r["predicted"] for r in json.loads(one.stdout)
    } >= {info.slugs[A2]}
    assert all(info.slugs[A2] in (r["true"], r["predicted"]) for r in json.loads(one.stdout))
    text = subprocess.run(
        [LENS, "confusions", "--store", store], capture_output=True, text=True, timeout=120
    )
    # plain text in a terminal, not markup
    assert text.returncode == 0 and "<script>" in text.stdout
    bad = subprocess.run(
        [LENS, "confusions", "--store", store, "--class", "no-such-class"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("lens: ") and "Traceback" not in bad.stderr


def test_the_mistakes_page_ranks_filters_and_escapes(mistaken, browser):
    site, info = mistaken["site"], mistaken["info"]
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("dialog", lambda d: (errors.append(d.message), d.dismiss()))
    page.goto((site / "mistakes.html").as_uri())
    counts = [
        int(t)
        for t in page.eval_on_selector_all("#pairs > li .mcount", "e => e.map(x => x.textContent)")
    ]
    assert counts == sorted(counts, reverse=True) and counts[0] >= 6
    first = page.inner_text("#pairs > li:first-child")
    assert HOSTILE_NAME in first and HOSTILE_LABEL in first  # shown as text, never run
    assert page.evaluate("window.__xss") is None
    overlays = page.eval_on_selector_all(
        "#pairs > li:first-child .mex img", "e => e.map(i => i.complete && i.naturalWidth)"
    )
    assert overlays and all(overlays)
    page.fill("#mfilter", class_names(10)[A2].split("-", 1)[1].replace("-", " "))
    visible = page.eval_on_selector_all("#pairs > li:not([hidden])", "e => e.map(x => x.id)")
    assert visible and all(v.startswith(f"pair-{info.slugs[A2]}--") for v in visible if v)
    page.goto((site / "mistakes.html").as_uri() + f"?class={mistaken['b']}")
    visible = page.eval_on_selector_all("#pairs > li:not([hidden])", "e => e.map(x => x.id)")
    assert {
        f"pair-{info.slugs[A]}--{mistaken['b']}",
        f"pair-{info.slugs[A2]}--{mistaken['b']}",
    } <= set(visible)
    assert errors == [] and page.evaluate("window.__xss") is None
    page.close()


def test_class_pages_show_mistakes_both_ways_and_flag_the_bias(mistaken, browser):
    site, info = mistaken["site"], mistaken["info"]
    b_page = (site / "classes" / mistaken["b"] / "index.html").read_text()
    assert "<script>window.__xss" not in b_page and "&lt;script&gt;window.__xss=2" in b_page
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((site / "classes" / mistaken["b"] / "index.html").as_uri())
    mistaken_for = page.inner_text("#mistaken-for")
    assert "Mistaken for this class" in mistaken_for and HOSTILE_LABEL in mistaken_for
    hexagon = min(mistaken["hexagon"])
    flag = page.inner_text(f"#concept-{hexagon} .bias-flag")
    assert re.search(r"also drives \d+ mistaken images of 2 other classes", flag), flag
    links = page.eval_on_selector_all(
        f"#concept-{hexagon} .bias-flag a", "e => e.map(a => a.getAttribute('href'))"
    )
    assert f"../../mistakes.html#pair-{info.slugs[A]}--{mistaken['b']}" in links
    page.goto((site / "classes" / info.slugs[A] / "index.html").as_uri())
    went = page.inner_text("#went")
    assert "Where its images went" in went and HOSTILE_NAME in went
    assert errors == [] and page.evaluate("window.__xss") is None
    page.close()
