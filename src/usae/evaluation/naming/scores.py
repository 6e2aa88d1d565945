"""Concept naming: the label a concept's strongest activations carry, scored against label-permutation chance.

A concept (SAE latent) fires on a small share of items, so the primary question is what its
*strongest* activations are: per concept and model, the precision of its top-N items for each
label, compared with the label's base rate (lift). AUROC over all items is reported as a
secondary number. Items are whatever the caller makes them (images with a per-image max over
tokens, see :func:`pool_images`, or tokens); every function here is item-agnostic.

Choosing the label. Raw precision favours common labels and lift favours rare ones, so each
(concept, label) is scored by its *surprise*: -log P(X >= hits), X ~ Hypergeometric(items,
label support, N), the chance of at least that many label items among N drawn at random. The best
label is the eligible label of largest surprise.

Chance level. Permuting the rows of ``labels_nl`` (keeps label co-occurrence, e.g. parent and
child) leaves a concept's top-N set fixed and gives it the label rows of N random items. That null
is the same for every concept, so one sample of "max surprise over eligible labels for N random
items" serves all concepts and models (the max accounts for picking the best of many labels):
p = (1 + #null >= observed) / (1 + n_perm).

Significance. Concepts × models are many tests, so names are kept at a Benjamini–Hochberg false
discovery rate ``alpha`` over all (model, used concept) p-values; under pure chance (the shuffled
control) that names nothing with probability >= 1 - alpha. The p-value floor is 1 / (1 + n_perm),
so BH can only name concepts when at least m / (alpha · (1 + n_perm)) of the m tests are
nameable; raise ``n_perm`` when few concepts carry labels.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy import sparse
from scipy.stats import hypergeom

from usae.errors import UsaeError

log = logging.getLogger(__name__)

Acts = np.ndarray | sparse.sparray | sparse.spmatrix  # (items, concepts): dense array or any scipy sparse

RESERVED_KEYS = ("agrees", "best")  # per-concept keys that share a dict with model names
_BLOCK_ELEMENTS = 1 << 24  # bounds the temporaries of one column block / gather (elements)


class LabelMatrix(NamedTuple):
    """Items × labels membership. Multi-label; a hierarchy ("animals", "animals/marsupials") is
    just separate columns."""

    labels_nl: np.ndarray  # bool (n_items, n_labels)
    names: list[str]  # n_labels unique names, column order


class TopN(NamedTuple):
    """Each concept's strongest items."""

    index_sn: np.ndarray  # int64 (s, n): item indices, strongest first; a row of -1 when the concept fires on < n items
    fires_s: np.ndarray  # int64 (s,): items with activation > 0


class Pooled(NamedTuple):
    """Token rows reduced to one row per image."""

    act_ns: np.ndarray  # (n_images, ...) reduced rows
    image_n: np.ndarray  # (n_images,) image id of each row, ascending


class Naming(NamedTuple):
    """Names of all concepts of all models; every field is JSON-ready (``naming._asdict()``).

    ``concepts[k]`` = {model: None (model does not use concept k) or {"label", "precision_at_n",
    "lift", "auroc", "p_value", "n" (label support, items), "significant"}, "agrees": bool,
    "best": label or None}.
    """

    concepts: list[dict[str, Any]]
    used: dict[str, int]  # concepts each model uses (fires on >= min_fires items)
    named: dict[str, int]  # concepts each model names significantly
    shared: int  # concepts used by >= 2 models
    agreed: int  # concepts with agrees = True
    p_threshold: float  # BH cut-off applied to p_value (0.0: nothing significant)


class _ModelScores(NamedTuple):
    """One model's best label per concept; arrays are (s,), NaN / -1 where the concept is unused."""

    used_s: np.ndarray  # bool: fires on >= min_fires items
    label_s: np.ndarray  # int: column of the best eligible label
    surprise_s: np.ndarray  # -log hypergeometric tail of its top-N hits
    p_s: np.ndarray
    precision_s: np.ndarray
    lift_s: np.ndarray
    auroc_s: np.ndarray


# ---------------------------------------------------------------------------------------------
# Labels and items


