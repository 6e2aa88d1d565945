"""Where a run may be written, one writer at a time, and --resume as the one command of a preemptible job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from usae._io import LOCK_NAME, load_tensors
from usae.data.store import write_store

TRAIN = ["--n-latents", "16", "--k", "2", "--batch-size", "128", "--no-progress"]


@pytest.fixture
def store(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    return write_store(tmp_path / "store", {"a": rng.normal(size=(1500, 8)), "b": rng.normal(size=(1500, 12))})


def test_train_refuses_the_root_the_store_and_foreign_directories(store, tmp_path, cli, tree):
    before = tree(tmp_path)
    root_had = {
        n: (Path("/") / n).exists() for n in ("config.json", "model.safetensors", "metrics.jsonl", "checkpoints")
    }
    for out, why in [("/", "file-system root"), (store, "is the input"), (store / "a", "lies inside the input")]:
        rc, err = cli(["train", store, "--out", out, "--steps", "2", *TRAIN])
        assert rc == 2 and len(err) == 1 and why in err[0], err
    assert {n: (Path("/") / n).exists() for n in root_had} == root_had
    assert tree(tmp_path) == before
    # a non-empty directory that is not a run: refused; with --overwrite written into, nothing of it deleted
    foreign = tmp_path / "mine"
    (foreign / "checkpoints").mkdir(parents=True)
    (foreign / "notes.txt").write_text("keep")
    (foreign / "checkpoints" / "keep.txt").write_text("keep too")
    rc, err = cli(["train", store, "--out", foreign, "--steps", "2", *TRAIN])
    assert rc == 2 and len(err) == 1 and "not a usae artifact" in err[0]
    assert sorted(tree(foreign)) == ["checkpoints/keep.txt", "notes.txt"]
    rc, err = cli(["train", store, "--out", foreign, "--steps", "2", "--overwrite", *TRAIN])
    assert rc == 0, err
    assert (foreign / "notes.txt").read_text() == "keep" and (
        foreign / "checkpoints/keep.txt"
    ).read_text() == "keep too"
    assert (foreign / "config.json").is_file() and not (foreign / LOCK_NAME).exists()


def test_failed_train_leaves_no_empty_out(store, tmp_path, cli):
    out = tmp_path / "new" / "run"
    rc, err = cli(["train", store, "--out", out, "--models", "zzz", *TRAIN])
    assert rc == 2 and "zzz" in err[0]
    assert not (tmp_path / "new").exists()


def test_resume_starts_a_run_when_there_is_none(store, tmp_path, caplog, cli):
    """The same command line for the first launch and every restart (Slurm requeue, spot instances)."""
    args = ["train", store, "--steps", "6", "--save-every", "3", "--seed", "1", *TRAIN]
    assert cli([*args, "--out", tmp_path / "ref"])[0] == 0
    with caplog.at_level("INFO"):
        assert cli([*args, "--out", tmp_path / "pre", "--resume"])[0] == 0
    assert "holds no run yet; starting one" in caplog.text
    # a second launch of the same command continues (here: the run is complete, nothing changes)
    model = (tmp_path / "pre/model.safetensors").read_bytes()
    assert cli([*args, "--out", tmp_path / "pre", "--resume"])[0] == 0
    assert (tmp_path / "pre/model.safetensors").read_bytes() == model
    ref, pre = load_tensors(tmp_path / "ref/model.safetensors"), load_tensors(tmp_path / "pre/model.safetensors")
    assert all(np.array_equal(ref[k].numpy(), pre[k].numpy()) for k in ref)
    assert (tmp_path / "ref/metrics.jsonl").read_text() == (tmp_path / "pre/metrics.jsonl").read_text()


def test_edited_out_in_config_json_is_refused_on_resume(store, tmp_path, cli):
    run = tmp_path / "run"
    args = ["train", store, "--out", run, "--steps", "6", "--save-every", "3", *TRAIN]
    assert cli(args)[0] == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["out"] == str(run) and cfg["store"]["path"] == str(store)
    for key, value in [("out", str(tmp_path / "elsewhere")), ("warmup_steps", 5)]:
        edited = {**cfg, "train": {**cfg["train"], key: value}}
        (run / "config.json").write_text(json.dumps(edited))
        rc, err = cli([*args[: -len(TRAIN)], "--steps", "9", "--resume", *TRAIN])
        assert rc == 2 and len(err) == 1 and f"train.{key}" in err[0] and "edited" in err[0], err
    (run / "config.json").write_text(json.dumps(cfg))
    assert cli([*args[: -len(TRAIN)], "--steps", "9", "--resume", *TRAIN])[0] == 0


# -- subprocesses: two writers, and a kill before config.json exists ----------------------------------
def _cmd(store: Path, out: Path, seed: int, steps: int = 150) -> list[str]:
    return [sys.executable, "-m", "usae", "train", str(store), "--out", str(out), "--n-latents", "64", "--k", "4",
            "--steps", str(steps), "--batch-size", "256", "--save-every", "10", "--seed", str(seed), "--no-progress"]  # fmt: skip


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, "the first writer ended before taking its lock"
        assert time.monotonic() < end
        time.sleep(0.001)


def _same_run(a: Path, b: Path) -> None:
    ta, tb = load_tensors(a / "model.safetensors"), load_tensors(b / "model.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert np.array_equal(ta[k].numpy(), tb[k].numpy()), k
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()


@pytest.mark.slow
def test_second_writer_is_refused_and_the_first_finishes_as_if_alone(store, tmp_path, cli):
    subprocess.run(_cmd(store, tmp_path / "solo", seed=1), env=ENV, check=True, capture_output=True)
    run = tmp_path / "run"
    first = subprocess.Popen(_cmd(store, run, seed=1), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for(run / LOCK_NAME, first)
    rc, err = cli(_cmd(store, run, seed=2)[3:])  # in-process: no start-up delay, the first still runs
    assert first.poll() is None, "the first writer finished before the second started; make it longer"
    assert rc == 2 and len(err) == 1, err
    assert f"pid {first.pid}" in err[0] and "is being written by" in err[0]
    assert first.wait() == 0, first.stderr.read()[-2000:]
    _same_run(tmp_path / "solo", run)
    assert not (run / LOCK_NAME).exists()


@pytest.mark.slow
def test_kill_9_before_config_json_then_resume_is_bit_identical(store, tmp_path):
    subprocess.run(_cmd(store, tmp_path / "clean", seed=4, steps=40), env=ENV, check=True, capture_output=True)
    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(store, run, seed=4, steps=40) + ["--resume"], env=ENV, stderr=subprocess.DEVNULL)
    _wait_for(run / LOCK_NAME, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "config.json").exists()  # killed after the lock, before the run was written
    done = subprocess.run(_cmd(store, run, seed=4, steps=40) + ["--resume"], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    _same_run(tmp_path / "clean", run)
