"""Extraction: paired rows, alignment through the whole pipeline, bad images, resume, torchrun."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from usae.config import ExtractConfig
from usae.data.store import open_store
from usae.errors import UsaeError
from usae.extraction.backbones import TorchBackbone
from usae.extraction.extract import extract, parts_dir_for, select_images
from usae.extraction.images import canonical_view, image_by_id, reopen

FAKES = ("fake:w16s8", "fake:w8s4i32")


def _write_images(folder: Path, n: int, size: tuple[int, int] = (48, 40)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        arr = (rng.random((size[1] + i % 3, size[0], 3)) * 255).astype(np.uint8)
        path = folder / f"sub{i % 2}" / f"img{i:03d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def _cfg(images, out, **kw) -> ExtractConfig:
    base = dict(images=str(images), models=FAKES, out=out, device="cpu", images_per_part=3, batch_size=2)
    return ExtractConfig(**(base | kw))


def _arrays(store_dir: Path) -> dict[str, np.ndarray]:
    store = open_store(store_dir)
    return {n: store.rows(n, 0, len(store)) for n in store.model_names}


def test_extract_writes_paired_store_and_skips_corrupt_images(tmp_path, caplog):
    _write_images(tmp_path / "imgs", 7)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    out = extract(_cfg(tmp_path / "imgs", tmp_path / "store"))
    store = open_store(out)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["grid"] == [8, 8] and meta["tokens_per_image"] == 64
    assert len(meta["image_ids"]) == 7 and "broken.jpg" not in meta["image_ids"]
    assert meta["image_ids"] == sorted(meta["image_ids"]) and meta["image_ids"][0] == "sub0/img000.png"
    assert meta["extra"]["skipped_images"] == ["broken.jpg"]
    assert [b["name"] for b in meta["extra"]["backbones"]] == ["w16s8", "w8s4i32"]
    assert len(store) == 7 * 64 and meta["dtype"] == "float16"
    assert any("broken.jpg" in r.message for r in caplog.records)
    assert not parts_dir_for(out).exists()
    # rows are the backbone's tokens of that image (row j*t + k = image j, token k)
    from usae.extraction.backbones import load_backbone

    images = reopen(meta["extra"]["images"])
    b = load_backbone("fake:w16s8")
    view = canonical_view(image_by_id(images, meta["image_ids"][3]), meta["extra"]["view_size"]).copy()
    with torch.no_grad():
        want = b.tokens(torch.from_numpy(view).permute(2, 0, 1)[None].float() / 255, (8, 8))[0].numpy()
    got = store.rows("w16s8", 3 * 64, 4 * 64)
    assert np.allclose(got, want, atol=2e-3 * (1 + np.abs(want)))
    with pytest.raises(UsaeError, match="already exists"):
        extract(_cfg(tmp_path / "imgs", tmp_path / "store"))


def test_bright_corner_is_the_same_row_in_every_model(tmp_path):
    """Two models with different patch sizes: the bright corner is token 0 of the same image in both."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, corner in enumerate([(0, 0), (1, 1)]):  # top-left, bottom-right quadrant of a 4x4-ish grid
        arr = np.zeros((64, 64, 3), np.uint8)
        r, c = corner
        arr[r * 48 : r * 48 + 16, c * 48 : c * 48 + 16] = 255
        Image.fromarray(arr).save(folder / f"{i}.png")
    backbones = [
        TorchBackbone(nn.AvgPool2d(p), f"pool{p}", 64, features=lambda m, x: m(x), mean=(0, 0, 0), std=(1, 1, 1))
        for p in (8, 16)
    ]
    out = extract(ExtractConfig(images=str(folder), models=(), out=tmp_path / "s", dtype="float32"), backbones)
    store = open_store(out)
    assert json.loads((out / "metadata.json").read_text())["grid"] == [4, 4]
    for name in store.model_names:
        x = store.rows(name, 0, len(store))[:, 0].reshape(2, 16)
        assert x[0].argmax() == 0 and x[1].argmax() == 15


def test_extract_from_a_list_file_and_an_hf_dataset(tmp_path):
    paths = _write_images(tmp_path / "imgs", 4)
    list_path = tmp_path / "list.txt"
    list_path.write_text("\n".join(str(p.relative_to(tmp_path)) for p in reversed(paths)))
    a = extract(_cfg(list_path, tmp_path / "from_list", max_images=3))
    ids = json.loads((a / "metadata.json").read_text())["image_ids"]
    assert [Path(i).name for i in ids] == ["img003.png", "img001.png", "img000.png"]  # order given, spread evenly

    datasets = pytest.importorskip("datasets")
    in_folder_order = sorted(paths, key=lambda p: p.relative_to(tmp_path / "imgs").as_posix())
    ds = datasets.Dataset.from_dict({"image": [str(p) for p in in_folder_order], "label": [0, 1, 0, 1]})
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "ds"))
    b = extract(_cfg(tmp_path / "ds", tmp_path / "from_ds"))
    meta = json.loads((b / "metadata.json").read_text())
    assert meta["image_ids"] == [f"train/{i}" for i in range(4)]
    folder = extract(_cfg(tmp_path / "imgs", tmp_path / "from_folder"))
    # the same pixels give the same rows whatever the source
    for name in ("w16s8", "w8s4i32"):
        assert np.array_equal(_arrays(b)[name], _arrays(folder)[name])


