"""Hardening 3 (issue 24): no command deletes or misreports a user's data; new input surfaces fail in one line.

H1 (explore) and the explorer's labels.json are in tests/explorer/test_explore_inputs.py, H2, H5 and
extraction's inputs in tests/extraction/test_extract_inputs.py; the rest is here, on small synthetic
stores (docs/reliability.md §12 lists each guarantee with its test).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usae.__main__ import COMMANDS, main
from usae._io import LOCK_NAME, dir_lock, sibling_lock
from usae.data.store import StoreWriter, open_store, write_store
from usae.errors import UsaeError

TRAIN = ["--n-latents", "16", "--k", "2", "--batch-size", "128", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A store, a held-out store of the same widths, a two-model run (20 steps) and a one-model run."""
    root = tmp_path_factory.mktemp("hardening")
    rng = np.random.default_rng(0)
    write_store(root / "store", {"a": rng.normal(size=(1200, 8)), "b": rng.normal(size=(1200, 12))})
    write_store(root / "val", {"a": rng.normal(size=(600, 8)), "b": rng.normal(size=(600, 12))})
    assert main(["train", str(root / "store"), "--out", str(root / "run"), *TRAIN, "--steps", "20"]) == 0
    assert (
        main(["train", str(root / "store"), "--out", str(root / "one"), *TRAIN, "--steps", "6", "--models", "a"]) == 0
    )
    return root


@pytest.fixture
def world(template, tmp_path) -> Path:
    shutil.copytree(template, tmp_path, dirs_exist_ok=True)
    return tmp_path


def one_line(rc: int, err: list[str], *needles: str) -> str:
    assert rc == 2 and len(err) == 1 and err[0].startswith("usae: error:"), err
    for needle in needles:
        assert needle in err[0], err
    return err[0]


# -- H3: a lock file that is a symbolic link -----------------------------------------------------
@pytest.mark.parametrize("dangling", [False, True])
def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path, dangling):
    victim = tmp_path / "victim.txt"
    if not dangling:
        victim.write_bytes(b"years of notes\n")
    (tmp_path / "RUN").mkdir()
    locks = [tmp_path / "RUN" / LOCK_NAME, sibling_lock(tmp_path / "STORE")]
    for lock in locks:
        lock.symlink_to(victim)
        with pytest.raises(UsaeError, match="lock file is a symbolic link"), dir_lock(lock, "run"):
            pass
        assert lock.is_symlink()
    with pytest.raises(UsaeError, match="lock file is a symbolic link"):
        StoreWriter(tmp_path / "STORE", {"a": 4})  # the store writer's own lock
    assert not victim.exists() if dangling else victim.read_bytes() == b"years of notes\n"
    assert not (tmp_path / "STORE.partial").exists()


def test_train_into_a_run_whose_lock_is_a_symlink_is_one_line(world, cli):
    victim = world / "victim.txt"
    victim.write_bytes(b"precious")
    (world / "new").mkdir()
    (world / "new" / LOCK_NAME).symlink_to(victim)
    one_line(*cli(["train", world / "store", "--out", world / "new", *TRAIN, "--steps", "2"]), "symbolic link")
    assert victim.read_bytes() == b"precious" and not (world / "new" / "config.json").exists()


