"""The concept explorer: top images with token heatmaps for every concept, as a static site.

``usae explore RUN STORE --out OUT`` (``explorer.site.explore``) writes OUT/ (opens from disk or any static web server; no CDN)::

    index.html            concept table (sortable, filterable) + the report's R² matrix and histograms
    concepts/<k>.html     one concept: per model side by side, its top-N images with heatmap overlays
    images/<j>.html       one image: which concepts fire in which model ("who sees what")
    img/<j>.jpg           canonical view of store image j (what every backbone saw)
    max/<k>/*.png         coordinated activation maximisation of concept k, when it was run
    figures/*.png         report figures (usae.evaluation.report.markdown)
    assets/               explorer.css, explorer.js (sorting, filtering, heatmap drawing), colormap.js

An image's score for a concept is the concept's largest code over the image's tokens. The top-N
images of every (model, concept) pair are found in one streaming pass that keeps only an
(m, s, N) buffer, merged batch by batch with ``topk`` (a vectorised bounded heap); a second pass
re-encodes just the images that made some top list to get their token maps. Heatmaps are stored as
one byte per token and drawn by the page over the image, upsampled from the token grid by the
browser's bilinear filter; ``overlay`` renders the same picture in Python.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from usae._io import one_line
from usae.data.store import Store
from usae.errors import UsaeError
from usae.extraction.images import ImageLayout, image_layout, load_source_image, source_of
from usae.model.sae import SparseCode, UniversalSAE
from usae.run import open_run_store

log = logging.getLogger(__name__)

SITE_MARKER = ".usae-explorer"
CMAP = "inferno"
OVERLAY_ALPHA = 0.7
THUMB_SIZE = 224


class TopImages(NamedTuple):
    """Per model and concept, the images where the concept fires most (descending)."""

    value_msn: Tensor
    """(m, s, n) float32: the image's largest code of the concept over its tokens; 0 in empty slots."""
    image_msn: Tensor
    """(m, s, n) int64: store image index; -1 in empty slots (fewer than n images fired)."""


class TopImage(NamedTuple):
    """One entry of ``top_images``."""

    model: str
    rank: int
    image_index: int
    image_id: str
    score: float
    """Largest code of the concept over the image's tokens."""
    heat_hw: np.ndarray
    """(h, w) float32: the concept's code on each token of the store grid (NaN on the tokens a
    subsampled store did not keep)."""


class Heatmap(NamedTuple):
    """What ``heatmap`` returns."""

    heat_hw: np.ndarray
    """(h, w) float32: the concept's code on each token (store grid, row-major; NaN where a subsampled
    store kept no token)."""
    view: np.ndarray
    """(S, S, 3) uint8: the canonical view the tokens tile."""
    overlay: Image.Image
    """The view with the upsampled heat drawn over it."""


# -- writing the site ------------------------------------------------------------------------------
@contextlib.contextmanager
def writing(path: Path) -> Iterator[Path]:
    """Make any OSError while writing ``path`` (disk full, read-only, ...) a one-line UsaeError naming it.

    A write that fails mid-file (ENOSPC) carries no file name of its own; this one does.
    """
    try:
        yield path
    except OSError as e:
        raise UsaeError(f"{path}: could not write ({e.strerror or one_line(e)})") from None


def write_page(path: Path, text: str) -> None:
    """A page (UTF-8 text) of the site; a failed write is a one-line UsaeError naming ``path``."""
    with writing(path):
        path.write_text(text, encoding="utf-8")


# -- the store's image layout ---------------------------------------------------------------------
def load_view(store: Store, image: int | str) -> np.ndarray:
    """Canonical view (S, S, 3) uint8 of store image ``image`` (index or id), from ``extra.images``."""
    layout = image_layout(store)
    j = _image_index(layout, image)
    return load_source_image(source_of(store), layout.image_ids[j], layout.view_size)[0]


def _image_index(layout: ImageLayout, image: int | str) -> int:
    if isinstance(image, str):
        try:
            return layout.image_ids.index(image)
        except ValueError:
            raise UsaeError(f"no image with id {image!r} in the store") from None
    if not 0 <= int(image) < len(layout.image_ids):
        raise UsaeError(f"image index {image} outside [0, {len(layout.image_ids)})")
    return int(image)


