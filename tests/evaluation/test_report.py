"""report.md + figures: the latent classifier on hand-built codes, figure structure, rendering,
and one run evaluated on two stores (dataset shift) side by side."""

import copy
import dataclasses
import io
import re

import numpy as np
import pytest
import torch

from usae.data.store import write_store
from usae.evaluation.classes import energy_share
from usae.evaluation.evaluate import evaluate
from usae.evaluation.report.markdown import (
    ClassThresholds,
    class_counts,
    classify,
    figure_classes,
    figure_cofire_energy,
    figure_cofire_rank,
    figure_dead_l0,
    figure_dictionary_agreement,
    figure_firing_entropy,
    figure_matching,
    figure_r2,
    loglog_pearson,
    store_labels,
    thresholds_of,
    top_concepts,
    write_report,
)
from usae.model import metrics

NAMES = ["a", "b", "c"]


def _hand_built_codes(n: int = 1000) -> dict[str, np.ndarray]:
    """Codes (n, 6) per model with one latent of each kind.

    0: fires on the same rows in all models (universal); 1: a and b only (partial);
    2: c only (specific); 3: never (dead); 4: all models but 400:2:2 (specific: b and c fire on
    fewer than min_count rows and under min_share of a's count; with those off it is partial at
    FE >= 0.8 and, with co-firing 2/400 also allowed, universal at FE >= 0); 5: a only, on 1 row
    in 1000 (below min_rate 0.002 and min_count -> rare: fires, but no model uses it).
    """
    z = {m: np.zeros((n, 6)) for m in NAMES}
    rows = np.arange(n)
    for m in NAMES:
        z[m][rows % 4 == 0, 0] = 1.0
    z["a"][rows % 5 == 0, 1] = z["b"][rows % 5 == 0, 1] = 2.0
    z["c"][rows % 3 == 0, 2] = 0.5
    z["a"][rows < 400, 4] = 1.0
    z["b"][[0, 1], 4] = z["c"][[0, 1], 4] = 1.0
    z["a"][7, 5] = 1.0
    return z


def _report_from_codes(z: dict[str, np.ndarray], tau: float = 0.1, store: str = "/stores/s") -> dict:
    """An ``evaluate``-shaped report computed directly from dense codes (the known answer)."""
    n, s = z["a"].shape
    fires_ms = torch.tensor(np.stack([(z[m] > tau).sum(0) for m in NAMES]), dtype=torch.float64)
    cofires_s = torch.tensor(np.logical_and.reduce([z[m] > tau for m in NAMES]).sum(0), dtype=torch.float64)
    cfp_ms = metrics.cofire_proportion(cofires_s, fires_ms)
    energy_ms = metrics.energy(torch.tensor(np.stack([z[m].mean(0) for m in NAMES])), torch.ones(3, s))
    fe_s = metrics.firing_entropy(fires_ms)
    none = lambda values: [None if v != v else v for v in values]  # noqa: E731
    r2 = [[0.9, 0.7, 0.6], [0.72, 0.92, 0.65], [0.5, 0.55, 0.95]]
    return {
        "model_names": NAMES,
        "n_rows": n,
        "n_latents": s,
        "k": 2,
        "tau": tau,
        "store": {"path": store, "hash": "0" * 64},
        "r2_matrix": r2,
        "r2_self_mean": 0.923,
        "r2_cross_mean": 0.62,
        "fvu": {m: 1 - r2[i][i] for i, m in enumerate(NAMES)},
        "l0": {m: float((z[m] != 0).sum(1).mean()) for m in NAMES},
        "dead_fraction": {m: float((z[m] != 0).sum(0).__eq__(0).mean()) for m in NAMES},
        "dead_fraction_all": 1 / 6,
        "firing_entropy": none(fe_s.tolist()),
        "firing_entropy_mean": float(fe_s.nanmean()),
        "fires": {m: fires_ms[i].long().tolist() for i, m in enumerate(NAMES)},
        "cofiring": {
            "cofires": cofires_s.long().tolist(),
            "proportion": {m: none(cfp_ms[i].tolist()) for i, m in enumerate(NAMES)},
        },
        "energy": {m: energy_ms[i].tolist() for i, m in enumerate(NAMES)},
        "classes": {"counts": {}, "labels": [], "rule": "", "thresholds": {"min_rate": 0.002, "universal_fe": 0.8}},
    }


