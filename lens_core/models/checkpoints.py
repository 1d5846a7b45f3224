"""Checkpoints read safely from a local path or any fsspec URL: weights_only / safetensors, no
compressed archive entries, bounded by the architecture's size, digested, and checked key by key
against the architecture before any work.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lens_core.models.errors import CheckpointError
from lens_core.store import StoreAccessError, call, filesystem
from lens_core.store.fs import NotRegularFile, TooLarge, iter_bounded, open_regular

# a checkpoint may hold the weights plus optimizer moments (Adam: 2 more copies) and a little more
CHECKPOINT_SIZE_FACTOR = 3.5
CHECKPOINT_SIZE_MARGIN = 64 << 20
# the most bytes read or hashed of any checkpoint before its architecture is known (the digest):
# 4x the largest torchvision weights (vit_h_14, 2.5 GB) with room; a device never ends
MAX_CHECKPOINT_BYTES = 16 << 30
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile
_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "net")
_SHOW = 10


@contextmanager
def _reading(url: str) -> Iterator[None]:
    """Turn storage errors into a CheckpointError naming the URL (never the credentials).

    An unreachable store is retried first (lens_core.store.call) and then raises StoreError.
    """
    try:
        yield
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {url}") from None
    except NotRegularFile as err:
        raise CheckpointError(f"refusing checkpoint: {err}") from None
    except StoreAccessError:
        raise CheckpointError(
            f"access denied reading checkpoint {url} (check credentials)"
        ) from None
    except PermissionError as err:
        raise CheckpointError(
            f"access denied reading checkpoint {url} (check credentials): {err}"
        ) from None
    except (IsADirectoryError, NotADirectoryError) as err:
        raise CheckpointError(f"checkpoint {url} is not a file ({type(err).__name__})") from None
    except OSError as err:
        raise CheckpointError(
            f"cannot read checkpoint {url}: {type(err).__name__}: {err}"
        ) from None


def _too_large(url: str, size: str, limit: int | None) -> CheckpointError:
    if limit is None:
        return CheckpointError(
            f"refusing checkpoint {url}: {size} is more than any checkpoint LENS reads "
            f"({MAX_CHECKPOINT_BYTES >> 30} GiB)"
        )
    return CheckpointError(
        f"refusing checkpoint {url}: {size} is more than this architecture's weights can fill "
        f"({limit / 2**20:.1f} MiB with optimizer state); is it for another model?"
    )


def _read_bytes(
    url: str, storage_options: dict[str, Any] | None, limit: int | None = None
) -> bytes:
    """The checkpoint's bytes. CheckpointError for what is not a regular file (a device never ends)
    and for more than `limit` bytes (MAX_CHECKPOINT_BYTES without one): before reading when the
    reported size says so, and counted while reading, since a device reports 0."""
    cap = MAX_CHECKPOINT_BYTES if limit is None else min(limit, MAX_CHECKPOINT_BYTES)
    with _reading(url):
        fs, path = filesystem(url, storage_options)
        size = call(lambda: fs.size(path), url, "reading checkpoint", storage_options)
        if size is not None and size > cap:
            raise _too_large(url, f"{size / 2**20:.1f} MiB", limit)

        def read() -> bytes:
            with open_regular(fs, path, url) as f:
                return b"".join(iter_bounded(f, cap, url))

        try:
            return call(read, url, "reading checkpoint", storage_options)
        except TooLarge:
            raise _too_large(url, f"more than {cap / 2**20:.1f} MiB", limit) from None


def expected_bytes(model: nn.Module) -> int:
    """Bytes of a model's state dict: what a plain checkpoint of it holds."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def checkpoint_limit(model: nn.Module) -> int:
    """The most bytes a checkpoint of `model` may hold, unpacked (weights + optimizer + margin)."""
    return int(CHECKPOINT_SIZE_FACTOR * expected_bytes(model)) + CHECKPOINT_SIZE_MARGIN


