"""The evaluation stage's configs: `usae evaluate`, `usae label` (concept names), `usae splice` (task fidelity).

Each dataclass is a subcommand of ``usae``; its field docstrings become ``--help``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tyro

from usae.config.convert import refuse_invalid
from usae.errors import UsaeError


@dataclass(frozen=True)
class ClassThresholds:
    """How latents are classified into concept classes (``usae.model.metrics.classify_latents``).

    The defaults are defined here once; ``EvalConfig`` nests them (flags ``--min-rate`` ...
    ``--universal-cofire``) and report.json records them under ``classes.thresholds``.
    docs/report.md gives each rule and why its default.
    """

    min_rate: float = 1e-4
    """Concept classes (docs/report.md): a model uses a concept only if it fires on at least this
    fraction of rows, on min_count rows and on min_share of the rows of the model where it fires most."""
    universal_fe: float = 0.8
    """A concept used by every model is universal when its firing entropy is at least this (and
    universal_cofire holds). Measured on a synthetic world with 24 planted universal concepts: FE 0
    counts 99 universal latents under the rate-only support rule (latents firing thousands of times in
    one model and twice in the others)."""
    min_count: int = 10
    """A model uses a concept only if it fires on at least this many rows (see min_rate; rate alone
    is 1 row in 10 000, meaningless on a small store: a count under ~10 is mostly noise, its relative
    Poisson error is over 30%)."""
    min_share: float = 0.05
    """A model uses a concept only if it fires on at least this fraction of the rows of the model
    where the concept fires most (see min_rate), so 2911 : 4 is one model's concept, not shared."""
    universal_cofire: float = 0.2
    """A concept used by every model is universal when, in every model, its co-fire proportion
    (rows where it fires in all models / rows where it fires in that model) is at least this."""

    def __post_init__(self) -> None:
        for field in ("min_rate", "min_share", "universal_fe", "universal_cofire"):
            if not 0.0 <= getattr(self, field) <= 1.0:
                raise UsaeError(f"evaluate: {field} must be in [0, 1], got {getattr(self, field)}")
        if self.min_count < 0:
            raise UsaeError(f"evaluate: min_count must be >= 0, got {self.min_count}")

    def to_dict(self) -> dict[str, float | int]:
        """The JSON form report.json records under ``classes.thresholds``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> ClassThresholds:
        """The thresholds ``saved`` records (``to_dict``); defaults for those it lacks (older reports)."""
        kinds = {f.name: int if f.type in (int, "int") else float for f in dataclasses.fields(cls)}
        return cls(**{k: kinds[k](v) for k, v in saved.items() if k in kinds})


@dataclass(frozen=True)
class EvalConfig:
    """Evaluate a trained run on a store: cross-reconstruction R², FVU, L0, dead, firing stats."""

    run: tyro.conf.Positional[Path]
    """Run directory (from `usae train`)."""
    stores: tyro.conf.Positional[tuple[Path, ...]]
    """One or more paired activation stores with the run's models; several are reported side by
    side (dataset shift)."""
    out: Path | None = None
    """Directory for report.json (report-<store>.json per store when several), report.md and the
    figures (default: RUN); or a path ending in .json: the report file itself, with report.md and
    the figures beside it."""
    batch_size: int = 8192
    """Rows per streamed batch."""
    max_rows: int | None = None
    """Evaluate only the first N rows."""
    tau: float = 0.1
    """A latent fires when its code exceeds tau."""
    thresholds: tyro.conf.OmitArgPrefixes[ClassThresholds] = ClassThresholds()
    """The concept-class thresholds (flags without a prefix: --min-rate ...)."""
    report: bool = True
    """Also write report.md and PNG figures (RUN/baselines.json, splice.json and labels.json, if present,
    are included)."""
    label: bool = True
    """When the first store records per-image labels (`usae extract --labels`) and RUN/labels.json is not
    for it, name the concepts there first (`usae label` with its defaults, said in one log line) so the
    report shows them; --no-label skips it."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda', ..."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if not self.stores:
            raise UsaeError("evaluate: give at least one store")


@dataclass(frozen=True)
class LabelConfig:
    """Name every concept from dataset labels (folders) and pixel labels, with a shuffled-label control."""

    run: tyro.conf.Positional[Path]
    """Run directory (from `usae train`)."""
    store: tyro.conf.Positional[Path]
    """Store made by `usae extract` (it records the images); best one the run was not trained on."""
    out: Path | None = None
    """Directory for labels.json and names.json (the explorer's --labels); default: RUN."""
    n_top: int = 20
    """Dataset labels name a concept by its top-N images (each image scored by its largest code)."""
    n_top_tokens: int = 50
    """Pixel labels name a concept by its top-N tokens; also the artifact flags' top-N."""
    n_perm: int = 20000
    """Label permutations behind each p-value (the chance level)."""
    min_support: int = 5
    """Labels carried by fewer items (or by all but fewer) are not scored."""
    alpha: float = 0.01
    """False-discovery rate (Benjamini–Hochberg over every model and concept) for a name to count."""
    batch_images: int = 64
    """Images encoded at a time."""
    seed: int = 0
    """Seed of the permutations and the shuffled control."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda', ..."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        checks = {
            "n_top": self.n_top >= 1,
            "n_top_tokens": self.n_top_tokens >= 1,
            "n_perm": self.n_perm >= 1,
            "min_support": self.min_support >= 1,
            "alpha": 0.0 < self.alpha < 1.0,
            "batch_images": self.batch_images >= 1,
        }
        refuse_invalid("label config", self, checks)


@dataclass(frozen=True)
class SpliceConfig:
    """Splice each model's reconstruction back into it and measure its task output (classifier / dense head)."""

    run: tyro.conf.Positional[Path]
    """Run directory (from `usae train`). An independent SAE in RUN/baselines/<model>/ (`usae baseline`) is added as a control."""
    store: tyro.conf.Positional[Path]
    """Store made by `usae extract` (it records the images, the token grid and the backbone specs)."""
    out: Path | None = None
    """Where splice.json and splice.png go (default: RUN)."""
    images: str | None = None
    """Another source for the store's image ids (folder, list file, hf:NAME[:SPLIT]); default: the store's own."""
    batch_images: int = 16
    """Images per batch (each is run through every model 1 + M + 4 times)."""
    max_images: int | None = None
    """Use only N of the store's images, spread evenly."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda', ..."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        checks = {"batch_images": self.batch_images >= 1, "max_images": self.max_images is None or self.max_images >= 1}
        refuse_invalid("splice", self, checks)
