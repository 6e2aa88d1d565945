"""Representation similarity between models: linear CKA and mutual k-NN alignment.

Linear CKA (Kornblith et al. 2019) and mutual k-NN alignment (Huh et al. 2024), on raw activations,
USAE codes and independent-SAE codes of the same rows. Pure tensor functions plus one sampler.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from usae.data.store import Store
from usae.errors import UsaeError
from usae.model.sae import UniversalSAE


def model_pairs(names: list[str]) -> list[tuple[int, int]]:
    """Index pairs (i, j), i < j, of ``names``."""
    return [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]


def as_f64(x: Any) -> Tensor:
    return torch.as_tensor(x).double() if not isinstance(x, Tensor) else x.double()


class CKASums:
    """Streaming sums for linear CKA between two representations of the same rows (feature space).

    Memory O((d + e)²), time O(n d e). Rows are shifted by the first batch's mean before the
    cross products are summed, so large offsets (raw ViT activations) do not cancel catastrophically.
    """

    def __init__(self) -> None:
        self.n = 0
        self.shift: tuple[Tensor, Tensor] | None = None
        self.sum_x_d = self.sum_y_e = self.xx_dd = self.yy_ee = self.xy_de = None

    def update(self, x_nd: Any, y_ne: Any) -> CKASums:
        """Add rows ``x_nd`` (n, d) and ``y_ne`` (n, e) of the two representations; returns self."""
        x, y = as_f64(x_nd), as_f64(y_ne)
        if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
            raise UsaeError(f"linear_cka: need (n, d) and (n, e) arrays, got {tuple(x.shape)} and {tuple(y.shape)}")
        if self.shift is None:
            self.shift = (x.mean(0), y.mean(0))
            self.sum_x_d, self.sum_y_e = torch.zeros_like(self.shift[0]), torch.zeros_like(self.shift[1])
            self.xx_dd, self.yy_ee = x.new_zeros(x.shape[1], x.shape[1]), y.new_zeros(y.shape[1], y.shape[1])
            self.xy_de = x.new_zeros(x.shape[1], y.shape[1])
        x, y = x - self.shift[0], y - self.shift[1]
        self.n += x.shape[0]
        self.sum_x_d += x.sum(0)
        self.sum_y_e += y.sum(0)
        self.xx_dd += x.T @ x
        self.yy_ee += y.T @ y
        self.xy_de += x.T @ y
        return self

    def value(self) -> float:
        """CKA = ||Xc^T Yc||_F² / (||Xc^T Xc||_F ||Yc^T Yc||_F); NaN if a representation is constant."""
        if self.n < 2:
            raise UsaeError(f"linear_cka: need at least 2 rows, got {self.n}")
        mx, my = self.sum_x_d / self.n, self.sum_y_e / self.n
        cxx = self.xx_dd - self.n * torch.outer(mx, mx)
        cyy = self.yy_ee - self.n * torch.outer(my, my)
        cxy = self.xy_de - self.n * torch.outer(mx, my)
        denom = float(cxx.norm() * cyy.norm())
        return float(cxy.square().sum()) / denom if denom > 0 else float("nan")


def linear_cka(x_nd: Any, y_ne: Any) -> float:
    """Linear CKA in [0, 1] between two representations (n, d) and (n, e) of the same n rows.

    1 for representations equal up to an orthogonal transform and isotropic scale. Computed in
    feature space, O(n d e) (any n), unless d·e > n², where the equal sample-space (Gram) form,
    O(n² (d + e)), is cheaper (wide sparse codes on few rows).
    """
    x, y = as_f64(x_nd), as_f64(y_ne)
    n = x.shape[0]
    if x.ndim != 2 or y.ndim != 2 or y.shape[0] != n:
        raise UsaeError(f"linear_cka: need (n, d) and (n, e) arrays, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[1] * y.shape[1] <= n * n:
        return CKASums().update(x, y).value()
    xc, yc = x - x.mean(0), y - y.mean(0)
    k_nn, l_nn = xc @ xc.T, yc @ yc.T  # already double-centred: H X X^T H = Xc Xc^T
    denom = float(k_nn.norm() * l_nn.norm())
    return float((k_nn * l_nn).sum()) / denom if denom > 0 else float("nan")


def _knn_mask(x_nd: Tensor, k: int) -> Tensor:
    """(n, n) bool: row i marks its k nearest neighbours by cosine, itself excluded."""
    x = x_nd / x_nd.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim_nn = x @ x.T
    sim_nn.fill_diagonal_(float("-inf"))
    idx_nk = sim_nn.topk(k, dim=1).indices
    return torch.zeros_like(sim_nn, dtype=torch.bool).scatter_(1, idx_nk, True)


def mutual_knn(x_nd: Any, y_ne: Any, k: int = 10, max_rows: int = 2048, seed: int = 0) -> float:
    """Mutual k-NN alignment in [0, 1]: mean over rows of |kNN_x(i) ∩ kNN_y(i)| / k.

    Neighbours by cosine similarity, a row never its own neighbour (Huh et al. 2024). Computed on
    ``max_rows`` rows sampled with ``seed`` when n is larger (an (n, n) matrix is held). Chance
    level is about k / (n - 1).
    """
    x, y = torch.as_tensor(x_nd).float(), torch.as_tensor(y_ne).float()
    n = x.shape[0]
    if x.ndim != 2 or y.ndim != 2 or y.shape[0] != n:
        raise UsaeError(f"mutual_knn: need (n, d) and (n, e) arrays, got {tuple(x.shape)} and {tuple(y.shape)}")
    if n > max_rows:
        rows = torch.from_numpy(np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False)))
        x, y, n = x[rows], y[rows], max_rows
    if not 1 <= k < n:
        raise UsaeError(f"mutual_knn: k must be in [1, {n - 1}] for {n} rows, got {k}")
    shared_n = (_knn_mask(x, k) & _knn_mask(y, k)).sum(1)
    return float(shared_n.double().mean() / k)


@torch.no_grad()
def representation_similarity(
    sae: UniversalSAE, indep: dict[str, UniversalSAE], store: Store, *, stop: int, n_rows: int, knn_k: int, seed: int
) -> dict[str, Any]:
    """Pairwise (m, m) linear CKA and mutual k-NN on ``n_rows`` rows sampled from [0, stop), for
    raw activations, USAE codes (each model encoding itself) and independent-SAE codes."""
    names, device = sae.model_names, next(sae.parameters()).device
    rows = np.sort(np.random.default_rng(seed).choice(stop, min(n_rows, stop), replace=False))
    x = {n: torch.from_numpy(store.take(n, rows)).to(device) for n in names}
    reps = {
        "raw": x,
        "usae_codes": {n: sae.encode(n, x[n]) for n in names},
        "independent_codes": {n: indep[n].encode(n, x[n]) for n in names},
    }
    k = min(knn_k, len(rows) - 1)
    out: dict[str, Any] = {"n_rows": len(rows), "knn_k": k, "cka": {}, "mutual_knn": {}}
    for kind, rep in reps.items():
        cka_mm, knn_mm = np.eye(len(names)), np.eye(len(names))
        for i, j in model_pairs(names):
            cka_mm[i, j] = cka_mm[j, i] = linear_cka(rep[names[i]], rep[names[j]])
            knn_mm[i, j] = knn_mm[j, i] = mutual_knn(rep[names[i]], rep[names[j]], k, max_rows=len(rows))
        out["cka"][kind], out["mutual_knn"][kind] = cka_mm.tolist(), knn_mm.tolist()
    return out
