"""Baselines for a universal SAE: independent SAEs + latent matching, and representation similarity.

The question a USAE answers is "which concepts do these models share?". The baseline answer is to
train one ordinary TopK SAE per model (same width, k and token budget, the same trainer: a
one-model UniversalSAE *is* a TopK SAE) and match latents across models afterwards:

- latent matching: Pearson correlation of two SAEs' latent activations over the same rows (this
  works across models of different widths, where decoder directions cannot be compared), then a
  one-to-one Hungarian assignment (``scipy.optimize.linear_sum_assignment``);
- dictionary agreement (the paper's comparison, Thasarathan et al. 2025): cosine between a model's
  USAE dictionary and its independent SAE dictionary after Hungarian matching, with the fraction
  above 0.5 compared against random directions;
- representation similarity between models: linear CKA (Kornblith et al. 2019) and mutual k-NN
  alignment (Huh et al. 2024) on raw activations, on USAE codes and on independent-SAE codes.

The metric functions are pure; ``run_baselines`` trains or reuses the SAEs and writes
RUN/baselines.json. See docs/report.md for what each number means.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from tqdm.auto import tqdm

from usae.checkpoint import MODEL_NAME, load, read_run_config
from usae.config import BaselineConfig, write_json_atomic
from usae.errors import UsaeError
from usae.sae import SparseCode, UniversalSAE
from usae.store import Store, open_store
from usae.train import fit, load_train_config, resolve_device

log = logging.getLogger(__name__)

BASELINES_VERSION = 1
BASELINES_DIR = "baselines"
BASELINES_JSON = "baselines.json"


def _as_f64(x: Any) -> Tensor:
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
        x, y = _as_f64(x_nd), _as_f64(y_ne)
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
    x, y = _as_f64(x_nd), _as_f64(y_ne)
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


# -- latent matching ------------------------------------------------------------------------------
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


def _to_dense(code: SparseCode | Tensor, n_latents: int) -> Tensor:
    return code.to_dense(n_latents) if isinstance(code, SparseCode) else code


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
        dense_b = _to_dense(z_b, n_b).float()
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
    d = _as_f64(d_sd)
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
    (a zero row where l has no partner), so ``usae.synth.recovery`` scores it like a USAE.
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


# -- the pipeline -------------------------------------------------------------------------------
def train_independent(
    run_dir: str | Path, store_dir: str | Path, *, retrain: bool = False, device: str = "auto", progress: bool = True
) -> dict[str, UniversalSAE]:
    """One TopK SAE per model of the run, trained by ``fit`` with the run's own train config.

    Only ``models`` (one), ``out`` (RUN/baselines/<model>) and ``store`` change, so width, k,
    steps, batch size, LR, normalisation and seed are the USAE's. An existing
    RUN/baselines/<model>/model.safetensors is reused unless ``retrain``; one trained with
    different settings is an error.
    """
    run_dir = Path(run_dir)
    train = load_train_config(run_dir)
    # the SAE widths, not train.models: config._coerce truncates tuples of 3+ models to 2 (reported)
    names = list(read_run_config(run_dir)["sae"]["widths"])
    saes = {}
    for name in names:
        out = run_dir / BASELINES_DIR / name
        if (out / MODEL_NAME).is_file() and not retrain:
            saved = load_train_config(out)
            for key in ("n_latents", "k", "steps", "batch_size", "seed"):
                if getattr(saved, key) != getattr(train, key):
                    raise UsaeError(
                        f"{out}/config.json: {key}={getattr(saved, key)!r} differs from the run's "
                        f"{getattr(train, key)!r}; pass --retrain to replace it"
                    )
            log.info("reusing independent SAE %s", out)
            saes[name] = load(out, device=resolve_device(device))
            continue
        log.info("training independent SAE for model %r -> %s", name, out)
        # extend=None: the baseline of a universe grown by --extend is still trained from scratch
        changes = {"store": Path(store_dir), "out": out, "models": (name,), "extend": None, "resume": False}
        changes |= {"overwrite": True, "save_every": 0, "device": device, "progress": progress}
        saes[name] = fit(dataclasses.replace(train, **changes)).sae
    return saes


def _pairs(names: list[str]) -> list[tuple[int, int]]:
    return [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]


@torch.no_grad()
def stream_correlations(
    sae: UniversalSAE, indep: dict[str, UniversalSAE], store: Store, *, stop: int, batch_size: int, progress: bool
) -> tuple[dict[tuple[int, int], Tensor], dict[tuple[int, int], np.ndarray]]:
    """One pass over rows [0, stop): for each model pair (i < j), the (s, s) correlation of the
    independent SAEs' latents, and the per-latent correlation of USAE latent l encoded from i vs j."""
    names, device = sae.model_names, next(sae.parameters()).device
    pairs = _pairs(names)
    indep_sums = {p: CorrelationSums(indep[names[p[0]]].n_latents, indep[names[p[1]]].n_latents, device) for p in pairs}
    same_sums = {p: _SameLatentSums(sae.n_latents, device) for p in pairs}
    bar = tqdm(total=stop, unit="row", desc="baselines", disable=not progress)
    for _, batch in store.iter_batches(batch_size, names=names, start=0, stop=stop):
        x = {n: torch.from_numpy(batch[n]).to(device) for n in names}
        z_ind = {n: indep[n].encode_sparse(n, x[n]) for n in names}
        z_usae = {n: _to_dense(sae.encode_sparse(n, x[n]), sae.n_latents) for n in names}
        for i, j in pairs:
            indep_sums[(i, j)].update(z_ind[names[i]], z_ind[names[j]])
            same_sums[(i, j)].update(z_usae[names[i]], z_usae[names[j]])
        bar.update(next(iter(batch.values())).shape[0])
    bar.close()
    return {p: s.corr() for p, s in indep_sums.items()}, {p: s.corr() for p, s in same_sums.items()}


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
        for i, j in _pairs(names):
            cka_mm[i, j] = cka_mm[j, i] = linear_cka(rep[names[i]], rep[names[j]])
            knn_mm[i, j] = knn_mm[j, i] = mutual_knn(rep[names[i]], rep[names[j]], k, max_rows=len(rows))
        out["cka"][kind], out["mutual_knn"][kind] = cka_mm.tolist(), knn_mm.tolist()
    return out


