"""The logit share summed over images (Lens's points) against the share summed over patches.

Run: scripts/bench.sh bench_share_points.py [--images 12] [--classes 10] [--skip-resnet50]

Models: the shipped toy CNN, and a ResNet18 whose convolutions are at random init and whose linear
head is fitted (logistic regression) on other toy images, so that its predictions mean something;
both explained on the toy data with CRAFT's patches. For every class it prints how many images and
patches the model assigns to the class, whether each share is defined (images: >= 3 assigned
images; patches: >= 8 assigned patches, the old rule), whether each share's top-3 order equals
Sobol's, and the fidelity of each order: the deletion AUC over the random-order AUC (lower = the
order finds the class logit's support faster), with the median over classes.

It also measures which image coefficients ū reproduce the class logit with the smaller residual
on ResNet18 and ResNet50 at `layer4` (random init): the coefficients of the pooled activation,
or the spatial mean of the per-position coefficients (CRAFT's way for spatial maps).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lens_core import layout  # noqa: E402
from lens_core.config import make_config  # noqa: E402
from lens_core.extract import make_extractor  # noqa: E402
from lens_core.importance import (  # noqa: E402
    deletion_curve,
    logit_contributions,
    logit_share,
    random_deletion_baseline,
    rank_concepts,
)
from lens_core.model_cache import get_split  # noqa: E402
from lens_core.pipeline import prepare_run  # noqa: E402
from lens_core.stages import ACTIVATIONS, FACTORIZE, IMPORTANCE  # noqa: E402
from lens_core.toy import ensure_toy_dataset  # noqa: E402
from lens_core.tracking import run_stage  # noqa: E402

OLD_MIN_PATCHES = 8  # the patch rule this replaces (importance.min_share_patches)
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _fitted_resnet(arch: str, data_url: str, n_classes: int, path: Path) -> None:
    """A torchvision `arch` at random init with its
    fc fitted on toy images (a checkpoint at path)."""
    import torchvision
    from sklearn.linear_model import LogisticRegression

    from lens_core.data import ReadStats, iter_images, list_classes, list_images

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=n_classes).eval()
    mean = torch.tensor(IMAGENET["mean"])[:, None, None]
    std = torch.tensor(IMAGENET["std"])[:, None, None]
    body = torch.nn.Sequential(*list(model.children())[:-1])
    feats, labels = [], []
    for cls in list_classes(data_url):
        urls = list_images(data_url, cls)
        for _, _, img in iter_images(urls, None, 224, ReadStats()):
            with torch.inference_mode():
                feats.append(body(((img - mean) / std)[None]).flatten(1)[0].numpy())
            labels.append(cls.index)
    X = np.stack(feats)
    scale = X.std() or 1.0
    clf = LogisticRegression(max_iter=2000, C=10.0).fit(X / scale, labels)
    print(
        f"  {arch} head fitted on {len(X)} images: train accuracy "
        f"{clf.score(X / scale, labels):.2f}"
    )
    with torch.no_grad():
        model.fc.weight.copy_(torch.from_numpy(clf.coef_ / scale).float())
        model.fc.bias.copy_(torch.from_numpy(clf.intercept_).float())
    torch.save(model.state_dict(), path)


def _run(cfg: dict, classes: list[str] | None = None):
    info = prepare_run(make_config(cfg, classes=classes))
    for slug in info.slugs:
        for stage in (ACTIVATIONS, FACTORIZE, IMPORTANCE):
            run_stage(stage, info, slug, "cpu")
    return info


def _patch_share(acts, con, head, index: int) -> np.ndarray | None:
    """The old definition: the share summed over the class's patches classified as the class."""
    weight, bias = (t.detach().float().numpy() for t in head)
    parts = logit_contributions(con["U"][:], con["W"][:], acts["A"][:], weight, bias, index)
    share = logit_share(
        parts["contributions"], acts["patch_pred"][:] == index, parts["residual"], parts["bias"]
    )
    if share.n_points < OLD_MIN_PATCHES or share.denominator <= 0:
        return None
    return share.concepts


def _fidelity(split, info, slug: str, order: np.ndarray) -> float:
    """Deletion AUC of `order` over the random-order AUC, on the class's stored spatial maps."""
    store, cfg, cls = info.store(), info.config, info.cls(slug)
    acts, W = store.zarr[layout.acts(slug)], store.zarr[layout.concepts(slug)]["W"][:]
    spatial = torch.from_numpy(acts["spatial"][: cfg.importance.images])
    rows = spatial.permute(0, 2, 3, 1).reshape(-1, spatial.shape[1])
    U = make_extractor(cfg.concepts).encode(rows, W)
    _, auc = deletion_curve(split.h, spatial, U, W, cls.index, order)
    _, rand = random_deletion_baseline(split.h, spatial, U, W, cls.index, seed=0)
    return auc / rand if rand else float("nan")


