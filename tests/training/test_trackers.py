"""--log wandb / tensorboard: the trackers hold exactly metrics.jsonl's records, on rank 0 only,
continue across a resume, never change the result, and a missing package is one line."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import tyro

import usae.training.fit as fit_mod
from usae.__main__ import main
from usae.config import TrainConfig
from usae.distributed import World
from usae.training.fit import fit, fit_many
from usae.training.trackers import TENSORBOARD_DIR, WANDB_DIR, WANDB_ID_NAME, open_trackers, wandb_mode

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")


def cfg_for(store, out, **kw) -> TrainConfig:
    base = dict(store=store, out=out, n_latents=64, k=4, steps=30, batch_size=256, progress=False, log_every=10)
    return TrainConfig(**(base | kw))


@pytest.fixture
def wandb_offline_env(tmp_path, monkeypatch):
    """No API key anywhere, wandb's own config and caches inside tmp_path: the offline default."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")


def metrics(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(run: Path) -> dict[str, dict[int, float]]:
    """Every scalar tag in RUN/tensorboard as {tag: {step: value}}, as TensorBoard shows them."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(run / TENSORBOARD_DIR), size_guidance={SCALARS: 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def assert_tensorboard_mirrors(run: Path) -> None:
    records = metrics(run)
    scalars = tensorboard_scalars(run)
    assert set(scalars) == set(records[0]) - {"step"}
    for key, by_step in scalars.items():
        expected = {int(r["step"]): float(np.float32(r[key])) for r in records}
        assert by_step == expected, key  # every step, to float32 (the event format's) precision


def wandb_records(run: Path) -> list:
    """The protobuf records of every offline wandb run under RUN/wandb, in order.

    The .wandb file is a LevelDB-style log: a 7-byte file header, then 32 KiB blocks of chunks
    (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last) holding wandb Records.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    for path in sorted((run / WANDB_DIR).glob("offline-run-*/run-*.wandb")):
        data, block = path.read_bytes(), 32768
        assert data[:4] == b":W&B"
        pos, chunks = 7, b""
        while pos + 7 <= len(data):
            left = block - pos % block
            if left < 7:  # a block's tail too short for a header is padding
                pos += left
                continue
            _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if kind == 0:
                pos += left
                continue
            chunks += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):
                record = pb.Record()
                record.ParseFromString(chunks)
                records.append(record)
                chunks = b""
    return records


def wandb_history(run: Path) -> tuple[dict[int, dict[str, float]], dict]:
    """({step: {key: value}} of the logged rows, the run's config) from the offline run files."""
    rows, config = {}, {}
    for record in wandb_records(run):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            rows[int(row.pop("_step"))] = {k: v for k, v in row.items() if not k.startswith("_")}
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            config |= {u.key: json.loads(u.value_json) for u in updates}
    return rows, config


def assert_wandb_mirrors(run: Path) -> None:
    rows, config = wandb_history(run)
    expected = {int(r["step"]): {k: v for k, v in r.items() if k != "step"} for r in metrics(run)}
    assert rows == expected  # every key and step, exactly (wandb stores the JSON of the float)
    saved = json.loads((run / "config.json").read_text())
    assert {k: config[k] for k in saved} == saved


def test_trackers_mirror_metrics_jsonl_and_change_nothing(small_store, tmp_path, wandb_offline_env):
    """fit_many, two runs, both trackers: each holds its own metrics.jsonl; weights as without trackers."""
    both = ("wandb", "tensorboard")
    runs = [tmp_path / "a", tmp_path / "b"]
    results = fit_many([cfg_for(small_store, runs[0], log=both), cfg_for(small_store, runs[1], k=8, log=both)])
    for run in runs:
        assert_tensorboard_mirrors(run)
        assert_wandb_mirrors(run)
        assert len(list((run / WANDB_DIR).glob("offline-run-*"))) == 1  # offline by default, under RUN/wandb
    plain = fit(cfg_for(small_store, tmp_path / "plain"))
    for key, value in plain.sae.state_dict().items():
        assert torch.equal(value, results[0].sae.state_dict()[key]), key
    assert metrics(tmp_path / "plain") == metrics(runs[0])
    assert json.loads((runs[0] / "config.json").read_text())["train"]["log"] == list(both)


