import json

import numpy as np
import pytest
import torch

from usae import metrics
from usae.config import TrainConfig
from usae.errors import UsaeError
from usae.evaluate import evaluate
from usae.store import open_store, write_store
from usae.train import fit


@pytest.fixture(scope="module")
def trained(small_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    cfg = TrainConfig(store=small_store, out=out, n_latents=64, k=4, steps=150, batch_size=256, progress=False)
    return fit(cfg).sae, out


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
                expected = float(metrics.r2(x[dst], sae.decode(dst, z[src])))
                assert report["r2_matrix"][i][j] == pytest.approx(expected, abs=1e-6)
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


def test_streaming_is_independent_of_batch_size(trained, small_store):
    sae, _ = trained
    a = evaluate(sae, small_store, batch_size=4096, progress=False)
    b = evaluate(sae, small_store, batch_size=333, progress=False)
    np.testing.assert_allclose(a["r2_matrix"], b["r2_matrix"], atol=1e-9)
    assert a["fires"] == b["fires"]
    c = evaluate(sae, small_store, max_rows=1000, progress=False)
    assert c["n_rows"] == 1000


def test_store_that_does_not_fit_the_run(trained, tmp_path):
    sae, _ = trained
    store = write_store(tmp_path / "s", {"a": np.zeros((10, 32), np.float32), "b": np.zeros((10, 7), np.float32)})
    with pytest.raises(UsaeError, match="model 'b' has width 7"):
        evaluate(sae, open_store(store), progress=False)
