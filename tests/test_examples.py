"""The shipped example configs (examples/*.toml): each loads with the values it states, and each
runs end to end, two classes, on a tiny image folder and checkpoint of the same structure.

Only URLs and sizes are overridden: the architecture, layer, number of outputs, concepts,
normalization and every method choice are the example's own. The checkpoint is the architecture
at seeded random init (no pretrained weights) whose classifier rows for the two classes point from
one class's mean image features to the other's, so the model classifies most of each class's
images as the class. The logit share then exists, and only if LENS gives each class the label index
of the class-index file: the other class's row takes about a quarter of the patches, any other row
none.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

from lens_core.config import AtlasConfig, config_from_parameters, load_config, make_config
from lens_core.cross_class import build_cross_class
from lens_core.data import list_classes, patch_boxes
from lens_core.device import autocast
from lens_core.pipeline import prepare_run, run_class
from lens_core.publish import publish
from lens_core.renders import finalize_viz, pending_items, render_batch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# what the test shrinks: sizes and counts only, never a method choice
SMALL = {
    "data": {"images_per_class": 4},
    "patches": {"image_size": 96},
    "model": {"input_size": 64},
    "importance": {"images": 2, "n_designs": 8},
    "maco": {"steps": 2, "image_size": 64, "crops": 2, "batch_size": 20},
    "crops": {"per_concept": 3, "size": 32, "attribution_images": 1},
}

SHRUNK = {f"{section}.{key}" for section, values in SMALL.items() for key in values}
LOCAL = {
    "store",
    "publish",
    "storage_options",
    "model.checkpoint",
    "data.url",
    "data.class_index",
    "data.class_names",
}


@dataclass(frozen=True)
class Example:
    """An example config, the layout of its data set, and the two classes the test runs."""

    toml: str
    arch: str
    outputs: int
    classes: tuple[str, str]  # class dirs, taken from the sample class-index file
    data_dir: str  # where the images sit under the test's root
    files: tuple[str, ...]  # image file names per class (their extensions are the layout's)
    class_index: str  # sample file shipped next to the example, in the example's format
    class_names: str


IMAGENET = Example(
    "imagenet-resnet50.toml",
    "resnet50",
    1000,
    ("n01443537", "n01514859"),
    "imagenet/val",
    tuple(f"ILSVRC2012_val_{n:08d}.JPEG" for n in (293, 2138, 3014, 6697, 7197)),
    "imagenet_class_index.sample.json",
    "imagenet_class_names.sample.json",
)
LEAVES = Example(
    "leaves-142.toml",
    "resnet101",
    142,
    ("Rubiaceae", "Fagaceae"),
    "leaves/test",
    ("cleared_0001.png", "cleared_0002.jpg", "xray_0003.png", "xray_0004.png", "cleared_0005.jpeg"),
    "leaves-142_class_index.sample.json",
    "leaves-142_class_names.sample.json",
)


def _label_indices(path: Path) -> dict[str, int]:
    """Class dir -> label index of a class-index file, read here independently of lens_core."""
    raw = json.loads(path.read_text())
    if all(isinstance(v, list) for v in raw.values()):  # Keras: {"0": ["n01440764", "tench"]}
        return {v[0]: int(k) for k, v in raw.items()}
    return dict(raw)


def _changed(a: AtlasConfig, b: AtlasConfig) -> set[str]:
    """Dotted names of the settings that differ between two configs."""
    da, db = a.model_dump(mode="json"), b.model_dump(mode="json")
    out = set()
    for key, value in da.items():
        if isinstance(value, dict) and key != "storage_options":
            out |= {f"{key}.{k}" for k in value if value[k] != db[key][k]}
        elif value != db[key]:
            out.add(key)
    return out


# ---- the configs as shipped -------------------------------------------------------------------


@pytest.mark.parametrize("ex", [IMAGENET, LEAVES], ids=["imagenet", "leaves"])
def test_the_example_loads_with_its_stated_values(ex: Example):
    cfg = load_config(EXAMPLES / ex.toml)
    m = cfg.model
    assert (m.arch, m.layer, m.num_classes, m.input_size) == (ex.arch, "layer4", ex.outputs, 224)
    assert (m.mean, m.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert cfg.concepts.n_concepts == 10
    # CRAFT's patches: 16 per image, 64 px of 224 (stride 51), at the example's image size
    boxes = patch_boxes(cfg.patches.image_size, cfg.patches.fraction, cfg.patches.grid)
    scale = cfg.patches.image_size / 224
    assert len(boxes) == 16 and set(boxes[:, 2] - boxes[:, 0]) == {round(64 * scale)}
    assert (cfg.maco.lr, cfg.maco.crop_range) == (1.0, (0.25, 0.30))
    # every URL is on s3, no credential anywhere: the flow accepts the file as a parameter
    urls = [
        cfg.store,
        cfg.publish,
        m.checkpoint,
        cfg.data.url,
        cfg.data.class_index,
        cfg.data.class_names,
    ]
    assert all(u.startswith("s3://") for u in urls)
    assert set(cfg.storage_options) == {"endpoint_url"}
    assert config_from_parameters(config_path=str(EXAMPLES / ex.toml)) == cfg


def test_the_imagenet_example_is_the_lens_site_case():
    cfg = load_config(EXAMPLES / IMAGENET.toml)
    assert (cfg.data.images_per_class, cfg.patches.image_size) == (50, 224)
    # MACO at the budget measured in bench/bench_maco_budget.py, in bf16
    assert (cfg.maco.steps, cfg.maco.crops, cfg.maco.image_size, cfg.model.precision) == (
        256,
        2,
        512,
        "bf16",
    )
    keras = EXAMPLES / IMAGENET.class_index
    assert _label_indices(keras)["n01440764"] == 0


# ---- the examples, run end to end at a small size ---------------------------------------------


def _class_image(k: int, i: int, grey: bool) -> Image.Image:
    """Image i of class k: a class colour and stripe direction, per-image phase and noise."""
    rng = np.random.default_rng([k, i])
    h, w = 105 + 10 * i, 140
    yy, xx = np.mgrid[0:h, 0:w] / w
    angle, freq = (0.0, 6.0) if k == 0 else (np.pi / 3, 14.0)
    stripes = 0.5 + 0.5 * np.sin(
        2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 6)
    )
    colour = np.array([0.9, 0.5, 0.1]) if k == 0 else np.array([0.1, 0.5, 0.8])
    rgb = colour * (0.4 + 0.6 * stripes)[..., None] + rng.normal(0, 0.04, (h, w, 3))
    img = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8), "RGB")
    return img.convert("L") if grey else img


def _write_images(ex: Example, root: Path) -> Path:
    """The example's layout under root: <data_dir>/<class dir>/<file> (x-rays are greyscale)."""
    data = root / ex.data_dir
    for k, d in enumerate(ex.classes):
        (data / d).mkdir(parents=True)
        for i, name in enumerate(ex.files):
            _class_image(k, i, grey=name.startswith("xray")).save(data / d / name)
    return data


