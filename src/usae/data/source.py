"""What training reads: paired rows of every model, from a store or made on the fly.

``Rows`` is the part of ``Store`` the trainer uses (data/loader.py, training/). A store on disk is
one; ``extraction/stream.py``'s ``ImageRows`` is another, whose rows are the tokens of frozen
backbones run on images as they are needed (``usae train --images``), row ``j * t + k`` being token
k of image j exactly as ``usae extract`` would have stored it. ``TrainSource`` pairs the training
rows with their held-out twin and what config.json records of them; ``store_source`` makes it for a
store directory. The layers above compose: training never imports extraction.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from usae.data.store import held_out_path, open_store
from usae.data.store_format import ModelStats


class Rows(Protocol):
    """Paired rows of every model: row r is the same image and token in each."""

    path: Path
    """Where the rows come from (a store directory, or an image source), for messages."""
    hash: str
    """Content hash: a run records it and refuses to resume on other rows."""
    n_rows: int
    widths: dict[str, int]
    model_names: list[str]
    dtype: np.dtype
    """The precision rows are held in (``rows(dtype=None)``)."""

    def stats(self, name: str) -> ModelStats:
        """Model ``name``'s statistics (the normalisation is built from them)."""
        ...

    def rows(self, name: str, start: int, stop: int, dtype: Any = np.float32) -> np.ndarray:
        """Rows [start, stop) of model ``name``, (stop - start, d) (``dtype=None``: ``self.dtype``)."""
        ...

    def take(self, name: str, idx: Any) -> np.ndarray:
        """Rows ``idx`` (1-D ints) of model ``name`` as (len(idx), d) float32."""
        ...

    def release_pages(self) -> None:
        """Drop what is cached of rows already read (memory stays at the shuffle buffers)."""
        ...


class TrainSource(NamedTuple):
    """The rows a training pass reads, their held-out twin, and what a run records of them."""

    rows: Rows
    held_out: Rows | None
    """Rows of held-out images (validations, the end-of-run R²), or None."""
    info: dict[str, Any]
    """RUN/config.json's ``store`` object: a store's path and hash, or the images and backbones."""
    next_hint: str
    """What the end of ``usae train`` suggests next: a command line with ``{run}`` for the run directory."""


def store_source(store_dir: Path) -> TrainSource:
    """A store directory (and its held-out twin, when ``usae extract --val-fraction`` wrote one)."""
    store = open_store(store_dir)
    twin = held_out_path(store)
    info = {
        # absolute, so the run finds its store from any working directory; the given form for display
        "path": os.path.abspath(store.path),
        "path_as_given": str(store_dir),
        "hash": store.hash,
        "n_rows": store.n_rows,
    }
    hint = f"usae evaluate {{run}} {twin or store_dir}"
    return TrainSource(store, open_store(twin) if twin else None, info, hint)
