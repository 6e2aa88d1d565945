"""Typed configuration: the CLI, the saved ``config.json`` and validation in one place.

Each dataclass is a subcommand of ``usae``; its field docstrings become ``--help``. A resolved
config (auto values filled in) is what a run directory saves, so a run explains itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tyro

from usae.errors import UsaeError

# Run and pretrained artifacts (config.json + model.safetensors). History, see docs/format.md:
#   1: W_enc stored (d, n_latents) until commit 0627d45, (n_latents, d) after it (same number);
#   2: W_enc always (n_latents, d); safetensors files carry a content checksum. 1 is migrated on load.
SCHEMA_VERSION = 2

Rule = Literal["random-source", "all-sources", "as-released", "sparc", "crosscoder"]
Encoder = Literal["linear", "mlp"]
Activation = Literal["topk", "batchtopk"]
Normalization = Literal["scalar", "per-dim", "paper", "none"]
DecoderNorm = Literal["max1", "unit"]


def refuse_invalid(what: str, cfg: Any, checks: dict[str, bool]) -> None:
    """Raise a one-line UsaeError naming the first field of ``cfg`` whose check is False."""
    for name, ok in checks.items():
        if not ok:
            raise UsaeError(f"{what}: invalid {name}={getattr(cfg, name)!r}")


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
        if self.n_latents < 1:
            raise UsaeError(f"sae config: n_latents must be >= 1, got {self.n_latents}")
        if not 1 <= self.k <= self.n_latents:
            raise UsaeError(f"sae config: k must be in [1, n_latents={self.n_latents}], got {self.k}")


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
    min_rate: float = 1e-4
    """A model uses a concept that fires on at least this fraction of rows (concept classes)."""
    universal_fe: float = 0.8
    """A concept used by every model is universal when its firing entropy is at least this."""
    report: bool = True
    """Also write report.md and PNG figures (RUN/baselines.json, if present, is included)."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda', ..."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if not self.stores:
            raise UsaeError("evaluate: give at least one store")
        if not 0.0 <= self.universal_fe <= 1.0 or not 0.0 <= self.min_rate <= 1.0:
            raise UsaeError(
                f"evaluate: min_rate and universal_fe must be in [0, 1], got {self.min_rate}, {self.universal_fe}"
            )


