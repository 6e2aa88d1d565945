"""The sparse-codes format (``usae encode RUN STORE --out DIR`` writes it: evaluation/encode.py) and its reader.

On disk (specified in docs/format.md)::

    DIR/
      metadata.json                 format "usae-codes": models, n_rows, k, n_latents, shards, provenance
      <model>/indices-00000.npy     (rows, k) int32 latent ids, by decreasing value; -1 = empty slot
      <model>/values-00000.npy      (rows, k) float32/float16 code values (> 0; 0 in empty slots)
      ...

Row r of every file is row r of the store, so codes pair with the store's image_ids / grid.
Written streaming into ``DIR.partial`` (one shard of rows per model in memory) and renamed into place
once complete, like a store.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from usae.errors import UsaeError
from usae.model.sae import SparseCode, UniversalSAE

log = logging.getLogger(__name__)

FORMAT = "usae-codes"
SCHEMA_VERSION = 1
METADATA_NAME = "metadata.json"


def codes_shard_names(index: int) -> tuple[str, str]:
    """(indices file, values file) of shard ``index`` inside a model directory."""
    return f"indices-{index:05d}.npy", f"values-{index:05d}.npy"


class TopCodes(NamedTuple):
    """The k largest code entries of each row."""

    idx_bk: np.ndarray
    """(b, k) int32 latent ids by decreasing value; -1 where the slot is empty."""
    val_bk: np.ndarray
    """(b, k) float32 values (0 in empty slots)."""
    n_truncated: int
    """Rows that had more than k non-zero entries (BatchTopK only)."""


@torch.no_grad()
def top_codes(sae: UniversalSAE, name: str, x_bd: torch.Tensor, k: int) -> TopCodes:
    """Encode raw activations of model ``name`` and keep each row's ``k`` largest entries."""
    code = sae.encode_sparse(name, x_bd)
    if isinstance(code, SparseCode):
        idx_bk, val_bk, n_truncated = code.idx_bk, code.val_bk, 0
        if k < idx_bk.shape[1]:
            idx_bk, val_bk = _top(idx_bk, val_bk, k)
    else:  # BatchTopK: a dense code with a threshold, any number of non-zeros per row
        n_truncated = int(((code > 0).sum(1) > k).sum())
        top = torch.topk(code, min(k, code.shape[1]), dim=1)
        idx_bk, val_bk = top.indices, top.values
    # by decreasing value; ties broken by latent id so files do not depend on topk's order
    order = torch.argsort(idx_bk, dim=1, stable=True)
    idx_bk, val_bk = idx_bk.gather(1, order), val_bk.gather(1, order)
    order = torch.argsort(val_bk, dim=1, descending=True, stable=True)
    idx_bk, val_bk = idx_bk.gather(1, order), val_bk.gather(1, order)
    idx_bk = torch.where(val_bk > 0, idx_bk, -1)
    val_bk = val_bk.clamp_min(0)
    if idx_bk.shape[1] < k:  # pad to k slots (k larger than the code)
        pad = k - idx_bk.shape[1]
        idx_bk = torch.cat([idx_bk, idx_bk.new_full((idx_bk.shape[0], pad), -1)], 1)
        val_bk = torch.cat([val_bk, val_bk.new_zeros(val_bk.shape[0], pad)], 1)
    return TopCodes(idx_bk.int().cpu().numpy(), val_bk.float().cpu().numpy(), n_truncated)


