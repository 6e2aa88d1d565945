"""The paired activation store: row r of every model's array is the same image token.

On disk (specified byte for byte in ``docs/store.md``)::

    STORE/
      metadata.json
      <model>/shard-00000.npy, shard-00001.npy, ...   # (rows, d) float16/float32, C order

A writer fills a sibling ``STORE.partial/`` and renames it to ``STORE`` only after every shard and
``metadata.json`` are fsynced, so any store that is visible under its final name is complete.
Statistics and the content hash are accumulated while writing; nothing is read back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import mmap
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from usae.config import fsync_path
from usae.errors import UsaeError

logger = logging.getLogger(__name__)

FORMAT = "usae-store"
SCHEMA_VERSION = 1
METADATA_NAME = "metadata.json"
PARTIAL_SUFFIX = ".partial"
DTYPES = ("float16", "float32")
StoreDtype = Literal["float16", "float32"]
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_HASH_CHUNK_BYTES = 1 << 24  # verify() streams shards in 16 MiB pieces to bound memory


def shard_name(index: int) -> str:
    """File name of shard ``index`` inside a model directory: ``shard-00000.npy``, ..."""
    return f"shard-{index:05d}.npy"


def content_hash(dtype: str, n_rows: int, model_digests: Iterable[tuple[str, int, str]]) -> str:
    """The store's ``hash``: sha256 of a canonical JSON header naming each model's array digest.

    ``model_digests`` holds (name, width, sha256 hex of the model's (n_rows, width) array as raw
    little-endian C-order bytes) in store order. Independent of ``rows_per_shard``.
    """
    models = [{"name": name, "sha256": digest, "width": width} for name, width, digest in model_digests]
    header = {"dtype": dtype, "models": models, "n_rows": n_rows}
    return hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class ModelStats(NamedTuple):
    """Statistics of one model's stored values (after conversion to the store dtype)."""

    mean: np.ndarray  # (d,) float32, per-dimension mean
    var: np.ndarray  # (d,) float32, per-dimension population variance
    std: float  # sqrt(mean(var)): RMS deviation of an element around its dimension's mean
    scalar_mean: float  # mean over all n_rows * d elements


