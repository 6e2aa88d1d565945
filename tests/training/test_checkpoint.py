import json

import pytest
import torch

from usae.config import SAEConfig
from usae.errors import UsaeError
from usae.model.sae import UniversalSAE
from usae.run import load, run_config, save_run
from usae.training.checkpoints import _flatten_optimizer, latest_checkpoint, save_checkpoint
from usae.training.checkpoints import unflatten_optimizer as _unflatten_optimizer


@pytest.fixture
def sae():
    model = UniversalSAE(SAEConfig(widths={"a": 6, "b": 10}, n_latents=16, k=3, encoder="mlp"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model.set_normalization_("b", torch.arange(10.0), torch.tensor(2.5))
        model.heads["a"].bn.running_mean.add_(1.0)
    return model


def test_save_load_equality_of_every_tensor(sae, tmp_path):
    save_run(tmp_path, sae, run_config(sae, {"normalization": "scalar"}, {"hash": "x"}))
    loaded = load(tmp_path)
    assert loaded.model_names == ["a", "b"] and loaded.cfg == sae.cfg
    own, other = sae.state_dict(), loaded.state_dict()
    assert set(own) == set(other)
    for key in own:
        assert torch.equal(own[key], other[key]), key
    x = torch.randn(5, 6)
    torch.testing.assert_close(loaded.decode("b", loaded.encode("a", x)), sae.eval().decode("b", sae.encode("a", x)))


def test_broken_run_files_give_one_line_errors(sae, tmp_path):
    save_run(tmp_path, sae, run_config(sae, {}, {}))
    model_path = tmp_path / "model.safetensors"
    good = model_path.read_bytes()
    model_path.write_bytes(good[: len(good) // 2])
    with pytest.raises(UsaeError, match="model.safetensors: not a readable safetensors file") as e:
        load(tmp_path)
    assert "\n" not in str(e.value)
    model_path.write_bytes(b"\x80\x04\x95pickle-looking junk")
    with pytest.raises(UsaeError, match="model.safetensors"):
        load(tmp_path)
    model_path.write_bytes(good)
    config_path = tmp_path / "config.json"
    cfg = json.loads(config_path.read_text())
    cfg["sae"]["n_latents"] = 32
    config_path.write_text(json.dumps(cfg))
    with pytest.raises(UsaeError, match="has shape"):
        load(tmp_path)
    cfg["sae"]["n_latents"] = 16
    cfg["sae"]["colour"] = "red"
    config_path.write_text(json.dumps(cfg))
    with pytest.raises(UsaeError, match=r"unknown config key\(s\) \['colour'\]"):
        load(tmp_path)
    cfg["sae"].pop("colour")
    cfg["schema_version"] = 99
    config_path.write_text(json.dumps(cfg))
    with pytest.raises(UsaeError, match="unsupported schema_version 99"):
        load(tmp_path)
    config_path.write_text("{not json")
    with pytest.raises(UsaeError, match="config.json: run config is not valid JSON"):
        load(tmp_path)
    with pytest.raises(UsaeError, match="no run directory"):
        load(tmp_path / "nope")


def test_optimizer_state_round_trips_without_pickle(sae):
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    sae(src="a", x_bd=torch.randn(8, 6))["b"].square().sum().backward()
    opt.step()
    tensors, meta = _flatten_optimizer(opt)
    restored = _unflatten_optimizer(tensors, meta, "x")
    opt2 = torch.optim.Adam(sae.parameters(), lr=1e-3)
    opt2.load_state_dict(restored)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"] or json.dumps(a["param_groups"]) == json.dumps(b["param_groups"])
    for idx, state in a["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][idx][key]))


def test_incomplete_checkpoints_are_never_loaded(sae, tmp_path):
    opt = torch.optim.Adam(sae.parameters())
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, sae, opt, {"since_fired_ms": torch.zeros(2, 16)}, {})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-00000020",
        "step-00000030",
    ]
    # a directory left by a kill before its state.json was written is ignored
    (tmp_path / "checkpoints/step-00000040").mkdir()
    (tmp_path / "checkpoints/.step-00000050.tmp").mkdir()
    assert latest_checkpoint(tmp_path).step == 30
