"""Per-image labels in the store (folders, a Hugging Face label column, CSV) and the held-out split."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from usae.config import ExtractConfig
from usae.data.store import open_store
from usae.errors import UsaeError
from usae.extraction.extract import extract, val_store_path
from usae.extraction.images import folder_images
from usae.extraction.labels import image_labels, split_images

FAKES = ("fake:w8s8",)


def _images(root: Path, layout: dict[str, int]) -> list[Path]:
    """``layout``: folder (relative, may be nested) -> number of random images in it."""
    rng = np.random.default_rng(0)
    paths = []
    for folder, n in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            path = root / folder / f"img{i:02d}.png"
            Image.fromarray((rng.random((24, 24, 3)) * 255).astype(np.uint8)).save(path)
            paths.append(path)
    return paths


def _cfg(images, out, **kw) -> ExtractConfig:
    base = dict(images=str(images), models=FAKES, out=out, device="cpu", images_per_part=4, batch_size=4)
    return ExtractConfig(**(base | kw))


def test_folder_labels_are_stored_per_image_with_their_hierarchy(tmp_path):
    _images(tmp_path / "imgs", {"animals/marsupials": 3, "animals/birds": 2, "vehicles": 2, ".": 1})
    store = open_store(extract(_cfg(tmp_path / "imgs", tmp_path / "store", labels="folders")))
    labels = dict(zip(store.image_ids, store.extra["labels"]["per_image"], strict=True))
    assert store.extra["labels"]["source"] == "folders"
    assert labels["animals/marsupials/img00.png"] == ["animals/marsupials"]
    assert labels["vehicles/img01.png"] == ["vehicles"] and labels["img00.png"] == []
    plain = open_store(extract(_cfg(tmp_path / "imgs", tmp_path / "plain")))
    assert "labels" not in plain.extra  # stores without labels keep working


def test_csv_labels_multi_label_and_a_bad_row_names_its_line(tmp_path):
    _images(tmp_path / "imgs", {"a": 2, "b": 2})
    images = folder_images(tmp_path / "imgs")
    good = tmp_path / "labels.csv"
    good.write_text("image,label\na/img00.png,cat;pet\nimg01.png,dog\nb/img00.png,car\n")
    # by id, by unique file name (img01.png is in both folders: not unique, so only ids match it)
    assert image_labels(images, str(good)) == [["cat", "pet"], [], ["car"], []]
    bad = tmp_path / "bad.csv"
    bad.write_text("a/img00.png,cat\nb/img00.png\n")
    with pytest.raises(UsaeError, match=r"bad.csv:2: expected 'image,label"):
        image_labels(images, str(bad))


def test_hf_dataset_label_column_gives_class_names(tmp_path):
    datasets = pytest.importorskip("datasets")
    paths = _images(tmp_path / "imgs", {"x": 4})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    ds = datasets.Dataset.from_dict({"image": [str(p) for p in paths], "label": [0, 1, 1, 0]}, features=features)
    ds.save_to_disk(str(tmp_path / "ds"))
    store = open_store(extract(_cfg(tmp_path / "ds", tmp_path / "store", labels="hf")))
    assert store.extra["labels"]["per_image"] == [["cat"], ["dog"], ["dog"], ["cat"]]
    with pytest.raises(UsaeError, match="no column 'species'"):
        extract(_cfg(tmp_path / "ds", tmp_path / "store2", labels="hf", label_column="species"))


def test_held_out_split_is_disjoint_by_image_stratified_and_deterministic(tmp_path):
    _images(tmp_path / "imgs", {"a": 10, "b": 6})
    out = extract(_cfg(tmp_path / "imgs", tmp_path / "store", labels="folders", val_fraction=0.5, val_seed=3))
    train, val = open_store(out), open_store(val_store_path(out))
    assert set(train.image_ids).isdisjoint(val.image_ids)
    assert sorted(train.image_ids + val.image_ids) == sorted(folder_images(tmp_path / "imgs").ids)
    assert sum(i.startswith("a/") for i in val.image_ids) == 5 and sum(i.startswith("b/") for i in val.image_ids) == 3
    assert train.extra["split"]["name"] == "train" and val.extra["split"]["other"] == str(out)
    t = train.tokens_per_image
    assert len(val.extra["labels"]["per_image"]) == len(val.image_ids) and train.n_rows == len(train.image_ids) * t
    # the same rows as an unsplit extraction, routed by whole image
    whole = open_store(extract(_cfg(tmp_path / "imgs", tmp_path / "whole")))
    name = whole.model_names[0]
    for split in (train, val):
        j = len(split.image_ids) - 1
        row = whole.image_ids.index(split.image_ids[j])
        np.testing.assert_array_equal(split.rows(name, j * t, (j + 1) * t), whole.rows(name, row * t, (row + 1) * t))
    again = extract(_cfg(tmp_path / "imgs", tmp_path / "again", labels="folders", val_fraction=0.5, val_seed=3))
    assert open_store(val_store_path(again)).image_ids == val.image_ids
    assert json.loads((out / "metadata.json").read_text())["extra"]["split"]["val_fraction"] == 0.5


def test_split_images_known_answers():
    labels = [["a"]] * 8 + [["b"]] * 4
    held = split_images(labels, 12, 0.25, seed=0)
    assert held[:8].sum() == 2 and held[8:].sum() == 1
    assert (split_images(labels, 12, 0.25, seed=0) == held).all()
    assert not split_images(None, 5, 0.0, seed=0).any()
    with pytest.raises(UsaeError, match="val-fraction"):
        split_images(None, 5, 1.0, seed=0)
