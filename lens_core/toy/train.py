"""Retrain the shipped toy CNN, deterministically on CPU: `python -m lens_core.toy.train`.

Training images are rendered in memory (image seeds 0..n-1 of each class); held-out images use seeds
from EVAL_SEED_OFFSET on. Crops span CRAFT-sized patches to whole images, so that a patch showing a
class's own part scores that class. Writes toy_cnn.safetensors (state_dict) and toy_cnn.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lens_core.toy.generator import IMAGE_SIZE, class_parts, render_image
from lens_core.toy.model import WIDTHS, ToyCNN

TRAIN_SEED = 0
EVAL_SEED_OFFSET = 1_000_000
INPUT_SIZE = 64
MEAN, STD = 0.5, 0.25
PATCH_FRACTION, PATCH_GRID = 64 / 224, 4  # AtlasConfig.patches defaults
PATCH_COVERAGE = 0.2  # a patch "shows" an own part when its pixels cover this share of the patch
OUT_DIR = Path(__file__).resolve().parent


def normalize(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std, as the model loader applies it outside the model."""
    return (x - MEAN) / STD


def render_set(
    n_classes: int,
    n_per_class: int,
    seed_offset: int,
    recipes: dict[int, tuple[int, ...]] | None = None,
    distractors: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """uint8 images (N,3,S,S), int64 labels (N,), int16 masks (N,S,S) with image seeds offset+i
    (`recipes` and `distractors` change the world, as in `render_image`)."""
    images, labels, masks = [], [], []
    for c in range(n_classes):
        for i in range(n_per_class):
            img, mask = render_image(
                c, n_classes, seed_offset + i, parts=(recipes or {}).get(c), distractors=distractors
            )
            images.append(img)
            masks.append(mask)
            labels.append(c)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels), np.stack(masks)


def own_centroids(
    masks: np.ndarray,
    labels: torch.Tensor,
    n_classes: int,
    recipes: dict[int, tuple[int, ...]] | None = None,
) -> np.ndarray:
    """(N, 2) centre (x, y as fractions of the side) of one own part per image and recipe slot."""

    def own(c: int) -> tuple[int, ...]:
        return (recipes or {}).get(c) or class_parts(c, n_classes)

    k = max(len(own(c)) for c in range(n_classes))
    out = np.full((len(masks), k, 2), 0.5, dtype=np.float32)
    size = masks.shape[-1]
    for n, (mask, c) in enumerate(zip(masks, labels.tolist(), strict=True)):
        parts = own(c)
        for j in range(k):
            ys, xs = np.nonzero(mask == parts[j % len(parts)])
            if len(xs):
                out[n, j] = ((xs.mean() + 0.5) / size, (ys.mean() + 0.5) / size)
    return out


def sample_crops(rng: np.random.Generator, centroids: np.ndarray) -> torch.Tensor:
    """Affine thetas (N,2,3) of random crops: half patch-sized (often on an own part), half
    large."""
    n = len(centroids)
    small = rng.random(n) < 0.5
    area = np.where(small, rng.uniform(0.05, 0.3, n), rng.uniform(0.3, 1.0, n))
    ratio = np.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3), n))
    w = np.minimum(np.sqrt(area * ratio), 1.0)
    h = np.minimum(np.sqrt(area / ratio), 1.0)
    cx, cy = rng.random(n), rng.random(n)
    on_part = small & (rng.random(n) < 0.6)
    pick = centroids[np.arange(n), rng.integers(0, centroids.shape[1], n)]
    cx = np.where(on_part, pick[:, 0] + rng.normal(0, 0.15, n) * w, cx * (1 - w) + w / 2)
    cy = np.where(on_part, pick[:, 1] + rng.normal(0, 0.15, n) * h, cy * (1 - h) + h / 2)
    cx, cy = np.clip(cx, w / 2, 1 - w / 2), np.clip(cy, h / 2, 1 - h / 2)
    flip = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    theta = np.zeros((n, 2, 3), dtype=np.float32)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, 2 * cx - 1
    theta[:, 1, 1], theta[:, 1, 2] = h, 2 * cy - 1
    return torch.from_numpy(theta)


def crop_batch(images: torch.Tensor, theta: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Bilinear crops of uint8 images by affine thetas, as normalized model input
    (N,3,size,size)."""
    x = images.float() / 255
    grid = F.affine_grid(theta, [len(x), 3, size, size], align_corners=False)
    return normalize(F.grid_sample(x, grid, mode="bilinear", align_corners=False))


def resize(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """uint8 (N,3,S,S) -> normalized float input at size x size (antialiased bilinear)."""
    x = images.float() / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return normalize(x)


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Predicted labels for normalized inputs, in batches."""
    model.eval()
    return torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])


def grid_boxes(size: int = IMAGE_SIZE) -> list[tuple[int, int, int, int]]:
    """CRAFT patch boxes (x0, y0, x1, y1): side = fraction * size on a grid x grid lattice."""
    side = round(PATCH_FRACTION * size)
    starts = [round(k * (size - side) / (PATCH_GRID - 1)) for k in range(PATCH_GRID)]
    return [(x, y, x + side, y + side) for y in starts for x in starts]


