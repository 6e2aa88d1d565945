"""Resumable training checkpoints: weights, optimiser and trainer state under RUN/checkpoints/.

Layout of RUN/checkpoints/step-NNNNNNNN/:
  model.safetensors       parameters and buffers
  optimizer.safetensors   optimiser tensors; param groups as JSON in the file's metadata
  trainer.safetensors     trainer tensors (dead-latent counters)
  state.json              {"step": N, ...}; written last: a directory without it is ignored

Every file is written atomically (usae._io), and a checkpoint directory is renamed into place only
when complete, so a kill at any point never leaves a half-written checkpoint where a reader would
load it. Nothing here unpickles. See docs/format.md and docs/reliability.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch

from usae._io import (
    load_tensors,
    one_line,
    publish_dir,
    read_json,
    safetensors_metadata,
    save_tensors_atomic,
    write_json_atomic,
)
from usae.errors import UsaeError
from usae.model.sae import UniversalSAE
from usae.run import MODEL_NAME, load_state_into
from usae.training.adam import TrainOptimizer

KEEP_CHECKPOINTS = 2


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
    optimizer: TrainOptimizer,
    trainer: dict[str, torch.Tensor],
    state: dict[str, Any],
) -> Path:
    """Write checkpoints/step-N atomically, then drop all but the newest KEEP_CHECKPOINTS."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_tensors_atomic(tmp / MODEL_NAME, sae.state_dict())
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        save_tensors_atomic(tmp / "optimizer.safetensors", opt_tensors, opt_meta)
        save_tensors_atomic(tmp / "trainer.safetensors", trainer)
        write_json_atomic(tmp / "state.json", {"step": step, **state})
    except (UsaeError, OSError) as e:  # disk full: free what was written; older checkpoints stay
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, UsaeError):
            raise
        raise UsaeError(f"{tmp}: could not write checkpoint ({e.strerror or e})") from None
    if final.exists():
        shutil.rmtree(final)
    publish_dir(tmp, final)
    for old in sorted(c.path for c in all_checkpoints(root))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def all_checkpoints(root: Path) -> list[Checkpoint]:
    return [Checkpoint(p, int(p.name[5:])) for p in root.glob("step-*") if p.name[5:].isdigit()]


def load_checkpoint(
    ckpt: Checkpoint, sae: UniversalSAE, optimizer: TrainOptimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore ``sae`` and ``optimizer`` in place; return (trainer tensors, state.json).

    Every file is checked before anything is restored: a damaged checkpoint is a one-line
    UsaeError naming the file, and ``sae``/``optimizer`` are left as they were.
    """
    state = read_json(ckpt.path / "state.json", "checkpoint state")
    if not isinstance(state, dict) or state.get("step") != ckpt.step:
        raise UsaeError(f"{ckpt.path / 'state.json'}: field 'step' does not match the directory name")
    opt_path = ckpt.path / "optimizer.safetensors"
    opt_state = unflatten_optimizer(load_tensors(opt_path), safetensors_metadata(opt_path), opt_path)
    trainer_path = ckpt.path / "trainer.safetensors"
    trainer = load_tensors(trainer_path)
    check_trainer(trainer, sae, trainer_path)
    backup = {k: v.clone() for k, v in sae.state_dict().items()}
    load_state_into(sae, ckpt.path / MODEL_NAME)
    try:
        optimizer.load_state_dict(opt_state)
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
        sae.load_state_dict(backup)
        raise UsaeError(f"{opt_path}: optimizer state does not fit this run ({one_line(e)})") from None
    return trainer, state


def check_trainer(trainer: dict[str, torch.Tensor], sae: UniversalSAE, path: Path) -> None:
    shapes = {"since_fired_ms": (len(sae.model_names), sae.n_latents), "n_dead": ()}
    for key, shape in shapes.items():
        t = trainer.get(key)
        if t is None or tuple(t.shape) != shape or t.is_floating_point():
            got = None if t is None else f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"
            raise UsaeError(f"{path}: tensor {key!r} is {got}, expected int64 {shape}")


def _flatten_optimizer(
    optimizer: TrainOptimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Optimizer state as flat tensors ``state.<param>.<key>`` plus JSON param groups (no pickle)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, per_param in sd["state"].items():
        for key, value in per_param.items():
            tensors[f"state.{idx}.{key}"] = torch.as_tensor(value)
    return tensors, {"param_groups": json.dumps(sd["param_groups"])}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, str], where: Path) -> dict[str, Any]:
    try:
        groups = json.loads(meta["param_groups"])
    except (KeyError, ValueError, RecursionError):
        raise UsaeError(f"{where}: missing or malformed 'param_groups' metadata") from None
    if not isinstance(groups, list) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups
    ):
        raise UsaeError(f"{where}: 'param_groups' metadata is not a list of parameter groups")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit():
            raise UsaeError(f"{where}: unexpected tensor {name!r} (expected state.<param>.<key>)")
        state.setdefault(int(parts[1]), {})[parts[2]] = t
    return {"state": state, "param_groups": groups}
