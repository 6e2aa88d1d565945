import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from usae.config import EvalConfig
from usae.data.store import open_store, write_store
from usae.errors import UsaeError
from usae.evaluation.classes import ClassThresholds, classify, thresholds_of
from usae.evaluation.evaluate import evaluate
from usae.model import metrics
from usae.run import load


@pytest.fixture(scope="module")
def trained(small_run, tmp_path_factory):
    """A copy of the shared ``small_run`` (these tests write report.json into the run)."""
    out = tmp_path_factory.mktemp("run") / "run"
    shutil.copytree(small_run, out)
    return load(out), out


def test_report_matches_direct_computation(trained, small_store, small_world):
    sae, run = trained
    report = evaluate(run, small_store, batch_size=1000, progress=False)
    assert json.loads((run / "report.json").read_text())["r2_matrix"] == report["r2_matrix"]
    for key in ("r2_matrix", "fvu", "l0", "dead_fraction", "firing_entropy", "cofiring", "energy"):
        assert key in report
    names = ["a", "b", "c"]
    x = {n: torch.from_numpy(small_world.data[n]) for n in names}
    with torch.no_grad():
        z = {n: sae.encode(n, x[n]) for n in names}
        for i, src in enumerate(names):
            for j, dst in enumerate(names):
                x_hat = sae.decode(dst, z[src])
                expected = float(metrics.r2(x[dst], x_hat))
                assert report["r2_matrix"][i][j] == pytest.approx(expected, abs=1e-6)
                paper = float(metrics.r2_paper(x[dst], x_hat))  # SST around one global mean
                assert report["r2_matrix_paper"][i][j] == pytest.approx(paper, abs=1e-6)
                assert report["r2_matrix_paper"][i][j] >= report["r2_matrix"][i][j]  # per-dim means minimise SST
        fires = torch.stack([(z[n] > 0.1).sum(0) for n in names]).double()
        z_joint = sae.encode_joint(x)
        for dst in names:
            expected = float(metrics.r2(x[dst], sae.decode(dst, z_joint)))
            assert report["r2_joint"][dst] == pytest.approx(expected, abs=1e-6)
    assert report["fires"]["b"] == fires[1].long().tolist()
    cofires = ((z["a"] > 0.1) & (z["b"] > 0.1) & (z["c"] > 0.1)).sum(0)
    assert report["cofiring"]["cofires"] == cofires.tolist()
    fe = metrics.firing_entropy(fires)
    got = np.array([np.nan if v is None else v for v in report["firing_entropy"]])
    np.testing.assert_allclose(got, fe.numpy(), atol=1e-9)
    assert report["l0"]["a"] == pytest.approx(float(metrics.l0(z["a"])))
    mean_z = z["c"].double().mean(0)
    energy = metrics.energy(mean_z, sae.dictionary("c").norm(dim=1))
    np.testing.assert_allclose(report["energy"]["c"], energy.numpy(), rtol=1e-6, atol=1e-12)
    assert report["r2_matrix"][0][0] > 0.3  # it did learn something
    assert sum(report["classes"]["counts"].values()) == 64
    assert set(report["classes"]["counts"]) == {"universal", "partial", "specific", "rare", "dead"}
    # every threshold is recorded, read back, and reproduces the labels from the report's counts
    recorded = report["classes"]["thresholds"]
    assert list(recorded) == ["min_rate", "universal_fe", "min_count", "min_share", "universal_cofire"]
    assert isinstance(recorded["min_count"], int)  # report.json's form: as before the dataclass
    assert thresholds_of(report) == ClassThresholds()
    assert classify(report, thresholds_of(report)) == report["classes"]["labels"]
    cofires_t = torch.tensor(report["cofiring"]["cofires"], dtype=torch.float64)
    assert report["classes"]["labels"] == metrics.classify_latents(fires, 6000, cofires_s=cofires_t)


def test_streaming_is_independent_of_batch_size(trained, small_store):
    sae, _ = trained
    a = evaluate(sae, small_store, batch_size=4096, progress=False)
    b = evaluate(sae, small_store, batch_size=333, progress=False)
    np.testing.assert_allclose(a["r2_matrix"], b["r2_matrix"], atol=1e-9)
    np.testing.assert_allclose(a["r2_matrix_paper"], b["r2_matrix_paper"], atol=1e-9)
    assert a["fires"] == b["fires"]
    c = evaluate(sae, small_store, max_rows=1000, progress=False)
    assert c["n_rows"] == 1000


