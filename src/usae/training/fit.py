"""``fit``/``fit_many``: train UniversalSAEs on a store, one batch read once for all runs.

The loop around ``train_step`` (step.py): build or restore each run (run_dir.py, checkpoints.py),
read batches (data/loader.py), step, count dead latents, log metrics.jsonl (and to --log trackers,
trackers.py), save checkpoints, time each run's own steps.
Under torchrun every rank runs this; only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from usae import distributed
from usae.config import TrainConfig
from usae.data.loader import DataOrder, Loader
from usae.data.store import Store, open_store
from usae.device import require_memory, resolve_device
from usae.distributed import World
from usae.errors import UsaeError
from usae.model.sae import UniversalSAE
from usae.run import load, save_run
from usae.training.checkpoints import load_checkpoint, save_checkpoint
from usae.training.rules import sources_at
from usae.training.run_dir import RunDir, claim_run_dirs
from usae.training.step import StepStats, lr_at, train_step
from usae.training.trackers import Trackers, open_trackers, require

log = logging.getLogger(__name__)

# AuxK uses min(k_aux, dead latents) per row; the dead count is read on this fixed cadence (a host
# sync), independent of log_every so logging settings never change the result.
DEAD_CHECK_EVERY = 25
# Past this many passes over a store, a run is warned that it may overfit (issue: 170 passes on 7k rows
# gave self R² 0.74 in-sample, 0.29 on held-out images of the same folder).
MANY_PASSES = 10


# -- fit ----------------------------------------------------------------------------------------
class FitResult(NamedTuple):
    """What ``fit`` returns."""

    sae: UniversalSAE
    """The trained model (eval mode)."""
    run_dir: Path
    """Where config.json, model.safetensors and metrics.jsonl were written."""
    last_metrics: dict[str, float]
    """The last metrics.jsonl record."""
    step_seconds: float = 0.0
    """Seconds this run spent in its own steps in this process (train step, dead check, log record,
    checkpoints; data loading excluded, so runs trained together by ``fit_many`` are compared fairly).
    On CUDA, the GPU's time between events around each step."""
    steps_timed: int = 0
    """Steps timed in ``step_seconds``: those this process ran (after a resume, from its checkpoint)."""


def _normalization(store: Store, name: str, mode: str) -> tuple[Tensor, Tensor]:
    st = store.stats(name)
    d = store.widths[name]
    mean_d = torch.as_tensor(np.asarray(st.mean), dtype=torch.float32)
    if mode == "scalar":
        return mean_d, torch.tensor(max(st.std, 1e-8))
    if mode == "per-dim":
        return mean_d, torch.as_tensor(np.sqrt(np.asarray(st.var)), dtype=torch.float32).clamp_min(1e-8)
    if mode == "paper":
        total_std = math.sqrt(st.std**2 + float(np.var(np.asarray(st.mean))))
        return torch.full((d,), st.scalar_mean), torch.tensor(max(total_std, 1e-8))
    return torch.zeros(d), torch.ones(())


def build_sae(cfg: TrainConfig, store: Store, names: list[str], device: torch.device) -> UniversalSAE:
    """A UniversalSAE for ``names`` with the store's normalisation, randomly initialised (seeded)."""
    sae_cfg = cfg.sae_config({n: store.widths[n] for n in names})
    sae = UniversalSAE(sae_cfg, generator=torch.Generator().manual_seed(cfg.seed))
    for name in names:
        sae.set_normalization_(name, *_normalization(store, name, cfg.normalization))
    return sae.to(device)