def label_matrix(item_labels: Sequence[Iterable[str]], *, ancestors: bool = True) -> LabelMatrix:
    """A :class:`LabelMatrix` from each item's label names (columns sorted by name).

    With ``ancestors`` a name "a/b/c" also gives the item "a" and "a/b", so a parent column is the
    union of its children.
    """
    per_item: list[set[str]] = []
    for names in item_labels:
        split = [name.split("/") if ancestors else [name] for name in map(str, names)]
        per_item.append({"/".join(parts[: i + 1]) for parts in split for i in range(len(parts))})
    names_l = sorted(set().union(*per_item)) if per_item else []
    column = {name: j for j, name in enumerate(names_l)}
    labels_nl = np.zeros((len(per_item), len(names_l)), dtype=bool)
    for i, found in enumerate(per_item):
        labels_nl[i, [column[name] for name in found]] = True
    return LabelMatrix(labels_nl, names_l)


def check_labels(labels: LabelMatrix, n_items: int | None = None) -> np.ndarray:
    """``labels.labels_nl`` as a bool array after checking shape, names and (optionally) item count."""
    labels_nl = np.asarray(labels.labels_nl)
    if labels_nl.ndim != 2:
        raise UsaeError(f"labels_nl must be 2-D (items, labels); got shape {labels_nl.shape}")
    if labels_nl.dtype != bool and not np.isin(labels_nl, (0, 1)).all():
        raise UsaeError("labels_nl must hold booleans (or 0/1)")
    if len(labels.names) != labels_nl.shape[1] or len(set(labels.names)) != len(labels.names):
        raise UsaeError(f"label names: need {labels_nl.shape[1]} unique names, got {len(labels.names)}")
    if n_items is not None and labels_nl.shape[0] != n_items:
        raise UsaeError(f"labels_nl has {labels_nl.shape[0]} items; the activations have {n_items}")
    return labels_nl.astype(bool, copy=False)


def eligible_labels(labels_nl: np.ndarray, min_support: int) -> np.ndarray:
    """bool (L,): labels with ``min_support <= support <= n_items - min_support``.

    Too few positives make any score luck (3 items reach AUROC 0.99 by chance); too few negatives
    make the label uninformative. No extra rule ties support to N: the surprise score already
    accounts for a label whose support caps its precision below 1.
    """
    support_l = labels_nl.sum(0)
    return (support_l >= min_support) & (support_l <= labels_nl.shape[0] - min_support)


def _pool(rows_t: np.ndarray, image_t: np.ndarray, reduce: np.ufunc, what: str) -> Pooled:
    """Reduce token rows per image with ``reduce``; rows need not be grouped (a copy only if not)."""
    image_t = np.asarray(image_t).ravel()
    if rows_t.shape[0] != len(image_t) or len(image_t) == 0:
        raise UsaeError(f"{what}: {rows_t.shape[0]} rows but {len(image_t)} image ids")
    order = None if np.all(image_t[1:] >= image_t[:-1]) else np.argsort(image_t, kind="stable")
    image_n, starts = np.unique(image_t if order is None else image_t[order], return_index=True)
    return Pooled(reduce.reduceat(rows_t if order is None else rows_t[order], starts, axis=0), image_n)


def pool_images(act_ts: np.ndarray, image_t: np.ndarray) -> Pooled:
    """Per-image max over tokens: (t, s) dense activations and (t,) image ids -> (n_images, s)."""
    return _pool(np.asarray(act_ts), image_t, np.maximum, "pool_images")


def pool_labels(labels_tl: np.ndarray, image_t: np.ndarray) -> Pooled:
    """Per-image "any token carries it": (t, L) bool and (t,) image ids -> (n_images, L) bool."""
    return _pool(np.asarray(labels_tl, dtype=bool), image_t, np.logical_or, "pool_labels")


# ---------------------------------------------------------------------------------------------
# Scores: top-N, precision, lift, AUROC


def _as_acts(act_ns: Acts) -> Acts:
    """Activations as a 2-D dense array or a CSC matrix (cheap column slices)."""
    if sparse.issparse(act_ns):
        return sparse.csc_matrix(act_ns)
    act_ns = np.asarray(act_ns)
    if act_ns.ndim != 2 or not np.issubdtype(act_ns.dtype, np.number) or 0 in act_ns.shape:
        raise UsaeError(f"activations must be a non-empty numeric 2-D (items, concepts) array; got {act_ns.shape}")
    return act_ns


