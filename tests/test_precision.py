"""model.precision (bf16/fp16 autocast of g and h) and the activation stage's prefetching reader.

Parity runs the toy pipeline twice, fp32 (the truth) and bf16, and compares what a reader of the
atlas sees: the concepts (W rows matched one-to-one by cosine) and their logit shares. NMF runs to
convergence here (tol 1e-8): at the default tol (1e-4) HALS stops after 50-130 iterations and its
concepts move as much under i.i.d. noise of bf16's size (2e-3) as under bf16 itself (some toy
classes: median matched cosine 0.89, shares 14 points apart), which would test NMF's stopping
point, not the precision.

The fast path of the stage (a pool decoding ahead, one g call per batch on patches and whole
images, Zarr appends on a writer thread) must store exactly what the plain sequential loop
stores in fp32, and read the same images in the same order, skipping the same ones.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from PIL import Image
from scipy.optimize import linear_sum_assignment

from lens_core import activations, device, importance
from lens_core.activations import compute_class_activations, pool
from lens_core.config import make_config
from lens_core.data import (
    ReadStats,
    extract_patches,
    iter_images,
    list_classes,
    list_images,
    patch_boxes,
    reader,
)
from lens_core.importance import concept_sobol, deletion_curve
from lens_core.models import load_split_model
from lens_core.pipeline import prepare_run, stage_activations, stage_factorize, stage_importance
from lens_core.toy import ensure_toy_dataset

PARITY = {
    "data": {"images_per_class": 24, "toy_images_per_class": 24},
    "importance": {"images": 12},
    "concepts": {"tol": 1e-8, "max_iter": 5000},
}
PARITY_CLASSES = ["0", "2", "7"]  # those whose default-tol concepts move most under perturbation


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{precision: (RunInfo, precisions seen by the activations' and the importance's autocast)}."""
    root = tmp_path_factory.mktemp("precision")
    out = {}
    threads = torch.get_num_threads()
    # one thread: on a busy 2-core machine HALS's many tiny ops ran 40x slower with two OpenMP
    # threads waiting on each other (both runs use the same setting, so parity is unaffected)
    torch.set_num_threads(1)
    try:
        for prec in ("fp32", "bf16"):
            out[prec] = _run(root, prec)
    finally:
        torch.set_num_threads(threads)
    return out


def _run(root, prec):
    """One pipeline run (activations, concepts, importance) and the precisions its forwards got."""
    seen: dict[str, set[str]] = {"activations": set(), "importance": set()}

    def spy(real, where):
        @functools.wraps(real)
        def wrapped(dev, precision="fp32"):
            seen[where].add(precision)
            return real(dev, precision)

        return wrapped

    cfg = make_config(
        {**PARITY, "model": {"precision": prec}},
        store=f"file://{root}/{prec}",
        publish=f"file://{root}/site-{prec}",
        classes=PARITY_CLASSES,
    )
    info = prepare_run(cfg)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(activations, "inference", spy(activations.inference, "activations"))
        mp.setattr(importance, "autocast", spy(importance.autocast, "importance"))
        for slug in info.slugs:
            stage_activations(info, slug)
            stage_factorize(info, slug)
            stage_importance(info, slug)
    return info, seen


