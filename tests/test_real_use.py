"""What breaks for the first real user (issue 16): label sets, class identity, model heads,
classes the model gets wrong, and attribution overlays a person can read.

Every run here is the real pipeline (lens_core stages, in process) on the generated toy data and
the shipped toy CNN or models built from it; the truth each test checks against is independent of
the code under test: the same classes explained from the full folder, a clean run on a fresh
store, the toy CNN's own linear layer, the JSON standard, pixel values in a real browser.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lens_core import crops as crops_mod
from lens_core.config import ConfigError, make_config
from lens_core.data import list_classes
from lens_core.pipeline import prepare_run, run_class
from lens_core.publish import publish
from lens_core.toy import TOY_CHECKPOINT, ToyCNN, class_names, ensure_toy_dataset

N_CLASSES = 10
CFG = {
    "data": {"images_per_class": 8},
    "concepts": {"n_concepts": 5},
    "importance": {"images": 4, "n_designs": 8},
    "crops": {"per_concept": 3, "attribution_images": 2},
    "maco": {"steps": 2, "image_size": 64, "crops": 2},
}


def _cfg(root: Path, data_url: str, **data: object) -> dict:
    return {
        **CFG,
        "data": {**CFG["data"], "url": data_url, **data},
        "store": f"file://{root}/store",
        "publish": f"file://{root}/site",
    }


def _explain(cfg: dict, classes: list[str] | None = None):
    info = prepare_run(make_config(cfg, classes=classes))
    for slug in info.slugs:
        run_class(info, slug)
    return info


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy data set (10 classes, 8 images each) as a plain image folder."""
    root = tmp_path_factory.mktemp("toydata")
    url = ensure_toy_dataset(f"file://{root}/toy", N_CLASSES, 8, 0)
    return Path(url[len("file://") :])


def _copy_class(toy: Path, index: int, dest: Path) -> None:
    shutil.copytree(toy / class_names(N_CLASSES)[index], dest)


def _importance(info, slug: str) -> dict[str, np.ndarray]:
    store = info.store()
    imp = store.zarr[f"importance/{slug}"]
    out = {
        name: imp[name][:]
        for name in ("sobol", "order")
        + (("logit_share",) if "logit_share" in set(imp.array_keys()) else ())
    }
    out["W"] = store.zarr[f"concepts/{slug}/W"][:]
    return out


# ---- 1. class folders that are a subset of the label set -------------------------------------


