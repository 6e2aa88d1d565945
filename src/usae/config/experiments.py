"""The configs of studies that train and evaluate: `usae ablate`, `usae baseline`, `usae frontier`, `usae demo`.

Each dataclass is a subcommand of ``usae``; its field docstrings become ``--help``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tyro

from usae.config.convert import refuse_invalid
from usae.config.train import Rule


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
class DemoConfig:
    """End to end on the embedded default: extract 3 packaged pretrained models on the offline
    photos, train a universal SAE, evaluate and explore it."""

    out: Path = Path("usae-demo")
    """Directory for the store, the run, the report and the explorer."""
    models: tuple[str, ...] = ("effnet-lite0", "open-nsfw", "craft-vgg16")
    """Backbone specs (see `usae extract --help`)."""
    images: str = "builtin:demo"
    """Image source (see `usae extract --help`)."""
    max_images: int | None = None
    """Use at most this many images."""
    n_latents: int = 2048
    """Universal dictionary size."""
    k: int = 16
    """Active latents per token."""
    steps: int = 2000
    """Training steps."""
    batch_size: int = 512
    """Tokens per step."""
    val_fraction: float = 0.25
    """Images held out (stratified by folder) to evaluate, name and explore on; the run trains on the rest."""
    alpha_crop: bool = True
    """Crop the stamps (cut-outs) to their visible pixels, so objects fill the view instead of grey borders."""
    splice_images: int = 8
    """Held-out images spliced back into every model (task fidelity; 64 on a GPU)."""
    maximize: int = 1
    """Render this many universal concepts by coordinated activation maximisation (short on CPU)."""
    synthetic: bool = False
    """Run the synthetic-world demo instead (planted concepts, checks their recovery)."""
    seed: int = 0
    """Seed for training (and the synthetic world)."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda'."""


@dataclass(frozen=True)
class FrontierConfig:
    """Interpretability against fidelity: for each (k, n_latents) train a universal SAE and independent
    per-model SAEs, score them and a random dictionary on held-out rows; write a table and figures."""

    store: tyro.conf.Positional[Path]
    """Paired activation store to train on (from `usae extract` or `usae synth`)."""
    val: Path | None = None
    """Held-out store to measure on (default: the store's held-out twin from `usae extract --val-fraction`,
    else the training store itself, said in a warning)."""
    out: Path = Path("frontier")
    """Directory for the points (OUT/points/s<n_latents>-k<k>/) and OUT/frontier.{json,csv,md} + figures."""
    k: tuple[int, ...] = (4, 8, 16, 32)
    """Active latents per row (one grid axis)."""
    n_latents: tuple[int, ...] = (512, 2048, 8192)
    """Dictionary sizes (the other grid axis)."""
    steps: int = 1000
    """Training steps of every SAE (universal and independent: the same budget)."""
    batch_size: int = 1024
    """Rows per step."""
    seed: int = 0
    """Seed of every run and of the random dictionary."""
    independent: bool = True
    """Also train one independent SAE per model at each point (same size, k and budget)."""
    random_dictionary: bool = True
    """Also score a random dictionary at each point (unit-norm random rows, encoder = decoder
    transpose, the same TopK and normalisation): what naming and fidelity give without training."""
    random_models: tuple[str, ...] | None = None
    """Models that are random backbones, reported against the real ones (default: those the store
    records as extracted from `fake:` specs)."""
    max_eval_rows: int | None = None
    """Measure R², classes and dead share on at most this many held-out rows."""
    splice_images: int | None = 32
    """Held-out images spliced back per dictionary (task fidelity, where a backbone splices; None: all)."""
    label: bool = True
    """Name the concepts (`usae label`'s dataset and pixel labels, where the store records images)."""
    n_perm: int = 5000
    """Label permutations behind each naming p-value (the chance level)."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda'."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        checks = {
            "k": len(self.k) >= 1 and min(self.k) >= 1,
            "n_latents": len(self.n_latents) >= 1 and min(self.n_latents) >= 1,
            "steps": self.steps >= 1,
            "batch_size": self.batch_size >= 1,
            "max_eval_rows": self.max_eval_rows is None or self.max_eval_rows >= 1,
            "splice_images": self.splice_images is None or self.splice_images >= 1,
            "n_perm": self.n_perm >= 1,
        }
        refuse_invalid("frontier config", self, checks)
