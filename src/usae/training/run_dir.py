"""Opening a run directory for ``fit``: fresh or resume, from which checkpoint, with which config.

:class:`RunDir` reads ``RUN/config.json`` once and answers everything ``fit`` needs before its first
step: whether the run may start here, the resolved train config to save, the checkpoint to resume
from (if any), and the metrics log to continue. The train config as saved (``resolved_train_dict``)
is also what ablations compare against.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from usae._io import write_text_atomic
from usae.config import TrainConfig, from_json_dict, to_json_dict
from usae.data.store import Store
from usae.device import native_bf16, resolve_device
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
        self.store_info = {"path": str(store.path), "hash": store.hash, "n_rows": store.n_rows}
        self.checkpoint: Checkpoint | None = latest_checkpoint(cfg.out) if cfg.resume else None
        if cfg.resume and self.checkpoint is None:
            log.warning("--resume: no checkpoint in %s yet; starting from step 0", cfg.out)

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
            if not config_path.is_file():
                raise UsaeError(f"--resume: {cfg.out} holds no run (no config.json)")
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
        if self.cfg.overwrite and not self.cfg.resume and self.path.exists():
            for stale in ("checkpoints", METRICS_NAME):
                p = self.path / stale
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
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
