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
where a reader would load it. Every safetensors file records a sha256 of its tensors in its header
(``usae_sha256``), checked on load, so a flipped bit is an error naming the file, not silently
different weights. Nothing here unpickles. See docs/format.md and docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import hashlib
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


CHECKSUM_KEY = "usae_sha256"
# Formats whose config.json + model.safetensors describe a UniversalSAE; older schema versions
# that load() migrates (see migrate_tensors).
ARTIFACT_FORMATS = ("usae-run", "usae-pretrained")
MIGRATABLE_VERSIONS = (1,)


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of every tensor, in name order.

    Independent of the safetensors byte layout, so it can be stored inside the file's own header.
    """
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        digest.update(f"{key}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """safetensors file (with a content checksum) written to ``path.tmp``, fsynced, renamed over ``path``.

    A failed write (disk full, ...) removes the temporary file and raises a one-line UsaeError;
    the previous ``path`` is untouched.
    """
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {**(metadata or {}), CHECKSUM_KEY: tensors_sha256(tensors)}
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        _sort_metadata_in_place(tmp)
        fsync_path(tmp)
        tmp.replace(path)
    except (OSError, SafetensorError) as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        msg = getattr(e, "strerror", None) or _one_line(e)
        raise UsaeError(f"{path}: could not write ({msg}); the previous file is unchanged") from None


def _sort_metadata_in_place(path: Path) -> None:
    """Rewrite the header's ``__metadata__`` in key order (same length, same offsets).

    safetensors writes metadata in hash-map order, which changes from process to process; sorted,
    the same tensors always give the same bytes (a finished run resumed is byte-for-byte a no-op).
    """
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        if len(header.get("__metadata__") or {}) < 2:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(new) <= n:  # always equal in practice; the padding keeps the data offset
            f.seek(8)
            f.write(new.ljust(n, b" "))


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())[:200]
    return text or e.__class__.__name__


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, checking its checksum when it has one.

    A missing, truncated, altered or foreign file is a one-line UsaeError naming it.
    """
    if not path.is_file():
        raise UsaeError(f"{path}: file not found")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError, MemoryError) as e:
        raise UsaeError(f"{path}: not a readable safetensors file ({_one_line(e)})") from None
    recorded = _safetensors_metadata(path).get(CHECKSUM_KEY)
    if recorded is not None and recorded != tensors_sha256(tensors):
        raise UsaeError(f"{path}: contents changed since writing (sha256 mismatch); the file is damaged")
    return tensors


def _safetensors_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UsaeError(f"{path}: not a readable safetensors file ({_one_line(e)})") from None


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


def read_run_config(run_dir: Path, formats: tuple[str, ...] = ("usae-run",), older_ok: bool = False) -> dict[str, Any]:
    """RUN/config.json, checked for format, schema version and the 'sae' field.

    ``older_ok``: also accept schema versions that :func:`migrate_tensors` upgrades (for loading
    weights; resuming training from an older run is refused).
    """
    path = Path(run_dir) / CONFIG_NAME
    if not Path(run_dir).is_dir():
        raise UsaeError(f"{run_dir}: no run directory")
    cfg = read_json(path, "run config")
    if not isinstance(cfg, dict) or cfg.get("format") not in formats:
        got = cfg.get("format") if isinstance(cfg, dict) else type(cfg).__name__
        raise UsaeError(f"{path}: not a usae config (format is {got!r}, expected one of {list(formats)})")
    version = cfg.get("schema_version")
    if version != SCHEMA_VERSION and not (older_ok and version in MIGRATABLE_VERSIONS):
        if version in MIGRATABLE_VERSIONS:
            raise UsaeError(
                f"{path}: written by an older usae (schema_version {version}); usae.load() migrates its "
                f"weights, but training cannot resume from it"
            )
        raise UsaeError(f"{path}: unsupported schema_version {version!r} (this usae reads {SCHEMA_VERSION})")
    if "sae" not in cfg:
        raise UsaeError(f"{path}: missing field 'sae'")
    return cfg


def sae_config_from_run(cfg: dict[str, Any], where: Path) -> SAEConfig:
    return from_json_dict(SAEConfig, cfg["sae"], f"{where}: sae")