def test_resume_continues_the_same_tracker_runs(small_store, tmp_path, wandb_offline_env, monkeypatch):
    """Killed after logging step 15, past the step-10 checkpoint: tensorboard keeps one value per step
    (the resumed run's), wandb continues under the same run id."""
    run = tmp_path / "run"
    both = ("wandb", "tensorboard")
    calls = {"n": 0}
    real_step = fit_mod.train_step

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 18:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(fit_mod, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg_for(small_store, run, save_every=10, log_every=5, log=both))
    run_id = (run / WANDB_DIR / WANDB_ID_NAME).read_text().strip()
    assert 15 in tensorboard_scalars(run)["train/loss"]  # logged before the kill, past the checkpoint
    monkeypatch.setattr(fit_mod, "train_step", real_step)
    result = fit(cfg_for(small_store, run, save_every=10, log_every=5, log=both, resume=True))
    assert result.steps_timed == 20  # steps 10..30, run by this process
    assert_tensorboard_mirrors(run)
    assert (run / WANDB_DIR / WANDB_ID_NAME).read_text().strip() == run_id
    sessions = sorted((run / WANDB_DIR).glob("offline-run-*"))
    assert len(sessions) == 2 and all(run_id in p.name for p in sessions)  # "...-ID", "...-ID-1" within a second
    rows, _ = wandb_history(run)  # both sessions: 5, 10, 15 (killed run), then 15 ... 30 (resumed)
    assert rows == {int(r["step"]): {k: v for k, v in r.items() if k != "step"} for r in metrics(run)}


def test_missing_tracker_package_is_one_line(small_store, tmp_path, monkeypatch, capsys):
    for kind in ("wandb", "tensorboard"):
        monkeypatch.setitem(sys.modules, kind, None)  # `import wandb` now raises ImportError
        out = tmp_path / kind
        argv = ["train", str(small_store), "--out", str(out), "--steps", "2", "--n-latents", "16", "--k", "2"]
        assert main([*argv, "--no-progress", "--log", kind]) == 2
        err = capsys.readouterr().err
        assert err == f"usae: error: --log {kind} needs the {kind} package: pip install 'usae[tracking]'\n"
        assert not out.exists()  # refused before anything was written
        monkeypatch.delitem(sys.modules, kind)


def test_log_flag_parses_as_a_list_and_is_result_free(small_store, tmp_path):
    parse = lambda *a: tyro.cli(TrainConfig, args=[str(small_store), *a])  # noqa: E731
    assert parse().log == ()
    assert parse("--log", "wandb", "tensorboard").log == ("wandb", "tensorboard")
    assert parse("--trackers", "tensorboard").log == ("tensorboard",)
    run = tmp_path / "run"
    fit(cfg_for(small_store, run, steps=20, save_every=10))
    # Adding a tracker on resume is allowed: `log` does not change what the run computes.
    fit(cfg_for(small_store, run, steps=20, save_every=10, resume=True, log=("tensorboard",)))


def test_only_rank_zero_opens_trackers(tmp_path):
    opened = open_trackers(("wandb", "tensorboard"), tmp_path / "run", {}, 0, World(1, 2))
    assert opened.trackers == [] and not (tmp_path / "run").exists()


def test_wandb_offline_unless_told_otherwise(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_mode() == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password k3y\n")
    assert wandb_mode() is None  # logged in: wandb's default (online)
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert wandb_mode() == "offline"  # the key is for another host
    monkeypatch.setenv("WANDB_API_KEY", "k3y")
    assert wandb_mode() is None
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() is None  # wandb reads WANDB_MODE itself


@pytest.mark.slow
def test_torchrun_writes_one_tensorboard_log(small_store, tmp_path):
    """Two gloo ranks, --log tensorboard: rank 0 alone writes, and the events equal metrics.jsonl."""
    run = tmp_path / "run"
    args = ["--n-latents", "64", "--k", "4", "--batch-size", "256", "--steps", "20", "--log-every", "10"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd = [*torchrun, "-m", "usae", "train", str(small_store), "--out", str(run), *args]
    cmd += ["--device", "cpu", "--no-progress", "--trackers", "tensorboard"]  # torchrun refuses "--log"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((run / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 1
    assert_tensorboard_mirrors(run)