def test_a_subset_of_the_label_set_needs_a_mapping_and_then_matches_the_full_folder(toy, tmp_path):
    names = class_names(N_CLASSES)
    picked = [2, 5, 7]
    full = _explain(_cfg(tmp_path / "full", str(toy)), [names[i] for i in picked])

    subset = tmp_path / "subset" / "images"
    for i in picked:
        _copy_class(toy, i, subset / names[i])
    bare = _cfg(tmp_path / "bare", str(subset))
    with pytest.raises(
        ConfigError
    ) as err:  # 10 outputs, 3 folders: never guessed from sorted order
        prepare_run(make_config(bare))
    assert "10 outputs" in str(err.value) and "3 class folders" in str(err.value)
    assert "data.class_index" in str(err.value)

    mapping = tmp_path / "subset" / "class_index.json"
    mapping.write_text(json.dumps({names[i]: i for i in picked}))
    sub = _explain(_cfg(tmp_path / "sub", str(subset), class_index=str(mapping)))
    assert [c.index for c in sub.classes] == picked and [c.id for c in sub.classes] == [
        names[i] for i in picked
    ]
    for a, b in zip(full.classes, sub.classes, strict=True):
        ref, got = _importance(full, a.slug), _importance(sub, b.slug)
        np.testing.assert_allclose(got["W"], ref["W"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["sobol"], ref["sobol"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["logit_share"], ref["logit_share"], rtol=1e-4, atol=1e-3)
        assert list(got["order"]) == list(ref["order"])

    # the same mapping in the other two accepted formats
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(names))  # every class dir in label order (ImageNet's usual list)
    keras = tmp_path / "imagenet_class_index.json"
    keras.write_text(
        json.dumps({str(i): [names[i], f"class number {i}"] for i in range(N_CLASSES)})
    )
    for url in (as_list, keras):
        listed = list_classes(str(subset), None, None, str(url))
        assert [(c.id, c.index) for c in listed] == [(names[i], i) for i in picked]
    assert list_classes(str(subset), None, None, str(keras))[0].name == "class number 2"
    with pytest.raises(ConfigError, match="beyond the model's 10 outputs"):
        mapping.write_text(json.dumps({names[2]: 2, names[5]: 5, names[7]: 12}))
        prepare_run(make_config(_cfg(tmp_path / "beyond", str(subset), class_index=str(mapping))))


# ---- 2. results are never reused for another class ---------------------------------------------


def _published_class(site: Path, run_id: str, slug: str) -> tuple[dict, dict[str, bytes]]:
    data = json.loads((site / run_id / "data" / f"{slug}.json").read_text())
    files = {}
    for concept in data["concepts"]:
        for path in concept["crops"]:
            files[path] = (site / run_id / path).read_bytes()
    for a in data["attributions"]:
        for key in ("image", "heatmap"):
            files[a[key]] = (site / run_id / a[key]).read_bytes()
    data.pop("run_id")
    return data, files


def test_a_new_class_that_takes_an_existing_slug_never_reuses_its_results(toy, tmp_path):
    folder = tmp_path / "data" / "images"
    _copy_class(toy, 1, folder / "a")
    _copy_class(toy, 2, folder / "b")
    mapping = tmp_path / "data" / "class_index.json"
    mapping.write_text(json.dumps({"a": 1, "b": 2}))
    cfg = _cfg(tmp_path / "run", str(folder), class_index=str(mapping))
    first = _explain(cfg)
    publish(first)
    assert first.slugs == ["a", "b"]

    _copy_class(toy, 0, folder / "A")  # its slug is "a" too, and its label comes first
    mapping.write_text(json.dumps({"A": 0, "a": 1, "b": 2}))
    info = prepare_run(make_config(cfg))
    assert info.run_id == first.run_id  # same checkpoint, data URL and method: the same run
    assert [(c.id, c.slug) for c in info.classes] == [("A", "a"), ("a", "a-2"), ("b", "b")]
    redone = {
        slug: [r["stage"] for r in run_class(info, slug) if not r["skipped"]] for slug in info.slugs
    }
    assert redone == {
        "a": ["activations", "factorize", "importance", "crops"],
        "a-2": ["activations", "factorize", "importance", "crops"],
        "b": [],
    }
    publish(info)
    store = info.store()
    for cls in info.classes:  # every class's activations come from its own folder
        urls = store.zarr[f"acts/{cls.slug}"].attrs["image_urls"]
        assert urls and all(f"/images/{cls.id}/" in u for u in urls), cls

    clean = _explain(
        {
            **cfg,
            "store": f"file://{tmp_path}/clean/store",
            "publish": f"file://{tmp_path}/clean/site",
        }
    )
    publish(clean)
    for cls in info.classes:  # the pages of the re-run show exactly what a clean run shows
        got, got_files = _published_class(tmp_path / "run" / "site", info.run_id, cls.slug)
        ref, ref_files = _published_class(tmp_path / "clean" / "site", clean.run_id, cls.slug)
        assert got == ref, cls.slug
        assert got_files == ref_files, cls.slug
    old_a = store.read_json("run.json")["classes"]
    assert {c["slug"]: c["id"] for c in old_a} == {"a": "A", "a-2": "a", "b": "b"}


# ---- 3. the logit share for any pooled linear head -------------------------------------------


class PoolLinear(nn.Module):
    """Average pooling and a linear layer in one plain module (not a Sequential)."""

    def __init__(self, fc: nn.Linear):
        super().__init__()
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def _toy_blocks() -> tuple[ToyCNN, OrderedDict]:
    toy = ToyCNN(N_CLASSES)
    toy.load_state_dict(load_file(str(TOY_CHECKPOINT)))
    return toy, OrderedDict((f"block{i}", getattr(toy, f"block{i}")) for i in range(1, 5))


def wrapped_head_toy(num_classes: int = N_CLASSES) -> nn.Module:
    """The shipped toy CNN with its pool and linear layer wrapped in one module."""
    toy, blocks = _toy_blocks()
    return nn.Sequential(OrderedDict([*blocks.items(), ("head", PoolLinear(toy.fc))]))


def mlp_head_toy(num_classes: int = N_CLASSES) -> nn.Module:
    """The toy CNN's blocks under a two-layer MLP head: no exact split of the logit exists."""
    _, blocks = _toy_blocks()
    torch.manual_seed(0)
    head = nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 32),
        nn.ReLU(),
        nn.Linear(32, num_classes),
    )
    return nn.Sequential(OrderedDict([*blocks.items(), ("head", head)]))