def _matched(W32: np.ndarray, W16: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of W32 and W16 paired by an optimal one-to-one assignment on cosine: (r, c, cosines)."""
    a = W32 / np.linalg.norm(W32, axis=1, keepdims=True)
    b = W16 / np.linalg.norm(W16, axis=1, keepdims=True)
    cos = a @ b.T
    r, c = linear_sum_assignment(-cos)
    return r, c, cos[r, c]


def _groups(runs, kind: str):
    (i32, _), (i16, _) = runs["fp32"], runs["bf16"]
    for slug in i32.slugs:
        yield slug, i32.store().zarr[f"{kind}/{slug}"], i16.store().zarr[f"{kind}/{slug}"]


def test_bf16_really_runs_in_bf16(runs):
    """The bf16 run's activations differ from fp32's, slightly; everything stored is float32; both
    the activations and the importance forwards were asked for the run's precision."""
    for prec, (_, seen) in runs.items():
        assert seen == {"activations": {prec}, "importance": {prec}}
    for slug, g32, g16 in _groups(runs, "acts"):
        for name in ("A", "image_A", "spatial", "patch_logit", "image_logit"):
            a32, a16 = g32[name][:], g16[name][:]
            assert a16.dtype == np.float32 and a16.shape == a32.shape
            rel = float(np.abs(a16 - a32).max() / np.abs(a32).max())
            print(f"{slug} {name}: max relative error {rel:.2e}")
            assert 1e-4 <= rel <= 5e-2, (slug, name, rel)
        np.testing.assert_array_equal(g16["patches"][:], g32["patches"][:])


def test_bf16_concepts_match_fp32(runs):
    cosines = []
    for slug, c32, c16 in _groups(runs, "concepts"):
        assert c16["W"].dtype == np.float32 and c16["U"].dtype == np.float32
        _, _, cos = _matched(c32["W"][:], c16["W"][:])
        print(f"{slug}: matched cosines {np.round(np.sort(cos), 4).tolist()}")
        cosines.extend(cos)
    assert np.median(cosines) >= 0.95
    assert np.mean(np.asarray(cosines) >= 0.95) >= 0.9  # nearly every concept is found again


def test_bf16_logit_shares_and_sobol_match_fp32(runs):
    """Per matched concept: logit shares within 2 percentage points, Sobol indices within 0.05."""
    worst_share, worst_sobol = 0.0, 0.0
    for (slug, c32, c16), (_, m32, m16) in zip(
        _groups(runs, "concepts"), _groups(runs, "importance"), strict=True
    ):
        r, c, _ = _matched(c32["W"][:], c16["W"][:])
        assert m32.attrs["importance_basis"] == m16.attrs["importance_basis"] == "logit_share"
        share = np.abs(m32["logit_share"][:][r] - m16["logit_share"][:][c])
        sobol = np.abs(m32["sobol"][:][r] - m16["sobol"][:][c])
        print(
            f"{slug}: max share difference {share.max():.3f} "
            f"points, max Sobol difference {sobol.max():.4f}"
        )
        worst_share, worst_sobol = max(worst_share, share.max()), max(worst_sobol, sobol.max())
        assert m16["sobol"].dtype == np.float32 and m16["logit_share"].dtype == np.float32
    assert worst_share <= 2.0
    assert worst_sobol <= 0.05


# ---- direct calls on the toy CNN ---------------------------------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(split model, image URLs with an unreadable file among them, patch config, tmp dir)."""
    tmp = tmp_path_factory.mktemp("toyimgs")
    url = ensure_toy_dataset(f"file://{tmp}/toy", 2, 10, 0)
    urls = list_images(url, list_classes(url)[0])
    (tmp / "junk.png").write_bytes(b"not an image")
    urls = urls[:3] + [f"file://{tmp}/junk.png"] + urls[3:]
    cfg = make_config({"patches": {"batch_size": 32}})  # 2 images per batch: several batches
    return load_split_model(cfg.model, 10), urls, cfg.patches, tmp


def _arrays(group: zarr.Group) -> dict[str, np.ndarray]:
    return {name: group[name][:] for name in sorted(group.array_keys())}


def test_fp16_on_cpu_runs_as_fp32(toy, caplog):
    split, urls, patches, tmp = toy
    with device.autocast("cpu", "fp16"):
        assert not torch.is_autocast_enabled("cpu")
    with device.autocast("cpu", "bf16"):
        assert (
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        )
    groups = {}
    for prec in ("fp32", "fp16"):
        groups[prec] = zarr.open_group(str(tmp / f"fp16-{prec}.zarr"), mode="w")
        compute_class_activations(
            split, 0, urls[:6], groups[prec], patches, spatial_images=4, precision=prec
        )
    a32, a16 = _arrays(groups["fp32"]), _arrays(groups["fp16"])
    assert a32.keys() == a16.keys()
    for name in a32:
        np.testing.assert_array_equal(a16[name], a32[name])
    acts = torch.from_numpy(a32["spatial"])
    W = np.abs(np.random.default_rng(0).standard_normal((4, acts.shape[1]))).astype(np.float32)
    s32 = concept_sobol(split.h, acts, W, 0, n_designs=8)
    np.testing.assert_array_equal(
        concept_sobol(split.h, acts, W, 0, n_designs=8, precision="fp16"), s32
    )
    with pytest.raises(ValueError, match="unknown precision"):
        compute_class_activations(split, 0, urls[:2], groups["fp32"], patches, precision="int8")
    with pytest.raises(ValueError, match="unknown precision"):
        concept_sobol(split.h, acts, W, 0, n_designs=8, precision="fp8")


def test_importance_forwards_run_in_the_precision(toy):
    """h's forwards in the Sobol masked logits and the deletion curves follow `precision`: bf16
    changes the outputs a little, never the estimator's float64."""
    split, urls, patches, tmp = toy
    group = zarr.open_group(str(tmp / "imp.zarr"), mode="w")
    compute_class_activations(split, 0, urls, group, patches, spatial_images=8)
    acts = torch.from_numpy(group["spatial"][:])
    W = np.abs(np.random.default_rng(1).standard_normal((5, acts.shape[1]))).astype(np.float32)
    s32 = concept_sobol(split.h, acts, W, 0, n_designs=16)
    s16 = concept_sobol(split.h, acts, W, 0, n_designs=16, precision="bf16")
    assert s16.dtype == np.float64 and not np.array_equal(s16, s32)
    np.testing.assert_allclose(s16, s32, atol=0.05)
    order = np.argsort(-s32)
    c32, _ = deletion_curve(split.h, acts, None, W, 0, order)
    c16, _ = deletion_curve(split.h, acts, None, W, 0, order, precision="bf16")
    assert not np.array_equal(c16, c32)
    np.testing.assert_allclose(c16, c32, rtol=5e-2, atol=5e-2 * np.abs(c32).max())


# ---- the fast path stores what the sequential loop stores ------------------------------------


class _InlineAppender:
    """The sequential appender: the same flush policy, appends written inline."""

    def __init__(self, group, chunk_rows, flush_rows):
        self.group, self.chunk_rows, self.flush_rows = group, chunk_rows, flush_rows
        self.arrays, self.pending = {}, {}

    def add(self, name, block):
        self.pending.setdefault(name, []).append(block)
        if sum(len(b) for b in self.pending[name]) >= self.flush_rows:
            self.flush(name)

    def flush(self, name):
        block = np.concatenate(self.pending.pop(name), axis=0)
        if name not in self.arrays:
            chunks = (min(self.chunk_rows, max(1, block.shape[0])),) + block.shape[1:]
            self.arrays[name] = self.group.create_array(
                name, shape=(0,) + block.shape[1:], chunks=chunks, dtype=block.dtype, overwrite=True
            )
        self.arrays[name].append(block, axis=0)


def _sequential_stage(
    split, class_index, urls, group, patches, spatial_images, chunk_rows, flush_rows
):
    """The stage as a plain loop: decode in this thread, g on patches then on whole images."""
    boxes = patch_boxes(patches.image_size, patches.fraction, patches.grid)
    per_batch = max(1, patches.batch_size // len(boxes))
    stats, out, read, left = (
        ReadStats(),
        _InlineAppender(group, chunk_rows, flush_rows),
        [],
        spatial_images,
    )
    items = list(iter_images(urls, None, patches.image_size, stats))
    for s in range(0, len(items), per_batch):
        batch = items[s : s + per_batch]
        positions = np.arange(len(read), len(read) + len(batch), dtype=np.int32)
        read.extend(u for _, u, _ in batch)
        images = torch.stack([t for _, _, t in batch])
        crops = extract_patches(images, boxes, split.input_size)
        whole = F.interpolate(
            images, size=split.input_size, mode="bilinear", antialias=True, align_corners=False
        )
        with torch.inference_mode():
            pa = split.g(crops.contiguous(memory_format=torch.channels_last))
            pl = split.h(pa).float()
            wa = split.g(whole.contiguous(memory_format=torch.channels_last))
            wl = split.h(wa).float()
        rows = np.concatenate(
            [np.repeat(positions, len(boxes))[:, None], np.tile(boxes, (len(batch), 1))], axis=1
        )
        out.add("A", np.ascontiguousarray(pool(pa).numpy(), dtype=np.float32))
        out.add("patches", rows.astype(np.int32))
        out.add("patch_logit", pl[:, class_index].numpy().astype(np.float32))
        out.add("patch_pred", pl.argmax(1).numpy().astype(np.int32))
        out.add("image_A", pool(wa).numpy().astype(np.float32))
        out.add("image_logit", wl[:, class_index].numpy().astype(np.float32))
        out.add("image_pred", wl.argmax(1).numpy().astype(np.int32))
        if left > 0:
            out.add("spatial", np.ascontiguousarray(wa[:left].numpy(), dtype=np.float32))
            left -= len(wa[:left])
    for name in list(out.pending):
        out.flush(name)
    return read, stats.skipped


@pytest.mark.parametrize(("batch_size", "prefetch"), [(32, 3), (4, 2), (32, None)])
def test_stage_stores_exactly_what_the_sequential_loop_stores(
    toy, monkeypatch, batch_size, prefetch
):
    """Bit for bit for the patches; the whole images agree to float32 rounding. The stage runs
    whole images in calls of batch_size images, the loop one batch's images at a time, and oneDNN
    may pick other kernels for other batch sizes (N = 1 always; on some CPUs other N too: 1-ulp
    differences in image_logit were seen with N = 10 against N = 32)."""
    split, urls, patches, tmp = toy
    patches = patches.model_copy(update={"batch_size": batch_size})
    chunk_rows, flush_rows = 64, 48  # several flushes, queued on the writer thread
    monkeypatch.setattr(
        activations,
        "_Appender",
        functools.partial(activations._Appender, chunk_rows=chunk_rows, flush_rows=flush_rows),
    )
    ref = zarr.open_group(str(tmp / f"ref-{batch_size}-{prefetch}.zarr"), mode="w")
    read, skipped = _sequential_stage(split, 1, urls, ref, patches, 5, chunk_rows, flush_rows)
    fast = zarr.open_group(str(tmp / f"fast-{batch_size}-{prefetch}.zarr"), mode="w")
    summary = compute_class_activations(
        split, 1, urls, fast, patches, spatial_images=5, prefetch=prefetch
    )
    assert summary.n_images == len(read) == len(urls) - 1 and summary.n_skipped == 1
    assert fast.attrs["image_urls"] == read and fast.attrs["skipped"] == [list(s) for s in skipped]
    want, got = _arrays(ref), _arrays(fast)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and fast[name].chunks == ref[name].chunks, name
        if name in ("image_A", "image_logit", "spatial"):
            single = batch_size < 2 * len(
                patch_boxes(patches.image_size, patches.fraction, patches.grid)
            )
            rtol, atol = (1e-4, 1e-5) if single else (1e-6, 1e-6)
            np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=atol, err_msg=name)
        else:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert not [
        t.name for t in threading.enumerate() if t.name.startswith(("lens-read", "lens-zarr"))
    ]


def test_stage_failures_stop_its_threads(toy, monkeypatch):
    split, urls, patches, tmp = toy
    calls = []

    class Failing(torch.nn.Module):
        def forward(self, x):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("injected g failure")
            return split.g(x)

    broken = dataclasses.replace(split, g=Failing())
    with pytest.raises(RuntimeError, match="injected g failure"):
        compute_class_activations(
            broken, 0, urls, zarr.open_group(str(tmp / "fail.zarr"), mode="w"), patches, prefetch=4
        )

    def bad_write(self, name, block):
        raise OSError("injected write failure")

    monkeypatch.setattr(activations._Appender, "_write", bad_write)
    with pytest.raises(OSError, match="injected write failure"):
        compute_class_activations(
            split, 0, urls, zarr.open_group(str(tmp / "fail2.zarr"), mode="w"), patches, prefetch=4
        )
    time.sleep(0.2)
    assert not [
        t.name for t in threading.enumerate() if t.name.startswith(("lens-read", "lens-zarr"))
    ]


# ---- the prefetching reader ------------------------------------------------------------------


def _png(colour, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


JPEG_MAGIC = b"\xff\xd8"


def _jpeg(colour, size=(300, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def mixed_folder(tmp_path: Path) -> list[str]:
    """Good PNG/JPEG files with unreadable ones between them (and a missing one),
    in listed order."""
    files = [
        _png((10, 20, 30)),
        b"",
        _jpeg((200, 10, 10)),
        _png((0, 255, 0)),
        b"garbage",
        None,
        _jpeg((5, 5, 250))[:300],
        _png((1, 2, 3), (17, 90)),
        _png((9, 9, 9)),
        _jpeg((40, 80, 120), (64, 48)),
        b"\x89PNG\r\n\x1a\n broken",
        _png((255, 255, 255)),
        _jpeg((90, 60, 30)),
        _png((50, 100, 150)),
    ]
    urls = []
    for i, blob in enumerate(files):
        ext = "jpg" if blob and blob.startswith(JPEG_MAGIC) else "png"
        path = tmp_path / f"{i:02d}.{ext}"
        if blob is not None:
            path.write_bytes(blob)
        urls.append(f"file://{path}")
    return urls


@pytest.mark.parametrize(("ahead", "workers"), [(1, 1), (2, 2), (3, 1), (8, 4), (40, 3)])
def test_prefetch_reads_the_same_images_in_the_same_order(mixed_folder, ahead, workers, caplog):
    seq_stats, pre_stats = ReadStats(), ReadStats()
    with caplog.at_level("WARNING", logger="lens_core.data"):
        seq = list(iter_images(mixed_folder, None, 16, seq_stats))
        seq_log = [r.getMessage() for r in caplog.records]
        caplog.clear()
        pre = list(iter_images(mixed_folder, None, 16, pre_stats, prefetch=ahead, workers=workers))
        pre_log = [r.getMessage() for r in caplog.records]
    assert [(p, u) for p, u, _ in pre] == [(p, u) for p, u, _ in seq]
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(pre, seq, strict=True))
    assert pre_stats.skipped == seq_stats.skipped and pre_stats.read == seq_stats.read == len(seq)
    assert pre_log == seq_log
    assert len(seq_stats.skipped) == 5 and {r for _, r in seq_stats.skipped} >= {
        "empty file",
        "file not found",
    }


def test_reader_pool_is_bounded_ordered_and_raises_in_place():
    started: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(0.002 * (i % 3))  # out-of-order completion
        if i == 7:
            raise PermissionError("access denied")  # like a refused credential: not skipped
        return i * i

    got = []
    with pytest.raises(PermissionError):
        for i, value in reader._in_order(work, range(20), ahead=3, workers=2):
            with lock:
                assert len(started) - len(got) <= 3  # never more than `ahead` read ahead
            got.append((i, value))
    assert got == [(i, i * i) for i in range(7)]  # everything before the failure, in order

    gate = threading.Event()
    stream = reader._in_order(lambda i: gate.wait(5) and i, range(100), ahead=4, workers=2)
    gate.set()
    assert next(stream) == (0, 0)
    gate.clear()  # the next ones now block; closing must not wait for them
    t0 = time.perf_counter()
    stream.close()
    assert time.perf_counter() - t0 < 1.0
    gate.set()
