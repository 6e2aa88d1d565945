"""Pixel labels: per-token colour, brightness, texture, position and foreground labels read from the view itself.

Network-Dissection-style labels for any image set, labelled or not. The input is the canonical
view the models saw, uint8 (H, W, 3) on the 0..255 scale, and the token grid (gh, gw); token
k = row * gw + col covers the pixel rows ``edges(H, gh)[row]:…[row + 1]`` (likewise columns),
with ``edges(S, g) = round(linspace(0, S, g + 1))``, the bins of area resampling, so sizes that
the grid does not divide work too. Every statistic is a per-pixel mean or a ratio, so the
thresholds hold for any view size.

Label order (:data:`PIXEL_LABELS`, fixed so per-image outputs stack into one matrix):

- ``colour/<term>`` for the 11 basic colour terms: a token carries a colour that covers at least
  :data:`COLOUR_SHARE` of its pixels (several may apply, or none on a mixed token). Each pixel is
  named by HSV rules, see :func:`pixel_colours`.
- ``brightness/dark|mid|bright``: mean luma Y' = 0.299 R + 0.587 G + 0.114 B of the token against
  the fixed thirds of 0..255 (< 85, 85..170, >= 170); exactly one applies.
- ``texture/flat|edge|textured`` (at most one applies; smooth ramps and corners carry none):
  flat: RMS pixel std < :data:`FLAT_STD`; edge: not flat, gradients share one orientation
  (coherence >= 0.5) and sit on few pixels (energy participation < 0.4); textured: neither, with
  gradient energy spread over the pixels (participation >= 0.25) and oscillating (signed gradients
  cancel, oscillation >= 0.5). See :class:`Texture` for the statistics.
- ``position/border`` (outer ring of the grid) and ``position/centre`` (all other tokens).
- ``fg/foreground`` (>= 50% of the token's pixels have alpha >= 128) and ``fg/background``;
  both False for every token when no alpha is given.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from usae.errors import UsaeError

log = logging.getLogger(__name__)

COLOURS = ("black", "white", "grey", "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown")
PIXEL_LABELS: tuple[str, ...] = (
    *(f"colour/{c}" for c in COLOURS),
    "brightness/dark",
    "brightness/mid",
    "brightness/bright",
    "texture/flat",
    "texture/edge",
    "texture/textured",
    "position/border",
    "position/centre",
    "fg/foreground",
    "fg/background",
)
COLOUR_SHARE = 0.4  # a colour names a token when it covers >= 40% of its pixels (so at most two do)
DARK_BELOW, BRIGHT_FROM = 85.0, 170.0  # thirds of the 0..255 luma range
FLAT_STD = 8.0  # grey levels: above JPEG/sensor noise (~1-4) on a uniform surface, below any visible pattern
EDGE_COHERENCE = 0.5  # structure-tensor coherence: 1 = one gradient orientation, 0 = isotropic
# Participation ratio of the gradient energy: ~w/p for a w-pixel-wide edge on p-pixel tokens (<= 0.32 for
# a blurred edge on 8-pixel tokens), ~0.5-0.75 for noise, 1 for stripes; a gap between the two cuts.
EDGE_SPREAD, TEXTURE_SPREAD = 0.4, 0.25
OSCILLATION = 0.5  # 1 - |sum of gradients| / sum of |gradients|: ~0 for a ramp or step, ~1 for texture
ALPHA_ON, FG_SHARE = 128, 0.5


class PixelLabels(NamedTuple):
    """Per-token labels of one view (or of stacked views)."""

    names: list[str]  # PIXEL_LABELS, column order
    labels_tl: np.ndarray  # bool (t, len(names)), tokens row-major over the grid
    flat_t: np.ndarray  # float32 (t,): RMS over R, G, B of the token's pixel std, 0..255 (0 = perfectly flat)

    def take(self, tokens: np.ndarray) -> PixelLabels:
        """The labels of the given tokens only, in that order: a subsampled store's rows of one image."""
        tokens = np.asarray(tokens, dtype=np.int64)
        return PixelLabels(list(self.names), self.labels_tl[tokens], self.flat_t[tokens])