def test_a_head_in_another_module_gets_the_same_shares_and_an_mlp_head_gets_sobol(
    toy, tmp_path, monkeypatch
):
    monkeypatch.setenv(
        "LENS_MODEL_FACTORIES", f"{__name__}:wrapped_head_toy,{__name__}:mlp_head_toy"
    )
    names = class_names(N_CLASSES)
    classes = [names[0], names[4]]
    twin = _explain(_cfg(tmp_path / "twin", str(toy)), classes)
    wrapped_cfg = _cfg(tmp_path / "wrapped", str(toy))
    wrapped_cfg["model"] = {"arch": f"{__name__}:wrapped_head_toy"}
    wrapped = _explain(wrapped_cfg, classes)
    for a, b in zip(twin.classes, wrapped.classes, strict=True):
        ref, got = _importance(twin, a.slug), _importance(wrapped, b.slug)
        assert "logit_share" in got, "a pooled linear head in a plain module was not found"
        np.testing.assert_allclose(got["logit_share"], ref["logit_share"], rtol=1e-4, atol=1e-2)
        assert list(got["order"]) == list(ref["order"])

    mlp_cfg = _cfg(tmp_path / "mlp", str(toy))
    mlp_cfg["model"] = {"arch": f"{__name__}:mlp_head_toy"}
    mlp = _explain(mlp_cfg, classes[:1])
    store = mlp.store()
    slug = mlp.slugs[0]
    imp = store.zarr[f"importance/{slug}"]
    assert "logit_share" not in set(imp.array_keys())
    assert (
        imp.attrs["importance_basis"] == "sobol" and imp.attrs["basis_reason"] == "no-linear-head"
    )
    assert list(imp["order"][:]) == list(np.argsort(-imp["sobol"][:], kind="stable"))
    publish(mlp)
    site = tmp_path / "mlp" / "site" / mlp.run_id
    data = json.loads((site / "data" / f"{slug}.json").read_text())
    assert data["importance_basis"] == "sobol"
    assert all(c["logit_share"] is None for c in data["concepts"])
    assert sum(c["sobol_share"] for c in data["concepts"]) == pytest.approx(100, abs=0.1)
    page = (site / "classes" / slug / "index.html").read_text()
    note = re.search(
        r'<div class="notice[^"]*" role="note" id="basis-note">(.*?)</div>', page, re.S
    )
    assert (
        note
        and "not a linear map of the pooled activations" in note.group(1)
        and "Sobol" in note.group(1)
    )
    shown = re.findall(r'<b class="share">([^<]*)</b>', page)
    assert shown and all(s.endswith("%") and s != "–" for s in shown)  # never an empty bar


# ---- 7. a class the model gets wrong ----------------------------------------------------------


def _strict_json(text: str) -> object:
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _check_all_json(root: Path) -> int:
    n = 0
    for path in root.rglob("*"):
        if path.suffix == ".json":
            _strict_json(path.read_text())
            n += 1
        elif path.name == "classes.js":
            _strict_json(path.read_text().split("=", 1)[1].rstrip().rstrip(";"))
            n += 1
    return n


@pytest.fixture(scope="module")
def scrambled(toy, tmp_path_factory):
    """Runs of classes 2, 3, 4 with the shipped checkpoint and with class 3's head row scrambled."""
    from flows.cli import status_table

    root = tmp_path_factory.mktemp("scrambled")
    state = load_file(str(TOY_CHECKPOINT))
    gen = torch.Generator().manual_seed(0)
    state["fc.weight"][3] = state["fc.weight"][3][
        torch.randperm(state["fc.weight"].shape[1], generator=gen)
    ]
    state["fc.bias"][3] -= 4.0
    ckpt = root / "scrambled.safetensors"
    save_file(state, str(ckpt))
    names = class_names(N_CLASSES)
    classes = [names[2], names[3], names[4]]
    runs = {}
    for kind, model in (("shipped", {}), ("scrambled", {"checkpoint": str(ckpt)})):
        cfg = {**_cfg(root / kind, str(toy)), "model": model}
        info = _explain(cfg, classes)
        publish(info)
        runs[kind] = {
            "info": info,
            "site": root / kind / "site" / info.run_id,
            "root": root / kind,
            "status": {r["class"]: r for r in status_table(info.store())},
        }
    return runs


