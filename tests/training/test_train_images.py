"""Training with the backbones in the loop (``usae train --images``): the same rows as the store
``usae extract`` writes, the same training, resume, held-out images, torchrun, and what a run records."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from usae._io import load_tensors
from usae.config import ExtractConfig, TrainConfig
from usae.data.source import store_source
from usae.data.store import open_store
from usae.errors import UsaeError
from usae.extraction.extract import extract
from usae.extraction.stream import image_source
from usae.pipeline import train, train_command

FAKES = ("a=fake:w16s8", "b=fake:w8s4i32")
N_IMAGES = 40
SAE = dict(n_latents=32, k=4, batch_size=128, seed=1, device="cpu", progress=False, log_every=5)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        arr = (rng.random((36 + i % 5, 44, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img{i:03d}.png")
    return folder


def _extract(images: Path, out: Path, **kw) -> Path:
    cfg = ExtractConfig(images=str(images), models=FAKES, out=out, device="cpu", batch_size=8, progress=False, **kw)
    return extract(cfg)


def _from_images(images: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(images=str(images), models=FAKES, out=out, image_batch_size=8, **(SAE | kw))


def test_rows_and_statistics_equal_the_extracted_stores(images, tmp_path):
    """Row r is the same image and token as row r of the store ``usae extract`` writes with the same
    flags (float16, bit for bit), with and without --tokens-per-image; the statistics are the store's."""
    for kw in ({}, {"tokens_per_image": 5, "token_seed": 3}):
        store = open_store(_extract(images, tmp_path / f"store{len(kw)}", **kw))
        rows = image_source(_from_images(images, tmp_path / "unused", stats_images=N_IMAGES, **kw)).rows
        assert rows.n_rows == store.n_rows and rows.widths == store.widths and rows.dtype == store.dtype
        for name in store.model_names:
            assert np.array_equal(rows.rows(name, 0, rows.n_rows, dtype=None), store.rows(name, 0, store.n_rows, None))
            a, b = 7 * rows.n_rows // 40 + 3, rows.n_rows // 2 + 5  # bounds inside images
            assert np.array_equal(rows.rows(name, a, b), store.rows(name, a, b))
            idx = np.array([5, 0, rows.n_rows - 1, 5, rows.n_rows // 3])
            assert np.array_equal(rows.take(name, idx), store.take(name, idx))
            mine, theirs = rows.stats(name), store.stats(name)
            assert np.array_equal(mine.mean, theirs.mean) and np.array_equal(mine.var, theirs.var)
            assert mine.std == theirs.std and mine.scalar_mean == theirs.scalar_mean


def test_training_from_images_equals_training_from_the_store(images, tmp_path):
    """Same rows, order and statistics: the same run step for step (weights and metrics.jsonl)."""
    store = _extract(images, tmp_path / "store")
    from_store = train(TrainConfig(store=store, out=tmp_path / "s", steps=25, **SAE))
    from_images = train(_from_images(images, tmp_path / "i", steps=25, stats_images=N_IMAGES))
    a, b = from_store.sae.state_dict(), from_images.sae.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (tmp_path / "s/metrics.jsonl").read_text() == (tmp_path / "i/metrics.jsonl").read_text()


def test_config_records_images_and_backbones_and_resume_checks_them(images, tmp_path):
    shutil.copytree(images, tmp_path / "imgs")
    images = tmp_path / "imgs"
    cfg = _from_images(images, tmp_path / "run", steps=10, tokens_per_image=6, val_fraction=0.2, val_every=5)
    text = train_command(cfg)
    saved = json.loads((tmp_path / "run/config.json").read_text())
    recorded = saved["store"]
    assert recorded["kind"] == "images" and recorded["n_images"] == 32 and recorded["held_out"]["n_images"] == 8
    assert [b["spec"] for b in recorded["backbones"]] == list(FAKES)
    assert recorded["token_sampling"] == {"tokens_per_image": 6, "seed": 0} and recorded["grid"] == [8, 8]
    assert saved["train"]["images"] == str(images) and saved["train"]["models"] == list(FAKES)
    assert "preprocessing" in json.dumps(recorded["backbones"][0])
    records = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val/loss" in r] == [5, 10]  # held-out images validate
    assert "held-out images" in text and "time: backbones" in text and "bound this run" in text
    shutil.copy(images / "img000.png", images / "img999.png")  # another image set under the same flags
    with pytest.raises(UsaeError, match="are not the run's"):
        train(dataclasses.replace(cfg, steps=20, resume=True))


def test_bad_image_configs_are_one_line(images, tmp_path):
    with pytest.raises(UsaeError, match="give a STORE, or --images"):
        TrainConfig(store=tmp_path, images=str(images), models=FAKES)
    with pytest.raises(UsaeError, match="--images needs the backbones"):
        TrainConfig(images=str(images))
    with pytest.raises(UsaeError, match="not both"):
        TrainConfig(images=str(images), models=FAKES, val_images=str(images), val_fraction=0.1)


def _cmd(images: Path, out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "usae", "train", "--images", str(images), "--models", *FAKES, "--out", str(out),
            "--steps", str(steps), "--n-latents", "32", "--k", "4", "--batch-size", "128", "--save-every", "1",
            "--log-every", "5", "--device", "cpu", "--no-progress", "--image-batch-size", "8"]  # fmt: skip


@pytest.mark.slow  # four to five CLI processes: ~40 s on 2 cores
def test_kill_9_then_resume_from_images_is_bit_identical(images, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = 40
    began = time.monotonic()
    subprocess.run(_cmd(images, tmp_path / "ref", steps), env=env, check=True, capture_output=True)
    t_ref = time.monotonic() - began
    run, killed = tmp_path / "run", 0
    for frac in (0.55, 0.8):
        proc = subprocess.Popen([*_cmd(images, run, steps), "--resume"], env=env, stderr=subprocess.DEVNULL)
        time.sleep(frac * t_ref)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed += 1
        proc.wait()
    done = subprocess.run([*_cmd(images, run, steps), "--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert killed >= 1
    ref, got = load_tensors(tmp_path / "ref/model.safetensors"), load_tensors(run / "model.safetensors")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert (run / "metrics.jsonl").read_text() == (tmp_path / "ref/metrics.jsonl").read_text()


@pytest.mark.slow  # torchrun's two ranks and one reference process: ~30 s on 2 cores
def test_torchrun_two_processes_train_from_images(images, tmp_path):
    """Ranks run the backbones on disjoint chunks of the images; the run matches one process's closely
    (only the all-reduce's summation order differs: loss within 3 % at every logged step)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    one = subprocess.run(_cmd(images, tmp_path / "one", 20), env=env, capture_output=True, text=True, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    cmd = [*torchrun, *_cmd(images, tmp_path / "two", 20)[1:]]
    two = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    logs = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("one", "two")]
    assert [r["step"] for r in logs[1]] == [5, 10, 15, 20]
    for r1, r2 in zip(*logs, strict=True):
        assert r2["train/loss"] == pytest.approx(r1["train/loss"], rel=0.03)


def test_store_source_is_what_train_reads_from_a_store(images, tmp_path):
    """The store path and a held-out twin (extract --val-fraction) are found as before."""
    store = _extract(images, tmp_path / "store", val_fraction=0.25)
    source = store_source(store)
    assert source.held_out is not None and source.held_out.n_rows == 10 * 64
    assert source.info["hash"] == open_store(store).hash and "{run}" in source.next_hint
