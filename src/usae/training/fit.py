"""``fit``/``fit_many``: train UniversalSAEs on a store, one batch read once for all runs.

``fit_many`` is the whole loop: set-up (open or resume each run directory, build, restore: start.py,
resume.py, build.py, checkpoints.py), then one block that reads each batch (data/loader.py) and, for every run,
sets the LR, steps (``train_step``, step.py), counts dead latents, logs metrics.jsonl (and to --log
trackers, trackers.py), validates on the held-out twin and keeps the best model (validate.py), saves
checkpoints and times the run's own steps (timing.py); --patience ends a run early.
Under torchrun every rank runs this; only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from usae import distributed
from usae.config import TrainConfig, to_json_dict
from usae.data.source import TrainSource
from usae.distributed import World
from usae.model.sae import UniversalSAE
from usae.run import METRICS_NAME, save_run
from usae.training.build import (
    TrainData,
    build_sae,
    check_same_data,
    make_optimizer,
)
from usae.training.checkpoints import save_checkpoint
from usae.training.resume import claim_run_dirs
from usae.training.rules import sources_at
from usae.training.start import Run, set_up
from usae.training.step import StepStats, lr_at, train_step
from usae.training.timing import StepTimer
from usae.training.trackers import Trackers, require
from usae.training.validate import save_best

__all__ = ["FitResult", "build_sae", "fit", "fit_many", "make_optimizer"]

log = logging.getLogger(__name__)

# AuxK uses min(k_aux, dead latents) per row; the dead count is read on this fixed cadence (a host
# sync), independent of log_every so logging settings never change the result.
DEAD_CHECK_EVERY = 25


class FitResult(NamedTuple):
    """What ``fit`` returns."""

    sae: UniversalSAE
    """The trained model (eval mode)."""
    run_dir: Path
    """Where config.json, model.safetensors and metrics.jsonl were written (``--out`` as given)."""
    last_metrics: dict[str, float]
    """The last metrics.jsonl record."""
    step_seconds: float = 0.0
    """Seconds this run spent in its own steps in this process (train step, dead check, log record,
    checkpoints; data loading excluded, so runs trained together by ``fit_many`` are compared fairly).
    On CUDA, the GPU's time between events around each step."""
    steps_timed: int = 0
    """Steps timed in ``step_seconds``: those this process ran (after a resume, from its checkpoint)."""
    best_step: int | None = None
    """The step with the lowest held-out loss (its model: RUN/best/); None without validation."""
    best_metrics: dict[str, float] | None = None
    """That step's ``val/...`` numbers."""
    last_val: dict[str, float] | None = None
    """The last validation's ``val/...`` numbers and its ``step`` (the run's last, or where
    --patience stopped it)."""
    stopped_at: int | None = None
    """The step where --patience stopped the run (None: it ran every step)."""


def fit(cfg: TrainConfig, source: TrainSource | None = None) -> FitResult:
    """Train a UniversalSAE on ``cfg.store`` (or ``source``'s rows) and write the run to ``cfg.out``.

    Under torchrun (WORLD_SIZE > 1) every rank runs this; rows of each global batch are split
    across ranks, gradients averaged, and only rank 0 writes. ``source``: rows made elsewhere
    (``usae.pipeline.train`` runs backbones on ``--images``: data/source.py).
    """
    return fit_many([cfg], source)[0]


def fit_many(cfgs: list[TrainConfig], source: TrainSource | None = None) -> list[FitResult]:
    """Train several runs in lockstep on one pass over the store (each batch is read once).

    The configs may differ in anything but their ``data`` group (rule, n_latents, k, lr, ...), and
    must all start fresh or all resume from the same step. Each run's result equals training it alone.
    Every run directory is checked and locked (one writer each) before anything is written.
    """
    for cfg in cfgs:  # refused before anything is written
        require(cfg.io.log)
    check_same_data(cfgs)
    steps = cfgs[0].data.steps
    with claim_run_dirs(cfgs), contextlib.ExitStack() as closing:  # trackers close (failed on an error)
        # -- set-up: the pass over the store, then each run opened (fresh or resumed), built, restored
        data, runs, trackers, loader = set_up(cfgs, closing, source)
        start = runs[0].start
        timer, lasts = StepTimer(len(runs), data.device), [{} for _ in runs]
        show = cfgs[0].io.progress and data.world.is_main
        bar = tqdm(range(start, steps), initial=start, total=steps, disable=not show, desc="train", mininterval=1)
        # -- the loop: every run steps on each batch, until its last step or its --patience ends it
        for step in bar:
            live = [i for i, run in enumerate(runs) if not run.best.stopped(run.cfg.optim.patience)]
            if not live:
                break
            # read the batch: this rank's rows of every model, (b, d_i) on the device, once for all runs
            batch = loader.get(step)
            for i in live:
                run = runs[i]
                began, cfg, opt = timer.start(), run.cfg, run.cfg.optim
                # learning rate: linear warmup, then cosine decay; a pure function of the step
                lr = lr_at(step, opt.lr, opt.warmup_steps, steps, opt.lr_end_ratio)
                for group in run.optimizer.param_groups:
                    group["lr"] = lr
                # step: encode this step's sources (drawn from seed and step), decode into every model, update
                x_n = {n: run.sae.normalize(n, batch[n]) for n in data.names}
                sources = sources_at(step, cfg.data.seed, data.names, opt.rule)
                stats = train_step(run.sae, run.optimizer, x_n, sources, cfg, run.state, data.world)
                done = step + 1
                # dead check: on a fixed cadence (a host sync), so logging settings never change the result
                if done % DEAD_CHECK_EVERY == 0:
                    run.state.n_dead.fill_(int((run.state.since_fired_ms > opt.dead_after_tokens).sum(1).max()))
                # log: metrics.jsonl and the trackers, every --log-every steps and at the last
                if done % cfg.io.log_every == 0 or done == steps:
                    lasts[i] = _record(run, trackers[i], data, done, {"lr": lr, **_train_numbers(stats, data)})
                    if i == 0:  # only on a new record: a postfix redraw per step floods logs
                        bar.set_postfix(loss=f"{lasts[i]['train/loss']:.4f}", **_val_postfix(run), refresh=False)
                # validate: held-out loss and R² every --val-every steps and at the last; the best kept
                if data.validator is not None and cfg.io.val_every and (done % cfg.io.val_every == 0 or done == steps):
                    _validate(run, trackers[i], data, done)
                # checkpoint, every --save-every steps and where --patience stops the run
                stopped = run.best.stopped(opt.patience)
                if (cfg.io.save_every and done % cfg.io.save_every == 0) or stopped:
                    _save(run, data.world, done)
                timer.stop(i, began)
        # -- the end: every run's final weights (and checkpoint, unless the loop just wrote it)
        for run in runs:
            _finish(run, data.world)
    seconds = timer.seconds()
    return [
        FitResult(run.sae.eval(), cfg.io.out, last, sec, n, *run.best.result(), _stopped_at(run))
        for cfg, run, last, sec, n in zip(cfgs, runs, lasts, seconds, timer.n_steps, strict=True)
    ]


