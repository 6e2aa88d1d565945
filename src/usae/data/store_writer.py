"""Writing a paired activation store: ``StoreWriter`` streams rows, ``write_store`` writes arrays.

A writer fills a sibling ``STORE.partial/`` and renames it to ``STORE`` only after every shard and
``metadata.json`` are fsynced, so any store that is visible under its final name is complete.
Statistics and the content hash are accumulated while writing; nothing is read back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from usae._io import dir_lock, fsync_path, one_line, save_npy, sibling_lock, write_durable
from usae._version import __version__
from usae.data.store_format import (
    DTYPES,
    FORMAT,
    METADATA_NAME,
    PARTIAL_SUFFIX,
    POSITIONS_DTYPE,
    POSITIONS_NAME,
    SCHEMA_SUBSAMPLED,
    SCHEMA_VERSION,
    RunningStats,
    StoreDtype,
    check_layout,
    check_model,
    check_positions,
    content_hash,
    is_int,
    is_store_dir,
    shard_name,
)
from usae.errors import UsaeError

logger = logging.getLogger(__name__)


def _as_numpy(x: Any, name: str) -> np.ndarray:
    """numpy view of ``x``; torch tensors are accepted without importing torch here."""
    if hasattr(x, "detach"):
        t = x.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            t = t.float()
        x = t.numpy()
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise UsaeError(f"model {name!r}: activations must be real numbers, got dtype {x.dtype}")
    return x


def _check_writer_args(widths: Any, dtype: Any, rows_per_shard: Any, extra: Any) -> None:
    if not isinstance(widths, Mapping) or not widths:
        raise UsaeError(f"StoreWriter: widths must map model names to widths, got {widths!r}")
    seen: set[str] = set()
    for name, width in widths.items():
        check_model(name, width, "StoreWriter widths", seen)
    if dtype not in DTYPES:
        raise UsaeError(f"StoreWriter: dtype must be one of {DTYPES}, got {dtype!r}")
    if not is_int(rows_per_shard) or rows_per_shard < 1:
        raise UsaeError(f"StoreWriter: rows_per_shard must be a positive int, got {rows_per_shard!r}")
    try:
        json.dumps(extra if extra is not None else {})
    except (TypeError, ValueError) as e:
        raise UsaeError(f"StoreWriter: extra must be JSON-serialisable ({one_line(e)})") from None


class StoreWriter:
    """Streams paired activations into a new store at ``store_dir``.

    Rows go to ``<store_dir>.partial/`` (a stale one from a crashed writer is deleted); the
    final name appears only in :meth:`finalize`. With ``overwrite=True`` an existing store stays
    intact until the new one is complete. As a context manager it finalises on normal exit and,
    on an exception, leaves the partial directory and publishes nothing.

    ``positions`` makes a token-subsampled store (schema 2): an (images, tokens_per_image) int array,
    each row strictly increasing, giving the grid token (row-major) of each of an image's rows, so
    row ``j * tokens_per_image + k`` is token ``positions[j, k]`` of image ``j``; it needs
    ``image_ids``, ``grid`` and ``tokens_per_image < h * w``.
    """

    def __init__(
        self,
        store_dir: str | Path,
        widths: Mapping[str, int],
        *,
        dtype: StoreDtype = "float16",
        rows_per_shard: int = 65536,
        image_ids: list[str] | None = None,
        tokens_per_image: int | None = None,
        grid: tuple[int, int] | list[int] | None = None,
        extra: dict[str, Any] | None = None,
        overwrite: bool = False,
        positions: Any = None,
    ) -> None:
        _check_writer_args(widths, dtype, rows_per_shard, extra)
        subsampled = positions is not None
        check_layout(image_ids, tokens_per_image, grid, None, "StoreWriter", subsampled)
        if subsampled:
            positions = check_positions(positions, len(image_ids), tokens_per_image, grid, "StoreWriter")
        self.store_dir = Path(os.path.abspath(store_dir))
        self.partial_dir = self.store_dir.with_name(self.store_dir.name + PARTIAL_SUFFIX)
        self._check_target(overwrite)
        # One writer per store (released when finalised or failed; dies with the process).
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(dir_lock(sibling_lock(self.store_dir), f"store {self.store_dir}"))

        self._widths = {name: int(width) for name, width in widths.items()}
        self._dtype: str = dtype
        self._disk_dtype = np.dtype(dtype).newbyteorder("<")
        self._rows_per_shard = int(rows_per_shard)
        self._image_ids = list(image_ids) if image_ids is not None else None
        self._tokens_per_image = tokens_per_image
        self._grid = [int(g) for g in grid] if grid is not None else None
        self._positions = positions.astype(POSITIONS_DTYPE) if subsampled else None
        self._extra = dict(extra) if extra is not None else {}
        self._overwrite = overwrite
        self._n_rows = self._n_buffered = self._n_shards = 0
        self._buf = {n: np.empty((self._rows_per_shard, d), self._disk_dtype) for n, d in self._widths.items()}
        self._stats = {n: RunningStats(d) for n, d in self._widths.items()}
        self._model_sha = {n: hashlib.sha256() for n in self._widths}
        self._shard_sha: dict[str, list[str]] = {n: [] for n in self._widths}
        self._closed = False

        if self.partial_dir.exists():
            logger.warning("removing stale partial store %s from an interrupted writer", self.partial_dir)
            shutil.rmtree(self.partial_dir)
        for name in self._widths:
            (self.partial_dir / name).mkdir(parents=True)

    def _check_target(self, overwrite: bool) -> None:
        target = self.store_dir
        if target.name.endswith(PARTIAL_SUFFIX):
            raise UsaeError(f"StoreWriter: store_dir {target} must not end in {PARTIAL_SUFFIX!r}")
        if not (target.exists() or target.is_symlink()):
            return
        if not overwrite:
            raise UsaeError(f"store {target} already exists; pass overwrite=True to replace it")
        # Guard against rmtree-ing a directory that merely happens to share the name.
        if not (is_store_dir(target) or (target.is_dir() and not any(target.iterdir()))):
            raise UsaeError(f"{target} exists and is not a usae store; refusing to replace it")

    @property
    def n_rows(self) -> int:
        """Rows appended so far (written or buffered)."""
        return self._n_rows

    def append(self, batch: Mapping[str, Any]) -> None:
        """Add ``batch[name]`` of shape (b, d_name) for every model; rows are paired across models.

        Values are converted to the store dtype first; the whole batch is validated before any
        row is buffered, so a rejected batch leaves the store unchanged.
        """
        self._check_open()
        x_by_model = self._validate(batch)
        try:
            self._buffer(x_by_model)
        except BaseException:
            self._closed = True  # an I/O failure mid-batch leaves shards and stats out of step
            raise

    def _buffer(self, x_by_model: dict[str, np.ndarray]) -> None:
        n_b = next(iter(x_by_model.values())).shape[0]
        for name, x_bd in x_by_model.items():
            self._stats[name].update(x_bd)
        pos = 0
        while pos < n_b:
            n_take = min(self._rows_per_shard - self._n_buffered, n_b - pos)
            for name, x_bd in x_by_model.items():
                self._buf[name][self._n_buffered : self._n_buffered + n_take] = x_bd[pos : pos + n_take]
            self._n_buffered += n_take
            pos += n_take
            if self._n_buffered == self._rows_per_shard:
                self._write_shard()
        self._n_rows += n_b

    def _validate(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if not isinstance(batch, Mapping) or set(batch) != set(self._widths):
            got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise UsaeError(f"append: batch has models {got}, expected exactly {list(self._widths)}")
        x_by_model: dict[str, np.ndarray] = {}
        first = None
        for name, d in self._widths.items():
            x = _as_numpy(batch[name], name)
            if x.ndim != 2 or x.shape[1] != d:
                raise UsaeError(f"append: model {name!r} expected shape (n, {d}), got {tuple(x.shape)}")
            if first is None:
                first = name
            elif x.shape[0] != x_by_model[first].shape[0]:
                raise UsaeError(
                    f"append: model {name!r} has {x.shape[0]} rows but model {first!r} has "
                    f"{x_by_model[first].shape[0]}; rows must be paired"
                )
            with np.errstate(over="ignore"):  # overflow to inf is reported just below
                x_bd = np.ascontiguousarray(x, dtype=self._disk_dtype)
            finite_b = np.isfinite(x_bd).all(axis=1)
            if not finite_b.all():
                row = int(np.argmin(finite_b))
                why = f"beyond {self._dtype} range" if np.isfinite(x[row]).all() else "NaN/inf"
                raise UsaeError(
                    f"append: model {name!r} has a non-finite value ({why}) at row "
                    f"{self._n_rows + row} (row {row} of this batch); nothing from this batch was written"
                )
            x_by_model[name] = x_bd
        return x_by_model

    def _write_shard(self) -> None:
        for name in self._widths:
            x_bd = self._buf[name][: self._n_buffered]
            path = self.partial_dir / name / shard_name(self._n_shards)
            try:
                save_npy(path, x_bd)
            except OSError as e:
                self._fail_write(path, e)
            self._model_sha[name].update(x_bd)
            self._shard_sha[name].append(hashlib.sha256(x_bd).hexdigest())
        self._n_shards += 1
        self._n_buffered = 0

    def _check_open(self) -> None:
        if self._closed:
            raise UsaeError(f"StoreWriter for {self.store_dir} is already finalised or aborted")

    def finalize(self) -> Path:
        """Write the last shard and metadata.json, fsync, and rename into place; returns the path."""
        try:
            return self._finalize()
        finally:
            self._lock.close()

    def _finalize(self) -> Path:
        self._check_open()
        self._closed = True
        if self._n_rows == 0:
            shutil.rmtree(self.partial_dir, ignore_errors=True)
            raise UsaeError(f"StoreWriter: no rows were appended to {self.store_dir}; nothing written")
        tokens, ids = self._tokens_per_image, self._image_ids
        subsampled = self._positions is not None
        check_layout(ids, tokens, self._grid, self._n_rows, f"StoreWriter for {self.store_dir}", subsampled)
        if self._n_buffered:
            self._write_shard()
        if subsampled:
            try:
                save_npy(self.partial_dir / POSITIONS_NAME, self._positions)
            except OSError as e:
                self._fail_write(self.partial_dir / POSITIONS_NAME, e)
        meta_path = self.partial_dir / METADATA_NAME
        try:
            write_durable(meta_path, lambda f: json.dump(self._metadata(), f, indent=1))
        except OSError as e:
            self._fail_write(meta_path, e)
        for name in self._widths:
            fsync_path(self.partial_dir / name)
        fsync_path(self.partial_dir)
        self._publish()
        logger.info("wrote store %s: %d rows x %d models", self.store_dir, self._n_rows, len(self._widths))
        return self.store_dir

    def _fail_write(self, path: Path, e: OSError) -> None:
        """A write failed (disk full, ...): drop the partial store to free its space, raise one line."""
        self._closed = True
        shutil.rmtree(self.partial_dir, ignore_errors=True)
        kept = f"; {self.store_dir} is unchanged" if self.store_dir.exists() else ""
        why = e.strerror or one_line(e)
        if e.errno is None:  # numpy's short write carries no errno: say how much room there was
            with contextlib.suppress(OSError):
                why += f", {shutil.disk_usage(self.store_dir.parent).free} bytes free on the device"
        raise UsaeError(f"{path}: could not write ({why}); nothing was published{kept}") from None

    def _metadata(self) -> dict[str, Any]:
        digests = [(n, d, self._model_sha[n].hexdigest()) for n, d in self._widths.items()]
        positions = {}
        if self._positions is not None:
            pos = self._positions
            sha = hashlib.sha256(np.ascontiguousarray(pos)).hexdigest()
            positions = {"token_positions": {"file": POSITIONS_NAME, "shape": list(pos.shape), "sha256": sha}}
        return {
            "schema_version": SCHEMA_VERSION if self._positions is None else SCHEMA_SUBSAMPLED,
            "format": FORMAT,
            "created_with": f"usae {__version__}",
            "models": [{"name": n, "width": d} for n, d in self._widths.items()],
            "n_rows": self._n_rows,
            "dtype": self._dtype,
            "rows_per_shard": self._rows_per_shard,
            "n_shards": self._n_shards,
            "image_ids": self._image_ids,
            "tokens_per_image": self._tokens_per_image,
            "grid": self._grid,
            **positions,
            "stats": {n: s.to_json() for n, s in self._stats.items()},
            "hash": content_hash(self._dtype, self._n_rows, digests),
            "model_sha256": {n: digest for n, _, digest in digests},
            "shard_sha256": self._shard_sha,
            "extra": self._extra,
        }

    def _publish(self) -> None:
        target, old = self.store_dir, None
        if target.exists() or target.is_symlink():
            if not self._overwrite:
                raise UsaeError(f"store {target} appeared while writing; new store left in {self.partial_dir}")
            # A fresh name, so no unrelated directory is ever deleted in its place.
            old = target.with_name(f"{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.rename(target, old)
        os.rename(self.partial_dir, target)
        fsync_path(target.parent)
        if old is None:
            return
        if old.is_symlink():  # replacing a link must not delete the store it pointed at
            old.unlink()
        else:
            shutil.rmtree(old)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            if not self._closed:
                self.finalize()
        elif not self._closed:
            self._closed = True
            self._lock.close()
            logger.warning(
                "writer failed; store %s not published, partial rows left in %s",
                self.store_dir,
                self.partial_dir,
            )


def write_store(store_dir: str | Path, arrays: Mapping[str, Any], **kwargs: Any) -> Path:
    """Write ``arrays`` (name -> (n, d_name) numpy array or torch tensor) as one store.

    ``kwargs`` are :class:`StoreWriter` keywords. Returns the store path.
    """
    x_by_model = {name: _as_numpy(x, name) for name, x in arrays.items()}
    for name, x in x_by_model.items():
        if x.ndim != 2:
            raise UsaeError(f"write_store: model {name!r} must be 2-D (n, d), got shape {tuple(x.shape)}")
    n_by_model = {name: x.shape[0] for name, x in x_by_model.items()}
    if len(set(n_by_model.values())) > 1:
        raise UsaeError(f"write_store: models have different row counts {n_by_model}; rows must be paired")
    widths = {name: x.shape[1] for name, x in x_by_model.items()}
    with StoreWriter(store_dir, widths, **kwargs) as writer:
        n_rows = next(iter(n_by_model.values()), 0)
        chunk = writer._rows_per_shard  # bounds the float64 copy that stats make per append
        for start in range(0, n_rows, chunk):
            writer.append({name: x[start : start + chunk] for name, x in x_by_model.items()})
    return writer.store_dir