@dataclass(frozen=True)
class AblateConfig:
    """Sweep a grid of training configurations; write a CSV and a markdown table of the headline numbers."""

    stores: tyro.conf.Positional[tuple[Path, ...]]
    """One or more paired activation stores (one grid axis)."""
    out: Path = Path("ablation")
    """Directory for the runs (OUT/runs/<point>) and OUT/ablation.{csv,md}."""
    rules: tuple[Rule, ...] = ("random-source",)
    """Objectives / update rules to compare (see `usae train --help`)."""
    n_models: tuple[int, ...] = (3,)
    """Numbers of models: the first N models of each store."""
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
    """Backbone specs [ALIAS=]KIND:ID[@LAYER]: timm:NAME, hf:REPO, openclip:ARCH/TAG, onnx:PATH@TENSOR,
    fake:w16s8, or a built-in name (effnet-lite0, open-nsfw, craft-vgg16)."""
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
    overwrite: bool = False
    """Replace an existing finished store."""

    def __post_init__(self) -> None:
        checks = {
            "batch_size": self.batch_size >= 1,
            "images_per_part": self.images_per_part >= 1,
            "decode_threads": self.decode_threads >= 1,
            "grid": self.grid is None or self.grid >= 1,
            "view_size": self.view_size is None or self.view_size >= 1,
            "max_images": self.max_images is None or self.max_images >= 1,
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
    maximize: int = 1
    """Render this many universal concepts by coordinated activation maximisation (short on CPU)."""
    synthetic: bool = False
    """Run the synthetic-world demo instead (planted concepts, checks their recovery)."""
    seed: int = 0
    """Seed for training (and the synthetic world)."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda'."""


# ---------------------------------------------------------------------------------------------
# JSON round trip with strict key checking


def to_json_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass as JSON-ready dict (paths as str, tuples as lists)."""

    def conv(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple | list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {str(a): conv(b) for a, b in v.items()}
        return v

    return {f.name: conv(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def from_json_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """Rebuild dataclass ``cls`` from ``data``; unknown or missing keys raise UsaeError naming ``where``."""
    if not isinstance(data, dict):
        raise UsaeError(f"{where}: expected a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UsaeError(f"{where}: unknown config key(s) {unknown}")
    hints = typing.get_type_hints(cls, include_extras=False)
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UsaeError(f"{where}: missing config key {name!r}")
            continue
        kwargs[name] = _coerce(hints[name], data[name], f"{where}: field {name!r}")
    return cls(**kwargs)


def _coerce(tp: Any, v: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _coerce(args[0], v, where)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, v, where)
            except UsaeError:
                continue
        raise UsaeError(f"{where}: value {v!r} has the wrong type")
    if origin is Literal:
        if v not in args:
            raise UsaeError(f"{where}: {v!r} is not one of {list(args)}")
        return v
    if origin is tuple:
        if not isinstance(v, list | tuple):
            raise UsaeError(f"{where}: expected a list, got {v!r}")
        inner = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        if inner is None and len(args) != len(v):
            raise UsaeError(f"{where}: expected {len(args)} items, got {len(v)}")
        # a variadic tuple[X, ...] has args (X, Ellipsis): coerce every item as X, not zip with args
        item_types = [inner] * len(v) if inner is not None else list(args) or [None] * len(v)
        return tuple(_coerce(t, x, where) for t, x in zip(item_types, v, strict=True))
    if origin is dict:
        if not isinstance(v, dict):
            raise UsaeError(f"{where}: expected an object, got {v!r}")
        return {str(a): _coerce(args[1], b, where) for a, b in v.items()}
    if tp is Path:
        if not isinstance(v, str):
            raise UsaeError(f"{where}: expected a path string, got {v!r}")
        return Path(v)
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise UsaeError(f"{where}: expected a number, got {v!r}")
        return float(v)
    if tp in (int, bool, str):
        if type(v) is not tp:
            raise UsaeError(f"{where}: expected {tp.__name__}, got {v!r}")
        return v
    return v


def fsync_path(path: Path) -> None:
    """Make a file's contents or a directory's entries (new files, renames) durable.

    A no-op where the platform or file system does not support it.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` via a temporary file, fsync and rename (never half-written)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as e:  # disk full, read-only, ...: the previous file (if any) is untouched
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UsaeError(f"{path}: could not write ({e.strerror or e}); the previous file is unchanged") from None


def read_json(path: Path, what: str) -> Any:
    """Read a JSON file; a missing or malformed file is a one-line UsaeError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UsaeError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, a 5000-digit int, deep nesting
        raise UsaeError(f"{path}: {what} is not valid JSON ({e.__class__.__name__}: {str(e)[:200]})") from None
    except OSError as e:
        raise UsaeError(f"{path}: {what} could not be read ({e.strerror or e})") from None


# -- sharing and interop (issue 8: hub.py, official.py, codes.py) -----------------------------


@dataclass(frozen=True)
class EncodeConfig:
    """Export each model's sparse codes for a store: top-k concept ids and values per row (docs/format.md)."""

    run: tyro.conf.Positional[Path]
    """Run or pretrained directory."""
    store: tyro.conf.Positional[Path]
    """Paired activation store holding (at least) the run's models."""
    out: Path = Path("codes")
    """Codes directory to create: metadata.json and <model>/{indices,values}-NNNNN.npy."""
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


@dataclass(frozen=True)
class VerifyConfig:
    """Check every byte of a store (shard hashes) or a run (tensor checksums, every checkpoint)."""

    path: tyro.conf.Positional[Path]
    """A store, run, pretrained or codes directory."""


@dataclass(frozen=True)
class ExploreConfig:
    """Write the concept explorer: a static site of top images with heatmaps for every concept."""

    run: tyro.conf.Positional[Path]
    """Run directory (from `usae train`). RUN/report.json is reused when it was computed on STORE;
    maximisations under RUN/maximize/ are shown on their concepts' pages."""
    store: tyro.conf.Positional[Path]
    """Store made by `usae extract` (it records the images and the token grid)."""
    out: Path = Path("explorer")
    """Site directory (index.html, concepts/, images/, ...); an earlier site there is replaced."""
    n_top: int = 8
    """Top images per concept and model."""
    labels: Path | None = None
    """JSON object {"<concept>": "label"} shown beside concept ids (escaped)."""
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
        checks["size"] = self.size is None or self.size >= 8
        refuse_invalid("maximize", self, checks)
