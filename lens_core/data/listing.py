"""Classes and their images in an image-folder layout: class dirs and their label indices
(class-index and class-name files), each class's image URLs, and their seeded sample."""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lens_core.data.errors import DataError, EmptyClassError, data_call
from lens_core.naming import class_slug, plain_text, unique_slugs
from lens_core.store import filesystem, join_url, normalize_url
from lens_core.store.fs import ReadRefused, read_bounded

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# a class-name or class-index JSON file: ImageNet-21k's 21,841 classes take about 2 MiB
MAX_JSON_BYTES = 32 << 20


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


def _entries(url: str, storage_options: dict[str, Any] | None) -> list[dict[str, Any]]:
    fs, path = filesystem(url, storage_options)
    try:
        return data_call(lambda: fs.ls(path, detail=True), url, "listing", storage_options)
    except FileNotFoundError:
        raise DataError(f"data URL not found: {url}") from None


def _read_json(url: str, what: str, storage_options: dict[str, Any] | None) -> Any:
    """A JSON file of the data set (`what`: "class-name file", ...); DataError naming it
    otherwise."""
    try:
        return json.loads(
            data_call(
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
    """Sorted URLs of a class's images (recursive; extensions case-insensitive; hidden files
    skipped)."""
    class_url = join_url(normalize_url(url), cls.id if isinstance(cls, ClassInfo) else cls)
    fs, path = filesystem(class_url, storage_options)
    try:
        found = data_call(lambda: fs.find(path), class_url, "listing", storage_options)
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
