"""``fit``/``fit_many``: train UniversalSAEs on a store, one batch read once for all runs.

``fit_many`` is the whole loop: set-up (open or resume each run directory, build, restore: resume.py,
build.py, checkpoints.py), then one block that reads each batch (data/loader.py) and, for every run,
sets the LR, steps (``train_step``, step.py), counts dead latents, logs metrics.jsonl (and to --log
trackers, trackers.py), saves checkpoints and times the run's own steps (timing.py).
Under torchrun every rank runs this; only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from usae import distributed
from usae.config import TrainConfig, to_json_dict
from usae.config.train import DataConfig
from usae.data.loader import DataOrder, Loader
from usae.data.store import Store, open_store
from usae.device import resolve_device
from usae.distributed import World
from usae.errors import UsaeError
from usae.model.sae import UniversalSAE
from usae.run import METRICS_NAME, save_run
from usae.training.build import build_sae, load_frozen, make_optimizer, start_from_data, trained_models
from usae.training.checkpoints import load_checkpoint, save_checkpoint
from usae.training.resume import claim_run_dirs, open_run
from usae.training.rules import sources_at
from usae.training.step import StepStats, TrainerState, lr_at, train_step
from usae.training.timing import StepTimer
from usae.training.trackers import Trackers, open_trackers, require

__all__ = ["FitResult", "build_sae", "fit", "fit_many", "make_optimizer", "train_command"]

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


def fit(cfg: TrainConfig) -> FitResult:
    """Train a UniversalSAE on ``cfg.store`` and write the run to ``cfg.out`` (see checkpoints.py).

    Under torchrun (WORLD_SIZE > 1) every rank runs this; rows of each global batch are split
    across ranks, gradients averaged, and only rank 0 writes.
    """
    return fit_many([cfg])[0]


def fit_many(cfgs: list[TrainConfig]) -> list[FitResult]:
    """Train several runs in lockstep on one pass over the store (each batch is read once).

    The configs may differ in anything but their ``data`` group (rule, n_latents, k, lr, ...), and
    must all start fresh or all resume from the same step. Each run's result equals training it alone.
    Every run directory is checked and locked (one writer each) before anything is written.
    """
    for cfg in cfgs:  # refused before anything is written
        require(cfg.io.log)
        _check_same_data(cfg.data, cfgs[0].data)
    steps = cfgs[0].data.steps
    with claim_run_dirs(cfgs), contextlib.ExitStack() as closing:  # trackers close (failed on an error)
        # -- set-up: the pass over the store, then each run opened (fresh or resumed), built, restored
        data = _open_data(cfgs[0])
        runs = [_start_run(cfg, data) for cfg in cfgs]
        start = runs[0].start
        if any(run.start != start for run in runs):
            raise UsaeError("fit_many: the runs would resume from different steps; resume them one by one")
        trackers = [
            closing.enter_context(open_trackers(r.cfg.io.log, r.cfg.io.out, r.config, start, data.world)) for r in runs
        ]
        loader = closing.enter_context(contextlib.closing(data.loader()))
        timer, lasts = StepTimer(len(runs), data.device), [{} for _ in runs]
        show = cfgs[0].io.progress and data.world.is_main
        bar = tqdm(range(start, steps), initial=start, total=steps, disable=not show, desc="train", mininterval=1)
        # -- the loop: every run steps on each batch
        for step in bar:
            # read the batch: this rank's rows of every model, (b, d_i) on the device, once for all runs
            batch = loader.get(step)
            for i, run in enumerate(runs):
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
                    lasts[i] = _record(run, trackers[i], data, done, lr, stats)
                    if i == 0:  # only on a new record: a postfix redraw per step floods logs
                        bar.set_postfix(loss=f"{lasts[i]['train/loss']:.4f}", refresh=False)
                # checkpoint, every --save-every steps
                if cfg.io.save_every and done % cfg.io.save_every == 0:
                    _save(run, data.world, done)
                timer.stop(i, began)
        # -- the end: every run's final weights (and checkpoint, unless the loop just wrote it)
        for run in runs:
            _finish(run, data.world)
    seconds = timer.seconds()
    return [
        FitResult(run.sae.eval(), cfg.io.out, last, sec, n)
        for cfg, run, last, sec, n in zip(cfgs, runs, lasts, seconds, timer.n_steps, strict=True)
    ]


# -- set-up -------------------------------------------------------------------------------------
class _Data(NamedTuple):
    """The pass over the store that the runs of one ``fit_many`` share."""

    store: Store
    names: list[str]
    """The models trained, in order."""
    order: DataOrder
    world: World
    device: torch.device

    def loader(self) -> Loader:
        """This rank's batches, read ahead in a background thread (close it)."""
        return Loader(self.store, self.names, self.order, self.device, self.world.rank, self.world.size)


