"""What ``usae frontier`` measures on each dictionary of a grid point, and the dictionaries it does not train.

A point holds three dictionary kinds, each an artifact directory so ``usae label`` and ``usae splice``
open it like any run: ``universal`` (a trained run), ``independent`` (one trained single-model SAE
per model, joined side by side into one UniversalSAE, so latent l of model i is unrelated to latent
l of model j: its cross R² is what "no shared code" scores) and ``random`` (``random_dictionary``).

Every kind is scored by the same three measurements on the held-out store:

* ``evaluate_sae`` (usae evaluate): self / cross R² (ours and paper-compatible), concept classes,
  dead share, L0;
* a **naming** plug-in (``Naming``): per label family, concepts named beyond chance per model, the
  concepts with the same name in every model that uses them, and the shuffled-label control.
  ``LabelNaming`` runs ``usae label`` (dataset + pixel labels; stores with images);
  ``RowLabelNaming`` names from labels the caller gives per row (synthetic worlds);
* a **task-fidelity** plug-in (``TaskFidelity``): loss recovered [source][destination].
  ``SpliceFidelity`` runs ``usae splice`` (backbones that splice); ``LinearTaskFidelity`` reads a
  linear task head per model off the rows (a dense head: MSE to the clean output, mean-ablation
  floor, the definition of ``usae splice``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from scipy import sparse
from torch import Tensor

from usae.config import EvalConfig, LabelConfig, SpliceConfig, TrainConfig
from usae.data.store import Store
from usae.evaluation.evaluate import evaluate_sae
from usae.evaluation.fidelity.measures import loss_recovered
from usae.evaluation.fidelity.splice import splice
from usae.evaluation.naming.label import label
from usae.evaluation.naming.scores import LabelMatrix, name_concepts, shuffled_control
from usae.evaluation.naming.scores import Naming as NamingResult
from usae.extraction.backbones import Backbone, parse_spec
from usae.model.sae import SparseCode, UniversalSAE, dense
from usae.training.build import build_sae

log = logging.getLogger(__name__)

USED_MIN_FIRES = 10
"""A model uses a concept (for the random-backbone overlap) when it fires on at least this many rows."""


# -- the dictionaries that are not trained -----------------------------------------------------------
def random_dictionary(train: TrainConfig, store: Store, names: list[str]) -> UniversalSAE:
    """The random-dictionary control of a point: ``train``'s shapes, TopK and normalisation (the
    store's), unit-norm random rows per model (seeded), encoder = decoder transpose, zero biases."""
    return build_sae(dataclasses.replace(train, init="random"), store, names, torch.device("cpu")).eval()


def join_independent(saes: Mapping[str, UniversalSAE]) -> UniversalSAE:
    """One-model SAEs (model name -> SAE of that model) side by side in one UniversalSAE, heads unchanged."""
    first = next(iter(saes.values()))
    joined = UniversalSAE(dataclasses.replace(first.cfg, widths={n: s.cfg.widths[n] for n, s in saes.items()}))
    for name, sae in saes.items():
        joined.heads[name].load_state_dict(sae.head(name).state_dict())
    return joined.eval()


# -- plug-ins ------------------------------------------------------------------------------------------
class Naming(Protocol):
    """Names a dictionary's concepts on ``store``: {family: ``naming_summary``} or None (no labels)."""

    name: str

    def __call__(self, kind_dir: Path, sae: UniversalSAE, store: Store, out_dir: Path) -> dict[str, Any] | None: ...


class TaskFidelity(Protocol):
    """Loss recovered [source][destination] of a dictionary on ``store`` (None where a destination
    cannot be measured), or None when no model can."""

    name: str

    def __call__(
        self, kind_dir: Path, sae: UniversalSAE, store: Store, out_dir: Path
    ) -> list[list[float | None]] | None: ...