def test_store_that_does_not_fit_the_run(trained, tmp_path):
    sae, _ = trained
    store = write_store(tmp_path / "s", {"a": np.zeros((10, 32), np.float32), "b": np.zeros((10, 7), np.float32)})
    with pytest.raises(UsaeError, match=r"lacks the run's models \['b', 'c'\] at the run's widths"):
        evaluate(sae, open_store(store), progress=False)


def test_recorded_thresholds_are_the_ones_given(trained, small_store):
    sae, _ = trained
    given = ClassThresholds(min_rate=1e-3, universal_fe=0.5, min_count=3, min_share=0.1, universal_cofire=0.4)
    report = evaluate(sae, small_store, max_rows=2000, progress=False, thresholds=given)
    assert thresholds_of(report) == given
    assert classify(report, given) == report["classes"]["labels"]


def test_threshold_defaults_are_defined_once():
    """One ClassThresholds: EvalConfig nests it, classify_latents and used_latents default to it."""
    import inspect

    from usae.config.evaluate import ClassThresholds as FromConfig

    assert ClassThresholds is FromConfig
    cfg = EvalConfig(run=Path("r"), stores=(Path("s"),))
    assert cfg.thresholds == ClassThresholds()
    for fn in (metrics.classify_latents, metrics.used_latents):
        assert inspect.signature(fn).parameters["thresholds"].default == ClassThresholds()
    with pytest.raises(UsaeError, match="universal_cofire"):
        EvalConfig(run=Path("r"), stores=(Path("s"),), thresholds=ClassThresholds(universal_cofire=1.5))


def test_the_keyword_form_builds_the_config(trained, small_store, tmp_path):
    """evaluate(run, store, **overrides) is evaluate(EvalConfig(...)) without report.md; bad overrides are refused."""
    _, run = trained
    out = tmp_path / "r.json"
    by_keywords = evaluate(run, small_store, out=out, max_rows=500, progress=False)
    (by_config,) = evaluate(
        EvalConfig(run=run, stores=(small_store,), out=tmp_path / "c.json", max_rows=500, report=False, progress=False)
    )
    assert by_keywords == by_config == json.loads(out.read_text())
    assert not (tmp_path / "report.md").exists()
    with pytest.raises(TypeError, match="min_rate"):
        evaluate(run, small_store, min_rate=0.1)  # thresholds are one object: thresholds=ClassThresholds(...)


def test_evaluate_says_before_it_names_concepts(trained, small_store, tmp_path, caplog, monkeypatch):
    """The chain evaluate -> label is announced in one log line naming the command and how to skip it."""
    import logging

    from usae.evaluation import evaluate as module

    def labelled(path):  # the store as if it recorded per-image labels
        store = open_store(path)
        store.extra = {**store.extra, "labels": {}}
        return store

    _, run = trained
    ran = []
    monkeypatch.setattr(module, "open_store", labelled)
    monkeypatch.setattr(module, "label", lambda cfg: ran.append(cfg))
    with caplog.at_level(logging.INFO, logger="usae"):
        evaluate(EvalConfig(run=run, stores=(small_store,), out=tmp_path / "rep", max_rows=500, progress=False))
    said = [r.getMessage() for r in caplog.records if "usae label" in r.getMessage()]
    assert len(ran) == 1 and len(said) == 1 and "--no-label" in said[0] and str(small_store) in said[0]
    ran.clear()
    evaluate(
        EvalConfig(run=run, stores=(small_store,), out=tmp_path / "rep", max_rows=500, label=False, progress=False)
    )
    assert ran == []


def test_report_marks_the_training_store_and_shows_the_held_out_gap(trained, small_store, small_world, tmp_path):
    _, run = trained
    # another store (a scaled copy of some rows): the run was not trained on it
    other = write_store(tmp_path / "held", {n: x[:4000] * 1.01 for n, x in small_world.data.items()})
    held, seen = evaluate(EvalConfig(run=run, stores=(other, small_store), out=tmp_path / "rep", progress=False))
    assert held["store"]["trained_on"] is False and seen["store"]["trained_on"] is True
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "**the run was trained on it: in-sample**" in text and "images the run never saw" in text
    gap = seen["r2_self_mean"] - held["r2_self_mean"]
    assert f"**Held-out vs in-sample**: mean self R² {held['r2_self_mean']:.3g}" in text and f"gap {gap:.3g}" in text
    # a report of a UniversalSAE object does not know its training store
    assert evaluate(trained[0], small_store, progress=False)["store"]["trained_on"] is None
