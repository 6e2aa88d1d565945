"""`usae extract`'s inputs (issue 24): never deleted by --out, read in one line or counted as skipped.

Each test reproduces a defect of the outside attempt of 2026-12-07 on tiny images and `fake:` backbones:
the image folder deleted by --out, label CSVs in other encodings or with huge fields, a failed run
blocking the corrected one, a FIFO in an image list, a broken EXIF block, a stale held-out twin.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from usae.__main__ import main
from usae.config import ExtractConfig
from usae.data.store import open_store
from usae.errors import UsaeError
from usae.extraction.extract import extract, parts_dir_for, val_store_path
from usae.extraction.images import folder_images, open_images
from usae.extraction.labels import image_labels


def _images(folder: Path, n: int, sub: bool = True) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / (f"c{i % 2}" if sub else "") / f"img{i:02d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def _cfg(images, out, **kw) -> ExtractConfig:
    base = dict(images=str(images), models=("fake:w8s4",), out=out, device="cpu", images_per_part=2, progress=False)
    return ExtractConfig(**(base | kw))


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("usae: error: "), err
    assert all(n in err[0] for n in needles), err[0]
    return err[0]


ARGV = ["extract", "--models", "fake:w8s4", "--device", "cpu", "--no-progress"]


# -- H2: the image source and the label CSV are inputs --------------------------------------------
def test_out_around_the_image_folder_or_list_or_label_csv_is_refused(tmp_path, capsys):
    """H2: `extract --images OUT/imgs --out OUT --overwrite` deleted the image folder."""
    out = tmp_path / "OUT"
    paths = _images(out / "imgs", 4)
    assert extract(_cfg(out / "imgs", tmp_path / "first")).is_dir()
    first = _files(tmp_path / "first")
    (out / "metadata.json").write_bytes((tmp_path / "first" / "metadata.json").read_bytes())  # OUT looks like a store
    listed = tmp_path / "list.txt"
    listed.write_text("\n".join(str(p) for p in paths))
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "labels.csv").write_text("img00.png,cat\n")
    before = _files(tmp_path)
    cases = [
        (["--images", out / "imgs", "--out", out], "contains the input"),
        (["--images", listed, "--out", out], "contains the input"),  # a listed image's folder
        (["--images", out / "imgs", "--out", out / "imgs"], "contains the input"),
        (["--images", out / "imgs", "--out", out / "imgs" / "c0"], "contains the input"),  # a subfolder of images
        (
            ["--images", out / "imgs", "--out", tmp_path / "lab", "--labels", tmp_path / "lab" / "labels.csv"],
            "contains",
        ),
    ]
    for args, what in cases:
        assert main([*ARGV, *map(str, args), "--overwrite"]) == 2
        _one_line(capsys, what)
        assert _files(tmp_path) == before
    assert _files(tmp_path / "first") == first
    # beside the images, inside their folder, is fine: the store holds no image to delete
    assert extract(_cfg(out / "imgs", out / "imgs" / "store")).is_dir()
    assert {p.name for p in paths} <= {p.name for p in (out / "imgs").rglob("*.png")}


# -- surface 1: label CSVs in other encodings, long fields, bad rows --------------------------------
@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_label_csv_with_a_byte_order_mark_is_read(tmp_path, encoding):
    _images(tmp_path / "imgs", 2)
    csv = tmp_path / "labels.csv"
    csv.write_bytes("image,label\nc0/img00.png,été\nc1/img01.png,chat;chien\n".encode(encoding))
    assert encoding != "utf-16" or csv.read_bytes()[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
    assert image_labels(folder_images(tmp_path / "imgs"), str(csv)) == [["été"], ["chat", "chien"]]


def test_latin1_or_utf32_label_csv_is_one_line_naming_the_encoding(tmp_path, capsys):
    _images(tmp_path / "imgs", 2)
    for name, data in (("latin.csv", "c0/img00.png,été\n".encode("latin-1")), ("u32.csv", "a,b\n".encode("utf-32"))):
        (tmp_path / name).write_bytes(data)
        assert (
            main(
                [
                    *ARGV,
                    "--images",
                    str(tmp_path / "imgs"),
                    "--out",
                    str(tmp_path / "s"),
                    "--labels",
                    str(tmp_path / name),
                ]
            )
            == 2
        )
        _one_line(capsys, name, "UTF-8" if name == "latin.csv" else "UTF-32")
        assert not (tmp_path / "s").exists() and not parts_dir_for(tmp_path / "s").exists()


def test_a_1_mb_label_field_and_an_unclosed_quote(tmp_path):
    _images(tmp_path / "imgs", 2)
    images = folder_images(tmp_path / "imgs")
    big = tmp_path / "big.csv"
    big.write_text("c0/img00.png," + "x" * 1_000_000 + "\n")
    assert image_labels(images, str(big))[0] == ["x" * 1_000_000]
    quote = tmp_path / "quote.csv"
    quote.write_text('c0/img00.png,cat\nc1/img01.png,"dog\nc1/img03.png,cow\n')  # it swallowed line 3
    with pytest.raises(UsaeError, match=r"quote.csv:2: label file row does not parse"):
        image_labels(images, str(quote))


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_labels_naming_a_fifo_or_a_directory_says_what_it_is(tmp_path, capsys, kind):
    _images(tmp_path / "imgs", 2)
    target = tmp_path / "labels.csv"
    os.mkfifo(target) if kind == "fifo" else target.mkdir()
    assert main([*ARGV, "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "s"), "--labels", str(target)]) == 2
    _one_line(capsys, "labels.csv", "is a FIFO" if kind == "fifo" else "is a directory", "not a regular file")


# -- surface 2: bad input is refused before the plan; a plan with no part blocks nothing -----------
def test_a_failed_labels_run_then_the_corrected_command_succeeds(tmp_path, capsys):
    _images(tmp_path / "imgs", 4)
    bad = tmp_path / "labels.csv"
    bad.write_bytes("c0/img00.png,caf\xe9\n".encode("latin-1"))
    out = tmp_path / "store"
    argv = [*ARGV, "--images", str(tmp_path / "imgs"), "--out", str(out), "--images-per-part", "2"]
    assert main([*argv, "--labels", str(bad)]) == 2
    _one_line(capsys, "labels.csv", "not UTF-8")
    assert not parts_dir_for(out).exists() and not out.exists()
    assert main([*argv, "--labels", "folders"]) == 0  # the corrected command, nothing deleted by hand
    assert open_store(out).extra["labels"]["source"] == "folders"


def test_a_plan_that_wrote_no_part_does_not_block_other_settings(tmp_path, caplog):
    _images(tmp_path / "imgs", 3)
    out = tmp_path / "store"
    parts = parts_dir_for(out)
    parts.mkdir()
    (parts / "plan.json").write_text(json.dumps({"format": "usae-extract-plan", "labels": "old.csv"}))
    with caplog.at_level(logging.INFO):
        assert extract(_cfg(tmp_path / "imgs", out)) == out
    assert "finished no part" in caplog.text and not parts.exists()


# -- surface 3: special files among the images ----------------------------------------------------
def _within(seconds: float, fn, fifos: tuple[Path, ...] = ()):
    """``fn()``'s result, run in a daemon thread: a read that blocks on a FIFO fails the test, not hangs
    it (a writer opened on each of ``fifos`` then gives the blocked reader an end of file)."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for fifo in fifos:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        raise AssertionError(f"still blocked after {seconds} s (a FIFO was opened)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_a_fifo_in_an_image_list_or_folder_is_skipped_in_one_counted_line(tmp_path, caplog):
    paths = _images(tmp_path / "imgs", 2, sub=False)
    os.mkfifo(tmp_path / "imgs" / "pipe.png")
    listed = tmp_path / "list.txt"
    listed.write_text("\n".join([str(paths[0]), "imgs/pipe.png", "/dev/urandom", str(paths[1])]) + "\n")
    for source, n_special in ((listed, 2), (tmp_path / "imgs", 1)):
        caplog.clear()
        started = time.perf_counter()
        run = lambda source=source: extract(_cfg(source, tmp_path / f"s-{source.name}"))  # noqa: E731
        store = _within(20, run, fifos=(tmp_path / "imgs" / "pipe.png",))
        assert time.perf_counter() - started < 20
        said = [r.getMessage() for r in caplog.records if "not regular files" in r.getMessage()]
        assert len(said) == 1 and said[0].startswith(f"skipped {n_special} entries"), said
        assert len(open_store(store).image_ids) == 2