def _patches(data: Path, cfg: AtlasConfig) -> torch.Tensor:
    """A 4x4 grid of patches of every image of a class folder, and the whole images, at the model
    input, normalized (what the activation stage feeds the model): (patches, images)."""
    s, side = cfg.patches.image_size, round(cfg.patches.fraction * cfg.patches.image_size)
    starts = [j * (s - side) // 3 for j in range(4)]
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (cfg.model.mean, cfg.model.std))
    out, wholes = [], []
    for path in sorted(data.iterdir()):
        img = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), np.float32) / 255)
        img = F.interpolate(
            img.permute(2, 0, 1)[None], size=(s, s), mode="bilinear", antialias=True
        )
        crops = torch.cat([img[:, :, y : y + side, x : x + side] for y in starts for x in starts])
        size = cfg.model.input_size
        out.append(F.interpolate(crops, size=size, mode="bilinear", antialias=True))
        wholes.append(F.interpolate(img, size=size, mode="bilinear", antialias=True))
    return (torch.cat(out) - mean) / std, (torch.cat(wholes) - mean) / std


def _checkpoint(
    ex: Example, data: Path, cfg: AtlasConfig, indices: tuple[int, int], path: Path
) -> None:
    """The example's architecture at seeded random init, its batch-norm statistics measured on the
    images (as training leaves them: activations of a trained scale) and the two classes' fc rows
    set so each class is predicted on its own patches; saved as a plain state dict."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(ex.arch, weights=None, num_classes=ex.outputs)
    patches, images = zip(*(_patches(data / d, cfg) for d in ex.classes), strict=True)
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average over the calibration pass
    body = nn.Sequential(*list(model.children())[:-1])  # a ResNet up to its avgpool
    with torch.no_grad():
        model.train()(torch.cat(patches))
        model.eval()
        with autocast(
            "cpu", cfg.model.precision
        ):  # the features the run will see (bf16 for ImageNet)
            feats = [body(x).flatten(1).float() for x in images]
        # a separating direction (least squares on the two classes' images) orthogonal to the
        # features' common (all-positive) direction: the logit is not a difference of two large
        # numbers, which bf16 (the ImageNet example's precision) could not resolve
        X = torch.cat(feats).double()
        y = torch.cat([torch.ones(len(feats[0])), -torch.ones(len(feats[1]))]).double()
        common = torch.nn.functional.normalize(X.mean(0), dim=0)
        Xp = X - (X @ common)[:, None] * common
        d = torch.linalg.lstsq(
            torch.cat([Xp, torch.ones(len(X), 1, dtype=X.dtype)], 1), y[:, None]
        ).solution[:-1, 0]
        d = d - (d @ common) * common
        proj = Xp @ d
        low, high = proj[y < 0].max(), proj[y > 0].min()
        assert high > low, "the two classes' images are not separable"
        mid = (low + high) / 2
        others = model.fc(torch.cat(feats)).abs().max()  # the largest logit any other row gives
        scale = 20 * others / ((high - low) / 2)  # +-20x that logit at the closest images
        for sign, row in zip((1, -1), indices, strict=True):
            model.fc.weight[row] = (sign * scale * d).float()
            model.fc.bias[row] = float(-sign * scale * mid)
    torch.save(model.state_dict(), path)


def _small_config(ex: Example, root: Path, data: Path, checkpoint: Path) -> AtlasConfig:
    """The example with local URLs and the SMALL sizes; everything else as shipped."""
    base = load_config(EXAMPLES / ex.toml).model_dump(mode="json")
    urls = {
        "model": {"checkpoint": str(checkpoint)},
        "data": {
            "url": str(data),
            "class_index": str(root / ex.class_index),
            "class_names": str(root / ex.class_names),
        },
    }
    for section in set(SMALL) | set(urls):
        base[section] = {**base[section], **SMALL.get(section, {}), **urls.get(section, {})}
    base.update(store=f"file://{root}/store", publish=f"file://{root}/site", storage_options={})
    return make_config(base)


@pytest.mark.slow
@pytest.mark.parametrize("ex", [IMAGENET, LEAVES], ids=["imagenet", "leaves"])
def test_the_example_explains_two_classes_end_to_end(ex: Example, tmp_path: Path):
    shipped = load_config(EXAMPLES / ex.toml)
    for name in (ex.class_index, ex.class_names):
        (tmp_path / name).write_text((EXAMPLES / name).read_text())
    labels = _label_indices(EXAMPLES / ex.class_index)
    names = json.loads((EXAMPLES / ex.class_names).read_text())
    indices = tuple(labels[d] for d in ex.classes)
    assert sorted(indices) != [0, 1], "pick classes whose label is not their sorted folder position"
    data = _write_images(ex, tmp_path)
    ckpt = tmp_path / "checkpoint.pt"
    cfg = _small_config(ex, tmp_path, data, ckpt)
    _checkpoint(ex, data, cfg, indices, ckpt)
    assert _changed(shipped, cfg) <= SHRUNK | LOCAL  # the method is the example's own

    info = prepare_run(cfg)
    assert info.num_classes == ex.outputs
    assert sorted((c.id, c.index) for c in info.classes) == sorted(
        zip(ex.classes, indices, strict=True)
    )
    for slug in info.slugs:
        run_class(info, slug)
    rendered = render_batch(info, pending_items(info))
    assert rendered["rendered"] == 20 and sorted(finalize_viz(info)) == sorted(info.slugs)
    assert build_cross_class(info)["classes"] == 2
    summary = publish(info)
    assert summary["failed_classes"] == []

    site = tmp_path / "site" / info.run_id
    store = info.store()
    for cls in info.classes:
        imp = store.zarr[f"importance/{cls.slug}"].attrs
        assert imp["importance_basis"] == "logit_share", imp.get("note")
        # most of its images are classified as the class-index file's label (module docstring)
        assert 2 * imp["assigned_images"] > imp["n_images"] and imp["share_images"] >= 3, imp
        page = (site / "classes" / cls.slug / "index.html").read_text()
        assert len(re.findall(r'<li id="concept-\d+" class="concept', page)) == 10
        want = names[cls.id]
        assert f"<h1>{html.escape(want[0])}</h1>" in page
        assert all(html.escape(n) in page for n in want[1:])  # synonyms: "also called ..."
        other = next(c for c in info.classes if c is not cls)
        assert f'href="../../classes/{other.slug}/index.html#concept-' in page  # similar concepts
        entry = json.loads((site / "data" / f"{cls.slug}.json").read_text())
        assert (entry["id"], entry["index"], entry["name"]) == (cls.id, labels[cls.id], want[0])
        assert entry["importance_basis"] == "logit_share" and len(entry["concepts"]) == 10
        assert all(c["logit_share"] is not None for c in entry["concepts"])
        with Image.open(site / entry["concepts"][0]["viz"]) as viz:
            assert (viz.format, viz.mode, viz.size) == ("PNG", "RGBA", (64, 64))
    index = (site / "index.html").read_text()
    assert all(f'href="classes/{slug}/index.html"' in index for slug in info.slugs)


def test_keras_names_are_used_without_a_names_file(tmp_path: Path):
    """The ImageNet example's class index alone names the classes (Keras' names)."""
    data = _write_images(IMAGENET, tmp_path)
    got = list_classes(str(data), None, None, str(EXAMPLES / IMAGENET.class_index))
    assert [(c.id, c.index, c.name) for c in got] == [
        ("n01443537", 1, "goldfish"),
        ("n01514859", 8, "hen"),
    ]
