import dataclasses
import json

import numpy as np
import pytest
import torch

import usae.training.fit as train_mod
import usae.training.resume as resume_mod
from usae.config import TrainConfig
from usae.data.store import open_store, write_store
from usae.data.synth import make_world, recovery
from usae.errors import UsaeError
from usae.run import load
from usae.training.checkpoints import latest_checkpoint
from usae.training.fit import fit
from usae.training.rules import sources_at
from usae.training.step import lr_at


def cfg_for(store, out, **kw) -> TrainConfig:
    base = dict(
        store=store,
        out=out,
        n_latents=64,
        k=4,
        steps=30,
        batch_size=256,
        progress=False,
        log_every=10,
    )
    return TrainConfig(**(base | kw))


def test_lr_schedule_is_a_pure_function_of_the_step():
    assert lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 10, 100) == pytest.approx(0.5)  # halfway through the cosine
    assert lr_at(100, 1.0, 10, 100, end_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(0, 2.0, 0, 10) == pytest.approx(2.0)


def test_sources():
    names = ["a", "b", "c"]
    picks = [sources_at(s, 0, names, "random-source")[0] for s in range(300)]
    assert set(picks) == set(names) and all(80 < picks.count(n) < 120 for n in names)
    assert picks == [sources_at(s, 0, names, "as-released")[0] for s in range(300)]
    assert sources_at(5, 0, names, "all-sources") == names


def test_fit_writes_a_run_and_learns(small_store, tmp_path):
    result = fit(cfg_for(small_store, tmp_path / "run", steps=200, log_every=50))
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["schema_version"] == 2 and config["format"] == "usae-run"
    assert config["sae"]["widths"] == {"a": 32, "b": 48, "c": 40}
    assert config["train"]["lr"] > 0 and config["train"]["warmup_steps"] == 10  # resolved, not null
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [50, 100, 150, 200]
    assert {"train/loss", "train/recon/a", "train/dead/c", "lr"} <= set(lines[0])
    assert lines[-1]["train/loss"] < 0.6 * lines[0]["train/loss"]
    assert latest_checkpoint(run).step == 200
    loaded = load(run)
    for key, value in result.sae.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_resume_after_interrupt_is_bit_identical(small_store, tmp_path, monkeypatch):
    full = fit(cfg_for(small_store, tmp_path / "full", steps=40, save_every=10))
    calls = {"n": 0}
    real_step = train_mod.train_step

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 26:  # killed in the middle of step 26, after the step-20 checkpoint
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", interrupted)
    part_cfg = cfg_for(small_store, tmp_path / "part", steps=40, save_every=10)
    with pytest.raises(KeyboardInterrupt):
        fit(part_cfg)
    monkeypatch.setattr(train_mod, "train_step", real_step)
    assert latest_checkpoint(tmp_path / "part").step == 20
    resumed = fit(dataclasses.replace(part_cfg, resume=True))
    for key, value in full.sae.state_dict().items():
        assert torch.equal(value, resumed.sae.state_dict()[key]), key
    assert (tmp_path / "full/metrics.jsonl").read_text() == (tmp_path / "part/metrics.jsonl").read_text()
    # a run directory moved elsewhere resumes too (here: to train 10 more steps), even when a kill
    # tore the last metrics line in the middle of an append
    with open(tmp_path / "part/metrics.jsonl", "a") as f:
        f.write('{"step": 4')
    moved = tmp_path / "elsewhere" / "part"
    moved.parent.mkdir()
    (tmp_path / "part").rename(moved)
    longer = fit(dataclasses.replace(part_cfg, out=moved, resume=True, steps=50))
    assert longer.run_dir == moved and latest_checkpoint(moved).step == 50
    steps = [json.loads(line)["step"] for line in (moved / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 50


def _one_step(store, out, rule):
    cfg = cfg_for(store, out, steps=1, rule=rule, seed=0, init="random", grad_clip=None)
    names = ["a", "b", "c"]
    src = sources_at(0, 0, names, rule)[0]
    before = train_mod.build_sae(cfg, open_store(store), names, torch.device("cpu")).state_dict()
    after = fit(cfg).sae.state_dict()
    # renormalising unit rows may move the last bit; a real step moves far more than 1e-6
    return src, {k: not torch.allclose(before[k], after[k], atol=1e-6, rtol=0) for k in before}


def test_as_released_steps_only_the_sampled_model(small_store, tmp_path):
    src, changed = _one_step(small_store, tmp_path / "rel", "as-released")
    for name in "abc":
        assert changed[f"heads.{name}.W_dec"] == (name == src)
        assert changed[f"heads.{name}.W_enc"] == (name == src)
    src, changed = _one_step(small_store, tmp_path / "rs", "random-source")
    assert all(changed[f"heads.{n}.W_dec"] for n in "abc")  # every decoder got a gradient and a step
    assert [changed[f"heads.{n}.W_enc"] for n in "abc"] == [n == src for n in "abc"]


@pytest.mark.parametrize(
    "options",
    [
        {"rule": "all-sources"},
        {"encoder": "mlp", "activation": "batchtopk", "loss": "l1"},
        {
            "decoder_norm": "unit",
            "normalization": "per-dim",
            "optimizer": "adamw",
            "weight_decay": 1e-4,
        },
        {"normalization": "paper", "init": "random", "auxk_coef": 0.0},
        {"rule": "sparc"},
        {"rule": "crosscoder"},
    ],
)
def test_options_train(small_store, tmp_path, options):
    result = fit(cfg_for(small_store, tmp_path / "run", steps=60, log_every=20, **options))
    assert np.isfinite(result.last_metrics["train/loss"])
    losses = [json.loads(x)["train/loss"] for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]


def test_auxk_revives_dead_latents(small_store, tmp_path):
    """With a tiny dead threshold many latents count as dead; AuxK must run and stay finite."""
    result = fit(cfg_for(small_store, tmp_path / "run", steps=100, dead_after_tokens=256, log_every=25))
    assert result.last_metrics["train/aux"] > 0


@pytest.mark.slow  # a 1500-step run that must recover planted concepts: ~15 s
def test_recovers_planted_universal_concepts(tmp_path):
    world = make_world(
        {"a": 48, "b": 64, "c": 56},
        n_rows=30_000,
        n_universal=32,
        n_partial=12,
        n_specific=12,
        k_active=5,
        seed=11,
    )
    store = write_store(tmp_path / "store", world.data, dtype="float32")
    result = fit(cfg_for(store, tmp_path / "run", n_latents=256, k=6, steps=1500, batch_size=512, log_every=500))
    rec = recovery({n: result.sae.dictionary(n).numpy() for n in world.model_names}, world)
    assert rec["universal"] >= 0.9, rec
    assert rec["partial"] >= 0.5 and rec["specific"] >= 0.5, rec


def test_bad_input_leaves_files_untouched(small_store, tmp_path):
    with pytest.raises(UsaeError, match="k must be"):
        cfg_for(small_store, tmp_path / "r", n_latents=8, k=9)
    with pytest.raises(UsaeError, match="no store"):
        fit(cfg_for(tmp_path / "missing", tmp_path / "r"))
    with pytest.raises(UsaeError, match="'zz' is not in store"):
        fit(cfg_for(small_store, tmp_path / "r", models=("a", "zz")))
    run = tmp_path / "run"
    fit(cfg_for(small_store, run, steps=5))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(UsaeError, match="already holds a run"):
        fit(cfg_for(small_store, run, steps=5))
    with pytest.raises(UsaeError, match="n_latents=32 differs"):
        fit(cfg_for(small_store, run, steps=5, n_latents=32, resume=True))
    assert before == {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}


def test_nan_in_store_is_refused(tmp_path):
    x = np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32)
    x[17, 2] = np.nan
    with pytest.raises(UsaeError, match="row 17"):
        write_store(tmp_path / "s", {"a": x, "b": x})
    assert not (tmp_path / "s").exists()


def test_fit_many_equals_separate_fits(small_store, tmp_path):
    """Runs trained in lockstep on one pass over the store equal runs trained alone."""
    from usae.training.fit import fit_many

    cfgs = [
        cfg_for(small_store, tmp_path / "a", steps=25, rule="random-source", n_latents=64),
        cfg_for(small_store, tmp_path / "b", steps=25, rule="crosscoder", n_latents=32, k=2),
    ]
    together = fit_many(cfgs)
    alone = [fit(dataclasses.replace(c, out=c.out.with_name(c.out.name + "-alone"))) for c in cfgs]
    for t, a in zip(together, alone, strict=True):
        for key, value in a.sae.state_dict().items():
            assert torch.equal(value, t.sae.state_dict()[key]), key
    with pytest.raises(UsaeError, match="differ in 'batch_size'"):
        fit_many([cfgs[0], dataclasses.replace(cfgs[1], batch_size=128)])


def test_select_precision_default_follows_the_hardware_and_resume_keeps_it(small_store, tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(resume_mod, "native_bf16", lambda device: True)
    fit(cfg_for(small_store, run, steps=20, save_every=10))
    assert json.loads((run / "config.json").read_text())["train"]["select_precision"] == "bfloat16"
    # resumed on a machine without bf16: the run keeps the choice it was started with
    monkeypatch.setattr(resume_mod, "native_bf16", lambda device: False)
    seen = []
    real_step = train_mod.train_step
    monkeypatch.setattr(
        train_mod, "train_step", lambda *a, **kw: seen.append(a[4].optim.select_precision) or real_step(*a, **kw)
    )
    fit(cfg_for(small_store, run, steps=30, resume=True))
    assert seen and set(seen) == {"bfloat16"}
    # encoders without the sparse path ignore the setting and record float32
    fit(cfg_for(small_store, tmp_path / "mlp", steps=2, encoder="mlp"))
    assert json.loads((tmp_path / "mlp" / "config.json").read_text())["train"]["select_precision"] == "float32"


@pytest.mark.slow  # two 800-step runs: ~20 s
def test_bf16_selection_recovers_concepts_like_float32(tmp_path):
    world = make_world(
        {"a": 48, "b": 64, "c": 56}, n_rows=20_000, n_universal=32, n_partial=12, n_specific=12, k_active=5, seed=11
    )
    store = write_store(tmp_path / "store", world.data, dtype="float32")
    recs = {}
    for precision in ("float32", "bfloat16"):
        cfg = cfg_for(
            store, tmp_path / precision, n_latents=256, k=6, steps=800, batch_size=512, select_precision=precision
        )
        result = fit(cfg)
        recs[precision] = recovery({n: result.sae.dictionary(n).numpy() for n in world.model_names}, world)
    assert recs["bfloat16"]["universal"] >= 0.9, recs
    assert recs["bfloat16"]["all"] >= recs["float32"]["all"] - 0.05, recs
