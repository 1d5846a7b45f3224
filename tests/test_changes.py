"""What changed between two checkpoints, on a ground truth: the toy CNN fine-tuned so that one
class's signature part is replaced by another part (issue 14).

The data is a probe set: class 3 ("magenta cross + cyan ring") is drawn with both its old
signature part (magenta cross, part 6) and its new one (lime hexagon, part 10, which also belongs
to class 5); every other class is drawn as usual. Run A explains the shipped toy CNN; run B the
same CNN fine-tuned on a world where class 3 has the hexagon instead of the cross and the cross
is a distractor seen in every class. The part masks of the probe set say which concept is which.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from part_masks import concept_parts
from safetensors.torch import load_file, save_file
from tiny import TINY, tiny_config

from lens_core.changes import compare, compare_with_previous, read_changes
from lens_core.config import ConfigError, make_config
from lens_core.labels import read_labels, set_label
from lens_core.lineage import find_run, list_runs, previous_run
from lens_core.pipeline import explain
from lens_core.publish import publish
from lens_core.run import prepare_run
from lens_core.store import RunStore
from lens_core.toy import TOY_CHECKPOINT, ToyCNN, ensure_toy_dataset
from lens_core.toy.generator import DISTRACTOR_PARTS
from lens_core.toy.train import finetune

CHANGED, CROSS, HEXAGON, RING = 3, 6, 10, 7
LENS = str(Path(sys.executable).with_name("lens"))
HTML_LABEL = "<b>Ring</b> & co"


@pytest.fixture(scope="module")
def lineage(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("lineage")
    data = ensure_toy_dataset(
        f"file://{root}/probe", 10, 10, 0, recipes={CHANGED: (CROSS, HEXAGON, RING)}
    )
    tuned = ToyCNN(10)
    tuned.load_state_dict(load_file(str(TOY_CHECKPOINT)))
    finetune(tuned, {CHANGED: (HEXAGON, RING)}, DISTRACTOR_PARTS + (CROSS,))
    ckpt = root / "toy-epoch-2.safetensors"
    save_file({k: v.contiguous() for k, v in tuned.state_dict().items()}, str(ckpt))
    base = tiny_config(  # TINY's maco
        root,
        data={"url": data, "images_per_class": 10},
        patches={},  # the default grid
        concepts={"n_concepts": 6},
        importance={"images": 5, "n_designs": 16},
        crops={"per_concept": 3, "attribution_images": 1},
    )
    a = explain(make_config({**base, "model": {"checkpoint": str(TOY_CHECKPOINT)}}))
    assert a["changes"]["previous"] is None and not a["failed"]
    slug = a["info"].slugs[CHANGED]
    concepts_a = concept_parts(a["info"], slug)
    ring_a = next(c for c, part in concepts_a.items() if part == RING)
    set_label(a["info"].store(), slug, ring_a, HTML_LABEL)
    cfg_b = make_config({**base, "model": {"checkpoint": str(ckpt)}})
    b = explain(cfg_b)
    assert not b["failed"]
    return {
        "root": root,
        "a": a["info"],
        "b": b["info"],
        "cfg_b": cfg_b,
        "summary": b["changes"],
        "slug": slug,
        "parts_a": concepts_a,
        "parts_b": concept_parts(b["info"], slug),
        "ring_a": ring_a,
    }


def _report(lineage: dict) -> dict:
    store = lineage["b"].store()
    return store.read_json(f"changes/{lineage['a'].run_id}/{lineage['slug']}.json")


def test_the_changed_class_ranks_first_and_its_parts_swap_importance(lineage):
    summary = lineage["summary"]
    assert (
        summary["previous"] == lineage["a"].run_id
        and summary["previous_label"] == "toy_cnn.safetensors"
    )
    ranking = summary["ranking"]
    scores = {row["slug"]: row["score"] for row in ranking}
    assert len(scores) == 10 and ranking[0]["slug"] == lineage["slug"], ranking
    others = [s for slug, s in scores.items() if slug != lineage["slug"]]
    assert np.median(others) < 0.5 * scores[lineage["slug"]], scores
    report = _report(lineage)
    cross = next(c for c, part in lineage["parts_a"].items() if part == CROSS)
    hexagon = next(c for c, part in lineage["parts_b"].items() if part == HEXAGON)
    gone = [v for v in report["vanished"] if v["concept"] == cross]
    pair = [m for m in report["matched"] if m["before"] == cross]
    assert gone or pair[0]["importance_after"] <= 0.5 * pair[0]["importance_before"], report
    # it mattered before
    assert pair[0]["importance_before"] > 15 if pair else gone[0]["importance"] > 15
    new = [a for a in report["appeared"] if a["concept"] == hexagon]
    gained = [m for m in report["matched"] if m["after"] == hexagon]
    assert new or gained[0]["delta"] >= 10, report
    assert (new[0]["importance"] if new else gained[0]["importance_after"]) >= 15
    print(
        "\nground truth: changed class score "
        f"{scores[lineage['slug']]:.3f} (rank 1), others' median "
        f"{np.median(others):.3f}; cross concept {pair[0] if pair else gone[0]}; "
        f"hexagon concept {gained[0] if gained else new[0]}"
    )


def test_a_run_compared_with_itself_has_no_change(lineage):
    store_url = lineage["cfg_b"].store
    a = find_run(store_url, lineage["a"].run_id)
    summary, reports = compare(store_url, None, a, a, write=False)
    assert [row["score"] for row in summary["ranking"]] == [0.0] * 10
    assert sorted(reports) == sorted(lineage["a"].slugs)
    for report in reports.values():
        assert not report["appeared"] and not report["vanished"]
        # every concept matched to itself (an empty "matched" would pass the `all` below)
        assert sorted(m["before"] for m in report["matched"]) == list(range(6)), report
        assert all(
            m["similarity"] >= 0.9999 and m["before"] == m["after"] and m["delta"] == 0
            for m in report["matched"]
        )


def test_permuting_one_runs_concepts_changes_nothing(lineage):
    store_url = lineage["cfg_b"].store
    root = Path(store_url[len("file://") :]) / "runs"
    twin = "ffffffffffff"
    shutil.copytree(root / lineage["b"].run_id, root / twin)
    meta = json.loads((root / twin / "run.json").read_text())
    (root / twin / "run.json").write_text(json.dumps({**meta, "run_id": twin}))
    store = RunStore(store_url, twin)
    rng = np.random.default_rng(0)
    perms = {}
    for slug in lineage["b"].slugs:
        con, imp = store.zarr[f"concepts/{slug}"], store.zarr[f"importance/{slug}"]
        k = con["W"].shape[0]
        perm = rng.permutation(k)  # new concept j is old concept perm[j]
        inverse = np.argsort(perm)
        perms[slug] = inverse
        con["U"][:] = con["U"][:][:, perm]
        con["W"][:] = con["W"][:][perm]
        for name in ("sobol", "sobol_share", "logit_share"):
            if name in set(imp.array_keys()):
                imp[name][:] = imp[name][:][perm]
        imp["order"][:] = inverse[imp["order"][:]]
    a, b, twin_run = (
        find_run(store_url, r) for r in (lineage["a"].run_id, lineage["b"].run_id, twin)
    )
    ref, ref_reports = compare(store_url, None, a, b, write=False)
    got, got_reports = compare(store_url, None, a, twin_run, write=False)
    assert [(r["slug"], r["score"]) for r in got["ranking"]] == [
        (r["slug"], r["score"]) for r in ref["ranking"]
    ]
    for slug, report in ref_reports.items():
        inverse = perms[slug]
        want = sorted(
            (m["before"], int(inverse[m["after"]]), m["similarity"], m["delta"])
            for m in report["matched"]
        )
        have = sorted(
            (m["before"], m["after"], m["similarity"], m["delta"])
            for m in got_reports[slug]["matched"]
        )
        assert have == want
        assert sorted(int(inverse[x["concept"]]) for x in report["appeared"]) == sorted(
            x["concept"] for x in got_reports[slug]["appeared"]
        )
    shutil.rmtree(root / twin)


def test_the_previous_run_is_found_in_the_lineage(lineage):
    store_url = lineage["cfg_b"].store
    prev = previous_run(store_url, lineage["b"].run_id)
    assert prev is not None and prev.run_id == lineage["a"].run_id
    # the latest other one
    assert previous_run(store_url, lineage["a"].run_id).run_id == lineage["b"].run_id
    other = make_config({**lineage["cfg_b"].model_dump(mode="json"), "concepts": {"n_concepts": 5}})
    from lens_core.lineage import lineage_key

    assert (
        lineage_key(lineage["b"].data_url, other)
        != find_run(store_url, lineage["b"].run_id).lineage
    )


def test_labels_carry_over_are_escaped_and_survive_a_republish(lineage, tmp_path):
    b, slug = lineage["b"], lineage["slug"]
    labels = read_labels(b.store())[slug]
    report = _report(lineage)
    ring_b = next(m["after"] for m in report["matched"] if m["before"] == lineage["ring_a"])
    carried = labels[str(ring_b)]
    assert carried["text"] == HTML_LABEL and carried["source"] == "carried"
    assert (
        carried["from_run"] == lineage["a"].run_id and carried["from_concept"] == lineage["ring_a"]
    )
    assert report["labels"]["carried"] == [
        {"concept": ring_b, "from_concept": lineage["ring_a"], "text": HTML_LABEL}
    ]

    site = lineage["root"] / "site" / b.run_id
    page = (site / "classes" / slug / "index.html").read_text()
    escaped = "&lt;b&gt;Ring&lt;/b&gt; &amp; co"
    assert (
        escaped in page
        and HTML_LABEL not in page
        and "Label carried over from the previous checkpoint" in page
    )
    assert (
        escaped in (site / "changes.html").read_text()
        and HTML_LABEL not in (site / "changes.html").read_text()
    )
    listing = json.loads((site / "data" / "classes.json").read_text())
    # search finds it by label
    assert HTML_LABEL in next(c for c in listing if c["slug"] == slug)["labels"]
    index = (site / "index.html").read_text()
    # the card's search key
    assert "&lt;b&gt;ring&lt;/b&gt;" in index and "<b>ring</b>" not in index

    # a new label on run B, then `lens publish`: the page shows it; nothing is recomputed
    cfg = tmp_path / "b.toml"
    cfg.write_text(_toml(lineage["cfg_b"]))
    marker = (
        Path(lineage["cfg_b"].store[len("file://") :])
        / "runs"
        / b.run_id
        / "lens.zarr"
        / "acts"
        / slug
        / "zarr.json"
    )
    before = marker.stat().st_mtime_ns
    out = subprocess.run(
        [LENS, "label", "--config", str(cfg), "--run", b.run_id, slug, str(ring_b), "Stem"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    out = subprocess.run(
        [LENS, "publish", "--config", str(cfg)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    page = (site / "classes" / slug / "index.html").read_text()
    # the user's label wins
    assert '<span class="label">Stem</span>' in page and escaped not in page
    assert marker.stat().st_mtime_ns == before
    assert "stem" in (site / "index.html").read_text()

    # a vanished concept's label is reported lost (forced with a strict threshold)
    store_url = lineage["cfg_b"].store
    a, brec = find_run(store_url, lineage["a"].run_id), find_run(store_url, b.run_id)
    strict = 0.999
    _, dry = compare(store_url, None, a, brec, strict, write=False)
    slug_v, gone = next((s, r["vanished"][0]) for s, r in dry.items() if r["vanished"])
    set_label(lineage["a"].store(), dry[slug_v]["prev_slug"], gone["concept"], "Lost part")
    _, reports = compare(store_url, None, a, brec, strict, write=True)
    assert {"concept": gone["concept"], "text": "Lost part"} in reports[slug_v]["labels"]["lost"]


def _toml(cfg) -> str:
    return (
        f'store = "{cfg.store}"\npublish = '
        f'"{cfg.publish}"\n[model]\ncheckpoint = "{cfg.model.checkpoint}"\n'
        f'[data]\nurl = "{cfg.data.url}"\nimages_per_class = {cfg.data.images_per_class}\n'
        f"[concepts]\nn_concepts = {cfg.concepts.n_concepts}\n"
        f"[importance]\nimages = {cfg.importance.images}\nn_designs = {cfg.importance.n_designs}\n"
        f"[crops]\nper_concept = {cfg.crops.per_concept}\nattribution_images = "
        f"{cfg.crops.attribution_images}\n"
        f"[maco]\nsteps = {cfg.maco.steps}\nimage_size = "
        f"{cfg.maco.image_size}\ncrops = {cfg.maco.crops}\n"
    )


def test_the_site_shows_what_changed(lineage):
    a, b, slug = lineage["a"], lineage["b"], lineage["slug"]
    publish_root = lineage["root"] / "site"
    site = publish_root / b.run_id
    changes = (site / "changes.html").read_text()
    order = re.findall(r'<li id="changed-([a-z0-9-]+)"', changes)
    assert order[0] == slug and len(order) == 10
    first = re.search(rf'<li id="changed-{slug}".*?</li>\n', changes, re.S).group(0)
    before_imgs = re.findall(r'<div class="before">.*?</div>', first, re.S)[0]
    srcs = re.findall(r'src="([^"]+)"', before_imgs)  # the previous run's viz and crops
    assert srcs, before_imgs
    for src in srcs:  # side by side
        assert src.startswith(f"../{a.run_id}/") and (site / src).resolve().exists(), src
    page = (site / "classes" / slug / "index.html").read_text()
    since = re.search(r'<section id="since".*?</section>', page, re.S).group(0)
    assert "Since the previous checkpoint" in since and "toy_cnn.safetensors" in since
    links = re.findall(r'href="(\.\./\.\./\.\./[^"#]+)#concept-(\d+)"', since)
    assert links and all((site / "classes" / slug / href).resolve().exists() for href, _ in links)
    assert re.search(r'class="chg up"[^>]*>\+\d', since) and re.search(
        r'class="chg down"[^>]*>−\d', since
    )
    index = (site / "index.html").read_text()
    card = re.search(
        rf'<li class="card[^"]*"[^>]*><a href="classes/{slug}/index.html">.*?</li>', index, re.S
    ).group(0)
    assert "changed" in card and 'href="changes.html"' in index
    summary, reports = read_changes(b.store())
    assert summary["previous"] == a.run_id and set(reports) == set(b.slugs)


def test_lens_diff_on_a_local_and_an_s3_store(lineage, s3, tmp_path):
    store_url = lineage["cfg_b"].store
    a, b = lineage["a"].run_id, lineage["b"].run_id
    out = subprocess.run(
        [LENS, "diff", "--store", store_url, "--json"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert rows[0]["slug"] == lineage["slug"] and [r["score"] for r in rows] == sorted(
        (r["score"] for r in rows), reverse=True
    )
    assert all(
        {"class", "slug", "score", "appeared", "vanished", "matched"} <= set(r) for r in rows
    )
    named = subprocess.run(
        [LENS, "diff", "--store", store_url, a, b, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert json.loads(named.stdout) == rows
    table = subprocess.run(
        [LENS, "diff", "--store", store_url],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert table.returncode == 0 and lineage["slug"] in table.stdout

    bucket = s3.new_bucket()  # the same store, on a real S3 server with authentication
    fs = s3.filesystem()
    local = Path(store_url[len("file://") :]) / "runs"
    for run in (a, b):
        fs.put(str(local / run), f"{bucket}/store/runs/", recursive=True)
    cfg = tmp_path / "s3.toml"
    cfg.write_text(
        f'store = "s3://{bucket}/store"\n'
        f'storage_options = {{ endpoint_url = "{s3.endpoint_url}" }}\n'
    )
    env = {**os.environ, "AWS_ACCESS_KEY_ID": s3.key, "AWS_SECRET_ACCESS_KEY": s3.secret}
    out = subprocess.run(
        [LENS, "diff", "--config", str(cfg), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert [(r["slug"], r["score"]) for r in json.loads(out.stdout)] == [
        (r["slug"], r["score"]) for r in rows
    ]
    assert {r.run_id for r in list_runs(f"s3://{bucket}/store", s3.storage_options)} >= {a, b}


# ---- issue 21: one class never sinks the comparison; links only to what exists; late labels carry
def test_a_previous_run_that_does_not_exist_is_refused_at_set_up(tmp_path):
    cfg = make_config(tiny_config(tmp_path, changes={"previous_run": "0123456789ab"}))
    with pytest.raises(ConfigError, match=r"changes\.previous_run: no run 0123456789ab under"):
        prepare_run(cfg)
    assert not (tmp_path / "store" / "runs").exists()  # refused before anything was computed


@pytest.fixture(scope="module")
def edited(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two runs of three toy classes on two checkpoints (the second: the toy CNN with a little
    noise). Between them, class 2's images were replaced (new files), so that class shares no patch
    with the previous run. Run A is published under site-a, run B under site-b (not beside A)."""
    root = tmp_path_factory.mktemp("edited")
    data = ensure_toy_dataset(f"file://{root}/data", 10, 3, 0)
    weights = load_file(str(TOY_CHECKPOINT))
    gen = torch.Generator().manual_seed(0)
    noisy = {
        k: v + 0.02 * v.abs().mean() * torch.randn(v.shape, generator=gen)
        if v.is_floating_point()
        else v
        for k, v in weights.items()
    }
    ckpt = root / "toy-noisy.safetensors"
    save_file({k: v.contiguous() for k, v in noisy.items()}, str(ckpt))
    base = {**TINY, "data": {"url": data, "images_per_class": 3}, "store": f"file://{root}/store"}
    classes = ["0", "1", "2"]
    a = explain(
        make_config(
            {
                **base,
                "publish": f"file://{root}/site-a",
                "model": {"checkpoint": str(TOY_CHECKPOINT)},
            },
            classes=classes,
        )
    )
    changed = a["info"].slugs[2]
    folder = Path(data[len("file://") :]) / a["info"].cls(changed).id
    for image in sorted(folder.iterdir()):
        image.rename(folder / f"new-{image.name}")
    b = explain(
        make_config(
            {**base, "publish": f"file://{root}/site-b", "model": {"checkpoint": str(ckpt)}},
            classes=classes,
        )
    )
    return {"root": root, "a": a["info"], "b": b["info"], "b_result": b, "changed": changed}