def test_latent_classifier_on_hand_built_codes():
    report = _report_from_codes(_hand_built_codes())
    strict = thresholds_of(report)
    assert strict == ClassThresholds(min_rate=0.002, universal_fe=0.8)
    assert strict.min_count == 10 and strict.universal_cofire == 0.2  # an older report: defaults for the rest
    labels = classify(report, strict)
    # Latent 4 was "partial" and latent 5 "dead" under the old rate-only rule; now: specific, rare.
    assert labels == ["universal", "partial", "specific", "dead", "specific", "rare"]
    loose = dataclasses.replace(strict, min_count=1, min_share=0.0)  # the old support rule: rate only
    assert classify(report, loose)[4] == "partial"  # the support rule matters
    assert classify(report, dataclasses.replace(loose, universal_fe=0.0))[4] == "partial"  # co-fires on 2 of 400 rows
    assert classify(report, dataclasses.replace(loose, universal_fe=0.0, universal_cofire=0.0))[4] == "universal"
    assert classify(report, dataclasses.replace(loose, universal_cofire=0.0))[4] == "partial"  # FE threshold matters
    assert (
        classify(report, dataclasses.replace(strict, min_rate=1e-4, min_count=1))[5] == "specific"
    )  # so does the rate
    assert classify(report, dataclasses.replace(strict, min_count=1))[5] == "rare"
    counts = class_counts(report, labels, strict)
    assert counts["total"] == {"universal": 1, "partial": 1, "specific": 2, "rare": 1, "dead": 1}
    assert counts["per_model"]["a"] == {"universal": 1, "partial": 1, "specific": 1}
    assert counts["per_model"]["c"] == {"universal": 1, "partial": 0, "specific": 1}
    assert thresholds_of({"classes": {}}) == ClassThresholds()
    every = ClassThresholds(min_rate=0.01, universal_fe=0.7, min_count=5, min_share=0.1, universal_cofire=0.3)
    assert thresholds_of({"classes": {"thresholds": every.to_dict()}}) == every


def test_top_concepts_rank_by_energy_with_their_numbers():
    report = _report_from_codes(_hand_built_codes())
    labels = classify(report, thresholds_of(report))
    top = top_concepts(report, labels, n_top=5)
    assert [t["latent"] for t in top["partial"]] == [1]
    # energy share summed over models: latent 4 has 0.16 of a's 0.3825, latent 2 0.0279 of c's 0.0904
    assert [t["latent"] for t in top["specific"]] == [4, 2]
    assert top["specific"][0]["score"] == pytest.approx(0.16 / 0.382501 + 2 * 4e-6 / 0.2225, rel=1e-3)
    universal = top["universal"][0]
    assert universal["latent"] == 0 and universal["fe"] == pytest.approx(1.0)
    assert universal["per_1k"] == [250.0, 250.0, 250.0] and universal["cfp"] == [1.0, 1.0, 1.0]
    assert universal["energy"] == pytest.approx([0.0625] * 3)
    assert "dead" not in top and "rare" not in top


def test_top_concepts_do_not_depend_on_a_models_activation_scale():
    """Model c's activations 5x larger: raw energy 25x. Raw summed energy would rank latent 2 (c only)
    above latent 4 (0.70 > 0.16); summed per-model energy shares do not change."""
    report = _report_from_codes(_hand_built_codes())
    labels = classify(report, thresholds_of(report))
    scaled = copy.deepcopy(report)
    scaled["energy"]["c"] = [25 * e for e in report["energy"]["c"]]
    raw = np.sum([scaled["energy"][n] for n in NAMES], axis=0)
    assert raw[2] > raw[4]
    before, after = top_concepts(report, labels), top_concepts(scaled, labels)
    for c in ("universal", "partial", "specific"):
        assert [t["latent"] for t in after[c]] == [t["latent"] for t in before[c]]
        assert [t["score"] for t in after[c]] == pytest.approx([t["score"] for t in before[c]])
    np.testing.assert_allclose(energy_share(scaled), energy_share(report))
    np.testing.assert_allclose(energy_share(report).sum(1), 1.0)


def test_loglog_pearson_and_store_labels():
    x = np.array([1.0, 10.0, 100.0, 0.0, 1000.0])
    r, n = loglog_pearson(x, x**2)
    assert r == pytest.approx(1.0) and n == 4  # the zero is left out of a log-log fit
    assert np.isnan(loglog_pearson(np.zeros(3), np.ones(3))[0])
    reports = [{"store": {"path": "/x/val"}}, {"store": {"path": "/y/val"}}, {"store": {"path": "/x/shift"}}]
    assert store_labels(reports) == ["val (1)", "val (2)", "shift"]


