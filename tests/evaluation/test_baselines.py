"""Known-answer tests for CKA, mutual k-NN, latent matching and dictionary agreement, and the
synthetic-world comparison: USAE vs independent SAEs + matching on planted universal concepts."""

import json

import numpy as np
import pytest
import torch
import tyro

from usae.config import BaselineConfig, TrainConfig
from usae.data.store import write_store
from usae.data.synth import make_world, save_truth
from usae.errors import UsaeError
from usae.evaluation.baselines import (
    CKASums,
    CorrelationSums,
    Matching,
    dictionary_agreement,
    linear_cka,
    match_latents,
    matching_summary,
    mutual_knn,
    stitch_dictionaries,
)
from usae.experiments.baseline import run_baselines
from usae.model.sae import SparseCode
from usae.training.fit import fit


def _orthogonal(d: int, e: int, seed: int) -> np.ndarray:
    """(d, e) with orthonormal rows (e >= d): an isometry from R^d into R^e."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((e, d)))
    return q.T


def _cka_reference(x: np.ndarray, y: np.ndarray) -> float:
    """HSIC with the explicit centring matrix H (Kornblith et al. 2019, eq. 2 with linear kernels)."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float(np.sum(k * l) / np.sqrt(np.sum(k * k) * np.sum(l * l)))


def test_linear_cka_identical_is_one_and_invariant_to_rotation_scale_offset():
    x = np.random.default_rng(0).standard_normal((300, 12))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    y = 3.0 * x @ _orthogonal(12, 20, seed=1) + 5.0  # rotate into a wider space, scale, shift
    assert linear_cka(x, y) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(x, x[:, ::-1].copy()) == pytest.approx(1.0, abs=1e-12)  # permuted features


def test_linear_cka_matches_reference_in_both_forms():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((40, 6))
    y = np.tanh(x @ rng.standard_normal((6, 9))) + 0.3 * rng.standard_normal((40, 9))
    ref = _cka_reference(x, y)
    assert 0.2 < ref < 0.95
    assert linear_cka(x, y) == pytest.approx(ref, abs=1e-10)  # feature space: d*e <= n^2
    wide_x, wide_y = rng.standard_normal((10, 30)), rng.standard_normal((10, 25))  # Gram form: d*e > n^2
    assert linear_cka(wide_x, wide_y) == pytest.approx(_cka_reference(wide_x, wide_y), abs=1e-10)


def test_cka_streams_in_batches_and_survives_large_offsets():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1000, 5))
    y = x @ rng.standard_normal((5, 7)) + rng.standard_normal((1000, 7))
    sums = CKASums()
    for lo in range(0, 1000, 128):
        sums.update(x[lo : lo + 128] + 1e6, y[lo : lo + 128] - 1e6)  # offsets far above the spread
    assert sums.value() == pytest.approx(_cka_reference(x, y), abs=1e-8)
    with pytest.raises(UsaeError, match="linear_cka"):
        linear_cka(x, y[:10])


def test_mutual_knn_known_answers():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((400, 16))
    assert mutual_knn(x, x, k=10) == 1.0
    assert mutual_knn(x, 2.0 * x @ _orthogonal(16, 16, seed=5), k=10) == 1.0  # cosine is rotation invariant
    chance = mutual_knn(x, rng.standard_normal((400, 16)), k=10)
    assert chance < 3 * 10 / 399  # independent representations: about k / (n - 1)
    assert mutual_knn(x, x, k=5, max_rows=100) == 1.0  # subsampled rows
    with pytest.raises(UsaeError, match="k must be"):
        mutual_knn(x[:5], x[:5], k=5)


def _planted_codes(n: int, s: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((n, s)) < 0.1) * rng.uniform(0.5, 2.0, (n, s))


@pytest.mark.parametrize("sparse", [False, True])
def test_hungarian_matching_recovers_a_planted_permutation(sparse):
    n, s = 3000, 40
    z_a = _planted_codes(n, s, seed=6)
    perm = np.random.default_rng(7).permutation(s)
    noise = 0.05 * np.random.default_rng(8).random((n, s + 10))
    z_b = np.concatenate([z_a[:, perm] * 2.5, np.zeros((n, 10))], 1) + noise  # 10 extra unrelated latents
    sums = CorrelationSums(s, s + 10)
    for lo in range(0, n, 700):
        a = torch.from_numpy(z_a[lo : lo + 700]).float()
        if sparse:
            top = a.topk(s, dim=1)  # all entries as an explicit SparseCode
            a = SparseCode(top.indices, top.values)
        sums.update(a, torch.from_numpy(z_b[lo : lo + 700]).float())
    corr = sums.corr().numpy()
    np.testing.assert_allclose(corr, np.corrcoef(z_a.T, z_b.T)[:s, s:], atol=1e-5)
    m = match_latents(corr)
    np.testing.assert_array_equal(m.row_idx, np.arange(s))
    np.testing.assert_array_equal(m.col_idx, np.argsort(perm))  # z_b[:, j] is z_a[:, perm[j]]
    assert m.similarity.min() > 0.95
    summary = matching_summary(m, threshold=0.5)
    assert summary["matched_fraction"] == 1.0 and summary["mean_similarity"] > 0.95


def test_match_latents_handles_nan_and_rectangular():
    sim = np.array([[np.nan, 0.2, 0.9], [0.8, np.nan, 0.1]])
    m = match_latents(sim)
    assert m.col_idx.tolist() == [2, 0] and m.similarity.tolist() == [0.9, 0.8]
    with pytest.raises(UsaeError):
        match_latents(np.zeros((0, 3)))