def test_select_images_spreads_evenly():
    assert select_images(10, None) == list(range(10))
    assert select_images(10, 3) == [0, 4, 9] or select_images(10, 3) == [0, 5, 9]
    with pytest.raises(UsaeError):
        select_images(10, 0)


def test_resume_after_simulated_crash_equals_clean_run(tmp_path, monkeypatch):
    _write_images(tmp_path / "imgs", 8)
    clean = extract(_cfg(tmp_path / "imgs", tmp_path / "clean"))

    import usae.extraction.extract as ex

    real_write = ex._write_part
    calls = []

    def crash_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies while computing part 2
        calls.append(args[1])
        real_write(*args, **kwargs)

    monkeypatch.setattr(ex, "_write_part", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        extract(_cfg(tmp_path / "imgs", tmp_path / "resumed"))
    parts = parts_dir_for(tmp_path / "resumed")
    assert sorted(p.name for p in parts.iterdir()) == ["part-00000", "part-00001", "plan.json"]
    assert not (tmp_path / "resumed").exists()
    monkeypatch.setattr(ex, "_write_part", real_write)
    with pytest.raises(UsaeError, match="different settings"):
        extract(_cfg(tmp_path / "imgs", tmp_path / "resumed", batch_size=3))
    resumed = extract(_cfg(tmp_path / "imgs", tmp_path / "resumed"))
    meta = [json.loads((p / "metadata.json").read_text()) for p in (clean, resumed)]
    assert meta[0]["hash"] == meta[1]["hash"] and meta[0]["image_ids"] == meta[1]["image_ids"]


@pytest.mark.slow  # three `usae extract` processes (one killed): ~15 s of process start-up on 2 cores
@pytest.mark.parametrize("sampling", [[], ["--tokens-per-image", "7", "--token-seed", "5"]], ids=["all", "subsampled"])
def test_kill_9_during_extraction_then_rerun_completes_identically(tmp_path, sampling):
    _write_images(tmp_path / "imgs", 60, size=(96, 80))
    args = ["--images", str(tmp_path / "imgs"), "--models", *FAKES, "--device", "cpu", *sampling]
    args += ["--images-per-part", "2", "--batch-size", "2", "--decode-threads", "1"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "usae", "extract", *args]
    subprocess.run([*cmd, "--out", str(tmp_path / "clean")], check=True, env=env, capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = parts_dir_for(killed)
    deadline = time.monotonic() + 120
    while not (parts / "part-00003").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "extraction finished before it could be killed"
    assert not (killed / "metadata.json").exists()
    subprocess.run([*cmd, "--out", str(killed)], check=True, env=env, capture_output=True, timeout=300)
    a, b = (json.loads((p / "metadata.json").read_text()) for p in (tmp_path / "clean", killed))
    assert a["hash"] == b["hash"] and a["stats"] == b["stats"] and a.get("token_positions") == b.get("token_positions")
    assert a["tokens_per_image"] == (7 if sampling else 64)
    assert not parts.exists()


@pytest.mark.slow  # three Python processes (an extract, then torchrun's two ranks): ~15 s of start-up
def test_torchrun_two_processes_equal_one(tmp_path):
    _write_images(tmp_path / "imgs", 9)
    args = ["--images", str(tmp_path / "imgs"), "--models", *FAKES, "--device", "cpu", "--images-per-part", "2"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(
        [sys.executable, "-m", "usae", "extract", *args, "--out", str(one)],
        check=True,
        env=env,
        timeout=300,
        capture_output=True,
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    out = subprocess.run(
        [*torchrun, "-m", "usae", "extract", *args, "--out", str(two)],
        env=env,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = (json.loads((p / "metadata.json").read_text()) for p in (one, two))
    assert a["hash"] == b["hash"] and a["image_ids"] == b["image_ids"] and a["n_rows"] == 9 * 64


def test_nan_or_float16_overflow_stops_with_the_model_and_image_named(tmp_path):
    _write_images(tmp_path / "imgs", 3)

    def backbone(scale: float) -> TorchBackbone:
        return TorchBackbone(nn.AvgPool2d(16), "loud", 64, features=lambda m, x: m(x) * scale)

    cfg = ExtractConfig(images=str(tmp_path / "imgs"), models=(), out=tmp_path / "s", device="cpu")
    with pytest.raises(UsaeError, match=r"model loud: values beyond float16 range .* image sub0/img000.png"):
        extract(cfg, [backbone(1e6)])
    cfg = ExtractConfig(images=str(tmp_path / "imgs"), models=(), out=tmp_path / "t", device="cpu")
    with pytest.raises(UsaeError, match="model loud: NaN/inf"):
        extract(cfg, [backbone(float("nan"))])
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()
    ok = extract(dataclasses.replace(cfg, out=tmp_path / "u", dtype="float32"), [backbone(1e6)])
    assert open_store(ok).rows("loud", 0, 1).max() > 1e5


def test_bad_extract_settings_are_one_line_errors(tmp_path):
    for field, value in (("batch_size", 0), ("images_per_part", 0), ("grid", 0), ("max_images", 0)):
        with pytest.raises(UsaeError, match=f"extract config: invalid {field}={value}"):
            _cfg(tmp_path, tmp_path / "s", **{field: value})


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _dirs(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir()}


@pytest.mark.parametrize("alias", ["{dir}/victim", "../../evil", "a/../../evil"])
def test_unsafe_alias_is_refused_before_anything_is_written(tmp_path, capsys, alias):
    from usae.__main__ import main

    _write_images(tmp_path / "work" / "imgs", 2)
    victim_dir = tmp_path / "work" / "DIR"
    victim_dir.mkdir()
    (victim_dir / "victim.npy").write_bytes(b"precious bytes")
    before, dirs_before = _files(tmp_path), _dirs(tmp_path)
    spec = alias.format(dir=victim_dir) + "=fake:w16s8"
    out = tmp_path / "work" / "deep" / "st2"
    argv = ["extract", "--images", str(tmp_path / "work" / "imgs"), "--max-images", "2", "--models", spec]
    assert main([*argv, "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a safe directory name" in err[0] and repr(alias.format(dir=victim_dir)) in err[0]
    assert _files(tmp_path) == before and _dirs(tmp_path) == dirs_before  # victim intact, no --out, no parts


def test_out_at_the_root_is_one_line_and_writes_nothing(tmp_path, capsys):
    from usae.__main__ import main

    _write_images(tmp_path / "imgs", 2)
    argv = ["extract", "--images", str(tmp_path / "imgs"), "--models", "fake:w8s4", "--device", "cpu"]
    assert main([*argv, "--out", "/"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("usae: error: --out /: refusing to write into the file-system root")
    assert not Path("/.parts").exists() and not Path("/.partial").exists()


def test_out_that_is_a_foreign_directory_is_refused_untouched(tmp_path, capsys):
    from usae.__main__ import main

    _write_images(tmp_path / "imgs", 2)
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("years of work")
    argv = ["extract", "--images", str(tmp_path / "imgs"), "--models", "fake:w8s4", "--device", "cpu"]
    before = _files(tmp_path)
    for extra in ([], ["--overwrite"]):
        assert main([*argv, "--out", str(foreign), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not a usae artifact" in err[0]
        assert _files(tmp_path) == before and not parts_dir_for(foreign).exists()


def test_an_empty_out_directory_becomes_the_store(tmp_path):
    _write_images(tmp_path / "imgs", 2)
    (tmp_path / "made").mkdir()
    out = extract(_cfg(tmp_path / "imgs", tmp_path / "made", progress=False))
    assert out == tmp_path / "made" and len(open_store(out)) == 2 * 64


def test_held_out_twin_is_checked_before_extracting(tmp_path, capsys):
    from usae.__main__ import main

    _write_images(tmp_path / "imgs", 4)
    twin = tmp_path / "store-val"
    twin.mkdir()
    (twin / "notes.txt").write_text("mine")
    argv = ["extract", "--images", str(tmp_path / "imgs"), "--models", "fake:w8s4", "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "store"), "--val-fraction", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "held-out store" in err[0] and "not a usae artifact" in err[0]
    assert not (tmp_path / "store").exists() and not parts_dir_for(tmp_path / "store").exists()
    assert (twin / "notes.txt").read_text() == "mine"


def test_failed_extraction_leaves_no_empty_directories(tmp_path):
    _write_images(tmp_path / "imgs", 3)
    bad = TorchBackbone(nn.AvgPool2d(16), "nan", 64, features=lambda m, x: m(x) * float("nan"))
    cfg = ExtractConfig(images=str(tmp_path / "imgs"), models=(), out=tmp_path / "a" / "b" / "s", device="cpu")
    with pytest.raises(UsaeError, match="NaN"):
        extract(cfg, [bad])
    assert not (tmp_path / "a").exists()


def test_progress_flag_shows_or_hides_the_bar(tmp_path, capsys):
    from usae.__main__ import main

    _write_images(tmp_path / "imgs", 3)
    argv = ["extract", "--images", str(tmp_path / "imgs"), "--models", "fake:w8s4", "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert "extract: 100%" in capsys.readouterr().err  # shown even when stderr is not a terminal
    assert main([*argv, "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert "extract:" not in capsys.readouterr().err


def test_files_that_are_not_images_are_counted_in_one_line(tmp_path, caplog):
    _write_images(tmp_path / "imgs", 2)
    for i in range(24):
        (tmp_path / "imgs" / f"icon{i}.svg").write_text("<svg/>")
    (tmp_path / "imgs" / "README").write_text("about")
    extract(_cfg(tmp_path / "imgs", tmp_path / "s", progress=False))
    said = [r.getMessage() for r in caplog.records if "not images" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("skipped 25 files that are not images (.svg 24, (no extension) 1)")
