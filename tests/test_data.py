"""lens_core.data: image-folder listing, safe decoding of odd images, sampling, patches, s3."""

from __future__ import annotations

import io
import json
import logging
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from lens_core import data
from lens_core.data import (
    ClassInfo,
    DataAccessError,
    EmptyClassError,
    ImageReadError,
    ReadStats,
    decode,
    decode_image,
    extract_patches,
    iter_images,
    list_classes,
    list_images,
    patch_boxes,
    read_image,
    require_images,
    sample_images,
)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _gradient(size: int = 16) -> Image.Image:
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    rgb = np.stack(
        [np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.full((size, size), 90.0)],
        axis=2,
    )
    return Image.fromarray(rgb.astype(np.uint8))


GREY16 = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 251 + 700).astype(np.uint16)


def _odd_images() -> dict[str, bytes]:
    """Every readable mode plus three broken files, named by what they are."""
    good_jpeg = _jpeg(_gradient(), quality=90)
    return {
        "rgb.png": _png(_gradient()),
        "upper.PNG": _png(Image.new("RGB", (16, 16), (10, 20, 30))),
        "cmyk.jpg": _jpeg(Image.new("RGB", (16, 16), (200, 100, 50)).convert("CMYK"), quality=100),
        "grey16.png": _png(Image.fromarray(GREY16)),
        "rgba.png": _png(Image.new("RGBA", (16, 16), (255, 0, 0, 128))),
        "corrupt.jpg": b"this is not an image at all" * 10,
        "zero.png": b"",
        "truncated.jpeg": good_jpeg[: len(good_jpeg) // 2],
    }


BROKEN = {"corrupt.jpg", "zero.png", "truncated.jpeg"}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for name, blob in _odd_images().items():
        (root / "alpha").mkdir(parents=True, exist_ok=True)
        (root / "alpha" / name).write_bytes(blob)
    (root / "alpha" / "notes.txt").write_text("not an image")
    (root / "alpha" / ".hidden.png").write_bytes(_png(_gradient()))
    (root / "beta" / "sub").mkdir(parents=True)
    # content sniffed, not the name
    (root / "beta" / "sub" / "b.webp").write_bytes(_png(_gradient()))
    (root / "empty").mkdir()
    (root / ".git").mkdir()
    (root / "_cache").mkdir()
    (root / "_cache" / "x.png").write_bytes(_png(_gradient()))
    (root / "README.md").write_text("hi")
    return root


def test_listing_order_and_skips(folder: Path) -> None:
    classes = list_classes(str(folder))
    assert [(c.index, c.id) for c in classes] == [(0, "alpha"), (1, "beta"), (2, "empty")]
    alpha = list_images(str(folder), classes[0])
    names = [u.rsplit("/", 1)[1] for u in alpha]
    assert sorted(names) == sorted(_odd_images())  # .txt and hidden files ignored, .PNG kept
    assert all(u.startswith("file:///") for u in alpha)
    assert [u.rsplit("/", 2)[1:] for u in list_images(f"file://{folder}", classes[1])] == [
        ["sub", "b.webp"]
    ]
    assert list_images(str(folder), classes[2]) == []


def test_iter_images_counts_and_reasons(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    urls = list_images(str(folder), "alpha")
    stats = ReadStats()
    got = list(iter_images(urls, None, 8, stats))
    assert stats.read == len(got) == len(urls) - len(BROKEN)
    assert {u.rsplit("/", 1)[1] for u, _ in stats.skipped} == BROKEN
    reasons = {u.rsplit("/", 1)[1]: r for u, r in stats.skipped}
    assert reasons["zero.png"] == "empty file" and "truncated" in reasons["truncated.jpeg"]
    assert [pos for pos, _, _ in got] == [
        i for i, u in enumerate(urls) if u.rsplit("/", 1)[1] not in BROKEN
    ]
    for _, _, t in got:
        assert t.shape == (3, 8, 8) and t.dtype == torch.float32 and t.min() >= 0 and t.max() <= 1
    assert "truncated.jpeg" in caplog.text


def test_converted_modes_have_right_pixels(folder: Path) -> None:
    url = f"file://{folder}/alpha"
    cmyk = read_image(f"{url}/cmyk.jpg")
    torch.testing.assert_close(
        cmyk[:, 4, 4], torch.tensor([200, 100, 50]) / 255.0, atol=3 / 255, rtol=0
    )
    grey = read_image(f"{url}/grey16.png", None, None)
    expected = torch.from_numpy(GREY16.astype(np.float32) / 65535.0)
    for c in range(3):
        torch.testing.assert_close(grey[c], expected, atol=1e-6, rtol=0)
    rgba = read_image(f"{url}/rgba.png")  # composited over white
    torch.testing.assert_close(
        rgba[:, 0, 0], torch.tensor([1.0, 127 / 255, 127 / 255]), atol=1e-6, rtol=0
    )
    rgb = read_image(f"{url}/rgb.png", size=16)
    assert torch.equal(
        rgb, torch.from_numpy(np.asarray(_gradient()).transpose(2, 0, 1) / np.float32(255.0))
    )


def test_palette_and_grey_modes() -> None:
    grey = decode_image(_png(Image.new("L", (4, 4), 64)))
    assert torch.allclose(grey, torch.full((3, 4, 4), 64 / 255))
    la = decode_image(_png(Image.new("LA", (4, 4), (0, 0))))  # fully transparent black -> white
    assert torch.allclose(la, torch.ones(3, 4, 4))
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    torch.testing.assert_close(
        decode_image(_png(pal))[:, 0, 0], torch.tensor([10, 200, 30]) / 255.0
    )
    pal.info["transparency"] = 1
    assert torch.allclose(decode_image(_png(pal)), torch.ones(3, 4, 4))


def test_resize_is_square_whole_image() -> None:
    wide = Image.new("RGB", (40, 10), (0, 0, 0))
    wide.paste((255, 255, 255), (20, 0, 40, 10))  # right half white
    t = decode_image(_png(wide))
    out = data.resize_square(t, 8)
    assert out.shape == (3, 8, 8)
    assert out[:, :, :3].max() < 0.05 and out[:, :, 5:].min() > 0.95  # not cropped to the centre


def test_decompression_bomb_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode, "MAX_PIXELS", 100)
    with pytest.raises(ImageReadError, match="decompression bomb"):
        decode_image(_png(Image.new("RGB", (20, 20))), "x.png")
    monkeypatch.setattr(decode, "MAX_PIXELS", 400)
    assert decode_image(_png(Image.new("RGB", (20, 20)))).shape == (3, 20, 20)


def test_empty_class(folder: Path) -> None:
    classes = list_classes(str(folder))
    with pytest.raises(EmptyClassError, match="'empty'"):
        require_images(classes[2], list_images(str(folder), classes[2]))
    stats = ReadStats()
    broken = [u for u in list_images(str(folder), "alpha") if u.rsplit("/", 1)[1] in BROKEN]
    assert list(iter_images(broken, None, 8, stats)) == []
    with pytest.raises(EmptyClassError, match="alpha.*3 unreadable"):
        stats.require("alpha")


def test_sampling_is_deterministic() -> None:
    urls = [f"file:///d/cls/{i:03d}.jpg" for i in range(40)]
    a = sample_images(urls, 5, seed=0)
    shuffled = urls[:]
    random.Random(1).shuffle(shuffled)
    assert a == sample_images(shuffled, 5, seed=0) == sorted(a) and len(set(a)) == 5
    assert sample_images(urls, 5, seed=1) != a
    same_tail = sample_images([u.replace("file:///d", "s3://bucket/x") for u in urls], 5, seed=0)
    assert [u.rsplit("/", 1)[1] for u in same_tail] == [u.rsplit("/", 1)[1] for u in a]
    grown = sample_images(urls + ["file:///d/cls/new.jpg"], 5, seed=0)
    assert len(set(grown) & set(a)) >= 4  # one new image displaces at most one
    assert sample_images(urls[:3], 5, seed=0) == urls[:3]


def test_class_name_map_and_safe_slugs(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for d in ["n01", "n02", "Café Ünïcode", "a..b", "日本", "A B", "a-b"]:
        (root / d).mkdir(parents=True)
    names = tmp_path / "names.json"
    names.write_text(
        json.dumps({"n01": ["crane", "grus"], "n02": "crane, derrick", "zzz": "unused"})
    )
    classes = {c.id: c for c in list_classes(str(root), None, f"file://{names}")}
    assert classes["n01"].name == "crane" and classes["n01"].synonyms == ("crane", "grus")
    assert classes["n02"].name == "crane" and classes["n02"].synonyms == ("crane", "derrick")
    assert classes["n01"].slug == "n01-crane"
    assert classes["Café Ünïcode"].slug == "cafe-unicode" and classes["Café Ünïcode"].synonyms == (
        "Café Ünïcode",
    )
    slugs = [c.slug for c in classes.values()]
    assert len(set(slugs)) == len(slugs)
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", s) for s in slugs)
    assert {classes[d].slug for d in ("A B", "a-b", "a..b")} == {"a-b", "a-b-2", "a-b-3"}
    assert classes["日本"].slug.startswith("class-")
    names.write_text("{not json")
    with pytest.raises(data.DataError, match="not valid JSON"):
        list_classes(str(root), None, str(names))


def test_patch_boxes_reference_geometry() -> None:
    boxes = patch_boxes(224, 64 / 224, 4)
    assert boxes.dtype == np.int64 and boxes.shape == (16, 4)
    starts = [0, 51, 102, 153]
    assert boxes[:4, 0].tolist() == starts and boxes[::4, 1].tolist() == starts  # row-major
    assert ((boxes[:, 2] - boxes[:, 0]) == 64).all() and ((boxes[:, 3] - boxes[:, 1]) == 64).all()
    small = patch_boxes(128, 64 / 224, 4)  # the embedded default
    assert small[:, 2:].max() <= 128 and (small[:, 2] - small[:, 0] == 37).all()
    tight = patch_boxes(100, 0.5, 5)  # 0.8 * side does not fit: stride shrinks to fit
    assert tight[:, 2:].max() <= 100 and tight[4, 0] == 48
    assert patch_boxes(100, 0.5, 1).tolist() == [[25, 25, 75, 75]]


@pytest.mark.parametrize("out_size", [24, 7])
def test_extract_patches_matches_crop_and_resize(out_size: int) -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.stack([decode_image(_png(_gradient(32))), torch.rand(3, 32, 32, generator=gen)])
    boxes = np.concatenate([patch_boxes(32, 0.5, 3), [[0, 0, 10, 6]]])  # plus one odd box
    out = extract_patches(images, boxes, out_size)
    assert out.shape == (2 * len(boxes), 3, out_size, out_size)
    for i in range(2):
        for p, (x0, y0, x1, y1) in enumerate(boxes):
            ref = TF.resized_crop(
                images[i],
                int(y0),
                int(x0),
                int(y1 - y0),
                int(x1 - x0),
                [out_size, out_size],
                antialias=True,
            )
            torch.testing.assert_close(out[i * len(boxes) + p], ref, atol=1e-5, rtol=0)


def test_s3_round_trip_and_wrong_secret(s3, bucket: str, caplog: pytest.LogCaptureFixture) -> None:
    fs = s3.filesystem()
    for name, blob in _odd_images().items():
        fs.pipe(f"{bucket}/ds/alpha/{name}", blob)
    fs.pipe(f"{bucket}/ds/beta/one.png", _png(_gradient()))
    fs.pipe(f"{bucket}/ds/_skip/x.png", _png(_gradient()))
    url = f"s3://{bucket}/ds"
    classes = list_classes(url, s3.storage_options)
    assert [(c.index, c.id, c.slug) for c in classes] == [
        (0, "alpha", "alpha"),
        (1, "beta", "beta"),
    ]
    urls = list_images(url, classes[0], s3.storage_options)
    assert len(urls) == len(_odd_images()) and all(
        u.startswith(f"s3://{bucket}/ds/alpha/") for u in urls
    )
    stats = ReadStats()
    got = {u.rsplit("/", 1)[1]: t for _, u, t in iter_images(urls, s3.storage_options, 16, stats)}
    assert stats.read == len(_odd_images()) - len(BROKEN)
    assert {u.rsplit("/", 1)[1] for u, _ in stats.skipped} == BROKEN
    grey = read_image(f"{url}/alpha/grey16.png", s3.storage_options)
    torch.testing.assert_close(got["grey16.png"], grey)
    torch.testing.assert_close(
        grey[0], torch.from_numpy(GREY16.astype(np.float32) / 65535.0), atol=1e-6, rtol=0
    )

    bad = {**s3.storage_options, "secret": "not-" + s3.secret}
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(DataAccessError, match="access denied") as info:
            list_classes(url, bad)
        with pytest.raises(DataAccessError):
            read_image(urls[0], bad, 8)
        with pytest.raises(DataAccessError):
            list(iter_images(urls, bad, 8, ReadStats()))
    assert isinstance(info.value, PermissionError)
    for secret in (s3.secret, bad["secret"]):
        assert secret not in str(info.value) and secret not in caplog.text


def test_classinfo_is_hashable_value() -> None:
    a = ClassInfo(0, "n01", "crane", "n01-crane", ("crane",))
    assert a == ClassInfo(0, "n01", "crane", "n01-crane", ("crane",)) and len({a, a}) == 1