def _top(idx_bk: torch.Tensor, val_bk: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top = torch.topk(val_bk, k, dim=1)
    return idx_bk.gather(1, top.indices), top.values


# -- reading --------------------------------------------------------------------------------
class Codes:
    """Read-only view of a codes directory; shards are memory-mapped on use."""

    def __init__(self, codes_dir: str | Path) -> None:
        self.path = Path(codes_dir)
        meta_path = self.path / METADATA_NAME
        from usae._io import read_json

        meta = read_json(meta_path, "codes metadata")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UsaeError(f"{meta_path}: not a usae codes directory (format must be {FORMAT!r})")
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise UsaeError(f"{meta_path}: unknown schema_version {meta.get('schema_version')!r}")
        for key in ("n_rows", "k", "n_latents", "rows_per_shard", "n_shards"):
            if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool) or meta[key] < 0:
                raise UsaeError(f"{meta_path}: field {key!r} must be a non-negative int")
        if not isinstance(meta.get("models"), list) or not all(isinstance(m, str) for m in meta["models"]):
            raise UsaeError(f"{meta_path}: field 'models' must be a list of names")
        self.metadata = meta
        self.model_names: list[str] = meta["models"]
        self.n_rows, self.k, self.n_latents = meta["n_rows"], meta["k"], meta["n_latents"]
        self.rows_per_shard: int = meta["rows_per_shard"]

    def _load(self, name: str, index: int, which: int) -> np.ndarray:
        if name not in self.model_names:
            raise UsaeError(f"codes {self.path}: unknown model {name!r} (models: {self.model_names})")
        path = self.path / name / codes_shard_names(index)[which]
        try:
            a = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UsaeError(f"{path}: not a readable .npy file ({' '.join(str(e).split())[:160]})") from None
        rows = min(self.rows_per_shard, self.n_rows - index * self.rows_per_shard)
        if a.shape != (rows, self.k):
            raise UsaeError(f"{path}: shape {a.shape}, expected {(rows, self.k)}")
        return a

    def read(self, name: str, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(indices (n, k) int32, values (n, k) float32) of rows [start, stop) of model ``name``."""
        stop = self.n_rows if stop is None else stop
        if not 0 <= start <= stop <= self.n_rows:
            raise UsaeError(f"codes {self.path}: rows [{start}, {stop}) outside [0, {self.n_rows})")
        idx, val = [], []
        for i in range(start // self.rows_per_shard if self.rows_per_shard else 0, self.metadata["n_shards"]):
            lo = i * self.rows_per_shard
            if lo >= stop:
                break
            a, b = max(start - lo, 0), min(stop - lo, self.rows_per_shard)
            idx.append(np.asarray(self._load(name, i, 0)[a:b]))
            val.append(np.asarray(self._load(name, i, 1)[a:b], np.float32))
        if not idx:
            return np.empty((0, self.k), np.int32), np.empty((0, self.k), np.float32)
        return np.concatenate(idx), np.concatenate(val)

    def verify(self) -> None:
        """Re-hash every shard (``shard_sha256``, where recorded) and check every entry: an index in
        [-1, n_latents), a finite value >= 0, and 0 in empty (-1) slots. UsaeError naming the file."""
        recorded = self.metadata.get("shard_sha256")
        recorded = recorded if isinstance(recorded, dict) else {}  # codes written before it lack it
        for name in self.model_names:
            for i in range(self.metadata["n_shards"]):
                files = [self._load(name, i, which) for which in (0, 1)]
                paths = [self.path / name / f for f in codes_shard_names(i)]
                for path, a, want in zip(paths, files, _recorded(recorded, name, i), strict=True):
                    if want is not None and hashlib.sha256(np.ascontiguousarray(a)).hexdigest() != want:
                        raise UsaeError(f"{path}: contents changed since writing (sha256 mismatch)")
                _check_entries(np.asarray(files[0]), np.asarray(files[1], np.float32), self.n_latents, paths)

    def dense(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """(n, n_latents) float32 dense codes of rows [start, stop)."""
        idx, val = self.read(name, start, stop)
        z = np.zeros((idx.shape[0], self.n_latents + 1), np.float32)  # column n_latents absorbs -1 slots
        np.put_along_axis(z, np.where(idx < 0, self.n_latents, idx), val, axis=1)
        return z[:, : self.n_latents]


def shard_digests(idx_bk: np.ndarray, val_bk: np.ndarray) -> list[str]:
    """[indices sha256, values sha256] of one shard's data, as metadata's ``shard_sha256`` lists them."""
    return [hashlib.sha256(np.ascontiguousarray(a)).hexdigest() for a in (idx_bk, val_bk)]


def _recorded(recorded: dict, name: str, i: int) -> list[str | None]:
    shards = recorded.get(name)
    pair = shards[i] if isinstance(shards, list) and i < len(shards) else None
    return list(pair) if isinstance(pair, list) and len(pair) == 2 else [None, None]


def _check_entries(idx_bk: np.ndarray, val_bk: np.ndarray, n_latents: int, paths: list[Path]) -> None:
    bad = (idx_bk < -1) | (idx_bk >= n_latents)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise UsaeError(f"{paths[0]}: row {row} holds latent index {int(idx_bk[bad][0])}, outside [-1, {n_latents})")
    bad = ~np.isfinite(val_bk) | (val_bk < 0) | ((idx_bk < 0) & (val_bk != 0))
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise UsaeError(
            f"{paths[1]}: row {row} holds value {float(val_bk[bad][0])!r}, not a code (finite, >= 0, 0 in empty slots)"
        )


def open_codes(codes_dir: str | Path) -> Codes:
    """Open a directory written by ``usae encode``."""
    return Codes(codes_dir)
