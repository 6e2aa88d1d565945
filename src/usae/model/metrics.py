"""Metrics as pure tensor functions, as defined in the USAE paper (Thasarathan et al. 2025, §4).

Notation: m models, s latents. ``fires_ms[i, k]`` counts the rows where latent k *fires* for
model i, i.e. where the code obtained by encoding model i's own activations exceeds tau;
``cofires_s[k]`` counts the rows where latent k fires for every model at once.

The concept classes are named here once (``CLASSES``); their thresholds are one frozen
``usae.config.evaluate.ClassThresholds`` (its defaults are ``EvalConfig``'s and report.json's).
docs/report.md gives each rule and why its default.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from usae.config.evaluate import ClassThresholds

CLASSES = ("universal", "partial", "specific", "rare", "dead")
"""The concept classes (``classify_latents``), in the order every table shows them."""
USED_CLASSES = CLASSES[:3]
"""The classes of latents some model uses (rare and dead: no model uses them)."""
DEFAULT_THRESHOLDS = ClassThresholds()


def r2_from_sums(sse: Tensor | float, sst: Tensor | float) -> Tensor:
    """R² = 1 - SSE / SST (SST: total squared deviation of the targets around their mean)."""
    sse, sst = torch.as_tensor(sse, dtype=torch.float64), torch.as_tensor(sst, dtype=torch.float64)
    return 1.0 - sse / sst


def self_cross_means(r2_mm: list[list[float | None]]) -> tuple[float, float | None]:
    """(mean self R², mean cross R²) of an (m, m) R² matrix [encode with, decode to]: the diagonal's
    mean and the off-diagonal's (None for one model). Entries that are None (NaN in JSON) are skipped."""
    m = len(r2_mm)
    diag = [r2_mm[i][i] for i in range(m) if r2_mm[i][i] is not None]
    off = [r2_mm[i][j] for i in range(m) for j in range(m) if i != j and r2_mm[i][j] is not None]
    return (sum(diag) / len(diag) if diag else float("nan")), (sum(off) / len(off) if off else None)


def sst_from_sums(
    n_rows: int, sum_y_d: Tensor, sum_yy: Tensor | float, offset_d: Tensor, *, global_mean: bool = False
) -> Tensor:
    """SST of x from streamed sums of y = x - offset (any per-dimension offset, e.g. the store mean).

    ``sum_y_d``: per-dimension sum of y over the rows; ``sum_yy``: sum of y² over all elements.
    Default: around the per-dimension means of x (``r2``). ``global_mean=True``: around the one mean
    of all elements of x (``r2_paper``). Working in y keeps the float64 sums free of cancellation
    when x has large offsets.
    """
    sum_y_d, offset_d = sum_y_d.double(), offset_d.double().to(sum_y_d.device)
    sum_yy = torch.as_tensor(sum_yy, dtype=torch.float64, device=sum_y_d.device)
    if not global_mean:
        return sum_yy - sum_y_d.square().sum() / n_rows
    d = sum_y_d.numel()
    g = (sum_y_d.sum() + n_rows * offset_d.sum()) / (n_rows * d)  # mean of all elements of x
    c_d = offset_d - g  # x - g = y + c
    return sum_yy + 2.0 * (c_d * sum_y_d).sum() + n_rows * c_d.square().sum()


def outlier_gamma(mean_d: Tensor | Any, var_d: Tensor | Any) -> float:
    """γ = ‖mean_d‖₂ / ‖sqrt(var_d)‖₂ of a layer's activations (per-dimension mean and variance).

    Large γ: the activations sit far from the origin compared with their spread, dimension by
    dimension; it predicts dead latents in SAEs trained without per-dimension centring (arXiv
    2605.31518). inf when nothing varies but the mean is not 0; NaN when both are 0.
    """
    mean_d, var_d = torch.as_tensor(mean_d, dtype=torch.float64), torch.as_tensor(var_d, dtype=torch.float64)
    num, den = float(mean_d.norm()), float(var_d.clamp_min(0).sum().sqrt())
    if den > 0:
        return num / den
    return math.inf if num > 0 else math.nan


def r2(x_bd: Tensor, x_hat_bd: Tensor) -> Tensor:
    """R² of a reconstruction over all elements; SST around the per-dimension mean of ``x_bd``."""
    x, x_hat = x_bd.double(), x_hat_bd.double()
    sse = (x - x_hat).square().sum()
    sst = (x - x.mean(0)).square().sum()
    return r2_from_sums(sse, sst)


def r2_paper(x_bd: Tensor, x_hat_bd: Tensor) -> Tensor:
    """Paper-compatible R² (``overcomplete.metrics.r2_score``, without its 1e-6): SST around ONE mean.

    SST is taken around the mean of all elements of ``x_bd``, not per dimension, so when dimensions
    have different means the spread between those means counts as "explained": predicting each
    dimension's mean scores 0 with ``r2`` but close to 1 here. Reported beside ``r2`` for comparison
    with the paper's numbers only.
    """
    x, x_hat = x_bd.double(), x_hat_bd.double()
    return r2_from_sums((x - x_hat).square().sum(), (x - x.mean()).square().sum())


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


def used_latents(fires_ms: Tensor, n_rows: int, thresholds: ClassThresholds = DEFAULT_THRESHOLDS) -> Tensor:
    """Bool (m, s): model i *uses* latent k (the support rule).

    fires_ik >= max(1, min_count, min_rate * n_rows)  and  fires_ik >= min_share * max_j fires_jk.
    """
    fires, t = fires_ms.double(), thresholds
    floor = max(1.0, float(t.min_count), t.min_rate * n_rows)
    return (fires >= floor) & (fires >= t.min_share * fires.amax(0, keepdim=True))


def min_cofire_proportion(cofires_s: Tensor, fires_ms: Tensor) -> Tensor:
    """min_i CFP_ik = cofires_k / max_i fires_ik (0 for latents that never fire)."""
    most_s = fires_ms.double().amax(0)
    return torch.where(most_s > 0, cofires_s.double() / most_s.clamp_min(1.0), torch.zeros_like(most_s))


def classify_latents(
    fires_ms: Tensor, n_rows: int, *, cofires_s: Tensor, thresholds: ClassThresholds = DEFAULT_THRESHOLDS
) -> list[str]:
    """Label each latent 'universal' | 'partial' | 'specific' | 'rare' | 'dead'.

    Which models *use* it: ``used_latents`` (min_rate, min_count, min_share). Universal: used by
    every model, firing entropy >= ``thresholds.universal_fe`` and co-fire proportion >= ``universal_cofire``
    in every model (it fires on the same rows, not only equally often); partial: used by >= 2
    models and not universal; specific: used by exactly one; rare: used by none but fires at least
    once; dead: never fires (code > tau) for any model. With m = 1 every used latent is 'specific'.
    """
    fires = fires_ms.double()
    n_users_s = used_latents(fires, n_rows, thresholds).sum(0)
    fe_s = firing_entropy(fires).nan_to_num(0.0)
    cfp_s = min_cofire_proportion(cofires_s, fires)
    total_s = fires.sum(0)
    m = fires.shape[0]
    labels = []
    for n_users, fe, cfp, total in zip(
        n_users_s.tolist(), fe_s.tolist(), cfp_s.tolist(), total_s.tolist(), strict=True
    ):
        if total == 0:
            labels.append("dead")
        elif n_users == 0:
            labels.append("rare")
        elif n_users == 1:
            labels.append("specific")
        elif n_users == m and fe >= thresholds.universal_fe and cfp >= thresholds.universal_cofire:
            labels.append("universal")
        else:
            labels.append("partial")
    return labels
