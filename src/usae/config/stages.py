"""The pipeline stages' configs: synth, extract, train (and the SAE it builds), evaluate, explore, maximize, demo.

Each dataclass is a subcommand of ``usae``; its field docstrings become ``--help``. A resolved
config (auto values filled in) is what a run directory saves, so a run explains itself.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import tyro

from usae.config.convert import refuse_invalid
from usae.errors import UsaeError

# Concept classes (model/metrics.py classify_latents, evaluate, report): the defaults, defined once.
MIN_RATE = 1e-4
"""Support: a model uses a latent only if it fires on at least this fraction of the rows."""
MIN_COUNT = 10
"""Support: ... and on at least this many rows (rate alone is 1 row in 10 000, meaningless on a
small store: a count under ~10 is mostly noise, its relative Poisson error is over 30%)."""
MIN_SHARE = 0.05
"""Support: ... and at least this fraction of the latent's count in the model where it fires most,
so 2911 : 4 is one model's concept, not shared (whatever the store's size)."""
UNIVERSAL_FE = 0.8
"""Universal: firing entropy at least this (fires about equally often in every model)."""
UNIVERSAL_COFIRE = 0.2
"""Universal: co-fire proportion at least this in every model (fires on the same rows)."""

Rule = Literal["random-source", "all-sources", "as-released", "sparc", "crosscoder"]
Encoder = Literal["linear", "mlp"]
Activation = Literal["topk", "batchtopk"]
Normalization = Literal["scalar", "per-dim", "paper", "none"]
DecoderNorm = Literal["max1", "unit"]


@dataclass(frozen=True)
class SAEConfig:
    """The architecture of a UniversalSAE: everything needed to rebuild its tensors."""

    widths: dict[str, int]
    """Model name -> activation width d_i, in store order."""
    n_latents: int
    """Size s of the shared concept dictionary."""
    k: int
    """Active latents per row (TopK), or the per-row average (BatchTopK)."""
    encoder: Encoder = "linear"
    """'linear', or 'mlp': Linear + BatchNorm1d before the activation (the paper's mlp_bn_1)."""
    activation: Activation = "topk"
    """'topk' per row, or 'batchtopk' (top b*k over a batch; a learned threshold at inference)."""
    decoder_norm: DecoderNorm = "max1"
    """'max1': dictionary rows may shrink below norm 1 (a model can fade a concept it lacks);
    'unit': rows kept at exactly norm 1, gradient parallel to each row removed (the paper)."""

    def __post_init__(self) -> None:
        if not self.widths:
            raise UsaeError("sae config: 'widths' names no model")
        for name, d in self.widths.items():
            # names become nn.ModuleDict keys and tensor-name parts ("heads.<name>.W_enc")
            if not isinstance(name, str) or not name or "." in name:
                raise UsaeError(f"sae config: model name {name!r} must be a non-empty string without '.'")
            if not isinstance(d, int) or d < 1:
                raise UsaeError(f"sae config: width of model {name!r} must be a positive int, got {d!r}")
        if not isinstance(self.n_latents, int) or self.n_latents < 1:
            raise UsaeError(f"sae config: n_latents must be an int >= 1, got {self.n_latents!r}")
        if not isinstance(self.k, int) or not 1 <= self.k <= self.n_latents:
            raise UsaeError(f"sae config: k must be an int in [1, n_latents={self.n_latents}], got {self.k!r}")
        need, have = self.parameter_bytes(), _physical_memory_bytes()
        if have and need > have:  # refuse before allocating: an edited config.json must not ask for 64 TB
            raise UsaeError(
                f"sae config: n_latents={self.n_latents} with widths {list(self.widths.values())} needs "
                f"{need / 2**30:,.1f} GiB of float32 parameters, more than this machine's {have / 2**30:,.1f} GiB of memory"
            )

    def parameter_bytes(self) -> int:
        """Bytes of the float32 parameters (encoders, decoders, biases) this architecture allocates."""
        s = self.n_latents
        return 4 * sum(2 * s * d + s + 3 * d for d in self.widths.values())

    def batch_bytes(self, batch_size: int, training: bool = True) -> int:
        """A lower bound on the memory one batch of ``batch_size`` rows takes: the parameters (with
        gradients and two Adam moments when ``training``), every model's rows and reconstructions,
        and the (batch, n_latents) pre-activations (and their gradient when ``training``)."""
        copies = 4 if training else 1
        rows = 2 * sum(self.widths.values()) + (2 if training else 1) * self.n_latents
        return copies * self.parameter_bytes() + 4 * batch_size * rows


def _physical_memory_bytes() -> int | None:
    """This machine's RAM (None where the platform does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class TrainConfig:
    """Fit a universal SAE on a paired activation store."""

    store: tyro.conf.Positional[Path]
    """Paired activation store directory (written by `usae synth`, `write_store` or extraction)."""
    out: Path = Path("runs/usae")
    """Run directory: config.json, model.safetensors, metrics.jsonl, checkpoints/."""
    n_latents: int = 4096
    """Number of shared concepts (dictionary size)."""
    k: int = 32
    """Active concepts per token."""
    steps: int = 2000
    """Optimiser steps."""
    batch_size: int = 4096
    """Rows (tokens) per step."""
    seed: int = 0
    """Seed: initialisation, data order and source choice. A run is deterministic on CPU."""
    rule: Rule = "random-source"
    """'random-source': each step encodes one random model and decodes to all (paper);
    'all-sources': every model encodes each step; 'as-released': random-source but only the
    sampled model's parameters are stepped, discarding cross-model gradients (official code).
    Baseline objectives under the same trainer: 'sparc' (SPARC's global TopK: one index set from
    the summed pre-activations, per-model values, all-to-all reconstruction) and 'crosscoder'
    (acausal crosscoder: one code from the summed pre-activations of all models). These two use
    no AuxK."""
    models: tuple[str, ...] | None = None
    """Subset of the store's models to train on (default: all, in store order)."""
    lr: float | None = None
    """Peak learning rate. Default: 3e-2 · min(1, 128 / widest model's d), whatever n_latents and batch
    size (measured in docs/defaults.md)."""
    warmup_steps: int | None = None
    """Linear warmup steps. Default: 5% of steps (at most 1000)."""
    lr_end_ratio: float = 0.0
    """Final LR of the cosine decay as a fraction of the peak."""
    optimizer: Literal["adam", "adamw"] = "adam"
    """Adam, or AdamW (decoupled weight decay on encoder weights only)."""
    weight_decay: float = 0.0
    """AdamW weight decay (encoder weights)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this value (None: no clipping)."""
    loss: Literal["l2", "l1"] = "l2"
    """Reconstruction loss per element in normalised units: squared (l2) or absolute (l1)."""
    encoder: Encoder = "linear"
    """Per-model encoder: 'linear' or 'mlp' (Linear + BatchNorm, the paper's mlp_bn_1)."""
    activation: Activation = "topk"
    """'topk' or 'batchtopk'."""
    normalization: Normalization = "scalar"
    """Input normalisation per model: 'scalar' (per-dim mean, one scalar std), 'per-dim'
    (per-dim mean and std), 'paper' (one scalar mean and std, as released), 'none'."""
    decoder_norm: DecoderNorm = "max1"
    """Dictionary rows: 'max1' (norm <= 1) or 'unit' (norm == 1, the paper). See docs/defaults.md."""
    init: Literal["data", "random"] = "data"
    """Dictionary init: rows from the same random data rows in every model, or random directions.
    Encoders start as the decoder transpose either way."""
    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss that revives dead latents (0 disables)."""
    k_aux: int | None = None
    """Dead latents used by AuxK per row. Default: min(n_latents // 2, 256)."""
    dead_after_tokens: int = 262_144
    """A latent is dead for a model after this many of its encoded tokens without firing."""
    shuffle_buffer_mb: int = 256
    """Rows are shuffled within windows of about this many MB read whole from the store; two
    windows are in memory at a time (the one in use and the next, read ahead)."""
    extend: Path | None = None
    """Add models to a trained universe: RUN whose models stay frozen; only the store's other models'
    encoders and decoders are fit (the store must hold the run's models, paired, plus the new ones)."""
    select_precision: Literal["float32", "bfloat16"] | None = None
    """Precision of the one dense matmul that chooses each token's k latents (linear TopK
    encoders). The chosen entries' values and every gradient stay full precision, so bfloat16 only
    changes near-ties at the k-th place. Default: bfloat16 where the device multiplies it natively
    (CUDA sm80+, CPUs with AVX512-BF16 or AMX; 3-4x faster than float32 there), else float32."""
    log_every: int = 50
    """Write metrics.jsonl every N steps (the only host syncs in the loop)."""
    save_every: int = 0
    """Write a resumable checkpoint every N steps (0: only at the end)."""
    resume: bool = False
    """Continue from the newest checkpoint in --out."""
    overwrite: bool = False
    """Allow training into a run directory that already holds a run."""
    device: str = "auto"
    """'auto' (cuda if present), 'cpu', 'cuda', 'cuda:1', ..."""
    progress: bool = True
    """Show a progress bar."""
    # The alias: torchrun's own parser refuses `--log` anywhere on its command line (an ambiguous
    # prefix of its --log-dir, ...), so under torchrun the flag is spelled --trackers.
    log: Annotated[tuple[Literal["wandb", "tensorboard"], ...], tyro.conf.arg(aliases=("--trackers",))] = ()
    """Also send each metrics.jsonl record to these trackers (rank 0 only; results unchanged):
    'wandb' (the run's config.json as its config; offline under RUN/wandb/ unless WANDB_MODE is set
    or an API key is found), 'tensorboard' (event files under RUN/tensorboard/). Needs
    pip install 'usae[tracking]'. Under torchrun, spell it --trackers."""

    def __post_init__(self) -> None:
        checks = {
            "steps": self.steps >= 1,
            "batch_size": self.batch_size >= 1,
            "n_latents": self.n_latents >= 1,
            "log_every": self.log_every >= 1,
            "save_every": self.save_every >= 0,
            "dead_after_tokens": self.dead_after_tokens >= 1,
            "shuffle_buffer_mb": self.shuffle_buffer_mb >= 1,
            "lr": self.lr is None or self.lr > 0,
            "warmup_steps": self.warmup_steps is None or self.warmup_steps >= 0,
            "lr_end_ratio": 0.0 <= self.lr_end_ratio <= 1.0,
            "grad_clip": self.grad_clip is None or self.grad_clip > 0,
            "auxk_coef": self.auxk_coef >= 0,
            "k_aux": self.k_aux is None or self.k_aux >= 1,
        }
        refuse_invalid("train config", self, checks)
        if not 1 <= self.k <= self.n_latents:
            raise UsaeError(f"train config: k must be in [1, n_latents={self.n_latents}], got {self.k}")

    def sae_config(self, widths: dict[str, int]) -> SAEConfig:
        """The architecture this config trains for models of ``widths``: its fields named as SAEConfig's."""
        arch = {f.name: getattr(self, f.name) for f in dataclasses.fields(SAEConfig) if f.name != "widths"}
        return SAEConfig(widths=dict(widths), **arch)

    def resolved_warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(1000, self.steps // 20)

    def resolved_k_aux(self) -> int:
        return self.k_aux if self.k_aux is not None else max(1, min(self.n_latents // 2, 256))


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
    # Concept-class thresholds: the module constants above, which usae.model.metrics also uses.
    min_rate: float = MIN_RATE
    """Concept classes (docs/report.md): a model uses a concept only if it fires on at least this
    fraction of rows, on min_count rows and on min_share of the rows of the model where it fires most."""
    min_count: int = MIN_COUNT
    """A model uses a concept only if it fires on at least this many rows (see min_rate)."""
    min_share: float = MIN_SHARE
    """A model uses a concept only if it fires on at least this fraction of the rows of the model
    where the concept fires most (see min_rate)."""
    universal_fe: float = UNIVERSAL_FE
    """A concept used by every model is universal when its firing entropy is at least this (and
    universal_cofire holds)."""
    universal_cofire: float = UNIVERSAL_COFIRE
    """A concept used by every model is universal when, in every model, its co-fire proportion
    (rows where it fires in all models / rows where it fires in that model) is at least this."""
    report: bool = True
    """Also write report.md and PNG figures (RUN/baselines.json, splice.json and labels.json, if present,
    are included)."""
    label: bool = True
    """When the first store records per-image labels (`usae extract --labels`) and RUN/labels.json is not
    for it, name the concepts there first (`usae label` with its defaults) so the report shows them."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda', ..."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if not self.stores:
            raise UsaeError("evaluate: give at least one store")
        for field in ("min_rate", "min_share", "universal_fe", "universal_cofire"):
            if not 0.0 <= getattr(self, field) <= 1.0:
                raise UsaeError(f"evaluate: {field} must be in [0, 1], got {getattr(self, field)}")
        if self.min_count < 0:
            raise UsaeError(f"evaluate: min_count must be >= 0, got {self.min_count}")


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
class ExtractConfig:
    """Run M frozen vision backbones over an image set and write a paired activation store."""

    images: str
    """Image source: a folder (recursive), a .txt list of paths, 'hf:NAME[:SPLIT]' or a saved
    datasets directory (image column), or 'builtin:demo' (offline photos)."""
    models: tuple[str, ...]
    """Backbone specs [ALIAS=]KIND:ID[@LAYER][?OPTIONS]: timm:NAME, hf:REPO, openclip:ARCH/TAG,
    onnx:PATH@TENSOR, fake:w16s8, or a built-in name (effnet-lite0, open-nsfw, craft-vgg16). OPTIONS
    override the preprocessing: size=320 (or HxW), mean=R,G,B, std=R,G,B, scale=1|255 (with mean and
    std), bgr=0|1, layout=nchw|nhwc, joined by '&' (quote the spec in a shell); see docs/backbones.md."""
    out: Path
    """Store directory to create (work in progress lives in OUT.parts/ until it is finalised)."""
    grid: int | None = None
    """Side of the common token grid; default: the smallest native grid among the models."""
    view_size: int | None = None
    """Side of the canonical square view, in pixels; default: the largest model input size."""
    batch_size: int = 32
    """Images per forward pass."""
    max_images: int | None = None
    """Use at most this many images, spread evenly over the sorted source."""
    images_per_part: int = 256
    """Images per resumable unit of work (an interrupted run redoes at most one part)."""
    dtype: Literal["float16", "float32"] = "float16"
    """Store dtype."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda', 'cuda:1', ..."""
    split: str = "train"
    """Split of a Hugging Face dataset."""
    column: str = "image"
    """Image column of a Hugging Face dataset."""
    random_init: bool = False
    """Randomly initialised backbones (no weights download): for dry runs and tests."""
    decode_threads: int = 2
    """Threads decoding images ahead of the forward passes."""
    alpha_crop: bool = False
    """Crop images with transparency (cut-outs) to their visible pixels before the centred square, so
    the object fills the view instead of a flat border (the demo's stamps)."""
    labels: str | None = None
    """Per-image labels to record in the store: 'folders' (each image's folders below the source root),
    'hf' (a Hugging Face dataset's --label-column) or a CSV file of 'image,label[;label...]' rows."""
    label_column: str = "label"
    """Label column of a Hugging Face dataset (ClassLabel names are stored)."""
    val_fraction: float = 0.0
    """Hold out this fraction of the images (seeded, stratified by label) into a second store, OUT-val."""
    val_seed: int = 0
    """Seed of the held-out split."""
    overwrite: bool = False
    """Replace an existing finished store."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        checks = {
            "batch_size": self.batch_size >= 1,
            "images_per_part": self.images_per_part >= 1,
            "decode_threads": self.decode_threads >= 1,
            "grid": self.grid is None or self.grid >= 1,
            "view_size": self.view_size is None or self.view_size >= 1,
            "max_images": self.max_images is None or self.max_images >= 1,
            "val_fraction": 0.0 <= self.val_fraction < 1.0,
        }
        refuse_invalid("extract config", self, checks)


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
class ExploreConfig:
    """Write the concept explorer: a static site of top images with heatmaps for every concept."""

    run: tyro.conf.Positional[Path]
    """Run directory (from `usae train`). A report of `usae evaluate` in RUN (report.json, or the
    report-<store>.json of several stores) computed on all of STORE is reused; maximisations under
    RUN/maximize/ are shown on their concepts' pages."""
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
    """Also run coordinated activation maximisation for the N universal concepts of most energy."""
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
        checks["size"] = self.size is None or self.size >= 8
        refuse_invalid("maximize", self, checks)
