"""Metrics as pure tensor functions, as defined in the USAE paper (Thasarathan et al. 2025, §4).

Notation: m models, s latents. ``fires_ms[i, k]`` counts the rows where latent k *fires* for
model i, i.e. where the code obtained by encoding model i's own activations exceeds tau.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def r2_from_sums(sse: Tensor | float, sst: Tensor | float) -> Tensor:
    """R² = 1 - SSE / SST (SST: total squared deviation of the targets around their mean)."""
    sse, sst = torch.as_tensor(sse, dtype=torch.float64), torch.as_tensor(sst, dtype=torch.float64)
    return 1.0 - sse / sst


def r2(x_bd: Tensor, x_hat_bd: Tensor) -> Tensor:
    """R² of a reconstruction over all elements; SST around the per-dimension mean of ``x_bd``."""
    x, x_hat = x_bd.double(), x_hat_bd.double()
    sse = (x - x_hat).square().sum()
    sst = (x - x.mean(0)).square().sum()
    return r2_from_sums(sse, sst)


def fvu(x_bd: Tensor, x_hat_bd: Tensor) -> Tensor:
    """Fraction of variance unexplained = SSE / SST = 1 - R²."""
    return 1.0 - r2(x_bd, x_hat_bd)


def l0(z_bs: Tensor) -> Tensor:
    """Mean number of non-zero latents per row."""
    return (z_bs != 0).sum(1).double().mean()


def dead_fraction(fires_s: Tensor) -> Tensor:
    """Fraction of latents that never fired (``fires_s``: per-latent fire counts)."""
    return (fires_s == 0).double().mean()


def firing_entropy(fires_ms: Tensor) -> Tensor:
    """FE_k = -(1/log m) sum_i p_ik log p_ik, p_ik = fires_ik / sum_j fires_jk.

    1 = the latent fires equally often for every model (universal); 0 = one model only.
    NaN for latents that never fire. With one model the entropy is defined as 0.
    """
    fires = fires_ms.double()
    total_s = fires.sum(0)
    p_ms = fires / total_s
    plogp = torch.where(p_ms > 0, p_ms * torch.log(p_ms), torch.zeros_like(p_ms))
    m = fires.shape[0]
    fe_s = -plogp.sum(0) / math.log(m) if m > 1 else torch.zeros_like(total_s)
    return torch.where(total_s > 0, fe_s, torch.full_like(fe_s, float("nan")))


def cofire_proportion(cofires_s: Tensor, fires_ms: Tensor) -> Tensor:
    """CFP_ik = |rows where latent k fires in every model| / fires_ik; NaN where fires_ik = 0."""
    fires = fires_ms.double()
    cfp = cofires_s.double() / fires
    return torch.where(fires > 0, cfp, torch.full_like(cfp, float("nan")))


def energy(mean_z_ms: Tensor, dict_norm_ms: Tensor) -> Tensor:
    """energy_ik = ||mean_x z_k(x) * D_i[k]||² = (mean code of latent k for model i)² * ||D_i[k]||².

    ``mean_z_ms``: mean code value over rows (zeros included) when encoding model i;
    ``dict_norm_ms``: norm of latent k's dictionary row of model i, in raw units.
    """
    return (mean_z_ms.double() * dict_norm_ms.double()).square()


def classify_latents(fires_ms: Tensor, n_rows: int, min_rate: float = 1e-4, universal_fe: float = 0.0) -> list[str]:
    """Label each latent 'universal' | 'partial' | 'specific' | 'dead' by which models use it.

    Model i *uses* latent k when it fires on at least ``min_rate`` of the rows (and at least once).
    Universal: used by every model and firing entropy >= ``universal_fe``; partial: used by 2..m-1
    models (or by all with lower entropy); specific: one model; dead: none. With m = 1 every live
    latent is 'specific'.
    """
    used_ms = fires_ms >= max(1.0, min_rate * n_rows)
    n_users_s = used_ms.sum(0)
    fe_s = firing_entropy(fires_ms).nan_to_num(0.0)
    m = fires_ms.shape[0]
    labels = []
    for n_users, fe in zip(n_users_s.tolist(), fe_s.tolist(), strict=True):
        if n_users == 0:
            labels.append("dead")
        elif n_users == 1:
            labels.append("specific")
        elif n_users == m and fe >= universal_fe:
            labels.append("universal")
        else:
            labels.append("partial")
    return labels