def _recovery(sae: UniversalSAE, indep: dict[str, UniversalSAE], matchings: dict, truth: Path) -> dict[str, Any]:
    from usae.synth import load_truth, recovery

    world, names = load_truth(truth), sae.model_names
    stitched = stitch_dictionaries(
        {n: indep[n].dictionary(n).cpu().numpy() for n in names},
        names[0],
        {names[j]: matchings[(0, j)] for j in range(1, len(names))},
    )
    return {
        "threshold": 0.9,
        "usae": recovery({n: sae.dictionary(n).cpu().numpy() for n in names}, world),
        "independent_matched": recovery(stitched, world),
    }


def _matching_section(
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


def run_baselines(
    run_dir: str | Path,
    store_dir: str | Path,
    *,
    max_rows: int | None = None,
    batch_size: int = 8192,
    similarity_rows: int = 2048,
    knn_k: int = 10,
    match_threshold: float = 0.5,
    cosine_threshold: float = 0.5,
    truth: str | Path | None = None,
    retrain: bool = False,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or reuse) independent SAEs under RUN/baselines/, compare, write RUN/baselines.json.

    Keys: ``matching`` (per model pair: independent SAEs matched by activation correlation +
    Hungarian, vs the USAE's same-index correlation), ``dictionary_agreement`` (per model, the
    paper's cosine > 0.5 comparison with a random baseline), ``similarity`` (CKA and mutual k-NN,
    (m, m) per representation), ``recovery`` (only with ``truth``). See docs/report.md.
    """
    run_dir, store = Path(run_dir), open_store(store_dir)
    sae = load(run_dir, device=resolve_device(device))
    names = sae.model_names
    if len(names) < 2:
        raise UsaeError(f"{run_dir}: baselines compare models; this run has one ({names})")
    train = read_run_config(run_dir)["train"]
    if read_run_config(run_dir).get("store", {}).get("hash") not in (None, store.hash):
        log.warning("%s is not the store %s was trained on; the independent SAEs train on it", store.path, run_dir)
    indep = train_independent(run_dir, store.path, retrain=retrain, device=device, progress=progress)
    stop = store.n_rows if max_rows is None else min(max_rows, store.n_rows)
    corr, same = stream_correlations(sae, indep, store, stop=stop, batch_size=batch_size, progress=progress)
    matchings = {p: match_latents(c) for p, c in corr.items()}
    result: dict[str, Any] = {
        "baselines_version": BASELINES_VERSION,
        "run": str(run_dir),
        "store": {"path": str(store.path), "hash": store.hash},
        "model_names": names,
        "n_rows": stop,
        "independent": {
            "dir": str(run_dir / BASELINES_DIR),
            **{key: train[key] for key in ("n_latents", "k", "steps", "batch_size", "seed")},
        },
        "matching": _matching_section(names, matchings, same, match_threshold),
        "dictionary_agreement": {
            n: dictionary_agreement(sae.dictionary(n).cpu(), indep[n].dictionary(n).cpu(), cosine_threshold, seed)
            for n in names
        },
        "similarity": representation_similarity(
            sae, indep, store, stop=stop, n_rows=similarity_rows, knn_k=knn_k, seed=seed
        ),
    }
    if truth is not None:
        result["recovery"] = _recovery(sae, indep, matchings, Path(truth))
    write_json_atomic(run_dir / BASELINES_JSON, result)
    log.info("wrote %s", run_dir / BASELINES_JSON)
    return result


def baseline_cli(cfg: BaselineConfig) -> dict[str, Any]:
    """``usae baseline RUN STORE``: ``run_baselines`` with the config's settings."""
    kwargs = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in ("run", "store")}
    return run_baselines(cfg.run, cfg.store, **kwargs)
