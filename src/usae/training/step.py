"""One training step (``train_step``) and the learning-rate schedule it runs under.

Every source of randomness during training is a pure function of (seed, step): the rows of a
batch (a per-epoch permutation), the source model of the random-source rule. A checkpoint
therefore only needs weights, optimiser state, the step and the dead-latent counters for a
resumed run to end bit-identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor

from usae import distributed
from usae.config import TrainConfig
from usae.distributed import World
from usae.model.losses import auxk_loss, reconstruction_loss
from usae.model.sae import SparseCode, UniversalSAE
from usae.training.adam import TrainOptimizer
from usae.training.rules import RULES

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


class TrainerState(NamedTuple):
    """Loop state beyond weights and optimiser that a checkpoint must carry."""

    since_fired_ms: Tensor
    """(m, s) int64: tokens each model encoded since each latent last fired."""
    n_dead: Tensor
    """() int64 on the host: most dead latents of any model at the last check (AuxK uses
    min(k_aux, n_dead))."""

    @classmethod
    def fresh(cls, n_models: int, n_latents: int, device: torch.device) -> TrainerState:
        """The state of a run's first step: no latent has fired, none counts as dead."""
        since_fired_ms = torch.zeros(n_models, n_latents, dtype=torch.int64, device=device)
        return cls(since_fired_ms, torch.zeros((), dtype=torch.int64))


class StepStats(NamedTuple):
    """Detached per-step numbers (tensors: reading them syncs the device, so only at log steps).

    Under torchrun each is this rank's mean weighted by its share of the global batch, so their
    mean over ranks is the global batch's."""

    loss: Tensor
    """Total loss that was minimised."""
    recon_d: dict[str, Tensor]
    """Reconstruction loss per decoded model, averaged over sources."""
    aux: Tensor
    """AuxK loss (0 when no latent is dead)."""


def train_step(
    sae: UniversalSAE,
    optimizer: TrainOptimizer,
    x_n: dict[str, Tensor],
    sources: list[str],
    cfg: TrainConfig,
    state: TrainerState,
    world: World = distributed.SINGLE,
) -> StepStats:
    """One update: encode each source, decode into every model, sum the losses, step.

    ``x_n``: normalised (b, d_i) activations of every model on the same rows. ``cfg``: resolved
    (``training.resume.resolve``: ``k_aux`` and ``select_precision`` set). ``state.since_fired_ms``
    is updated in place; ``min(k_aux, state.n_dead)`` dead latents per row feed AuxK. With several
    ``world`` ranks, ``x_n`` is this rank's share of the global batch and gradients and fire counts
    are averaged/summed across ranks.
    """
    names, rule, opt = sae.model_names, RULES[cfg.optim.rule], cfg.optim
    k_aux = min(opt.k_aux, int(state.n_dead)) if opt.auxk_coef > 0 else 0  # n_dead is on the host: no sync
    optimizer.zero_grad(set_to_none=True)
    since_fired_ms = state.since_fired_ms
    total = torch.zeros((), device=since_fired_ms.device)
    recon = {dst: torch.zeros_like(total) for dst in names}
    aux = torch.zeros_like(total)
    for m, code, aux_code in _codes(sae, x_n, sources, cfg, since_fired_ms, k_aux):
        for i in range(len(names)) if m is None else (m,):
            _update_since_fired(since_fired_ms[i], code, cfg.data.batch_size, world)
        x_hat = sae.decode_many_normalized(names, code)
        aux_hat = sae.decode_many_normalized(names, aux_code, bias=False) if aux_code is not None else {}
        for dst in names:
            recon[dst] = recon[dst] + reconstruction_loss(x_hat[dst], x_n[dst], opt.loss)
            if aux_code is not None:
                aux = aux + auxk_loss(aux_hat[dst], (x_n[dst] - x_hat[dst]).detach())
    n_codes = 1 if rule.shared_values else len(sources)  # one joint code: its losses are not averaged
    total = (sum(recon.values()) + opt.auxk_coef * aux) / n_codes
    # Ranks hold uneven shares of the global batch: weight each rank's mean by its share so the
    # all-reduced average gradient is the gradient of the global-batch mean.
    # A rank may hold no row of a step (a source with fewer chunks than ranks): its means are NaN
    # (0/0) and count with weight 0 (its parameter gradients are sums over no rows: zeros).
    share = x_n[sources[0]].shape[0] * world.size / cfg.data.batch_size
    if world.size > 1:
        total, aux = torch.nan_to_num(total) * share, torch.nan_to_num(aux) * share
        recon = {d: torch.nan_to_num(r) * share for d, r in recon.items()}
    total.backward()
    distributed.all_reduce_mean_([p.grad for p in sae.parameters() if p.grad is not None], world)
    if rule.source_grads_only:
        # The official loop steps only the sampled model's optimiser: other heads' gradients are
        # dropped (grad None -> Adam skips the parameter and leaves its moments untouched).
        for name, head in sae.heads.items():
            if name != sources[0]:
                for p in head.parameters():
                    p.grad = None
    if sae.cfg.decoder_norm == "unit":
        sae.remove_parallel_grads_()
    if opt.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_([p for p in sae.parameters() if p.grad is not None], opt.grad_clip)
    optimizer.step()
    sae.constrain_decoders_()
    return StepStats(total.detach(), {d: r.detach() / n_codes for d, r in recon.items()}, aux.detach() / n_codes)


def _codes(
    sae: UniversalSAE, x_n: dict[str, Tensor], sources: list[str], cfg: TrainConfig, since_fired_ms: Tensor, k_aux: int
):
    """(model index, code, AuxK code) per encoded source; index None: the code belongs to every model."""
    names, rule = sae.model_names, RULES[cfg.optim.rule]
    if rule.global_code:
        codes = sae.encode_global(x_n, shared_values=rule.shared_values)
        if rule.shared_values:  # one code, counted as firing for every model
            return [(None, codes[names[0]], None)]
        return [(names.index(n), codes[n], None) for n in names]
    select_dtype = getattr(torch, cfg.optim.select_precision)  # of the encoders' latent-choosing matmul
    out = []
    for src in sources:
        m = names.index(src)
        dead_s = since_fired_ms[m] > cfg.optim.dead_after_tokens
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