def migrate_tensors(
    tensors: dict[str, torch.Tensor], sae_cfg: SAEConfig, version: int, where: Path
) -> dict[str, torch.Tensor]:
    """Upgrade the tensors of a schema ``version`` artifact to the current layout.

    Schema 1 stored W_enc as (d, n_latents) before commit 0627d45 and as (n_latents, d) after,
    under the same number. A non-square W_enc tells by its shape; a square one is oriented so its
    rows agree best with the decoder's (encoders start as the decoder and stay close to it).
    """
    if version != 1:
        return tensors
    out = dict(tensors)
    for name, d in sae_cfg.widths.items():
        key, n = f"heads.{name}.W_enc", sae_cfg.n_latents
        W, W_dec = out.get(key), out.get(f"heads.{name}.W_dec")
        if W is None or W.ndim != 2 or tuple(W.shape) not in ((d, n), (n, d)):
            continue  # the shape check reports it
        if d != n:
            transpose = tuple(W.shape) == (d, n)
        elif W_dec is not None and tuple(W_dec.shape) == (n, d):
            transpose = _row_agreement(W.t(), W_dec) > _row_agreement(W, W_dec)
            log.warning("%s: schema 1 model %r has a square W_enc; orientation chosen from the decoder", where, name)
        else:
            transpose = False
        if transpose:
            out[key] = W.t().contiguous()
    return out


def _row_agreement(W_sd: torch.Tensor, W_dec_sd: torch.Tensor) -> float:
    """Mean |cosine| between row i of W and row i of the decoder."""
    cos = torch.nn.functional.cosine_similarity(W_sd.double(), W_dec_sd.double(), dim=1)
    return float(cos.abs().mean())


_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def load_state_into(
    sae: torch.nn.Module, path: Path, schema_version: int = SCHEMA_VERSION, dtype: str | None = None
) -> None:
    """Load every tensor of ``sae`` from ``path``, migrating an older ``schema_version``.

    One error per problem, each naming the file and tensor: missing, unexpected, wrong shape,
    wrong dtype (``dtype``: the dtype config.json declares for float tensors), NaN/inf.
    """
    tensors = load_tensors(path)
    if schema_version != SCHEMA_VERSION and isinstance(getattr(sae, "cfg", None), SAEConfig):
        tensors = migrate_tensors(tensors, sae.cfg, schema_version, path)
    own = sae.state_dict()
    for key in own:
        if key not in tensors:
            raise UsaeError(f"{path}: missing tensor {key!r} (the config describes it)")
    for key in tensors:
        if key not in own:
            raise UsaeError(f"{path}: unexpected tensor {key!r} (not in the config's architecture)")
    want_dtype = _DTYPES.get(dtype) if dtype is not None else None
    if dtype is not None and want_dtype is None:
        raise UsaeError(f"{path}: config declares unknown dtype {dtype!r} (one of {list(_DTYPES)})")
    for key, t in tensors.items():
        if t.shape != own[key].shape:
            raise UsaeError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, config says {tuple(own[key].shape)}")
        _check_dtype(path, key, t, own[key], want_dtype)
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UsaeError(f"{path}: tensor {key!r} holds NaN or inf")
    sae.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})


def _check_dtype(path: Path, key: str, t: torch.Tensor, own: torch.Tensor, want: torch.dtype | None) -> None:
    got = str(t.dtype).removeprefix("torch.")
    if own.is_floating_point():
        if not t.is_floating_point():
            raise UsaeError(f"{path}: tensor {key!r} has dtype {got}, expected a float dtype")
        if want is not None and t.dtype != want:
            declared = str(want).removeprefix("torch.")
            raise UsaeError(f"{path}: tensor {key!r} has dtype {got}, config.json declares {declared}")
    elif t.is_floating_point() or t.dtype == torch.bool:
        raise UsaeError(f"{path}: tensor {key!r} has dtype {got}, expected an integer dtype")


