"""Training rows made on the fly: frozen backbones run on images as the trainer needs them.

``ImageRows`` is a ``data.source.Rows`` without a store: row ``j * t + k`` is token k of training
image j (``t`` tokens per image: the grid, or ``--tokens-per-image`` drawn by the rule of
``subsample.py``), made exactly as ``usae extract`` with the same images, models, grid, view and
dtype stores it (``load_view``, ``forward_views``, ``check_values``). The trainer's loader
(data/loader.py) asks for contiguous chunks of rows into its shuffle buffer, in an order that is a
pure function of (seed, step); each chunk's images are decoded and run through every backbone then,
so the image order is that pure function too, and a resumed run reads the same rows. An image
split across two chunks is run twice (once per chunk; about t / 4096 of the images).

The normalisation statistics come from ``--stats-images`` images spread evenly over the training
images, merged in groups of ``STATS_GROUP`` images as ``usae extract`` merges its parts: with every
image in the sample, no image unreadable and no held-out split, they are bit-identical to the store's.

``image_source(cfg)`` opens the training and held-out images of a ``usae train --images`` config
and returns the ``TrainSource`` that ``usae.fit(cfg, source)`` trains on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from usae.config import TrainConfig
from usae.data.source import TrainSource
from usae.data.store_format import ModelStats, RunningStats, stats_from_json
from usae.device import resolve_device
from usae.errors import UsaeError
from usae.extraction.backbones import Backbone, load_backbone
from usae.extraction.extract import (
    check_model_names,
    check_values,
    common_grid,
    forward_views,
    load_view,
    select_images,
)
from usae.extraction.images import ImageSet, alpha_cropped, open_images
from usae.extraction.labels import split_images
from usae.extraction.subsample import kept_rows, positions_of, token_budget

log = logging.getLogger(__name__)

STATS_GROUP = 256
"""Images per merge of the statistics (``ExtractConfig.images_per_part``'s default: the same sums)."""


class ImageRows:
    """The tokens of ``backbones`` on images ``chosen`` of ``images``, as rows (see the module docstring)."""

    def __init__(
        self,
        images: ImageSet,
        chosen: list[int],
        backbones: list[Backbone],
        grid: tuple[int, int],
        view: int,
        keep: int | None,
        cfg: TrainConfig,
        device: torch.device,
    ) -> None:
        if not chosen:
            raise UsaeError(f"--images {images.describe().get('spec', '')}: no images to train on")
        src = cfg.source
        self.images, self.chosen, self.backbones = images, chosen, backbones
        self.grid, self.view, self.keep, self.device = grid, view, keep, device
        self.token_seed, self.batch_size, self.stats_images = src.token_seed, src.image_batch_size, src.stats_images
        self.n_grid = grid[0] * grid[1]
        self.t = keep or self.n_grid
        self.n_rows = len(chosen) * self.t
        self.widths = {b.name: b.width for b in backbones}
        self.model_names = list(self.widths)
        self.dtype = np.dtype(src.token_dtype)
        self.image_ids = [images.ids[j] for j in chosen]
        self.path = Path(str(images.describe().get("spec") or images.describe().get("root") or "images"))
        self.hash = hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()
        self._pool = ThreadPoolExecutor(src.decode_threads)
        self._lock = threading.Lock()  # the loader's thread and the main thread (validation, init) share it
        self._last: tuple[int, int, dict[str, np.ndarray]] | None = None
        self._last_taken: tuple[bytes, dict[str, np.ndarray]] | None = None
        self._stats: dict[str, ModelStats] | None = None
        self._unreadable: dict[str, str] = {}
        self.forward_seconds = 0.0
        """Seconds in the backbones' forward passes (on CUDA: until their tokens are on the host)."""
        self.make_seconds = 0.0
        """Seconds making rows in all: decoding, forward passes, the token draw."""
        self.images_run = 0

    def describe(self) -> dict[str, Any]:
        """What a run records of these rows: the images, the backbones and how tokens are made."""
        ids = hashlib.sha256("\n".join(self.image_ids).encode()).hexdigest()
        sampling = None if self.keep is None else {"tokens_per_image": self.keep, "seed": self.token_seed}
        return {
            "kind": "images",
            "images": self.images.describe(),
            "n_images": len(self.chosen),
            "image_ids_sha256": ids,
            "backbones": [b.describe() for b in self.backbones],
            "grid": list(self.grid),
            "view_size": self.view,
            "token_sampling": sampling,
            "dtype": self.dtype.name,
            "alignment": "centred square view; bilinear antialiased resampling of each feature map to the grid",
        }

    # -- rows -------------------------------------------------------------------------------------
    def rows(self, name: str, start: int, stop: int, dtype: Any = np.float32) -> np.ndarray:
        """Rows [start, stop) of model ``name`` (the images they cover are run once for every model)."""
        if not 0 <= start <= stop <= self.n_rows:
            raise UsaeError(f"images {self.path}: rows [{start}, {stop}) outside [0, {self.n_rows})")
        first, last = start // self.t, -(-stop // self.t)
        with self._lock:
            if self._last is None or self._last[:2] != (first, last):
                self._last = (first, last, self._tokens(list(range(first, last))))
            x = self._last[2][name][start - first * self.t : stop - first * self.t]
        return x.copy() if dtype is None else x.astype(dtype)

    def take(self, name: str, idx: Any) -> np.ndarray:
        """Rows ``idx`` as (len(idx), d) float32 (each image they touch run once)."""
        idx_b = np.asarray(idx, dtype=np.int64)
        if idx_b.size and (idx_b.min() < 0 or idx_b.max() >= self.n_rows):
            raise UsaeError(f"take: idx outside [0, {self.n_rows}) for images {self.path}")
        images, inverse = np.unique(idx_b // self.t, return_inverse=True)
        key = images.tobytes()
        with self._lock:  # one call per model for the same rows (--init data): the images run once
            if self._last_taken is None or self._last_taken[0] != key:
                self._last_taken = (key, self._tokens(images.tolist()))
            x = self._last_taken[1][name]
        return x[inverse * self.t + idx_b % self.t].astype(np.float32)

    def release_pages(self) -> None:
        """Drop the cached tokens of the last chunk (they live on in the loader's buffer)."""
        with self._lock:
            self._last = self._last_taken = None

    def stats(self, name: str) -> ModelStats:
        """Model ``name``'s statistics on ``--stats-images`` training images (computed once, on first use)."""
        with self._lock:
            if self._stats is None:
                self._stats = self._measure_stats()
        return self._stats[name]

    def _measure_stats(self) -> dict[str, ModelStats]:
        sample = select_images(len(self.chosen), self.stats_images)
        log.info("normalisation statistics from %d of %d images", len(sample), len(self.chosen))
        acc = {n: RunningStats(d) for n, d in self.widths.items()}
        for at in range(0, len(sample), STATS_GROUP):
            x = self._tokens(sample[at : at + STATS_GROUP])
            for n, x_bd in x.items():
                acc[n].update(x_bd)
        # the store's own record and reader: the same numbers as a store's metadata.json gives
        return {n: stats_from_json(s.to_json()) for n, s in acc.items()}

    def _tokens(self, positions: list[int]) -> dict[str, np.ndarray]:
        """Images ``positions`` (indices into ``chosen``) through every backbone: name -> (len·t, d)."""
        began = time.perf_counter()
        loaded = list(self._pool.map(self._view, positions))
        ids = [image_id for image_id, _ in loaded]
        parts: dict[str, list[np.ndarray]] = {n: [] for n in self.model_names}
        for at in range(0, len(loaded), self.batch_size):
            views = [view for _, view in loaded[at : at + self.batch_size]]
            batch_ids = ids[at : at + self.batch_size]
            forward_began = time.perf_counter()
            with torch.inference_mode():
                out = forward_views(self.backbones, views, self.grid, self.device)
            self.forward_seconds += time.perf_counter() - forward_began
            if self.keep is not None:  # the same draw as extract: a function of the image id only
                rows = kept_rows(positions_of(batch_ids, self.token_seed, self.n_grid, self.keep), self.n_grid)
                out = {n: x[rows] for n, x in out.items()}
            for n, x in out.items():
                check_values(x, n, batch_ids, self.t, self.dtype.name)
                parts[n].append(x.astype(self.dtype))
        self.images_run += len(positions)
        self.make_seconds += time.perf_counter() - began
        empty = {n: np.zeros((0, d), self.dtype) for n, d in self.widths.items()}
        return {n: np.concatenate(p) if p else empty[n] for n, p in parts.items()}

    def _view(self, position: int) -> tuple[str, np.ndarray]:
        """(id, canonical view) of image ``position``; an unreadable image is replaced by the next
        readable one (its rows then repeat that image's: the row count is fixed before training)."""
        for step in range(len(self.chosen)):
            j = self.chosen[(position + step) % len(self.chosen)]
            _, view, reason = load_view(self.images, j, self.view)
            if view is not None:
                return self.images.ids[j], view
            if self.images.ids[j] not in self._unreadable:
                self._unreadable[self.images.ids[j]] = reason
                log.warning("unreadable image %s; its rows repeat the next readable image's", reason)
        raise UsaeError(f"images {self.path}: none of the {len(self.chosen)} images is readable")

    @property
    def unreadable(self) -> int:
        """Images found unreadable so far (their rows repeat the next readable image's)."""
        return len(self._unreadable)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def image_source(cfg: TrainConfig) -> TrainSource:
    """The training rows of a ``usae train --images`` config, its held-out rows (--val-images or
    --val-fraction) and what config.json records of them; the backbones on the training device."""
    src = cfg.source
    check_model_names(cfg.data.models)
    device = resolve_device(cfg.data.device)
    images = _open(src.images, cfg)
    chosen = select_images(len(images), src.max_images)
    backbones = [load_backbone(spec, pretrained=not src.random_init, device=device) for spec in cfg.data.models]
    grid = common_grid(backbones, src.grid)
    view = src.view_size or max(b.input_size for b in backbones)
    chosen, keep = token_budget(chosen, grid[0] * grid[1], src.tokens_per_image, None)
    held_images, held_chosen = images, []
    if src.val_images is not None:
        held_images = _open(src.val_images, cfg)
        held_chosen = list(range(len(held_images)))
    elif src.val_fraction > 0:
        held = split_images(None, len(chosen), src.val_fraction, src.val_seed)
        held_chosen = [j for j, h in zip(chosen, held, strict=True) if h]
        chosen = [j for j, h in zip(chosen, held, strict=True) if not h]
        if not held_chosen:
            log.warning("--val-fraction %g of %d images holds out none; no validation", src.val_fraction, len(chosen))
    rows = ImageRows(images, chosen, backbones, grid, view, keep, cfg, device)
    held_rows = ImageRows(held_images, held_chosen, backbones, grid, view, keep, cfg, device) if held_chosen else None
    info = {**rows.describe(), "hash": rows.hash, "n_rows": rows.n_rows}
    if held_rows is not None:
        info["held_out"] = {**held_rows.describe(), "hash": held_rows.hash, "n_rows": held_rows.n_rows}
    log.info(
        "training from %d images × %d models (%s) on a %dx%d grid, %d tokens each; backbones in the loop",
        len(chosen), len(backbones), ", ".join(f"{b.name} d={b.width}" for b in backbones), *grid, rows.t,
    )  # fmt: skip
    return TrainSource(rows, held_rows, info, _next_hint(cfg, grid, held_rows is not None))


def _open(spec: str, cfg: TrainConfig) -> ImageSet:
    images = open_images(spec, cfg.source.image_split, cfg.source.image_column)
    return alpha_cropped(images) if cfg.source.alpha_crop else images


def _next_hint(cfg: TrainConfig, grid: tuple[int, int], held: bool) -> str:
    """``usae extract`` of the held-out images into a store, then ``usae evaluate`` the run on it."""
    src = cfg.source
    images = src.val_images or src.images
    flags = ["--images", images, "--models", *cfg.data.models, "--grid", str(grid[0])]
    if src.val_images is None and held:
        flags += ["--val-fraction", str(src.val_fraction), "--val-seed", str(src.val_seed)]
    if src.random_init:
        flags.append("--random-init")
    store = "STORE-val" if src.val_images is None and held else "STORE"
    return f"usae extract {shlex.join(flags)} --out STORE && usae evaluate {{run}} {store}"