def make_optimizer(sae: UniversalSAE, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam/AdamW, fused (one kernel over all parameters, on CPU and GPU): ~15% faster steps."""
    if cfg.optimizer == "adamw":
        enc = [p for n, p in sae.named_parameters() if n.endswith("W_enc")]
        rest = [p for n, p in sae.named_parameters() if not n.endswith("W_enc")]
        groups = [
            {"params": enc, "weight_decay": cfg.weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=0.0, betas=cfg.betas, fused=True)
    return torch.optim.Adam(sae.parameters(), lr=0.0, betas=cfg.betas, fused=True)


def _check_models(cfg: TrainConfig, store: Store) -> list[str]:
    names = list(cfg.models) if cfg.models else store.model_names
    for name in names:
        if name not in store.widths:
            raise UsaeError(f"--models: {name!r} is not in store {store.path} (models: {store.model_names})")
    if cfg.batch_size > store.n_rows:
        log.warning("batch_size %d exceeds the store's %d rows; rows repeat in a batch", cfg.batch_size, store.n_rows)
    require_memory(
        resolve_device(cfg.device),
        cfg.sae_config({n: store.widths[n] for n in names}).batch_bytes(cfg.batch_size),
        f"one step of --batch-size {cfg.batch_size} x --n-latents {cfg.n_latents}",
        "lower --batch-size or --n-latents",
    )
    passes = cfg.steps * cfg.batch_size / store.n_rows
    log.info(
        "training %d steps x %d rows = %.1f passes over the store's %d rows",
        cfg.steps,
        cfg.batch_size,
        passes,
        store.n_rows,
    )
    if passes > MANY_PASSES:
        log.warning(
            "%.0f passes over %d rows: the dictionary may memorise this store; measure it on held-out images "
            "(usae extract --val-fraction) or extract more images",
            passes,
            store.n_rows,
        )
    return names


def fit(cfg: TrainConfig) -> FitResult:
    """Train a UniversalSAE on ``cfg.store`` and write the run to ``cfg.out`` (see checkpoint.py).

    Under torchrun (WORLD_SIZE > 1) every rank runs this; rows of each global batch are split
    across ranks, gradients averaged, and only rank 0 writes.
    """
    return fit_many([cfg])[0]


# Fields that fix which rows each step reads: runs that agree on them can share one pass.
DATA_FIELDS = ("store", "models", "batch_size", "seed", "steps", "shuffle_buffer_mb", "device")


def fit_many(cfgs: list[TrainConfig]) -> list[FitResult]:
    """Train several runs in lockstep on one pass over the store (each batch is read once).

    The configs may differ in anything but ``DATA_FIELDS`` (rule, n_latents, k, lr, ...), and must
    all start fresh or all resume from the same step. Each run's result equals training it alone.
    Every run directory is checked and locked (one writer each) before anything is written.
    """
    for cfg in cfgs:  # a missing tracker package fails before anything is written
        require(cfg.log)
    with claim_run_dirs(cfgs):
        return _fit_claimed(cfgs)


def _fit_claimed(cfgs: list[TrainConfig]) -> list[FitResult]:
    first = cfgs[0]
    for cfg in cfgs[1:]:
        for f in DATA_FIELDS:
            if getattr(cfg, f) != getattr(first, f):
                raise UsaeError(f"fit_many: runs differ in {f!r} ({getattr(cfg, f)!r} vs {getattr(first, f)!r})")
    store = open_store(first.store)
    names = _check_models(first, store)
    world, device = distributed.init(resolve_device(first.device))
    row_bytes = store.dtype.itemsize * sum(store.widths[n] for n in names)
    window_rows = max(first.batch_size, first.shuffle_buffer_mb * 2**20 // row_bytes)
    order = DataOrder(store.n_rows, first.batch_size, first.seed, window_rows=window_rows)
    runs = [_start_run(cfg, store, names, order, world, device) for cfg in cfgs]
    if len({run.start for run in runs}) > 1:
        raise UsaeError("fit_many: the runs would resume from different steps; resume them one by one")
    with contextlib.ExitStack() as opened:  # trackers close (marked failed on an error) after the loop
        runs = [run._replace(tracker=opened.enter_context(_trackers(run))) for run in runs]
        timed = _loop(runs, Loader(store, names, order, device, world.rank, world.size), runs[0].start, device)
    results = []
    for run, (last, seconds, n_timed) in zip(runs, timed, strict=True):
        distributed.average_buffers_(run.sae, world)
        if world.is_main:
            save_run(run.cfg.out, run.sae, run.run_cfg)
        if run.cfg.save_every == 0 or run.cfg.steps % run.cfg.save_every != 0:
            _save(run, run.cfg.steps)
        results.append(FitResult(run.sae.eval(), run.cfg.out, last, seconds, n_timed))
    return results


def _trackers(run: _Run) -> Trackers:
    return open_trackers(run.cfg.log, run.cfg.out, run.run_cfg, run.start, run.world)


def _start_run(cfg: TrainConfig, store: Store, names: list[str], order: DataOrder, world: World, device) -> _Run:
    """Build (or restore) one run's model, optimiser and state."""
    run_dir = RunDir(cfg, store, {n: store.widths[n] for n in names}, device)
    if world.is_main:
        run_dir.prepare()
    distributed.barrier(world)
    sae = build_sae(cfg, store, names, device)
    frozen = _load_frozen(cfg, sae) if cfg.extend is not None else []
    optimizer = make_optimizer(sae, cfg)
    state = TrainerState(
        torch.zeros(len(names), cfg.n_latents, dtype=torch.int64, device=device), torch.zeros((), dtype=torch.int64)
    )
    run_cfg = run_dir.config_json(sae)
    if run_dir.checkpoint is not None:
        trainer, _ = load_checkpoint(run_dir.checkpoint, sae, optimizer)
        state.since_fired_ms.copy_(trainer["since_fired_ms"])
        state.n_dead.copy_(trainer["n_dead"])
        log.info("resuming %s from step %d", cfg.out, run_dir.start)
    else:
        _init(sae, cfg, store, [n for n in names if n not in frozen], order, device)
        if world.is_main:
            save_run(cfg.out, sae, run_cfg)
    return _Run(
        sae, optimizer, cfg, names, state, run_dir.train_dict, world, run_dir.metrics_path, run_cfg, run_dir.start
    )


def _load_frozen(cfg: TrainConfig, sae: UniversalSAE) -> list[str]:
    """--extend: copy the old run's models into ``sae`` and freeze them; returns their names.

    The old run's dictionary stays exactly as it was: only the new models' encoders and decoders
    receive gradients, so their concepts land on the existing latents.
    """
    old = load(cfg.extend)
    if old.n_latents != sae.n_latents or old.cfg.encoder != sae.cfg.encoder:
        raise UsaeError(
            f"--extend: {cfg.extend} has n_latents={old.n_latents}, encoder={old.cfg.encoder!r}; "
            f"pass the same --n-latents/--encoder"
        )
    missing = [n for n in old.model_names if n not in sae.model_names]
    if missing:
        raise UsaeError(f"--extend: store {cfg.store} lacks the run's models {missing} (rows must pair with them)")
    if len(old.model_names) == len(sae.model_names):
        raise UsaeError(f"--extend: store {cfg.store} has no model beyond those of {cfg.extend}")
    for name in old.model_names:
        head = sae.head(name)
        head.load_state_dict(old.head(name).state_dict())
        head.requires_grad_(False)
    return old.model_names


class _Run(NamedTuple):
    """What the training loop works on."""

    sae: UniversalSAE
    optimizer: torch.optim.Optimizer
    cfg: TrainConfig
    names: list[str]
    state: TrainerState
    train_dict: dict[str, Any]
    world: World
    metrics_path: Path
    run_cfg: dict[str, Any]
    start: int
    """The step this run starts (or resumes) at."""
    tracker: Trackers | None = None
    """Where ``_record`` also sends each record (``--log``), on rank 0."""


def _init(sae: UniversalSAE, cfg: TrainConfig, store: Store, names: list[str], order: DataOrder, device) -> None:
    if cfg.init != "data" or not names:
        return
    rows = np.sort(order.rows(0)[: max(cfg.n_latents, 1)])
    x_n = {n: sae.normalize(n, torch.from_numpy(store.take(n, rows)).to(device)) for n in names}
    sae.init_from_data_(x_n, generator=torch.Generator().manual_seed(cfg.seed + 1))


class TrainerState(NamedTuple):
    """Loop state beyond weights and optimiser that a checkpoint must carry."""

    since_fired_ms: Tensor
    """(m, s) int64: tokens each model encoded since each latent last fired."""
    n_dead: Tensor
    """() int64: most dead latents of any model at the last check (AuxK uses min(k_aux, n_dead))."""


def _save(run: _Run, step: int) -> None:
    distributed.average_buffers_(run.sae, run.world)
    if run.world.is_main:
        tensors = {"since_fired_ms": run.state.since_fired_ms, "n_dead": run.state.n_dead}
        save_checkpoint(
            run.cfg.out, step, run.sae, run.optimizer, tensors, {"seed": run.cfg.seed, "train": run.train_dict}
        )
    distributed.barrier(run.world)


class _Timed(NamedTuple):
    """One run's outcome of the loop."""

    last: dict[str, float]
    """The last logged record."""
    step_seconds: float
    """Seconds in this run's own steps (see FitResult.step_seconds)."""
    steps_timed: int


def _loop(runs: list[_Run], loader: Loader, start: int, device: torch.device) -> list[_Timed]:
    """Step every run on each batch, read once; returns each run's last logged record and step time."""
    cfg0 = runs[0].cfg
    for run in runs:
        run.sae.train()
    lasts: list[dict[str, float]] = [{} for _ in runs]
    timer = _StepTimer(len(runs), device)
    show = cfg0.progress and runs[0].world.is_main
    bar = tqdm(range(start, cfg0.steps), initial=start, total=cfg0.steps, disable=not show, desc="train", mininterval=1)
    try:
        for step in bar:
            batch = loader.get(step)
            for i, run in enumerate(runs):
                began = timer.start()
                record = _advance(run, batch, step)
                timer.stop(i, began)
                if record:
                    lasts[i] = record
                    if i == 0:  # only on a new record: a postfix redraw per step floods logs
                        bar.set_postfix(loss=f"{record['train/loss']:.4f}", refresh=False)
    finally:
        loader.close()
    seconds = timer.seconds()
    return [_Timed(last, sec, n) for last, sec, n in zip(lasts, seconds, timer.n_steps, strict=True)]


class _StepTimer:
    """Seconds each run spends in its own steps: the wall clock on CPU; on CUDA, events recorded
    around each step and read in batches, so the GPU's real time is measured without the host sync
    per step that ``torch.cuda.synchronize`` would add (it would stall the queue and slow training)."""

    READ_EVERY = 512  # pending event pairs: one host sync per this many timed steps

    def __init__(self, n_runs: int, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.total = [0.0] * n_runs
        self.n_steps = [0] * n_runs
        self.pending: list[tuple[int, Any, Any]] = []

    def start(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))  # the run's device, whichever is current
        return event

    def stop(self, i: int, began: Any) -> None:
        self.n_steps[i] += 1
        if not self.cuda:
            self.total[i] += time.perf_counter() - began
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record(torch.cuda.current_stream(self.device))
        self.pending.append((i, began, end))
        if len(self.pending) >= self.READ_EVERY:
            self._read()

    def seconds(self) -> list[float]:
        self._read()
        return list(self.total)

    def _read(self) -> None:
        if self.pending:
            self.pending[-1][2].synchronize()
        for i, began, end in self.pending:
            self.total[i] += began.elapsed_time(end) / 1000  # elapsed_time is in ms
        self.pending.clear()


def _advance(run: _Run, batch: dict[str, Tensor], step: int) -> dict[str, float] | None:
    """One training step of ``run``, plus its periodic dead check, log record and checkpoint."""
    sae, cfg, state = run.sae, run.cfg, run.state
    lr = lr_at(step, run.train_dict["lr"], run.train_dict["warmup_steps"], cfg.steps, cfg.lr_end_ratio)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    x_n = {n: sae.normalize(n, batch[n]) for n in run.names}
    sources = sources_at(step, cfg.seed, run.names, cfg.rule)
    k_aux = min(cfg.resolved_k_aux(), int(state.n_dead)) if cfg.auxk_coef > 0 else 0
    select_dtype = getattr(torch, run.train_dict["select_precision"])
    stats = train_step(sae, run.optimizer, x_n, sources, cfg, state.since_fired_ms, k_aux, run.world, select_dtype)
    done = step + 1
    if done % DEAD_CHECK_EVERY == 0:
        state.n_dead.fill_(int((state.since_fired_ms > cfg.dead_after_tokens).sum(1).max()))
    record = None
    if done % cfg.log_every == 0 or done == cfg.steps:
        record = _record(run, done, lr, stats)
    if cfg.save_every and done % cfg.save_every == 0:
        _save(run, done)
    return record


def _record(run: _Run, step: int, lr: float, stats: StepStats) -> dict[str, float]:
    """Average the step's numbers over ranks and append them to metrics.jsonl (rank 0)."""
    names = run.names
    values = [stats.loss, stats.aux, *(stats.recon_d[n] for n in names)]
    flat = torch.stack(values).float()
    distributed.all_reduce_mean_([flat], run.world)
    dead_m = (run.state.since_fired_ms > run.cfg.dead_after_tokens).double().mean(1)
    rec: dict[str, float] = {"step": step, "lr": lr, "train/loss": float(flat[0]), "train/aux": float(flat[1])}
    for i, name in enumerate(names):
        rec[f"train/recon/{name}"] = float(flat[2 + i])
        rec[f"train/dead/{name}"] = float(dead_m[i])
    if run.world.is_main:
        with run.metrics_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if run.tracker is not None:
            run.tracker.log(rec)
    return rec


def train_command(cfg: TrainConfig) -> str:
    """``usae train``: fit, then what the command prints (training/summary.py)."""
    from usae.training.summary import format_trained

    result = fit(cfg)
    return format_trained(result.sae, result.run_dir, cfg.store)
