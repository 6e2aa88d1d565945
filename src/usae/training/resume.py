"""Opening a run directory for ``fit``: fresh or resume, from which checkpoint, with which config.

``claim_run_dirs`` checks and locks every ``--out`` before anything is written. ``open_run`` then
answers everything ``fit`` needs before its first step, in one call: whether the run may start here
(a resume must match the run's settings, store and checkpoints), the resolved config the loop reads
(``resolve``: auto values filled in, as config.json saves them), the checkpoint to resume from (if
any), and the metrics log cut back to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from usae import distributed
from usae._io import (
    LOCK_NAME,
    artifact_format,
    check_output,
    dir_lock,
    output_dir,
    read_json,
    write_json_atomic,
    write_text_atomic,
)
from usae.config import TrainConfig, to_json_dict
from usae.config.train import default_k_aux, default_warmup
from usae.data.source import TrainSource
from usae.device import native_bf16, resolve_device
from usae.distributed import World, env_rank
from usae.errors import UsaeError
from usae.model.sae import UniversalSAE
from usae.run import CONFIG_NAME, METRICS_NAME, RESULT_FREE_FIELDS, differing_field, read_run_config, run_config
from usae.training.checkpoints import Checkpoint, latest_checkpoint
from usae.training.rules import RULES
from usae.training.step import default_lr
from usae.training.validate import default_val_every

log = logging.getLogger(__name__)

# A resumed run may also train for more steps than it was started with.
RESUME_FREE_FIELDS = RESULT_FREE_FIELDS | {"steps"}


def resolve(
    cfg: TrainConfig,
    widths: dict[str, int],
    device: torch.device | None = None,
    saved: dict[str, Any] | None = None,
    held_out: bool = False,
) -> TrainConfig:
    """``cfg`` with every auto value filled in, as the loop reads it and config.json saves it.

    ``widths``: the trained models' d, in order (they become ``models``); ``device``: where the run
    trains (it picks ``select_precision``); ``saved``: the ``train`` object of the run being resumed,
    whose ``select_precision`` is kept on another machine; ``held_out``: the store has a held-out
    twin (``val_every`` defaults on). ``out`` becomes absolute: where the run lives, which a resume checks.
    """
    select = cfg.optim.select_precision
    if select is None and saved is not None:
        select = saved.get("select_precision") or "float32"
    if select is None:
        sparse_path = cfg.arch.encoder == "linear" and cfg.arch.activation == "topk"
        sparse_path = sparse_path and not RULES[cfg.optim.rule].global_code
        bf16 = sparse_path and native_bf16(device or resolve_device(cfg.data.device))
        select = "bfloat16" if bf16 else "float32"
    optim = dataclasses.replace(
        cfg.optim,
        lr=cfg.optim.lr if cfg.optim.lr is not None else default_lr(widths.values()),
        warmup_steps=cfg.optim.warmup_steps if cfg.optim.warmup_steps is not None else default_warmup(cfg.data.steps),
        k_aux=cfg.optim.k_aux if cfg.optim.k_aux is not None else default_k_aux(cfg.arch.n_latents),
        select_precision=select,
    )
    # with --images, --models are the backbone specs (recorded as given); else the trained store models
    data = cfg.data if cfg.source.images is not None else dataclasses.replace(cfg.data, models=tuple(widths))
    val_every = cfg.io.val_every if cfg.io.val_every is not None else (saved or {}).get("val_every")
    if val_every is None:
        val_every = default_val_every(cfg.data.steps, cfg.io.log_every) if held_out else 0
    io = dataclasses.replace(cfg.io, out=Path(os.path.abspath(cfg.io.out)), val_every=val_every)
    return dataclasses.replace(cfg, data=data, optim=optim, io=io)


@contextlib.contextmanager
def claim_run_dirs(cfgs: list[TrainConfig]) -> Iterator[None]:
    """Check, create and lock every run's ``--out`` for the whole training (rank 0; others pass).

    Before anything is written: ``--out`` may not be the file-system root, the store being read
    (or inside it, or contain it), or a non-empty directory that is not a run unless --overwrite.
    Then an advisory lock (RUN/.usae.lock) makes a second writer fail with one line naming the
    holder. A run that fails before writing anything leaves no empty directory.
    """
    with contextlib.ExitStack() as held:
        if env_rank() == 0:
            outs = [
                check_output(c.io.out, "usae-run", overwrite=c.io.overwrite, reading=reading_paths(c), replaces=False)
                for c in cfgs
            ]
            if len(set(outs)) < len(outs):
                raise UsaeError(f"two runs write to the same --out {outs[0]}")
            for out in outs:
                held.enter_context(output_dir(out))
                held.enter_context(dir_lock(out / LOCK_NAME, f"run {out}"))
        yield


class OpenedRun(NamedTuple):
    """A run directory opened for training: what the loop reads and where it starts."""

    cfg: TrainConfig
    """The resolved config (``resolve``): no auto value left None, ``out`` absolute."""
    store_info: dict[str, Any]
    """config.json's ``store``: the store's absolute path, the path as given, content hash and rows
    (with --images: the images, backbones and their hash; data/source.py)."""
    checkpoint: Checkpoint | None
    """The checkpoint to resume from (None: a fresh start)."""

    @property
    def start(self) -> int:
        """The first step to run: the checkpoint's, or 0 for a fresh start."""
        return self.checkpoint.step if self.checkpoint is not None else 0

    def config_json(self, sae: UniversalSAE) -> dict[str, Any]:
        """What RUN/config.json holds for ``sae`` trained with this run's settings."""
        return run_config(sae, to_json_dict(self.cfg), self.store_info)