# -- in the loop --------------------------------------------------------------------------------
def _train_numbers(stats: StepStats, data: TrainData) -> dict[str, float]:
    """The step's losses averaged over ranks, and the dead fraction per model (a host sync)."""
    flat = torch.stack([stats.loss, stats.aux, *(stats.recon_d[n] for n in data.names)]).float()
    distributed.all_reduce_mean_([flat], data.world)
    rec = {"train/loss": float(flat[0]), "train/aux": float(flat[1])}
    rec |= {f"train/recon/{n}": float(flat[2 + i]) for i, n in enumerate(data.names)}
    return rec


def _record(run: Run, tracker: Trackers, data: TrainData, step: int, numbers: dict[str, float]) -> dict[str, float]:
    """Append one record at ``step`` to metrics.jsonl and the trackers (rank 0); returns it."""
    rec: dict[str, float] = {"step": step, **numbers}
    if "train/loss" in numbers:
        dead_m = (run.state.since_fired_ms > run.cfg.optim.dead_after_tokens).double().mean(1)
        rec |= {f"train/dead/{n}": float(dead_m[i]) for i, n in enumerate(data.names)}
    if data.world.is_main:
        with (run.cfg.io.out / METRICS_NAME).open("a") as f:
            f.write(json.dumps(rec) + "\n")
        tracker.log(rec)
    return rec


def _validate(run: Run, tracker: Trackers, data: TrainData, step: int) -> None:
    """Score the held-out rows (every rank the same: the rows and weights are), log, keep a new best."""
    numbers = data.validator.measure(run.sae, run.cfg)
    _record(run, tracker, data, step, numbers)
    if run.best.update(numbers, step):  # the same on every rank: so is the collective below
        distributed.average_buffers_(run.sae, data.world)
        if data.world.is_main:
            save_best(run.cfg.io.out, run.sae, run.config, numbers, step)


def _val_postfix(run: Run) -> dict[str, str]:
    last = run.best.last.get("val/loss")
    return {} if last is None else {"val": f"{last:.4f}"}


def _save(run: Run, world: World, step: int) -> None:
    """A resumable checkpoint at ``step`` (rank 0 writes; buffers averaged over ranks first)."""
    distributed.average_buffers_(run.sae, world)
    if world.is_main:
        tensors = {"since_fired_ms": run.state.since_fired_ms, "n_dead": run.state.n_dead}
        state = {"seed": run.cfg.data.seed, "train": to_json_dict(run.cfg), "val": run.best.state}
        save_checkpoint(run.cfg.io.out, step, run.sae, run.optimizer, tensors, state)
    distributed.barrier(world)


def _stopped_at(run: Run) -> int | None:
    """The step where --patience stopped ``run`` (its last validation), or None."""
    return run.best.last["step"] if run.best.stopped(run.cfg.optim.patience) else None


def _finish(run: Run, world: World) -> None:
    """The trained model to RUN/model.safetensors, and the last checkpoint unless the loop wrote it
    (a run --patience stopped has its checkpoint from the step it stopped at)."""
    distributed.average_buffers_(run.sae, world)
    if world.is_main:
        save_run(run.cfg.io.out, run.sae, run.config)
    steps, save_every = run.cfg.data.steps, run.cfg.io.save_every
    if _stopped_at(run) is None and (save_every == 0 or steps % save_every != 0):
        _save(run, world, steps)
