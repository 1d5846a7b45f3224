"""Classes and images from an image-folder layout at any fsspec URL, safe decoding, CRAFT patches.

Layout: ``<root>/<class dir>/**/*.jpg|jpeg|png|webp``. Label index = position of the class dir in
sorted order (torchvision ImageFolder), unless a class-index file maps dirs to the model's label
indices (`read_class_index`): a folder holding part of a model's label set, or one whose names do
not sort in training order, needs one. Unreadable images are skipped and reported, never fatal.
Only plain raster decoders run (`DECODERS`): a file of another format (TIFF, EPS, ...) under an
image name is refused, not handed to a complex or external decoder. Storage I/O is retried while
the store is unreachable (lens_core.store.call); a refused credential raises DataAccessError.

The public API of the package; each name lives in the module of its part: `listing` (classes,
class-index and class-name files, image URLs, sampling), `decode` (safe decoding, its limits,
the square resize), `reader` (bounded reads, the prefetching pass), `patches` (CRAFT's boxes and
crops), `errors`. Patch a name where it lives, not here.
"""

from lens_core.data.decode import (
    DECODERS,
    MAX_IMAGE_BYTES,
    MAX_PIXELS,
    decode_image,
    resize_square,
)
from lens_core.data.errors import DataAccessError, DataError, EmptyClassError, ImageReadError
from lens_core.data.listing import (
    IMAGE_EXTENSIONS,
    MAX_JSON_BYTES,
    ClassIndex,
    ClassInfo,
    class_keys,
    list_classes,
    list_images,
    read_class_index,
    read_class_names,
    require_images,
    sample_images,
)
from lens_core.data.patches import extract_patches, patch_boxes
from lens_core.data.reader import (
    ReadStats,
    available_cpus,
    decode_workers,
    iter_images,
    read_image,
)

__all__ = [
    "DECODERS",
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_BYTES",
    "MAX_JSON_BYTES",
    "MAX_PIXELS",
    "ClassIndex",
    "ClassInfo",
    "DataAccessError",
    "DataError",
    "EmptyClassError",
    "ImageReadError",
    "ReadStats",
    "available_cpus",
    "class_keys",
    "decode_image",
    "decode_workers",
    "extract_patches",
    "iter_images",
    "list_classes",
    "list_images",
    "patch_boxes",
    "read_class_index",
    "read_class_names",
    "read_image",
    "require_images",
    "resize_square",
    "sample_images",
]
