"""Cross-class neighbours and top-crop selection against brute-force computations."""

import numpy as np

from lens_core.crops import attribution_map, top_patches
from lens_core.cross_class import class_alignment, nearest_concepts


def _brute_nearest(W_by_class, slug, concept, top):
    v = W_by_class[slug][concept]
    cands = []
    for other, W in W_by_class.items():
        if other == slug:
            continue
        for j, w in enumerate(W):
            cands.append((float(v @ w / np.linalg.norm(v) / np.linalg.norm(w)), other, j))
    cands.sort(key=lambda t: -t[0])
    return [(o, j) for _, o, j in cands[:top]]


def test_nearest_concepts_match_brute_force_across_blocks():
    rng = np.random.default_rng(0)
    W_by_class = {f"c{i}": rng.random((4, 16)) for i in range(7)}
    got = nearest_concepts(W_by_class, top=5, block=5)  # several row blocks
    for slug in W_by_class:
        for c in range(4):
            assert [(n["slug"], n["concept"]) for n in got[slug][c]] == _brute_nearest(
                W_by_class, slug, c, 5
            )
            assert all(n["slug"] != slug for n in got[slug][c])


def test_alignment_ranks_classifier_rows_by_cosine():
    head = np.eye(6, 6)[:, :6] * 3.0  # class j's weight points along axis j
    W = {"a": np.array([[0.0, 0.1, 0.0, 5.0, 0.2, 0.0]])}
    got = class_alignment(W, head, [f"s{j}" for j in range(6)], top=3)
    assert [r["class_index"] for r in got["a"][0]] == [3, 4, 1]
    assert got["a"][0][0]["slug"] == "s3"


def test_top_patches_one_per_image():
    U = np.array([[0.9, 0], [0.8, 0], [0.7, 0], [0.1, 0], [0.0, 0.5]])
    image_of_patch = np.array([0, 0, 1, 2, 3])
    assert top_patches(U, image_of_patch, 0, 3) == [0, 2, 3]
    assert top_patches(U, image_of_patch, 0, 3, one_per_image=False) == [0, 1, 2]
    assert top_patches(U, image_of_patch, 1, 3) == [4]  # zero coefficients are never "top"


def test_attribution_map_colours_the_dominant_concept():
    import torch

    image = torch.zeros(3, 8, 8)
    coeffs = np.zeros((2, 2, 2))
    coeffs[0, 0, :] = 1.0  # top row: concept 0
    coeffs[1, 1, :] = 1.0  # bottom row: concept 1
    img = np.asarray(attribution_map(image, coeffs, concept_rank=[1, 0], size=16)).astype(int)
    top, bottom = img[1, 8], img[14, 8]
    # concept 1 is ranked first -> first palette colour (blue); concept 0 second -> orange
    assert top[0] > top[2] and bottom[2] > bottom[0]
