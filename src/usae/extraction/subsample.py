"""Token subsampling at extraction (``usae extract --tokens-per-image N`` / ``--max-rows R``).

A store of every token of ImageNet-1k train for three ViTs is about a terabyte; most of that is
neighbouring tokens of the same image, which an SAE needs far fewer of than it needs images. So
extraction may keep ``N`` of each image's ``h·w`` grid tokens. The draw is a pure function of
(seed, image id, h·w, N) — not of the model, the batch, the part or the rank — so every model
keeps the same tokens (rows stay paired), a resumed or torchrun extraction keeps the same ones,
and an image keeps its tokens whichever other images are selected (and in the held-out twin).

The rule, exactly (so it can be reproduced without usae, with numpy's documented generators):
``key = sha256(f"{seed}\\n{image_id}".encode())`` read as eight little-endian uint32 words;
``raw = PCG64(SeedSequence(words)).random_raw(h·w)``; the kept tokens are the ``N`` indices of the
smallest ``raw`` values (ties, which do not happen in practice, by index), in increasing order.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np

from usae.errors import UsaeError

RULE = (
    "grid tokens of the N smallest of PCG64(SeedSequence(sha256(f'{seed}\\n{image_id}') as 8 <u4 words))"
    ".random_raw(h*w), increasing"
)


def token_positions(seed: int, image_id: str, n_grid: int, n: int) -> np.ndarray:
    """int64 (n,): the grid tokens (row-major, increasing) that image ``image_id`` keeps; see the module rule."""
    words = np.frombuffer(hashlib.sha256(f"{seed}\n{image_id}".encode()).digest(), dtype="<u4")
    raw = np.random.PCG64(np.random.SeedSequence(words.tolist())).random_raw(n_grid)
    return np.sort(np.argsort(raw, kind="stable")[:n]).astype(np.int64)


def positions_of(image_ids: list[str], seed: int, n_grid: int, n: int) -> np.ndarray:
    """int64 (images, n): :func:`token_positions` of each image, in the order given."""
    out = np.empty((len(image_ids), n), np.int64)
    for i, image_id in enumerate(image_ids):
        out[i] = token_positions(seed, image_id, n_grid, n)
    return out


def kept_rows(positions_bn: np.ndarray, n_grid: int) -> np.ndarray:
    """int64 (b·n,): rows of a (b·h·w, d) batch of whole images that hold the kept tokens, in store order."""
    return (np.arange(len(positions_bn))[:, None] * n_grid + positions_bn).reshape(-1)


class TokenBudget(NamedTuple):
    """What ``--tokens-per-image`` and ``--max-rows`` leave of a selection of images."""

    chosen: list[int]
    """Source indices of the images to extract (a subset of the selection, spread evenly)."""
    tokens_per_image: int | None
    """Tokens kept per image; None when every grid token is kept (a store as without subsampling)."""


def token_budget(chosen: list[int], n_grid: int, tokens_per_image: int | None, max_rows: int | None) -> TokenBudget:
    """The images and tokens per image to extract under the rule of ``--tokens-per-image`` and ``--max-rows``.

    ``N = min(tokens_per_image or h·w, h·w)``. With a row budget R: when ``tokens_per_image`` is not
    given, ``N = min(h·w, max(1, R // images))`` (every image, as many tokens as fit); then, if
    ``images · N > R``, only ``R // N`` of the images, spread evenly. R counts the rows of the store
    and its held-out twin together; unreadable images only make the store smaller.
    """
    n = min(tokens_per_image or n_grid, n_grid)
    if max_rows is not None:
        if tokens_per_image is None:
            n = min(n_grid, max(1, max_rows // max(len(chosen), 1)))
        if max_rows < n:
            raise UsaeError(f"--max-rows {max_rows} is less than one image's {n} tokens (--tokens-per-image)")
        if len(chosen) * n > max_rows:
            k = max_rows // n
            chosen = [chosen[i] for i in sorted({int(round(x)) for x in np.linspace(0, len(chosen) - 1, k)})]
    return TokenBudget(chosen, n if n < n_grid else None)