def test_a_class_the_model_no_longer_recognises_gets_a_clear_notice(scrambled):
    good, bad = scrambled["shipped"], scrambled["scrambled"]
    victim = bad["info"].classes[1]
    imp = bad["info"].store().zarr[f"importance/{victim.slug}"]
    assert (
        imp.attrs["assigned_images"]
        < 3
        <= good["info"].store().zarr[f"importance/{victim.slug}"].attrs["assigned_images"]
    )
    assert imp.attrs["basis_reason"] == "few-predicted" and "logit_share" not in set(
        imp.array_keys()
    )

    page = (bad["site"] / "classes" / victim.slug / "index.html").read_text()
    assert 'id="basis-note"' in page and "The model rarely predicts this class." in page
    counts = re.search(r'<p class="assigned" id="assigned">(.*?)</p>', page, re.S).group(1)
    assert f"<b>{imp.attrs['assigned_images']} of 8</b> images" in counts
    assert f"<b>{imp.attrs['assigned_patches']} of 128</b> patches" in counts
    index = (bad["site"] / "index.html").read_text()
    card = re.search(
        rf'<li class="card[^"]*"[^>]*><a href="classes/{victim.slug}/index.html">.*?</li>',
        index,
        re.S,
    )
    assert card and "rarely predicted" in card.group(0)
    assert "rarely predicted" in bad["status"][victim.slug]["note"]
    assert all(not row["note"] for slug, row in bad["status"].items() if slug != victim.slug)

    # valid JSON everywhere: store (status, run.json, crops index, zarr metadata) and site
    assert _check_all_json(bad["root"]) > 20 and _check_all_json(good["root"]) > 20

    # the other classes are explained as before: same concepts, order, Sobol, crops; no notice
    for slug in (bad["info"].slugs[0], bad["info"].slugs[2]):
        ref, ref_files = _published_class(good["site"].parent, good["info"].run_id, slug)
        got, got_files = _published_class(bad["site"].parent, bad["info"].run_id, slug)
        assert [c["id"] for c in got["concepts"]] == [c["id"] for c in ref["concepts"]]
        assert [c["sobol"] for c in got["concepts"]] == [c["sobol"] for c in ref["concepts"]]
        for g, r in zip(got["concepts"], ref["concepts"], strict=True):
            assert g["logit_share"] == pytest.approx(r["logit_share"], abs=1.0)
        assert got_files == ref_files and got["note"] is None
        assert 'id="basis-note"' not in (bad["site"] / "classes" / slug / "index.html").read_text()


# ---- 5. attribution maps a person can read ---------------------------------------------------


def test_concept_colours_are_the_sites_colours():
    css = (Path(crops_mod.__file__).parent / "site" / "static" / "lens.css").read_text()
    root = css[: css.index("}")]
    palette = [re.search(rf"--k{i}:\s*(#[0-9a-f]{{6}})", root).group(1) for i in range(10)]
    assert palette == crops_mod.CONCEPT_COLORS
    assert re.search(r"--ko:\s*(#[0-9a-f]{6})", root).group(1) == crops_mod.OTHER_COLOR


