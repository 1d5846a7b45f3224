"""Classes and images from an image-folder layout at any fsspec URL, safe decoding, CRAFT patches.

Layout: ``<root>/<class dir>/**/*.jpg|jpeg|png|webp``. Label index = position of the class dir in
sorted order (torchvision ImageFolder), unless a class-index file maps dirs to the model's label
indices (`read_class_index`): a folder holding part of a model's label set, or one whose names do
not sort in training order, needs one. Unreadable images are skipped and reported, never fatal.
Only plain raster decoders run (`DECODERS`): a file of another format (TIFF, EPS, ...) under an
image name is refused, not handed to a complex or external decoder. Storage I/O is retried while
the store is unreachable (lens_core.store.call); a refused credential raises DataAccessError.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import struct
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, UnidentifiedImageError

from lens_core.naming import class_slug, plain_text, unique_slugs
from lens_core.store import StoreAccessError, call, filesystem, join_url, normalize_url
from lens_core.store.fs import ReadRefused, open_regular, read_bounded

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# A 34 KiB PNG can declare 6000 x 6000 pixels: files over MAX_IMAGE_BYTES are not read, images
# over MAX_PIXELS not decoded, and big images are reduced toward the target size while still
# 8-bit (JPEG: decoded at 1/2-1/8 scale), before any float conversion.
MAX_PIXELS = 40_000_000  # 24 MP camera photos pass; Pillow's own bomb limit is 89 M
MAX_IMAGE_BYTES = 64 << 20
# a class-name or class-index JSON file: ImageNet-21k's 21,841 classes take about 2 MiB
MAX_JSON_BYTES = 32 << 20
DECODERS = (
    "JPEG",
    "PNG",
    "WEBP",
    "GIF",
    "BMP",
)  # content is sniffed, but only these formats decode
_READ_AHEAD = 16  # images in flight from remote stores
_REMOTE_READERS = 8  # threads reading a remote store
T = TypeVar("T")
R = TypeVar("R")


class DataError(ValueError):
    """The data set cannot be listed or is malformed; the message names the URL."""


class ImageReadError(DataError):
    """One image cannot be read or decoded (it is skipped); `.url` and `.reason` say which and why."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"cannot read image {url}: {reason}")
        self.url = url
        self.reason = reason


class EmptyClassError(DataError):
    """A class has no (readable) image; the message names the class."""


class DataAccessError(StoreAccessError):
    """The data URL refuses these credentials; the message names the URL, never the credentials."""


@dataclass(frozen=True)
class ClassInfo:
    """One class: label index, directory id, display name, URL-safe slug, synonyms (name first)."""

    index: int
    id: str
    name: str
    slug: str
    synonyms: tuple[str, ...] = ()


def class_keys(classes: Iterable[Any]) -> dict[str, Any]:
    """{key: class} for every way a person names a class: its id, name, slug or label index
    (the first class to claim a key keeps it)."""
    keys: dict[str, Any] = {}
    for c in classes:
        for key in (c.id, c.name, c.slug, str(c.index)):
            keys.setdefault(key, c)
    return keys


@dataclass
class ReadStats:
    """Counts of a read pass: images decoded, and (url, reason) for every skipped one."""

    read: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def require(self, what: str) -> None:
        """Raise EmptyClassError naming `what` when nothing was read (call after the pass)."""
        if self.read == 0:
            reason = (
                f"; {len(self.skipped)} unreadable, e.g. {self.skipped[0][1]}"
                if self.skipped
                else ""
            )
            raise EmptyClassError(f"class {what} has no readable image{reason}")


# ---- listing ---------------------------------------------------------------------------------


def _io(op: Any, url: str, action: str, storage_options: dict[str, Any] | None) -> Any:
    """A storage call on the data set: retried while unreachable, DataAccessError when refused."""
    return call(op, url, action, storage_options, access_error=DataAccessError)


def _entries(url: str, storage_options: dict[str, Any] | None) -> list[dict[str, Any]]:
    fs, path = filesystem(url, storage_options)
    try:
        return _io(lambda: fs.ls(path, detail=True), url, "listing", storage_options)
    except FileNotFoundError:
        raise DataError(f"data URL not found: {url}") from None