def reading_paths(cfg: TrainConfig) -> tuple[Path, ...]:
    """The local paths a run reads (its store, or its image sources): --out must stay clear of them."""
    if cfg.data.store is not None:
        return (cfg.data.store,)
    given = (cfg.source.images, cfg.source.val_images)
    return tuple(Path(p) for p in given if p is not None and os.path.exists(p))


def open_run(
    cfg: TrainConfig, source: TrainSource, widths: dict[str, int], world: World, device: torch.device
) -> OpenedRun:
    """``cfg.io.out`` opened for training ``cfg`` on ``source`` (every rank; rank 0 also prepares it).

    Raises a one-line UsaeError when the run may not start: a run already there without
    --resume/--overwrite, --resume with other settings or another store than the run's, or a
    config.json edited after training started. Rank 0 then drops an overwritten run's checkpoints
    and log, records where a moved run now lives, and cuts the log back to the checkpoint.
    """
    saved = _saved_run(cfg, source)
    held_out = source.held_out is not None
    resolved = resolve(cfg, widths, device, saved["train"] if saved is not None else None, held_out)
    checkpoint = latest_checkpoint(cfg.io.out) if saved is not None else None
    if saved is not None and checkpoint is None:
        log.warning("--resume: no checkpoint in %s yet; starting from step 0", cfg.io.out)
    moved = saved is not None and _moved(cfg.io.out, saved["train"], checkpoint)
    opened = OpenedRun(resolved, source.info, checkpoint)
    if world.is_main:
        _prepare(resolved, saved if moved else None, opened.start)
    distributed.barrier(world)
    return opened