def token_edges(size: int, n: int) -> np.ndarray:
    """int (n + 1,): pixel edges of n bins over ``size`` pixels, as in area resampling."""
    if n < 1 or size < n:
        raise UsaeError(f"cannot split {size} pixels into {n} token bins (need 1 <= bins <= pixels)")
    return np.round(np.linspace(0, size, n + 1)).astype(np.int64)


def token_map(height: int, width: int, grid: tuple[int, int]) -> np.ndarray:
    """int64 (H, W): the token index (row-major over ``grid``) of every pixel."""
    gh, gw = grid
    row_h = np.searchsorted(token_edges(height, gh), np.arange(height), side="right") - 1
    col_w = np.searchsorted(token_edges(width, gw), np.arange(width), side="right") - 1
    return row_h[:, None] * gw + col_w[None, :]


def pixel_colours(view_hw3: np.ndarray) -> np.ndarray:
    """int8 (H, W): index into :data:`COLOURS` of each pixel of a uint8 RGB view.

    HSV rules (hue in degrees; V = max/255, S = (max - min)/max), first match wins:
    V < 0.18 is black whatever the hue (too dark to see one). Achromatic (S < 0.15 or
    max - min < 0.08 · 255): black / grey / white by luma < 0.25 / < 0.80 / else. Hue bands:
    red < 15 or >= 345 (pink when light and desaturated: S < 0.5 and V >= 0.7; brown when dark
    and dull: V < 0.6 and S < 0.6), orange 15-40, yellow 40-65 (orange/yellow hues are brown when
    dark, V < 0.6, or dull, S < 0.5 and V < 0.85: brown is dark orange/yellow), green 65-170,
    blue 170-260, purple 260-315, magenta 315-345 (pink when V >= 0.6, else purple).
    """
    rgb = view_hw3.astype(np.float32) / 255.0
    mx, mn = rgb.max(-1), rgb.min(-1)
    chroma = mx - mn
    sat = np.where(mx > 0, chroma / np.where(mx > 0, mx, 1.0), 0.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = 60.0 * np.where(
        mx == r, ((g - b) / safe) % 6.0, np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    )
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    achromatic = (sat < 0.15) | (chroma < 0.08)
    red_band = (hue < 15) | (hue >= 345)
    brownish = (hue >= 15) & (hue < 65) & ((mx < 0.6) | ((sat < 0.5) & (mx < 0.85)))
    rules = [
        (mx < 0.18, "black"),
        (achromatic & (luma < 0.25), "black"),
        (achromatic & (luma >= 0.80), "white"),
        (achromatic, "grey"),
        (red_band & (sat < 0.5) & (mx >= 0.7), "pink"),
        (red_band & (mx < 0.6) & (sat < 0.6), "brown"),
        (red_band, "red"),
        (brownish, "brown"),
        (hue < 40, "orange"),
        (hue < 65, "yellow"),
        (hue < 170, "green"),
        (hue < 260, "blue"),
        (hue < 315, "purple"),
        (mx >= 0.6, "pink"),
    ]
    choice = np.select([cond for cond, _ in rules], [COLOURS.index(name) for _, name in rules], COLOURS.index("purple"))
    return choice.astype(np.int8)


class Texture(NamedTuple):
    """Per-token texture statistics, each float64 (t,) in [0, 1]; all 0 on a token without gradients."""

    coherence_t: (
        np.ndarray
    )  # sqrt((Jxx - Jyy)² + 4 Jxy²) / (Jxx + Jyy), colour structure tensor (Di Zenzo) of 2×2 quads
    spread_t: np.ndarray  # participation ratio (Σe)² / (n Σe²) of per-pixel forward-difference energy e (1 = even)
    oscillation_t: np.ndarray  # 1 - Σ_c |Σ g_c| / Σ |g_c|: signed gradients cancelling inside the token


def _per_token(token_hw: np.ndarray, n_tokens: int, values_hw: np.ndarray) -> np.ndarray:
    """float64 (t,): sum of ``values_hw`` over each token's pixels."""
    return np.bincount(token_hw.ravel(), weights=values_hw.ravel(), minlength=n_tokens)


def _gradients(rgb_hw3: np.ndarray, token_hw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Forward differences (H, W, 3) along x and y, zero where the pair straddles two tokens.

    Forward (not central) differences keep the finest stripes, which central ones cancel; pairs
    across a token boundary are dropped so a token's texture comes from its own pixels only.
    """
    gx, gy = np.zeros_like(rgb_hw3), np.zeros_like(rgb_hw3)
    gx[:, :-1] = rgb_hw3[:, 1:] - rgb_hw3[:, :-1]
    gy[:-1] = rgb_hw3[1:] - rgb_hw3[:-1]
    gx[:, :-1] *= (token_hw[:, 1:] == token_hw[:, :-1])[..., None]
    gy[:-1] *= (token_hw[1:] == token_hw[:-1])[..., None]
    return gx, gy


def _quad_gradients(rgb_hw3: np.ndarray, token_hw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gx, gy) (H-1, W-1, 3) at the centre of each 2×2 pixel quad, and the quad's token (-1 across tokens).

    Both derivatives sit at one point, so a diagonal step keeps its orientation in gx·gy; forward
    differences put a staircase's x and y steps on different pixels, which reads as isotropic.
    """
    a, b, c, d = rgb_hw3[:-1, :-1], rgb_hw3[:-1, 1:], rgb_hw3[1:, :-1], rgb_hw3[1:, 1:]
    token_q = np.where(token_hw[:-1, :-1] == token_hw[1:, 1:], token_hw[:-1, :-1], -1)  # bins are rectangles
    return (b - a + d - c) / 2.0, (c - a + d - b) / 2.0, token_q


def texture_features(rgb_hw3: np.ndarray, token_hw: np.ndarray, n_tokens: int) -> Texture:
    """:class:`Texture` of each token from a float RGB view (H, W, 3) on 0..255 and its token map (H, W)."""
    qx, qy, token_q = _quad_gradients(rgb_hw3, token_hw)
    inside = token_q >= 0
    jxx, jyy, jxy = (
        np.bincount(token_q[inside], weights=v[inside], minlength=n_tokens)
        for v in ((qx * qx).sum(-1), (qy * qy).sum(-1), (qx * qy).sum(-1))
    )
    gx, gy = _gradients(rgb_hw3, token_hw)
    energy_hw = (gx * gx + gy * gy).sum(-1)
    e1_t, e2_t = _per_token(token_hw, n_tokens, energy_hw), _per_token(token_hw, n_tokens, energy_hw**2)
    n_t = np.bincount(token_hw.ravel(), minlength=n_tokens)
    net_t = sum(
        np.hypot(_per_token(token_hw, n_tokens, gx[..., c]), _per_token(token_hw, n_tokens, gy[..., c]))
        for c in range(3)
    )
    gross_t = _per_token(token_hw, n_tokens, np.hypot(gx, gy).sum(-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        coherence_t = np.hypot(jxx - jyy, 2 * jxy) / (jxx + jyy)
        spread_t = e1_t**2 / (n_t * e2_t)
        oscillation_t = 1.0 - net_t / gross_t
    return Texture(*(np.nan_to_num(x, nan=0.0) for x in (coherence_t, spread_t, oscillation_t)))


def _check_view(view: np.ndarray, alpha: np.ndarray | None, grid: tuple[int, int]) -> None:
    """Raise :class:`UsaeError` unless the view, alpha and grid fit together."""
    if view.dtype != np.uint8 or view.ndim != 3 or view.shape[2] != 3:
        raise UsaeError(f"view must be uint8 (H, W, 3); got {view.dtype} {view.shape}")
    if alpha is not None and (alpha.dtype != np.uint8 or alpha.shape != view.shape[:2]):
        raise UsaeError(f"alpha must be uint8 {view.shape[:2]}; got {alpha.dtype} {alpha.shape}")
    if len(grid) != 2:
        raise UsaeError(f"grid must be (rows, cols); got {grid}")


def pixel_labels(view: np.ndarray, grid: tuple[int, int], alpha: np.ndarray | None = None) -> PixelLabels:
    """Per-token :data:`PIXEL_LABELS` of one view (uint8 (H, W, 3), optional alpha uint8 (H, W)).

    Returns t = gh · gw rows in row-major token order; see the module docstring for each rule.
    """
    view = np.asarray(view)
    alpha = None if alpha is None else np.asarray(alpha)
    _check_view(view, alpha, grid)
    gh, gw = int(grid[0]), int(grid[1])
    n_tokens = gh * gw
    token_hw = token_map(view.shape[0], view.shape[1], (gh, gw))
    n_t = np.bincount(token_hw.ravel(), minlength=n_tokens).astype(np.float64)
    rgb = view.astype(np.float32)  # exact for 0..255; sums happen in float64 (bincount)
    labels: dict[str, np.ndarray] = {}

    colour_tc = np.bincount(
        (token_hw * len(COLOURS) + pixel_colours(view)).ravel(), minlength=n_tokens * len(COLOURS)
    ).reshape(n_tokens, len(COLOURS))
    for c, name in enumerate(COLOURS):
        labels[f"colour/{name}"] = colour_tc[:, c] >= COLOUR_SHARE * n_t

    luma_t = _per_token(token_hw, n_tokens, rgb @ np.array([0.299, 0.587, 0.114])) / n_t
    labels["brightness/dark"] = luma_t < DARK_BELOW
    labels["brightness/bright"] = luma_t >= BRIGHT_FROM
    labels["brightness/mid"] = ~labels["brightness/dark"] & ~labels["brightness/bright"]

    mean_tc = np.stack([_per_token(token_hw, n_tokens, rgb[..., c]) for c in range(3)], 1) / n_t[:, None]
    sq_tc = np.stack([_per_token(token_hw, n_tokens, rgb[..., c] ** 2) for c in range(3)], 1) / n_t[:, None]
    flat_t = np.sqrt(np.maximum(sq_tc - mean_tc**2, 0.0).mean(1))
    tex = texture_features(rgb, token_hw, n_tokens)
    labels["texture/flat"] = flat_t < FLAT_STD
    labels["texture/edge"] = (
        ~labels["texture/flat"] & (tex.coherence_t >= EDGE_COHERENCE) & (tex.spread_t < EDGE_SPREAD)
    )
    labels["texture/textured"] = (
        ~labels["texture/flat"]
        & ~labels["texture/edge"]
        & (tex.spread_t >= TEXTURE_SPREAD)
        & (tex.oscillation_t >= OSCILLATION)
    )

    row_t, col_t = np.divmod(np.arange(n_tokens), gw)
    labels["position/border"] = (row_t == 0) | (row_t == gh - 1) | (col_t == 0) | (col_t == gw - 1)
    labels["position/centre"] = ~labels["position/border"]

    if alpha is None:
        labels["fg/foreground"] = labels["fg/background"] = np.zeros(n_tokens, dtype=bool)
    else:
        labels["fg/foreground"] = _per_token(token_hw, n_tokens, alpha >= ALPHA_ON) >= FG_SHARE * n_t
        labels["fg/background"] = ~labels["fg/foreground"]
    labels_tl = np.stack([labels[name] for name in PIXEL_LABELS], 1)
    return PixelLabels(list(PIXEL_LABELS), labels_tl, flat_t.astype(np.float32))


def stack_pixel_labels(parts: Sequence[PixelLabels]) -> PixelLabels:
    """Concatenate per-image outputs into one (sum of t, len(PIXEL_LABELS)) matrix, images in order."""
    if not parts:
        return PixelLabels(list(PIXEL_LABELS), np.zeros((0, len(PIXEL_LABELS)), dtype=bool), np.zeros(0, np.float32))
    if any(list(p.names) != list(PIXEL_LABELS) for p in parts):
        raise UsaeError("stack_pixel_labels: parts carry a different label order than PIXEL_LABELS")
    return PixelLabels(
        list(PIXEL_LABELS), np.concatenate([p.labels_tl for p in parts]), np.concatenate([p.flat_t for p in parts])
    )