def _read_json(url: str, what: str, storage_options: dict[str, Any] | None) -> Any:
    """A JSON file of the data set (`what`: "class-name file", ...); DataError naming it otherwise."""
    try:
        return json.loads(
            _io(
                lambda: read_bounded(url, storage_options, MAX_JSON_BYTES),
                url,
                "reading",
                storage_options,
            )
        )
    except FileNotFoundError:
        raise DataError(f"{what} not found: {url}") from None
    except ReadRefused as err:
        raise DataError(f"refusing {what}: {err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{what} {url} is not valid JSON: {err}") from None


def read_class_names(
    url: str, storage_options: dict[str, Any] | None = None
) -> dict[str, list[str]]:
    """Class-name map from JSON {dir: name | [name, synonym, ...]}; "a, b" strings split on commas.
    Names lose Unicode format and control characters (`plain_text`): a bidi override would reverse
    the page around a name."""
    raw = _read_json(url, "class-name file", storage_options)
    if not isinstance(raw, dict):
        raise DataError(f"class-name file {url} must map class dirs to names")
    out: dict[str, list[str]] = {}
    for key, value in raw.items():
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise DataError(
                f"class-name file {url}: entry {key!r} must be a name or a list of names"
            )
        parts = [p.strip() for n in names for p in plain_text(n).split(",") if p.strip()]
        out[str(key)] = list(dict.fromkeys(parts)) or [plain_text(str(key)) or f"class {key!r}"]
    return out


@dataclass(frozen=True)
class ClassIndex:
    """A class-index file: label index of each class dir, and names it may carry (Keras format)."""

    index: dict[str, int]
    names: dict[str, list[str]] = field(default_factory=dict)
    url: str = ""


def _index_entry(key: str, value: Any, url: str) -> tuple[str, int, list[str]]:
    if isinstance(value, bool) or not isinstance(value, int | list):
        raise DataError(f"class-index file {url}: entry {key!r} must be a label index")
    if isinstance(value, int):
        return key, value, []
    # Keras' imagenet_class_index.json: {"0": ["n01440764", "tench"], ...}
    if not (key.isdigit() and value and all(isinstance(v, str) for v in value)):
        raise DataError(
            f"class-index file {url}: entry {key!r} must be an index or [class_dir, name]"
        )
    shown = [
        " ".join(plain_text(v).replace("_", " ").split()) for v in value[1:]
    ]  # "great_white_shark"
    return value[0], int(key), [v for v in shown if v]


def read_class_index(url: str, storage_options: dict[str, Any] | None = None) -> ClassIndex:
    """Class dir -> label index from JSON: {dir: index}, [dir, ...] in label order, or Keras'
    {"<index>": [dir, name]}. Indices must be non-negative and unique."""
    raw = _read_json(url, "class-index file", storage_options)
    if isinstance(raw, list):
        if not all(isinstance(d, str) and d for d in raw):
            raise DataError(f"class-index file {url}: a list must hold class dir names")
        entries = [(d, i, []) for i, d in enumerate(raw)]
    elif isinstance(raw, dict):
        entries = [_index_entry(str(k), v, url) for k, v in raw.items()]
    else:
        raise DataError(f"class-index file {url} must map class dirs to label indices")
    index: dict[str, int] = {}
    names: dict[str, list[str]] = {}
    for d, i, extra in entries:
        if i < 0:
            raise DataError(f"class-index file {url}: {d!r} has a negative label index {i}")
        if d in index:
            raise DataError(f"class-index file {url}: class dir {d!r} appears twice")
        index[d] = i
        if extra:
            names[d] = extra
    dup = sorted(i for i, n in Counter(index.values()).items() if n > 1)
    if dup:
        raise DataError(f"class-index file {url}: label indices used twice: {dup[:10]}")
    return ClassIndex(index, names, url)


def _class_dirs(url: str, storage_options: dict[str, Any] | None) -> list[str]:
    dirs = sorted(
        posixpath.basename(e["name"].rstrip("/"))
        for e in _entries(url, storage_options)
        if e.get("type") == "directory"
    )
    return [d for d in dirs if d and not d.startswith((".", "_"))]