# -- streaming passes -----------------------------------------------------------------------------
def image_max_codes(sae: UniversalSAE, name: str, x_bd: Tensor, t: int) -> Tensor:
    """(b·t, d) raw activations of b whole images -> (b, s): each image's largest code per latent."""
    code = sae.encode_sparse(name, x_bd)
    b, s = x_bd.shape[0] // t, sae.n_latents
    if not isinstance(code, SparseCode):
        return code.view(b, t, s).amax(1)
    # Scatter the k values of each token into its image's row: no dense (b·t, s) code.
    image_r = torch.arange(x_bd.shape[0], device=x_bd.device) // t
    flat_rk = image_r[:, None] * s + code.idx_bk
    out = code.val_bk.new_zeros(b * s)  # codes are >= 0, so 0 is the identity of max
    return out.scatter_reduce_(0, flat_rk.reshape(-1), code.val_bk.reshape(-1), "amax").view(b, s)


@torch.no_grad()
def scan_top_images(
    sae: UniversalSAE,
    store: Store,
    n_top: int = 8,
    *,
    latents: list[int] | None = None,
    batch_images: int = 64,
    progress: bool = True,
) -> TopImages:
    """One streaming pass: the ``n_top`` images of highest score per model and latent.

    ``latents`` restricts the result to those latents (in that order); default: all. Memory is
    O(m · s · n_top) plus one batch of ``batch_images`` images.
    """
    layout = image_layout(store)
    t, n_images = layout.tokens_per_image, len(layout.image_ids)
    device = next(sae.parameters()).device
    sel = None if latents is None else torch.as_tensor(latents, dtype=torch.long, device=device)
    n_sel = sae.n_latents if sel is None else len(sel)
    value_msn = torch.zeros(len(sae.model_names), n_sel, n_top, device=device)
    image_msn = torch.full(value_msn.shape, -1, dtype=torch.long, device=device)
    sae.eval()
    bar = tqdm(total=n_images, unit="img", desc="explore: top images", disable=not progress)
    for first in range(0, n_images, batch_images):
        last = min(first + batch_images, n_images)
        image_sb = torch.arange(first, last, device=device).expand(n_sel, -1)
        for i, name in enumerate(sae.model_names):
            x_bd = torch.from_numpy(store.rows(name, first * t, last * t)).to(device)
            z_bs = image_max_codes(sae, name, x_bd, t)
            z_sb = (z_bs if sel is None else z_bs[:, sel]).T
            # Merge the running top-n with this batch: a bounded heap, vectorised over latents.
            cand_val = torch.cat([value_msn[i], z_sb], 1)
            top = cand_val.topk(n_top, dim=1)
            image_msn[i] = torch.cat([image_msn[i], image_sb], 1).gather(1, top.indices)
            value_msn[i] = top.values
        bar.update(last - first)
    bar.close()
    image_msn[value_msn <= 0] = -1  # a concept that never fired on an image does not show it
    return TopImages(value_msn.clamp_min(0).cpu(), image_msn.cpu())


@torch.no_grad()
def iter_image_codes(
    sae: UniversalSAE, store: Store, images: np.ndarray, batch_images: int = 32, fill: float = 0.0
) -> Iterator[tuple[np.ndarray, dict[str, Tensor]]]:
    """For the given store images (sorted indices), batches of (indices, {model: (b, h·w, s) codes}).

    Codes sit on the whole grid (row-major): in a token-subsampled store each row goes to the token
    it recorded (``layout.positions``) and the tokens it did not keep hold ``fill`` (0 draws
    nothing on a heatmap; NaN marks them).
    """
    layout = image_layout(store)
    t, n_grid = layout.tokens_per_image, layout.grid[0] * layout.grid[1]
    device = next(sae.parameters()).device
    for lo in range(0, len(images), batch_images):
        chunk = images[lo : lo + batch_images]
        rows = (chunk[:, None] * t + np.arange(t)[None, :]).reshape(-1)
        codes = {}
        for name in sae.model_names:
            z_bts = sae.encode(name, torch.from_numpy(store.take(name, rows)).to(device)).view(len(chunk), t, -1)
            if layout.positions is not None:
                at_bts = torch.from_numpy(layout.positions[chunk]).to(device)[..., None].expand_as(z_bts)
                z_bts = z_bts.new_full((len(chunk), n_grid, z_bts.shape[-1]), fill).scatter_(1, at_bts, z_bts)
            codes[name] = z_bts
        yield chunk, codes