def test_the_overlay_shows_the_top_concept_where_it_is(scrambled, browser):
    """In a real browser: the overlay's pixels differ from the plain image's where the top
    concept dominates, toward the top concept's colour, and the legend uses that colour."""
    import functools
    import http.server
    import threading

    good = scrambled["shipped"]
    info, site = good["info"], good["site"]
    slug = info.slugs[0]
    store = info.store()
    order = store.zarr[f"importance/{slug}/order"][:]
    spatial = store.zarr[f"acts/{slug}/spatial"][:1]
    W = store.zarr[f"concepts/{slug}/W"][:]
    from lens_core.factorize import project_nnls

    n, c, h, w = spatial.shape
    coeffs = (
        np.asarray(project_nnls(spatial.transpose(0, 2, 3, 1).reshape(-1, c), W))
        .reshape(h, w, -1)
        .transpose(2, 0, 1)
    )
    size = CFG["crops"].get("size", 96) * 2
    dominant, strength = crops_mod.dominance(coeffs, size)
    top = int(order[0])
    where = np.argwhere((dominant == top) & (strength >= 0.9 * strength[dominant == top].max()))
    assert len(where), "the top concept dominates no region of the first image"
    y, x = (int(v) for v in where[len(where) // 2])

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(site))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{server.server_address[1]}/classes/{slug}/index.html")
        fig = page.locator("#attribution figure").first
        fig.scroll_into_view_if_needed()
        page.wait_for_function(
            "() => [...document.querySelectorAll('#attribution figure')[0].querySelectorAll('img')]"
            ".every(i => i.complete && i.naturalWidth > 0)",
            timeout=15000,
        )
        pixels = page.evaluate(
            "([x, y]) => [...document.querySelectorAll('#attribution figure')[0]"
            ".querySelectorAll('img')].map(img => {\n"
            "                const c = document.createElement('canvas');"
            " c.width = img.naturalWidth; c.height = img.naturalHeight;\n"
            "                const g = c.getContext('2d'); g.drawImage(img, 0, 0);\n"
            "                return [...g.getImageData(x, y, 1, 1).data].slice(0, 3); })",
            [x, y],
        )
        swatch = page.evaluate(
            "() => getComputedStyle(document.querySelector('#attribution .legend3 .sw'))"
            ".backgroundColor"
        )
        classes = page.evaluate(
            "() => document.querySelector('#attribution .legend3 .sw').className"
        )
        page.close()
    finally:
        server.shutdown()
    plain, overlay = (np.array(v, float) for v in pixels)
    colour = crops_mod._hex_rgb(crops_mod.concept_color(0)) * 255
    assert np.abs(overlay - plain).sum() > 60, (plain, overlay)
    assert np.linalg.norm(overlay - colour) < np.linalg.norm(plain - colour)
    # the legend's first entry is the top concept, in its card colour
    assert classes.split()[-1] == "k0"
    assert swatch == "rgb({}, {}, {})".format(*(int(v) for v in colour.round()))


def test_a_negative_share_has_its_own_look_and_explanation(tmp_path):
    from site_fixtures import make_site

    from lens_core.site import build_site

    site, assets = make_site(n_classes=2, n_points=5)
    concept = site["classes"][0]["concepts"][-1]
    concept["logit_share"] = -2.1
    build_site(site, str(tmp_path / "pub"), None, assets)
    page = (tmp_path / "pub" / "classes" / site["classes"][0]["slug"] / "index.html").read_text()
    item = re.search(rf'<li id="concept-{concept["id"]}".*?</li>', page, re.S).group(0)
    assert (
        'class="score against"' in item
        and 'class="bar neg"' in item
        and "argues against the class" in item
    )
    assert "-2.1%" in item
    assert 'id="negative-note"' in page and "argues <em>against</em> this class" in page
    other = (tmp_path / "pub" / "classes" / site["classes"][1]["slug"] / "index.html").read_text()
    assert 'id="negative-note"' not in other


def test_a_layer_with_negative_activations_is_refused_at_set_up(toy, tmp_path):
    """ConvNeXt's `features` end without an activation: with concepts.method = 'nmf' (explicit;
    'auto' picks semi-NMF there) the run says so before any class pays for its activations."""
    from lens_core.models import ModelError

    cfg = _cfg(tmp_path, str(toy))
    cfg["model"] = {"arch": "convnext_tiny", "layer": "features", "num_classes": N_CLASSES}
    cfg["concepts"] = {**cfg["concepts"], "method": "nmf"}
    with pytest.raises(ModelError, match=r"negative activations.*after a ReLU"):
        prepare_run(make_config(cfg))
    assert not (tmp_path / "store" / "runs").exists() or not any(
        (tmp_path / "store" / "runs").rglob("acts")
    )
