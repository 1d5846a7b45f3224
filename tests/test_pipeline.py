"""The CRAFT stages end to end on the embedded toy model, checked against the generator's truth.

The toy data set knows which part covers every pixel, so the concepts can be scored against the
ground truth: the top concept's crops should show one of the class's own parts, and deleting
concepts in importance order should hurt the class logit more than a random order.
"""

from __future__ import annotations

import numpy as np
import pytest

from lens_core import extract, pipeline, stages
from lens_core.config import make_config
from lens_core.crops import top_patches
from lens_core.models import load_split_model
from lens_core.pipeline import prepare_run, run_class
from lens_core.status import read_status
from lens_core.toy import DISTRACTOR_PARTS, class_parts, read_mask

TOY = {"data": {"images_per_class": 24, "toy_images_per_class": 24}, "importance": {"images": 12}}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("toyrun")
    cfg = make_config(TOY, store=f"file://{root}/store", publish=f"file://{root}/site")
    info = prepare_run(cfg)
    for slug in info.slugs:
        run_class(info, slug)
    return info


def _mask_url(image_url: str) -> str:
    return image_url.replace("/images/", "/masks/")


def _dominant_part(mask: np.ndarray, box) -> int:
    x0, y0, x1, y1 = (int(v) for v in box)
    ids, counts = np.unique(mask[y0:y1, x0:x1], return_counts=True)
    keep = ids >= 0
    if not keep.any():
        return -1
    ids, counts = ids[keep], counts[keep]
    # a part "dominates" when it covers the largest share of the patch (background excluded)
    return int(ids[np.argmax(counts)])


class _PatchTruth:
    """The ground-truth part that dominates each patch of a class (masks read once per image)."""

    def __init__(self, urls, patches, image_size, storage_options):
        self.urls, self.patches, self.image_size, self.so = (
            urls,
            patches,
            image_size,
            storage_options,
        )
        self.masks: dict[int, np.ndarray] = {}

    def part(self, pid: int) -> int:
        pos = int(self.patches[pid, 0])
        if pos not in self.masks:
            self.masks[pos] = read_mask(_mask_url(self.urls[pos]), self.so)
        scale = self.masks[pos].shape[0] / self.image_size
        return _dominant_part(self.masks[pos], np.asarray(self.patches[pid, 1:]) * scale)


def _purity(parts: list[int]) -> tuple[int, float]:
    vals, counts = np.unique(parts, return_counts=True)
    i = int(np.argmax(counts))
    return int(vals[i]), counts[i] / len(parts)


def test_every_class_has_its_arrays(toy_run):
    store = toy_run.store()
    for slug in toy_run.slugs:
        acts = store.zarr[f"acts/{slug}"]
        n_img = acts.attrs["n_images"]
        assert acts["A"].shape[0] == n_img * 16 == acts["patches"].shape[0]
        assert np.all(acts["A"][:] >= 0)
        con = store.zarr[f"concepts/{slug}"]
        assert con["U"].shape == (n_img * 16, 10) and con["W"].shape[0] == 10
        assert con.attrs["dead"] == 0 and con.attrs["rel_error"] < 0.6
        imp = store.zarr[f"importance/{slug}"]
        assert sorted(imp["order"][:].tolist()) == list(range(10))
        assert np.all(imp["sobol"][:] >= -0.05)
        assert store.files_complete(f"crops/{slug}")


def test_logit_split_reproduces_the_model(toy_run):
    """Concept contributions + residual + bias equal
    the logits the model computed on the patches."""
    from lens_core.importance import logit_contributions

    store = toy_run.store()
    split = load_split_model(toy_run.config.model, toy_run.num_classes)
    weight, bias = (t.numpy() for t in split.head)
    for cls in toy_run.classes[:3]:
        acts = store.zarr[f"acts/{cls.slug}"]
        con = store.zarr[f"concepts/{cls.slug}"]
        parts = logit_contributions(con["U"][:], con["W"][:], acts["A"][:], weight, bias, cls.index)
        total = parts["contributions"].sum(1) + parts["residual"] + parts["bias"]
        np.testing.assert_allclose(total, acts["patch_logit"][:], rtol=1e-3, atol=1e-3)