def test_dictionary_agreement_and_random_baseline():
    rng = np.random.default_rng(9)
    d_usae = rng.standard_normal((32, 64))
    perm = rng.permutation(32)
    d_indep = d_usae[perm] * rng.uniform(0.5, 2.0, (32, 1)) + 0.05 * rng.standard_normal((32, 64))
    a = dictionary_agreement(d_usae, d_indep, threshold=0.5, seed=0)
    assert a["fraction_above"] == 1.0 and a["mean_cosine"] > 0.99
    assert a["random_fraction_above"] < 0.2 and a["random_mean_cosine"] < 0.4
    assert a["cosines"] == sorted(a["cosines"], reverse=True) and len(a["random_cosines"]) == 32


def test_stitch_dictionaries_reindexes_by_matching():
    ref = np.eye(3)
    other = np.arange(8.0).reshape(2, 4)
    m = Matching(np.array([0, 2]), np.array([1, 0]), np.array([0.9, 0.8]))
    out = stitch_dictionaries({"a": ref, "b": other}, "a", {"b": m})
    np.testing.assert_array_equal(out["b"], [other[1], np.zeros(4), other[0]])


def test_config_cli_and_validation(tmp_path):
    cfg = tyro.cli(BaselineConfig, args=[str(tmp_path / "run"), str(tmp_path / "store"), "--knn-k", "5"])
    assert cfg.run == tmp_path / "run" and cfg.knn_k == 5
    with pytest.raises(UsaeError, match="similarity_rows"):
        BaselineConfig(run=tmp_path, store=tmp_path, similarity_rows=1)


# -- the synthetic-world comparison ---------------------------------------------------------------
@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """A world narrower than its concept count (superposition), a USAE, and the baselines.

    One torch thread: on this shared 2-core machine two threads made the same training ~16x
    slower in CPU time (measured under load); restored afterwards for the other test files.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    world = make_world(
        {"a": 16, "b": 24, "c": 20}, n_rows=20_000, n_universal=24, n_partial=8, n_specific=9, k_active=4, seed=3
    )
    root = tmp_path_factory.mktemp("compare")
    store = write_store(root / "store", world.data, dtype="float32")
    save_truth(root / "store.truth.safetensors", world)
    cfg = TrainConfig(store=store, out=root / "run", n_latents=160, k=4, steps=1000, batch_size=512, progress=False)
    try:
        fit(cfg)
        truth = root / "store.truth.safetensors"
        result = run_baselines(root / "run", store, truth=truth, device="cpu", progress=False)
        yield root, store, result
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow  # the `compared` run: 1000 steps plus independent SAEs, ~30 s
def test_usae_recovers_universal_concepts_better_than_independent_saes(compared, capsys):
    root, _, result = compared
    rec = result["recovery"]
    with capsys.disabled():
        print("\nplanted-concept recovery (cosine > 0.9 in every owning model):")
        for kind in ("universal", "partial", "specific", "all"):
            print(
                f"  {kind:9s} USAE {rec['usae'][kind]:.3f}  independent+matching {rec['independent_matched'][kind]:.3f}"
            )
        for p in result["matching"]:
            print(f"  matching {'/'.join(p['models'])}: independent {p['independent']}  USAE {p['usae_same_index']}")
        for n, a in result["dictionary_agreement"].items():
            print(f"  dictionary {n}: cos>0.5 {a['fraction_above']:.3f} (random {a['random_fraction_above']:.3f})")
        for measure in ("cka", "mutual_knn"):
            for kind, mm in result["similarity"][measure].items():
                print(f"  {measure} {kind}: a/b {mm[0][1]:.3f} a/c {mm[0][2]:.3f} b/c {mm[1][2]:.3f}")
    # measured (seed 3, CPU, default LR 3e-2): universal USAE 1.000 vs independent+matching 0.917,
    # partial 1.000 vs 0.625, all planted concepts 1.000 vs 0.878
    assert rec["usae"]["universal"] >= 0.95
    assert rec["usae"]["universal"] > rec["independent_matched"]["universal"]
    assert rec["usae"]["all"] - rec["independent_matched"]["all"] >= 0.08
    assert json.loads((root / "run" / "baselines.json").read_text())["recovery"] == rec
    for name in ("a", "b", "c"):
        assert (root / "run" / "baselines" / name / "model.safetensors").is_file()


@pytest.mark.slow  # uses the `compared` run (~30 s)
def test_baselines_report_structure(compared):
    _, _, result = compared
    assert [p["models"] for p in result["matching"]] == [["a", "b"], ["a", "c"], ["b", "c"]]
    for a in result["dictionary_agreement"].values():
        assert a["fraction_above"] > a["random_fraction_above"]  # the paper's comparison holds here too
    sim = result["similarity"]
    for measure in ("cka", "mutual_knn"):
        for mm in sim[measure].values():
            assert np.allclose(np.diag(mm), 1.0) and np.allclose(mm, np.transpose(mm))
    # codes of the shared concept space are more alike across models than the raw activations
    assert sim["cka"]["usae_codes"][0][1] > sim["cka"]["raw"][0][1]


@pytest.mark.slow  # uses the `compared` run (~30 s)
def test_existing_independent_saes_are_reused(compared):
    root, store, _ = compared
    before = (root / "run" / "baselines" / "a" / "model.safetensors").stat().st_mtime_ns
    again = run_baselines(root / "run", store, max_rows=4000, similarity_rows=300, device="cpu", progress=False)
    assert (root / "run" / "baselines" / "a" / "model.safetensors").stat().st_mtime_ns == before
    assert again["n_rows"] == 4000 and "recovery" not in again
