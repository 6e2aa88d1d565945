"""Reconstruction and AuxK losses as pure functions of tensors (normalised units)."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor


def reconstruction_loss(x_hat_bd: Tensor, x_bd: Tensor, kind: Literal["l2", "l1"] = "l2") -> Tensor:
    """Mean per-element squared (l2) or absolute (l1) error.

    Inputs are normalised to unit scalar std, so the l2 loss is ~ the fraction of variance
    unexplained and models of different widths and scales weigh the same in the universal sum.
    """
    if kind == "l2":
        return F.mse_loss(x_hat_bd, x_bd)
    return F.l1_loss(x_hat_bd, x_bd)


def auxk_loss(aux_hat_bd: Tensor, residual_bd: Tensor) -> Tensor:
    """AuxK loss: how well the dead latents' reconstruction explains the main residual.

    Normalised by the residual's variance so the term is scale-free (~ an FVU of the residual).
    ``residual_bd`` must be detached (x - x_hat).
    """
    residual_var = (residual_bd - residual_bd.mean(0)).square().mean().clamp_min(1e-12)
    return (aux_hat_bd - residual_bd).square().mean() / residual_var