def _check_same_data(data: DataConfig, first: DataConfig) -> None:
    for f in dataclasses.fields(DataConfig):
        mine, theirs = getattr(data, f.name), getattr(first, f.name)
        if mine != theirs:
            raise UsaeError(f"fit_many: runs differ in {f.name!r} ({mine!r} vs {theirs!r})")


def _open_data(cfg: TrainConfig) -> _Data:
    """The store, the models trained, the ranks and the row order of every step."""
    data = cfg.data
    store = open_store(data.store)
    names = trained_models(cfg, store)
    world, device = distributed.init(resolve_device(data.device))
    row_bytes = store.dtype.itemsize * sum(store.widths[n] for n in names)
    window_rows = max(data.batch_size, data.shuffle_buffer_mb * 2**20 // row_bytes)
    order = DataOrder(store.n_rows, data.batch_size, data.seed, window_rows=window_rows)
    return _Data(store, names, order, world, device)


class _Run(NamedTuple):
    """One run as the loop works on it."""

    cfg: TrainConfig
    """Resolved (training/resume.py): no auto value left None, ``out`` absolute."""
    sae: UniversalSAE
    optimizer: torch.optim.Optimizer
    state: TrainerState
    config: dict[str, Any]
    """RUN/config.json."""
    start: int
    """The step this run starts (or resumes) at."""


def _start_run(cfg: TrainConfig, data: _Data) -> _Run:
    """Open ``cfg.out`` (fresh or resumed), build the model and optimiser, then restore the checkpoint
    or initialise (and write config.json and the untrained model)."""
    opened = open_run(cfg, data.store, {n: data.store.widths[n] for n in data.names}, data.world, data.device)
    cfg = opened.cfg
    sae = build_sae(cfg, data.store, data.names, data.device)
    frozen = load_frozen(cfg, sae) if cfg.arch.extend is not None else []
    optimizer = make_optimizer(sae, cfg)
    state = TrainerState.fresh(len(data.names), cfg.arch.n_latents, data.device)
    config = opened.config_json(sae)
    if opened.checkpoint is not None:
        trainer, _ = load_checkpoint(opened.checkpoint, sae, optimizer)
        state.since_fired_ms.copy_(trainer["since_fired_ms"])
        state.n_dead.copy_(trainer["n_dead"])
        log.info("resuming %s from step %d", cfg.io.out, opened.start)
    else:
        start_from_data(sae, cfg, data.store, [n for n in data.names if n not in frozen], data.order, data.device)
        if data.world.is_main:
            save_run(cfg.io.out, sae, config)
    return _Run(cfg, sae.train(), optimizer, state, config, opened.start)


# -- in the loop --------------------------------------------------------------------------------
def _record(run: _Run, tracker: Trackers, data: _Data, step: int, lr: float, stats: StepStats) -> dict[str, float]:
    """Average the step's numbers over ranks and append them to metrics.jsonl and the trackers (rank 0)."""
    values = [stats.loss, stats.aux, *(stats.recon_d[n] for n in data.names)]
    flat = torch.stack(values).float()
    distributed.all_reduce_mean_([flat], data.world)
    dead_m = (run.state.since_fired_ms > run.cfg.optim.dead_after_tokens).double().mean(1)
    rec: dict[str, float] = {"step": step, "lr": lr, "train/loss": float(flat[0]), "train/aux": float(flat[1])}
    for i, name in enumerate(data.names):
        rec[f"train/recon/{name}"] = float(flat[2 + i])
        rec[f"train/dead/{name}"] = float(dead_m[i])
    if data.world.is_main:
        with (run.cfg.io.out / METRICS_NAME).open("a") as f:
            f.write(json.dumps(rec) + "\n")
        tracker.log(rec)
    return rec


def _save(run: _Run, world: World, step: int) -> None:
    """A resumable checkpoint at ``step`` (rank 0 writes; buffers averaged over ranks first)."""
    distributed.average_buffers_(run.sae, world)
    if world.is_main:
        tensors = {"since_fired_ms": run.state.since_fired_ms, "n_dead": run.state.n_dead}
        state = {"seed": run.cfg.data.seed, "train": to_json_dict(run.cfg)}
        save_checkpoint(run.cfg.io.out, step, run.sae, run.optimizer, tensors, state)
    distributed.barrier(world)


def _finish(run: _Run, world: World) -> None:
    """The trained model to RUN/model.safetensors, and the last checkpoint unless the loop wrote it."""
    distributed.average_buffers_(run.sae, world)
    if world.is_main:
        save_run(run.cfg.io.out, run.sae, run.config)
    steps, save_every = run.cfg.data.steps, run.cfg.io.save_every
    if save_every == 0 or steps % save_every != 0:
        _save(run, world, steps)


def train_command(cfg: TrainConfig) -> str:
    """``usae train``: fit, then what the command prints (training/summary.py)."""
    from usae.training.summary import format_trained

    result = fit(cfg)
    return format_trained(result.sae, result.run_dir, cfg.store)
