"""Files that are never half-written, and read back checked: atomic writes, JSON, checksummed tensors.

Every artifact usae writes goes through here. A file a reader may open is written to a temporary
name, flushed, fsynced and renamed over its final name (:func:`write_atomic`); files inside a
directory that is itself renamed into place once complete only need to be durable
(:func:`write_durable`, :func:`publish_dir`). safetensors files record a sha256 of their tensors in
their own header (``usae_sha256``) and :func:`load_tensors` checks it, so a flipped bit is an
error naming the file. Nothing here unpickles. See docs/format.md and docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from usae.errors import UsaeError

CHECKSUM_KEY = "usae_sha256"


def one_line(e: object) -> str:
    """An exception or text squeezed onto one line of at most 200 characters (for error messages)."""
    text = " ".join(str(e).split())[:200]
    return text or e.__class__.__name__


def fsync_path(path: Path) -> None:
    """Make a file's contents or a directory's entries (new files, renames) durable.

    A no-op where the platform or file system does not support it.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_durable(path: Path, write: Callable[[IO[Any]], None], mode: str = "w") -> None:
    """Write ``path`` in place with ``write(f)``, then flush and fsync it. OSError propagates.

    For files inside a directory that is renamed into place only once complete (a store's shards,
    a checkpoint's files): there nothing reads the file before the rename.
    """
    with open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, write: Callable[[IO[Any]], None], mode: str = "w") -> None:
    """Write ``path`` via a temporary file, fsync and rename: readers see the old file or the new one.

    A failed write (disk full, read-only, ...) removes the temporary file and raises a one-line
    UsaeError; the previous ``path`` (if any) is untouched.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write_durable(tmp, write, mode)
        tmp.replace(path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UsaeError(f"{path}: could not write ({e.strerror or e}); the previous file is unchanged") from None


def write_json_atomic(path: Path, data: Any, indent: int = 2) -> None:
    """JSON to ``path`` with :func:`write_atomic` (never half-written)."""
    write_atomic(path, lambda f: f.write(json.dumps(data, indent=indent) + "\n"))


def write_text_atomic(path: Path, text: str) -> None:
    """Text to ``path`` with :func:`write_atomic` (never half-written)."""
    write_atomic(path, lambda f: f.write(text))


def save_npy(path: Path, a: np.ndarray) -> None:
    """An array as a durable ``.npy`` file (no pickled objects)."""
    write_durable(path, lambda f: np.save(f, a, allow_pickle=False), "wb")


def publish_dir(tmp_dir: Path, final: Path) -> None:
    """Rename a completed directory into place (replacing an earlier ``final`` file or empty dir), durably."""
    fsync_path(tmp_dir)
    os.replace(tmp_dir, final)
    fsync_path(final.parent)


def read_json(path: Path, what: str) -> Any:
    """Read a JSON file; a missing or malformed file is a one-line UsaeError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UsaeError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, a 5000-digit int, deep nesting
        raise UsaeError(f"{path}: {what} is not valid JSON ({e.__class__.__name__}: {str(e)[:200]})") from None
    except OSError as e:
        raise UsaeError(f"{path}: {what} could not be read ({e.strerror or e})") from None


# -- checksummed tensors ---------------------------------------------------------------------------
def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of every tensor, in name order.

    Independent of the safetensors byte layout, so it can be stored inside the file's own header.
    """
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        digest.update(f"{key}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """safetensors file (with a content checksum) written to ``path.tmp``, fsynced, renamed over ``path``.

    A failed write (disk full, ...) removes the temporary file and raises a one-line UsaeError;
    the previous ``path`` is untouched.
    """
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {**(metadata or {}), CHECKSUM_KEY: tensors_sha256(tensors)}
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        _sort_metadata_in_place(tmp)
        fsync_path(tmp)
        tmp.replace(path)
    except (OSError, SafetensorError) as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        msg = getattr(e, "strerror", None) or one_line(e)
        raise UsaeError(f"{path}: could not write ({msg}); the previous file is unchanged") from None


def _sort_metadata_in_place(path: Path) -> None:
    """Rewrite the header's ``__metadata__`` in key order (same length, same offsets).

    safetensors writes metadata in hash-map order, which changes from process to process; sorted,
    the same tensors always give the same bytes (a finished run resumed is byte-for-byte a no-op).
    """
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        if len(header.get("__metadata__") or {}) < 2:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(new) <= n:  # always equal in practice; the padding keeps the data offset
            f.seek(8)
            f.write(new.ljust(n, b" "))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, checking its checksum when it has one.

    A missing, truncated, altered or foreign file is a one-line UsaeError naming it.
    """
    if not path.is_file():
        raise UsaeError(f"{path}: file not found")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError, MemoryError) as e:
        raise UsaeError(f"{path}: not a readable safetensors file ({one_line(e)})") from None
    recorded = safetensors_metadata(path).get(CHECKSUM_KEY)
    if recorded is not None and recorded != tensors_sha256(tensors):
        raise UsaeError(f"{path}: contents changed since writing (sha256 mismatch); the file is damaged")
    return tensors


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (one-line UsaeError if unreadable)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UsaeError(f"{path}: not a readable safetensors file ({one_line(e)})") from None