def list_classes(
    url: str,
    storage_options: dict[str, Any] | None = None,
    class_names: str | None = None,
    class_index: str | ClassIndex | None = None,
) -> list[ClassInfo]:
    """Class dirs under `url` ('.'/'_'-prefixed dirs skipped), in label order.

    Label index: the dir's sorted position, or its entry in `class_index` (a file URL or a
    ClassIndex); with a class index every dir must be listed in it (DataError otherwise).
    """
    dirs = _class_dirs(url, storage_options)
    mapping = (
        read_class_index(class_index, storage_options)
        if isinstance(class_index, str)
        else class_index
    )
    if mapping is None:
        labels = {d: i for i, d in enumerate(dirs)}
    else:
        missing = [d for d in dirs if d not in mapping.index]
        if missing:
            shown = ", ".join(map(repr, missing[:5])) + (", ..." if len(missing) > 5 else "")
            raise DataError(
                f"{len(missing)} class folders under {url} have no label index in "
                f"{mapping.url or 'the class index'}: {shown}"
            )
        labels = {d: mapping.index[d] for d in dirs}
    names = read_class_names(class_names, storage_options) if class_names else {}
    if mapping is not None:
        names = {**mapping.names, **names}
    infos = []
    for d in sorted(dirs, key=lambda d: labels[d]):
        i = labels[d]
        syn = names.get(d) or [plain_text(d) or f"class {i}"]  # a folder name is shown too
        infos.append((i, d, syn[0], class_slug(d, syn[0], i), tuple(syn)))
    slugs = unique_slugs([slug for _, _, _, slug, _ in infos])
    return [ClassInfo(i, d, n, s, syn) for (i, d, n, _, syn), s in zip(infos, slugs, strict=True)]


def list_images(
    url: str, cls: ClassInfo | str, storage_options: dict[str, Any] | None = None
) -> list[str]:
    """Sorted URLs of a class's images (recursive; extensions case-insensitive; hidden files skipped)."""
    class_url = join_url(normalize_url(url), cls.id if isinstance(cls, ClassInfo) else cls)
    fs, path = filesystem(class_url, storage_options)
    try:
        found = _io(lambda: fs.find(path), class_url, "listing", storage_options)
    except FileNotFoundError:
        return []
    keep = [
        p
        for p in found
        if p.lower().endswith(IMAGE_EXTENSIONS) and not posixpath.basename(p).startswith(".")
    ]
    return sorted(fs.unstrip_protocol(p) for p in keep)


def require_images(cls: ClassInfo, urls: Sequence[str]) -> Sequence[str]:
    """The class's image URLs, or EmptyClassError naming the class when there are none."""
    if not urls:
        raise EmptyClassError(f"class {cls.name!r} ({cls.id}) has no images")
    return urls


def _sample_key(url: str, seed: int) -> tuple[str, str]:
    tail = "/".join(url.rstrip("/").split("/")[-2:])  # class dir + file: same sample on any store
    return hashlib.sha256(f"{seed}:{tail}".encode()).hexdigest(), url


def sample_images(urls: Iterable[str], n: int, seed: int = 0) -> list[str]:
    """n URLs chosen by a seeded hash of class/file name: independent of listing order and store,
    stable when images are added; returned sorted."""
    unique = sorted(set(urls))
    if len(unique) <= n:
        return unique
    return sorted(sorted(unique, key=lambda u: _sample_key(u, seed))[:n])


# ---- decoding --------------------------------------------------------------------------------


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


def _fetch(url: str, storage_options: dict[str, Any] | None) -> bytes:
    fs, path = filesystem(url, storage_options)
    return _cat(fs, path, url, storage_options)


def _capped_read(fs: Any, path: str) -> bytes:
    """At most MAX_IMAGE_BYTES + 1 bytes of a file, in one ranged read (no size lookup); a local
    device or FIFO is refused (ReadRefused) before it is opened for a blocking read."""
    if isinstance(fs, LocalFileSystem):
        with open_regular(fs, path, path) as f:
            return f.read(MAX_IMAGE_BYTES + 1)
    try:
        return fs.cat_file(path, start=0, end=MAX_IMAGE_BYTES + 1)
    except OSError as err:
        if "range" in str(err).lower() and "satisfiable" in str(err).lower():
            return b""  # S3 answers 416 to any range of an empty object
        raise


