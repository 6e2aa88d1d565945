"""The magnitude spectrum and colour basis MACO keeps fixed, estimated from a store's own images.

MACO (Fel et al. 2023) optimises only the Fourier phase of an image; the magnitude is the mean
magnitude spectrum of natural images. Offline we estimate it from the images the store was
extracted from, in the space :class:`usae.explorer.maco.FourierImage` generates in:

1. the canonical view of the image at the optimised size (the pixels every backbone saw),
   scaled to [0, 1];
2. standardised over all its pixels and channels together, as ``FourierImage`` standardises its
   spatial image before the sigmoid (the sigmoid is not inverted: it is close to linear within the
   ±2σ most pixels fall in, and its inverse would blow up saturated pixels);
3. decorrelated in colour: projected on the principal axes of the images' pixel colours (the
   eigenvectors of their 3 x 3 colour covariance, largest first: roughly luminance, then two
   opponent colours). ``FourierImage`` generates these three channels, each with its own phase,
   and mixes them back to RGB with the same basis, so the image's colours co-vary as in the data
   instead of every RGB channel wandering on its own (which paints rainbow noise);
4. its periodic component (Moisan 2011, "Periodic plus smooth image decomposition"): the FFT
   treats the image as a torus, so the jump between opposite borders would add a spurious cross of
   energy along both frequency axes (a horizontal ramp: 30x less energy off DC on that axis with
   it). A constant image is left unchanged; a whole-period sinusoid keeps its peak (at 32 px, 3
   cycles: 94 % of it, the rest spread thinly over the axes);
5. ``|rfft2|`` per decorrelated channel (orthonormal), averaged over the images.

The result is a ``(3, S, S // 2 + 1)`` float32 magnitude (``FourierImage``'s layout) and the
``(3, 3)`` colour basis (column d: the RGB direction of channel d). At most ``max_images`` images
are read, evenly spread over the store, and held as uint8 views (256 at 224 px: 38 MB). Both are
cached with the run as ``RUN/maximize/spectrum-<S>.safetensors`` (checksummed safetensors;
metadata: the store's hash, the size, the image budget and the method) and recomputed when any of
them differs.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from usae._io import load_tensors, safetensors_metadata, save_tensors_atomic
from usae.errors import UsaeError
from usae.extraction.images import image_layout, load_source_image, source_of

log = logging.getLogger(__name__)

MAX_IMAGES = 256
METHOD = "v2: canonical view, joint standardisation, colour PCA, periodic component, mean |rfft2| ortho"
SPECTRUM_KEY = "magnitude"
COLOUR_KEY = "colour"


def spectrum_path(cache_dir: str | Path, size: int) -> Path:
    """Where the spectrum of the optimised size ``size`` is cached under ``cache_dir``."""
    return Path(cache_dir) / f"spectrum-{int(size)}.safetensors"


def power_law_spectrum(size: int, decay: float = 1.0) -> Tensor:
    """(3, S, S // 2 + 1): the 1/f^decay amplitude natural images roughly follow (Field 1987)."""
    f_hw = torch.sqrt(torch.fft.fftfreq(size)[:, None] ** 2 + torch.fft.rfftfreq(size)[None, :] ** 2)
    return (1.0 / f_hw.clamp_min(1.0 / size) ** decay).expand(3, -1, -1).clone()


def standardize_views(views_bssc: Tensor | np.ndarray) -> Tensor:
    """(b, S, S, 3) uint8 canonical views -> (b, 3, S, S) float64, each image standardised as a whole."""
    x = torch.as_tensor(np.asarray(views_bssc)).permute(0, 3, 1, 2).double() / 255
    mean = x.mean((1, 2, 3), keepdim=True)
    std = x.std((1, 2, 3), keepdim=True)
    return (x - mean) / (std + 1e-5)


def periodic_rfft2(x_bchw: Tensor) -> Tensor:
    """``rfft2`` (orthonormal) of the periodic component of each (h, w) plane (Moisan 2011).

    The smooth component s solves ``laplacian(s) = laplacian_of_border_jumps``; in Fourier space
    ``s_hat = v_hat / (2 cos(2πq/h) + 2 cos(2πr/w) - 4)`` with v the jumps between opposite borders,
    and the periodic component is ``x_hat - s_hat`` (the mean is kept).
    """
    h, w = x_bchw.shape[-2:]
    v = torch.zeros_like(x_bchw)
    jump_rows = x_bchw[..., -1, :] - x_bchw[..., 0, :]
    jump_cols = x_bchw[..., :, -1] - x_bchw[..., :, 0]
    v[..., 0, :] += jump_rows
    v[..., -1, :] -= jump_rows
    v[..., :, 0] += jump_cols
    v[..., :, -1] -= jump_cols
    q = torch.arange(h, dtype=x_bchw.dtype)[:, None]
    r = torch.arange(w // 2 + 1, dtype=x_bchw.dtype)[None, :]
    denom = 2 * torch.cos(2 * math.pi * q / h) + 2 * torch.cos(2 * math.pi * r / w) - 4
    denom[0, 0] = 1.0  # v sums to 0, so v_hat[0, 0] = 0: the smooth part has no mean
    s_hat = torch.fft.rfft2(v, norm="ortho") / denom
    return torch.fft.rfft2(x_bchw, norm="ortho") - s_hat


def colour_basis(x_b3hw: Tensor) -> Tensor:
    """(3, 3) principal axes of the pixel colours of standardised images (columns, largest variance
    first; each column's largest entry positive): the basis ``FourierImage`` mixes its channels with."""
    x = x_b3hw.double()
    centred = x - x.mean((0, 2, 3), keepdim=True)
    return principal_axes(torch.einsum("bchw,bdhw->cd", centred, centred) / (centred.numel() // 3))


def principal_axes(cov_cc: Tensor) -> Tensor:
    """(c, c) eigenvectors of a covariance as columns, largest eigenvalue first, each column's
    largest entry positive (so the basis does not depend on the eigensolver's signs)."""
    values, vectors = torch.linalg.eigh(cov_cc.double())
    vectors = vectors[:, values.argsort(descending=True)]
    return (vectors * torch.sign(vectors.gather(0, vectors.abs().argmax(0, keepdim=True)))).float()


def image_spectrum(views_bssc: Tensor | np.ndarray, colour: Tensor | None = None) -> Tensor:
    """(3, S, S // 2 + 1) float32: mean magnitude spectrum of (b, S, S, 3) uint8 views, per channel
    of the colour basis ``colour`` (3, 3; columns are the channels' RGB directions; default RGB)."""
    x = standardize_views(views_bssc)
    if colour is not None:
        x = torch.einsum("cd,bchw->bdhw", colour.double(), x)
    return periodic_rfft2(x).abs().mean(0).float()


def spectrum_images(store: Any, max_images: int = MAX_IMAGES) -> list[str]:
    """Ids of at most ``max_images`` store images, evenly spread over the store (first and last included)."""
    ids = image_layout(store).image_ids
    if len(ids) <= max_images:
        return list(ids)
    picks = np.unique(np.linspace(0, len(ids) - 1, max_images).round().astype(np.int64))
    return [ids[j] for j in picks]


def estimate_spectrum(
    store: Any, size: int, max_images: int = MAX_IMAGES, *, batch: int = 32, progress: bool = True
) -> tuple[Tensor, Tensor, int]:
    """(mean magnitude spectrum (3, S, S // 2 + 1), colour basis (3, 3), number of images read) of
    the store's images, the spectrum taken per channel of the colour basis.

    Unreadable images are skipped with a warning; none readable is a one-line UsaeError.
    """
    from tqdm.auto import tqdm

    source = source_of(store)
    ids = spectrum_images(store, max_images)
    views, skipped = [], 0
    for image_id in tqdm(ids, desc=f"maximize: spectrum at {size} px", unit="img", disable=not progress):
        try:
            views.append(load_source_image(source, image_id, size)[0])
        except UsaeError as e:
            skipped += 1
            log.warning("spectrum: skipping %s", e)
    if not views:
        raise UsaeError(f"{store.path}: none of the {len(ids)} source images could be read for the spectrum")
    if skipped:
        log.warning("spectrum: %d of %d images could not be read", skipped, len(ids))
    # the colour covariance of all the images first (a sum over batches), then the spectra in that basis
    total, moments = torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    n_pixels = 0
    for lo in range(0, len(views), batch):
        x = standardize_views(np.stack(views[lo : lo + batch]))
        total += torch.einsum("bchw,bdhw->cd", x, x)
        moments += x.sum((0, 2, 3))
        n_pixels += x.numel() // 3
    mean = moments / n_pixels
    colour = principal_axes(total / n_pixels - torch.outer(mean, mean))
    magnitude = torch.zeros(3, size, size // 2 + 1, dtype=torch.float64)
    for lo in range(0, len(views), batch):
        chunk = views[lo : lo + batch]
        magnitude += image_spectrum(np.stack(chunk), colour).double() * len(chunk)
    return (magnitude / len(views)).float(), colour, len(views)


def _cache_key(store: Any, size: int, max_images: int) -> dict[str, str]:
    return {"store_hash": str(store.hash), "size": str(int(size)), "max_images": str(int(max_images)), "method": METHOD}


class DataSpectrum(NamedTuple):
    """What :func:`data_spectrum` returns."""

    magnitude: Tensor
    """(3, S, S // 2 + 1) mean magnitude spectrum per channel of ``colour``."""
    colour: Tensor
    """(3, 3) colour basis: column d is the RGB direction of channel d."""
    images: int
    """How many images it was estimated from."""
    file: str | None
    """The cache file (None: not cached)."""
    cached: bool
    """Whether it was read from the cache."""


def data_spectrum(
    store: Any,
    size: int,
    cache_dir: str | Path | None,
    max_images: int = MAX_IMAGES,
    *,
    progress: bool = True,
) -> DataSpectrum:
    """The store's mean magnitude spectrum and colour basis at ``size`` px, read from ``cache_dir``
    when cached there.

    The cache is ``cache_dir/spectrum-<size>.safetensors``; one made for another store (hash), size,
    image budget or method is recomputed and replaced. A cache that cannot be written is a warning,
    not an error.
    """
    key = _cache_key(store, size, max_images)
    path = spectrum_path(cache_dir, size) if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            meta = safetensors_metadata(path)
            if all(meta.get(k) == v for k, v in key.items()):
                tensors = load_tensors(path)
                magnitude, colour = tensors[SPECTRUM_KEY], tensors[COLOUR_KEY]
                if magnitude.shape == (3, size, size // 2 + 1) and colour.shape == (3, 3):
                    log.info("spectrum: read %s", path)
                    return DataSpectrum(magnitude, colour, int(meta.get("images", 0)), str(path), True)
            log.info("spectrum: %s was made for another store, size, budget or method; recomputing", path)
        except (UsaeError, KeyError, ValueError) as e:
            log.warning("spectrum: %s unreadable (%s); recomputing", path, e)
    magnitude, colour, n = estimate_spectrum(store, size, max_images, progress=progress)
    written = None
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_tensors_atomic(path, {SPECTRUM_KEY: magnitude, COLOUR_KEY: colour}, {**key, "images": str(n)})
            written = str(path)
        except (UsaeError, OSError) as e:
            log.warning("spectrum: not cached (%s)", e)
    return DataSpectrum(magnitude, colour, n, written, False)
