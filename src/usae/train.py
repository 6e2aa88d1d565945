"""Training a UniversalSAE: ``fit(config)``, ``train_step`` and the LR schedule.

Every source of randomness during training is a pure function of (seed, step): the rows of a
batch (a per-epoch permutation), the source model of the random-source rule. A checkpoint
therefore only needs weights, optimiser state, the step and the dead-latent counters for a
resumed run to end bit-identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from usae import checkpoint as ckpt_io
from usae import distributed
from usae.config import SAEConfig, TrainConfig, from_json_dict, fsync_path, to_json_dict
from usae.data import DataOrder, Loader
from usae.distributed import World
from usae.errors import UsaeError
from usae.losses import auxk_loss, reconstruction_loss
from usae.sae import SparseCode, UniversalSAE
from usae.store import Store, open_store

log = logging.getLogger(__name__)

# Fields that may differ between a run and its resumption without changing the result.
RESUME_FREE_FIELDS = {
    "resume",
    "overwrite",
    "progress",
    "device",
    "save_every",
    "log_every",
    "steps",
    "store",
    "out",  # a run directory may be moved or copied before it is resumed
}
# AuxK uses min(k_aux, dead latents) per row; the dead count is read on this fixed cadence (a host
# sync), independent of log_every so logging settings never change the result.
DEAD_CHECK_EVERY = 25


DEFAULT_LR = 3e-2
DEFAULT_LR_WIDTH = 128


def default_lr(widths: Iterable[int]) -> float:
    """Peak LR used when --lr is not given: 3e-2 · min(1, 128 / widest model's d).

    Why 1/d: with Adam every encoder weight moves by about the LR per step, so a pre-activation
    w·x over d unit-scale inputs moves by about LR·d; keeping that step constant needs LR ∝ 1/d
    (the muP rule for a layer's fan-in). Measured: on four synthetic worlds with d ≤ 128 the best
    peak LR was 2e-2..3e-2 for 256 to 4096 latents and batch 1024 to 4096 (docs/defaults.md); on a
    synthetic world with d = 1280/1024/512 and on the real demo store (EfficientNet-Lite0 1280,
    Open-NSFW 1024, CRAFT 512) 3e-2 killed 35–94 % of the latents, while 3e-3 recovered every planted
    concept (world) and gave the best R² of {3e-2, 1e-2, 3e-3, 1e-3} (demo store, 600 steps).
    """
    widths = list(widths)
    d_max = max(widths) if widths else DEFAULT_LR_WIDTH
    return DEFAULT_LR * min(1.0, DEFAULT_LR_WIDTH / d_max)


def lr_at(step: int, peak: float, warmup: int, total: int, end_ratio: float = 0.0) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine decay to ``end_ratio * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return peak * (end_ratio + (1.0 - end_ratio) * cosine)


def sources_at(step: int, seed: int, names: list[str], rule: str) -> list[str]:
    """Models encoded at ``step``: one drawn from (seed, step) for random-source rules, else all."""
    if rule in ("all-sources", "sparc", "crosscoder"):
        return list(names)
    return [names[int(np.random.default_rng([seed, step, 7]).integers(len(names)))]]


# -- the step -----------------------------------------------------------------------------------
class StepStats(NamedTuple):
    """Detached per-step numbers (tensors: reading them syncs the device, so only at log steps)."""

    loss: Tensor
    """Total loss that was minimised."""
    recon_d: dict[str, Tensor]
    """Reconstruction loss per decoded model, averaged over sources."""
    aux: Tensor
    """AuxK loss (0 when no latent is dead)."""


def train_step(
    sae: UniversalSAE,
    optimizer: torch.optim.Optimizer,
    x_n: dict[str, Tensor],
    sources: list[str],
    cfg: TrainConfig,
    since_fired_ms: Tensor,
    k_aux: int,
    world: World = distributed.SINGLE,
    select_dtype: torch.dtype | None = None,
) -> StepStats:
    """One update: encode each source, decode into every model, sum the losses, step.

    ``x_n``: normalised (b, d_i) activations of every model on the same rows. ``since_fired_ms``
    (tokens since each latent last fired, per model) is updated in place for AuxK; ``k_aux`` dead
    latents per row feed AuxK (0: off). With several ``world`` ranks, ``x_n`` is this rank's share
    of the global batch and gradients and fire counts are averaged/summed across ranks.
    ``select_dtype``: precision of the encoders' latent-choosing matmul (None: the weights').
    """
    names = sae.model_names
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=since_fired_ms.device)
    recon = {dst: torch.zeros_like(total) for dst in names}
    aux = torch.zeros_like(total)
    for m, code, aux_code in _codes(sae, x_n, sources, cfg, since_fired_ms, k_aux, select_dtype):
        for i in range(len(names)) if m is None else (m,):
            _update_since_fired(since_fired_ms[i], code, cfg.batch_size, world)
        x_hat = sae.decode_many_normalized(names, code)
        aux_hat = sae.decode_many_normalized(names, aux_code, bias=False) if aux_code is not None else {}
        for dst in names:
            recon[dst] = recon[dst] + reconstruction_loss(x_hat[dst], x_n[dst], cfg.loss)
            if aux_code is not None:
                aux = aux + auxk_loss(aux_hat[dst], (x_n[dst] - x_hat[dst]).detach())
    if cfg.rule == "crosscoder":
        sources = sources[:1]  # one joint code: its losses are not averaged over models
    total = (sum(recon.values()) + cfg.auxk_coef * aux) / len(sources)
    # Ranks hold uneven shares of the global batch: weight each rank's mean by its share so the
    # all-reduced average gradient is the gradient of the global-batch mean.
    share = x_n[sources[0]].shape[0] * world.size / cfg.batch_size
    (total * share if world.size > 1 else total).backward()
    distributed.all_reduce_mean_([p.grad for p in sae.parameters() if p.grad is not None], world)
    if cfg.rule == "as-released":
        # The official loop steps only the sampled model's optimiser: other heads' gradients are
        # dropped (grad None -> Adam skips the parameter and leaves its moments untouched).
        for name, head in sae.heads.items():
            if name != sources[0]:
                for p in head.parameters():
                    p.grad = None
    if sae.cfg.decoder_norm == "unit":
        sae.remove_parallel_grads_()
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_([p for p in sae.parameters() if p.grad is not None], cfg.grad_clip)
    optimizer.step()
    sae.constrain_decoders_()
    n_src = len(sources)
    return StepStats(total.detach(), {d: r.detach() / n_src for d, r in recon.items()}, aux.detach() / n_src)


def _codes(
    sae: UniversalSAE,
    x_n: dict[str, Tensor],
    sources: list[str],
    cfg: TrainConfig,
    since_fired_ms: Tensor,
    k_aux: int,
    select_dtype: torch.dtype | None,
):
    """(model index, code, AuxK code) per encoded source; index None: the code belongs to every model."""
    names = sae.model_names
    if cfg.rule in ("sparc", "crosscoder"):
        codes = sae.encode_global(x_n, shared_values=cfg.rule == "crosscoder")
        if cfg.rule == "crosscoder":  # one code, counted as firing for every model
            code = codes[names[0]]
            return [(None, code, None)]
        return [(names.index(n), codes[n], None) for n in names]
    out = []
    for src in sources:
        m = names.index(src)
        dead_s = since_fired_ms[m] > cfg.dead_after_tokens
        code, aux_code = sae.encode_normalized(src, x_n[src], dead_s, k_aux, select_dtype)
        out.append((m, code, aux_code))
    return out


def _update_since_fired(since_fired_s: Tensor, code: SparseCode | Tensor, n_rows: int, world: World) -> None:
    """Count ``n_rows`` (the global batch) more tokens for every latent; reset those that fired on any rank."""
    if isinstance(code, SparseCode):
        # index_add instead of boolean-mask indexing: no device-to-host sync on GPU
        hits_s = torch.zeros_like(since_fired_s).index_add_(
            0, code.idx_bk.reshape(-1), (code.val_bk > 0).reshape(-1).long()
        )
    else:
        hits_s = (code > 0).sum(0)
    distributed.all_reduce_sum_(hits_s, world)
    since_fired_s.add_(n_rows).masked_fill_(hits_s > 0, 0)


# -- fit ----------------------------------------------------------------------------------------
class FitResult(NamedTuple):
    """What ``fit`` returns."""

    sae: UniversalSAE
    """The trained model (eval mode)."""
    run_dir: Path
    """Where config.json, model.safetensors and metrics.jsonl were written."""
    last_metrics: dict[str, float]
    """The last metrics.jsonl record."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UsaeError(f"--device: unknown device {device!r}") from None


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware (then 3-4x faster than float32)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        caps = torch.cpu.get_capabilities()
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    return False


def resolved_train_dict(cfg: TrainConfig, widths: dict[str, int], device: torch.device | None = None) -> dict[str, Any]:
    """TrainConfig as saved (``widths``: the trained models' d, in order): auto values filled in."""
    select = cfg.select_precision
    if select is None:
        sparse_path = cfg.encoder == "linear" and cfg.activation == "topk" and cfg.rule not in ("sparc", "crosscoder")
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


def _prepare_run_dir(cfg: TrainConfig) -> None:
    config_path = cfg.out / ckpt_io.CONFIG_NAME
    if cfg.resume:
        if not config_path.is_file():
            raise UsaeError(f"--resume: {cfg.out} holds no run (no config.json)")
        saved = ckpt_io.read_run_config(cfg.out)["train"]
        given = to_json_dict(cfg)
        for key, value in saved.items():
            current = given.get(key)
            if key not in RESUME_FREE_FIELDS and current is not None and current != value:
                raise UsaeError(f"--resume: {key}={current!r} differs from the run's {key}={value!r} ({config_path})")
    elif config_path.exists() and not cfg.overwrite:
        raise UsaeError(f"{cfg.out} already holds a run; pass --resume to continue or --overwrite to replace it")
    elif cfg.overwrite and cfg.out.exists():
        for stale in ("checkpoints", "metrics.jsonl"):
            p = cfg.out / stale
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


def build_sae(cfg: TrainConfig, store: Store, names: list[str], device: torch.device) -> UniversalSAE:
    """A UniversalSAE for ``names`` with the store's normalisation, randomly initialised (seeded)."""
    sae_cfg = SAEConfig(
        widths={n: store.widths[n] for n in names},
        n_latents=cfg.n_latents,
        k=cfg.k,
        encoder=cfg.encoder,
        activation=cfg.activation,
        decoder_norm=cfg.decoder_norm,
    )
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
    """
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
    started = [_start_run(cfg, store, names, order, world, device) for cfg in cfgs]
    if len({start for _, start in started}) > 1:
        raise UsaeError("fit_many: the runs would resume from different steps; resume them one by one")
    runs = [run for run, _ in started]
    lasts = _loop(runs, Loader(store, names, order, device, world.rank, world.size), started[0][1])
    results = []
    for run, last in zip(runs, lasts, strict=True):
        distributed.average_buffers_(run.sae, world)
        if world.is_main:
            ckpt_io.save_run(run.cfg.out, run.sae, run.run_cfg)
        if run.cfg.save_every == 0 or run.cfg.steps % run.cfg.save_every != 0:
            _save(run, run.cfg.steps)
        results.append(FitResult(run.sae.eval(), run.cfg.out, last))
    return results


def _start_run(cfg: TrainConfig, store: Store, names: list[str], order: DataOrder, world: World, device):
    """Build (or restore) one run's model, optimiser and state; returns (run, first step)."""
    if world.is_main:
        _prepare_run_dir(cfg)
    distributed.barrier(world)
    sae = build_sae(cfg, store, names, device)
    frozen = _load_frozen(cfg, sae) if cfg.extend is not None else []
    optimizer = make_optimizer(sae, cfg)
    state = TrainerState(
        torch.zeros(len(names), cfg.n_latents, dtype=torch.int64, device=device), torch.zeros((), dtype=torch.int64)
    )
    train_dict = resolved_train_dict(cfg, {n: store.widths[n] for n in names}, device)
    if cfg.resume and cfg.select_precision is None:  # keep the run's choice on another machine
        saved = ckpt_io.read_run_config(cfg.out)["train"].get("select_precision")
        train_dict["select_precision"] = saved or "float32"
    run_cfg = ckpt_io.run_config(sae, train_dict, {"path": str(store.path), "hash": store.hash, "n_rows": store.n_rows})
    if cfg.resume:
        _check_resume_store(cfg, store)
    latest = ckpt_io.latest_checkpoint(cfg.out) if cfg.resume else None
    start = 0
    if latest is not None:
        trainer, _ = ckpt_io.load_checkpoint(latest, sae, optimizer)
        state.since_fired_ms.copy_(trainer["since_fired_ms"])
        state.n_dead.copy_(trainer["n_dead"])
        start = latest.step
        log.info("resuming %s from step %d", cfg.out, start)
    else:
        if cfg.resume:
            log.warning("--resume: no checkpoint in %s yet; starting from step 0", cfg.out)
        _init(sae, cfg, store, [n for n in names if n not in frozen], order, device)
        if world.is_main:
            ckpt_io.save_run(cfg.out, sae, run_cfg)
    run = _Run(sae, optimizer, cfg, names, state, train_dict, world, cfg.out / "metrics.jsonl", run_cfg)
    if world.is_main:
        _truncate_metrics(run.metrics_path, start)
    return run, start


def _check_resume_store(cfg: TrainConfig, store: Store) -> None:
    saved_hash = ckpt_io.read_run_config(cfg.out).get("store", {}).get("hash")
    if saved_hash is not None and saved_hash != store.hash:
        raise UsaeError(f"--resume: store {store.path} ({store.hash[:12]}) is not the run's store ({saved_hash[:12]})")


def _load_frozen(cfg: TrainConfig, sae: UniversalSAE) -> list[str]:
    """--extend: copy the old run's models into ``sae`` and freeze them; returns their names.

    The old run's dictionary stays exactly as it was: only the new models' encoders and decoders
    receive gradients, so their concepts land on the existing latents.
    """
    old = ckpt_io.load(cfg.extend)
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
        ckpt_io.save_checkpoint(run.cfg.out, step, run.sae, run.optimizer, tensors, {"seed": run.cfg.seed})
    distributed.barrier(run.world)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log records past ``step`` (written after the checkpoint we resume from)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line torn by a kill in the middle of an append
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    fsync_path(tmp)
    os.replace(tmp, path)


def _loop(runs: list[_Run], loader: Loader, start: int) -> list[dict[str, float]]:
    """Step every run on each batch, read once; returns each run's last logged record."""
    cfg0 = runs[0].cfg
    for run in runs:
        run.sae.train()
    lasts: list[dict[str, float]] = [{} for _ in runs]
    show = cfg0.progress and runs[0].world.is_main
    bar = tqdm(range(start, cfg0.steps), initial=start, total=cfg0.steps, disable=not show, desc="train", mininterval=1)
    try:
        for step in bar:
            batch = loader.get(step)
            for i, run in enumerate(runs):
                record = _advance(run, batch, step)
                if record:
                    lasts[i] = record
                    if i == 0:  # only on a new record: a postfix redraw per step floods logs
                        bar.set_postfix(loss=f"{record['train/loss']:.4f}", refresh=False)
    finally:
        loader.close()
    return lasts


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
    return rec


def load_train_config(path: Path) -> TrainConfig:
    """The TrainConfig saved in a run's config.json."""
    cfg = ckpt_io.read_run_config(path)
    return from_json_dict(TrainConfig, cfg["train"], f"{path}/config.json: train")