def test_top_concept_crops_show_an_own_part(toy_run):
    """Against the ground-truth masks: the highest-ranked concept's crops are dominated by one of
    the class's own parts for most classes, far above what random patches of the class give."""
    store = toy_run.store()
    so = toy_run.config.storage_options
    rng = np.random.default_rng(0)
    hits, purities, random_purities = 0, [], []
    for cls in toy_run.classes:
        acts = store.zarr[f"acts/{cls.slug}"]
        patches = acts["patches"][:]
        U = store.zarr[f"concepts/{cls.slug}/U"][:]
        top = int(store.zarr[f"importance/{cls.slug}/order"][0])
        picked = top_patches(U, patches[:, 0], top, 10)
        truth = _PatchTruth(acts.attrs["image_urls"], patches, acts.attrs["image_size"], so)
        part, purity = _purity([truth.part(p) for p in picked])
        random_ids = rng.choice(len(patches), size=len(picked), replace=False)
        random_purities.append(_purity([truth.part(p) for p in random_ids])[1])
        own = set(class_parts(cls.index, toy_run.config.data.toy_classes))
        purities.append(purity)
        if part in own and part not in DISTRACTOR_PARTS and purity >= 0.6:
            hits += 1
    share = hits / len(toy_run.classes)
    print(
        f"own-part top concepts: {share:.0%}, mean purity {np.mean(purities):.2f} vs random "
        f"{np.mean(random_purities):.2f}"
    )
    assert share >= 0.7
    assert np.mean(purities) > np.mean(random_purities) + 0.25


def test_deletion_in_importance_order_beats_random(toy_run):
    store = toy_run.store()
    wins = 0
    for slug in toy_run.slugs:
        attrs = store.zarr[f"importance/{slug}"].attrs
        wins += attrs["deletion_auc"] < attrs["deletion_random_auc"]
    assert wins / len(toy_run.slugs) >= 0.8


def test_rerun_skips_everything_and_resumes_an_interrupted_stage(toy_run, monkeypatch):
    store = toy_run.store()
    results = run_class(toy_run, toy_run.slugs[0])
    assert all(r["skipped"] for r in results)
    # interrupt importance of one class: it dies after writing part of its group
    victim = toy_run.slugs[1]
    store.group(f"importance/{victim}", fresh=True).create_array(
        "sobol", data=np.zeros(3, np.float32)
    )
    calls = []
    real = stages.concept_sobol

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(stages, "concept_sobol", counting)
    for slug in toy_run.slugs:
        run_class(toy_run, slug)
    assert len(calls) == 1  # only the interrupted class recomputed its importance
    assert store.zarr[f"importance/{victim}/sobol"].shape == (10,)
    states = read_status(store, [victim])[victim]
    assert states["importance"]["state"] == "completed"


def test_failure_is_recorded_and_loses_nothing(toy_run, monkeypatch):
    store = toy_run.store()
    slug = toy_run.slugs[2]
    before = store.zarr[f"concepts/{slug}/W"][:]
    store.zarr[f"concepts/{slug}"].attrs.update({"complete": False})

    def boom(*a, **k):
        raise RuntimeError("injected NMF failure")

    monkeypatch.setattr(extract, "nmf", boom)
    with pytest.raises(RuntimeError, match="injected"):
        pipeline.stage_factorize(toy_run, slug)
    rec = read_status(store, [slug])[slug]["factorize"]
    assert rec["state"] == "failed" and "injected NMF failure" in rec["error"]
    monkeypatch.undo()
    pipeline.stage_factorize(toy_run, slug)
    np.testing.assert_allclose(store.zarr[f"concepts/{slug}/W"][:], before, rtol=1e-5, atol=1e-6)


def test_store_on_s3(s3, tmp_path):
    """The stages read and write the run store on a real S3 server (SeaweedFS, auth on)."""
    bucket = s3.new_bucket()
    cfg = make_config(
        {
            **TOY,
            "data": {"images_per_class": 8, "toy_images_per_class": 8, "toy_classes": 10},
            "importance": {"images": 4},
        },
        store=f"s3://{bucket}/lens",
        publish=f"s3://{bucket}/site",
        storage_options=s3.storage_options,
        classes=["0", "1"],
    )
    info = prepare_run(cfg)
    assert info.data_url.startswith(f"s3://{bucket}/")
    for slug in info.slugs:
        run_class(info, slug)
    store = info.store()
    for slug in info.slugs:
        assert store.is_complete(f"importance/{slug}") and store.files_complete(f"crops/{slug}")
        assert store.zarr[f"acts/{slug}/A"].shape[0] == 8 * 16
    again = run_class(info, info.slugs[0])
    assert all(r["skipped"] for r in again)
