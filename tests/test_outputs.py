"""Outputs that cannot escape or clobber, special files, bounded configs, one-line parse errors (docs/reliability.md §8)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from usae.__main__ import main
from usae.data.store import write_store
from usae.errors import UsaeError
from usae.run import load

TRAIN = ["--n-latents", "16", "--k", "2", "--batch-size", "128", "--steps", "6", "--save-every", "3", "--no-progress"]


@pytest.fixture(scope="module")
def world_template(tmp_path_factory) -> Path:
    """Two stores and a run trained on the first, made once for the module (each test gets a copy)."""
    root = tmp_path_factory.mktemp("outputs")
    rng = np.random.default_rng(0)
    write_store(root / "store", {"a": rng.normal(size=(1200, 8)), "b": rng.normal(size=(1200, 12))})
    write_store(root / "other", {"a": rng.normal(size=(600, 8)), "b": rng.normal(size=(600, 12))})
    assert main(["train", str(root / "store"), "--out", str(root / "run"), *TRAIN]) == 0
    return root


@pytest.fixture
def world(world_template, tmp_path) -> Path:
    """tmp_path holding a copy of the template's stores and run, for the test to change."""
    shutil.copytree(world_template, tmp_path, dirs_exist_ok=True)
    return tmp_path


def one_line(rc: int, err: list[str], *needles: str) -> None:
    assert rc == 2 and len(err) == 1 and err[0].startswith("usae: error:"), err
    for needle in needles:
        assert needle in err[0], err


def test_export_refuses_the_run_and_existing_directories(world, cli, tree):
    before = tree(world)
    run = world / "run"
    one_line(*cli(["export", run, "--out", run]), "is the input")
    one_line(*cli(["export", run, "--out", run / "sub"]), "lies inside the input")
    one_line(*cli(["export", run, "--out", world / "store", "--overwrite"]), "holds a usae-store")
    (world / "mine").mkdir()
    (world / "mine" / "notes.txt").write_text("keep")
    one_line(*cli(["export", run, "--out", world / "mine", "--overwrite"]), "not a usae artifact")
    assert tree(world) == {**before, "mine/notes.txt": b"keep"}
    # resumability survives: the run still resumes
    assert main(["train", str(world / "store"), "--out", str(run), *TRAIN, "--resume"]) == 0
    # an existing pretrained directory needs --overwrite, then is replaced
    assert main(["export", str(run), "--out", str(world / "pre")]) == 0
    one_line(*cli(["export", run, "--out", world / "pre"]), "--overwrite")
    assert main(["export", str(run), "--out", str(world / "pre"), "--overwrite", "--dtype", "float16"]) == 0
    assert json.loads((world / "pre/config.json").read_text())["dtype"] == "float16"


def test_failed_export_and_evaluate_leave_no_empty_out(world, cli, monkeypatch):
    rng = np.random.default_rng(1)
    write_store(world / "wide", {"a": rng.normal(size=(300, 5)), "b": rng.normal(size=(300, 12))})
    # fails after the output directory was made: a store whose widths are not the run's
    one_line(*cli(["evaluate", world / "run", world / "wide", "--out", world / "y" / "rep", "--no-progress"]))

    def disk_full(path, *args, **kwargs):
        raise UsaeError(f"{path}: could not write (No space left on device)")

    monkeypatch.setattr("usae.interop.hub.save_tensors_atomic", disk_full)
    one_line(*cli(["export", world / "run", "--out", world / "x" / "pre"]), "No space left")
    assert not (world / "x").exists() and not (world / "y").exists()


def test_evaluate_never_writes_into_a_store(world, cli, tree):
    before = tree(world)
    one_line(*cli(["evaluate", world / "run", world / "store", "--out", world / "store"]), "is the input")
    one_line(*cli(["evaluate", world / "run", world / "store", "--out", world / "other"]), "usae-store")
    assert tree(world) == before