def test_an_image_list_that_is_a_fifo_is_one_line_at_once(tmp_path):
    os.mkfifo(tmp_path / "fifo.txt")
    with pytest.raises(UsaeError, match="image list is a FIFO, not a regular file"):
        _within(1, lambda: open_images(str(tmp_path / "fifo.txt")), fifos=(tmp_path / "fifo.txt",))


def test_a_webp_with_a_broken_exif_block_is_skipped_not_fatal(tmp_path, caplog):
    _images(tmp_path / "imgs", 2)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "imgs" / "bad.webp", exif=b"garbage")
    store = open_store(extract(_cfg(tmp_path / "imgs", tmp_path / "s")))
    assert "bad.webp" not in store.image_ids and store.extra["skipped_images"] == ["bad.webp"]
    assert "skipped 1 unreadable image(s) of 3" in caplog.text


# -- H5 and surface 9: the held-out twin -----------------------------------------------------------
def test_a_split_holding_out_nothing_removes_the_stale_twin_and_says_so(tmp_path, caplog, capsys):
    """H5: re-extracting with another seed that holds out 0 images left the old STORE-val in place."""
    _images(tmp_path / "imgs", 12)
    out = tmp_path / "store"
    extract(_cfg(tmp_path / "imgs", out, val_fraction=0.4))
    twin = val_store_path(out)
    assert open_store(twin).image_ids
    # without --overwrite the twin is refused like the store itself, untouched
    argv = [*ARGV, "--images", str(tmp_path / "imgs"), "--out", str(out), "--val-fraction", "0.05", "--val-seed", "1"]
    before = _files(twin)
    assert main(argv) == 2
    _one_line(capsys, "--overwrite")
    assert _files(twin) == before
    caplog.clear()
    assert main([*argv, "--overwrite"]) == 0
    assert not twin.exists() and len(open_store(out).image_ids) == 12
    assert not list(tmp_path.glob(".*stale*"))
    said = [r.getMessage() for r in caplog.records]
    assert sum("holds out 0 of 12 images" in m for m in said) == 1
    assert any("removed" in m and str(twin) in m for m in said)
    assert "split" not in open_store(out).extra


def test_a_store_named_like_a_twin_but_not_ours_is_left_alone(tmp_path):
    _images(tmp_path / "imgs", 4)
    other = extract(_cfg(tmp_path / "imgs", tmp_path / "store-val"))  # a store of its own, no split
    before = _files(other)
    extract(_cfg(tmp_path / "imgs", tmp_path / "store"))
    assert _files(other) == before


# -- "Also": specs and bounds --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--models", "fake:w16s0"], "stride"),
        (["--models", "fake:w0s4"], "width"),
        (["--grid", "100000"], "grid"),
        (["--view-size", "1000000"], "view_size"),
    ],
)
def test_zero_stride_and_huge_sizes_are_one_line(tmp_path, capsys, args, needle):
    _images(tmp_path / "imgs", 2)
    argv = ["extract", "--models", "fake:w8s4", "--device", "cpu", "--images", str(tmp_path / "imgs")]
    assert main([*argv, "--out", str(tmp_path / "s"), *args]) == 2
    _one_line(capsys, needle)
    assert not (tmp_path / "s").exists() and not parts_dir_for(tmp_path / "s").exists()
