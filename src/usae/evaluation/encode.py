"""``usae encode RUN STORE --out DIR``: every row's top-k concept ids and values, per model.

The format (and its reader, ``open_codes``) is data/codes.py's; this module applies a run to a store.
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

import numpy as np
import torch
from tqdm.auto import tqdm

from usae._io import check_output, fsync_path, output_dir, publish_dir, save_npy, write_durable
from usae._version import __version__
from usae.config import EncodeConfig
from usae.data.codes import FORMAT, METADATA_NAME, SCHEMA_VERSION, codes_shard_names, shard_digests, top_codes
from usae.device import resolve_device
from usae.errors import UsaeError
from usae.run import load, open_run_store, read_run_config

log = logging.getLogger(__name__)


def encode_store(cfg: EncodeConfig) -> Path:
    """Write the sparse codes of every row of ``cfg.store`` under ``cfg.run``; returns the directory.

    --out is checked before anything is written (not the run or the store, nor inside or around
    them; an existing directory only with --overwrite and only if it holds codes). A failed
    command publishes nothing and leaves no newly created empty directory.
    """
    out = check_output(cfg.out, FORMAT, overwrite=cfg.overwrite, reading=(cfg.run, cfg.store), replaces=True)
    device = resolve_device(cfg.device)
    sae = load(cfg.run, device=device)
    names = list(cfg.models) if cfg.models else sae.model_names
    unknown = [n for n in names if n not in sae.model_names]
    if unknown:
        raise UsaeError(f"--models: {unknown[0]!r} is not a model of run {cfg.run} ({sae.model_names})")
    sae, store = open_run_store(sae, cfg.store, str(device), models=names)  # only the models encoded
    k = cfg.k if cfg.k is not None else (sae.k if sae.cfg.activation == "topk" else min(4 * sae.k, sae.n_latents))
    if not 1 <= k <= sae.n_latents:  # before allocating (rows, k) shards: a huge --k was a MemoryError
        raise UsaeError(f"--k {k}: must be in [1, n_latents={sae.n_latents}]")
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
        "shard_sha256": {name: [] for name in names},  # per shard [indices, values]: `usae verify` re-hashes
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
            meta["shard_sha256"][name].append(shard_digests(idx_mbk[name], val_mbk[name]))
    for name in names:
        fsync_path(partial / name)
    bar.close()


def encode_command(cfg: EncodeConfig) -> str:
    """``usae encode``: what the command prints."""
    return f"codes: {encode_store(cfg)}"
