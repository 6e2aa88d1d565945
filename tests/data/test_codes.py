"""usae encode: sparse codes written streaming, read back equal to encode()."""

import json

import numpy as np
import pytest
import torch

from usae.__main__ import main
from usae.config import SAEConfig
from usae.data.codes import open_codes
from usae.data.store import open_store
from usae.errors import UsaeError
from usae.model.sae import UniversalSAE
from usae.run import run_config, save_run


def _run(tmp_path, store, activation="topk", k=4):
    st = open_store(store)
    torch.manual_seed(0)
    sae = UniversalSAE(SAEConfig(widths=st.widths, n_latents=40, k=k, activation=activation))
    for name in sae.model_names:
        stats = st.stats(name)
        sae.set_normalization_(name, torch.from_numpy(stats.mean), torch.tensor(stats.std))
    if activation == "batchtopk":
        for h in sae.heads.values():
            h.threshold.fill_(0.05)
    save_run(tmp_path / "run", sae, run_config(sae, {}, {"hash": st.hash}))
    return tmp_path / "run", sae.eval()


def test_codes_equal_encode_and_are_documented(small_store, tmp_path):
    run, sae = _run(tmp_path, small_store)
    out = tmp_path / "codes"
    args = ["encode", str(run), str(small_store), "--out", str(out), "--rows-per-shard", "2500"]
    assert main([*args, "--batch-size", "700", "--no-progress"]) == 0
    codes = open_codes(out)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["format"] == "usae-codes" and meta["n_shards"] == 3 and meta["k"] == 4
    assert meta["store"]["hash"] == open_store(small_store).hash
    assert sorted(p.name for p in (out / "b").iterdir())[:2] == ["indices-00000.npy", "indices-00001.npy"]
    store = open_store(small_store)
    for name in sae.model_names:
        idx, val = codes.read(name)
        assert idx.dtype == np.int32 and idx.shape == (store.n_rows, 4)
        assert (np.diff(val, axis=1) <= 0).all()  # by decreasing value
        assert ((idx == -1) == (val == 0)).all()
        with torch.no_grad():
            z = sae.encode(name, torch.from_numpy(store.rows(name, 0, store.n_rows))).numpy()
        np.testing.assert_array_equal(codes.dense(name), z)
        np.testing.assert_array_equal(codes.dense(name, 2400, 2600), z[2400:2600])
    assert not (tmp_path / "codes.partial").exists()
    # an existing directory is replaced only when asked, and only if it holds codes
    assert main([*args, "--no-progress"]) == 2
    assert main([*args, "--no-progress", "--overwrite", "--models", "a", "--value-dtype", "float16"]) == 0
    assert open_codes(out).model_names == ["a"] and np.load(out / "a/values-00000.npy").dtype == np.float16
    (tmp_path / "other").mkdir()
    (tmp_path / "other/thesis.tex").write_text("x")
    with pytest.raises(UsaeError, match="not a usae artifact; --overwrite only replaces a usae-codes directory"):
        from usae.config import EncodeConfig
        from usae.evaluation.encode import encode_store

        encode_store(EncodeConfig(run=run, store=small_store, out=tmp_path / "other", overwrite=True, progress=False))
    assert (tmp_path / "other/thesis.tex").exists()


def test_batchtopk_codes_count_truncated_rows(small_store, tmp_path):
    run, sae = _run(tmp_path, small_store, activation="batchtopk", k=2)
    out = tmp_path / "codes"
    assert (
        main(
            ["encode", str(run), str(small_store), "--out", str(out), "--k", "3", "--max-rows", "500", "--no-progress"]
        )
        == 0
    )
    codes = open_codes(out)
    store = open_store(small_store)
    with torch.no_grad():
        z = sae.encode("c", torch.from_numpy(store.rows("c", 0, 500))).numpy()
    n_over = int(((z > 0).sum(1) > 3).sum())
    assert codes.metadata["n_truncated_rows"]["c"] == n_over > 0
    top3 = -np.sort(-z, axis=1)[:, :3]
    np.testing.assert_array_equal(codes.read("c")[1], top3)