def test_export_finds_a_multi_store_report(world):
    assert main(["evaluate", str(world / "run"), str(world / "store"), str(world / "other"), "--no-progress"]) == 0
    assert not (world / "run/report.json").exists() and (world / "run/report-store.json").is_file()
    assert main(["export", str(world / "run"), "--out", str(world / "pre")]) == 0
    metrics = json.loads((world / "pre/config.json").read_text())["metrics"]
    # the store it was not trained on is preferred for the card
    report = json.loads((world / "run/report-other.json").read_text())
    assert metrics["measured_on"]["held_out"] is True
    assert metrics["r2_self_mean"] == report["r2_self_mean"]
    assert metrics["measured_on"]["store"] == report["store"]["path"]
    assert "No evaluation report" not in (world / "pre/README.md").read_text()


def test_verify_refuses_a_fifo_shard_within_a_second(world, cli):
    shard = next((world / "store" / "a").glob("shard-*.npy"))
    shard.unlink()
    os.mkfifo(shard)
    result = {}

    def go():
        result["out"] = cli(["verify", world / "store"])

    thread = threading.Thread(target=go, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(timeout=5)
    assert not thread.is_alive(), "usae verify blocked on a FIFO"
    assert time.monotonic() - start < 1.0
    one_line(*result["out"], shard.name, "FIFO, not a regular file")


def test_verify_names_a_metadata_json_that_is_a_directory(world, cli):
    meta = world / "store" / "metadata.json"
    meta.unlink()
    meta.mkdir()
    one_line(*cli(["verify", world / "store"]), "metadata.json", "is a directory")


def test_an_enormous_config_is_refused_before_allocating(world, cli):
    cfg_path = world / "run" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["sae"]["n_latents"] = 1_000_000_000_000
    cfg_path.write_text(json.dumps(cfg))
    one_line(*cli(["evaluate", world / "run", world / "store", "--no-progress"]), "n_latents", "GiB")
    one_line(*cli(["train", world / "store", "--out", world / "big", "--n-latents", "10000000000000"]), "GiB")
    for flags in (["--batch-size", "1000000000000"], ["--n-latents", "30000000", "--k", "4"]):
        one_line(*cli(["train", world / "store", "--out", world / "big", *flags]), "one step of", "GiB")
    cfg["sae"]["n_latents"] = 16
    cfg_path.write_text(json.dumps(cfg))
    batch = ["--batch-size", "100000000000"]
    one_line(*cli(["evaluate", world / "run", world / "store", "--out", world / "rep", *batch]), "a batch of", "GiB")
    one_line(*cli(["maximize", world / "run", "--concept", "0", "--out", "/"]), "file-system root")
    assert not (world / "big").exists() and not (world / "rep").exists()


def test_parse_errors_are_one_line_and_help_is_whole(capsys, cli):
    for argv, needle in [
        (["train", "st", "--bogus", "1"], "Unrecognized options: --bogus"),
        (["train", "st", "--steps", "abc"], "--steps"),
        (["train"], "give a STORE, or --images"),
        (["bogus"], "unknown command 'bogus'"),
        ([], "no command given"),
    ]:
        rc, err = cli(argv)
        one_line(rc, err, needle)
        assert "--help" in err[0]
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0 and "--n-latents" in capsys.readouterr().out


def test_every_artifact_file_follows_the_umask(world):
    mask = os.umask(0o022)
    os.umask(mask)
    for p in (world / "run").rglob("*"):
        if p.is_file():
            assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p


def test_train_ends_with_where_the_run_is_its_r2_and_the_next_command(world, capsys):
    capsys.readouterr()
    assert main(["train", str(world / "store"), "--out", str(world / "r2"), *TRAIN]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == f"run: {world / 'r2'}"
    assert out[1].startswith("R² on the first 1200 rows of the training store (in-sample): self ")
    self_r2 = float(out[1].split("self ")[1].split(",")[0])
    assert -1.0 < self_r2 < 1.0
    assert out[2] == f"next: usae evaluate {world / 'r2'} {world / 'store'}"
    assert "train/loss" not in "\n".join(out)


def test_a_run_is_usable_from_another_working_directory(world, monkeypatch):
    monkeypatch.chdir(world)
    assert main(["train", "store", "--out", "rel", *TRAIN]) == 0
    cfg = json.loads((world / "rel/config.json").read_text())
    assert cfg["store"]["path"] == str(world / "store") and cfg["store"]["path_as_given"] == "store"
    assert cfg["train"]["out"] == str(world / "rel")
    monkeypatch.chdir(world / "run")
    assert load(world / "rel").n_latents == 16