def compare(info, title: str) -> dict[str, float]:
    split = get_split(info, "cpu")
    store = info.store()
    print(f"\n## {title}\n")
    print(
        "| class | images assigned | patches assigned | share over images | over patches "
        "| images top-3 = Sobol | patches top-3 = Sobol | fidelity images | fidelity patches |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    agree = {"images": 0, "patches": 0}
    defined = {"images": 0, "patches": 0}
    fid: dict[str, list[float]] = {"images": [], "patches": []}
    for slug in info.slugs:
        cls = info.cls(slug)
        acts, con = store.zarr[layout.acts(slug)], store.zarr[layout.concepts(slug)]
        imp = store.zarr[layout.importance(slug)]
        sobol = imp["sobol"][:]
        sobol_top = list(rank_concepts(sobol)[:3])
        img_share = imp["logit_share"][:] if "logit_share" in set(imp.array_keys()) else None
        patch_share = _patch_share(acts, con, split.head, cls.index)
        row = [
            slug,
            f"{imp.attrs['assigned_images']}/{imp.attrs['n_images']}",
            f"{imp.attrs['assigned_patches']}/{imp.attrs['n_patches']}",
        ]
        same, ratio = {}, {}
        for kind, share in (("images", img_share), ("patches", patch_share)):
            order = rank_concepts(share if share is not None else sobol)
            defined[kind] += share is not None
            same[kind] = share is not None and list(order[:3]) == sobol_top
            agree[kind] += same[kind]
            ratio[kind] = _fidelity(split, info, slug, order)
            fid[kind].append(ratio[kind])
        row += [
            "yes" if img_share is not None else "Sobol fallback",
            "yes" if patch_share is not None else "Sobol fallback",
            "yes" if same["images"] else "no",
            "yes" if same["patches"] else "no",
            f"{ratio['images']:.3f}",
            f"{ratio['patches']:.3f}",
        ]
        print("| " + " | ".join(row) + " |")
    n = len(info.slugs)
    print(
        f"\nshare defined: images {defined['images']}/{n}, patches {defined['patches']}/{n}; "
        "top-3 order equals Sobol's: images "
        f"{agree['images']}/{n}, patches {agree['patches']}/{n}; "
        f"median fidelity (deletion AUC / random): images {np.nanmedian(fid['images']):.3f}, "
        f"patches {np.nanmedian(fid['patches']):.3f}"
    )
    return {"agree_images": agree["images"], "agree_patches": agree["patches"]}


def residual_basis(info, title: str) -> None:
    """|residual| / |logit - bias| per image for ū of
    the pooled map and ū = mean of per-position ū."""
    split = get_split(info, "cpu")
    weight, bias = (t.detach().double().numpy() for t in split.head)
    store, cfg = info.store(), info.config
    extractor = make_extractor(cfg.concepts)
    pooled_r, mean_r = [], []
    for slug in info.slugs:
        cls = info.cls(slug)
        acts, W = store.zarr[layout.acts(slug)], store.zarr[layout.concepts(slug)]["W"][:]
        spatial = acts["spatial"][:]
        n, C, h, w = spatial.shape
        a_bar = spatial.mean(axis=(2, 3)).astype(np.float64)
        u_pool = np.asarray(extractor.encode(a_bar.astype(np.float32), W), np.float64)
        per_pos = np.asarray(
            extractor.encode(spatial.transpose(0, 2, 3, 1).reshape(-1, C), W), np.float64
        )
        u_mean = per_pos.reshape(n, h * w, -1).mean(1)
        wc = weight[cls.index]
        scale = np.abs(a_bar @ wc) + 1e-12
        pooled_r += list(np.abs((a_bar - u_pool @ W) @ wc) / scale)
        mean_r += list(np.abs((a_bar - u_mean @ W) @ wc) / scale)
    print(
        f"\n{title}: median |residual| / |logit - bias| over {len(pooled_r)} images: "
        f"pooled ū {np.median(pooled_r):.4f}, mean of per-position ū {np.median(mean_r):.4f} "
        f"(ratio {np.median(mean_r) / max(np.median(pooled_r), 1e-12):.2f}x)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=12, help="images per class")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--skip-resnet50", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = ensure_toy_dataset(f"file://{root}/toy", args.classes, args.images, 0)
        base = {
            "data": {"url": data, "images_per_class": args.images},
            "concepts": {"n_concepts": 10},
            "importance": {"images": args.images, "n_designs": 16},
        }
        toy = _run({**base, "store": f"file://{root}/toy-store"})
        compare(toy, "toy CNN (block4), 4x4 patches of 29% of the side")
        small = _run(
            {
                **base,
                "patches": {"fraction": 0.2, "grid": 4},
                "store": f"file://{root}/toy-small-store",
            }
        )
        compare(small, "toy CNN (block4), small patches (20% of the side)")

        fit = ensure_toy_dataset(f"file://{root}/fit", args.classes, 20, 1)
        ckpt = root / "resnet18.pt"
        _fitted_resnet("resnet18", fit, args.classes, ckpt)
        model = {
            "arch": "resnet18",
            "checkpoint": str(ckpt),
            "layer": "layer4",
            "input_size": 224,
            **IMAGENET,
        }
        r18 = _run({**base, "model": model, "store": f"file://{root}/r18-store"})
        compare(r18, "ResNet18 (random convolutions, fitted head) at layer4")
        residual_basis(r18, "ResNet18 layer4")
        if not args.skip_resnet50:
            ckpt50 = root / "resnet50.pt"
            torch.manual_seed(0)
            import torchvision

            torch.save(
                torchvision.models.resnet50(weights=None, num_classes=args.classes).state_dict(),
                ckpt50,
            )
            r50 = _run(
                {
                    **base,
                    "data": {**base["data"], "images_per_class": 6},
                    "importance": {"images": 6, "n_designs": 4},
                    "model": {**model, "arch": "resnet50", "checkpoint": str(ckpt50)},
                    "store": f"file://{root}/r50-store",
                },
                classes=r18.slugs[:3],
            )
            residual_basis(r50, "ResNet50 layer4 (random init)")


if __name__ == "__main__":
    main()