def test_store_with_other_models_is_refused(small_store, tmp_path, capsys):
    from usae.data.store import write_store

    run, _ = _run(tmp_path, small_store)
    other = write_store(tmp_path / "s2", {"a": np.zeros((10, 5)), "b": np.zeros((10, 48)), "c": np.zeros((10, 40))})
    assert main(["encode", str(run), str(other), "--out", str(tmp_path / "codes"), "--no-progress"]) == 2
    assert "lacks the run's models ['a'] at the run's widths" in capsys.readouterr().err
    assert not (tmp_path / "codes").exists()


def test_codes_record_absolute_paths(small_store, tmp_path, monkeypatch):
    """Run and store given relative to the working directory are saved absolute (and as given)."""
    import os

    run, _ = _run(tmp_path, small_store)
    monkeypatch.chdir(tmp_path)
    store_rel = os.path.relpath(small_store, tmp_path)
    assert main(["encode", "run", store_rel, "--out", "codes", "--max-rows", "100", "--no-progress"]) == 0
    meta = json.loads((tmp_path / "codes" / "metadata.json").read_text())
    assert meta["run"]["path"] == str(run) and meta["run"]["path_as_given"] == "run"
    assert meta["store"]["path"] == str(small_store) and meta["store"]["path_as_given"] == store_rel


def test_encode_progress_counts_rows(small_store, tmp_path, monkeypatch):
    """The bar counts store rows, as the log line does, whatever the number of models."""
    import usae.evaluation.encode as codes_mod

    bars = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            pass

    monkeypatch.setattr(codes_mod, "tqdm", Bar)
    run, _ = _run(tmp_path, small_store)
    argv = ["encode", str(run), str(small_store), "--out", str(tmp_path / "codes"), "--max-rows", "1500"]
    assert main([*argv, "--rows-per-shard", "600", "--batch-size", "250"]) == 0
    (bar,) = bars
    assert bar.total == bar.n == 1500


def test_encode_out_is_checked_before_writing(small_store, tmp_path, capsys, monkeypatch):
    """--out may not be the store or the run, nor lie inside them; a failed command leaves no new directory."""
    import usae.evaluation.encode as codes_mod

    run, _ = _run(tmp_path, small_store)
    before = sorted(small_store.rglob("*")), sorted(run.rglob("*"))
    for out in (small_store, small_store / "codes", run / "codes"):
        assert main(["encode", str(run), str(small_store), "--out", str(out), "--no-progress"]) == 2
        assert "the input" in capsys.readouterr().err
    assert before == (sorted(small_store.rglob("*")), sorted(run.rglob("*")))

    def fail(*a, **k):
        raise UsaeError("encoding failed")

    monkeypatch.setattr(codes_mod, "top_codes", fail)
    assert main(["encode", str(run), str(small_store), "--out", str(tmp_path / "a/b/codes"), "--no-progress"]) == 2
    assert not (tmp_path / "a").exists()


def test_encode_models_needs_only_those_models_in_the_store(small_store, small_world, tmp_path):
    """--models a: a store holding only model a (same rows) is enough; a model it lacks is one line."""
    from usae.data.store import write_store

    run, sae = _run(tmp_path, small_store)
    only_a = write_store(tmp_path / "only-a", {"a": small_world.data["a"]}, dtype="float32")
    out = tmp_path / "codes"
    assert main(["encode", str(run), str(only_a), "--out", str(out), "--models", "a", "--no-progress"]) == 0
    with torch.no_grad():
        z = sae.encode("a", torch.from_numpy(open_store(only_a).rows("a", 0, 100))).numpy()
    np.testing.assert_array_equal(open_codes(out).dense("a")[:100], z)
    with pytest.raises(UsaeError, match=r"lacks the run's models \['b'\]"):
        from usae.config import EncodeConfig
        from usae.evaluation.encode import encode_store

        encode_store(EncodeConfig(run=run, store=only_a, out=tmp_path / "c2", models=("a", "b"), progress=False))
