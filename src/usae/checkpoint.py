"""Run directories: ``config.json`` + ``model.safetensors``, and resumable training checkpoints.

Layout of RUN/:
  config.json             schema version, resolved train config, SAE architecture, models, store
  model.safetensors       the UniversalSAE's tensors (parameters and buffers), the newest save
  metrics.jsonl           training log
  checkpoints/step-NNNNNNNN/
      model.safetensors   parameters and buffers
      optimizer.safetensors  optimiser tensors; param groups as JSON in the file's metadata
      trainer.safetensors    trainer tensors (dead-latent counters)
      state.json          {"step": N, ...}; written last: a directory without it is ignored

Every file is written to a temporary name, fsynced and renamed, and a checkpoint directory is
renamed into place only when complete, so a kill at any point never leaves a half-written file
where a reader would load it. Nothing here unpickles.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from usae import __version__
from usae.config import (
    SCHEMA_VERSION,
    SAEConfig,
    from_json_dict,
    fsync_path,
    read_json,
    to_json_dict,
    write_json_atomic,
)
from usae.errors import UsaeError
from usae.sae import UniversalSAE

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
MODEL_NAME = "model.safetensors"
KEEP_CHECKPOINTS = 2


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """safetensors file written to ``path.tmp``, fsynced, then renamed over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(tmp), metadata=metadata)
    fsync_path(tmp)
    tmp.replace(path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, truncated or foreign file is a one-line UsaeError."""
    if not path.is_file():
        raise UsaeError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise UsaeError(f"{path}: not a readable safetensors file ({msg})") from None


def _safetensors_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UsaeError(f"{path}: not a readable safetensors file ({e})") from None


# -- run config ----------------------------------------------------------------------------------
def run_config(sae: UniversalSAE, train: dict[str, Any], store: dict[str, Any]) -> dict[str, Any]:
    """The JSON object saved as RUN/config.json."""
    return {
        "format": "usae-run",
        "schema_version": SCHEMA_VERSION,
        "usae_version": __version__,
        "sae": to_json_dict(sae.cfg),
        "models": [
            {
                "name": name,
                "width": sae.cfg.widths[name],
                "normalization": train.get("normalization"),
                "scale_mean": float(sae.head(name).scale_d.mean()),
                "shift_norm": float(sae.head(name).shift_d.norm()),
            }
            for name in sae.model_names
        ],
        "train": train,
        "store": store,
    }


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """RUN/config.json, checked for format and schema version."""
    path = Path(run_dir) / CONFIG_NAME
    if not Path(run_dir).is_dir():
        raise UsaeError(f"{run_dir}: no run directory")
    cfg = read_json(path, "run config")
    if not isinstance(cfg, dict) or cfg.get("format") != "usae-run":
        raise UsaeError(f"{path}: not a usae run config (missing format: usae-run)")
    version = cfg.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UsaeError(f"{path}: unsupported schema_version {version!r} (this usae reads {SCHEMA_VERSION})")
    if "sae" not in cfg:
        raise UsaeError(f"{path}: missing field 'sae'")
    return cfg


def sae_config_from_run(cfg: dict[str, Any], where: Path) -> SAEConfig:
    return from_json_dict(SAEConfig, cfg["sae"], f"{where}: sae")


def load_state_into(sae: torch.nn.Module, path: Path) -> None:
    """Load every tensor of ``sae`` from ``path``; missing, extra or misshapen tensors are errors."""
    tensors = load_tensors(path)
    own = sae.state_dict()
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    if missing or extra:
        raise UsaeError(f"{path}: tensors do not match the config (missing {missing[:3]}, unexpected {extra[:3]})")
    for key, t in tensors.items():
        if t.shape != own[key].shape:
            raise UsaeError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, config says {tuple(own[key].shape)}")
        if not torch.isfinite(t).all():
            raise UsaeError(f"{path}: tensor {key!r} holds NaN or inf")
    sae.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})


def save_run(run_dir: Path, sae: UniversalSAE, config: dict[str, Any]) -> None:
    """Write RUN/config.json and RUN/model.safetensors (atomically, each)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / CONFIG_NAME, config)
    save_tensors_atomic(run_dir / MODEL_NAME, sae.state_dict(), metadata={"format": "usae-run"})


def load(run_dir: str | Path, device: str | torch.device = "cpu") -> UniversalSAE:
    """Load a trained UniversalSAE from a run directory (config.json + model.safetensors)."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    sae = UniversalSAE(sae_config_from_run(cfg, run_dir / CONFIG_NAME))
    load_state_into(sae, run_dir / MODEL_NAME)
    return sae.to(device).eval()


# -- resumable checkpoints ----------------------------------------------------------------------
class Checkpoint(NamedTuple):
    """A complete training checkpoint on disk."""

    path: Path
    step: int


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint (one whose state.json exists), or None."""
    found = []
    for p in (Path(run_dir) / "checkpoints").glob("step-*"):
        if p.is_dir() and (p / "state.json").is_file() and p.name[5:].isdigit():
            found.append(Checkpoint(p, int(p.name[5:])))
    return max(found, key=lambda c: c.step) if found else None


def save_checkpoint(
    run_dir: Path,
    step: int,
    sae: UniversalSAE,
    optimizer: torch.optim.Optimizer,
    trainer: dict[str, torch.Tensor],
    state: dict[str, Any],
) -> Path:
    """Write checkpoints/step-N atomically, then drop all but the newest KEEP_CHECKPOINTS."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_tensors_atomic(tmp / MODEL_NAME, sae.state_dict())
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    save_tensors_atomic(tmp / "optimizer.safetensors", opt_tensors, opt_meta)
    save_tensors_atomic(tmp / "trainer.safetensors", trainer)
    write_json_atomic(tmp / "state.json", {"step": step, **state})
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_path(root)
    for old in sorted(c.path for c in _all_checkpoints(root))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _all_checkpoints(root: Path) -> list[Checkpoint]:
    return [Checkpoint(p, int(p.name[5:])) for p in root.glob("step-*") if p.name[5:].isdigit()]


def load_checkpoint(
    ckpt: Checkpoint, sae: UniversalSAE, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore ``sae`` and ``optimizer`` in place; return (trainer tensors, state.json)."""
    state = read_json(ckpt.path / "state.json", "checkpoint state")
    load_state_into(sae, ckpt.path / MODEL_NAME)
    opt_path = ckpt.path / "optimizer.safetensors"
    optimizer.load_state_dict(_unflatten_optimizer(load_tensors(opt_path), _safetensors_metadata(opt_path), opt_path))
    return load_tensors(ckpt.path / "trainer.safetensors"), state


def _flatten_optimizer(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Optimizer state as flat tensors ``state.<param>.<key>`` plus JSON param groups (no pickle)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, per_param in sd["state"].items():
        for key, value in per_param.items():
            tensors[f"state.{idx}.{key}"] = torch.as_tensor(value)
    return tensors, {"param_groups": json.dumps(sd["param_groups"])}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, str], where: Path) -> dict[str, Any]:
    try:
        groups = json.loads(meta["param_groups"])
    except (KeyError, json.JSONDecodeError):
        raise UsaeError(f"{where}: missing or malformed 'param_groups' metadata") from None
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    return {"state": state, "param_groups": groups}
