"""Sparse codes of a store for downstream analysis: ``usae encode RUN STORE --out DIR``.

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

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from usae._io import check_output, fsync_path, output_dir, publish_dir, save_npy, write_durable
from usae._version import __version__
from usae.config import EncodeConfig
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


def encode_store(cfg: EncodeConfig) -> Path:
    """Write the sparse codes of every row of ``cfg.store`` under ``cfg.run``; returns the directory.

    --out is checked before anything is written (not the run or the store, nor inside or around
    them; an existing directory only with --overwrite and only if it holds codes). A failed
    command publishes nothing and leaves no newly created empty directory.
    """
    from usae.data.store import open_store
    from usae.device import resolve_device
    from usae.run import load, read_run_config

    out = check_output(cfg.out, FORMAT, overwrite=cfg.overwrite, reading=(cfg.run, cfg.store), replaces=True)
    device = resolve_device(cfg.device)
    sae = load(cfg.run, device=device)
    store = open_store(cfg.store)
    names = list(cfg.models) if cfg.models else sae.model_names
    for name in names:
        if name not in sae.model_names:
            raise UsaeError(f"--models: {name!r} is not a model of run {cfg.run} ({sae.model_names})")
        if store.widths.get(name) != sae.cfg.widths[name]:
            raise UsaeError(
                f"store {store.path}: model {name!r} has width {store.widths.get(name)}, run {cfg.run} expects {sae.cfg.widths[name]}"
            )
    k = cfg.k if cfg.k is not None else (sae.k if sae.cfg.activation == "topk" else min(4 * sae.k, sae.n_latents))
    n_rows = store.n_rows if cfg.max_rows is None else min(cfg.max_rows, store.n_rows)
    run_cfg = read_run_config(cfg.run, ("usae-run", "usae-pretrained"), older_ok=True)
    meta = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "created_with": f"usae {__version__}",
        "models": names,
        "n_rows": n_rows,
        "k": k,
        "n_latents": sae.n_latents,
        "rows_per_shard": cfg.rows_per_shard,
        "n_shards": math.ceil(n_rows / cfg.rows_per_shard),
        "index_dtype": "int32",
        "value_dtype": cfg.value_dtype,
        # absolute, so the codes lead back to their run and store from anywhere; the given form for display
        "run": {"path": os.path.abspath(cfg.run), "path_as_given": str(cfg.run), "sae": run_cfg["sae"]},
        "store": {
            "path": os.path.abspath(store.path),
            "path_as_given": str(cfg.store),
            "hash": store.hash,
            "n_rows": store.n_rows,
        },
        "n_truncated_rows": dict.fromkeys(names, 0),
    }
    with output_dir(out.parent):
        partial = out.with_name(out.name + ".partial")
        try:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
            _write_shards(sae, store, names, k, n_rows, cfg, partial, meta, device)
            write_durable(partial / METADATA_NAME, lambda f: json.dump(meta, f, indent=1))
            if out.exists():
                shutil.rmtree(out)
            publish_dir(partial, out)
        except OSError as e:
            shutil.rmtree(partial, ignore_errors=True)
            where = e.filename or out
            raise UsaeError(f"{where}: could not write codes ({e.strerror or e}); nothing was published") from None
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    shown = Path(os.path.abspath(cfg.out))  # as given (symlinks kept)
    log.info("wrote codes %s: %d rows x %d models, k=%d", shown, n_rows, len(names), k)
    return shown


def _write_shards(sae, store, names, k, n_rows, cfg: EncodeConfig, partial: Path, meta, device) -> None:
    """Shard by shard, batch by batch, every model: the progress bar counts store rows (as the log does)."""
    value_dtype = np.dtype(cfg.value_dtype).newbyteorder("<")
    for name in names:
        (partial / name).mkdir()
    bar = tqdm(total=n_rows, disable=not cfg.progress, desc="encode", unit="row", mininterval=1)
    for i in range(meta["n_shards"]):
        lo, hi = i * cfg.rows_per_shard, min((i + 1) * cfg.rows_per_shard, n_rows)
        idx_mbk = {name: np.empty((hi - lo, k), "<i4") for name in names}
        val_mbk = {name: np.empty((hi - lo, k), value_dtype) for name in names}
        for start in range(lo, hi, cfg.batch_size):
            stop = min(start + cfg.batch_size, hi)
            for name in names:
                x_bd = torch.from_numpy(store.rows(name, start, stop)).to(device)
                top = top_codes(sae, name, x_bd, k)
                idx_mbk[name][start - lo : stop - lo], val_mbk[name][start - lo : stop - lo] = top.idx_bk, top.val_bk
                meta["n_truncated_rows"][name] += top.n_truncated
            bar.update(stop - start)
        idx_name, val_name = codes_shard_names(i)
        for name in names:
            save_npy(partial / name / idx_name, idx_mbk[name])
            save_npy(partial / name / val_name, val_mbk[name])
    for name in names:
        fsync_path(partial / name)
    bar.close()


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

    def dense(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """(n, n_latents) float32 dense codes of rows [start, stop)."""
        idx, val = self.read(name, start, stop)
        z = np.zeros((idx.shape[0], self.n_latents + 1), np.float32)  # column n_latents absorbs -1 slots
        np.put_along_axis(z, np.where(idx < 0, self.n_latents, idx), val, axis=1)
        return z[:, : self.n_latents]


def open_codes(codes_dir: str | Path) -> Codes:
    """Open a directory written by ``usae encode``."""
    return Codes(codes_dir)
