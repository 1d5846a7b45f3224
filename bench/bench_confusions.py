"""What the mistakes step costs at ImageNet scale (synthetic data).

Run: scripts/bench.sh bench_confusions.py [--classes 1000] [--images 50] [--accuracy 0.76]

1,000 classes of 50 validation images with a ResNet50-like layer (2,048 channels, 10 concepts per
class) at 76% top-1 leave about 12,000 mistaken images. The step's numerical part codes each
mistaken image on the predicted class's dictionary (NNLS) and splits the predicted logit over
its concepts (`lens_core.confusions._codes`, one NNLS call per predicted class, and `pair_split`),
then finds the bias candidates; it is timed here on synthetic activations, against the per-class
importance stage's own coding of the same number of images as the baseline (the work every run
already does). The example overlays cost one g forward per example image (`mistakes.examples` x
`mistakes.example_pairs`, 900 by default): on a GPU that is a second; their CPU cost is the
activations stage's per-image cost (docs/performance.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lens_core.config import ConceptConfig  # noqa: E402
from lens_core.confusions import (  # noqa: E402
    ClassImages,
    Dictionary,
    _codes,
    bias_candidates,
    pair_split,
)
from lens_core.extract import make_extractor  # noqa: E402
from lens_core.factorize import project_nnls  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--channels", type=int, default=2048)
    ap.add_argument("--concepts", type=int, default=10)
    ap.add_argument("--accuracy", type=float, default=0.76)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n, C, k = args.classes, args.channels, args.concepts
    W = np.abs(rng.normal(size=(n, k, C))).astype(np.float32) * (rng.random((n, k, C)) < 0.1)
    head = rng.normal(scale=0.01, size=(n, C)).astype(np.float32)
    bias = rng.normal(scale=0.1, size=n).astype(np.float32)
    total = n * args.images
    wrong = rng.random(total) > args.accuracy
    true = np.repeat(np.arange(n), args.images)
    # mistakes go to a few neighbouring classes, as on ImageNet (dog breeds, ...)
    pred = np.where(wrong, (true + rng.integers(1, 6, total)) % n, true)
    pooled = np.abs(rng.normal(size=(total, C))).astype(np.float32)
    groups: dict[tuple[int, int], np.ndarray] = defaultdict(list)
    for i in np.flatnonzero(wrong):
        groups[(int(true[i]), int(pred[i]))].append(i)
    print(
        f"{n} classes x {args.images} images, {wrong.sum()} mistaken images in {len(groups)} pairs"
    )

    classes = {
        str(c): ClassImages(
            str(c),
            c,
            str(c),
            [],
            pred[c * args.images : (c + 1) * args.images],
            pooled[c * args.images : (c + 1) * args.images],
        )
        for c in range(n)
    }
    keyed = {(str(t), p): np.asarray(idx) - t * args.images for (t, p), idx in groups.items()}
    extractor = make_extractor(ConceptConfig(n_concepts=k))
    t0 = time.perf_counter()
    codes = _codes(
        keyed,
        classes,
        {c: str(c) for c in range(n)},
        lambda s: Dictionary(W[int(s)], None),
        extractor,
        torch.device("cpu"),
    )
    pairs = []
    for (t, p), idx in keyed.items():
        res = pair_split(codes[(t, p)], W[p], classes[t].pooled[idx], head, bias, p)
        pairs.append({"true": t, "predicted": str(p), "top_by_image": [int(x) for x in res["top"]]})
    flags = bias_candidates(pairs, 2)
    step = time.perf_counter() - t0

    t0 = time.perf_counter()  # baseline: coding the same number of images on their own class's W
    by_class: dict[int, list[int]] = defaultdict(list)
    for i in np.flatnonzero(wrong):
        by_class[int(true[i])].append(i)
    for c, idx in by_class.items():
        project_nnls(torch.from_numpy(pooled[idx]), torch.from_numpy(W[c]))
    base = time.perf_counter() - t0
    print(
        f"| part | seconds |\n|---|---|\n| mistakes step (split + bias candidates) | {step:.2f} |\n"
        f"| baseline: coding as many images per class | {base:.2f} |"
    )
    print(
        f"ratio to baseline: {step / base:.2f}x; "
        f"{sum(len(v) for v in flags.values())} bias candidates; "
        f"{1000 * step / max(wrong.sum(), 1):.2f} ms per mistaken image"
    )


if __name__ == "__main__":
    main()
