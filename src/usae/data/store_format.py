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

FORMAT = "usae-store"
SCHEMA_VERSION = 1
METADATA_NAME = "metadata.json"
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
        }


def is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_model(name: Any, width: Any, where: str, seen_lower: set[str]) -> None:
    """Model names become directory names, so they must be safe and unique even ignoring case."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name == METADATA_NAME:
        raise UsaeError(
            f"{where}: model name {name!r} is not a safe directory name "
            "(letters, digits, '_', '.', '-', starting with a letter or digit)"
        )
    if name.lower() in seen_lower:
        raise UsaeError(f"{where}: model name {name!r} is repeated (names are compared ignoring case)")
    seen_lower.add(name.lower())
    if not is_int(width) or width < 1:
        raise UsaeError(f"{where}: width of model {name!r} must be a positive int, got {width!r}")


def check_layout(image_ids: Any, tokens_per_image: Any, grid: Any, n_rows: int | None, where: str) -> None:
    """Validate the optional image layout fields against each other and, if known, n_rows."""
    if image_ids is not None and (
        not isinstance(image_ids, list | tuple) or not all(isinstance(i, str) for i in image_ids)
    ):
        raise UsaeError(f"{where}: image_ids must be a list of str")
    if tokens_per_image is not None and (not is_int(tokens_per_image) or tokens_per_image < 1):
        raise UsaeError(f"{where}: tokens_per_image must be a positive int, got {tokens_per_image!r}")
    if grid is not None:
        if not isinstance(grid, list | tuple) or len(grid) != 2 or not all(is_int(g) and g >= 1 for g in grid):
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


def is_store_dir(path: Path) -> bool:
    try:
        return json.loads((path / METADATA_NAME).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False
