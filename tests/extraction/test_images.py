"""Image sources and the canonical view."""

import numpy as np
import pytest
from PIL import Image

from usae.errors import UsaeError
from usae.extraction.images import (
    BadImage,
    canonical_view,
    demo_images,
    folder_images,
    image_by_id,
    load_rgb,
    open_images,
    reopen,
)


def test_rgba_is_flattened_onto_grey_and_view_is_the_centred_square(tmp_path):
    rgba = np.zeros((20, 40, 4), np.uint8)
    rgba[:, :, 0] = 255  # red where opaque
    rgba[:, 10:30, 3] = 255  # opaque only in the central 20 columns
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    img = load_rgb(tmp_path / "a.png")
    assert img.mode == "RGB" and img.size == (40, 20)
    assert tuple(np.asarray(img)[0, 0]) == (128, 128, 128)  # transparent -> grey
    view = canonical_view(img, 20)
    assert view.shape == (20, 20, 3) and view.dtype == np.uint8
    assert (view == (255, 0, 0)).all()  # the centred 20x20 square is exactly the opaque part
    assert canonical_view(img, 10).shape == (10, 10, 3)


def test_folder_order_ids_and_bad_files(tmp_path):
    for rel in ["b/2.png", "a/1.JPG", "c.webp", "z.bmp"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(
            tmp_path / rel, format={"png": "PNG", "JPG": "JPEG", "webp": "WEBP", "bmp": "BMP"}[rel.rsplit(".", 1)[1]]
        )
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "readme.md").write_text("skip me")
    images = folder_images(tmp_path)
    assert images.ids == ["a/1.JPG", "b/2.png", "bad.png", "c.webp", "z.bmp"]
    assert images.load(1).size == (8, 8)
    with pytest.raises(BadImage, match="bad.png"):
        images.load(2)
    again = reopen(images.describe())
    assert again.ids == images.ids and np.array_equal(
        np.asarray(image_by_id(again, "c.webp")), np.asarray(images.load(3))
    )


def test_open_images_specs_and_errors(tmp_path):
    with pytest.raises(UsaeError, match="not a folder"):
        open_images(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsaeError, match="no images"):
        open_images(str(tmp_path / "empty"))
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "list.txt").write_text("x.png\n\n")
    listed = open_images(str(tmp_path / "list.txt"))
    assert listed.ids == [str(tmp_path / "x.png")] and listed.describe()["kind"] == "paths"
    assert open_images([tmp_path / "x.png"]).ids == listed.ids


def test_builtin_demo_set_is_offline_and_deterministic():
    pytest.importorskip("skimage")
    a, b = demo_images(), open_images("builtin:demo")
    assert a.ids == b.ids and len(a) >= 10
    assert any(i.endswith("chelsea.png") for i in a.ids)
    assert a.load(0).mode == "RGB"


def test_exif_rotation_is_applied(tmp_path):
    arr = np.zeros((10, 30, 3), np.uint8)  # wide image, stored sideways with orientation 6 (90° CW)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_rgb(tmp_path / "r.jpg").size == (10, 30)


def test_alpha_crop_makes_a_cut_out_fill_the_view_and_is_recorded_for_reopening(tmp_path):
    from usae.extraction.images import alpha_cropped, load_source_image, reopen

    rgba = np.zeros((100, 100, 4), np.uint8)
    rgba[40:60, 30:70] = (255, 0, 0, 255)  # a 40×20 red cut-out in a transparent frame
    (tmp_path / "imgs").mkdir()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "imgs" / "stamp.png")
    plain = folder_images(tmp_path / "imgs")
    cropped = alpha_cropped(plain)
    red = lambda view: float(((view[..., 0] > 200) & (view[..., 1] < 50)).mean())  # noqa: E731
    assert red(canonical_view(plain.load(0), 32)) == pytest.approx(0.08, abs=0.02)  # 20% of rows x 40% of columns
    assert red(canonical_view(cropped.load(0), 32)) > 0.7  # the cut-out's height fills the square
    assert cropped.describe()["alpha_crop"] is True and reopen(cropped.describe()).alpha_crop
    view, alpha = load_source_image(cropped.describe(), "stamp.png", 32)
    assert alpha is not None and (alpha > 127).mean() > 0.7 and red(view) > 0.7
