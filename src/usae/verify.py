"""``usae verify``: re-check every byte of a store, run, pretrained or codes directory."""

from __future__ import annotations

from pathlib import Path

from usae._io import load_tensors, read_json, safetensors_metadata
from usae.config import VerifyConfig
from usae.data.codes import open_codes
from usae.data.store import open_store
from usae.errors import UsaeError
from usae.model.sae import UniversalSAE
from usae.run import CONFIG_NAME, MODEL_NAME, load, load_state_into
from usae.training.checkpoints import all_checkpoints, check_trainer, unflatten_optimizer


def verify(path: str | Path) -> str:
    """Check every byte of a store, run, pretrained or codes directory; returns a one-line summary.

    Store: every shard against its recorded sha256. Run/pretrained: config.json, model.safetensors
    (checksum, shapes, dtypes, finiteness) and every checkpoint's files. Raises UsaeError naming
    the first damaged file.
    """
    path = Path(path)
    if not path.is_dir():
        raise UsaeError(f"{path}: not a directory (verify takes a store, run, pretrained or codes directory)")
    if (path / "metadata.json").exists() and not (path / CONFIG_NAME).exists():
        meta = read_json(path / "metadata.json", "metadata")
        if isinstance(meta, dict) and meta.get("format") == "usae-codes":
            codes = open_codes(path)
            codes.verify()
            return f"ok: codes {path} ({codes.n_rows} rows x {len(codes.model_names)} models)"

        store = open_store(path, verify=True)
        return f"ok: store {path} ({store.n_rows} rows x {len(store.model_names)} models, {store.n_shards} shards)"
    sae = load(path)
    n_ckpt = 0
    for ckpt in sorted(all_checkpoints(path / "checkpoints"), key=lambda c: c.step):
        if not (ckpt.path / "state.json").is_file():
            continue
        read_json(ckpt.path / "state.json", "checkpoint state")
        copy = UniversalSAE(sae.cfg)
        load_state_into(copy, ckpt.path / MODEL_NAME)
        opt_path = ckpt.path / "optimizer.safetensors"
        unflatten_optimizer(load_tensors(opt_path), safetensors_metadata(opt_path), opt_path)
        check_trainer(load_tensors(ckpt.path / "trainer.safetensors"), copy, ckpt.path / "trainer.safetensors")
        n_ckpt += 1
    return f"ok: {path} ({len(sae.model_names)} models, {sae.n_latents} concepts, {n_ckpt} checkpoints)"


def verify_command(cfg: VerifyConfig) -> str:
    """``usae verify``: what the command prints."""
    return verify(cfg.path)
