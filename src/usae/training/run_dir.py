"""Opening a run directory for ``fit``: fresh or resume, from which checkpoint, with which config.

:class:`RunDir` reads ``RUN/config.json`` once and answers everything ``fit`` needs before its first
step: whether the run may start here, the resolved train config to save, the checkpoint to resume
from (if any), and the metrics log to continue. The train config as saved (``resolved_train_dict``)
is also what ablations compare against.
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
from typing import Any

import torch

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
from usae.config import TrainConfig, from_json_dict, to_json_dict
from usae.data.store import Store
from usae.device import native_bf16, resolve_device
from usae.distributed import env_rank
from usae.errors import UsaeError
from usae.model.sae import UniversalSAE
from usae.run import CONFIG_NAME, RESULT_FREE_FIELDS, differing_field, read_run_config, run_config
from usae.training.checkpoints import Checkpoint, latest_checkpoint
from usae.training.rules import RULES
from usae.training.step import default_lr

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
# A resumed run may also train for more steps than it was started with.
RESUME_FREE_FIELDS = RESULT_FREE_FIELDS | {"steps"}


def resolved_train_dict(cfg: TrainConfig, widths: dict[str, int], device: torch.device | None = None) -> dict[str, Any]:
    """TrainConfig as saved (``widths``: the trained models' d, in order): auto values filled in."""
    select = cfg.select_precision
    if select is None:
        sparse_path = cfg.encoder == "linear" and cfg.activation == "topk" and not RULES[cfg.rule].global_code
        bf16 = sparse_path and native_bf16(device or resolve_device(cfg.device))
        select = "bfloat16" if bf16 else "float32"
    return to_json_dict(
        dataclasses.replace(
            cfg,
            lr=cfg.lr if cfg.lr is not None else default_lr(widths.values()),
            warmup_steps=cfg.resolved_warmup(),
            k_aux=cfg.resolved_k_aux(),
            models=tuple(widths),
            select_precision=select,
        )
    )


def load_train_config(path: Path) -> TrainConfig:
    """The TrainConfig saved in a run's config.json."""
    cfg = read_run_config(path)
    return from_json_dict(TrainConfig, cfg["train"], f"{path}/{CONFIG_NAME}: train")


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
                check_output(c.out, "usae-run", overwrite=c.overwrite, reading=(c.store,), replaces=False) for c in cfgs
            ]
            if len(set(outs)) < len(outs):
                raise UsaeError(f"two runs write to the same --out {outs[0]}")
            for out in outs:
                held.enter_context(output_dir(out))
                held.enter_context(dir_lock(out / LOCK_NAME, f"run {out}"))
        yield


