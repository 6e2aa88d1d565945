"""``usae train`` whole: from a store, or from images with the frozen backbones in the loop.

Training and extraction are peers that never import each other (docs/architecture.md); this module
above both composes them: ``--images`` opens ``extraction.stream.image_source`` (the backbones'
tokens made as the loader asks for them) and hands it to ``training.fit`` as its ``TrainSource``.
"""

from __future__ import annotations

import logging
import time

from usae.config import TrainConfig
from usae.data.source import TrainSource, store_source
from usae.training.fit import FitResult, fit
from usae.training.summary import format_trained

log = logging.getLogger(__name__)


def open_source(cfg: TrainConfig) -> TrainSource:
    """The rows ``cfg`` trains on: its store (and held-out twin), or its images through its backbones."""
    if cfg.source.images is None:
        return store_source(cfg.store)
    from usae.extraction.stream import image_source  # torch models: only when training from images

    return image_source(cfg)


def train(cfg: TrainConfig, source: TrainSource | None = None) -> FitResult:
    """``usae.fit`` for any ``usae train`` config: a store, or ``--images`` with ``--models`` backbones."""
    return fit(cfg, source or open_source(cfg))


def time_split(source: TrainSource, result: FitResult, wall_seconds: float) -> str | None:
    """One line for a run from images: the backbones' time beside the SAE steps', and which bounds it.

    The loader makes rows in a background thread while the steps run, so the run takes about the
    longer of the two (on one GPU they share the device; on CPU, the cores)."""
    rows = source.rows
    made = getattr(rows, "make_seconds", None)
    if made is None:  # a store: reading it is not what bounds a run
        return None
    n_img, fwd, sae = rows.images_run, rows.forward_seconds, result.step_seconds
    bound = "the backbones bound this run" if made > sae else "the SAE steps bound this run"
    skipped = f"; {rows.unreadable} unreadable image(s) replaced by their next readable one" if rows.unreadable else ""
    return (
        f"time: backbones {made:.1f} s for {n_img} images ({fwd:.1f} s of forward passes, "
        f"{n_img / max(made, 1e-9):.1f} images/s), SAE steps {sae:.1f} s, wall {wall_seconds:.1f} s: {bound}{skipped}"
    )


def train_command(cfg: TrainConfig) -> str:
    """``usae train``: fit (from the store or the images), then what the command prints."""
    began = time.perf_counter()
    source = open_source(cfg)
    result = train(cfg, source)
    text = format_trained(result.sae, result.run_dir, source, result)
    split = time_split(source, result, time.perf_counter() - began)
    return text if split is None else f"{text}\n{split}"
