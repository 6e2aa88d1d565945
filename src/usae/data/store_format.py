"""The store's on-disk format: names, constants, the content hash, statistics and field checks.

Shared by the writer (store_writer.py) and the reader (store.py); specified in docs/store.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from usae.errors import UsaeError
from usae.model.metrics import outlier_gamma

FORMAT = "usae-store"
SCHEMA_VERSION = 1
"""The schema of a store that holds every token of its images (and of stores without images)."""
SCHEMA_SUBSAMPLED = 2
"""The schema of a token-subsampled store (``usae extract --tokens-per-image``): schema 1 plus
``token_positions``. A schema-1 reader refuses it instead of misreading rows as whole grids."""
SCHEMA_VERSIONS = (SCHEMA_VERSION, SCHEMA_SUBSAMPLED)
METADATA_NAME = "metadata.json"
POSITIONS_NAME = "token_positions.npy"
POSITIONS_DTYPE = np.dtype("<i4")
PARTIAL_SUFFIX = ".partial"
DTYPES = ("float16", "float32")
StoreDtype = Literal["float16", "float32"]
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
HEX64_RE = re.compile(r"[0-9a-f]{64}")
HASH_CHUNK_BYTES = 1 << 24  # verify() streams shards in 16 MiB pieces to bound memory


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
    gamma: float  # ‖mean‖ / ‖sqrt(var)‖ over dimensions (see gamma_of); inf when no dimension varies


class RunningStats:
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
            "gamma": _json_number(outlier_gamma(self.mean_d, var_d)),
        }


def stats_from_json(s: dict[str, Any]) -> ModelStats:
    """``ModelStats`` from a ``RunningStats.to_json()`` record (a store's metadata.json ``stats.<model>``)."""
    mean_d, var_d = np.asarray(s["mean"], np.float32), np.asarray(s["var"], np.float32)
    gamma = s.get("gamma")  # recorded since γ exists; computed for older stores (and inf/NaN, null in JSON)
    gamma = float(gamma) if gamma is not None else outlier_gamma(s["mean"], s["var"])
    return ModelStats(mean_d, var_d, float(s["std"]), float(s["scalar_mean"]), gamma)


def _json_number(value: float) -> float | None:
    """JSON has no inf or NaN: those are written as null."""
    return value if math.isfinite(value) else None


def is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_model(name: Any, width: Any, where: str, seen_lower: set[str]) -> None:
    """Model names become directory names, so they must be safe and unique even ignoring case."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (METADATA_NAME, POSITIONS_NAME):
        raise UsaeError(
            f"{where}: model name {name!r} is not a safe directory name "
            "(letters, digits, '_', '.', '-', starting with a letter or digit)"
        )
    if name.lower() in seen_lower:
        raise UsaeError(f"{where}: model name {name!r} is repeated (names are compared ignoring case)")
    seen_lower.add(name.lower())
    if not is_int(width) or width < 1:
        raise UsaeError(f"{where}: width of model {name!r} must be a positive int, got {width!r}")


def check_layout(
    image_ids: Any, tokens_per_image: Any, grid: Any, n_rows: int | None, where: str, subsampled: bool = False
) -> None:
    """Validate the optional image layout fields against each other and, if known, n_rows.

    ``subsampled``: the store keeps ``tokens_per_image`` of the grid's h·w tokens per image (then
    image_ids, tokens_per_image and grid are all required, and tokens_per_image < h·w).
    """
    if subsampled and (image_ids is None or tokens_per_image is None or grid is None):
        raise UsaeError(f"{where}: token positions need image_ids, tokens_per_image and grid")
    if image_ids is not None and (
        not isinstance(image_ids, list | tuple) or not all(isinstance(i, str) for i in image_ids)
    ):
        raise UsaeError(f"{where}: image_ids must be a list of str")
    if tokens_per_image is not None and (not is_int(tokens_per_image) or tokens_per_image < 1):
        raise UsaeError(f"{where}: tokens_per_image must be a positive int, got {tokens_per_image!r}")
    if grid is not None:
        if not isinstance(grid, list | tuple) or len(grid) != 2 or not all(is_int(g) and g >= 1 for g in grid):
            raise UsaeError(f"{where}: grid must be [h, w] positive ints, got {grid!r}")
        if subsampled and not (is_int(tokens_per_image) and tokens_per_image < grid[0] * grid[1]):
            raise UsaeError(
                f"{where}: a subsampled store keeps fewer than the grid's {grid[0] * grid[1]} tokens per image, "
                f"but tokens_per_image is {tokens_per_image} (a store of every token records no positions)"
            )
        if not subsampled and (tokens_per_image is None or grid[0] * grid[1] != tokens_per_image):
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


def check_positions(positions: Any, n_images: int, tokens_per_image: int, grid: Any, where: str) -> np.ndarray:
    """Validate token positions: (n_images, t) ints, each row strictly increasing in [0, h·w); returns int64."""
    pos = np.asarray(positions)
    if pos.ndim != 2 or pos.shape != (n_images, tokens_per_image) or (pos.size and pos.dtype.kind not in "iu"):
        raise UsaeError(
            f"{where}: token positions must be ints of shape (images, tokens_per_image) = "
            f"{(n_images, tokens_per_image)}, got {pos.dtype} {pos.shape}"
        )
    pos = pos.astype(np.int64)
    n_grid = int(grid[0]) * int(grid[1])
    if pos.size and (pos.min() < 0 or pos.max() >= n_grid):
        raise UsaeError(f"{where}: token positions outside the grid's [0, {n_grid})")
    if pos.shape[1] > 1 and not (np.diff(pos, axis=1) > 0).all():
        row = int(np.argmin((np.diff(pos, axis=1) > 0).all(axis=1)))
        raise UsaeError(f"{where}: token positions of image {row} are not strictly increasing")
    return pos


def is_store_dir(path: Path) -> bool:
    try:
        return json.loads((path / METADATA_NAME).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False