# -- H4: a report is tied to the weights it measured -----------------------------------------------
def test_export_refuses_a_report_of_older_weights(world, cli):
    """H4: evaluate at step 20, `train --resume` to step 40: the card showed step 20's numbers."""
    from usae.run import stale_report, weights_record

    run = world / "run"
    assert main(["evaluate", str(run), str(world / "store"), "--no-progress", "--no-report"]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["weights"] == weights_record(run) and report["weights"]["step"] == 20
    assert stale_report(run, report, run / "report.json") is None
    assert main(["train", str(world / "store"), "--out", str(run), *TRAIN, "--steps", "40", "--resume"]) == 0
    report_bytes = (run / "report.json").read_bytes()
    err = one_line(*cli(["export", run, "--out", world / "pre"]), "report.json", "step 20", "step 40", "usae evaluate")
    assert "other weights" in err and not (world / "pre").exists()
    assert (run / "report.json").read_bytes() == report_bytes
    assert main(["evaluate", str(run), str(world / "store"), "--no-progress", "--no-report"]) == 0
    assert main(["export", str(run), "--out", str(world / "pre")]) == 0  # measured again: exported


# -- item 7: one model, held-out vs in-sample ------------------------------------------------------
def test_one_model_evaluate_of_a_held_out_and_the_training_store(world, capsys):
    run = world / "one"
    assert main(["evaluate", str(run), str(world / "val"), str(world / "store"), "--no-progress"]) == 0
    card = (run / "report.md").read_text()
    assert "Held-out vs in-sample" in card
    reports = [json.loads((run / f"report-{s}.json").read_text()) for s in ("val", "store")]
    assert [r["store"]["trained_on"] for r in reports] == [False, True] and reports[0]["r2_cross_mean"] is None


# -- item 5: naming's minimum sizes in user terms -----------------------------------------------------
def test_naming_a_store_of_9_images_says_so_in_images(world, cli, caplog):
    rng = np.random.default_rng(2)
    labels = {"source": "folders", "per_image": [["cat"], ["dog"], ["cat"]] * 3}
    layout = dict(image_ids=[f"img{i}.png" for i in range(9)], tokens_per_image=4, grid=(2, 2))
    small = write_store(
        world / "small",
        {"a": rng.normal(size=(36, 8)), "b": rng.normal(size=(36, 12))},
        extra={"labels": labels},
        **layout,
    )
    err = one_line(*cli(["label", world / "run", small, "--no-progress", "--device", "cpu"]), "has 9 images")
    assert "naming needs at least --n-top 20" in err and "items" not in err
    with caplog.at_level(logging.INFO, "usae"):
        assert main(["evaluate", str(world / "run"), str(small), "--no-progress", "--out", str(world / "rep")]) == 0
    assert any("not naming the concepts" in r.getMessage() and "9 images" in r.getMessage() for r in caplog.records)


# -- item 8: maximize never writes into the run's store --------------------------------------------
def test_maximize_refuses_an_out_inside_the_runs_store(template, cli, tree):
    """The run records its store (absolute): maximize finds it without --store and refuses --out inside it."""
    store = template / "store"
    before = tree(store)
    one_line(*cli(["maximize", template / "run", "--concept", "0", "--out", store / "maxi"]), "lies inside the input")
    assert tree(store) == before
    assert not (store / "maxi").exists()


# -- surface 4: store statistics -------------------------------------------------------------------
@pytest.mark.parametrize("std", [0.0, -1.0, 1e300])
def test_an_edited_std_in_metadata_json_is_one_line(world, cli, std):
    meta_path = world / "store" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["stats"]["a"]["std"] = std
    meta_path.write_text(json.dumps(meta))
    for argv in (
        ["train", world / "store", "--out", world / "new", *TRAIN, "--steps", "2"],
        ["verify", world / "store"],
    ):
        one_line(*cli(argv), "metadata.json", "stats.a.std")
    assert not (world / "new").exists()


def test_verify_catches_statistics_edited_consistently(world, cli):
    """An edit that keeps the fields consistent (mean and scalar_mean together) passes opening, but
    not `usae verify`: the statistics derive from the shards the content hash covers."""
    meta_path = world / "store" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    s = meta["stats"]["b"]
    s["mean"] = [m + 1.0 for m in s["mean"]]
    s["scalar_mean"] = float(np.mean(s["mean"]))
    meta_path.write_text(json.dumps(meta))
    open_store(world / "store")
    one_line(*cli(["verify", world / "store"]), "stats.b.mean", "does not match the shard data")


# -- "Also": devices, codes, config.json, bounds ----------------------------------------------------
_DEVICE_ARGV = {
    "train": ["S", "--out", "O"],
    "evaluate": ["R", "S"],
    "label": ["R", "S"],
    "splice": ["R", "S"],
    "encode": ["R", "S", "--out", "O"],
    "extract": ["--images", "I", "--models", "fake:w8s4", "--out", "O"],
    "explore": ["R", "S", "--out", "O"],
    "maximize": ["R", "--concept", "0"],
    "baseline": ["R", "S"],
    "ablate": ["S"],
    "frontier": ["S"],
    "demo": [],
}


def _has_device(cls) -> bool:
    return any(f.name == "device" or (isinstance(f.type, type) and dataclasses.is_dataclass(f.type) and _has_device(f.type))
               for f in dataclasses.fields(cls))  # fmt: skip


@pytest.mark.parametrize("device", ["meta", "mps", "cuda:7"])
def test_an_unavailable_device_is_one_line_in_every_command(tmp_path, cli, device, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {c for c, (cls, _) in COMMANDS.items() if _has_device(cls) or c == "train"} <= set(_DEVICE_ARGV)
    for command, args in _DEVICE_ARGV.items():
        one_line(*cli([command, *args, "--device", device]), f"--device {device}")
    assert list(tmp_path.iterdir()) == []


def _codes(world: Path) -> Path:
    assert (
        main(["encode", str(world / "run"), str(world / "store"), "--out", str(world / "codes"), "--no-progress"]) == 0
    )
    return world / "codes"


def test_verify_codes_detects_bit_flips_and_out_of_range_indices(world, cli):
    codes = _codes(world)
    assert main(["verify", str(codes)]) == 0
    idx = codes / "a" / "indices-00000.npy"
    good = idx.read_bytes()
    data = bytearray(good)
    data[-3] ^= 0x10  # a flipped bit in the last index: still an int32
    idx.write_bytes(bytes(data))
    one_line(*cli(["verify", codes]), "indices-00000.npy", "sha256 mismatch")
    meta_path = codes / "metadata.json"
    meta = json.loads(meta_path.read_text())
    del meta["shard_sha256"]  # codes of an older usae: the values are still checked
    meta_path.write_text(json.dumps(meta))
    one_line(*cli(["verify", codes]), "indices-00000.npy", "outside [-1, 16)")
    idx.write_bytes(good)
    assert main(["verify", str(codes)]) == 0


def test_encode_k_and_maximize_size_are_bounded_before_allocating(world, cli):
    one_line(*cli(["encode", world / "run", world / "store", "--out", world / "c", "--k", "1000000000000"]), "--k")
    one_line(*cli(["maximize", world / "run", "--concept", "0", "--size", "100000"]), "invalid size=100000")
    one_line(
        *cli(["train", world / "store", "--out", world / "c", "--n-latents", "16", "--k", "10000000000"]), "k must be"
    )
    assert not (world / "c").exists()


@pytest.mark.parametrize(("key", "value"), [("train", "x"), ("store", 3), ("models", {"a": 1}), ("train", [1])])
def test_config_json_fields_of_the_wrong_type_are_one_line(world, cli, key, value):
    cfg_path = world / "run" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[key] = value
    cfg_path.write_text(json.dumps(cfg))
    for argv in (
        ["evaluate", world / "run", world / "store", "--no-progress", "--out", world / "rep"],
        ["train", world / "store", "--out", world / "run", *TRAIN, "--steps", "20", "--resume"],
        ["export", world / "run", "--out", world / "pre"],
    ):
        one_line(*cli(argv), "config.json", repr(key))


def test_import_official_refuses_keys_that_become_one_name(tmp_path, cli):
    pytest.importorskip("yaml")
    zoo = "".join(f"  {n}:\n    input_shape: 8\n    model_mean: 0.0\n    model_std: 1.0\n" for n in ("x.y", "x_y"))
    (tmp_path / "config.yaml").write_text(f"sae_params:\n  top_k: 2\nmodel_zoo:\n{zoo}")
    (tmp_path / "ckpt").mkdir()
    argv = ["import-official", tmp_path / "config.yaml", tmp_path / "ckpt", "--out", tmp_path / "run"]
    one_line(*cli(argv), "'x.y' and 'x_y'", "'x_y'")
    assert not (tmp_path / "run").exists()


def test_a_hand_edited_splice_json_is_one_line_in_evaluate(world, cli):
    splice = {"models": ["a", "b"], "task": {"a": "classifier", "b": None}, "available": {"a": True, "b": False}}
    splice |= {"matrices": {"agreement": [[0.9, None], ["high", None]]}, "controls": {}, "n_images": 4, "store": "s"}
    (world / "run" / "splice.json").write_text(json.dumps(splice))
    argv = ["evaluate", world / "run", world / "store", "--no-progress", "--out", world / "rep"]
    one_line(*cli(argv), "splice.json", "'matrices.agreement[1][0]' must be a number or null")


# -- the fuzzed readers: any bytes -> labels or one UsaeError ----------------------------------------
_FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_CSV_BYTES = st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from([*'ab,;"\n\r\t\x00é\ufeff', "img0.png", "sub/img1.png"]), max_size=30).map(
        lambda parts: "".join(parts).encode(
            ["utf-8", "utf-16", "latin-1", "utf-8-sig"][len(parts) % 4], errors="replace"
        )
    ),
)


