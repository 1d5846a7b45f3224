"""MACO feature visualization (Fel et al., NeurIPS 2023), batched over many concepts at once.

NAdam optimizes an image's Fourier phase under a fixed magnitude spectrum (from the run's images,
or a .npy file) to maximize the concept objective (g's pooled activation projected on the concept
direction) under random crops, rescaling and noise; the accumulated absolute gradient w.r.t. the
image is the transparency map (PNG alpha). One deviation from Horama: each concept's phase
gradient is scaled to unit norm before NAdam, so one gradient spike cannot freeze the phase.
Reference budgets and the figures behind these choices are in docs/performance.md.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from lens_core.config import MacoConfig
from lens_core.device import autocast
from lens_core.store.fs import ReadRefused, read_bounded

# Square root of the ImageNet colour correlation (the fixed decorrelation of Lucid and Horama):
# a decorrelated pixel row z (1x3) becomes an RGB row z @ COLOR_SQRT.
COLOR_SQRT = torch.tensor(
    [
        [0.56282854, 0.58447580, 0.58447580],
        [0.19482528, 0.00000000, -0.19482528],
        [0.04329450, -0.10823626, 0.06494176],
    ]
)
ALPHA_PERCENTILE = 90.0  # the alpha map is divided by this percentile of itself, then clipped
ALPHA_BLUR = 1.0 / 128  # Gaussian blur sigma of the alpha map, as a fraction of the image side
CENTER_STD = 0.15  # crop centres ~ N(0.5, 0.15) of the side, clamped inside the image (Horama)
_EPS = 1e-4
# a magnitude spectrum (3, h, w//2+1): float64 at the largest render (2048) is 50 MiB
MAX_MAGNITUDE_BYTES = 128 << 20


@dataclass
class MacoResult:
    """Images (B,3,S,S) and alpha (B,1,S,S) in [0,1]; history (steps,B): the objective per step
    (mean over crops); objective (B,): the final image's, unaugmented, in fp32
    (``evaluate_images``)."""

    images: Tensor
    alpha: Tensor
    history: Tensor
    objective: Tensor


# ---------------------------------------------------------------- magnitude spectrum


def _as_batch(x: Tensor) -> Tensor:
    x = torch.as_tensor(x)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images (3,H,W) or (N,3,H,W), got {tuple(x.shape)}")
    return x.float()


def _mix(x: Tensor, m: Tensor) -> Tensor:
    """Per-pixel colour mix out[:, d] = sum_c x[:, c] m[c, d], elementwise (batch-invariant, unlike
    matmul)."""
    m = m.tolist()
    return torch.stack(
        [x[:, 0] * m[0][d] + x[:, 1] * m[1][d] + x[:, 2] * m[2][d] for d in range(3)], dim=1
    )


def decorrelate_colors(images: Tensor) -> Tensor:
    """Inverse of the fixed colour recorrelation: RGB (N,3,H,W) -> decorrelated channels."""
    return _mix(images, torch.linalg.inv(COLOR_SQRT.double()))


def recorrelate_colors(z: Tensor) -> Tensor:
    """Fixed colour recorrelation of decorrelated channels (N,3,H,W) -> RGB-correlated values."""
    return _mix(z, COLOR_SQRT)


def estimate_magnitude(images: Iterable[Tensor], size: int, decorrelate: bool = True) -> Tensor:
    """Mean amplitude of rfft2 over images (3,H,W)/(N,3,H,W) in [0,1] resized to size:
    (3,size,size//2+1).

    With ``decorrelate`` (default) the spectrum is of the colour-decorrelated images, the space the
    phase lives in (Horama's ``spectrum_decorrelated.npy`` is the same kind of file).
    """
    total: Tensor | None = None
    count = 0
    for item in images:
        x = _as_batch(item)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(
                x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )
        if decorrelate:
            x = decorrelate_colors(x)
        amp = torch.fft.rfft2(x.double()).abs().sum(0)
        total = amp if total is None else total + amp
        count += x.shape[0]
    if total is None:
        raise ValueError("estimate_magnitude needs at least one image")
    return (total / count).float()


def save_magnitude(
    magnitude: Tensor, url: str, storage_options: dict[str, Any] | None = None
) -> None:
    """Write a magnitude spectrum (3,h,w) as .npy to a local path or fsspec URL."""
    buf = io.BytesIO()
    np.save(buf, torch.as_tensor(magnitude).detach().cpu().float().numpy())
    with fsspec.open(url, "wb", **(storage_options or {})) as f:
        f.write(buf.getvalue())


def load_magnitude(url: str, storage_options: dict[str, Any] | None = None) -> Tensor:
    """Read a magnitude spectrum .npy (3,h,w) from a local path or fsspec URL as float32; a device,
    a FIFO or more than MAX_MAGNITUDE_BYTES is refused (ValueError) before it fills memory."""
    try:
        data = read_bounded(url, storage_options, MAX_MAGNITUDE_BYTES)
    except ReadRefused as err:
        raise ValueError(f"refusing maco.magnitude: {err}") from None
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.ndim != 3 or arr.shape[0] != 3:
        raise ValueError(f"magnitude spectrum must be (3,h,w), got {arr.shape} in {url}")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def fit_magnitude(magnitude: Tensor, size: int) -> Tensor:
    """The spectrum resized (bilinear, antialiased, like Horama) to (3, size, size//2+1)."""
    shape = (size, size // 2 + 1)
    magnitude = torch.as_tensor(magnitude).float()
    if tuple(magnitude.shape[-2:]) == shape:
        return magnitude
    out = F.interpolate(
        magnitude[None], size=shape, mode="bilinear", align_corners=False, antialias=True
    )
    return out[0]


# ---------------------------------------------------------------- parametrization


def _standardize(x: Tensor) -> Tensor:
    """Zero mean, unit std per sample (over all but the first dim)."""
    dims = tuple(range(1, x.ndim))
    x = x - x.mean(dims, keepdim=True)
    return x / (x.std(dims, keepdim=True) + _EPS)


def phase_to_image(phase: Tensor, magnitude: Tensor) -> Tensor:
    """Phase (B,3,S,S//2+1) + fixed magnitude -> images (B,3,S,S) in [0,1].

    Pixel space: g takes pixels in [0, 1] and standardizes internally, so the image is sigmoid(z)
    and `value_range` only scales the noise (augment).
    """
    side = phase.shape[-2]
    p = _standardize(phase)
    spectrum = torch.complex(torch.cos(p) * magnitude, torch.sin(p) * magnitude)
    spatial = _standardize(torch.fft.irfft2(spectrum, s=(side, side)))
    return torch.sigmoid(recorrelate_colors(spatial))


def _generators(seeds: Sequence[int], device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def init_phase(gens: Sequence[torch.Generator], size: int, device: torch.device) -> Tensor:
    """One standard-normal random phase (3,size,size//2+1) per generator, stacked."""
    shape = (3, size, size // 2 + 1)
    return torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])


def random_phase_images(
    magnitude: Tensor, seeds: Sequence[int], size: int, device: torch.device | str = "cpu"
) -> Tensor:
    """Random-phase images with the given magnitude: the optimization's starting points."""
    device = torch.device(device)
    mag = fit_magnitude(magnitude, size).to(device)
    return phase_to_image(init_phase(_generators(seeds, device), size, device), mag)


# ---------------------------------------------------------------- objective


def pool(acts: Tensor) -> Tensor:
    """Spatial mean of (N,C,H,W) activations; (N,C) passes through."""
    return acts.mean(dim=(2, 3)) if acts.ndim == 4 else acts.reshape(acts.shape[0], -1)


def objective(
    acts_pooled: Tensor, directions: Tensor, kind: str = "dot_cossim", power: float = 2.0
) -> Tensor:
    """Per-row objective (N,) of pooled activations (N,C) on directions (N,C) or (C,).

    ``dot``: a.w; ``cosine``: cos(a, w); ``dot_cossim`` (Horama): a.w * clamp(cos, min 0.1)^power.
    """
    dot = (acts_pooled * directions).sum(-1)
    if kind == "dot":
        return dot
    cos = F.cosine_similarity(acts_pooled, directions.expand_as(acts_pooled), dim=-1, eps=1e-8)
    if kind == "cosine":
        return cos
    if kind == "dot_cossim":
        return dot * cos.clamp(min=0.1) ** power
    raise ValueError(f"unknown objective kind {kind!r}")


def evaluate_images(
    g: nn.Module,
    images: Tensor,
    directions: Tensor,
    input_size: int,
    kind: str = "dot_cossim",
    power: float = 2.0,
) -> Tensor:
    """Objective (B,) of whole images (B,3,S,S) resized to input_size, no augmentation."""
    with torch.no_grad():
        x = images
        if x.shape[-1] != input_size:
            x = F.interpolate(
                x,
                size=(input_size, input_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        return objective(pool(g(x)), directions.to(x.device, x.dtype), kind, power).float()


# ---------------------------------------------------------------- augmentation


def _crop_params(gen: torch.Generator, n: int, crop_range: tuple[float, float], device) -> Tensor:
    """n square crops (side, cx, cy) as fractions of the image: side ~ U(crop_range),
    centre ~ N(0.5, 0.15)."""
    lo, hi = crop_range
    frac = lo + (hi - lo) * torch.rand(n, 1, generator=gen, device=device)
    centre = 0.5 + CENTER_STD * torch.randn(n, 2, generator=gen, device=device)
    centre = torch.minimum(torch.maximum(centre, frac / 2), 1 - frac / 2)
    return torch.cat([frac, centre], dim=1)


def augment(
    images: Tensor, gens: Sequence[torch.Generator], cfg: MacoConfig, input_size: int
) -> Tensor:
    """cfg.crops random crops per image, resized to input_size, plus noise: (B*crops,3,in,in).

    Crops are bilinear samples on an affine grid, all crops of an image in one grid_sample call
    (cheaper than torchvision roi_align on CPU, backward included); noise is Gaussian plus
    uniform as in Horama, scaled to pixels by the value range.
    """
    b, k, dev, size = images.shape[0], cfg.crops, images.device, input_size
    crop = torch.stack([_crop_params(g, k, cfg.crop_range, dev) for g in gens]).to(images.dtype)
    theta = torch.zeros(b * k, 2, 3, device=dev, dtype=images.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = crop[..., 0].flatten()
    theta[:, :, 2] = 2 * crop[..., 1:].reshape(-1, 2) - 1
    grid = F.affine_grid(theta, [b * k, 3, size, size], align_corners=False)
    crops = F.grid_sample(
        images, grid.view(b, k * size, size, 2), mode="bilinear", align_corners=False
    )
    crops = crops.view(b, 3, k, size, size).transpose(1, 2).reshape(b * k, 3, size, size)
    if cfg.noise > 0:
        scale = cfg.noise / (cfg.value_range[1] - cfg.value_range[0])
        shape = (k, *crops.shape[1:])
        noise = torch.cat(
            [
                torch.randn(shape, generator=g, device=dev)
                + torch.rand(shape, generator=g, device=dev)
                - 0.5
                for g in gens
            ]
        )
        crops = crops + scale * noise.to(crops.dtype)
    return crops


# ---------------------------------------------------------------- transparency


def _blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (B,1,H,W) with reflect padding."""
    if sigma <= 0:
        return x
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))


def transparency(grad_sum: Tensor, percentile: float = ALPHA_PERCENTILE) -> Tensor:
    """Accumulated |dObjective/dImage| (B,1,S,S) -> alpha in [0,1]: slight blur,
    percentile-normalized."""
    side = grad_sum.shape[-1]
    a = _blur(grad_sum.float(), sigma=max(0.5, ALPHA_BLUR * side))
    flat = a.flatten(1)
    ref = torch.quantile(flat, percentile / 100.0, dim=1)
    ref = torch.where(ref > 0, ref, flat.amax(1))
    a = a / ref.clamp_min(1e-12).view(-1, 1, 1, 1)
    return a.clamp(0, 1)


# ---------------------------------------------------------------- rendering


def _model_device(g: nn.Module) -> torch.device:
    p = next(g.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


SnapshotFn = Callable[[int, list[int], Tensor], None]


def _render_chunk(
    g: nn.Module,
    directions: Tensor,
    cfg: MacoConfig,
    magnitude: Tensor,
    seeds: Sequence[int],
    input_size: int,
    device: torch.device,
    precision: str,
    snapshot_steps: frozenset[int],
    on_snapshot: SnapshotFn | None,
    first: int,
) -> MacoResult:
    b, size = directions.shape[0], cfg.image_size
    gens = _generators(seeds, device)
    phase = init_phase(gens, size, device).requires_grad_(True)
    dirs = directions.repeat_interleave(cfg.crops, 0)
    opt = torch.optim.NAdam([phase], lr=cfg.lr)
    grad_sum = torch.zeros(b, 1, size, size, device=device)
    history = torch.zeros(cfg.steps, b)
    for step in range(cfg.steps):
        image = phase_to_image(phase, magnitude)  # fp32: the spectrum and the pixels
        crops = augment(image, gens, cfg, input_size).contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):  # only g's forward (and so its backward) in bf16/fp16
            acts = pool(g(crops).float())
        obj = objective(acts, dirs, cfg.objective, cfg.cossim_power).view(b, cfg.crops).mean(1)
        # Concepts are independent: d(sum)/d(phase_b) only involves concept b.
        g_phase, g_image = torch.autograd.grad(-obj.sum(), [phase, image])
        # Per-concept unit gradient: NAdam then never locks up after a spike (see module doc).
        g_phase = g_phase / (g_phase.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-12)
        phase.grad = g_phase
        opt.step()
        grad_sum += g_image.float().abs().sum(1, keepdim=True)
        history[step] = obj.detach().float().cpu()
        if on_snapshot is not None and step + 1 in snapshot_steps:
            with torch.no_grad():
                on_snapshot(
                    step + 1,
                    list(range(first, first + b)),
                    phase_to_image(phase.detach(), magnitude),
                )
    with torch.no_grad():
        images = phase_to_image(phase, magnitude)
    final = evaluate_images(g, images, directions, input_size, cfg.objective, cfg.cossim_power)
    return MacoResult(images.float().cpu(), transparency(grad_sum).cpu(), history, final.cpu())


def render_concepts(
    g: nn.Module,
    directions: Tensor,
    cfg: MacoConfig,
    magnitude: Tensor,
    seeds: Sequence[int],
    input_size: int,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    snapshot_steps: Collection[int] = (),
    on_snapshot: SnapshotFn | None = None,
) -> MacoResult:
    """Render B concept directions (B,C) of g's output in batches of cfg.batch_size.

    ``g`` maps images (N,3,s,s) in [0,1] to (N,C,H,W) (mean-pooled) or (N,C); it should be in
    eval mode (no batch coupling). Randomness is per concept: concept b uses its own generator,
    seeded with ``seeds[b]`` only, so chunking does not change results (a batch and one-by-one
    renders are the same on CPU). Gradients are taken w.r.t. the phase only; g's parameters are
    left untouched. ``precision`` (``model.precision``) is the autocast dtype of g's forward and
    backward; the phase, NAdam's state, the objective, the transparency map and the final
    objective (evaluated in fp32) stay float32 whatever it is. ``on_snapshot(step, concept
    indices, their images)`` is called after each step listed in ``snapshot_steps`` (the budget
    study; nothing is kept).
    """
    directions = torch.as_tensor(directions).float()
    if directions.ndim != 2:
        raise ValueError(f"directions must be (B,C), got {tuple(directions.shape)}")
    if len(seeds) != directions.shape[0]:
        raise ValueError(
            f"need one seed per concept: {len(seeds)} seeds for {directions.shape[0]} concepts"
        )
    dev = torch.device(device) if device is not None else _model_device(g)
    autocast(dev, precision)  # an unknown precision fails here, before any work
    marks = frozenset(int(t) for t in snapshot_steps)
    parts = []
    # Callers may hold inference_mode/no_grad (a GPU worker does): optimization needs autograd.
    with torch.inference_mode(False), torch.enable_grad():
        mag = fit_magnitude(magnitude, cfg.image_size).to(dev).clone()
        directions = directions.to(dev).clone()
        for i in range(0, directions.shape[0], cfg.batch_size):
            j = i + cfg.batch_size
            parts.append(
                _render_chunk(
                    g,
                    directions[i:j],
                    cfg,
                    mag,
                    seeds[i:j],
                    input_size,
                    dev,
                    precision,
                    marks,
                    on_snapshot,
                    i,
                )
            )
    return MacoResult(
        images=torch.cat([p.images for p in parts]),
        alpha=torch.cat([p.alpha for p in parts]),
        history=torch.cat([p.history for p in parts], dim=1),
        objective=torch.cat([p.objective for p in parts]),
    )


# ---------------------------------------------------------------- PNG export


def _to_uint8(x: Tensor) -> np.ndarray:
    return (
        (torch.as_tensor(x).detach().float().cpu().clamp(0, 1) * 255)
        .round()
        .to(torch.uint8)
        .numpy()
    )


def encode_png(image: Tensor) -> bytes:
    """An RGB PNG of an image (3,S,S) in [0,1]."""
    buf = io.BytesIO()
    Image.fromarray(_to_uint8(image).transpose(1, 2, 0), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def encode_rgba_png(image: Tensor, alpha: Tensor) -> bytes:
    """An RGBA PNG of an image (3,S,S) with alpha (1,S,S) or (S,S), both in [0,1]."""
    alpha = torch.as_tensor(alpha).reshape(1, *image.shape[-2:])
    rgba = np.concatenate([_to_uint8(image), _to_uint8(alpha)], axis=0).transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgba), "RGBA").save(buf, format="PNG")
    return buf.getvalue()
