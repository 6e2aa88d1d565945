"""Starting the runs of one ``fit_many``: each run directory opened (fresh or resumed), its model
and optimiser built, its checkpoint restored or its dictionary initialised from data, its trackers
opened; and the one pass over the store they share (build.py's ``open_data``)."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, NamedTuple

from usae.config import TrainConfig
from usae.data.source import TrainSource
from usae.errors import UsaeError
from usae.model.sae import UniversalSAE
from usae.run import save_run
from usae.training.adam import TrainOptimizer
from usae.training.build import TrainData, build_sae, load_frozen, make_optimizer, open_data, start_from_data
from usae.training.checkpoints import load_checkpoint
from usae.training.resume import open_run
from usae.training.step import TrainerState
from usae.training.trackers import Trackers, open_trackers
from usae.training.validate import BestSoFar

log = logging.getLogger(__name__)


# -- starting -------------------------------------------------------------------------------------
class Run(NamedTuple):
    """One run as the loop works on it."""

    cfg: TrainConfig
    """Resolved (training/resume.py): no auto value left None, ``out`` absolute."""
    sae: UniversalSAE
    optimizer: TrainOptimizer
    state: TrainerState
    config: dict[str, Any]
    """RUN/config.json."""
    start: int
    """The step this run starts (or resumes) at."""
    best: BestSoFar
    """Its best held-out loss so far and the validations since (restored on resume)."""


def set_up(
    cfgs: list[TrainConfig], closing: contextlib.ExitStack, source: TrainSource | None = None
) -> tuple[TrainData, list[Run], list[Trackers], Any]:
    """The shared pass over the rows (``source``, default: the store), every run started, their
    trackers and the batch loader (the last two closed by ``closing``)."""
    data = open_data(cfgs, source)
    runs = [start_run(cfg, data) for cfg in cfgs]
    if any(run.start != runs[0].start for run in runs):
        raise UsaeError("fit_many: the runs would resume from different steps; resume them one by one")
    trackers = [
        closing.enter_context(open_trackers(r.cfg.io.log, r.cfg.io.out, r.config, r.start, data.world)) for r in runs
    ]
    return data, runs, trackers, closing.enter_context(contextlib.closing(data.loader()))


def start_run(cfg: TrainConfig, data: TrainData) -> Run:
    """Open ``cfg.out`` (fresh or resumed), build the model and optimiser, then restore the checkpoint
    or initialise (and write config.json and the untrained model)."""
    opened = open_run(cfg, data.source, {n: data.store.widths[n] for n in data.names}, data.world, data.device)
    cfg = opened.cfg
    sae = build_sae(cfg, data.store, data.names, data.device)
    frozen = load_frozen(cfg, sae) if cfg.arch.extend is not None else []
    optimizer = make_optimizer(sae, cfg)
    state = TrainerState.fresh(len(data.names), cfg.arch.n_latents, data.device)
    config, best = opened.config_json(sae), BestSoFar()
    if opened.checkpoint is not None:
        trainer, saved = load_checkpoint(opened.checkpoint, sae, optimizer)
        best = BestSoFar(saved.get("val"))
        state.since_fired_ms.copy_(trainer["since_fired_ms"])
        state.n_dead.copy_(trainer["n_dead"])
        log.info("resuming %s from step %d", cfg.io.out, opened.start)
    else:
        start_from_data(sae, cfg, data.store, [n for n in data.names if n not in frozen], data.order, data.device)
        if data.world.is_main:
            save_run(cfg.io.out, sae, config)
    return Run(cfg, sae.train(), optimizer, state, config, opened.start, best)