def save_run(run_dir: Path, sae: UniversalSAE, config: dict[str, Any]) -> None:
    """Write RUN/config.json and RUN/model.safetensors (atomically, each)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / CONFIG_NAME, config)
    save_tensors_atomic(run_dir / MODEL_NAME, sae.state_dict(), metadata={"format": "usae-run"})


def load(run_dir: str | Path, device: str | torch.device = "cpu") -> UniversalSAE:
    """Load a trained UniversalSAE from a run directory (config.json + model.safetensors).

    Also loads a ``save_pretrained`` directory, and migrates older schema versions.
    """
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir, ARTIFACT_FORMATS, older_ok=True)
    sae = UniversalSAE(sae_config_from_run(cfg, run_dir / CONFIG_NAME))
    dtype = cfg.get("dtype")
    if dtype is not None and not isinstance(dtype, str):
        raise UsaeError(f"{run_dir / CONFIG_NAME}: field 'dtype' must be a string, got {dtype!r}")
    load_state_into(sae, run_dir / MODEL_NAME, cfg["schema_version"], dtype)
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
    """Restore ``sae`` and ``optimizer`` in place; return (trainer tensors, state.json).

    Every file is checked before anything is restored: a damaged checkpoint is a one-line
    UsaeError naming the file, and ``sae``/``optimizer`` are left as they were.
    """
    state = read_json(ckpt.path / "state.json", "checkpoint state")
    if not isinstance(state, dict) or state.get("step") != ckpt.step:
        raise UsaeError(f"{ckpt.path / 'state.json'}: field 'step' does not match the directory name")
    opt_path = ckpt.path / "optimizer.safetensors"
    opt_state = _unflatten_optimizer(load_tensors(opt_path), _safetensors_metadata(opt_path), opt_path)
    trainer_path = ckpt.path / "trainer.safetensors"
    trainer = load_tensors(trainer_path)
    _check_trainer(trainer, sae, trainer_path)
    backup = {k: v.clone() for k, v in sae.state_dict().items()}
    load_state_into(sae, ckpt.path / MODEL_NAME)
    try:
        optimizer.load_state_dict(opt_state)
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
        sae.load_state_dict(backup)
        raise UsaeError(f"{opt_path}: optimizer state does not fit this run ({_one_line(e)})") from None
    return trainer, state


def _check_trainer(trainer: dict[str, torch.Tensor], sae: UniversalSAE, path: Path) -> None:
    shapes = {"since_fired_ms": (len(sae.model_names), sae.n_latents), "n_dead": ()}
    for key, shape in shapes.items():
        t = trainer.get(key)
        if t is None or tuple(t.shape) != shape or t.is_floating_point():
            got = None if t is None else f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"
            raise UsaeError(f"{path}: tensor {key!r} is {got}, expected int64 {shape}")


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


# -- verification ---------------------------------------------------------------------------------
def verify(path: str | Path) -> str:
    """Check every byte of a store, run, pretrained or codes directory; returns a one-line summary.

    Store: every shard against its recorded sha256. Run/pretrained: config.json, model.safetensors
    (checksum, shapes, dtypes, finiteness) and every checkpoint's files. Raises UsaeError naming
    the first damaged file.
    """
    path = Path(path)
    if (path / "metadata.json").is_file() and not (path / CONFIG_NAME).is_file():
        meta = read_json(path / "metadata.json", "metadata")
        if isinstance(meta, dict) and meta.get("format") == "usae-codes":
            from usae.codes import open_codes

            codes = open_codes(path)
            for name in codes.model_names:
                codes.read(name)
            return f"ok: codes {path} ({codes.n_rows} rows x {len(codes.model_names)} models)"
        from usae.store import open_store

        store = open_store(path, verify=True)
        return f"ok: store {path} ({store.n_rows} rows x {len(store.model_names)} models, {store.n_shards} shards)"
    sae = load(path)
    n_ckpt = 0
    for ckpt in sorted(_all_checkpoints(path / "checkpoints"), key=lambda c: c.step):
        if not (ckpt.path / "state.json").is_file():
            continue
        read_json(ckpt.path / "state.json", "checkpoint state")
        copy = UniversalSAE(sae.cfg)
        load_state_into(copy, ckpt.path / MODEL_NAME)
        opt_path = ckpt.path / "optimizer.safetensors"
        _unflatten_optimizer(load_tensors(opt_path), _safetensors_metadata(opt_path), opt_path)
        _check_trainer(load_tensors(ckpt.path / "trainer.safetensors"), copy, ckpt.path / "trainer.safetensors")
        n_ckpt += 1
    return f"ok: {path} ({len(sae.model_names)} models, {sae.n_latents} concepts, {n_ckpt} checkpoints)"
