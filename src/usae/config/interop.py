"""The interop configs: `usae export` (a pretrained directory, the Hub) and `usae import-official`.

Each dataclass is a subcommand of ``usae``; its field docstrings become ``--help``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro


@dataclass(frozen=True)
class ExportConfig:
    """Write a run as a shareable pretrained directory: config.json, model.safetensors, README.md card."""

    run: tyro.conf.Positional[Path]
    """Run directory (its report.json, from `usae evaluate`, supplies the card's metrics)."""
    out: Path = Path("pretrained")
    """Directory to write."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """dtype of the saved float tensors."""
    push_to_hub: str | None = None
    """Also upload to this Hugging Face Hub repo id (owner/name); needs network and a token."""
    private: bool = False
    """Create the Hub repo as private."""
    overwrite: bool = False
    """Replace an existing pretrained directory at --out (never a run or any other directory)."""


@dataclass(frozen=True)
class ImportOfficialConfig:
    """Convert the paper's released USAE (YAML config + per-model Overcomplete checkpoints) into a run."""

    config_yaml: tyro.conf.Positional[Path]
    """The release's YAML (model_zoo with input_shape, model_mean, model_std; sae_params)."""
    checkpoint_dir: tyro.conf.Positional[Path]
    """Directory with uni_<Model>_checkpoint_<epoch>.pth files (directly or in <Model>/ subfolders)."""
    out: Path = Path("runs/official")
    """Run directory to write (config.json + model.safetensors)."""
    overwrite: bool = False
    """Replace a run already in --out."""