class RunDir:
    """``cfg.out`` opened for training ``cfg`` on ``store`` (every rank opens it; only rank 0 writes).

    Raises a one-line UsaeError when the run may not start: a run already there without
    --resume/--overwrite, or --resume with other settings or another store than the run's.
    """

    def __init__(self, cfg: TrainConfig, store: Store, widths: dict[str, int], device: torch.device) -> None:
        self.cfg, self.path = cfg, cfg.out
        self.metrics_path = cfg.out / METRICS_NAME
        saved = self._check(cfg, store)
        self.train_dict = resolved_train_dict(cfg, widths, device)
        if saved is not None and cfg.select_precision is None:  # keep the run's choice on another machine
            self.train_dict["select_precision"] = saved["train"].get("select_precision") or "float32"
        self.train_dict["out"] = os.path.abspath(cfg.out)  # where the run lives: resume checks it
        # Absolute, so the run finds its store from any working directory; the given form for display.
        self.store_info = {
            "path": os.path.abspath(store.path),
            "path_as_given": str(cfg.store),
            "hash": store.hash,
            "n_rows": store.n_rows,
        }
        self.checkpoint: Checkpoint | None = latest_checkpoint(cfg.out) if saved is not None else None
        if saved is not None and self.checkpoint is None:
            log.warning("--resume: no checkpoint in %s yet; starting from step 0", cfg.out)
        self._saved, self.moved_from = saved, None
        if saved is not None:
            self.moved_from = self._check_place(saved["train"])

    def _check_place(self, saved_train: dict[str, Any]) -> str | None:
        """Check config.json's train settings against the checkpoint's; the run's old path if it moved.

        A checkpoint records the train settings it was written with, so an edit to config.json
        after training started (``train.out`` or any setting --resume does not let change) is
        refused. A run moved whole (config.json and checkpoints agree on an ``out`` that is not
        here) continues where it now is.
        """
        config_path = self.path / CONFIG_NAME
        at_ckpt: dict[str, Any] = {}
        if self.checkpoint is not None:
            state = read_json(self.checkpoint.path / "state.json", "checkpoint state")
            at_ckpt = state.get("train") or {} if isinstance(state, dict) else {}  # none: an older usae
        for key in sorted((set(saved_train) | set(at_ckpt)) - RESUME_FREE_FIELDS) if at_ckpt else ():
            if saved_train.get(key) != at_ckpt.get(key):
                raise UsaeError(
                    f"{config_path}: train.{key} is {saved_train.get(key)!r} but {self.checkpoint.path.name} was "
                    f"written with {at_ckpt.get(key)!r}; config.json was edited after training started"
                )
        saved_out, ckpt_out = saved_train.get("out"), at_ckpt.get("out")
        if saved_out is None or _same_place(str(saved_out), self.path):
            return None
        if ckpt_out is not None and ckpt_out != saved_out:
            raise UsaeError(
                f"{config_path}: train.out is {saved_out!r} but {self.checkpoint.path.name} was written at "
                f"{ckpt_out!r}; config.json was edited after training started (the run lives at {self.path})"
            )
        log.info("--resume: the run was created at %s and has moved to %s; continuing here", saved_out, self.path)
        return str(saved_out)

    @property
    def start(self) -> int:
        """The first step to run: the checkpoint's, or 0 for a fresh start."""
        return self.checkpoint.step if self.checkpoint is not None else 0

    def config_json(self, sae: UniversalSAE) -> dict[str, Any]:
        """What RUN/config.json holds for ``sae`` trained with this run's settings."""
        return run_config(sae, self.train_dict, self.store_info)

    @staticmethod
    def _check(cfg: TrainConfig, store: Store) -> dict[str, Any] | None:
        """Refuse a start that would lose or mix runs; returns the saved config.json when resuming."""
        config_path = cfg.out / CONFIG_NAME
        if cfg.resume:
            if not config_path.exists():  # a first launch and every restart run the same command line
                log.info("--resume: %s holds no run yet; starting one", cfg.out)
                return None
            saved = read_run_config(cfg.out)
            diff = differing_field(saved["train"], cfg, RESUME_FREE_FIELDS)
            if diff is not None:
                key, current, value = diff
                raise UsaeError(f"--resume: {key}={current!r} differs from the run's {key}={value!r} ({config_path})")
            saved_hash = saved.get("store", {}).get("hash")
            if saved_hash is not None and saved_hash != store.hash:
                raise UsaeError(
                    f"--resume: store {store.path} ({store.hash[:12]}) is not the run's store ({saved_hash[:12]})"
                )
            return saved
        if config_path.exists() and not cfg.overwrite:
            raise UsaeError(f"{cfg.out} already holds a run; pass --resume to continue or --overwrite to replace it")
        return None

    def prepare(self) -> None:
        """Rank 0, before anything is written: drop an overwritten run's checkpoints and log; cut the
        log back to the checkpoint a resumed run starts from."""
        # Only a run's own leftovers are deleted; --overwrite into a foreign directory deletes nothing.
        if self.cfg.overwrite and not self.cfg.resume and artifact_format(self.path) == "usae-run":
            for stale in ("checkpoints", METRICS_NAME):
                p = self.path / stale
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        if self.moved_from is not None:  # config.json says where the run lives now
            write_json_atomic(
                self.path / CONFIG_NAME,
                {**self._saved, "train": {**self._saved["train"], "out": self.train_dict["out"]}},
            )
        self._truncate_metrics(self.start)

    def _truncate_metrics(self, step: int) -> None:
        """Drop log records past ``step`` (written after the checkpoint we resume from)."""
        if not self.metrics_path.exists():
            return
        keep = []
        for line in self.metrics_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line torn by a kill in the middle of an append
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                keep.append(line)
        write_text_atomic(self.metrics_path, "".join(line + "\n" for line in keep))


def _same_place(saved_out: str, out: Path) -> bool:
    """True when ``out`` is the directory a run saved as its ``out`` (absolute; older runs saved it as given)."""
    saved, here = Path(saved_out), Path(os.path.realpath(out))
    if saved.is_absolute():
        return Path(os.path.realpath(saved)) == here
    return here.parts[-len(saved.parts) :] == saved.parts
