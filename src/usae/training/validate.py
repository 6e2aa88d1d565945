"""Held-out validation during training (``--val-every``), the best model kept, and ``--patience``.

When the rows have a held-out twin (a store's from ``usae extract --val-fraction``; with --images,
the --val-images or --val-fraction images: data/source.py's ``TrainSource.held_out``), every
``val_every`` steps and at the last step each run measures on the twin's first ``val_rows`` rows,
every model encoding in turn (eval mode, no gradient, no random number drawn, so training is the
same with or without it):

    val/loss               mean over source models of the summed reconstruction losses (the
                           training loss's terms, normalised units; AuxK excluded)
    val/r2_self/<model>    pooled R² of <model> reconstructing itself (raw units, as usae evaluate)
    val/r2_cross/<model>   mean R² of the other models decoded from <model>'s code
    val/r2_self, val/r2_cross   their means over models

The lowest ``val/loss`` so far is kept in RUN/best/ (config.json, model.safetensors and best.json
with the step and its numbers: ``usae.load(RUN / "best")`` loads it). ``--patience P`` stops a run
after P validations without a new best. The best-so-far and the patience count are part of every
checkpoint (``BestSoFar.state``), so a resumed run stops where the uninterrupted one would.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from usae._io import publish_dir, write_json_atomic
from usae.config import TrainConfig
from usae.data.source import Rows
from usae.errors import UsaeError
from usae.model.losses import reconstruction_loss
from usae.model.metrics import r2_from_sums, self_cross_means
from usae.model.sae import UniversalSAE
from usae.run import save_run
from usae.training.rules import RULES

BEST_DIR = "best"
BEST_NAME = "best.json"


def default_val_every(steps: int, log_every: int) -> int:
    """--val-every when not given and the store has a held-out twin: about 20 validations a run."""
    return max(log_every, steps // 20)


def check_validation(cfg: TrainConfig, held_out: Rows | None, where: Path) -> None:
    """Refuse --patience without validations to count (one line, before anything is written)."""
    if cfg.optim.patience and (held_out is None or cfg.io.val_every == 0):
        how = "--val-fraction or --val-images" if cfg.source.images else "usae extract --val-fraction"
        why = "--val-every 0" if held_out is not None else f"{where} has no held-out twin ({how})"
        raise UsaeError(f"--patience {cfg.optim.patience} needs held-out validations, but {why}")


class Validator:
    """The held-out rows of one ``fit_many`` pass, read once, and the numbers a run scores on them."""

    def __init__(self, store: Rows, names: list[str], n_rows: int, device: torch.device) -> None:
        missing = [n for n in names if n not in store.widths]
        if missing:
            raise UsaeError(f"held-out rows {store.path} lack the trained models {missing}")
        self.n_rows = min(n_rows, store.n_rows)
        self.names = names
        self.x = {n: torch.from_numpy(store.rows(n, 0, self.n_rows)).float().to(device) for n in names}
        # SST around the held-out rows' own per-dimension means, float64 (as usae evaluate pools it)
        self.sst = {n: float((x.double() - x.double().mean(0)).square().sum()) for n, x in self.x.items()}

    @torch.no_grad()
    def measure(self, sae: UniversalSAE, cfg: TrainConfig, batch_size: int = 4096) -> dict[str, float]:
        """``sae``'s ``val/...`` numbers (see the module docstring); ``sae`` is left in train mode."""
        names, m = self.names, len(self.names)
        sse = torch.zeros(m, m, dtype=torch.float64)
        loss = torch.zeros((), dtype=torch.float64)
        sae.eval()  # BatchNorm's running statistics and BatchTopK's threshold, nothing updated
        try:
            for start in range(0, self.n_rows, batch_size):
                x = {n: v[start : start + batch_size] for n, v in self.x.items()}
                x_n = {n: sae.normalize(n, v) for n, v in x.items()}
                for i, code in enumerate(self._codes(sae, x_n, cfg)):
                    for j, dst in enumerate(names):
                        x_hat_n = sae.decode_normalized(dst, code)
                        rows = x_n[dst].shape[0]
                        loss += float(reconstruction_loss(x_hat_n, x_n[dst], cfg.optim.loss)) * rows
                        sse[i, j] += float((x[dst] - sae.denormalize(dst, x_hat_n)).double().square().sum())
        finally:
            sae.train()
        r2_mm = r2_from_sums(sse, torch.tensor([self.sst[n] for n in names], dtype=torch.float64)[None, :])
        rec = {"val/loss": float(loss) / self.n_rows / m}
        for i, name in enumerate(names):
            rec[f"val/r2_self/{name}"] = float(r2_mm[i, i])
            if m > 1:
                rec[f"val/r2_cross/{name}"] = float((r2_mm[i].sum() - r2_mm[i, i]) / (m - 1))
        self_r2, cross_r2 = self_cross_means(r2_mm.tolist())
        rec["val/r2_self"] = self_r2
        if cross_r2 is not None:
            rec["val/r2_cross"] = cross_r2
        return rec

    def _codes(self, sae: UniversalSAE, x_n: dict[str, Tensor], cfg: TrainConfig) -> list[Any]:
        """One code per source model, as the run's rule encodes (a global code: every model's rows)."""
        rule = RULES[cfg.optim.rule]
        if rule.global_code:
            codes = sae.encode_global(x_n, shared_values=rule.shared_values)
            return [codes[n] for n in self.names]
        return [sae.activate(n, sae.pre_activation(n, x_n[n])) for n in self.names]


class BestSoFar:
    """A run's best validation so far, the validations since, and the last: kept in checkpoints."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        state = state or {}
        self.best: dict[str, float] | None = state.get("best")
        """The lowest-loss validation: its ``step`` and ``val/...`` numbers (None: none yet)."""
        self.since = int(state.get("since_best", 0))
        self.last: dict[str, float] = dict(state.get("last") or {})

    @property
    def state(self) -> dict[str, Any]:
        """What a checkpoint's state.json carries (``BestSoFar(state)`` restores it)."""
        return {"best": self.best, "since_best": self.since, "last": self.last}

    def stopped(self, patience: int) -> bool:
        """True once ``patience`` (> 0) validations in a row brought no new best."""
        return patience > 0 and self.since >= patience

    def update(self, rec: dict[str, float], step: int) -> bool:
        """Count a validation at ``step``; True when it is a new best (strictly lower loss; NaN never is)."""
        self.last = {"step": step, **rec}
        best = math.inf if self.best is None else self.best["val/loss"]
        if rec["val/loss"] < best:
            self.best, self.since = dict(self.last), 0
            return True
        self.since += 1
        return False

    def result(self) -> tuple[int | None, dict[str, float] | None, dict[str, float] | None]:
        """(best step, its numbers, the last validation) for ``FitResult``."""
        if self.best is None:
            return None, None, None
        numbers = {k: v for k, v in self.best.items() if k != "step"}
        return int(self.best["step"]), numbers, dict(self.last)


def save_best(run_dir: Path, sae: UniversalSAE, config: dict[str, Any], rec: dict[str, float], step: int) -> None:
    """RUN/best/: the model at ``step`` (config.json, model.safetensors, best.json), swapped in whole."""
    final, tmp, old = run_dir / BEST_DIR, run_dir / f".{BEST_DIR}.tmp", run_dir / f".{BEST_DIR}.old"
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    save_run(tmp, sae, config)
    write_json_atomic(tmp / BEST_NAME, {"step": step, **rec})
    if final.exists():
        final.rename(old)
    publish_dir(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
