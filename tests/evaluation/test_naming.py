"""Concept naming: precision@N, lift, sparse AUROC, permutation chance and the naming of planted concepts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import sparse
from sklearn.metrics import roc_auc_score

from usae.errors import UsaeError
from usae.evaluation.naming import scores as nm

# ----------------------------------------------------------------------------- hand-computed answers


def test_auroc_ties_in_the_zero_block_count_half():
    # positives 0, 3, 4 / negatives 1, 2, 5; pairs: item 0 (0) ties 1, 2 and loses to 5 -> 1.0,
    # item 3 (0.5) beats 1, 2 -> 2, item 4 (0.9) beats 1, 2 and ties 5 -> 2.5; 5.5 of 9 pairs.
    act_n1 = np.array([[0, 0, 0, 0.5, 0.9, 0.9]]).T
    labels_n1 = np.array([[1, 0, 0, 1, 1, 0]], dtype=bool).T
    assert nm.auroc(act_n1, labels_n1)[0, 0] == pytest.approx(5.5 / 9)


def test_auroc_all_zero_concept_is_half_and_perfect_concept_is_one():
    labels_n1 = np.array([[1, 1, 0, 0, 0]], dtype=bool).T
    act_n2 = np.array([[0, 0, 0, 0, 0], [2.0, 1.0, 0, 0, 0]]).T
    assert nm.auroc(act_n2, labels_n1)[:, 0] == pytest.approx([0.5, 1.0])


def test_auroc_matches_sklearn_on_sparse_data_with_ties_and_negatives():
    rng = np.random.default_rng(0)
    act_ns = rng.random((400, 25)) * (rng.random((400, 25)) < 0.1)
    act_ns[:, 3] = np.round(act_ns[:, 3] * 3) / 3  # ties among non-zeros
    act_ns[:6, 4] = -rng.random(6)  # values below the zero block
    labels_nl = rng.random((400, 5)) < [0.02, 0.1, 0.3, 0.5, 0.9]
    want_sl = np.array([[roc_auc_score(labels_nl[:, j], act_ns[:, k]) for j in range(5)] for k in range(25)])
    np.testing.assert_allclose(nm.auroc(act_ns, labels_nl), want_sl, atol=1e-12)
    np.testing.assert_allclose(nm.auroc(sparse.csr_matrix(act_ns), labels_nl), want_sl, atol=1e-12)


def test_top_n_order_ties_and_too_few_firing_items():
    act_n3 = np.array([[0.1, 0.9, 0.5, 0.0, 0.7], [0.5, 0.5, 0.5, 0.1, 0.0], [0.0, 0.0, 0.3, 0.0, 0.0]]).T
    top = nm.top_n(act_n3, 2)
    assert top.index_sn.tolist() == [[1, 4], [0, 1], [-1, -1]]  # strongest first; ties to the lower index
    assert top.fires_s.tolist() == [4, 4, 1]


def test_precision_and_lift_by_hand():
    labels_n2 = np.array([[0, 1, 0, 0, 1], [1, 1, 1, 1, 0]], dtype=bool).T
    index_s2 = np.array([[1, 4], [-1, -1]])
    prec_sl = nm.precision_at_n(index_s2, labels_n2)
    assert prec_sl[0].tolist() == [1.0, 0.5]
    assert np.isnan(prec_sl[1]).all()
    # base rates 2/5 and 4/5
    assert nm.lift(prec_sl, labels_n2)[0] == pytest.approx([2.5, 0.625])


def test_surprise_is_the_hypergeometric_tail():
    # 2 of 3 draws from 10 items with 4 positives: P(X >= 2) = (C(4,2) C(6,1) + C(4,3)) / C(10,3) = 40/120
    table_lh = nm.surprise_table(np.array([4]), 10, 3)
    assert table_lh[0, 0] == pytest.approx(0.0)
    assert table_lh[0, 2] == pytest.approx(-np.log(40 / 120))
    assert nm.surprise_table(np.array([1]), 10, 3)[0, 2] == np.inf  # two hits of a one-item label: impossible


def test_bh_threshold_by_hand():
    # sorted p against 0.05 k/4 = .0125, .025, .0375, .05: 0.036 is the last under its line, so 0.03
    # (above its own line .025) is kept too: step-up
    assert nm.bh_threshold(np.array([0.036, 0.001, 0.03, 0.2]), 0.05) == 0.036
    assert nm.bh_threshold(np.array([0.5, 0.9]), 0.05) == 0.0


def test_label_matrix_adds_ancestors_and_eligibility_needs_support():
    labels = nm.label_matrix([["animals/marsupials/koala", "red"], [], ["animals"]])
    assert labels.names == ["animals", "animals/marsupials", "animals/marsupials/koala", "red"]
    assert labels.labels_nl.tolist() == [[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]]
    labels_n3 = np.zeros((20, 3), dtype=bool)
    labels_n3[:3, 0] = labels_n3[:5, 1] = labels_n3[:16, 2] = True
    assert nm.eligible_labels(labels_n3, 5).tolist() == [False, True, False]  # 3 positives / 4 negatives


def test_pool_images_takes_the_max_and_pool_labels_any():
    image_t = np.array([7, 3, 7, 3, 9])
    act_t2 = np.array([[1, 0], [0, 2], [3, 0], [0, 1], [0, 0]], dtype=float)
    pooled = nm.pool_images(act_t2, image_t)
    assert pooled.image_n.tolist() == [3, 7, 9]
    assert pooled.act_ns.tolist() == [[0, 2], [3, 0], [0, 0]]
    assert nm.pool_labels(act_t2 > 1, image_t).act_ns.tolist() == [[False, True], [True, False], [False, False]]


# ----------------------------------------------------------------------------- chance


def test_shared_null_equals_brute_force_label_permutation():
    rng = np.random.default_rng(5)
    labels_nl = rng.random((300, 8)) < rng.uniform(0.05, 0.3, 8)
    table_lh = nm.surprise_table(labels_nl.sum(0), 300, 10)
    null_b = nm.max_label_null(labels_nl, table_lh, 10, 3000, np.random.default_rng(1))
    index_1n = np.arange(10)[None]  # any fixed top set: permuting label rows makes it N random items
    brute_b = np.array(
        [table_lh[np.arange(8), nm.label_hits(index_1n, labels_nl[rng.permutation(300)])[0]].max() for _ in range(3000)]
    )
    assert abs(null_b.mean() - brute_b.mean()) < 4 * brute_b.std() / np.sqrt(1500)
    np.testing.assert_allclose(np.quantile(null_b, [0.5, 0.9]), np.quantile(brute_b, [0.5, 0.9]), rtol=0.1)


def test_p_values_of_random_concepts_are_roughly_uniform():
    rng = np.random.default_rng(5)
    labels = nm.LabelMatrix(rng.random((600, 15)) < rng.uniform(0.02, 0.3, 15), [f"l{j}" for j in range(15)])
    act_ns = (rng.random((600, 400)) < 0.08) * rng.random((600, 400))
    naming = nm.name_concepts({"a": act_ns}, labels, n_perm=2000, seed=1)
    p_s = np.array([c["a"]["p_value"] for c in naming.concepts])
    assert 0.02 <= (p_s < 0.05).mean() <= 0.09
    assert 0.4 <= (p_s < 0.5).mean() <= 0.6
    assert naming.named == {"a": 0}


# ----------------------------------------------------------------------------- naming a planted world


@pytest.fixture(scope="module")
def planted():
    """1000 items, 20 labels (a parent over l00|l01, a 3-item "rare"); 3 models, 30 concepts.

    Concepts 0-17 fire on 80% of label k's items (plus weaker noise), 18 fires strongly on the
    3 rare items, 19-29 fire at random. Model m2 does not use concept 5.
    """
    rng = np.random.default_rng(11)
    n = 1000
    labels_nl = np.zeros((n, 20), dtype=bool)
    for j, support in enumerate(rng.integers(20, 150, size=18)):
        labels_nl[rng.choice(n, support, replace=False), j] = True
    labels_nl[:, 18] = labels_nl[:, 0] | labels_nl[:, 1]
    labels_nl[rng.choice(n, 3, replace=False), 19] = True
    labels = nm.LabelMatrix(labels_nl, [f"l{j:02d}" for j in range(18)] + ["parent", "rare"])
    acts = {}
    for model in ("m0", "m1", "m2"):
        act_ns = np.zeros((n, 30))
        for k in range(18):
            on = np.flatnonzero(labels_nl[:, k] & (rng.random(n) < 0.8))
            act_ns[on, k] = 1 + rng.random(len(on))
            noise = rng.choice(n, 20, replace=False)
            act_ns[noise, k] = np.maximum(act_ns[noise, k], 1.3 * rng.random(20))
        act_ns[labels_nl[:, 19], 18] = 5.0
        noise = rng.choice(n, 40, replace=False)
        act_ns[noise, 18] = np.maximum(act_ns[noise, 18], rng.random(40))
        for k in range(19, 30):
            act_ns[rng.choice(n, 40, replace=False), k] = rng.random(40)
        acts[model] = act_ns
    acts["m2"][:, 5] = 0.0
    acts["m2"][:3, 5] = 1.0  # fires on 3 < n_top items: unused
    return acts, labels


def test_planted_concepts_get_their_label_in_every_model(planted):
    acts, labels = planted
    naming = nm.name_concepts(acts, labels, n_perm=2000, seed=3)
    for k in range(18):
        concept = naming.concepts[k]
        assert concept["best"] == f"l{k:02d}", k  # the child wins over "parent" for concepts 0 and 1
        assert concept["agrees"], k
    assert naming.concepts[5]["m2"] is None
    assert naming.used == {"m0": 30, "m1": 30, "m2": 29}
    assert naming.agreed == 18 and naming.shared == 30
    assert sum(c["best"] is not None for c in naming.concepts[19:]) <= 1  # random concepts stay unnamed
    entry = naming.concepts[0]["m0"]
    assert set(entry) == {"label", "precision_at_n", "lift", "auroc", "p_value", "n", "significant"}
    assert entry["n"] == int(labels.labels_nl[:, 0].sum())
    assert entry["lift"] == pytest.approx(entry["precision_at_n"] / labels.labels_nl[:, 0].mean())
    assert entry["p_value"] == pytest.approx(1 / 2001) and entry["auroc"] > 0.8
    json.dumps(naming._asdict())  # JSON-ready: no numpy types


def test_a_three_item_label_never_wins(planted):
    acts, labels = planted
    naming = nm.name_concepts(acts, labels, n_perm=500, seed=3)
    assert all(c[m] is None or c[m]["label"] != "rare" for c in naming.concepts for m in acts)
    assert naming.concepts[18]["best"] is None  # its 3 strong items do not make a name


def test_shuffled_control_names_almost_nothing(planted):
    acts, labels = planted
    for seed in range(3):
        control = nm.shuffled_control(acts, labels, n_perm=2000, seed=seed)
        assert sum(control.named.values()) <= 1
        assert control.agreed == 0


def test_name_concepts_refuses_bad_input(planted):
    acts, labels = planted
    with pytest.raises(UsaeError, match="clash"):
        nm.name_concepts({"best": acts["m0"]}, labels)
    with pytest.raises(UsaeError, match="min_fires"):
        nm.name_concepts(acts, labels, n_top=20, min_fires=5)
    with pytest.raises(UsaeError, match="items"):
        nm.name_concepts(acts, nm.LabelMatrix(labels.labels_nl[:10], labels.names))
    with pytest.raises(UsaeError, match="agree"):
        nm.name_concepts({"a": acts["m0"], "b": acts["m1"][:, :5]}, labels)
