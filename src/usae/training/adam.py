"""``FusedAdam``: torch's fused Adam/AdamW kernel without ``torch.optim`` (and its ``torch._dynamo``).

Every ``torch.optim.Optimizer`` method (``__init__``'s ``add_param_group``, ``step``, ``zero_grad``,
``state_dict``) is wrapped in ``torch._disable_dynamo``, whose first call imports ``torch._dynamo``:
3.4 s of a 22 s ``usae.fit`` on the synthetic world of docs/training.md, paid by every process that
trains. This class calls the same kernels ``torch.optim.Adam(fused=True)`` calls
(``torch._fused_adam_``/``torch._fused_adamw_``, after the same step-count increment), so its
updates are bit-identical to it (tested), and its ``state_dict`` has torch's layout, so checkpoints
written with either load into the other.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

# torch.optim.Adam's param-group keys, with the values fused Adam runs with (checkpoints carry them).
_GROUP_DEFAULTS = {
    "eps": 1e-8,
    "weight_decay": 0.0,
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": True,
    "decoupled_weight_decay": False,
}


class FusedAdam:
    """Adam (``decoupled=True``: AdamW) over parameter groups, stepping only parameters with a gradient.

    The interface the trainer uses of ``torch.optim.Optimizer``: ``param_groups`` (dicts whose
    ``"lr"`` the loop sets each step), ``zero_grad``, ``step``, ``state_dict``, ``load_state_dict``.
    A parameter whose ``grad`` is None is skipped and its moments stay as they were (as in torch).
    """

    def __init__(
        self,
        groups: Iterable[dict[str, Any]] | Iterable[Tensor],
        *,
        lr: float,
        betas: tuple[float, float],
        weight_decay: float = 0.0,
        decoupled: bool = False,
    ) -> None:
        groups = list(groups)
        if groups and isinstance(groups[0], Tensor):
            groups = [{"params": groups}]
        defaults = {**_GROUP_DEFAULTS, "lr": lr, "betas": tuple(betas), "weight_decay": weight_decay}
        defaults["decoupled_weight_decay"] = decoupled
        self.param_groups: list[dict[str, Any]] = [{**defaults, **g, "params": list(g["params"])} for g in groups]
        self.state: dict[Tensor, dict[str, Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One Adam update of every parameter that has a gradient (one fused kernel per group)."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state(p) for p in params]
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1)
            kernel = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
            beta1, beta2 = group["betas"]
            kernel(
                params,
                [p.grad for p in params],
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [],
                steps,
                amsgrad=False,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=False,
                grad_scale=None,
                found_inf=None,
            )

    def _state(self, p: Tensor) -> dict[str, Tensor]:
        state = self.state.get(p)
        if state is None:  # as torch: float32 step on the parameter's device, zero moments
            state = {
                "step": torch.zeros((), dtype=torch.float32, device=p.device),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
            self.state[p] = state
        return state

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's layout: parameters numbered in group order, state keyed by those numbers."""
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            ids = [index.setdefault(id(p), len(index)) for p in group["params"]]
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        by_id = {id(p): p for g in self.param_groups for p in g["params"]}
        state = {index[pid]: self.state[p] for pid, p in by_id.items() if p in self.state}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict`` of this optimiser or of ``torch.optim.Adam``/``AdamW`` over the
        same parameters (ValueError when the groups do not fit; nothing is changed then)."""
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved, self.param_groups, strict=False)
        ):
            raise ValueError("loaded state dict has a different number of parameter groups or parameters")
        params = {}
        for s, g in zip(saved, self.param_groups, strict=True):
            params.update(zip(s["params"], g["params"], strict=True))
        restored = {}
        for i, per_param in state_dict["state"].items():
            p = params[int(i)]
            entry = {}
            for key, value in per_param.items():
                if key == "step":
                    entry[key] = torch.as_tensor(value, dtype=torch.float32).to(p.device)
                else:
                    if value.shape != p.shape:
                        raise ValueError(f"state {key!r} of parameter {i} has shape {tuple(value.shape)}")
                    entry[key] = value.to(dtype=p.dtype, device=p.device)
            restored[p] = entry
        self.state = restored
        for s, g in zip(saved, self.param_groups, strict=True):
            g.update({k: (tuple(v) if k == "betas" else v) for k, v in s.items() if k != "params"})


TrainOptimizer = FusedAdam | torch.optim.Optimizer
"""What the trainer steps and checkpoints: ``FusedAdam``, or any torch optimiser (tests, notebooks)."""
