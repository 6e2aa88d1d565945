"""The configs of the commands around the pipeline: ablate, baseline, encode, import-official, export, verify."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

from usae.config.convert import refuse_invalid
from usae.config.stages import Rule


@dataclass(frozen=True)
class AblateConfig:
    """Sweep a grid of training configurations; write a CSV and a markdown table of the headline numbers."""

    stores: tyro.conf.Positional[tuple[Path, ...]]
    """One or more paired activation stores (one grid axis)."""
    out: Path = Path("ablation")
    """Directory for the runs (OUT/runs/<point>) and OUT/ablation.{csv,md}."""
    rules: tuple[Rule, ...] = ("random-source",)
    """Objectives / update rules to compare (see `usae train --help`)."""
    n_models: tuple[int, ...] | None = None
    """Numbers of models: the first N models of each store (default: all of each store's models)."""
    n_latents: tuple[int, ...] = (512,)
    """Dictionary sizes."""
    k: tuple[int, ...] = (8,)
    """Active latents per row."""
    steps: int = 1000
    """Training steps per grid point."""
    batch_size: int = 1024
    """Rows per step."""
    seed: int = 0
    """Seed of every run."""
    max_eval_rows: int | None = None
    """Evaluate each run on at most this many rows."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda'."""

    def __post_init__(self) -> None:
        checks = {
            "stores": len(self.stores) >= 1,
            "rules": len(self.rules) >= 1,
            "n_models": self.n_models is None or (len(self.n_models) >= 1 and min(self.n_models) >= 1),
            "n_latents": len(self.n_latents) >= 1 and min(self.n_latents) >= 1,
            "k": len(self.k) >= 1 and min(self.k) >= 1,
            "steps": self.steps >= 1,
            "batch_size": self.batch_size >= 1,
            "max_eval_rows": self.max_eval_rows is None or self.max_eval_rows >= 1,
        }
        refuse_invalid("ablate config", self, checks)


@dataclass(frozen=True)
class BaselineConfig:
    """Train independent per-model SAEs beside a run and compare them with the universal SAE."""

    run: tyro.conf.Positional[Path]
    """Run directory (from `usae train`). Independent SAEs go to RUN/baselines/<model>/, results to
    RUN/baselines.json."""
    store: tyro.conf.Positional[Path]
    """Paired activation store to train the independent SAEs on and to compare over (the run's store)."""
    max_rows: int | None = None
    """Stream only the first N rows for latent matching and sample similarity rows from them."""
    batch_size: int = 8192
    """Rows per streamed batch."""
    similarity_rows: int = 2048
    """Rows sampled (seeded) for CKA and mutual k-NN; k-NN holds an (n, n) similarity matrix."""
    knn_k: int = 10
    """Neighbours per row for mutual k-NN alignment."""
    match_threshold: float = 0.5
    """A matched latent pair counts as matched when its activation correlation exceeds this."""
    cosine_threshold: float = 0.5
    """USAE and independent dictionary rows agree when their cosine exceeds this (the paper's 0.5)."""
    truth: Path | None = None
    """Ground truth of a synthetic store (STORE.truth.safetensors): adds planted-concept recovery."""
    retrain: bool = False
    """Retrain the independent SAEs even when RUN/baselines/<model>/model.safetensors exists."""
    seed: int = 0
    """Seed for the similarity rows and the random-direction baseline."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda', ..."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        checks = {
            "max_rows": self.max_rows is None or self.max_rows >= 2,
            "batch_size": self.batch_size >= 1,
            "similarity_rows": self.similarity_rows >= 2,
            "knn_k": self.knn_k >= 1,
            "match_threshold": -1.0 <= self.match_threshold <= 1.0,
            "cosine_threshold": -1.0 <= self.cosine_threshold <= 1.0,
        }
        refuse_invalid("baseline config", self, checks)


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
class VerifyConfig:
    """Check every byte of a store (shard hashes) or a run (tensor checksums, every checkpoint)."""

    path: tyro.conf.Positional[Path]
    """A store, run, pretrained or codes directory."""


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