def test_a_class_whose_images_changed_is_not_comparable_and_the_others_publish(edited):
    a, b, changed = edited["a"], edited["b"], edited["changed"]
    summary = edited["b_result"]["changes"]
    assert summary["previous"] == a.run_id
    assert [row["slug"] for row in summary["not_comparable"]] == [changed]
    assert "share no patch" in summary["not_comparable"][0]["reason"]
    assert sorted(row["slug"] for row in summary["ranking"]) == sorted(
        s for s in b.slugs if s != changed
    )
    report = b.store().read_json(f"changes/{a.run_id}/{changed}.json")
    assert report["comparable"] is False and "share no patch" in report["reason"]
    assert not edited["b_result"]["failed"] and b.store().exists("finished.json")
    site = edited["root"] / "site-b" / b.run_id
    assert all((site / "classes" / slug / "index.html").exists() for slug in b.slugs)
    changes = (site / "changes.html").read_text()
    assert re.findall(r'<li id="changed-([a-z0-9-]+)"', changes) == [
        row["slug"] for row in summary["ranking"]
    ]
    line = re.search(rf'<li id="not-comparable-{changed}">.*?</li>', changes).group(0)
    assert "not comparable" in line and "share no patch" in line


def _hrefs_into(page: Path, run_id: str) -> list[Path]:
    """The files that a page's links and images into run `run_id`'s site point to."""
    refs = re.findall(r'(?:href|src)="([^"#]+)', page.read_text())
    return [(page.parent / ref).resolve() for ref in refs if f"{run_id}/" in ref]


