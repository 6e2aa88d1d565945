"""``usae label`` end to end: images whose folder is their colour -> store -> USAE -> named concepts.

Red, blue and green images, each with some random shapes, sit in folders named by their colour. Two
seeded random CNNs see them; a small universal SAE is trained. Colour is the strongest signal a
random CNN carries, so concepts that fire on one colour's images must get that folder's name (image
level) and that colour term (token level, from the pixels), in both models — and shuffled labels
must name nothing.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import usae
from usae.config import EvalConfig, ExtractConfig, LabelConfig
from usae.errors import UsaeError
from usae.evaluation.evaluate import evaluate
from usae.evaluation.naming.label import NAMES_JSON, concept_names, format_labels, label
from usae.extraction.extract import extract, val_store_path

COLOURS = {"red": (220, 30, 30), "blue": (30, 40, 220), "green": (30, 180, 40)}


def _images(root: Path, per_colour: int = 30) -> Path:
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_colour):
            img = Image.new("RGB", (48, 48), tuple(int(c + rng.integers(-20, 20)) for c in rgb))
            draw = ImageDraw.Draw(img)
            for _ in range(2):
                x, y = (int(v) for v in rng.integers(0, 36, 2))
                draw.rectangle([x, y, x + 10, y + 10], fill=tuple(int(v) for v in rng.integers(90, 170, 3)))
            img.save(root / name / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("label-world")
    images = _images(root / "images")
    store = extract(
        ExtractConfig(
            images=str(images), models=("fake:w16s8i32", "fake:w8s4i32"), out=root / "store", labels="folders",
            val_fraction=0.25, device="cpu", dtype="float32",
        )
    )  # fmt: skip
    run = root / "run"
    usae.fit(usae.TrainConfig(store=store, out=run, n_latents=64, k=4, steps=200, batch_size=256, progress=False))
    return run, store


def test_label_names_colour_concepts_on_held_out_images_and_the_control_names_nothing(world, tmp_path):
    run, store = world
    val = val_store_path(store)
    result = label(
        LabelConfig(
            run=run, store=val, out=tmp_path, n_top=6, n_top_tokens=30, n_perm=1000, min_support=3, progress=False
        )
    )
    assert result["trained_on_this_store"] is False and result["store"]["n_images"] in (22, 23, 24)
    dataset, pixels = result["families"]["dataset"], result["families"]["pixels"]
    assert dataset["source"] == "folders" and dataset["level"] == "image" and set(dataset["labels"]) == set(COLOURS)
    agreed = {e["best"] for e in dataset["concepts"].values() if e["agrees"]}
    assert agreed and agreed <= set(COLOURS)
    assert sum(dataset["shuffled"]["named"].values()) == 0 and dataset["shuffled"]["agreed"] == 0
    # token level: colour terms from the pixels, agreeing in both models; the control names nothing
    colour_names = {e["best"] for e in pixels["concepts"].values() if e["agrees"]}
    assert colour_names & {f"colour/{c}" for c in COLOURS}
    assert pixels["shuffled"]["agreed"] == 0
    # every named concept's entry carries its score and chance level
    k, entry = next((k, e) for k, e in dataset["concepts"].items() if e["agrees"])
    for model in result["model_names"]:
        score = entry[model]
        assert score["label"] == entry["best"] and score["significant"] and 0 < score["p_value"] <= 0.05
        assert score["precision_at_n"] > 0.5 and score["lift"] > 1.5
    # artifact flags: shares in [0, 1] (or NaN for concepts that fire on too few tokens)
    flat = np.array(result["artifacts"][result["model_names"][0]]["flat_share"], dtype=float)
    assert np.nanmin(flat) >= 0 and np.nanmax(flat) <= 1
    assert (tmp_path / NAMES_JSON).is_file() and concept_names(result)[k].startswith(entry["best"])
    assert "shuffled labels" in format_labels(result)
    # report.md of a labelled store gets the concept-names section: evaluate runs `usae label` there
    reports = evaluate(EvalConfig(run=run, stores=(val,), out=tmp_path / "rep", label=False, progress=False))
    assert "## Concept names" not in (tmp_path / "rep" / "report.md").read_text()
    assert not (run / "labels.json").exists()
    evaluate(EvalConfig(run=run, stores=(val, store), out=tmp_path / "rep2", progress=False))
    auto = json.loads((run / "labels.json").read_text())
    assert auto["store"]["hash"] == result["store"]["hash"] and auto["store"]["split"] == "val"
    text = (tmp_path / "rep2" / "report.md").read_text()
    dataset_row = next(line for line in text.splitlines() if line.startswith("| dataset | image"))
    assert (
        dataset_row.endswith(f"| {auto['families']['dataset']['summary']['agreed']} | 0 |") and "Artifact marks" in text
    )
    assert reports[0]["store"]["trained_on"] is False


def test_label_refuses_a_store_without_the_runs_models(world, tmp_path):
    run, _ = world
    other = usae.write_store(tmp_path / "other", {"x": np.zeros((10, 4), np.float32)})
    with pytest.raises(UsaeError, match="lacks the run's models"):
        label(LabelConfig(run=run, store=other, out=tmp_path / "out", progress=False))
