"""Latent matching across SAEs: activation correlation + Hungarian assignment, and dictionary agreement.

- latent matching: Pearson correlation of two SAEs' latent activations over the same rows (this
  works across models of different widths, where decoder directions cannot be compared), then a
  one-to-one Hungarian assignment (``scipy.optimize.linear_sum_assignment``);
- dictionary agreement (the paper's comparison, Thasarathan et al. 2025): cosine between a model's
  USAE dictionary and its independent SAE dictionary after Hungarian matching, with the fraction
  above 0.5 compared against random directions.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from tqdm.auto import tqdm

from usae.data.store import Store
from usae.errors import UsaeError
from usae.evaluation.baselines.similarity import as_f64, model_pairs
from usae.model.sae import SparseCode, UniversalSAE, dense


class Matching(NamedTuple):
    """A one-to-one assignment between the latents of two dictionaries (Hungarian)."""

    row_idx: np.ndarray
    """(p,) int: latents of the first (row) side, ascending; p = min(rows, columns)."""
    col_idx: np.ndarray
    """(p,) int: the partner of each ``row_idx`` latent on the second (column) side."""
    similarity: np.ndarray
    """(p,) float64: the similarity of each matched pair."""


def match_latents(corr_ss: Any) -> Matching:
    """Hungarian assignment maximising total similarity of an (s_a, s_b) matrix (rectangular ok).

    NaN entries (latents that never fire) count as the lowest similarity.
    """
    sim = np.asarray(corr_ss.cpu() if isinstance(corr_ss, Tensor) else corr_ss, dtype=np.float64)
    if sim.ndim != 2 or 0 in sim.shape:
        raise UsaeError(f"match_latents: need a non-empty 2-D similarity matrix, got shape {sim.shape}")
    finite = np.isfinite(sim)
    filled = np.where(finite, sim, sim[finite].min() - 1.0 if finite.any() else 0.0)
    row_idx, col_idx = linear_sum_assignment(filled, maximize=True)
    return Matching(row_idx, col_idx, sim[row_idx, col_idx])


def matching_summary(m: Matching, threshold: float = 0.5) -> dict[str, float]:
    """Matched fraction (similarity > ``threshold``) and mean/median similarity (NaN as 0)."""
    sim = np.nan_to_num(m.similarity, nan=0.0)
    return {
        "matched_fraction": float((sim > threshold).mean()),
        "mean_similarity": float(sim.mean()),
        "median_similarity": float(np.median(sim)),
        "threshold": threshold,
    }


class CorrelationSums:
    """Streaming Pearson correlation between every latent of code A (s_a) and of code B (s_b).

    Both codes come from the same rows (e.g. two models' SAEs on paired tokens). Memory
    O(s_a s_b) float64; a SparseCode for A costs O(b k s_b) per batch instead of O(b s_a s_b).
    """

    def __init__(self, n_a: int, n_b: int, device: torch.device | str = "cpu") -> None:
        f64 = {"dtype": torch.float64, "device": device}
        self.n = 0
        self.sum_a, self.sum_b = torch.zeros(n_a, **f64), torch.zeros(n_b, **f64)
        self.sq_a, self.sq_b = torch.zeros(n_a, **f64), torch.zeros(n_b, **f64)
        self.ab_ss = torch.zeros(n_a, n_b, **f64)

    def update(self, z_a: SparseCode | Tensor, z_b: SparseCode | Tensor) -> None:
        """Add one batch: codes (b, s_a) and (b, s_b) (dense, or SparseCode) of the same rows."""
        n_a, n_b = self.ab_ss.shape
        dense_b = dense(z_b, n_b).float()
        if isinstance(z_a, SparseCode):
            b, k = z_a.idx_bk.shape
            rows = torch.arange(b, device=z_a.idx_bk.device).repeat_interleave(k)
            at_sb = torch.sparse_coo_tensor(
                torch.stack([z_a.idx_bk.reshape(-1), rows]),
                z_a.val_bk.reshape(-1).float(),
                (n_a, b),
                check_invariants=False,
            )
            self.ab_ss += torch.sparse.mm(at_sb, dense_b).double()
            dense_a = z_a.to_dense(n_a).float()
        else:
            dense_a = z_a.float()
            self.ab_ss += (dense_a.T @ dense_b).double()
        self.n += dense_b.shape[0]
        self.sum_a += dense_a.sum(0).double()
        self.sum_b += dense_b.sum(0).double()
        self.sq_a += dense_a.double().square().sum(0)
        self.sq_b += dense_b.double().square().sum(0)

    def corr(self) -> Tensor:
        """(s_a, s_b) Pearson correlations; 0 where a latent has no variance (never fires)."""
        n = max(self.n, 1)
        ma, mb = self.sum_a / n, self.sum_b / n
        var_a, var_b = self.sq_a / n - ma.square(), self.sq_b / n - mb.square()
        cov = self.ab_ss / n - torch.outer(ma, mb)
        denom = torch.outer(var_a.clamp_min(0).sqrt(), var_b.clamp_min(0).sqrt())
        return torch.where(denom > 1e-12, cov / denom.clamp_min(1e-12), torch.zeros_like(cov))


def _unit_rows(d_sd: Any) -> Tensor:
    d = as_f64(d_sd)
    return d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)


def dictionary_agreement(d_usae_sd: Any, d_indep_sd: Any, threshold: float = 0.5, seed: int = 0) -> dict[str, Any]:
    """Compare one model's USAE dictionary (s, d) with its independent SAE dictionary (s', d).

    Rows are matched one-to-one by Hungarian assignment on cosine similarity. Returns the
    fraction of matched pairs with cosine > ``threshold`` and the mean cosine, the same for
    Gaussian random directions in place of the independent dictionary (seeded), and the matched
    cosines sorted descending (``cosines``, ``random_cosines``) for plotting.
    """
    u, v = _unit_rows(d_usae_sd), _unit_rows(d_indep_sd)
    if u.ndim != 2 or v.ndim != 2 or u.shape[1] != v.shape[1]:
        raise UsaeError(
            f"dictionary_agreement: need (s, d) and (s', d) dictionaries, got {tuple(u.shape)}, {tuple(v.shape)}"
        )
    gen = torch.Generator().manual_seed(seed)
    r = _unit_rows(torch.randn(v.shape, generator=gen, dtype=torch.float64))
    out: dict[str, Any] = {"threshold": threshold}
    for prefix, other in (("", v), ("random_", r)):
        cos = match_latents(u @ other.T).similarity
        out[f"{prefix}fraction_above"] = float((cos > threshold).mean())
        out[f"{prefix}mean_cosine"] = float(cos.mean())
        out[f"{prefix}cosines"] = np.sort(cos)[::-1].round(4).tolist()
    return out


def stitch_dictionaries(
    dictionaries: dict[str, Any], reference: str, matchings: dict[str, Matching]
) -> dict[str, np.ndarray]:
    """Independent dictionaries re-indexed as one universal dictionary via matchings to ``reference``.

    ``matchings[name]`` matches the reference's latents (rows) to model ``name``'s latents
    (columns). Row l of the result is, in every model, the latent matched to reference latent l
    (a zero row where l has no partner), so ``usae.data.synth.recovery`` scores it like a USAE.
    """
    ref = np.asarray(dictionaries[reference], dtype=np.float64)
    out = {reference: ref}
    for name, d_sd in dictionaries.items():
        if name == reference:
            continue
        d_sd, m = np.asarray(d_sd, dtype=np.float64), matchings[name]
        rows = np.zeros((ref.shape[0], d_sd.shape[1]))
        rows[m.row_idx] = d_sd[m.col_idx]
        out[name] = rows
    return out


class _SameLatentSums:
    """Streaming per-latent correlation of latent l under two source models (USAE codes)."""

    def __init__(self, n_latents: int, device: torch.device | str) -> None:
        self.n = 0
        self.sums = torch.zeros(5, n_latents, dtype=torch.float64, device=device)  # a, b, a², b², ab

    def update(self, z_a_bs: Tensor, z_b_bs: Tensor) -> None:
        a, b = z_a_bs.double(), z_b_bs.double()
        self.sums += torch.stack([a.sum(0), b.sum(0), a.square().sum(0), b.square().sum(0), (a * b).sum(0)])
        self.n += a.shape[0]

    def corr(self) -> np.ndarray:
        sa, sb, saa, sbb, sab = self.sums / max(self.n, 1)
        denom = ((saa - sa.square()).clamp_min(0) * (sbb - sb.square()).clamp_min(0)).sqrt()
        return (
            torch.where(denom > 1e-12, (sab - sa * sb) / denom.clamp_min(1e-12), torch.zeros_like(denom)).cpu().numpy()
        )


@torch.no_grad()
def stream_correlations(
    sae: UniversalSAE, indep: dict[str, UniversalSAE], store: Store, *, stop: int, batch_size: int, progress: bool
) -> tuple[dict[tuple[int, int], Tensor], dict[tuple[int, int], np.ndarray]]:
    """One pass over rows [0, stop): for each model pair (i < j), the (s, s) correlation of the
    independent SAEs' latents, and the per-latent correlation of USAE latent l encoded from i vs j."""
    names, device = sae.model_names, next(sae.parameters()).device
    pairs = model_pairs(names)
    indep_sums = {p: CorrelationSums(indep[names[p[0]]].n_latents, indep[names[p[1]]].n_latents, device) for p in pairs}
    same_sums = {p: _SameLatentSums(sae.n_latents, device) for p in pairs}
    bar = tqdm(total=stop, unit="row", desc="baselines", disable=not progress)
    for _, batch in store.iter_batches(batch_size, names=names, start=0, stop=stop):
        x = {n: torch.from_numpy(batch[n]).to(device) for n in names}
        z_ind = {n: indep[n].encode_sparse(n, x[n]) for n in names}
        z_usae = {n: dense(sae.encode_sparse(n, x[n]), sae.n_latents) for n in names}
        for i, j in pairs:
            indep_sums[(i, j)].update(z_ind[names[i]], z_ind[names[j]])
            same_sums[(i, j)].update(z_usae[names[i]], z_usae[names[j]])
        bar.update(next(iter(batch.values())).shape[0])
    bar.close()
    return {p: s.corr() for p, s in indep_sums.items()}, {p: s.corr() for p, s in same_sums.items()}


def matching_section(
    names: list[str],
    matchings: dict[tuple[int, int], Matching],
    same: dict[tuple[int, int], np.ndarray],
    threshold: float,
) -> list[dict[str, Any]]:
    """Per model pair: summaries and sorted similarities, independent (Hungarian) and USAE (same index)."""
    out = []
    for (i, j), m in matchings.items():
        identity = np.arange(same[(i, j)].size)
        out.append(
            {
                "models": [names[i], names[j]],
                "independent": matching_summary(m, threshold),
                "usae_same_index": matching_summary(Matching(identity, identity, same[(i, j)]), threshold),
                "independent_sorted": np.sort(m.similarity)[::-1].round(4).tolist(),
                "usae_sorted": np.sort(same[(i, j)])[::-1].round(4).tolist(),
            }
        )
    return out