def test_pages_link_to_the_previous_run_only_where_its_site_exists(edited):
    a, b, root = edited["a"], edited["b"], edited["root"]
    site_b = root / "site-b" / b.run_id  # run A is not published under site-b
    pages = [
        site_b / "changes.html",
        *(site_b / "classes" / slug / "index.html" for slug in b.slugs),
    ]
    assert "Since the previous checkpoint" in pages[1].read_text()
    for page in pages:
        assert _hrefs_into(page, a.run_id) == [], page
    # published beside run A, the same pages link to A's pages, and every such link resolves
    publish(edited["b"], f"file://{root}/site-a")
    site = root / "site-a" / b.run_id
    pages = [site / "changes.html", *(site / "classes" / slug / "index.html" for slug in b.slugs)]
    links = [target for page in pages for target in _hrefs_into(page, a.run_id)]
    assert any(t.name == "index.html" and t.parent.parent.name == "classes" for t in links), links
    assert all(t.exists() for t in links), [t for t in links if not t.exists()]


def test_a_label_added_to_the_previous_run_after_the_comparison_carries(edited):
    a, b = edited["a"], edited["b"]
    slug = b.slugs[0]
    report = b.store().read_json(f"changes/{a.run_id}/{slug}.json")
    pair = report["matched"][0]
    set_label(a.store(), report["prev_slug"], pair["before"], "Late label")
    summary = compare_with_previous(b)  # the stored comparison is reused (same fingerprints)
    assert slug in {row["slug"] for row in summary["ranking"]}
    label = read_labels(b.store())[slug][str(pair["after"])]
    assert (
        label["text"] == "Late label"
        and label["source"] == "carried"
        and label["from_run"] == a.run_id
    )
    again = b.store().read_json(f"changes/{a.run_id}/{slug}.json")
    # not recomputed
    assert again["inputs"] == report["inputs"] and again["matched"] == report["matched"]
    assert {
        "concept": pair["after"],
        "from_concept": pair["before"],
        "text": "Late label",
    } in again["labels"]["carried"]
    # a carried label the user removed stays removed when the comparison runs again
    set_label(b.store(), slug, pair["after"], "")
    compare_with_previous(b)
    assert str(pair["after"]) not in read_labels(b.store()).get(slug, {})