@_FUZZ
@given(data=_CSV_BYTES)
def test_fuzzed_label_csv_gives_labels_or_one_usae_error(tmp_path, data):
    from usae.extraction.images import FileImages
    from usae.extraction.labels import image_labels

    images = FileImages(["img0.png", "sub/img1.png"], tmp_path, {"kind": "folder", "root": str(tmp_path)})
    path = tmp_path / "labels.csv"
    path.write_bytes(data)
    try:
        labels = image_labels(images, str(path))
    except UsaeError as e:
        assert "\n" not in str(e)
        return
    assert len(labels) == 2 and all(isinstance(lb, str) for ls in labels for lb in ls)


_JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6) | st.sampled_from(["0", "1", "a", "b"]), inner, max_size=4),
    max_leaves=20,
)  # fmt: skip


def _labels_like(value) -> dict:
    """A labels.json of `usae label` for models a, b with ``value`` planted somewhere."""
    scores = {"label": "red", "precision_at_n": 0.5, "lift": 2.0, "auroc": 0.9, "p_value": 0.01, "n": 5}
    entry = {"a": scores | {"significant": True}, "b": None, "agrees": True, "best": "red"}
    fam = {"level": "image", "labels": ["red"], "concepts": {"0": entry}, "summary": {"used": {"a": 1}}}
    return {"model_names": ["a", "b"], "families": {"dataset": fam}, "artifacts": {}, "_planted": value}


