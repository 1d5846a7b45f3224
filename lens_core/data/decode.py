"""Image bytes to a float tensor, safely: only plain raster decoders, bounded file size and pixel
count, large images reduced toward the target size while still 8-bit; the square resize."""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from lens_core.data.errors import ImageReadError

# A 34 KiB PNG can declare 6000 x 6000 pixels: files over MAX_IMAGE_BYTES are not read, images
# over MAX_PIXELS not decoded, and big images are reduced toward the target size while still
# 8-bit (JPEG: decoded at 1/2-1/8 scale), before any float conversion.
MAX_PIXELS = 40_000_000  # 24 MP camera photos pass; Pillow's own bomb limit is 89 M
MAX_IMAGE_BYTES = 64 << 20
# content is sniffed, but only these formats decode
DECODERS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """float32 HxWx3 in [0, 1]: 16-bit grey scaled by 65535, alpha composited over white."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        grey = np.asarray(img, dtype=np.float64) / 65535.0
        return np.repeat(np.clip(grey, 0, 1)[..., None], 3, axis=2).astype(np.float32)
    if mode == "F":
        grey = np.clip(np.asarray(img, dtype=np.float32) / 255.0, 0, 1)
        return np.repeat(grey[..., None], 3, axis=2)
    if (mode == "P" and "transparency" in img.info) or mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = rgba[..., 3:4]
        return rgba[..., :3] * alpha + (1.0 - alpha)
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def _reduced(img: Image.Image, target: int | None) -> Image.Image:
    """A decoded image shrunk by whole factors (box filter) while its sides stay >= `target`."""
    if not target:
        return img
    fx, fy = max(1, img.width // target), max(1, img.height // target)
    if fx == fy == 1:
        return img
    if img.mode in ("1", "P", "PA"):
        img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    elif img.mode.startswith("I;16"):
        img = img.convert("I")
    if img.mode in ("RGBA", "LA"):  # average premultiplied colours: no halo from transparent pixels
        premultiplied = {"RGBA": "RGBa", "LA": "La"}[img.mode]
        return img.convert(premultiplied).reduce((fx, fy))
    return img.reduce((fx, fy))


def decode_image(data: bytes, url: str = "<bytes>", target: int | None = None) -> torch.Tensor:
    """Image bytes -> float tensor (3, H, W) in [0, 1]; ImageReadError for anything unreadable.

    With `target`, a large image is decoded and reduced toward target x target first (its sides
    stay >= target), so memory follows the target size, not the file's pixel count.
    """
    if not data:
        raise ImageReadError(url, "empty file")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageReadError(url, f"file larger than {MAX_IMAGE_BYTES >> 20} MiB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=DECODERS) as probe:
                w, h = probe.size
                if w * h > MAX_PIXELS:
                    raise ImageReadError(
                        url, f"decompression bomb: {w}x{h} pixels exceeds {MAX_PIXELS}"
                    )
                probe.verify()
            with Image.open(io.BytesIO(data), formats=DECODERS) as img:
                if target and img.format == "JPEG":
                    img.draft(img.mode, (target, target))  # DCT scaling: never below the target
                img.load()
                array = _to_rgb_array(_reduced(img, target))
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageReadError(url, f"decompression bomb: {err}") from None
    except UnidentifiedImageError:
        raise ImageReadError(
            url, f"not a recognised image format (accepted: {', '.join(DECODERS)})"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as err:
        raise ImageReadError(
            url, f"corrupt or truncated image ({type(err).__name__}: {err})"
        ) from None
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (3, H, W) or (N, 3, H, W) to size x size (whole image, aspect not kept, as CRAFT)."""
    from torchvision.transforms.v2 import functional as TF

    if tuple(image.shape[-2:]) == (size, size):
        return image
    return TF.resize(image, [size, size], antialias=True).clamp_(0.0, 1.0)