def _cat(fs: Any, path: str, url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The file's bytes, at most MAX_IMAGE_BYTES + 1 of them."""
    try:
        return _io(lambda: _capped_read(fs, path), url, "reading", storage_options)
    except FileNotFoundError:
        raise ImageReadError(url, "file not found") from None
    except IsADirectoryError:
        raise ImageReadError(url, "is a directory") from None
    except ReadRefused as err:
        raise ImageReadError(url, str(err).removeprefix(f"{path} ")) from None


def read_image(
    url: str, storage_options: dict[str, Any] | None = None, size: int | None = None
) -> torch.Tensor:
    """One image as a float tensor (3, size, size) in [0, 1] (original size when size is None)."""
    image = decode_image(_fetch(url, storage_options), url, size)
    return image if size is None else resize_square(image, size)


def _reader(
    urls: Sequence[str], storage_options: dict[str, Any] | None
) -> tuple[Any, Callable[[str], bytes | ImageReadError]]:
    """(filesystem of the first URL, get): get(url) is the file's bytes or its ImageReadError
    (access errors and an unreachable store raise)."""
    fs, _ = filesystem(urls[0], storage_options)

    def get(url: str) -> bytes | ImageReadError:
        try:
            return _cat(fs, fs._strip_protocol(url), url, storage_options)
        except ImageReadError as err:
            return err

    return fs, get


def _is_local(fs: Any) -> bool:
    return "file" in fs.protocol


def _in_order(
    fn: Callable[[T], R], items: Iterable[T], ahead: int, workers: int
) -> Iterator[tuple[T, R]]:
    """(item, fn(item)) in the order of `items`, fn running on a thread pool of `workers` threads.

    At most `ahead` items are submitted and not yet yielded (memory stays bounded whatever the
    number of items); an exception of fn raises here at its item's position, as a plain loop would.
    Closing the generator early cancels what has not started and does not wait for the rest.
    """
    ahead, workers = max(1, ahead), max(1, min(workers, ahead))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lens-read")
    pending: deque[tuple[T, Future[R]]] = deque()
    finished = False
    try:
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= ahead:
                first, future = pending.popleft()
                yield first, future.result()
        while pending:
            first, future = pending.popleft()
            yield first, future.result()
        finished = True
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=finished, cancel_futures=True)


