"""What ``usae train`` prints when it ends: where the run is, its self/cross R² on a sample, what next.

A training stage's own end-of-run check (like a validation loss), not an evaluation: the mean
self and cross R² on the first rows of the held-out twin when the store has one (else in-sample),
from the same pure metrics ``usae evaluate`` reports (model/metrics.py). The full report is
``usae evaluate``'s job.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from usae.data.source import Rows, TrainSource
from usae.model.metrics import r2_from_sums, self_cross_means, sst_from_sums
from usae.model.sae import UniversalSAE

if TYPE_CHECKING:
    from usae.training.fit import FitResult

SUMMARY_ROWS = 8192
"""Rows the end-of-run R² is measured on (a few seconds on CPU)."""


@torch.no_grad()
def sample_r2(sae: UniversalSAE, store: Rows, n_rows: int, batch_size: int = 4096) -> list[list[float]]:
    """(m, m) R² [encode with, decode to] on the first ``n_rows`` rows, pooled as ``usae evaluate`` pools it."""
    names, device = sae.model_names, next(sae.parameters()).device
    sse = torch.zeros(len(names), len(names), dtype=torch.float64)
    # sums of y = x - the store's mean (float64 sums without cancellation when x has large offsets)
    mean_d = {n: torch.as_tensor(store.stats(n).mean, dtype=torch.float64) for n in names}
    sum_y, sum_yy = [None] * len(names), torch.zeros(len(names), dtype=torch.float64)
    for start in range(0, n_rows, batch_size):
        stop = min(start + batch_size, n_rows)
        x = {n: torch.from_numpy(store.rows(n, start, stop)).to(device).float() for n in names}
        for i, src in enumerate(names):
            code = sae.encode_sparse(src, x[src])
            for j, dst in enumerate(names):
                sse[i, j] += (x[dst].double() - sae.decode(dst, code).double()).square().sum().cpu()
        for j, dst in enumerate(names):
            y = x[dst].double().cpu() - mean_d[dst]
            sum_y[j] = y.sum(0) if sum_y[j] is None else sum_y[j] + y.sum(0)
            sum_yy[j] += y.square().sum()
    sst = torch.stack([sst_from_sums(n_rows, sum_y[j], sum_yy[j], mean_d[dst]) for j, dst in enumerate(names)])
    return r2_from_sums(sse, sst[None, :]).tolist()


def format_trained(sae: UniversalSAE, run_dir: Path, source: TrainSource, result: FitResult | None = None) -> str:
    """Where the run is, its self/cross R² on a sample (held-out rows when the source has a twin),
    the best and last held-out validations (``result``, when the run validated), what next."""
    held_out = source.held_out
    sample = held_out if held_out is not None else source.rows
    n = min(SUMMARY_ROWS, sample.n_rows)
    self_r2, cross_r2 = self_cross_means(sample_r2(sae.eval(), sample, n))
    kind = "images" if source.info.get("kind") == "images" else "store"
    where = f"held-out {kind} {held_out.path}" if held_out is not None else f"the training {kind} (in-sample)"
    cross_text = f", cross {cross_r2:.3f}" if cross_r2 is not None else ""
    lines = [f"run: {run_dir}", f"R² on the first {n} rows of {where}: self {self_r2:.3f}{cross_text}"]
    if result is not None and result.best_step is not None:
        best, last = result.best_metrics, result.last_val
        lines.append(f"best held-out step {result.best_step} ({run_dir / 'best'}): {_scores(best)}")
        stopped = " (--patience stopped the run here)" if result.stopped_at is not None else ""
        lines.append(f"last step {last['step']}{stopped}: {_scores(last)}")
    lines.append(f"next: {source.next_hint.replace('{run}', str(run_dir))}")
    return "\n".join(lines)


def _scores(rec: dict[str, float]) -> str:
    cross = f", cross R² {rec['val/r2_cross']:.3f}" if "val/r2_cross" in rec else ""
    return f"loss {rec['val/loss']:.4f}, self R² {rec['val/r2_self']:.3f}{cross}"