def check_archive(data: bytes, url: str, limit: int) -> None:
    """Refuse a torch zip archive with compressed entries or more than `limit` unpacked bytes.

    torch.save writes stored (uncompressed) entries; a DEFLATE-recompressed 256 KiB file can
    unpack to gigabytes inside torch.load, before any architecture check.
    """
    if not data.startswith(b"PK"):
        return  # safetensors or torch's legacy format: never larger than the bytes read
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError) as err:
        raise CheckpointError(f"truncated or corrupt checkpoint {url}: {err}") from None
    packed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise CheckpointError(
            f"refusing checkpoint {url}: {len(packed)} compressed entries (e.g. {packed[0]}); "
            "torch.save writes uncompressed archives, re-save it with torch.save or as .safetensors"
        )
    total = sum(e.file_size for e in entries)
    if total > limit:
        raise CheckpointError(
            f"refusing checkpoint {url}: it unpacks to {total / 2**20:.1f} MiB, more "
            f"than this architecture can fill ({limit / 2**20:.1f} MiB)"
        )


def checkpoint_digest(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """sha256 hex of the checkpoint's bytes (the run id depends on it), streamed in 8 MiB blocks;
    a device or FIFO is refused and at most MAX_CHECKPOINT_BYTES are hashed (CheckpointError)."""

    def stream() -> str:
        digest = hashlib.sha256()
        with open_regular(fs, path, url) as f:
            for block in iter_bounded(f, MAX_CHECKPOINT_BYTES, url):
                digest.update(block)
        return digest.hexdigest()

    with _reading(url):
        fs, path = filesystem(url, storage_options)
        try:
            return call(stream, url, "reading checkpoint", storage_options)
        except TooLarge:
            raise _too_large(
                url, f"more than {MAX_CHECKPOINT_BYTES / 2**20:.1f} MiB", None
            ) from None


def _is_safetensors(data: bytes, url: str) -> bool:
    """By suffix, or by content: an 8-byte little-endian header length, then a JSON header."""
    if url.lower().endswith(".safetensors"):
        return True
    return len(data) > 9 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") < len(data)


def _unpickle(data: bytes, url: str) -> Any:
    """torch.load with weights_only=True; every failure becomes a one-line CheckpointError."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Weights only load failed" in text:
            found = re.search(r"GLOBAL ([\w.]+)", text)
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"refusing checkpoint {url}: it contains pickled code or objects{what}, not only "
                "tensors; re-save it as a plain state dict or .safetensors"
            ) from None
        raise CheckpointError(f"corrupt checkpoint {url}: {text[:200]}") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, ValueError, KeyError, OSError) as err:
        raise CheckpointError(
            f"truncated or corrupt checkpoint {url} ({len(data)} bytes): {type(err).__name__}: "
            f"{str(err).split('.')[0][:200]}"
        ) from None


def parse_state_dict(
    data: bytes, url: str = "<bytes>", limit: int | None = None
) -> dict[str, torch.Tensor]:
    """Tensors by parameter name from checkpoint bytes (.pt/.pth or .safetensors, nested or not);
    zip archives are checked first (`check_archive`) when `limit` is given."""
    if limit is not None:
        check_archive(data, url, limit)
    if _is_safetensors(data, url):
        from safetensors.torch import load as load_safetensors

        try:
            obj: Any = load_safetensors(data)
        except Exception as err:  # safetensors raises its own SafetensorError
            raise CheckpointError(
                f"truncated or corrupt safetensors checkpoint {url}: {err}"
            ) from None
    else:
        obj = _unpickle(data, url)
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        nested = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        obj = nested
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {url} holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {url} has non-tensor entries: {_listing(bad)}")
    return {_strip(str(k)): v for k, v in obj.items()}


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return f"{len(items)} ({shown}{', ...' if len(items) > _SHOW else ''})"


def check_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], url: str, arch: str
) -> None:
    """Raise CheckpointError naming missing/unexpected keys and shape mismatches (a few of each)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        return
    parts = [f"checkpoint {url} does not match architecture {arch!r}"]
    if missing:
        parts.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_listing(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches: {_listing(shapes)}")
    raise CheckpointError("; ".join(parts))