def _fake_baselines() -> dict:
    rng = np.random.default_rng(0)
    pair = {
        "independent": {"matched_fraction": 0.5, "mean_similarity": 0.4, "median_similarity": 0.3, "threshold": 0.5},
        "usae_same_index": {
            "matched_fraction": 0.6,
            "mean_similarity": 0.5,
            "median_similarity": 0.4,
            "threshold": 0.5,
        },
        "independent_sorted": sorted(rng.random(6), reverse=True),
        "usae_sorted": sorted(rng.random(6), reverse=True),
    }
    agreement = {"threshold": 0.5, "fraction_above": 0.8, "mean_cosine": 0.7, "random_fraction_above": 0.1}
    agreement |= {"random_mean_cosine": 0.3, "cosines": [0.9, 0.6, 0.2], "random_cosines": [0.5, 0.3, 0.1]}
    sim_mm = (0.75 * np.eye(3) + 0.25).tolist()  # 1 on the diagonal, 0.25 between models
    return {
        "store": {"path": "/stores/s"},
        "n_rows": 1000,
        "independent": {"dir": "run/baselines", "n_latents": 6, "k": 2, "steps": 100, "batch_size": 64, "seed": 0},
        "matching": [{"models": list(p), **pair} for p in (("a", "b"), ("a", "c"), ("b", "c"))],
        "dictionary_agreement": {m: agreement for m in NAMES},
        "similarity": {
            "n_rows": 500,
            "knn_k": 10,
            "cka": {"raw": sim_mm, "usae_codes": sim_mm, "independent_codes": sim_mm},
            "mutual_knn": {"raw": sim_mm, "usae_codes": sim_mm, "independent_codes": sim_mm},
        },
        "recovery": {
            "threshold": 0.9,
            "usae": dict.fromkeys(("universal", "partial", "specific", "all"), 1.0),
            "independent_matched": dict.fromkeys(("universal", "partial", "specific", "all"), 0.5),
        },
    }


def test_figure_structure():
    reports = [_report_from_codes(_hand_built_codes(), store=p) for p in ("/s/val", "/s/shift")]
    labels = store_labels(reports)
    fig = figure_r2(reports, labels)
    assert len(fig.axes) == 3  # one heatmap per store + the shared colour bar
    heat = fig.axes[0]
    assert heat.get_xlabel() == "decode to (dst)" and heat.get_ylabel() == "encode with (src)"
    assert [t.get_text() for t in heat.get_xticklabels()] == NAMES
    assert len(heat.texts) == 9 and heat.texts[1].get_text() == "0.70"  # annotated [src][dst] cells
    assert heat.get_title() == "R² — val" and fig.axes[1].get_title() == "R² — shift"

    (ax,) = figure_firing_entropy(reports, labels, ClassThresholds()).axes
    assert ax.get_xlabel().startswith("firing entropy") and ax.get_ylabel() == "concepts"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["val", "shift", "universal FE ≥ 0.8"]

    fig = figure_cofire_rank(reports, labels)
    assert len(fig.axes) == 2 and fig.axes[0].get_xscale() == "log"
    assert fig.axes[0].get_ylabel() == "co-fire proportion" and len(fig.axes[0].lines) == 3  # one per model

    fig = figure_cofire_energy(reports, labels)
    assert len(fig.axes) == 6  # stores x models
    assert all(a.get_xscale() == "log" and a.get_yscale() == "log" for a in fig.axes)
    assert re.fullmatch(r"val / a: r = (-?\d\.\d\d|nan) \(n=\d+\)", fig.axes[0].get_title())
    assert fig.axes[0].get_ylabel() == "co-fire count"
    # a model whose concepts never fire (energy all 0) still renders: linear axes and a note
    dead = copy.deepcopy(reports[0])
    dead["energy"]["a"] = [0.0] * len(dead["energy"]["a"])
    fig = figure_cofire_energy([dead], ["val"])
    fig.savefig(io.BytesIO(), format="png")
    assert fig.axes[0].get_xscale() == "linear" and "no concept" in fig.axes[0].texts[0].get_text()

    fig = figure_dead_l0(reports, labels)
    assert [a.get_ylabel() for a in fig.axes] == ["L0", "dead %"]
    assert len(fig.axes[0].patches) == 6  # 3 models x 2 stores

    tables = [class_counts(r, classify(r, ClassThresholds()), ClassThresholds()) for r in reports]
    fig = figure_classes(tables, labels)
    assert len(fig.axes) == 2 and len(fig.axes[0].patches) == 9  # 3 models x 3 live classes

    b = _fake_baselines()
    assert len(figure_matching(b).axes) == 3 and figure_matching(b).axes[0].get_title() == "a vs b"
    fig = figure_dictionary_agreement(b)
    assert len(fig.axes) == 3 and fig.axes[2].get_ylabel() == "cosine" and len(fig.axes[2].lines) == 3


