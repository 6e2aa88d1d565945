"""TrainConfig's groups (data, arch, optim, io) are invisible from outside: flat keywords, flat
attributes, the same flags, and the same flat ``train`` object in config.json as before they existed."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import tyro

from usae.config import TrainConfig, from_json_dict, to_json_dict
from usae.config.convert import _leaf_fields
from usae.config.train import ArchConfig, DataConfig
from usae.errors import UsaeError
from usae.run import differing_field, load_train_config
from usae.training.resume import resolve

DATA = Path(__file__).parent / "data"
# Written by `usae train store --out run --n-latents 32 --k 4 --steps 20 --batch-size 128 --save-every 10
# --no-progress` before the fields were grouped (a 2-model synthetic store of widths 16 and 24).
OLD_CONFIG = DATA / "config-0.1.0.json"


def old_train() -> dict:
    return json.loads(OLD_CONFIG.read_text())["train"]


def test_flat_keywords_attributes_and_replace():
    cfg = TrainConfig(store=Path("store"), out=Path("run"), n_latents=512, k=8, steps=500)
    assert (cfg.k, cfg.steps, cfg.out, cfg.store) == (8, 500, Path("run"), Path("store"))
    assert cfg.arch.k == 8 and cfg.data.steps == 500 and cfg.io.out == Path("run")
    changed = dataclasses.replace(cfg, k=16, out=Path("elsewhere"))
    assert (changed.k, changed.n_latents, changed.out, changed.steps) == (16, 512, Path("elsewhere"), 500)
    assert TrainConfig(Path("store")) == TrainConfig(store=Path("store"))
    assert TrainConfig(data=DataConfig(store=Path("store")), arch=ArchConfig(k=8), lr=1e-3) == TrainConfig(
        store=Path("store"), k=8, lr=1e-3
    )
    with pytest.raises(TypeError, match="kk"):
        TrainConfig(store=Path("s"), kk=1)
    with pytest.raises(AttributeError):
        _ = cfg.no_such_field
    with pytest.raises(UsaeError, match=r"train config: invalid steps=0"):
        TrainConfig(store=Path("s"), steps=0)
    with pytest.raises(UsaeError, match=r"k must be in \[1, n_latents=4\]"):
        TrainConfig(store=Path("s"), n_latents=4, k=5)


def test_flags_are_the_field_names_without_a_group_prefix(capsys):
    with pytest.raises(SystemExit):
        tyro.cli(TrainConfig, args=["--help"])
    text = capsys.readouterr().out
    for name in _leaf_fields(TrainConfig):
        if name != "store":  # positional
            assert re.search(rf"--{name.replace('_', '-')}[ ,]", text), name
    assert "--arch." not in text and "--optim." not in text and "--data." not in text and "--io." not in text
    args = ["s", "--k", "8", "--lr", "1e-3", "--resume", "--trackers", "tensorboard", "--models", "a", "b"]
    parsed = tyro.cli(TrainConfig, args=args)
    assert parsed == TrainConfig(store=Path("s"), k=8, lr=1e-3, resume=True, log=("tensorboard",), models=("a", "b"))


def test_old_config_json_loads_and_saves_back_the_same(tmp_path):
    """The migration: a config.json written before the grouping reads into the nested config, and
    writing that config gives the same flat ``train`` object back."""
    saved = old_train()
    cfg = from_json_dict(TrainConfig, saved, "config.json: train")
    assert (cfg.arch.n_latents, cfg.arch.k, cfg.data.steps, cfg.data.batch_size) == (32, 4, 20, 128)
    assert cfg.optim.lr == 0.03 and cfg.optim.select_precision == "float32" and cfg.data.models == ("a", "b")
    # keys added since (issue 21: held-out validation) take their defaults; the rest round-trips
    written = to_json_dict(cfg)
    assert {k: v for k, v in written.items() if k in saved} == saved
    assert {k: v for k, v in written.items() if k not in saved} == {"val_every": None, "val_rows": 8192, "patience": 0}
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(OLD_CONFIG.read_text())
    assert load_train_config(run) == cfg
    # the same command line today is the same run (resume and reuse compare this way)
    same = TrainConfig(store=Path("store"), out=Path("run"), n_latents=32, k=4, steps=20, batch_size=128, save_every=10)
    assert differing_field(saved, same) is None
    assert differing_field(saved, dataclasses.replace(same, k=8)) == ("k", 8, 4)
    with pytest.raises(UsaeError, match=r"unknown config key\(s\) \['arch'\]"):
        from_json_dict(TrainConfig, {**saved, "arch": {}}, "config.json: train")
    with pytest.raises(UsaeError, match="give a STORE, or --images"):
        from_json_dict(TrainConfig, {k: v for k, v in saved.items() if k != "store"}, "config.json: train")


def test_resolve_saves_what_the_old_code_saved():
    """``resolve`` fills in every auto value once; saved, it is the old resolved ``train`` object
    key for key (``out`` absolute)."""
    cfg = TrainConfig(
        store=Path("store"), out=Path("run"), n_latents=32, k=4, steps=20, batch_size=128, save_every=10, progress=False
    )
    resolved = resolve(cfg, {"a": 16, "b": 24}, torch.device("cpu"))
    assert resolved.io.out.is_absolute() and resolved.io.out.name == "run"
    # plus the keys added since, resolved (no held-out twin: validation off)
    expected = {**old_train(), "out": str(resolved.io.out), "val_every": 0, "val_rows": 8192, "patience": 0}
    assert to_json_dict(resolved) == expected
    # a resumed run keeps the precision it started with, whatever this machine's
    kept = resolve(cfg, {"a": 16, "b": 24}, torch.device("cpu"), saved={"select_precision": "bfloat16"})
    assert kept.optim.select_precision == "bfloat16"
    assert resolve(dataclasses.replace(cfg, lr=1e-3, k_aux=3), {"a": 16}).optim.k_aux == 3
