"""`usae demo` end to end on small stand-ins (fake backbones, generated photos): every stage runs,
outputs land where the summary says, and a rerun skips the finished stages."""

import json

import numpy as np
from PIL import Image

from usae.__main__ import main


def test_demo_pipeline_on_fake_models(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--images", str(tmp_path), "--models", "fake:w16s8i64", "fake:w8s4i32"]
    args += ["--n-latents", "64", "--k", "4", "--steps", "40", "--batch-size", "128", "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "cross-reconstruction R²" in printed and "concepts: universal" in printed
    assert "measured on held-out images" in printed and "R² held-out vs in-sample" in printed
    assert "pixels labels (token level)" in printed and "shuffled labels 0" in printed
    assert "frontier point" in printed and "(random dictionary " in printed  # its random-dictionary control
    summary = json.loads((out / "summary.json").read_text())
    assert summary["explorer"] == str(out / "explorer" / "index.html") and (out / "explorer" / "index.html").is_file()
    assert (out / "run" / "report.md").is_file() and (out / "store" / "metadata.json").is_file()
    held_out = json.loads((out / "store-val" / "metadata.json").read_text())["image_ids"]
    trained = json.loads((out / "store" / "metadata.json").read_text())["image_ids"]
    assert len(held_out) == 3 and not set(held_out) & set(trained)  # a quarter of the 12 images
    assert summary["evaluated_on"] == str(out / "store-val") and (out / "run" / "labels.json").is_file()
    assert json.loads((out / "run" / "report.json").read_text())["store"]["path"] == str(out / "store-val")
    maximized = list((out / "run" / "maximize").glob("concept-*/panel.png"))
    assert len(maximized) == 1
    assert json.loads((out / "run" / "config.json").read_text())["train"]["steps"] == 40
    model_mtime = (out / "run" / "model.safetensors").stat().st_mtime_ns
    assert main(args) == 0  # rerun: store and run are reused, report and explorer rewritten
    assert (out / "run" / "model.safetensors").stat().st_mtime_ns == model_mtime
    assert json.loads((out / "summary.json").read_text())["timings"]["train_s"] < 5