def _decoded(data: bytes | ImageReadError, url: str, size: int) -> torch.Tensor | ImageReadError:
    """The (3, size, size) image of a file's bytes, or why it is unreadable."""
    if isinstance(data, ImageReadError):
        return data
    try:
        return resize_square(decode_image(data, url, size), size)
    except ImageReadError as err:
        return err


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def decode_workers() -> int:
    """Decoder threads for local files: half the CPUs this process may use (the rest run the
    model on CPU), at least 1 and at most 8."""
    return max(1, min(8, available_cpus() // 2))


def _images(
    urls: Sequence[str],
    storage_options: dict[str, Any] | None,
    size: int,
    prefetch: int,
    workers: int | None,
) -> Iterator[tuple[str, torch.Tensor | ImageReadError]]:
    """(url, image or read error) in order (see iter_images for prefetch and workers). Without
    prefetch, a remote store is still read _READ_AHEAD files at a time (its latency overlaps) and
    decoded here; local files are read and decoded here, one by one."""
    if not urls:
        return
    fs, get = _reader(urls, storage_options)
    local = _is_local(fs)
    if prefetch > 0:
        ahead = prefetch if local else max(prefetch, _READ_AHEAD)
        if workers is None:
            workers = decode_workers() if local else _REMOTE_READERS
        yield from _in_order(lambda url: _decoded(get(url), url, size), urls, ahead, workers)
    elif local:
        yield from ((url, _decoded(get(url), url, size)) for url in urls)
    else:
        yield from (
            (url, _decoded(data, url, size))
            for url, data in _in_order(get, urls, _READ_AHEAD, _REMOTE_READERS)
        )


def iter_images(
    urls: Sequence[str],
    storage_options: dict[str, Any] | None,
    size: int,
    stats: ReadStats,
    *,
    prefetch: int = 0,
    workers: int | None = None,
) -> Iterator[tuple[int, str, torch.Tensor]]:
    """Yield (position in urls, url, (3,size,size) tensor), skipping unreadable images into `stats`.

    Access errors (wrong credentials) are raised, not skipped. Call stats.require(name) after the
    pass to turn "nothing readable" into EmptyClassError.

    prefetch > 0: a pool of `workers` threads (default: `decode_workers()` for local files, 8 for
    remote stores) reads, decodes and resizes up to `prefetch` images ahead while the caller works
    on the current ones (Pillow and torch release the GIL). The images, their order, the skipped
    list and the errors raised are exactly those of the sequential pass (prefetch=0).
    """
    results = _images(list(urls), storage_options, size, prefetch, workers)
    try:
        for pos, (url, image) in enumerate(results):
            if isinstance(image, ImageReadError):
                log.warning("skipping unreadable image %s: %s", url, image.reason)
                stats.skipped.append((url, image.reason))
                continue
            stats.read += 1
            yield pos, url, image
    finally:
        results.close()  # closing this pass early stops its readers now, not at garbage collection


# ---- patches ---------------------------------------------------------------------------------


def patch_boxes(image_size: int, fraction: float, grid: int) -> np.ndarray:
    """int64 (grid*grid, 4) boxes [x0, y0, x1, y1], row-major, of side round(fraction*image_size).

    Stride is CRAFT's int(0.8 * side) (224 px, 64 px patches: 0, 51, 102, 153), shrunk when the
    grid would not fit in the image; a 1x1 grid is centred.
    """
    side = int(round(fraction * image_size))
    if not 1 <= side <= image_size or grid < 1:
        raise ValueError(f"invalid patches: side {side} px of a {image_size} px image, grid {grid}")
    if grid == 1:
        starts = np.array([(image_size - side) // 2])
    else:
        stride = min(max(1, int(side * 0.8)), (image_size - side) // (grid - 1))
        if stride < 1:
            raise ValueError(
                f"a {grid}x{grid} grid of {side} px patches does not fit {image_size} px"
            )
        starts = np.arange(grid) * stride
    ys, xs = np.meshgrid(starts, starts, indexing="ij")
    x0, y0 = xs.ravel(), ys.ravel()
    return np.stack([x0, y0, x0 + side, y0 + side], axis=1).astype(np.int64)


def extract_patches(
    images: torch.Tensor, boxes: np.ndarray | torch.Tensor, out_size: int
) -> torch.Tensor:
    """(N,3,S,S) images, (P,4) boxes -> (N*P,3,out,out) crops resized (bilinear, antialiased),
    image-major; vectorised per distinct box size (one size for patch_boxes)."""
    b = torch.as_tensor(np.asarray(boxes), dtype=torch.long).cpu()
    n, c = images.shape[:2]
    out = images.new_empty((n, len(b), c, out_size, out_size))
    widths, heights = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    for w, h in sorted({(int(w), int(h)) for w, h in zip(widths, heights, strict=True)}):
        sel = torch.nonzero((widths == w) & (heights == h)).flatten()
        rows = (b[sel, 1, None] + torch.arange(h)).to(images.device)  # (p, h)
        cols = (b[sel, 0, None] + torch.arange(w)).to(images.device)  # (p, w)
        crops = images[:, :, rows[:, :, None], cols[:, None, :]]  # (N, C, p, h, w)
        crops = crops.permute(0, 2, 1, 3, 4).reshape(n * len(sel), c, h, w)
        resized = F.interpolate(
            crops, size=(out_size, out_size), mode="bilinear", align_corners=False, antialias=True
        )
        out[:, sel.to(images.device)] = resized.reshape(n, len(sel), c, out_size, out_size)
    return out.reshape(n * len(b), c, out_size, out_size)
