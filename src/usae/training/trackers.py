"""Experiment trackers (``usae train --log wandb tensorboard``): metrics.jsonl, mirrored live.

Every record ``fit`` appends to RUN/metrics.jsonl goes, key for key, to each tracker the run names,
at the record's ``step``; the run's config.json is the tracker's config (wandb) or hparams
(tensorboard). Trackers only read numbers the loop already computed, so they never change a result
(``log`` is a result-free field). Only rank 0 opens them. Neither package is a dependency: each is
imported when asked for, and a missing one is a one-line UsaeError (as sparsify does with wandb).
"""

from __future__ import annotations

import importlib
import json
import logging
import netrc
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from usae.distributed import World
from usae.errors import UsaeError

log = logging.getLogger(__name__)

WANDB_DIR = "wandb"
"""RUN/wandb/: wandb's own files (offline runs to ``wandb sync``) and the run id resume continues."""
WANDB_ID_NAME = "usae-run-id"
TENSORBOARD_DIR = "tensorboard"
"""RUN/tensorboard/: event files (``tensorboard --logdir RUN/tensorboard``)."""

# The package each tracker imports: checked before training starts, so a missing one costs nothing.
PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard"}


def require(kinds: Iterable[str]) -> None:
    """Raise a one-line UsaeError naming the pip extra when a tracker's package is not installed."""
    for kind in kinds:
        try:
            importlib.import_module(PACKAGES[kind])
        except ImportError:
            raise UsaeError(f"--log {kind} needs the {PACKAGES[kind]} package: pip install 'usae[tracking]'") from None


class Tracker(Protocol):
    def log(self, record: dict[str, float]) -> None: ...

    def close(self, failed: bool) -> None: ...


class Trackers:
    """The run's trackers as one: ``log`` sends a metrics.jsonl record to each; a context manager
    that closes them all (marking the tracker run failed when training raised)."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log(self, record: dict[str, float]) -> None:
        for tracker in self.trackers:
            tracker.log(record)

    def close(self, failed: bool = False) -> None:
        while self.trackers:
            self.trackers.pop().close(failed)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


def open_trackers(kinds: Iterable[str], run_dir: Path, run_cfg: dict[str, Any], start: int, world: World) -> Trackers:
    """Trackers for the run in ``run_dir`` that starts (or resumes) at step ``start``; none off rank 0.

    A resumed run continues the same tracker run: wandb under the id saved in RUN/wandb/, and
    tensorboard drops events past the checkpoint (purge), so records after ``start`` that a killed
    run had logged are replaced by the resumed run's, as in metrics.jsonl.
    """
    opened = Trackers([])
    if not world.is_main:
        return opened
    try:
        for kind in kinds:
            opener = _Wandb if kind == "wandb" else _Tensorboard
            opened.trackers.append(opener(Path(run_dir), run_cfg, start))
    except BaseException:
        opened.close(failed=True)
        raise
    return opened


def _scalars(record: dict[str, float]) -> tuple[int, dict[str, float]]:
    """A metrics.jsonl record as (step, every other key -> value)."""
    return int(record["step"]), {k: v for k, v in record.items() if k != "step"}


class _Tensorboard:
    """Scalars under the record's keys at its step; config.json as hparams (flattened) and as text."""

    def __init__(self, run_dir: Path, run_cfg: dict[str, Any], start: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: readers drop events at steps >= it that an earlier (killed or overwritten)
        # session wrote; the record *at* ``start`` is kept, as metrics.jsonl keeps it.
        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=start + 1)
        self.run_cfg = run_cfg
        self.hparams_written = False

    def log(self, record: dict[str, float]) -> None:
        step, scalars = _scalars(record)
        if not self.hparams_written:  # the hparams plugin wants the metric names: this record's keys
            self._write_hparams(list(scalars))
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # records are rare (every log_every steps): make them visible at once

    def _write_hparams(self, metric_names: list[str]) -> None:
        from torch.utils.tensorboard.summary import hparams

        # Written into this run's own event file (SummaryWriter.add_hparams would open a sub-run).
        file_writer = self.writer._get_file_writer()
        for summary in hparams(_flat_hparams(self.run_cfg), {name: 0.0 for name in metric_names}):
            file_writer.add_summary(summary)
        self.writer.add_text("config.json", "```\n" + json.dumps(self.run_cfg, indent=1) + "\n```")
        self.hparams_written = True

    def close(self, failed: bool) -> None:
        self.writer.close()


def _flat_hparams(cfg: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """config.json flattened to ``a/b`` keys with scalar values (hparams take no lists or None)."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= _flat_hparams(value, f"{name}/")
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


class _Wandb:
    """A wandb run in RUN/wandb/, config = config.json; each record logged at its step."""

    def __init__(self, run_dir: Path, run_cfg: dict[str, Any], start: int) -> None:
        import wandb

        mode = wandb_mode()
        if mode == "offline":
            log.info(
                "wandb: offline (no WANDB_MODE, no API key); upload later with: wandb sync %s", run_dir / WANDB_DIR
            )
        (run_dir / WANDB_DIR).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "usae",
            name=run_dir.name,
            id=_run_id(run_dir, start),
            resume="allow",
            dir=str(run_dir),
            config=run_cfg,
            mode=mode,
            # fit_many trains several runs at once, each its own wandb run; the console is the
            # user's terminal, not one run's.
            reinit="create_new",
            settings=wandb.Settings(console="off"),
        )

    def log(self, record: dict[str, float]) -> None:
        step, scalars = _scalars(record)
        # After a resume from a checkpoint, steps the killed run already sent are dropped by wandb
        # (steps only grow); they held the same numbers, as a resumed run is bit-identical.
        self.run.log(scalars, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def _run_id(run_dir: Path, start: int) -> str:
    """The wandb run id: the saved one when resuming a run that has one, else a new one (saved)."""
    id_path = run_dir / WANDB_DIR / WANDB_ID_NAME
    if start > 0 and id_path.is_file():
        run_id = id_path.read_text().strip()
        if run_id:
            return run_id
    run_id = secrets.token_hex(6)
    id_path.write_text(run_id + "\n")
    return run_id


def wandb_mode() -> str | None:
    """'offline' unless WANDB_MODE says otherwise or an API key is found (env or netrc); None: wandb's own choice."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return None
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        if host and netrc.netrc(os.environ.get("NETRC")).authenticators(host):
            return None
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"
