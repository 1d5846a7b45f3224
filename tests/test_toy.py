"""The toy default: generator (determinism, masks, names, data set on file and S3)
and shipped CNN."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from lens_core.toy import (
    DISTRACTOR_PARTS,
    PART_NAMES,
    TOY_CHECKPOINT,
    TOY_METRICS,
    ToyCNN,
    class_names,
    class_parts,
    ensure_toy_dataset,
    image_seed,
    read_mask,
    render_image,
)
from lens_core.toy import generator as gen
from lens_core.toy import train as toy_train

HELD_OUT = 2_000_000  # image seeds disjoint from training (0..399) and train.py's own evaluation


def _pil_input(img: np.ndarray, size: int = 64) -> torch.Tensor:
    """Resize like an image loader would (PIL bilinear), normalize with the AtlasConfig defaults."""
    small = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR), dtype=np.float32)
    return (torch.from_numpy(small).permute(2, 0, 1) / 255 - 0.5) / 0.25


@pytest.fixture(scope="module")
def shipped() -> ToyCNN:
    model = ToyCNN(10)
    model.load_state_dict(load_file(str(TOY_CHECKPOINT)), strict=True)
    return model.eval()


# ---- generator -------------------------------------------------------------------------------


def test_render_is_deterministic_per_seed_and_differs_across_seeds() -> None:
    img, mask = render_image(3, 10, 7)
    img2, mask2 = render_image(3, 10, 7)
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8
    assert mask.shape == (128, 128) and mask.dtype == np.int16
    assert np.array_equal(img, img2) and np.array_equal(mask, mask2)
    other, other_mask = render_image(3, 10, 8)
    assert not np.array_equal(img, other) and not np.array_equal(mask, other_mask)
    assert not np.array_equal(img, render_image(4, 10, 7)[0])


def test_masks_mark_own_parts_and_distractors() -> None:
    distractors = set(DISTRACTOR_PARTS)
    for c in range(10):
        own = set(class_parts(c))
        assert len(own) == 2 and not own & distractors
        for seed in range(12):
            img, mask = render_image(c, 10, seed)
            ids = set(np.unique(mask).tolist()) - {-1}
            assert own <= ids, (c, seed)
            assert 1 <= len(ids - own) <= 2 and ids - own <= distractors
            assert (mask == -1).mean() > 0.5  # background dominates
            for pid in ids:
                ys, xs = np.nonzero(mask == pid)
                extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
                assert 18 <= extent <= 46, (c, seed, PART_NAMES[pid], extent)
                part = gen.PARTS[pid]
                if part.fill == "solid":  # the masked pixels carry the part's colour
                    mean = img[mask == pid].astype(float).mean(0)
                    assert np.abs(mean - np.array(part.colors[0])).max() < 40, PART_NAMES[pid]


def test_red_disc_pixels_are_red_and_background_is_not() -> None:
    img, mask = render_image(0, 10, 3)  # class 0 owns red-disc (id 0)
    red = (img[..., 0] > 170) & (img[..., 1] < 90) & (img[..., 2] < 90)
    assert red[mask == 0].mean() > 0.9
    assert red[mask == -1].mean() < 0.01


def test_class_names_and_recipes() -> None:
    names = class_names(10)
    assert len(names) == len(set(names)) == 10
    assert names == sorted(names)  # folder order (sorted) = label order
    assert all(re.fullmatch(r"[a-z0-9-]+", n) for n in names)
    assert names[0] == "00-red-disc-yellow-stripes"
    owned = [p for c in range(10) for p in class_parts(c)]
    assert len(owned) == len(set(owned)) == 20  # the default classes own disjoint parts
    assert len(PART_NAMES) >= 8 and len(DISTRACTOR_PARTS) >= 2


def test_class_recipes_scale_to_a_thousand_classes() -> None:
    names = class_names(1000)
    assert len(set(names)) == 1000 and names == sorted(names)
    assert names[:10] == [
        n.replace(f"{i:02d}-", f"{i:03d}-", 1) for i, n in enumerate(class_names(10))
    ]
    recipes = {class_parts(c, 1000) for c in range(1000)}
    assert len(recipes) == 1000
    assert all(2 <= len(r) <= 4 and not set(r) & set(DISTRACTOR_PARTS) for r in recipes)
    img, mask = render_image(999, 1000, 5)
    assert set(class_parts(999, 1000)) <= set(np.unique(mask).tolist())
    assert len(class_names(gen.max_classes())) >= 1000
    with pytest.raises(ValueError):
        class_names(gen.max_classes() + 1)
    with pytest.raises(ValueError):
        class_parts(10, 10)


def test_dataset_seeds_avoid_training_and_evaluation_seeds() -> None:
    seeds = {image_seed(0, i) for i in range(1000)}
    assert len(seeds) == 1000
    assert not seeds & set(range(toy_train.EVAL_SEED_OFFSET + 1000))
    assert image_seed(0, 1) != image_seed(1, 1)


def _check_dataset(
    url: str, n_classes: int, n_per_class: int, seed: int, storage_options=None
) -> None:
    from lens_core.store import filesystem

    fs, root = filesystem(url, storage_options)
    manifest = json.loads(fs.cat_file(f"{root}/toy.json"))
    assert manifest["seed"] == seed and manifest["parts"][0]["name"] == PART_NAMES[0]
    assert [c["name"] for c in manifest["classes"]] == class_names(n_classes)
    assert fs.exists(f"{root}/_SUCCESS")
    for c, name in enumerate(class_names(n_classes)):
        for i in range(n_per_class):
            img, mask = render_image(c, n_classes, image_seed(seed, i))
            data = fs.cat_file(f"{root}/images/{name}/{i:04d}.png")
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), img)
            got = read_mask(f"{url}/masks/{name}/{i:04d}.png", storage_options)
            assert got.dtype == np.int16 and np.array_equal(got, mask)
            raw = np.asarray(
                Image.open(io.BytesIO(fs.cat_file(f"{root}/masks/{name}/{i:04d}.png")))
            )
            assert raw.dtype == np.uint8 and np.array_equal(raw.astype(np.int16) - 1, mask)


def test_ensure_toy_dataset_on_disk_and_skips_when_complete(tmp_path) -> None:
    url = f"file://{tmp_path}/toy"
    assert ensure_toy_dataset(url, n_classes=3, n_per_class=2, seed=4) == f"{url}/images"
    _check_dataset(url, 3, 2, 4)
    first = tmp_path / "toy" / "images" / class_names(3)[0] / "0000.png"
    first.unlink()
    assert ensure_toy_dataset(url, n_classes=3, n_per_class=2, seed=4) == f"{url}/images"
    assert not first.exists()  # the marker was there: nothing was rewritten


def test_ensure_toy_dataset_on_s3(s3, bucket) -> None:
    url = f"s3://{bucket}/data/toy"
    images = ensure_toy_dataset(
        url, n_classes=2, n_per_class=1, seed=0, storage_options=s3.storage_options
    )
    assert images == f"{url}/images"
    _check_dataset(url, 2, 1, 0, s3.storage_options)


# ---- model and shipped checkpoint ---------------------------------------------------------------


def test_toycnn_layout_and_nonnegative_block4() -> None:
    model = ToyCNN(7).eval()
    names = [n for n, _ in model.named_children()]
    assert names == ["block1", "block2", "block3", "block4", "pool", "flatten", "fc"]
    assert isinstance(model.pool, nn.AdaptiveAvgPool2d) and isinstance(model.fc, nn.Linear)
    x = torch.randn(2, 3, 64, 64)
    acts = model.block4(model.block3(model.block2(model.block1(x))))
    assert acts.shape[1] in range(64, 129) and acts.shape[2:] in {(8, 8), (4, 4)}
    assert (acts >= 0).all()
    assert torch.allclose(model.fc(acts.mean((2, 3))), model(x), atol=1e-5)
    assert model(x).shape == (2, 7)


def test_shipped_checkpoint_metadata() -> None:
    assert TOY_CHECKPOINT.stat().st_size < 3 * 2**20
    metrics = json.loads(TOY_METRICS.read_text())
    assert metrics["accuracy"] >= 0.95 and metrics["layer"] == "block4"
    assert metrics["input_size"] == 64 and metrics["n_classes"] == 10
    assert metrics["mean"] == [0.5] * 3 and metrics["std"] == [0.25] * 3


def test_shipped_checkpoint_accuracy_on_held_out_images(shipped: ToyCNN) -> None:
    x, y = [], []
    for c in range(10):
        for j in range(20):
            x.append(_pil_input(render_image(c, 10, HELD_OUT + j)[0]))
            y.append(c)
    with torch.no_grad():
        pred = shipped(torch.stack(x)).argmax(1)
    accuracy = (pred == torch.tensor(y)).float().mean().item()
    assert accuracy >= 0.95, accuracy


def test_shipped_checkpoint_scores_patches_on_own_parts(shipped: ToyCNN) -> None:
    side = round(128 * 64 / 224)  # the CRAFT patch side at image size 128
    x, y = [], []
    for c in range(10):
        for j in range(5):
            img, mask = render_image(c, 10, HELD_OUT + 100 + j)
            for pid in class_parts(c):
                ys, xs = np.nonzero(mask == pid)
                x0 = int(np.clip(xs.mean() - side / 2, 0, 128 - side))
                y0 = int(np.clip(ys.mean() - side / 2, 0, 128 - side))
                x.append(_pil_input(np.ascontiguousarray(img[y0 : y0 + side, x0 : x0 + side])))
                y.append(c)
    with torch.no_grad():
        pred = shipped(torch.stack(x)).argmax(1)
    assert (pred == torch.tensor(y)).float().mean().item() >= 0.9


# ---- training helpers ---------------------------------------------------------------------------


def test_training_crops_stay_inside_the_image() -> None:
    rng = np.random.default_rng(0)
    centroids = rng.random((500, 2, 2)).astype(np.float32)
    theta = toy_train.sample_crops(rng, centroids).numpy()
    sx, tx, sy, ty = np.abs(theta[:, 0, 0]), theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2]
    assert (np.abs(tx) + sx <= 1 + 1e-5).all() and (np.abs(ty) + sy <= 1 + 1e-5).all()
    assert (sx * sy).min() < 0.1 and (sx * sy).max() > 0.8  # patch-sized to whole-image crops
    assert (theta[:, 0, 0] < 0).any() and (theta[:, 0, 0] > 0).any()  # flips


def test_grid_boxes_match_craft_patches() -> None:
    boxes = toy_train.grid_boxes(128)
    assert len(boxes) == 16 and {b[2] - b[0] for b in boxes} == {37}
    assert boxes[0][:2] == (0, 0) and boxes[-1][2:] == (128, 128)


def test_training_is_deterministic_and_restores_torch_settings() -> None:
    threads = torch.get_num_threads()
    kwargs = dict(n_classes=2, per_class=3, epochs=1, batch_size=4, eval_per_class=1)
    m1, metrics = toy_train.train(**kwargs)
    m2, _ = toy_train.train(**kwargs)
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert metrics["train_images"] == 6 and 0 <= metrics["accuracy"] <= 1
