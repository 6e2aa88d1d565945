"""The paired activation store: row r of every model's array is the same image token.

On disk (specified byte for byte in ``docs/store.md``)::

    STORE/
      metadata.json
      <model>/shard-00000.npy, shard-00001.npy, ...   # (rows, d) float16/float32, C order
      token_positions.npy                             # only in a token-subsampled store (schema 2)

This module reads a store (memory-mapped, validated, verifiable); store_writer.py writes one and
store_format.py holds what both share.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from usae._io import one_line, regular_file
from usae.data.store_format import (
    DTYPES,
    FORMAT,
    HASH_CHUNK_BYTES,
    HEX64_RE,
    METADATA_NAME,
    PARTIAL_SUFFIX,
    POSITIONS_DTYPE,
    POSITIONS_NAME,
    SCHEMA_SUBSAMPLED,
    SCHEMA_VERSIONS,
    ModelStats,
    RunningStats,
    check_layout,
    check_model,
    check_positions,
    content_hash,
    is_int,
    is_number,
    shard_name,
    stats_from_json,
)
from usae.data.store_writer import StoreWriter, write_store  # noqa: F401  (the store's public API in one place)
from usae.errors import UsaeError

logger = logging.getLogger(__name__)


def _get(meta: dict[str, Any], key: str, kind: type | tuple[type, ...], where: Path) -> Any:
    if key not in meta:
        raise UsaeError(f"{where}: missing field {key!r}")
    value = meta[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise UsaeError(f"{where}: field {key!r} has the wrong type: {one_line(repr(value))[:60]}")
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
    if meta_path.exists():
        regular_file(meta_path, METADATA_NAME)
    if not meta_path.is_file():
        raise UsaeError(f"store {store_dir} is not finalised (no {METADATA_NAME}); was its writer interrupted?")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, a 5000-digit int
        raise UsaeError(f"{meta_path}: unreadable ({one_line(e)[:200]})") from None
    if not isinstance(meta, dict):
        raise UsaeError(f"{meta_path}: expected a JSON object")
    if meta.get("format") != FORMAT:
        raise UsaeError(f"{meta_path}: field 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    version = _get(meta, "schema_version", int, meta_path)
    if version not in SCHEMA_VERSIONS:
        readable = " and ".join(map(str, SCHEMA_VERSIONS))
        raise UsaeError(f"{meta_path}: unknown schema_version {version} (this usae reads {readable})")
    _check_fields(meta, meta_path)
    return meta


def _positions_field(meta: dict[str, Any], where: Path) -> dict[str, Any] | None:
    """The ``token_positions`` object of a schema-2 store (None in schema 1, where the key means nothing)."""
    if meta["schema_version"] != SCHEMA_SUBSAMPLED:
        return None
    field = _get(meta, "token_positions", dict, where)
    shape = field.get("shape")
    ok = field.get("file") == POSITIONS_NAME and isinstance(field.get("sha256"), str)
    if not (ok and HEX64_RE.fullmatch(field["sha256"]) and isinstance(shape, list) and len(shape) == 2):
        raise UsaeError(f"{where}: field 'token_positions' must be {{file: {POSITIONS_NAME!r}, shape, sha256}}")
    if shape != [len(meta["image_ids"]), meta["tokens_per_image"]]:
        raise UsaeError(f"{where}: field 'token_positions' has shape {shape}, expected [images, tokens_per_image]")
    return field


def _check_fields(meta: dict[str, Any], where: Path) -> None:
    seen: set[str] = set()
    models = _get(meta, "models", list, where)
    for model in models:
        if not isinstance(model, dict):
            raise UsaeError(f"{where}: field 'models' entries must be objects with name and width")
        check_model(model.get("name"), model.get("width"), f"{where}: field 'models'", seen)
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
    subsampled = meta["schema_version"] == SCHEMA_SUBSAMPLED
    check_layout(meta.get("image_ids"), tokens, grid, n_rows, str(where), subsampled)
    _positions_field(meta, where)
    if not HEX64_RE.fullmatch(_get(meta, "hash", str, where)):
        raise UsaeError(f"{where}: field 'hash' is not a sha256 hex digest")
    if not isinstance(meta.get("extra", {}), dict):
        raise UsaeError(f"{where}: field 'extra' must be an object")
    stats = _get(meta, "stats", dict, where)
    for model in models:
        s = stats.get(model["name"])
        ok = isinstance(s, dict) and all(is_number(s.get(k)) for k in ("std", "scalar_mean"))
        ok = ok and (s.get("gamma") is None or is_number(s["gamma"]))  # optional: stores before γ lack it
        if not ok or not all(
            isinstance(s.get(k), list) and len(s[k]) == model["width"] and all(is_number(v) for v in s[k])
            for k in ("mean", "var")
        ):
            raise UsaeError(f"{where}: field 'stats' entry for model {model['name']!r} is missing or malformed")
        _check_stats(s, model["name"], where)


def _check_stats(s: dict[str, Any], name: str, where: Path) -> None:
    """A model's statistics as training reads them: a variance >= 0, a std >= 0 that is sqrt(mean(var)),
    a scalar_mean that is mean(mean). An edited std of 0 or -1 trained silently into garbage (cross
    R² -1e15); cross-checking the fields catches a hand edit of one without re-reading the shards."""
    field = f"{where}: field 'stats.{name}"
    if min(s["var"]) < 0:
        raise UsaeError(f"{field}.var' holds a negative variance ({min(s['var'])!r})")
    if s["std"] < 0:
        raise UsaeError(f"{field}.std' is {s['std']!r}; a standard deviation is >= 0")
    with np.errstate(over="ignore"):  # edited values near 1e308: an inf mean is a mismatch, not a crash
        var_mean, mean_mean = (float(np.mean(np.asarray(s[k], np.float64))) for k in ("var", "mean"))
    expected = {"std": math.sqrt(var_mean), "scalar_mean": mean_mean}
    scale = s["std"] + max(abs(v) for v in s["mean"])
    for key, value in expected.items():
        if not math.isclose(s[key], value, rel_tol=1e-4, abs_tol=1e-6 * scale):
            raise UsaeError(f"{field}.{key}' is {s[key]!r}, but its mean/var give {value:.6g}; was it edited?")


def _check_shard(path: Path, n_rows: int, d: int, dtype: np.dtype, what: str = "shard") -> None:
    """Check a shard's (or another (rows, d) array's) .npy header and file size without reading its data."""
    if path.exists():  # a missing one is reported below
        regular_file(path, what)
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
        raise UsaeError(f"{path}: {what} missing (listed by {METADATA_NAME})") from None
    except Exception as e:  # numpy's header parser on damaged bytes also raises SyntaxError, TokenError, ...
        raise UsaeError(f"{path}: not a readable .npy file ({e.__class__.__name__}: {one_line(e)[:160]})") from None
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
        self.subsampled: bool = _positions_field(meta, self.path / METADATA_NAME) is not None
        """Only some tokens of each image are stored (``usae extract --tokens-per-image``); see ``positions``."""
        self._positions: np.ndarray | None = None
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
        if self.subsampled:
            n_images, t = len(self.image_ids or ()), int(self.tokens_per_image or 0)
            _check_shard(self.path / POSITIONS_NAME, n_images, t, POSITIONS_DTYPE, "token positions")

    @property
    def positions(self) -> np.ndarray | None:
        """(images, tokens_per_image) int64: the grid token (row-major) of each row, or None.

        Row ``j * tokens_per_image + k`` is token ``positions[j, k]`` of image ``j``; each image's
        positions increase. None when every token of the grid is stored (then row ``j * t + k`` is token k).
        """
        if self.subsampled and self._positions is None:
            raw = np.load(self.path / POSITIONS_NAME, allow_pickle=False)
            where = str(self.path / POSITIONS_NAME)
            self._positions = check_positions(raw, len(self.image_ids or ()), self.tokens_per_image, self.grid, where)
        return self._positions

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
        if not (is_int(start) and is_int(stop) and 0 <= start <= stop <= self.n_rows):
            raise UsaeError(f"store {self.path}: rows [{start}, {stop}) outside [0, {self.n_rows})")

    def stats(self, name: str) -> ModelStats:
        """Statistics of model ``name`` recorded at write time."""
        self._width(name)
        return stats_from_json(self.metadata["stats"][name])

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
        if not is_int(batch_size) or batch_size < 1:
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
        digests, computed = [], {}
        for name, d in self.widths.items():
            model_sha, stats = hashlib.sha256(), RunningStats(d)  # statistics derive from the data
            rows_per_chunk = max(1, HASH_CHUNK_BYTES // (d * self.dtype.itemsize))
            for i in range(self.n_shards):
                shard_mm, sha = self._shard(name, i), hashlib.sha256()
                for lo in range(0, shard_mm.shape[0], rows_per_chunk):
                    chunk = np.ascontiguousarray(shard_mm[lo : lo + rows_per_chunk])
                    model_sha.update(chunk)
                    sha.update(chunk)
                    stats.update(chunk)
                recorded = shard_sha.get(name, [])
                if i < len(recorded) and recorded[i] != sha.hexdigest():
                    raise UsaeError(f"{self._shard_path(name, i)}: contents changed since writing (sha256 mismatch)")
            digests.append((name, d, model_sha.hexdigest()))
            computed[name] = stats
        if self.subsampled:
            raw = np.load(self.path / POSITIONS_NAME, mmap_mode="r", allow_pickle=False)
            if hashlib.sha256(np.ascontiguousarray(raw)).hexdigest() != self.metadata["token_positions"]["sha256"]:
                raise UsaeError(f"{self.path / POSITIONS_NAME}: contents changed since writing (sha256 mismatch)")
        if content_hash(self.metadata["dtype"], self.n_rows, digests) != self.hash:
            raise UsaeError(f"{self.path / METADATA_NAME}: field 'hash' does not match the shard contents")
        for name, stats in computed.items():
            self._compare_stats(name, stats)

    def _compare_stats(self, name: str, stats: RunningStats) -> None:
        """The recorded statistics against those of the shard data (which the content hash covers)."""
        recorded, actual = self.metadata["stats"][name], stats.to_json()
        scale = math.sqrt(max(actual["var"])) + max(abs(v) for v in actual["mean"])
        for key in ("mean", "var", "std", "scalar_mean"):
            got, want = np.atleast_1d(recorded[key]), np.atleast_1d(actual[key])
            if not np.allclose(got, want, rtol=1e-4, atol=1e-6 * (scale + 1e-30) * (scale if key == "var" else 1)):
                raise UsaeError(
                    f"{self.path / METADATA_NAME}: field 'stats.{name}.{key}' does not match the shard data; was it edited?"
                )

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, n_rows={self.n_rows}, dtype={self.dtype}, widths={self.widths})"


def open_store(store_dir: str | Path, verify: bool = False) -> Store:
    """Open the finalised store at ``store_dir``; see :class:`Store`."""
    return Store(store_dir, verify=verify)


def held_out_path(store: Store) -> Path | None:
    """The held-out store extracted together with ``store`` (``usae extract --val-fraction``), if it exists.

    Train, evaluate and compare on different images: ablations and baselines score there too.
    """
    split = store.extra.get("split") or {}
    other = split.get("other")
    if split.get("name") != "train" or not other or not (Path(other) / METADATA_NAME).is_file():
        return None
    return Path(other)
