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
import errno
import hashlib
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from usae._input import (  # noqa: F401  (re-exported: the reading half of the file helpers)
    FILE_KINDS,
    USER_TEXT_MAX_BYTES,
    decode_user_text,
    one_line,
    read_json,
    read_user_csv,
    read_user_text,
    regular_file,
)
from usae.errors import UsaeError

CHECKSUM_KEY = "usae_sha256"


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


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Save a matplotlib figure as PNG through :func:`write_atomic` (every figure goes here)."""
    write_atomic(Path(path), lambda f: fig.savefig(f, format="png", dpi=dpi), "wb")


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
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600; every other artifact follows the umask
        fsync_path(tmp)
        tmp.replace(path)
    except (OSError, SafetensorError) as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        msg = getattr(e, "strerror", None) or one_line(e)
        raise UsaeError(f"{path}: could not write ({msg}); the previous file is unchanged") from None


def _umask() -> int:
    """The process umask (read by setting it, then restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    regular_file(path)
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
    regular_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UsaeError(f"{path}: not a readable safetensors file ({one_line(e)})") from None


# -- where outputs may go ---------------------------------------------------------------------------
# A usae artifact is a directory whose marker file names its format: stores and codes in
# metadata.json, runs and pretrained exports in config.json.
LOCK_NAME = ".usae.lock"  # held by a directory's writer (dir_lock)
ARTIFACT_MARKERS = {"metadata.json": ("usae-store", "usae-codes"), "config.json": ("usae-run", "usae-pretrained")}


def artifact_format(path: Path) -> str | None:
    """The usae format a directory holds ('usae-store', 'usae-run', ...), or None when it holds none."""
    path = Path(path)
    for marker, formats in ARTIFACT_MARKERS.items():
        p = path / marker
        if not p.is_file():
            continue
        try:
            fmt = json.loads(p.read_text()).get("format")
        except (OSError, ValueError, AttributeError, RecursionError):
            continue
        if fmt in formats:
            return fmt
    return None


def _has_content(path: Path) -> bool:
    """True when a directory holds anything but what a killed writer leaves (its lock, ``*.tmp`` files)."""
    return any(p.name != LOCK_NAME and not p.name.endswith(".tmp") for p in path.iterdir())


def _inside(a: Path, b: Path) -> bool:
    """True when ``a`` is ``b`` or lies below it (both resolved)."""
    return a == b or b in a.parents


def check_output(
    out: str | Path,
    fmt: str | tuple[str, ...],
    *,
    overwrite: bool = False,
    reading: tuple[str | Path, ...] = (),
    replaces: bool = True,
    flag: str = "--out",
) -> Path:
    """Resolve ``out`` and refuse, before anything is written, an output that would escape or clobber.

    ``fmt``: the usae format(s) the command writes there ('usae-store', 'usae-run', ...); '' for
    plain outputs (a report, an explorer site), which may go into any directory that is not
    another artifact. One-line UsaeError when ``out``:
      - is a file-system root, or an existing file;
      - is or lies inside an input in ``reading`` (the store or run being read), or contains one
        when the command ``replaces`` the whole directory;
      - holds another usae artifact (a store, a run, ...), even with ``overwrite``; or holds one of
        ``fmt`` that the command ``replaces``, unless ``overwrite``;
      - is a non-empty directory that is not a usae artifact, unless ``overwrite`` — and even then
        when the command ``replaces`` the whole directory (--overwrite never deletes a foreign one).
    Leftovers of a killed writer (its lock file, ``*.tmp``) do not count as content. Returns the
    absolute path (symlinks resolved); only checks: the caller creates the directory.
    """
    formats = (fmt,) if isinstance(fmt, str) else tuple(fmt)
    given = Path(out)
    try:
        path = given.expanduser().resolve()
    except (OSError, RuntimeError) as e:
        raise UsaeError(f"{flag} {given}: not a usable path ({one_line(e)})") from None
    if path.parent == path:
        raise UsaeError(f"{flag} {given}: refusing to write into the file-system root; name a directory of its own")
    for src in reading:
        src_path = Path(src).expanduser().resolve()
        # Writing beside an input is fine; replacing a directory that holds one would delete it.
        if _inside(path, src_path) or (replaces and _inside(src_path, path)):
            what = "is" if path == src_path else ("lies inside" if _inside(path, src_path) else "contains")
            raise UsaeError(f"{flag} {given}: {what} the input {src}; write to a directory of its own")
    if path.exists() and not path.is_dir():
        raise UsaeError(f"{flag} {given}: exists and is not a directory")
    if not path.is_dir() or not _has_content(path):
        return path
    held = artifact_format(path)
    if held is not None:
        if held in formats and replaces and not overwrite:
            raise UsaeError(f"{flag} {given}: already exists as a {held} directory; pass --overwrite to replace it")
        if held in formats:
            return path  # written into (a run's reports, or the command's own resume rules)
        raise UsaeError(f"{flag} {given}: holds a {held} directory; pick another path")
    if "" in formats:
        return path
    kind = "a non-empty directory that is not a usae artifact"
    if not overwrite:
        raise UsaeError(f"{flag} {given}: is {kind}; pick another path (or pass --overwrite to write into it)")
    if replaces:
        want = " or ".join(formats)
        raise UsaeError(f"{flag} {given}: is {kind}; --overwrite only replaces a {want} directory, pick another path")
    return path


@contextlib.contextmanager
def output_dir(out: Path):
    """Create ``out`` (and parents) for a command; on failure remove what was created and is still empty.

    A failed command leaves no empty ``--out`` behind; a directory that existed before, or that
    holds anything, is never removed.
    """
    out = Path(out)
    created = []
    p = out
    while not p.exists():
        created.append(p)
        if p.parent == p:
            break
        p = p.parent
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield out
    except BaseException:
        for d in created:  # innermost first
            with contextlib.suppress(OSError):
                (d / LOCK_NAME).unlink(missing_ok=True)
                d.rmdir()  # only succeeds when empty
        raise


# -- one writer at a time ---------------------------------------------------------------------------
_HELD_LOCKS: set[Path] = set()  # lock files this process holds (a nested dir_lock on one is a no-op)


def sibling_lock(path: Path) -> Path:
    """The lock file for writing a directory that does not exist yet (a store): ``.NAME.usae.lock`` beside it."""
    path = Path(os.path.abspath(path))
    return path.with_name(f".{path.name}{LOCK_NAME}")


def _open_lock_file(lock_path: Path) -> int:
    """Open (or create) the lock file itself, never what a symbolic link in its place points to.

    Writing the holder's pid into a followed link would truncate the link's target (any file the
    user can write), and a dangling one would create a file outside the output: O_NOFOLLOW makes
    both fail (ELOOP), with O_CREAT too, and anything but a regular file is refused.
    """
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(lock_path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP or lock_path.is_symlink():
            raise UsaeError(
                f"{lock_path}: the lock file is a symbolic link; remove it (usae does not follow it)"
            ) from None
        raise UsaeError(f"{lock_path}: could not open the lock file ({e.strerror or e})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = FILE_KINDS.get(stat.S_IFMT(mode), "special file")
        raise UsaeError(f"{lock_path}: the lock file is a {kind}, not a regular file; remove it")
    return fd


@contextlib.contextmanager
def dir_lock(lock_path: Path, what: str):
    """Hold an advisory exclusive lock (``fcntl.flock``) on ``lock_path`` while the block runs.

    For writers only (a run directory being trained, a store being written); readers never take
    it. The lock dies with its process, so a killed writer never blocks the next one (its lock
    file stays behind, unlocked). A second writer gets a one-line UsaeError naming the holder's
    pid and host. The file is removed on release; a waiter that locked the removed file notices
    (inode check) and locks the new one, so two writers never both hold it. Re-entrant within
    a process.
    """
    import fcntl
    import socket

    lock_path = Path(os.path.abspath(lock_path))
    if lock_path in _HELD_LOCKS:
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = _open_lock_file(lock_path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UsaeError(
                f"{what} is being written by {holder} (lock {lock_path}); wait for it to finish or pick another path"
            ) from None
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed this file as we locked it: lock the current one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        _HELD_LOCKS.add(lock_path)
        yield
    finally:
        _HELD_LOCKS.discard(lock_path)
        with contextlib.suppress(OSError):
            lock_path.unlink()
        os.close(fd)  # releases the lock
