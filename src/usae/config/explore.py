"""The explorer stage's configs: `usae explore` (the concept site) and `usae maximize`.

Each dataclass is a subcommand of ``usae``; its field docstrings become ``--help``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

from usae.config.convert import refuse_invalid
from usae.config.extract import MAX_VIEW_SIZE
from usae.errors import UsaeError


@dataclass(frozen=True)
class ExploreConfig:
    """Write the concept explorer: a static site of top images with heatmaps for every concept."""

    run: tyro.conf.Positional[Path]
    """Run directory (from `usae train`). A report of `usae evaluate` in RUN (report.json, or the
    report-<store>.json of several stores) computed on all of STORE is reused (without one, the run is
    evaluated on STORE first, not saved: run `usae evaluate RUN STORE` to reuse it); maximisations
    under RUN/maximize/ are shown on their concepts' pages."""
    store: tyro.conf.Positional[Path]
    """Store made by `usae extract` (it records the images and the token grid)."""
    out: Path = Path("explorer")
    """Site directory (index.html, concepts/, images/, ...); an earlier site there is replaced. Not
    the run or the store, nor inside them."""
    n_top: int = 8
    """Top images per concept and model."""
    labels: Path | None = None
    """Concept labels shown beside concept ids (escaped): labels.json of `usae label` (scores per family
    and model, label pages, flat/border artifact marks) or a JSON object {"<concept>": "label"} (e.g.
    names.json). Default: RUN/labels.json when it exists."""
    concepts_per_image: int = 12
    """Concepts listed per model on an image page."""
    batch_images: int = 64
    """Images per streamed batch."""
    maximize_top: int = 0
    """Also run `usae maximize` (into RUN/maximize) for the N universal concepts of most energy first;
    0: only show the maximisations already there."""
    maximize_steps: int = 128
    """Optimisation steps of those maximisations."""
    maximize_crops: int = 6
    """Random crops scored per step in those maximisations."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda', ..."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        for name in ("n_top", "concepts_per_image", "batch_images", "maximize_steps", "maximize_crops"):
            if getattr(self, name) < 1:
                raise UsaeError(f"explore: {name} must be >= 1, got {getattr(self, name)}")
        if self.maximize_top < 0:
            raise UsaeError(f"explore: maximize_top must be >= 0, got {self.maximize_top}")


@dataclass(frozen=True)
class MaximizeConfig:
    """Coordinated activation maximisation: for each model, an image that excites one concept."""

    run: tyro.conf.Positional[Path]
    """Run directory (from `usae train`)."""
    concept: tuple[int, ...]
    """Concept id(s) to render."""
    models: tuple[str, ...] | None = None
    """Models to render through (default: all of the run's)."""
    store: Path | None = None
    """Store whose metadata names the backbones and token grid (default: the run's store)."""
    out: Path | None = None
    """Output root: OUT/concept-<k>/ (default: RUN/maximize, where the explorer looks)."""
    steps: int = 256
    """Optimisation steps per model."""
    size: int | None = None
    """Side of the optimised image in pixels (default: the store's canonical view size)."""
    n_crops: int = 6
    """Random crops (jitter, zoom, noise) scored per step."""
    crop_scale: tuple[float, float] = (0.8, 1.0)
    """Side of each random crop, as a fraction of the image's (lowest, highest)."""
    noise: float = 0.05
    """Standard deviation of the Gaussian noise added to each crop (pixels in [0, 1])."""
    lr: float = 1.0
    """NAdam learning rate on the Fourier phase (MACO's)."""
    spectrum: Literal["data", "1/f"] | None = None
    """MACO's fixed magnitude spectrum: 'data' (estimated from the store's images, cached in RUN/maximize)
    or '1/f'; default 'data' when the store records its images."""
    spectrum_images: int = 256
    """At most this many store images (evenly spread) for the data spectrum."""
    compare: bool = True
    """Compare with the best natural image per model (one pass over the store) and measure transfer
    between models (the image made for model i scored in every model j)."""
    seed: int = 0
    """Seed of the starting phase and the augmentations (deterministic on CPU)."""
    device: str = "auto"
    """'auto' (cuda if present), 'cpu', 'cuda', ..."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        if not self.concept:
            raise UsaeError("maximize: give at least one --concept")
        checks = {"steps": self.steps >= 1, "n_crops": self.n_crops >= 1, "lr": self.lr > 0}
        checks["spectrum_images"] = self.spectrum_images >= 1
        checks["spectrum"] = self.spectrum in (None, "data", "1/f")
        checks["size"] = self.size is None or 8 <= self.size <= MAX_VIEW_SIZE
        checks["crop_scale"] = 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1
        checks["noise"] = self.noise >= 0
        refuse_invalid("maximize", self, checks)
