"""The data stage's configs: `usae synth` (a synthetic world), `usae encode` (sparse codes), `usae verify`.

Each dataclass is a subcommand of ``usae``; its field docstrings become ``--help``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

from usae.config.convert import refuse_invalid


@dataclass(frozen=True)
class SynthConfig:
    """Write a synthetic universal-concept world as a store (plus its ground truth)."""

    out: tyro.conf.Positional[Path]
    """Store directory to create; the ground truth goes to OUT/../<name>.truth.safetensors."""
    widths: tuple[int, ...] = (64, 96, 128)
    """Width of each model (models are named a, b, c, ...)."""
    n_rows: int = 100_000
    """Rows (tokens)."""
    n_universal: int = 64
    """Concepts every model sees."""
    n_partial: int = 32
    """Concepts a subset of models sees."""
    n_specific: int = 32
    """Concepts one model sees."""
    k_active: int = 8
    """Average concepts active per row."""
    noise: float = 0.05
    """Observation noise relative to the signal."""
    seed: int = 0
    """World seed."""
    overwrite: bool = False
    """Replace an existing store."""


@dataclass(frozen=True)
class EncodeConfig:
    """Export each model's sparse codes for a store: top-k concept ids and values per row (docs/format.md)."""

    run: tyro.conf.Positional[Path]
    """Run or pretrained directory."""
    store: tyro.conf.Positional[Path]
    """Paired activation store holding (at least) the run's models."""
    out: Path = Path("codes")
    """Codes directory to create: metadata.json and <model>/{indices,values}-NNNNN.npy. Not the run or
    the store, nor inside them."""
    models: tuple[str, ...] | None = None
    """Models to encode (default: every model of the run)."""
    k: int | None = None
    """Entries kept per row. Default: the run's k (TopK) or 4k (BatchTopK; rows with more are counted)."""
    value_dtype: Literal["float32", "float16"] = "float32"
    """dtype of the stored values."""
    batch_size: int = 4096
    """Rows encoded at a time."""
    rows_per_shard: int = 65536
    """Rows per output file."""
    max_rows: int | None = None
    """Encode only the first N rows."""
    overwrite: bool = False
    """Replace an existing codes directory."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda', ..."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        checks = {
            "k": self.k is None or self.k >= 1,
            "batch_size": self.batch_size >= 1,
            "rows_per_shard": self.rows_per_shard >= 1,
            "max_rows": self.max_rows is None or self.max_rows >= 1,
        }
        refuse_invalid("encode config", self, checks)


@dataclass(frozen=True)
class VerifyConfig:
    """Check every byte of a store (shard hashes) or a run (tensor checksums, every checkpoint)."""

    path: tyro.conf.Positional[Path]
    """A store, run, pretrained or codes directory."""