def _block_nonzeros(act_ns: Acts, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, local columns, values) of the non-zero activations of concepts c0..c1-1."""
    if sparse.issparse(act_ns):
        blk = act_ns[:, c0:c1].tocoo()
        keep = blk.data != 0
        rows, cols, vals = blk.row[keep], blk.col[keep], blk.data[keep]
    else:
        blk = act_ns[:, c0:c1]
        rows, cols = np.nonzero(blk)
        vals = blk[rows, cols]
    if not np.isfinite(vals).all():
        raise UsaeError(f"activations of concepts {c0}..{c1 - 1} hold NaN or inf")
    return rows.astype(np.int64), cols.astype(np.int64), vals.astype(np.float64)


def _scan_block(
    rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n_items: int, n_cols: int, n_top: int, labels_f_nl: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:  # fmt: skip
    """(top-N items (c, n), fires (c,), AUROC (c, L) or None) of one column block; see :func:`_scan`."""
    # Sort by (column, value, -row): a column's strongest items end its segment, ties favour lower rows.
    order = np.lexsort((-rows, vals, cols))
    rows, cols, vals = rows[order], cols[order], vals[order]
    count_c = np.bincount(cols, minlength=n_cols)
    end_c = np.cumsum(count_c)
    pos_c = np.bincount(cols, weights=vals > 0, minlength=n_cols).astype(np.int64)
    take_cn = np.maximum(end_c[:, None] - 1 - np.arange(n_top)[None], 0)
    index_cn = np.where((pos_c >= n_top)[:, None], rows[take_cn] if rows.size else -1, -1)
    if labels_f_nl is None:
        return index_cn, pos_c, None
    # Midranks among the column's non-zeros, then shifted past the zero block for positive values.
    new = np.ones(len(vals), dtype=bool)
    new[1:] = (cols[1:] != cols[:-1]) | (vals[1:] != vals[:-1])
    first = np.flatnonzero(new)
    last = np.r_[first[1:], len(vals)] - 1
    group = np.cumsum(new) - 1
    zeros_c = n_items - count_c
    rank = (first[group] + last[group]) / 2.0 - (end_c - count_c)[cols] + 1.0 + zeros_c[cols] * (vals > 0)
    zero_rank_c = (count_c - pos_c) + (zeros_c + 1) / 2.0
    offset = sparse.csr_matrix((rank - zero_rank_c[cols], (cols, rows)), shape=(n_cols, n_items))
    support_l = labels_f_nl.sum(0)
    r_pos_cl = support_l[None] * zero_rank_c[:, None] + np.asarray(offset @ labels_f_nl)
    with np.errstate(divide="ignore", invalid="ignore"):
        return index_cn, pos_c, (r_pos_cl - support_l * (support_l + 1) / 2) / (support_l * (n_items - support_l))


def _scan(act_ns: Acts, n_top: int, labels_nl: np.ndarray | None) -> tuple[TopN, np.ndarray | None]:
    """One pass over the concepts in column blocks: top-N items and (with labels) AUROC (s, L).

    AUROC = (R_pos - P(P+1)/2) / (P (n - P)) with R_pos the positives' midrank sum. Only non-zero
    activations are ranked: the zero block ties at one midrank, so R_pos = P · zero_rank + the
    labelled non-zeros' (rank - zero_rank), one sparse product per block. Values may be negative.
    """
    n_items, n_concepts = act_ns.shape
    block = max(1, _BLOCK_ELEMENTS // max(n_items, 1))
    labels_f_nl = None if labels_nl is None else labels_nl.astype(np.float64)
    parts = [
        _scan_block(*_block_nonzeros(act_ns, c0, min(c0 + block, n_concepts)), n_items,
                    min(c0 + block, n_concepts) - c0, n_top, labels_f_nl)
        for c0 in range(0, n_concepts, block)
    ]  # fmt: skip
    top = TopN(np.concatenate([p[0] for p in parts]).astype(np.int64), np.concatenate([p[1] for p in parts]))
    return top, (np.concatenate([p[2] for p in parts]) if labels_nl is not None else None)


def top_n(act_ns: Acts, n_top: int) -> TopN:
    """Each concept's ``n_top`` strongest items (activation > 0), strongest first, ties to the lower index."""
    if n_top < 1:
        raise UsaeError(f"n_top must be >= 1; got {n_top}")
    return _scan(_as_acts(act_ns), n_top, None)[0]


