"""The training stage's configs: the SAE architecture (`SAEConfig`) and `usae train` (`TrainConfig`).

``TrainConfig`` is four groups of fields (``DataConfig``, ``ArchConfig``, ``OptimConfig``,
``OutputConfig``) shown flat on the command line and in config.json. Field docstrings become
``--help``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from usae.config.convert import FLAT, FLAT_UNLESS_DEFAULT, refuse_invalid
from usae.errors import UsaeError

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
class DataConfig:
    """Which rows each step reads, and where they go: runs that agree on all of it share one pass over
    the store (``fit_many``)."""

    store: tyro.conf.Positional[Path | None] = None
    """Paired activation store directory (written by `usae synth`, `write_store` or extraction); or
    none, with --images: the backbones run in the loop."""
    steps: int = 2000
    """Optimiser steps."""
    batch_size: int = 4096
    """Rows (tokens) per step."""
    seed: int = 0
    """Seed: initialisation, data order and source choice. A run is deterministic on CPU."""
    models: tuple[str, ...] | None = None
    """Subset of the store's models to train on (default: all, in store order). With --images: the
    backbone specs, as `usae extract --models` takes them."""
    shuffle_buffer_mb: int = 256
    """Rows are shuffled within windows of about this many MB read whole from the store; two
    windows are in memory at a time (the one in use and the next, read ahead)."""
    device: str = "auto"
    """'auto' (cuda if present), 'cpu', 'cuda', 'cuda:1', ..."""

    def __post_init__(self) -> None:
        _as_paths(self, "store")
        checks = {
            "steps": self.steps >= 1,
            "batch_size": self.batch_size >= 1,
            "shuffle_buffer_mb": self.shuffle_buffer_mb >= 1,
        }
        refuse_invalid("train config", self, checks)


@dataclass(frozen=True)
class SourceConfig:
    """Training with the backbones in the loop (``--images``, no store): which images, and how their
    tokens are made — the same alignment and token draw as `usae extract` with the same flags."""

    images: str | None = None
    """Image source (as `usae extract --images` takes it): each step's tokens come from running the
    --models backbones on these images in the loop, so no store is written. Give no STORE then."""
    grid: int | None = None
    """Side of the common token grid; default: the smallest native grid among the models."""
    view_size: int | None = None
    """Side of the canonical square view, in pixels; default: the largest model input size."""
    tokens_per_image: int | None = None
    """Keep only this many tokens of each image (drawn per image from --token-seed, the same for every model)."""
    token_seed: int = 0
    """Seed of the --tokens-per-image draw."""
    max_images: int | None = None
    """Use at most this many images, spread evenly over the sorted source."""
    image_batch_size: int = 32
    """Images per backbone forward pass."""
    decode_threads: int = 2
    """Threads decoding images for the backbones."""
    random_init: bool = False
    """Randomly initialised backbones (no weights download): for dry runs and tests."""
    alpha_crop: bool = False
    """Crop images with transparency to their visible pixels (as `usae extract --alpha-crop`)."""
    image_split: str = "train"
    """Split of a Hugging Face dataset (--images hf:NAME)."""
    image_column: str = "image"
    """Image column of a Hugging Face dataset."""
    token_dtype: Literal["float16", "float32"] = "float16"
    """Precision the tokens are kept in (a store's dtype): float16 halves the shuffle buffer's memory
    and makes the rows equal to those of a float16 store of the same images."""
    stats_images: int = 512
    """Images (spread evenly over the training images) whose tokens give each model's normalisation
    statistics before the first step; all of them when the source has fewer."""
    val_images: str | None = None
    """Held-out image source for the validations and the end-of-run R² (default: --val-fraction)."""
    val_fraction: float = 0.0
    """Hold out this fraction of the --images (seeded) for the validations and the end-of-run R²."""
    val_seed: int = 0
    """Seed of the --val-fraction split."""

    def __post_init__(self) -> None:
        checks = {
            "grid": self.grid is None or 1 <= self.grid <= 1024,
            "view_size": self.view_size is None or 1 <= self.view_size <= 8192,
            "tokens_per_image": self.tokens_per_image is None or self.tokens_per_image >= 1,
            "max_images": self.max_images is None or self.max_images >= 1,
            "image_batch_size": self.image_batch_size >= 1,
            "decode_threads": self.decode_threads >= 1,
            "stats_images": self.stats_images >= 1,
            "val_fraction": 0.0 <= self.val_fraction < 1.0,
        }
        refuse_invalid("train config", self, checks)
        if self.val_images is not None and self.val_fraction > 0:
            raise UsaeError("train config: give --val-images or --val-fraction, not both")


@dataclass(frozen=True)
class ArchConfig:
    """What is built: the SAE's architecture (``SAEConfig``'s fields but the widths, which the store
    gives), its input normalisation and its initialisation."""

    n_latents: int = 4096
    """Number of shared concepts (dictionary size)."""
    k: int = 32
    """Active concepts per token."""
    encoder: Encoder = "linear"
    """Per-model encoder: 'linear' or 'mlp' (Linear + BatchNorm, the paper's mlp_bn_1)."""
    activation: Activation = "topk"
    """'topk' or 'batchtopk'."""
    decoder_norm: DecoderNorm = "max1"
    """Dictionary rows: 'max1' (norm <= 1) or 'unit' (norm == 1, the paper). See docs/defaults.md."""
    normalization: Normalization = "scalar"
    """Input normalisation per model: 'scalar' (per-dim mean, one scalar std), 'per-dim'
    (per-dim mean and std), 'paper' (one scalar mean and std, as released), 'none'."""
    init: Literal["data", "random"] = "data"
    """Dictionary init: rows from the same random data rows in every model, or random directions.
    Encoders start as the decoder transpose either way."""
    extend: Path | None = None
    """Add models to a trained universe: RUN whose models stay frozen; only the store's other models'
    encoders and decoders are fit (the store must hold the run's models, paired, plus the new ones)."""

    def __post_init__(self) -> None:
        _as_paths(self, "extend")
        refuse_invalid("train config", self, {"n_latents": self.n_latents >= 1})
        if not 1 <= self.k <= self.n_latents:
            raise UsaeError(f"train config: k must be in [1, n_latents={self.n_latents}], got {self.k}")

    def sae_config(self, widths: dict[str, int]) -> SAEConfig:
        """The architecture for models of ``widths``: this group's fields named as SAEConfig's."""
        arch = {f.name: getattr(self, f.name) for f in dataclasses.fields(SAEConfig) if f.name != "widths"}
        return SAEConfig(widths=dict(widths), **arch)


@dataclass(frozen=True)
class OptimConfig:
    """How each step updates it: the update rule, the losses, the optimiser and its LR schedule."""

    rule: Rule = "random-source"
    """'random-source': each step encodes one random model and decodes to all (paper);
    'all-sources': every model encodes each step; 'as-released': random-source but only the
    sampled model's parameters are stepped, discarding cross-model gradients (official code).
    Baseline objectives under the same trainer: 'sparc' (SPARC's global TopK: one index set from
    the summed pre-activations, per-model values, all-to-all reconstruction) and 'crosscoder'
    (acausal crosscoder: one code from the summed pre-activations of all models). These two use
    no AuxK."""
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
    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss that revives dead latents (0 disables)."""
    k_aux: int | None = None
    """Dead latents used by AuxK per row. Default: min(n_latents // 2, 256)."""
    dead_after_tokens: int = 262_144
    """A latent is dead for a model after this many of its encoded tokens without firing."""
    select_precision: Literal["float32", "bfloat16"] | None = None
    """Precision of the one dense matmul that chooses each token's k latents (linear TopK
    encoders). The chosen entries' values and every gradient stay full precision, so bfloat16 only
    changes near-ties at the k-th place. Default: bfloat16 where the device multiplies it natively
    (CUDA sm80+, CPUs with AVX512-BF16 or AMX; 3-4x faster than float32 there), else float32."""

    patience: int = 0
    """Stop early after this many held-out validations (--val-every) without a lower held-out loss
    (0: train every step). Needs a store with a held-out twin (usae extract --val-fraction)."""

    def __post_init__(self) -> None:
        checks = {
            "patience": self.patience >= 0,
            "dead_after_tokens": self.dead_after_tokens >= 1,
            "lr": self.lr is None or self.lr > 0,
            "warmup_steps": self.warmup_steps is None or self.warmup_steps >= 0,
            "lr_end_ratio": 0.0 <= self.lr_end_ratio <= 1.0,
            "grad_clip": self.grad_clip is None or self.grad_clip > 0,
            "auxk_coef": self.auxk_coef >= 0,
            "k_aux": self.k_aux is None or self.k_aux >= 1,
        }
        refuse_invalid("train config", self, checks)


@dataclass(frozen=True)
class OutputConfig:
    """Where the run is written, how often, and who else hears of it: nothing here changes a result."""

    out: Path = Path("runs/usae")
    """Run directory: config.json, model.safetensors, metrics.jsonl, checkpoints/."""
    log_every: int = 50
    """Write metrics.jsonl every N steps (the only host syncs in the loop)."""
    save_every: int = 0
    """Write a resumable checkpoint every N steps (0: only at the end)."""
    resume: bool = False
    """Continue from the newest checkpoint in --out."""
    overwrite: bool = False
    """Allow training into a run directory that already holds a run."""
    progress: bool = True
    """Show a progress bar."""
    # The alias: torchrun's own parser refuses `--log` anywhere on its command line (an ambiguous
    # prefix of its --log-dir, ...), so under torchrun the flag is spelled --trackers.
    log: Annotated[tuple[Literal["wandb", "tensorboard"], ...], tyro.conf.arg(aliases=("--trackers",))] = ()
    """Also send each metrics.jsonl record to these trackers (rank 0 only; results unchanged):
    'wandb' (the run's config.json as its config; offline under RUN/wandb/ unless WANDB_MODE is set
    or an API key is found), 'tensorboard' (event files under RUN/tensorboard/). Needs
    pip install 'usae[tracking]'. Under torchrun, spell it --trackers."""

    val_every: int | None = None
    """Measure held-out loss and self/cross R² every N steps and at the last (into metrics.jsonl as
    val/..., the progress bar and the trackers) and keep the best model in RUN/best/. Needs the
    store's held-out twin (usae extract --val-fraction). Default: max(--log-every, steps // 20) when
    the twin exists, else 0 (off)."""
    val_rows: int = 8192
    """Held-out rows each validation reads (the twin's first N; read once, kept in memory)."""

    def __post_init__(self) -> None:
        _as_paths(self, "out")
        checks = {
            "log_every": self.log_every >= 1,
            "save_every": self.save_every >= 0,
            "val_every": self.val_every is None or self.val_every >= 0,
            "val_rows": self.val_rows >= 1,
        }
        refuse_invalid("train config", self, checks)


def _as_paths(group: Any, *names: str) -> None:
    """Path fields given as strings in Python (``TrainConfig(out="run")``) become Paths."""
    for name in names:
        if isinstance(getattr(group, name), str):
            object.__setattr__(group, name, Path(getattr(group, name)))


_GROUPS = {"data": DataConfig, "source": SourceConfig, "arch": ArchConfig, "optim": OptimConfig, "io": OutputConfig}
_GROUP_OF = {f.name: group for group, cls in _GROUPS.items() for f in dataclasses.fields(cls)}


@dataclass(frozen=True, init=False)
class TrainConfig:
    """Fit a universal SAE on a paired activation store.

    Attributes:
        data: Which rows each step reads, on which device (runs that agree on all of it share one
            pass over the store: ``fit_many``).
        source: With --images (no store): the images and backbones the rows come from.
        arch: What is built: the SAE's architecture, input normalisation and initialisation.
        optim: How it is updated: the rule, the losses, the optimiser and its LR schedule.
        io: Where the run is written, how often, and to which trackers (nothing here changes a result).

    The groups are invisible from outside: the flags are ``--k``, not ``--arch.k``; config.json's
    ``train`` object is flat; and in Python ``TrainConfig(store=..., k=8)`` takes any field by its own
    name (whole groups too: ``TrainConfig(data=..., arch=...)``), ``cfg.k`` reads ``cfg.arch.k``,
    and ``dataclasses.replace(cfg, k=8)`` replaces one field. The auto values (``None``: lr,
    warmup_steps, k_aux, models, select_precision) are resolved once, when a run opens
    (``usae.training.resume.resolve``); the training loop reads that resolved config.
    """

    data: tyro.conf.OmitArgPrefixes[DataConfig] = dataclasses.field(default_factory=DataConfig, metadata=FLAT)
    source: tyro.conf.OmitArgPrefixes[SourceConfig] = dataclasses.field(
        default_factory=SourceConfig, metadata=FLAT_UNLESS_DEFAULT
    )
    arch: tyro.conf.OmitArgPrefixes[ArchConfig] = dataclasses.field(default_factory=ArchConfig, metadata=FLAT)
    optim: tyro.conf.OmitArgPrefixes[OptimConfig] = dataclasses.field(default_factory=OptimConfig, metadata=FLAT)
    io: tyro.conf.OmitArgPrefixes[OutputConfig] = dataclasses.field(default_factory=OutputConfig, metadata=FLAT)

    def __init__(
        self,
        store: Path | str | None = None,
        *,
        data: DataConfig | None = None,
        source: SourceConfig | None = None,
        arch: ArchConfig | None = None,
        optim: OptimConfig | None = None,
        io: OutputConfig | None = None,
        **fields: Any,
    ) -> None:
        if store is not None:
            fields["store"] = store
        given = {"data": data, "source": source, "arch": arch, "optim": optim, "io": io}
        for name, cls in _GROUPS.items():
            own = {key: fields.pop(key) for key in list(fields) if _GROUP_OF.get(key) == name}
            group = given[name]
            object.__setattr__(self, name, cls(**own) if group is None else dataclasses.replace(group, **own))
        if fields:
            raise TypeError(f"TrainConfig got unexpected keyword argument(s) {sorted(fields)}")
        if (self.data.store is None) == (self.source.images is None):
            raise UsaeError(
                "train config: give a STORE, or --images SOURCE with --models SPEC... (not both; usae train --help)"
            )
        if self.source.images is not None and not self.data.models:
            raise UsaeError("train config: --images needs the backbones: --models SPEC [SPEC ...]")

    def __getattr__(self, name: str) -> Any:
        """A field read by its own name (``cfg.k``): from its group (called only when no attribute matches)."""
        group = _GROUP_OF.get(name)
        if group is None:
            raise AttributeError(f"'TrainConfig' object has no attribute {name!r}")
        return getattr(getattr(self, group), name)

    def sae_config(self, widths: dict[str, int]) -> SAEConfig:
        """The architecture this config trains for models of ``widths`` (``arch.sae_config``)."""
        return self.arch.sae_config(widths)


def default_warmup(steps: int) -> int:
    """Warmup steps when --warmup-steps is not given: 5% of the steps, at most 1000."""
    return min(1000, steps // 20)


def default_k_aux(n_latents: int) -> int:
    """AuxK's dead latents per row when --k-aux is not given: half the dictionary, at most 256."""
    return max(1, min(n_latents // 2, 256))
