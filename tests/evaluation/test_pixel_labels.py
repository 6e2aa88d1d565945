"""Pixel labels: colour terms, brightness, texture, position and foreground of known synthetic views."""

from __future__ import annotations

import numpy as np
import pytest

from usae.errors import UsaeError
from usae.evaluation.naming import pixels as pl


def solid(rgb: tuple[int, int, int], size: int = 32) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (size, size, 3)).copy()


def grey(values_hw: np.ndarray) -> np.ndarray:
    return np.repeat(np.clip(values_hw, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def names_of(view: np.ndarray, grid: tuple[int, int] = (1, 1), alpha: np.ndarray | None = None) -> list[set[str]]:
    out = pl.pixel_labels(view, grid, alpha)
    return [{n for n, on in zip(out.names, row, strict=True) if on} for row in out.labels_tl]


def group(names: set[str], prefix: str) -> set[str]:
    return {n for n in names if n.startswith(prefix + "/")}


def test_label_order_is_fixed():
    assert len(pl.PIXEL_LABELS) == 21
    assert pl.PIXEL_LABELS[:11] == tuple(f"colour/{c}" for c in pl.COLOURS)
    assert pl.PIXEL_LABELS[11:] == (
        "brightness/dark", "brightness/mid", "brightness/bright", "texture/flat", "texture/edge",
        "texture/textured", "position/border", "position/centre", "fg/foreground", "fg/background",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("rgb", "colour", "brightness"),
    [
        ((255, 0, 0), "red", "dark"),  # luma 76
        ((0, 0, 0), "black", "dark"),
        ((255, 255, 255), "white", "bright"),
        ((128, 128, 128), "grey", "mid"),
        ((120, 70, 20), "brown", "dark"),
        ((210, 180, 140), "brown", "bright"),  # tan: dull light orange
        ((255, 170, 200), "pink", "bright"),
        ((255, 182, 193), "pink", "bright"),  # light pink sits in the red hue band
        ((255, 140, 0), "orange", "mid"),
        ((255, 255, 0), "yellow", "bright"),
        ((0, 160, 0), "green", "mid"),
        ((0, 0, 255), "blue", "dark"),
        ((128, 0, 128), "purple", "dark"),
        ((40, 0, 0), "black", "dark"),  # too dark to show its hue
    ],
)
def test_solid_patches_get_one_colour_one_brightness_and_flat(rgb, colour, brightness):
    (names,) = names_of(solid(rgb))
    assert group(names, "colour") == {f"colour/{colour}"}
    assert group(names, "brightness") == {f"brightness/{brightness}"}
    assert group(names, "texture") == {"texture/flat"}
    assert pl.pixel_labels(solid(rgb), (1, 1)).flat_t[0] == 0.0


def test_checkerboard_and_noise_are_textured():
    checker = grey((np.indices((32, 32)).sum(0) % 2) * 255)
    (names,) = names_of(checker)
    assert group(names, "texture") == {"texture/textured"}
    assert group(names, "colour") == {"colour/black", "colour/white"}  # 50% each, both >= 40%
    assert pl.pixel_labels(checker, (1, 1)).flat_t[0] == pytest.approx(127.5)
    noise = grey(128 + np.random.default_rng(0).normal(0, 20, (32, 32)))
    assert group(names_of(noise)[0], "texture") == {"texture/textured"}


@pytest.mark.parametrize("side", [8, 16, 32])
def test_single_step_edges_are_edges_at_any_token_size(side):
    vertical = grey(np.where(np.arange(side)[None, :] >= side // 3, 220, 30) * np.ones((side, 1)))
    diagonal = grey(np.where(np.triu(np.ones((side, side))) > 0, 220, 30))
    for view in (vertical, diagonal):
        assert group(names_of(view)[0], "texture") == {"texture/edge"}


def test_a_smooth_ramp_is_neither_flat_nor_edge_nor_textured():
    ramp = grey(np.linspace(0, 255, 32)[None, :] * np.ones((32, 1)))
    assert group(names_of(ramp)[0], "texture") == set()


def test_border_and_centre_on_a_4x4_grid():
    out = names_of(solid((128, 128, 128), 64), (4, 4))
    centre = [k for k, names in enumerate(out) if "position/centre" in names]
    border = [k for k, names in enumerate(out) if "position/border" in names]
    assert centre == [5, 6, 9, 10]
    assert sorted(border + centre) == list(range(16))


def test_alpha_gives_foreground_and_background():
    alpha = np.zeros((64, 64), dtype=np.uint8)
    alpha[:, :24] = 200  # columns 0..23: token column 0 fully, column 1 half (16..31 -> 8 of 16 pixels)
    out = names_of(solid((0, 0, 255), 64), (4, 4), alpha)
    fg_cols = sorted({k % 4 for k, names in enumerate(out) if "fg/foreground" in names})
    assert fg_cols == [0, 1]  # exactly 50% counts as foreground
    assert all(("fg/foreground" in names) != ("fg/background" in names) for names in out)
    no_alpha = names_of(solid((0, 0, 255), 64), (4, 4))
    assert all(not group(names, "fg") for names in no_alpha)


def test_a_view_size_the_grid_does_not_divide():
    # 225 px on 7 tokens: edges round(linspace(0, 225, 8)) = 0 32 64 96 129 161 193 225
    assert pl.token_edges(225, 7).tolist() == [0, 32, 64, 96, 129, 161, 193, 225]
    view = solid((0, 0, 255), 225)
    view[:, :100] = (255, 0, 0)  # red up to column 99: token column 3 (96..128) is 4/33 red
    out = pl.pixel_labels(view, (7, 7))
    assert out.labels_tl.shape == (49, 21) and out.flat_t.shape == (49,)
    row = names_of(view, (7, 7))[:7]
    assert [group(n, "colour") for n in row] == [{"colour/red"}] * 3 + [{"colour/blue"}] * 4
    assert ["texture/flat" in n for n in row] == [True, True, True, False, True, True, True]


def test_tokens_only_see_their_own_pixels():
    view = solid((30, 30, 30), 32)
    view[:, 16:] = 220  # the step lies exactly on the boundary of a 1x2 grid
    assert [group(n, "texture") for n in names_of(view, (1, 2))] == [{"texture/flat"}, {"texture/flat"}]


def test_stacking_and_bad_input():
    parts = [pl.pixel_labels(solid((255, 0, 0)), (2, 2)), pl.pixel_labels(solid((0, 0, 0), 48), (3, 3))]
    stacked = pl.stack_pixel_labels(parts)
    assert stacked.labels_tl.shape == (13, 21) and stacked.names == list(pl.PIXEL_LABELS)
    with pytest.raises(UsaeError, match="uint8"):
        pl.pixel_labels(solid((1, 2, 3)).astype(np.float32), (2, 2))
    with pytest.raises(UsaeError, match="bins"):
        pl.pixel_labels(solid((1, 2, 3), 4), (8, 8))
    with pytest.raises(UsaeError, match="alpha"):
        pl.pixel_labels(solid((1, 2, 3)), (2, 2), np.zeros((3, 3), np.uint8))