@torch.no_grad()
def patch_accuracy(
    model: torch.nn.Module,
    images: torch.Tensor,
    masks: np.ndarray,
    labels: torch.Tensor,
    n_classes: int,
) -> tuple[float, float, int]:
    """Accuracy over grid patches showing an own part (>= PATCH_COVERAGE), over all, and that
    count."""
    hits, covered, total_hits, total = 0, 0, 0, 0
    for x0, y0, x1, y1 in grid_boxes(images.shape[-1]):
        pred = predict(model, resize(images[:, :, y0:y1, x0:x1]))
        ok = (pred == labels).numpy()
        own = np.array(
            [
                np.isin(m[y0:y1, x0:x1], class_parts(c, n_classes)).mean() >= PATCH_COVERAGE
                for m, c in zip(masks, labels.tolist(), strict=True)
            ]
        )
        hits += int(ok[own].sum())
        covered += int(own.sum())
        total_hits += int(ok.sum())
        total += len(ok)
    return hits / max(covered, 1), total_hits / total, covered


def _step(
    model: ToyCNN,
    opt: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    centroids: np.ndarray,
    rng: np.random.Generator,
) -> float:
    """One optimizer step on random crops of a batch (half patch-sized, often on an own part)."""
    x = crop_batch(images, sample_crops(rng, centroids))
    loss = F.cross_entropy(model(x), labels, label_smoothing=0.05)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def train(
    n_classes: int = 10,
    per_class: int = 400,
    epochs: int = 8,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = TRAIN_SEED,
    eval_per_class: int = 50,
) -> tuple[ToyCNN, dict]:
    """Train ToyCNN on freshly rendered images; return the model and its metrics.

    Runs on one thread with deterministic algorithms (restored afterwards): same seed, same bytes.
    """
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)  # fixed: reproducible, and fastest on a busy 2-core machine
    torch.use_deterministic_algorithms(True)
    try:
        return _train(n_classes, per_class, epochs, batch_size, lr, seed, eval_per_class)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(
    n_classes: int,
    per_class: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    eval_per_class: int,
) -> tuple[ToyCNN, dict]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    images, labels, masks = render_set(n_classes, per_class, seed_offset=0)
    centroids = own_centroids(masks, labels, n_classes)
    del masks
    model = ToyCNN(n_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps_per_epoch = len(images) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(len(images)))
        seen, loss_sum = 0, 0.0
        for b in range(steps_per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            loss = _step(model, opt, images[idx], labels[idx], centroids[idx.numpy()], rng)
            sched.step()
            loss_sum += loss * len(idx)
            seen += len(idx)
        print(
            f"epoch {epoch + 1}/{epochs} loss {loss_sum / seen:.4f} "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    train_seconds = time.perf_counter() - start
    ev_images, ev_labels, ev_masks = render_set(n_classes, eval_per_class, EVAL_SEED_OFFSET)
    acc = float((predict(model, resize(ev_images)) == ev_labels).float().mean())
    p_acc, p_all, p_n = patch_accuracy(model, ev_images, ev_masks, ev_labels, n_classes)
    metrics = {
        "accuracy": round(acc, 4),
        "patch_accuracy": round(p_acc, 4),
        "patch_accuracy_all": round(p_all, 4),
        "patch_note": f"{PATCH_GRID}x{PATCH_GRID} patches of {PATCH_FRACTION:.4f} of the side; "
        f"patch_accuracy over the {p_n} patches whose own-part pixels cover >= {PATCH_COVERAGE}",
        "eval_images": len(ev_images),
        "eval_seeds": f"{EVAL_SEED_OFFSET}..{EVAL_SEED_OFFSET + eval_per_class - 1} per class",
        "seed": seed,
        "n_classes": n_classes,
        "input_size": INPUT_SIZE,
        "image_size": IMAGE_SIZE,
        "train_images": len(images),
        "train_seeds": f"0..{per_class - 1} per class",
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "widths": list(WIDTHS),
        "seconds": round(train_seconds, 1),
        "mean": [MEAN] * 3,
        "std": [STD] * 3,
        "layer": "block4",
        "torch": torch.__version__,
    }
    return model, metrics


def finetune(
    model: ToyCNN,
    recipes: dict[int, tuple[int, ...]],
    distractors: tuple[int, ...] | None = None,
    n_classes: int = 10,
    per_class: int = 120,
    epochs: int = 2,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 1,
) -> ToyCNN:
    """Fine-tune a trained ToyCNN in place on a changed world: the classes in `recipes` get those
    own parts, and `distractors` (e.g. a removed signature part) appear at random in every class.

    A few hundred steps, deterministic on one thread like `train`; the ground truth of the
    concept-change tests (a class that stopped relying on one part and started on another).
    """
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        images, labels, masks = render_set(n_classes, per_class, 2_000_000, recipes, distractors)
        centroids = own_centroids(masks, labels, n_classes, recipes)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
        model.train()
        for _ in range(epochs):
            order = torch.from_numpy(rng.permutation(len(images)))
            for b in range(len(images) // batch_size):
                idx = order[b * batch_size : (b + 1) * batch_size]
                _step(model, opt, images[idx], labels[idx], centroids[idx.numpy()], rng)
        return model.eval()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def main(argv: list[str] | None = None) -> dict:
    """CLI: train, then write <out>/toy_cnn.safetensors and <out>/toy_cnn.json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=TRAIN_SEED)
    args = ap.parse_args(argv)
    model, metrics = train(args.classes, args.per_class, args.epochs, seed=args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out_dir / "toy_cnn.safetensors"), metadata={"arch": "ToyCNN"})
    (args.out_dir / "toy_cnn.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