def _saved_run(cfg: TrainConfig, source: TrainSource) -> dict[str, Any] | None:
    """Refuse a start that would lose or mix runs; returns the saved config.json when resuming."""
    config_path = cfg.io.out / CONFIG_NAME
    if cfg.io.resume:
        if not config_path.exists():  # a first launch and every restart run the same command line
            log.info("--resume: %s holds no run yet; starting one", cfg.io.out)
            return None
        saved = read_run_config(cfg.io.out)
        diff = differing_field(saved["train"], cfg, RESUME_FREE_FIELDS)
        if diff is not None:
            key, current, value = diff
            raise UsaeError(f"--resume: {key}={current!r} differs from the run's {key}={value!r} ({config_path})")
        saved_hash, rows = saved.get("store", {}).get("hash"), source.rows
        if saved_hash is not None and saved_hash != rows.hash:
            what = "images and backbones" if cfg.source.images is not None else "store"
            raise UsaeError(f"--resume: {what} {rows.path} ({rows.hash[:12]}) are not the run's ({saved_hash[:12]})")
        return saved
    if config_path.exists() and not cfg.io.overwrite:
        raise UsaeError(f"{cfg.io.out} already holds a run; pass --resume to continue or --overwrite to replace it")
    return None


def _moved(out: Path, saved_train: dict[str, Any], checkpoint: Checkpoint | None) -> bool:
    """Check config.json's train settings against the checkpoint's; True when the run has moved here.

    A checkpoint records the train settings it was written with, so an edit to config.json
    after training started (``train.out`` or any setting --resume does not let change) is
    refused. A run moved whole (config.json and checkpoints agree on an ``out`` that is not
    here) continues where it now is.
    """
    config_path = out / CONFIG_NAME
    at_ckpt: dict[str, Any] = {}
    if checkpoint is not None:
        state = read_json(checkpoint.path / "state.json", "checkpoint state")
        at_ckpt = state.get("train") or {} if isinstance(state, dict) else {}  # none: an older usae
    for key in sorted((set(saved_train) | set(at_ckpt)) - RESUME_FREE_FIELDS) if at_ckpt else ():
        if saved_train.get(key) != at_ckpt.get(key):
            raise UsaeError(
                f"{config_path}: train.{key} is {saved_train.get(key)!r} but {checkpoint.path.name} was "
                f"written with {at_ckpt.get(key)!r}; config.json was edited after training started"
            )
    saved_out, ckpt_out = saved_train.get("out"), at_ckpt.get("out")
    if saved_out is None or _same_place(str(saved_out), out):
        return False
    if ckpt_out is not None and ckpt_out != saved_out:
        raise UsaeError(
            f"{config_path}: train.out is {saved_out!r} but {checkpoint.path.name} was written at "
            f"{ckpt_out!r}; config.json was edited after training started (the run lives at {out})"
        )
    log.info("--resume: the run was created at %s and has moved to %s; continuing here", saved_out, out)
    return True


def _prepare(cfg: TrainConfig, moved: dict[str, Any] | None, start: int) -> None:
    """Rank 0, before anything is written: drop an overwritten run's checkpoints and log; record in
    config.json (``moved``, the saved one) where a moved run lives now; cut the log back to ``start``."""
    # Only a run's own leftovers are deleted; --overwrite into a foreign directory deletes nothing.
    if cfg.io.overwrite and not cfg.io.resume and artifact_format(cfg.io.out) == "usae-run":
        for stale in ("checkpoints", METRICS_NAME):
            p = cfg.io.out / stale
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    if moved is not None:
        write_json_atomic(cfg.io.out / CONFIG_NAME, {**moved, "train": {**moved["train"], "out": str(cfg.io.out)}})
    _truncate_metrics(cfg.io.out / METRICS_NAME, start)


def _truncate_metrics(metrics_path: Path, step: int) -> None:
    """Drop log records past ``step`` (written after the checkpoint we resume from)."""
    if not metrics_path.exists():
        return
    keep = []
    for line in metrics_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line torn by a kill in the middle of an append
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            keep.append(line)
    write_text_atomic(metrics_path, "".join(line + "\n" for line in keep))


def _same_place(saved_out: str, out: Path) -> bool:
    """True when ``out`` is the directory a run saved as its ``out`` (absolute; older runs saved it as given)."""
    saved, here = Path(saved_out), Path(os.path.realpath(out))
    if saved.is_absolute():
        return Path(os.path.realpath(saved)) == here
    return here.parts[-len(saved.parts) :] == saved.parts
