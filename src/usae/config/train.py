"""The training stage's configs: the SAE architecture (`SAEConfig`) and `usae train` (`TrainConfig`).

Each dataclass is a subcommand of ``usae``; its field docstrings become ``--help``.
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