def _tables(md: str) -> list[list[str]]:
    """Consecutive '|' lines of report.md, grouped per table."""
    tables, current = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def test_write_report_renders_figures_and_tables(tmp_path):
    reports = [_report_from_codes(_hand_built_codes(), store=p) for p in ("/s/val", "/s/shift")]
    # the second store's report has the paper-compatible R²; the first predates it (still renders)
    reports[1]["r2_matrix_paper"] = [[0.99, 0.98, 0.97], [0.96, 0.995, 0.95], [0.94, 0.93, 0.999]]
    path = write_report(reports, tmp_path / "out", _fake_baselines())
    md = path.read_text()
    images = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", md)
    assert len(images) == 8 and len(set(images)) == 8
    for name in images:
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tables = _tables(md)
    assert len(tables) >= 12
    for table in tables:  # every row has its header's number of cells, and a separator row
        widths = {row.count("|") for row in table}
        assert len(widths) == 1, table
        assert set(table[1]) <= set("|-: ")
    assert "| | val | shift |" in md  # stores side by side
    assert "| universal | 1 | 1 | 1 | 1 | 1 | 1 | 1 | 1 |" in md
    assert "| rare | 1 | – | – | – | 1 | – | – | – |" in md  # no model uses a rare concept
    assert "min rate 0.002" in md and "firing entropy ≥ 0.8" in md
    assert "at least\n10 rows" in md and "0.05 × the rows" in md and "co-fire proportion ≥ 0.2" in md
    assert "**shift** (paper-compatible)" in md and "**val** (paper-compatible)" not in md
    assert "| a | 0.99 | 0.98 | 0.97 |" in md and "| a | 0.9 | 0.7 | 0.6 |" in md  # both matrices
    assert "| R² self, paper-compatible (global-mean SST) | – | 0.995 |" in md
    assert "| a / b | 0.25 | 0.25 | 0.25 | 0.25 | 0.25 | 0.25 |" in md  # CKA and mutual k-NN row
    assert "| universal | 1 | 0.5 |" in md  # recovery table
    single = write_report(reports[0], tmp_path / "one").read_text()
    assert "Baselines" not in single and "| | val |" in single
    assert "Paper-compatible" not in single  # an older report without r2_matrix_paper


@pytest.fixture(scope="module")
def two_stores(small_world, small_store, tmp_path_factory):
    """The small world's store and a shifted copy (scaled, offset, noisier): a dataset shift."""
    rng = np.random.default_rng(0)
    shifted = {
        m: 1.3 * x + 0.5 + 0.3 * x.std() * rng.standard_normal(x.shape).astype(np.float32)
        for m, x in small_world.data.items()
    }
    root = tmp_path_factory.mktemp("shift")
    return small_store, write_store(root / "shifted", shifted, dtype="float32")


def test_one_run_on_two_stores(two_stores, small_run, tmp_path):
    """The shared ``small_run`` was trained on the first store; reports go to tmp_path (the run is read only)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # two threads on the shared 2-core machine are far slower (tests/evaluation/test_baselines.py)
    try:
        store, shifted = two_stores
        reports = [evaluate(small_run, s, out=tmp_path / f"{s.name}.json", progress=False) for s in (store, shifted)]
    finally:
        torch.set_num_threads(threads)
    md = write_report(reports, tmp_path / "report").read_text()
    assert f"| | {store.name} | shifted |" in md
    assert reports[1]["r2_self_mean"] < reports[0]["r2_self_mean"]  # the shift costs reconstruction
    for table in _tables(md):
        assert len({row.count("|") for row in table}) == 1


def test_report_shows_the_task_fidelity_section_when_splice_results_exist(tmp_path):
    reports = [_report_from_codes(_hand_built_codes(), store="/s/val")]
    names = reports[0]["model_names"]
    m = len(names)
    splice = {
        "models": names, "n_images": 4, "store": "/s/val", "available": {n: n != names[2] for n in names},
        "unavailable_reasons": {names[2]: f"splice is not available for {names[2]}: no task"},
        "task": {names[0]: "classifier", names[1]: "dense", names[2]: None},
        "matrices": {
            "agreement": [[0.75 if j == 0 else None for j in range(m)] for _ in range(m)],
            "correlation": [[0.5 if j == 1 else None for j in range(m)] for _ in range(m)],
            "loss_recovered": [[0.25 if j < 2 else None for j in range(m)] for _ in range(m)],
        },
        "controls": {
            names[0]: {"mean_ablation": {"agreement": 0.0, "loss_recovered": 0.0},
                       "resample_only": {"agreement": 1.0, "loss_recovered": 1.0}},
            names[1]: {"mean_ablation": {"correlation": 0.1, "loss_recovered": 0.0}},
        },
    }  # fmt: skip
    md = write_report(reports, tmp_path / "out", splice=splice).read_text()
    assert "## Task fidelity" in md and "![Task fidelity](splice.png)" in md
    assert (tmp_path / "out" / "splice.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"| {names[0]} | 0.750 / 0.250 | 0.500 / 0.250 | – |" in md
    assert "| mean ablation | 0.000 / 0.000 | 0.100 / 0.000 | – |" in md
    assert "| resample only | 1.000 / 1.000 | – | – |" in md
    assert f"- splice is not available for {names[2]}: no task" in md
    assert "## Task fidelity" not in write_report(reports, tmp_path / "plain").read_text()
