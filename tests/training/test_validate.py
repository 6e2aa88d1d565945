"""--val-every on the held-out twin, the best checkpoint (RUN/best/), --patience, and resume of all three."""

import dataclasses
import json

import pytest
import torch

import usae.training.fit as train_mod
from usae.config import TrainConfig
from usae.data.store import write_store
from usae.data.synth import make_world
from usae.errors import UsaeError
from usae.run import load
from usae.training.fit import fit
from usae.training.validate import BestSoFar


def _twin(tmp_path, data, n_train, name="s"):
    """A training store of the first ``n_train`` rows whose held-out twin holds rows 4000 on."""
    val = write_store(tmp_path / f"{name}-val", {n: x[4000:] for n, x in data.items()}, dtype="float32")
    split = {"name": "train", "val_fraction": 0.3, "seed": 0, "other": str(val)}
    return write_store(
        tmp_path / name, {n: x[:n_train] for n, x in data.items()}, dtype="float32", extra={"split": split}
    )


@pytest.fixture(scope="module")
def twin_store(small_world, tmp_path_factory):
    return _twin(tmp_path_factory.mktemp("twin"), small_world.data, 4000)


def cfg_for(store, out, **kw) -> TrainConfig:
    base = dict(store=store, out=out, n_latents=64, k=4, steps=40, batch_size=256, progress=False, log_every=10)
    return TrainConfig(**(base | kw))


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_val_every_writes_held_out_entries_and_keeps_the_best(twin_store, tmp_path):
    """Held-out records every N steps and at the last; RUN/best/ is the lowest-loss one; training
    itself is the same as without validation."""
    result = fit(cfg_for(twin_store, tmp_path / "run", val_every=15))
    val = [r for r in _records(tmp_path / "run") if "val/loss" in r]
    assert [r["step"] for r in val] == [15, 30, 40]
    assert {"val/r2_self/a", "val/r2_cross/c", "val/r2_self", "val/r2_cross"} <= set(val[0])
    assert all(-1 < r["val/r2_self/b"] <= 1 for r in val)
    best = min(val, key=lambda r: r["val/loss"])
    saved = json.loads((tmp_path / "run/best/best.json").read_text())
    assert saved["step"] == best["step"] == result.best_step and saved["val/loss"] == best["val/loss"]
    assert result.last_val["step"] == 40 and result.stopped_at is None
    assert load(tmp_path / "run" / "best").n_latents == 64
    # the default: on when the twin exists (max(log_every, steps // 20)); 0 turns it off
    assert json.loads((tmp_path / "run/config.json").read_text())["train"]["val_every"] == 15
    off = fit(cfg_for(twin_store, tmp_path / "off", val_every=0))
    assert not any("val/loss" in r for r in _records(tmp_path / "off")) and off.best_step is None
    for key, value in off.sae.state_dict().items():
        assert torch.equal(value, result.sae.state_dict()[key]), key
    auto = fit(cfg_for(twin_store, tmp_path / "auto", steps=20))
    assert [r["step"] for r in _records(tmp_path / "auto") if "val/loss" in r] == [10, 20]
    assert auto.best_step in (10, 20)


def test_resume_keeps_the_best_so_far(twin_store, tmp_path, monkeypatch):
    """Killed after the step-20 checkpoint and resumed: the same weights, log, best step and patience
    count as the uninterrupted run."""
    full_cfg = cfg_for(twin_store, tmp_path / "full", save_every=10, val_every=10, patience=50)
    full = fit(full_cfg)
    calls = {"n": 0}
    real_step = train_mod.train_step

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 26:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", interrupted)
    part_cfg = dataclasses.replace(full_cfg, out=tmp_path / "part")
    with pytest.raises(KeyboardInterrupt):
        fit(part_cfg)
    monkeypatch.setattr(train_mod, "train_step", real_step)
    state = json.loads((tmp_path / "part/checkpoints/step-00000020/state.json").read_text())
    assert BestSoFar(state["val"]).best["step"] in (10, 20)
    resumed = fit(dataclasses.replace(part_cfg, resume=True))
    for key, value in full.sae.state_dict().items():
        assert torch.equal(value, resumed.sae.state_dict()[key]), key
    assert (tmp_path / "full/metrics.jsonl").read_text() == (tmp_path / "part/metrics.jsonl").read_text()
    assert (resumed.best_step, resumed.best_metrics) == (full.best_step, full.best_metrics)
    full_best, part_best = load(tmp_path / "full/best"), load(tmp_path / "part/best")
    for key, value in full_best.state_dict().items():
        assert torch.equal(value, part_best.state_dict()[key]), key


def test_patience_stops_at_the_held_out_peak(tmp_path):
    """32 noisy training rows, 64 latents, constant LR: held-out R² rises for ~100 steps, then falls
    as the dictionary memorises the rows; --patience 3 stops 3 validations after the best, which
    RUN/best/ holds, and a resume of the stopped run trains no further."""
    world = make_world(
        {"a": 32, "b": 48}, n_rows=6000, n_universal=24, n_partial=0, n_specific=8, k_active=4, seed=3, noise=0.3
    )
    store = _twin(tmp_path, world.data, 32)
    cfg = cfg_for(store, tmp_path / "run", steps=300, batch_size=32, lr=0.03, init="random", warmup_steps=0)
    cfg = dataclasses.replace(cfg, lr_end_ratio=1.0, auxk_coef=0.0, val_every=10, patience=3)
    result = fit(cfg)
    val = [r for r in _records(tmp_path / "run") if "val/loss" in r]
    best = min(val, key=lambda r: r["val/loss"])
    assert result.best_step == best["step"] and result.stopped_at == best["step"] + 30 < 300
    assert val[-1]["step"] == result.stopped_at and best["val/r2_self"] > val[-1]["val/r2_self"]
    assert val[0]["val/r2_self"] < best["val/r2_self"]  # it rose first: a peak, not a fall from the start
    assert json.loads((tmp_path / "run/best/best.json").read_text())["step"] == best["step"]
    again = fit(dataclasses.replace(cfg, resume=True))
    assert again.steps_timed == 0 and again.stopped_at == result.stopped_at


def test_patience_needs_a_held_out_twin(small_store, tmp_path):
    with pytest.raises(UsaeError, match="--patience 2 needs held-out validations"):
        fit(cfg_for(small_store, tmp_path / "run", patience=2))
    assert not (tmp_path / "run").exists()