@_FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=200),
        _JSON_VALUE.map(lambda v: json.dumps(v).encode()),
        st.tuples(_JSON_VALUE, st.sampled_from(["families", "dataset", "concepts", "0", "a", "lift", "label", "significant", "summary", "used"])).map(
            lambda vk: json.dumps(_labels_like(vk[0])).replace(f'"{vk[1]}":', f'"{vk[1]}": {json.dumps(vk[0])}, "x{vk[1]}":', 1).encode()
        ),
    )
)  # fmt: skip
def test_fuzzed_labels_json_gives_labels_or_one_usae_error(tmp_path, data):
    from usae.evaluation.report.templating import format_number
    from usae.explorer.label_pages import all_label_names, label_scores, label_slugs, read_concept_labels

    path = tmp_path / "labels.json"
    path.write_bytes(data)
    try:
        labels = read_concept_labels(path, 4, ["a", "b"])
    except UsaeError as e:
        assert "\n" not in str(e)
        return
    if labels.scored:  # what the pages then read and format of it must not raise either
        slugs = label_slugs(all_label_names(labels.scored))
        for k in range(4):
            for fam in label_scores(labels.scored, k, ["a", "b"], slugs):
                summary = fam["info"]["summary"]
                cells = [summary[key] for key in ("shared", "agreed", "p_threshold")] + [fam["info"]["n_items"]]
                cells += [v for key in ("used", "named") for v in summary[key].values()]
                keys = ("label", "significant", "precision_at_n", "lift", "auroc", "p_value", "n")  # concept.html's
                cells += [r["s"][key] for r in fam["rows"] if r["s"] for key in keys[2:]]
                [r["s"][key] for r in fam["rows"] if r["s"] for key in keys[:2]]
                [format_number(v) for v in cells]


def test_the_fuzz_tests_see_both_outcomes(tmp_path):
    """Sanity: the seeds above reach the readers' success paths, not only their errors."""
    from usae.explorer.label_pages import read_concept_labels

    path = tmp_path / "labels.json"
    path.write_text(json.dumps(_labels_like(None)))
    assert read_concept_labels(path, 4, ["a", "b"]).scored is not None
    os.remove(path)