def auroc(act_ns: Acts, labels_nl: np.ndarray) -> np.ndarray:
    """AUROC (s, L) of each concept's activations for each label, ties (the zero block) counted as 1/2.

    NaN for a label with no positive or no negative item.
    """
    act_ns = _as_acts(act_ns)
    labels_nl = np.asarray(labels_nl, dtype=bool)
    if labels_nl.ndim != 2 or labels_nl.shape[0] != act_ns.shape[0]:
        raise UsaeError(f"auroc: labels_nl {labels_nl.shape} does not match {act_ns.shape[0]} items")
    return _scan(act_ns, 1, labels_nl)[1]


def label_hits(index_sn: np.ndarray, labels_nl: np.ndarray) -> np.ndarray:
    """int64 (s, L): how many of each concept's top items carry each label (0 for a row of -1)."""
    index_sn = np.asarray(index_sn)
    hits_sl = np.zeros((index_sn.shape[0], labels_nl.shape[1]), dtype=np.int64)
    step = max(1, _BLOCK_ELEMENTS // max(index_sn.shape[1] * labels_nl.shape[1], 1))
    for c0 in range(0, index_sn.shape[0], step):
        idx = index_sn[c0 : c0 + step]
        hits_sl[c0 : c0 + step] = (labels_nl[np.maximum(idx, 0)] & (idx >= 0)[..., None]).sum(1)
    return hits_sl


def precision_at_n(index_sn: np.ndarray, labels_nl: np.ndarray) -> np.ndarray:
    """float (s, L): share of each concept's top-N items carrying each label; NaN for a row of -1."""
    index_sn = np.asarray(index_sn)
    prec_sl = label_hits(index_sn, labels_nl) / index_sn.shape[1]
    prec_sl[~(index_sn >= 0).all(1)] = np.nan
    return prec_sl


def lift(prec_sl: np.ndarray, labels_nl: np.ndarray) -> np.ndarray:
    """float (s, L): precision / base rate (1 = chance); NaN for a label on no item."""
    base_l = labels_nl.mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(base_l > 0, prec_sl / np.where(base_l > 0, base_l, 1.0), np.nan)


# ---------------------------------------------------------------------------------------------
# Chance: surprise, permutation null, multiple testing


def surprise_table(support_l: np.ndarray, n_items: int, n_top: int) -> np.ndarray:
    """float (L, n_top + 1): -log P(X >= h), X ~ Hypergeometric(n_items, support_l, n_top); inf if h > support."""
    h = np.arange(n_top + 1)
    with np.errstate(divide="ignore"):
        logpmf_lh = hypergeom.logpmf(h[None], n_items, np.asarray(support_l)[:, None], n_top)
    # log of the upper tail, summed in log space from the top so tiny tails do not underflow
    logsf_lh = np.logaddexp.accumulate(logpmf_lh[:, ::-1], axis=1)[:, ::-1]
    return np.maximum(-logsf_lh, 0.0)


def max_label_null(
    labels_nl: np.ndarray, surprise_lh: np.ndarray, n_top: int, n_perm: int, rng: np.random.Generator
) -> np.ndarray:
    """float (n_perm,) sorted: max over labels of the surprise of ``n_top`` random distinct items.

    This is the distribution of a concept's best-label surprise when the label rows are permuted,
    for any concept (its top-N set is fixed, so it sees the rows of n_top random items).
    ``labels_nl`` and ``surprise_lh`` hold the eligible labels only.
    """
    n_items, n_labels = labels_nl.shape
    null_b = np.empty(n_perm)
    step = max(1, _BLOCK_ELEMENTS // max(n_top * n_labels, 1))
    for b0 in range(0, n_perm, step):
        b1 = min(b0 + step, n_perm)
        idx_bn = np.stack([rng.choice(n_items, n_top, replace=False) for _ in range(b1 - b0)])
        hits_bl = labels_nl[idx_bn].sum(1)
        null_b[b0:b1] = surprise_lh[np.arange(n_labels)[None], hits_bl].max(1)
    return np.sort(null_b)


def permutation_p(observed_s: np.ndarray, null_b: np.ndarray) -> np.ndarray:
    """p = (1 + #null >= observed) / (1 + n_perm), per entry of ``observed_s``; ``null_b`` sorted."""
    n_at_least = len(null_b) - np.searchsorted(null_b, observed_s, side="left")
    return (1.0 + n_at_least) / (1.0 + len(null_b))


def bh_threshold(p_values: np.ndarray, alpha: float) -> float:
    """Benjamini–Hochberg: the largest p_(k) with p_(k) <= alpha k / m (0.0 when none qualifies)."""
    p_sorted = np.sort(np.asarray(p_values, dtype=np.float64).ravel())
    ok = p_sorted <= alpha * np.arange(1, len(p_sorted) + 1) / max(len(p_sorted), 1)
    return float(p_sorted[np.flatnonzero(ok)[-1]]) if ok.any() else 0.0


# ---------------------------------------------------------------------------------------------
# Naming


def _score_model(
    act_ns: Acts, labels_nl: np.ndarray, eligible_l: np.ndarray, surprise_lh: np.ndarray, null_b: np.ndarray,
    n_top: int, min_fires: int,
) -> _ModelScores:  # fmt: skip
    """Best eligible label of each concept of one model, with its scores and permutation p-value."""
    top, auroc_sl = _scan(act_ns, n_top, labels_nl)
    used_s = top.fires_s >= min_fires
    cols_e = np.flatnonzero(eligible_l)
    hits_se = label_hits(top.index_sn, labels_nl[:, cols_e])
    surprise_se = surprise_lh[cols_e[None], hits_se]
    best_s = surprise_se.argmax(1)
    label_s = np.where(used_s, cols_e[best_s], -1)
    rows_s = np.arange(len(label_s))
    surprise_s = np.where(used_s, surprise_se[rows_s, best_s], np.nan)
    precision_s = np.where(used_s, hits_se[rows_s, best_s] / n_top, np.nan)
    lift_s = precision_s / labels_nl.mean(0)[cols_e[best_s]]
    p_s = np.where(used_s, permutation_p(np.nan_to_num(surprise_s), null_b), np.nan)
    auroc_s = np.where(used_s, auroc_sl[rows_s, cols_e[best_s]], np.nan)
    return _ModelScores(used_s, label_s, surprise_s, p_s, precision_s, lift_s, auroc_s)


def _concept_entry(
    k: int, scores: Mapping[str, _ModelScores], names: list[str], support_l: np.ndarray, cut: float
) -> dict[str, Any]:  # fmt: skip
    """One concept's JSON-ready record (schema in :class:`Naming`)."""
    entry: dict[str, Any] = {}
    votes: Counter[str] = Counter()
    strength: dict[str, float] = {}
    for model, sc in scores.items():
        if not sc.used_s[k]:
            entry[model] = None
            continue
        label, significant = names[sc.label_s[k]], bool(sc.p_s[k] <= cut)
        entry[model] = {
            "label": label,
            "precision_at_n": float(sc.precision_s[k]),
            "lift": float(sc.lift_s[k]),
            "auroc": float(sc.auroc_s[k]),
            "p_value": float(sc.p_s[k]),
            "n": int(support_l[sc.label_s[k]]),
            "significant": significant,
        }
        if significant:
            votes[label] += 1
            strength[label] = max(strength.get(label, 0.0), float(sc.surprise_s[k]))
    using = [m for m in scores if entry[m] is not None]
    # Agreement needs a significant name everywhere: models of one USAE share top items, so even
    # chance labels would coincide across them.
    entry["agrees"] = len(using) >= 2 and len(votes) == 1 and votes.most_common(1)[0][1] == len(using)
    entry["best"] = max(votes, key=lambda name: (votes[name], strength[name])) if votes else None
    return entry


def name_concepts(
    acts: Mapping[str, Acts],
    labels: LabelMatrix,
    *,
    n_top: int = 20,
    n_perm: int = 10_000,
    min_support: int = 5,
    alpha: float = 0.01,
    min_fires: int | None = None,
    seed: int = 0,
) -> Naming:
    """Name every concept of every model by the label its top-``n_top`` items carry.

    ``acts``: model -> (n_items, s) activations (dense or scipy sparse, same items and concepts
    for all models; items are images or tokens, matching ``labels``). A model *uses* a concept
    that fires (> 0) on >= ``min_fires`` items (default and minimum ``n_top``, so its top-N set is
    all firing items). Labels need ``min_support`` positives and negatives (:func:`eligible_labels`).
    A name is significant when its permutation p-value (``n_perm`` draws, seeded by ``seed``)
    passes Benjamini–Hochberg at FDR ``alpha`` over all (model, used concept) pairs.
    """
    if not acts:
        raise UsaeError("name_concepts: no models given")
    if bad := [m for m in acts if m in RESERVED_KEYS]:
        raise UsaeError(f"model names {bad} clash with the per-concept keys {RESERVED_KEYS}")
    min_fires = n_top if min_fires is None else min_fires
    if n_top < 1 or n_perm < 1 or min_fires < n_top or not 0 < alpha < 1:
        raise UsaeError(f"need n_top >= 1, n_perm >= 1, min_fires >= n_top, 0 < alpha < 1; got {n_top}, {n_perm}, {min_fires}, {alpha}")  # fmt: skip
    acts = {m: _as_acts(a) for m, a in acts.items()}
    shapes = {a.shape for a in acts.values()}
    if len(shapes) != 1 or n_top > min(shapes)[0]:
        raise UsaeError(f"models must agree on (items, concepts) with items >= n_top={n_top}: {sorted(shapes)}")
    ((n_items, n_concepts),) = shapes
    labels_nl = check_labels(labels, n_items)
    eligible_l = eligible_labels(labels_nl, min_support)
    if not eligible_l.any():
        raise UsaeError(f"no label has >= {min_support} positive and negative items (min_support)")
    support_l = labels_nl.sum(0)
    surprise_lh = surprise_table(support_l, n_items, n_top)
    rng = np.random.default_rng([seed, 0x4E414D45])  # own stream: a caller's default_rng(seed) data stays independent
    null_b = max_label_null(labels_nl[:, eligible_l], surprise_lh[eligible_l], n_top, n_perm, rng)
    scores = {m: _score_model(a, labels_nl, eligible_l, surprise_lh, null_b, n_top, min_fires) for m, a in acts.items()}
    cut = bh_threshold(np.concatenate([sc.p_s[sc.used_s] for sc in scores.values()]), alpha)
    concepts = [_concept_entry(k, scores, list(labels.names), support_l, cut) for k in range(n_concepts)]
    used = {m: int(sc.used_s.sum()) for m, sc in scores.items()}
    named = {m: sum(1 for c in concepts if c[m] is not None and c[m]["significant"]) for m in scores}
    shared = sum(1 for c in concepts if sum(c[m] is not None for m in scores) >= 2)
    agreed = sum(1 for c in concepts if c["agrees"])
    log.info("naming: used %s, named %s, %d/%d shared concepts agree (p <= %.3g)", used, named, agreed, shared, cut)
    return Naming(concepts, used, named, shared, agreed, cut)


def shuffled_control(acts: Mapping[str, Acts], labels: LabelMatrix, *, seed: int = 0, **kwargs: Any) -> Naming:
    """:func:`name_concepts` with the label rows permuted once (seeded): should name ~nothing.

    Keeps each label's support and the co-occurrence of labels; only their tie to items is broken.
    """
    labels_nl = check_labels(labels)
    perm = np.random.default_rng([seed, 0x5EED]).permutation(labels_nl.shape[0])
    return name_concepts(acts, LabelMatrix(labels_nl[perm], list(labels.names)), seed=seed, **kwargs)
