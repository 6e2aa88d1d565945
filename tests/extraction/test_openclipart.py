"""The ``builtin:`` clip-art sources: folder labels at both levels, per-folder cap, duplicates, bombs."""

import logging
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from usae.extraction import builtin_images as bi
from usae.extraction import images as images_module
from usae.extraction.images import FileImages, load_rgb, open_oriented, reopen
from usae.extraction.labels import image_labels


def _files(listing) -> FileImages:
    return FileImages(listing.paths, None, listing.description)


def _png(path, seed, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgba = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(path)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb(path, side=20_000):
    """A PNG whose header claims side² pixels (400 Mpx: over twice PIL's limit) and holds no pixels."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IEND", b""))


@pytest.fixture
def clipart(tmp_path):
    """A tree shaped like /usr/share/openclipart/png: top folders, subfolders, deeper icon themes."""
    root = tmp_path / "png"
    _png(root / "animals/mammals/bear.png", 1)
    _png(root / "animals/mammals/wombat.png", 2)
    _png(root / "animals/birds/penguin/tux.png", 3)  # deeper: labelled animals/birds
    _png(root / "food/loaf.png", 4)  # directly in a top folder: labelled food
    for theme in ("crystal", "nuvola"):
        for i in range(5):
            _png(root / f"computer/icons/{theme}/icon{i}.png", 10 + i + (5 if theme == "nuvola" else 0))
    (root / "computer/icons/copy.png").write_bytes((root / "computer/icons/crystal/icon0.png").read_bytes())
    _bomb(root / "signs_and_symbols/stop_sign.png")
    return root


def test_openclipart_labels_both_levels_caps_folders_and_skips_a_bomb_in_one_line(clipart, caplog):
    with caplog.at_level(logging.WARNING):
        images = _files(bi.openclipart_listing(clipart, cap=3))
    bombs = [r.getMessage() for r in caplog.records if "stop_sign" in r.getMessage() or "skipped" in r.getMessage()]
    assert len(bombs) == 1 and "skipped 1 files" in bombs[0] and "1 over" in bombs[0]
    rel = [str(Path(i).relative_to(clipart)) for i in images.ids]
    assert "signs_and_symbols/stop_sign.png" not in rel and "computer/icons/copy.png" not in rel
    labels = dict(zip(rel, image_labels(images, "folders"), strict=True))
    assert labels["animals/mammals/bear.png"] == ["animals/mammals"]  # naming scores the parent "animals" too
    assert labels["animals/birds/penguin/tux.png"] == ["animals/birds"]
    assert labels["food/loaf.png"] == ["food"]
    icons = [r for r in rel if r.startswith("computer/icons/")]
    assert len(icons) == 3 and {lb[0] for r, lb in labels.items() if r in icons} == {"computer/icons"}
    again = _files(bi.openclipart_listing(clipart, cap=3))
    assert again.ids == images.ids == sorted(images.ids)  # deterministic, in path order
    reopened = reopen(images.describe())
    assert reopened.ids == images.ids and image_labels(reopened, "folders") == image_labels(images, "folders")
    assert reopened.load(0).mode == "RGB"


def test_cap_keeps_its_choice_when_other_folders_change(clipart):
    paths = sorted(clipart.rglob("*.png"))
    chosen = [p for p in bi.capped(paths, clipart, 4) if "computer/icons" in p.as_posix()]
    fewer = [p for p in paths if "animals" not in p.as_posix()]
    assert [p for p in bi.capped(fewer, clipart, 4) if "computer/icons" in p.as_posix()] == chosen
    assert len(chosen) == 4


def test_large_source_labels_tuxpaint_and_clipart_at_both_levels(clipart, tmp_path, monkeypatch):
    tux = tmp_path / "stamps"
    _png(tux / "animals/mammals/cat.png", 40)
    _png(tux / "cartoon/skipped.png", 41)  # a drawing category the demo leaves out
    monkeypatch.setattr(bi, "TUXPAINT_STAMPS", tux)
    images = _files(bi.large_listing(clipart, cap=2))
    labels = dict(zip(images.ids, image_labels(images, "folders"), strict=True))
    assert labels[str(tux / "animals/mammals/cat.png")] == ["animals/mammals"]
    assert str(tux / "cartoon/skipped.png") not in labels
    assert labels[str(clipart / "animals/mammals/bear.png")] == ["animals/mammals"]
    assert labels[str(clipart / "food/loaf.png")] == ["food"]
    assert images.describe()["name"] == "large"


def test_a_file_over_the_bomb_limit_decodes_reduced_without_a_warning(tmp_path, monkeypatch):
    _png(tmp_path / "big.png", 5, size=(40, 40))  # 1,600 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1.6x the limit: PIL would warn, not refuse
    monkeypatch.setattr(images_module, "REDUCED_SIDE", 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        img = open_oriented(tmp_path / "big.png")
        rgb = load_rgb(tmp_path / "big.png")
    assert max(img.size) == 16 and img.mode == "RGBA" and rgb.size == (16, 16)
    assert bi.screen([tmp_path / "big.png"]).kept == [tmp_path / "big.png"]


def test_unknown_builtin_source_is_one_line():
    from usae.errors import UsaeError
    from usae.extraction.images import open_images

    with pytest.raises(UsaeError, match=r"builtin:nope: unknown .*demo, openclipart, large"):
        open_images("builtin:nope")


def test_missing_package_says_how_to_install(tmp_path):
    from usae.errors import UsaeError

    with pytest.raises(UsaeError, match="apt-get install openclipart-png"):
        bi.openclipart_listing(tmp_path / "absent")