# -- heatmaps ------------------------------------------------------------------------------------
def colormap_lut() -> np.ndarray:
    """(256, 3) uint8 colours of the heatmap colormap (shared by ``overlay`` and the site's JS)."""
    from matplotlib import colormaps

    return np.round(colormaps[CMAP](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def upsample(heat_hw: np.ndarray, size: int) -> np.ndarray:
    """(h, w) token values -> (size, size), bilinear with pixel centres aligned (the grid rule)."""
    heat = torch.as_tensor(np.asarray(heat_hw, dtype=np.float32))[None, None]
    return F.interpolate(heat, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def overlay(
    view: np.ndarray, heat_hw: np.ndarray, vmax: float | None = None, alpha: float = OVERLAY_ALPHA
) -> Image.Image:
    """The canonical view with token activations drawn over it: colour and opacity grow with the value.

    ``vmax`` maps to full colour (default: the map's maximum); zero activation leaves the image as is,
    and so do NaN tokens (those a subsampled store did not keep).
    """
    view = np.asarray(view, dtype=np.uint8)
    heat_hw = np.nan_to_num(np.asarray(heat_hw, dtype=np.float32), nan=0.0)
    vmax = float(np.max(heat_hw)) if vmax is None else float(vmax)
    v_ss = np.clip(upsample(heat_hw, view.shape[0]) / vmax, 0.0, 1.0) if vmax > 0 else np.zeros(view.shape[:2])
    colour = colormap_lut()[np.round(v_ss * 255).astype(np.int64)].astype(np.float32)
    a = (alpha * v_ss)[..., None]
    return Image.fromarray(np.round(view * (1 - a) + colour * a).astype(np.uint8))


def _check_concept(sae: UniversalSAE, concept: int) -> int:
    if not 0 <= int(concept) < sae.n_latents:
        raise UsaeError(f"concept {concept} outside [0, {sae.n_latents})")
    return int(concept)


def top_images(
    run: str | Path | UniversalSAE,
    store: str | Path | Store,
    concept: int,
    n: int = 8,
    *,
    batch_images: int = 64,
    device: str = "cpu",
    progress: bool = False,
) -> list[TopImage]:
    """Per model (run order), the ``n`` store images where ``concept`` fires most, with token maps."""
    sae, store = open_run_store(run, store, device)
    k = _check_concept(sae, concept)
    layout = image_layout(store)
    top = scan_top_images(sae, store, n, latents=[k], batch_images=batch_images, progress=progress)
    wanted = np.unique(top.image_msn[top.image_msn >= 0].numpy())
    heat: dict[tuple[str, int], np.ndarray] = {}
    for chunk, codes in iter_image_codes(sae, store, wanted, fill=float("nan")):
        for name, z_bts in codes.items():
            for loc, j in enumerate(chunk):
                heat[name, int(j)] = z_bts[loc, :, k].cpu().numpy().reshape(layout.grid)
    out = []
    for i, name in enumerate(sae.model_names):
        for rank, (v, j) in enumerate(zip(top.value_msn[i, 0].tolist(), top.image_msn[i, 0].tolist(), strict=True)):
            if j >= 0:
                out.append(TopImage(name, rank, j, layout.image_ids[j], v, heat[name, j]))
    return out


def heatmap(
    run: str | Path | UniversalSAE,
    store: str | Path | Store,
    concept: int,
    image: int | str,
    model: str | None = None,
    *,
    vmax: float | None = None,
    device: str = "cpu",
) -> Heatmap:
    """Token activations of ``concept`` on one store image (index or id) through ``model``'s encoder.

    Default model: the run's first. The overlay is drawn on the canonical view the tokens tile.
    """
    sae, store = open_run_store(run, store, device)
    k = _check_concept(sae, concept)
    layout = image_layout(store)
    name = model or sae.model_names[0]
    sae.head(name)  # unknown model -> UsaeError
    j = _image_index(layout, image)
    (_, codes), *_ = iter_image_codes(sae, store, np.array([j]), fill=float("nan"))
    heat_hw = codes[name][0, :, k].cpu().numpy().reshape(layout.grid)
    view = load_view(store, j)
    return Heatmap(heat_hw, view, overlay(view, heat_hw, vmax))