class _RunningStats:
    """Per-dimension mean and M2 merged batch by batch in float64 (Chan, Golub & LeVeque 1979).

    The pairwise merge keeps precision when the mean is large relative to the spread, where a
    running sum of squares would cancel catastrophically.
    """

    def __init__(self, d: int) -> None:
        self.n = 0
        self.mean_d = np.zeros(d, np.float64)
        self.m2_d = np.zeros(d, np.float64)

    def update(self, x_bd: np.ndarray) -> None:
        n_b = x_bd.shape[0]
        if n_b == 0:
            return
        x_bd = x_bd.astype(np.float64)
        mean_b_d = x_bd.mean(axis=0)
        m2_b_d = np.square(x_bd - mean_b_d).sum(axis=0)
        n = self.n + n_b
        delta_d = mean_b_d - self.mean_d
        self.mean_d += delta_d * (n_b / n)
        self.m2_d += m2_b_d + np.square(delta_d) * (self.n * n_b / n)
        self.n = n

    def to_json(self) -> dict[str, Any]:
        var_d = self.m2_d / self.n
        return {
            "mean": self.mean_d.tolist(),
            "var": var_d.tolist(),
            "std": float(np.sqrt(var_d.mean())),
            "scalar_mean": float(self.mean_d.mean()),
        }


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _check_model(name: Any, width: Any, where: str, seen_lower: set[str]) -> None:
    """Model names become directory names, so they must be safe and unique even ignoring case."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name == METADATA_NAME:
        raise UsaeError(
            f"{where}: model name {name!r} is not a safe directory name "
            "(letters, digits, '_', '.', '-', starting with a letter or digit)"
        )
    if name.lower() in seen_lower:
        raise UsaeError(f"{where}: model name {name!r} is repeated (names are compared ignoring case)")
    seen_lower.add(name.lower())
    if not _is_int(width) or width < 1:
        raise UsaeError(f"{where}: width of model {name!r} must be a positive int, got {width!r}")


def _check_layout(image_ids: Any, tokens_per_image: Any, grid: Any, n_rows: int | None, where: str) -> None:
    """Validate the optional image layout fields against each other and, if known, n_rows."""
    if image_ids is not None and (
        not isinstance(image_ids, list | tuple) or not all(isinstance(i, str) for i in image_ids)
    ):
        raise UsaeError(f"{where}: image_ids must be a list of str")
    if tokens_per_image is not None and (not _is_int(tokens_per_image) or tokens_per_image < 1):
        raise UsaeError(f"{where}: tokens_per_image must be a positive int, got {tokens_per_image!r}")
    if grid is not None:
        if not isinstance(grid, list | tuple) or len(grid) != 2 or not all(_is_int(g) and g >= 1 for g in grid):
            raise UsaeError(f"{where}: grid must be [h, w] positive ints, got {grid!r}")
        if tokens_per_image is None or grid[0] * grid[1] != tokens_per_image:
            raise UsaeError(
                f"{where}: grid {list(grid)} has {grid[0] * grid[1]} tokens but tokens_per_image is {tokens_per_image}"
            )
    if n_rows is None or tokens_per_image is None:
        return
    if image_ids is not None and n_rows != len(image_ids) * tokens_per_image:
        raise UsaeError(
            f"{where}: n_rows {n_rows} != len(image_ids) {len(image_ids)} * tokens_per_image {tokens_per_image}"
        )
    if n_rows % tokens_per_image:
        raise UsaeError(f"{where}: n_rows {n_rows} is not a multiple of tokens_per_image")


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


def _is_store_dir(path: Path) -> bool:
    try:
        return json.loads((path / METADATA_NAME).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_writer_args(widths: Any, dtype: Any, rows_per_shard: Any, extra: Any) -> None:
    if not isinstance(widths, Mapping) or not widths:
        raise UsaeError(f"StoreWriter: widths must map model names to widths, got {widths!r}")
    seen: set[str] = set()
    for name, width in widths.items():
        _check_model(name, width, "StoreWriter widths", seen)
    if dtype not in DTYPES:
        raise UsaeError(f"StoreWriter: dtype must be one of {DTYPES}, got {dtype!r}")
    if not _is_int(rows_per_shard) or rows_per_shard < 1:
        raise UsaeError(f"StoreWriter: rows_per_shard must be a positive int, got {rows_per_shard!r}")
    try:
        json.dumps(extra if extra is not None else {})
    except (TypeError, ValueError) as e:
        raise UsaeError(f"StoreWriter: extra must be JSON-serialisable ({_one_line(e)})") from None


class StoreWriter:
    """Streams paired activations into a new store at ``store_dir``.

    Rows go to ``<store_dir>.partial/`` (a stale one from a crashed writer is deleted); the
    final name appears only in :meth:`finalize`. With ``overwrite=True`` an existing store stays
    intact until the new one is complete. As a context manager it finalises on normal exit and,
    on an exception, leaves the partial directory and publishes nothing.
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
    ) -> None:
        _check_writer_args(widths, dtype, rows_per_shard, extra)
        _check_layout(image_ids, tokens_per_image, grid, None, "StoreWriter")
        self.store_dir = Path(os.path.abspath(store_dir))
        self.partial_dir = self.store_dir.with_name(self.store_dir.name + PARTIAL_SUFFIX)
        self._check_target(overwrite)

        self._widths = {name: int(width) for name, width in widths.items()}
        self._dtype: str = dtype
        self._disk_dtype = np.dtype(dtype).newbyteorder("<")
        self._rows_per_shard = int(rows_per_shard)
        self._image_ids = list(image_ids) if image_ids is not None else None
        self._tokens_per_image = tokens_per_image
        self._grid = [int(g) for g in grid] if grid is not None else None
        self._extra = dict(extra) if extra is not None else {}
        self._overwrite = overwrite
        self._n_rows = self._n_buffered = self._n_shards = 0
        self._buf = {n: np.empty((self._rows_per_shard, d), self._disk_dtype) for n, d in self._widths.items()}
        self._stats = {n: _RunningStats(d) for n, d in self._widths.items()}
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
        if not (_is_store_dir(target) or (target.is_dir() and not any(target.iterdir()))):
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
                with path.open("wb") as f:
                    np.save(f, x_bd, allow_pickle=False)
                    f.flush()
                    os.fsync(f.fileno())
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
        self._check_open()
        self._closed = True
        if self._n_rows == 0:
            shutil.rmtree(self.partial_dir, ignore_errors=True)
            raise UsaeError(f"StoreWriter: no rows were appended to {self.store_dir}; nothing written")
        tokens, ids = self._tokens_per_image, self._image_ids
        _check_layout(ids, tokens, self._grid, self._n_rows, f"StoreWriter for {self.store_dir}")
        if self._n_buffered:
            self._write_shard()
        meta_path = self.partial_dir / METADATA_NAME
        try:
            with meta_path.open("w", encoding="utf-8") as f:
                json.dump(self._metadata(), f, indent=1)
                f.flush()
                os.fsync(f.fileno())
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
        why = e.strerror or _one_line(e)
        if e.errno is None:  # numpy's short write carries no errno: say how much room there was
            with contextlib.suppress(OSError):
                why += f", {shutil.disk_usage(self.store_dir.parent).free} bytes free on the device"
        raise UsaeError(f"{path}: could not write ({why}); nothing was published{kept}") from None

    def _metadata(self) -> dict[str, Any]:
        from usae import __version__  # deferred: usae/__init__ may import this module

        digests = [(n, d, self._model_sha[n].hexdigest()) for n, d in self._widths.items()]
        return {
            "schema_version": SCHEMA_VERSION,
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


def _get(meta: dict[str, Any], key: str, kind: type | tuple[type, ...], where: Path) -> Any:
    if key not in meta:
        raise UsaeError(f"{where}: missing field {key!r}")
    value = meta[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise UsaeError(f"{where}: field {key!r} has the wrong type: {_one_line(repr(value))[:60]}")
    return value


def _load_metadata(store_dir: Path) -> dict[str, Any]:
    """Read and validate ``metadata.json``; every failure is a one-line UsaeError."""
    if not store_dir.is_dir():
        raise UsaeError(f"no store at {store_dir}")
    if store_dir.name.endswith(PARTIAL_SUFFIX):
        raise UsaeError(
            f"store {store_dir} is not finalised (a writer's temporary directory); "
            f"open {store_dir.name.removesuffix(PARTIAL_SUFFIX)} once its writer has finished"
        )
    meta_path = store_dir / METADATA_NAME
    if not meta_path.is_file():
        raise UsaeError(f"store {store_dir} is not finalised (no {METADATA_NAME}); was its writer interrupted?")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, a 5000-digit int
        raise UsaeError(f"{meta_path}: unreadable ({_one_line(e)[:200]})") from None
    if not isinstance(meta, dict):
        raise UsaeError(f"{meta_path}: expected a JSON object")
    if meta.get("format") != FORMAT:
        raise UsaeError(f"{meta_path}: field 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    version = _get(meta, "schema_version", int, meta_path)
    if version != SCHEMA_VERSION:
        raise UsaeError(f"{meta_path}: unknown schema_version {version} (this usae reads {SCHEMA_VERSION})")
    _check_fields(meta, meta_path)
    return meta


def _check_fields(meta: dict[str, Any], where: Path) -> None:
    seen: set[str] = set()
    models = _get(meta, "models", list, where)
    for model in models:
        if not isinstance(model, dict):
            raise UsaeError(f"{where}: field 'models' entries must be objects with name and width")
        _check_model(model.get("name"), model.get("width"), f"{where}: field 'models'", seen)
    if not models:
        raise UsaeError(f"{where}: field 'models' is empty")
    n_rows = _get(meta, "n_rows", int, where)
    rows_per_shard = _get(meta, "rows_per_shard", int, where)
    if n_rows < 1 or rows_per_shard < 1:
        raise UsaeError(f"{where}: fields 'n_rows' and 'rows_per_shard' must be positive")
    if _get(meta, "dtype", str, where) not in DTYPES:
        raise UsaeError(f"{where}: field 'dtype' is {meta['dtype']!r}, expected one of {DTYPES}")
    if _get(meta, "n_shards", int, where) != math.ceil(n_rows / rows_per_shard):
        raise UsaeError(f"{where}: field 'n_shards' {meta['n_shards']} does not fit n_rows and rows_per_shard")
    tokens, grid = meta.get("tokens_per_image"), meta.get("grid")
    _check_layout(meta.get("image_ids"), tokens, grid, n_rows, str(where))
    if not _HEX64_RE.fullmatch(_get(meta, "hash", str, where)):
        raise UsaeError(f"{where}: field 'hash' is not a sha256 hex digest")
    if not isinstance(meta.get("extra", {}), dict):
        raise UsaeError(f"{where}: field 'extra' must be an object")
    stats = _get(meta, "stats", dict, where)
    for model in models:
        s = stats.get(model["name"])
        ok = isinstance(s, dict) and all(_is_number(s.get(k)) for k in ("std", "scalar_mean"))
        if not ok or not all(
            isinstance(s.get(k), list) and len(s[k]) == model["width"] and all(_is_number(v) for v in s[k])
            for k in ("mean", "var")
        ):
            raise UsaeError(f"{where}: field 'stats' entry for model {model['name']!r} is missing or malformed")


def _check_shard(path: Path, n_rows: int, d: int, dtype: np.dtype) -> None:
    """Check a shard's .npy header and file size without reading its data."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            readers = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }
            if version not in readers:
                raise UsaeError(f"{path}: unsupported .npy version {version}")
            shape, fortran_order, file_dtype = readers[version](f)
            data_offset = f.tell()
    except UsaeError:
        raise  # UsaeError is a ValueError; keep it from being re-wrapped below
    except FileNotFoundError:
        raise UsaeError(f"{path}: shard missing (listed by {METADATA_NAME})") from None
    except Exception as e:  # numpy's header parser on damaged bytes also raises SyntaxError, TokenError, ...
        raise UsaeError(f"{path}: not a readable .npy file ({e.__class__.__name__}: {_one_line(e)[:160]})") from None
    if shape != (n_rows, d) or fortran_order or file_dtype != dtype:
        raise UsaeError(f"{path}: holds {file_dtype} {shape}, expected {dtype} {(n_rows, d)}")
    expected_size = data_offset + n_rows * d * dtype.itemsize
    if size != expected_size:
        raise UsaeError(f"{path}: {size} bytes, expected {expected_size} (truncated or corrupt)")


class Store:
    """Read-only, memory-mapped view of a finalised store; every read returns float32 copies.

    Opening checks metadata.json and every shard header (cheap, no data read); ``verify=True``
    also re-hashes every byte and compares with the recorded hashes.
    """

    def __init__(self, store_dir: str | Path, verify: bool = False) -> None:
        self.path = Path(store_dir)
        self.metadata: dict[str, Any] = _load_metadata(self.path)
        meta = self.metadata
        self.model_names: list[str] = [m["name"] for m in meta["models"]]
        self.widths: dict[str, int] = {m["name"]: m["width"] for m in meta["models"]}
        self.n_rows: int = meta["n_rows"]
        self.dtype = np.dtype(meta["dtype"])
        self.rows_per_shard: int = meta["rows_per_shard"]
        self.n_shards: int = meta["n_shards"]
        self.hash: str = meta["hash"]
        self.image_ids: list[str] | None = meta.get("image_ids")
        self.tokens_per_image: int | None = meta.get("tokens_per_image")
        self.grid: tuple[int, int] | None = tuple(meta["grid"]) if meta.get("grid") else None
        self.extra: dict[str, Any] = meta.get("extra", {})
        self._mmaps: dict[tuple[str, int], np.ndarray] = {}
        self._check_shards()
        if verify:
            self.verify()

    def _shard_path(self, name: str, index: int) -> Path:
        return self.path / name / shard_name(index)

    def _shard_rows(self, index: int) -> int:
        return min(self.rows_per_shard, self.n_rows - index * self.rows_per_shard)

    def _check_shards(self) -> None:
        disk_dtype = self.dtype.newbyteorder("<")
        expected = {shard_name(i) for i in range(self.n_shards)}
        for name, d in self.widths.items():
            for i in range(self.n_shards):
                _check_shard(self._shard_path(name, i), self._shard_rows(i), d, disk_dtype)
            # A stray shard means n_rows and the files disagree about the data.
            stray = sorted(p.name for p in (self.path / name).glob("shard-*.npy") if p.name not in expected)
            if stray:
                raise UsaeError(f"{self.path / name / stray[0]}: not listed by {METADATA_NAME} (n_rows {self.n_rows})")

    def _shard(self, name: str, index: int) -> np.ndarray:
        """Memory map of one shard, opened on first use and cached."""
        key = (name, index)
        if key not in self._mmaps:
            shard = np.load(self._shard_path(name, index), mmap_mode="r", allow_pickle=False)
            # Training reads scattered rows: without this, kernel read-ahead maps megabytes around
            # every row touched and RSS grows with the store instead of the batch.
            raw = getattr(shard, "_mmap", None)
            if raw is not None and hasattr(mmap, "MADV_RANDOM"):
                raw.madvise(mmap.MADV_RANDOM)
            self._mmaps[key] = shard
        return self._mmaps[key]

    def release_pages(self) -> None:
        """Unmap every open shard; the next read maps it again.

        Pages of a memory map that were read count towards the process's RSS until unmapped; a
        trainer that streams a store larger than RAM calls this now and then so RSS stays flat.
        Arrays returned by ``rows``/``take`` are copies and stay valid.
        """
        self._mmaps = {}

    def _width(self, name: str) -> int:
        if name not in self.widths:
            raise UsaeError(f"store {self.path}: unknown model {name!r}; known models: {', '.join(self.model_names)}")
        return self.widths[name]

    def _check_range(self, start: int, stop: int) -> None:
        if not (_is_int(start) and _is_int(stop) and 0 <= start <= stop <= self.n_rows):
            raise UsaeError(f"store {self.path}: rows [{start}, {stop}) outside [0, {self.n_rows})")

    def stats(self, name: str) -> ModelStats:
        """Statistics of model ``name`` recorded at write time."""
        self._width(name)
        s = self.metadata["stats"][name]
        mean_d, var_d = np.asarray(s["mean"], np.float32), np.asarray(s["var"], np.float32)
        return ModelStats(mean_d, var_d, float(s["std"]), float(s["scalar_mean"]))

    def rows(self, name: str, start: int, stop: int, dtype: Any = np.float32) -> np.ndarray:
        """Rows [start, stop) of model ``name`` as a (stop - start, d) copy (``dtype=None``: the store's)."""
        d = self._width(name)
        self._check_range(start, stop)
        x_bd = np.empty((stop - start, d), self.dtype if dtype is None else dtype)
        row = start
        while row < stop:
            index, lo = divmod(row, self.rows_per_shard)
            hi = min(self.rows_per_shard, stop - index * self.rows_per_shard)
            x_bd[row - start : row - start + hi - lo] = self._shard(name, index)[lo:hi]
            row += hi - lo
        return x_bd

    def take(self, name: str, idx: Any) -> np.ndarray:
        """Rows ``idx`` (1-D ints in [0, n_rows), any order, repeats allowed) as (len(idx), d) float32."""
        d = self._width(name)
        idx_b = np.asarray(idx)
        if idx_b.ndim != 1 or (idx_b.size and idx_b.dtype.kind not in "iu"):
            raise UsaeError(f"take: idx must be a 1-D int array, got {idx_b.dtype} {idx_b.shape}")
        x_bd = np.empty((idx_b.size, d), np.float32)
        if idx_b.size == 0:
            return x_bd
        if idx_b.min() < 0 or idx_b.max() >= self.n_rows:
            raise UsaeError(f"take: idx outside [0, {self.n_rows}) for store {self.path}")
        # Sorted, per-shard fancy indexing touches each memmapped page in file order once.
        order_b = np.argsort(idx_b, kind="stable")
        sorted_b = idx_b[order_b].astype(np.int64)
        shard_b = sorted_b // self.rows_per_shard
        cuts = np.flatnonzero(np.diff(shard_b)) + 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, idx_b.size], strict=True):
            index = int(shard_b[lo])
            local_b = sorted_b[lo:hi] - index * self.rows_per_shard
            x_bd[order_b[lo:hi]] = self._shard(name, index)[local_b]
        return x_bd

    def iter_batches(
        self,
        batch_size: int,
        names: list[str] | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yield (first_row, {name: (b, d_name) float32}) for contiguous batches of [start, stop)."""
        names = list(self.model_names) if names is None else list(names)
        for name in names:
            self._width(name)
        stop = self.n_rows if stop is None else stop
        self._check_range(start, stop)
        if not _is_int(batch_size) or batch_size < 1:
            raise UsaeError(f"iter_batches: batch_size must be a positive int, got {batch_size!r}")
        return self._batches(batch_size, names, start, stop)

    def _batches(self, batch_size: int, names: list[str], start: int, stop: int) -> Iterator[Any]:
        for row in range(start, stop, batch_size):
            end = min(row + batch_size, stop)
            yield row, {name: self.rows(name, row, end) for name in names}

    def verify(self) -> None:
        """Re-hash every shard; raise UsaeError naming the first file that does not match."""
        shard_sha = self.metadata.get("shard_sha256")
        shard_sha = shard_sha if isinstance(shard_sha, dict) else {}  # optional field
        digests = []
        for name, d in self.widths.items():
            model_sha = hashlib.sha256()
            rows_per_chunk = max(1, _HASH_CHUNK_BYTES // (d * self.dtype.itemsize))
            for i in range(self.n_shards):
                shard_mm, sha = self._shard(name, i), hashlib.sha256()
                for lo in range(0, shard_mm.shape[0], rows_per_chunk):
                    chunk = np.ascontiguousarray(shard_mm[lo : lo + rows_per_chunk])
                    model_sha.update(chunk)
                    sha.update(chunk)
                recorded = shard_sha.get(name, [])
                if i < len(recorded) and recorded[i] != sha.hexdigest():
                    raise UsaeError(f"{self._shard_path(name, i)}: contents changed since writing (sha256 mismatch)")
            digests.append((name, d, model_sha.hexdigest()))
        if content_hash(self.metadata["dtype"], self.n_rows, digests) != self.hash:
            raise UsaeError(f"{self.path / METADATA_NAME}: field 'hash' does not match the shard contents")

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, n_rows={self.n_rows}, dtype={self.dtype}, widths={self.widths})"


def open_store(store_dir: str | Path, verify: bool = False) -> Store:
    """Open the finalised store at ``store_dir``; see :class:`Store`."""
    return Store(store_dir, verify=verify)