def naming_summary(named: dict[str, Any], control: dict[str, Any], concepts: list[dict[str, Any]],
                   n_latents: int, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """One family's numbers: per model named / used, agreed across models, and two chance levels.

    ``named_share``: concepts with the same name beyond chance in every model that uses them, per
    latent of the dictionary; ``per_model``: each model's named share of the concepts it uses;
    ``named_share_shuffled``: ``named_share`` with shuffled labels (``usae label``'s control);
    ``named_share_chance``: the agreement expected if the models' latents were unrelated
    (``chance_agreement``): what two dictionaries that name every concept would agree on by luck.
    """
    per_model = {m: (named["named"][m] / u if u else None) for m, u in named["used"].items()}
    return {
        "used": named["used"],
        "named": named["named"],
        "agreed": named["agreed"],
        "named_share": named["agreed"] / n_latents,
        "per_model": per_model,
        "shuffled_named": control["named"],
        "shuffled_agreed": control["agreed"],
        "named_share_shuffled": control["agreed"] / n_latents,
        "named_share_chance": chance_agreement(concepts, list(named["used"]), seed=seed) / n_latents,
    }


def chance_agreement(concepts: list[dict[str, Any]], models: list[str], n_perm: int = 200, seed: int = 0) -> float:
    """Mean number of agreeing concepts when each model's concepts are permuted independently.

    ``concepts``: per concept {model: None (unused) or {"label", "significant", ...}} (the schema of
    ``scores.Naming.concepts`` and labels.json). A concept agrees when >= 2 models use it and all of
    them name it significantly with one label; permuting latent indices per model keeps every
    model's names and breaks only their pairing across models.
    """
    if len(models) < 2 or not concepts:
        return 0.0
    labels = [[(e[m]["label"] if e[m]["significant"] else "") if e.get(m) else None for e in concepts] for m in models]
    vocab = {n: i for i, n in enumerate(sorted({n for per in labels for n in per if n}))}
    # per model and concept: -2 unused, -1 used but not named, >= 0 the significant label (one vocabulary)
    c_ms = np.array([[-2 if n is None else -1 if n == "" else vocab[n] for n in per] for per in labels])
    rng = np.random.default_rng([seed, 0xA9EE])
    total = 0
    for _ in range(n_perm):
        p_ms = np.stack([rng.permutation(row) for row in c_ms])
        used_ms = p_ms != -2
        lo = np.where(used_ms, p_ms, np.iinfo(np.int64).max).min(0)  # unused models do not vote
        hi = np.where(used_ms, p_ms, -3).max(0)
        total += int(((used_ms.sum(0) >= 2) & (lo == hi) & (lo >= 0)).sum())
    return total / n_perm


@dataclasses.dataclass(frozen=True)
class LabelNaming:
    """``usae label`` (dataset labels where the store records them, pixel labels from the images)."""

    n_perm: int = 5000
    device: str = "auto"
    name: str = "label"

    def __call__(self, kind_dir: Path, sae: UniversalSAE, store: Store, out_dir: Path) -> dict[str, Any] | None:
        if store.image_ids is None or store.tokens_per_image is None or "images" not in store.extra:
            return None  # no images to name from (a synthetic store): nothing to say
        cfg = LabelConfig(run=kind_dir, store=store.path, out=out_dir, n_perm=self.n_perm, device=self.device,
                          progress=False)  # fmt: skip
        families = label(cfg)["families"]
        return {
            fam: naming_summary(f["summary"], f["shuffled"], [f["concepts"][str(k)] for k in range(sae.n_latents)],
                                sae.n_latents)
            for fam, f in families.items()
        }  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RowLabelNaming:
    """Names from labels given per store row (``labels.labels_nl``: (rows, labels)), scored on each
    row's code; the family is called ``rows``."""

    labels: LabelMatrix
    n_top: int = 20
    n_perm: int = 2000
    alpha: float = 0.01
    seed: int = 0
    name: str = "rows"

    def __call__(self, kind_dir: Path, sae: UniversalSAE, store: Store, out_dir: Path) -> dict[str, Any] | None:
        n = self.labels.labels_nl.shape[0]
        acts = {m: row_codes(sae, store, m, n) for m in sae.model_names}
        opts = {"n_top": self.n_top, "n_perm": self.n_perm, "alpha": self.alpha}
        named = name_concepts(acts, self.labels, seed=self.seed, **opts)
        control = shuffled_control(acts, self.labels, seed=self.seed + 1, **opts)
        return {"rows": naming_summary(_counts(named), _counts(control), named.concepts, sae.n_latents, self.seed)}


def _counts(naming: NamingResult) -> dict[str, Any]:
    return {"used": naming.used, "named": naming.named, "agreed": naming.agreed}


@torch.no_grad()
def row_codes(sae: UniversalSAE, store: Store, name: str, n_rows: int, batch_size: int = 8192) -> sparse.csr_matrix:
    """Model ``name``'s codes of the store's first ``n_rows`` rows, (rows, s) sparse."""
    parts = []
    for start in range(0, n_rows, batch_size):
        x_bd = torch.from_numpy(store.rows(name, start, min(n_rows, start + batch_size)))
        code = sae.encode_sparse(name, x_bd.to(next(sae.parameters())))
        parts.append(sparse.csr_matrix(dense(code, sae.n_latents).float().cpu().numpy()))
    return sparse.vstack(parts).tocsr()


@dataclasses.dataclass(frozen=True)
class SpliceFidelity:
    """``usae splice`` on ``max_images`` held-out images (stores whose backbones splice)."""

    max_images: int | None = 32
    backbones: Mapping[str, Backbone] | None = None
    device: str = "auto"
    name: str = "splice"

    def __call__(
        self, kind_dir: Path, sae: UniversalSAE, store: Store, out_dir: Path
    ) -> list[list[float | None]] | None:
        if not store.extra.get("backbones") or store.image_ids is None or store.grid is None:
            return None  # no backbone to splice into (a synthetic store, a store written by hand)
        cfg = SpliceConfig(run=kind_dir, store=store.path, out=out_dir, max_images=self.max_images,
                           device=self.device, progress=False)  # fmt: skip
        result = splice(cfg, self.backbones)
        return result["matrices"]["loss_recovered"] if any(result["available"].values()) else None


@dataclasses.dataclass(frozen=True)
class LinearTaskFidelity:
    """A linear task head per model, ``y = x @ heads[m]`` (raw units, (d_m, c)), as the task: loss
    recovered = 1 - MSE(y(x̂), y(x)) / MSE(y(mean), y(x)) over the store's first ``max_rows`` rows."""

    heads: Mapping[str, Tensor]
    max_rows: int | None = None
    batch_size: int = 8192
    name: str = "linear-head"

    @torch.no_grad()
    def __call__(
        self, kind_dir: Path, sae: UniversalSAE, store: Store, out_dir: Path
    ) -> list[list[float | None]] | None:
        names = [n for n in sae.model_names if n in self.heads]
        if not names:
            return None
        stop = store.n_rows if self.max_rows is None else min(self.max_rows, store.n_rows)
        heads = {n: torch.as_tensor(self.heads[n], dtype=torch.float64) for n in names}
        floor_out = {n: torch.from_numpy(store.stats(n).mean).double() @ heads[n] for n in names}
        m = len(sae.model_names)
        sse = torch.zeros(m, m, dtype=torch.float64)
        floor = dict.fromkeys(names, 0.0)
        for _, batch in store.iter_batches(self.batch_size, names=sae.model_names, stop=stop):
            x = {n: torch.from_numpy(v) for n, v in batch.items()}
            clean = {n: x[n].double() @ heads[n] for n in names}
            for n in names:
                floor[n] += float((clean[n] - floor_out[n]).square().sum())
            for i, src in enumerate(sae.model_names):
                code: SparseCode | Tensor = sae.encode_sparse(src, x[src])
                for j, dst in enumerate(sae.model_names):
                    if dst in names:
                        sse[i, j] += (sae.decode(dst, code).double() @ heads[dst] - clean[dst]).square().sum()
        return [
            [
                loss_recovered(floor[dst], float(sse[i, j])) if dst in names else None
                for j, dst in enumerate(sae.model_names)
            ]
            for i in range(m)
        ]


# -- one dictionary, scored ----------------------------------------------------------------------------
def score_dictionary(
    kind_dir: Path,
    sae: UniversalSAE,
    store: Store,
    out_dir: Path,
    eval_cfg: EvalConfig,
    naming: Naming | None,
    fidelity: TaskFidelity | None,
) -> dict[str, Any]:
    """Every measurement of one dictionary on the held-out ``store`` (JSON-ready)."""
    report = evaluate_sae(sae, store, eval_cfg)
    names = report["model_names"]
    out_dir.mkdir(parents=True, exist_ok=True)
    matrix = fidelity(kind_dir, sae, store, out_dir / "fidelity") if fidelity is not None else None
    named = naming(kind_dir, sae, store, out_dir / "naming") if naming is not None else None
    return {
        "model_names": names,
        "r2_matrix": report["r2_matrix"],
        "r2_matrix_paper": report["r2_matrix_paper"],
        "r2_self": report["r2_self_mean"],
        "r2_cross": report["r2_cross_mean"],
        "r2_self_paper": _mean([report["r2_matrix_paper"][i][i] for i in range(len(names))]),
        "r2_cross_paper": _mean(_off_diagonal(report["r2_matrix_paper"])),
        "l0": report["l0"],
        "dead_fraction": report["dead_fraction"],
        "dead_fraction_all": report["dead_fraction_all"],
        "classes": report["classes"]["counts"],
        "fires": report["fires"],
        "loss_recovered": None if matrix is None else fidelity_summary(matrix, names),
        "naming": named,
    }


def fidelity_summary(matrix: list[list[float | None]], names: list[str]) -> dict[str, Any]:
    """Per destination model: loss recovered from its own code and the mean over other models' codes."""
    own = {dst: matrix[j][j] for j, dst in enumerate(names)}
    cross = {dst: _mean([matrix[i][j] for i in range(len(names)) if i != j]) for j, dst in enumerate(names)}
    return {"matrix": matrix, "own": own, "cross": cross}


def random_models(store: Store, given: tuple[str, ...] | None) -> list[str]:
    """The store's random backbones: ``given``, else the models extracted from ``fake:`` specs."""
    if given is not None:
        return [n for n in given if n in store.widths]
    specs = {b.get("name"): b.get("spec") for b in store.extra.get("backbones", []) if isinstance(b, dict)}
    return [n for n in store.model_names if isinstance(specs.get(n), str) and _is_fake(specs[n])]


def _is_fake(spec: str) -> bool:
    try:
        return parse_spec(spec)[1] == "fake"
    except Exception:  # noqa: BLE001 (a spec this version cannot parse is not a fake one)
        return False


def random_backbone_section(scored: dict[str, Any], randoms: list[str]) -> dict[str, Any] | None:
    """How universal a random backbone is against the real ones, from a scored dictionary.

    Per random model r: mean cross R² from the real models' codes into r and from r's code into the
    real models, the real models' own mean cross R² beside them, and the share of the concepts r
    uses (fires on >= ``USED_MIN_FIRES`` rows) that some real model uses too.
    """
    names = scored["model_names"]
    real = [i for i, n in enumerate(names) if n not in randoms]
    if not real or len(real) == len(names):
        return None
    r2 = scored["r2_matrix"]
    used = {n: np.asarray(scored["fires"][n]) >= USED_MIN_FIRES for n in names}
    real_used = np.any([used[names[i]] for i in real], axis=0)
    out = {"real_r2_cross": _mean([r2[i][j] for i in real for j in real if i != j])}
    for r, name in enumerate(names):
        if name in randoms:
            n_used = int(used[name].sum())
            out[name] = {
                "r2_from_real": _mean([r2[i][r] for i in real]),
                "r2_to_real": _mean([r2[r][j] for j in real]),
                "shared_with_real": float((used[name] & real_used).sum() / n_used) if n_used else None,
            }
    return out


def _off_diagonal(m: list[list[float | None]]) -> list[float | None]:
    return [m[i][j] for i in range(len(m)) for j in range(len(m)) if i != j]


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None
