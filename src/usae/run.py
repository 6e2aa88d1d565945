"""Run directories: ``config.json`` + ``model.safetensors`` — what they hold, how to save and load them.

Layout of RUN/ (docs/format.md):
  config.json             schema version, resolved train config, SAE architecture, models, store
  model.safetensors       the UniversalSAE's tensors (parameters and buffers), the newest save
  metrics.jsonl           training log (training/fit.py)
  checkpoints/            resumable training checkpoints (training/checkpoints.py)

``load`` also reads ``save_pretrained`` directories and migrates older schema versions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from usae._input import NUMBER, Maybe, check_schema
from usae._io import (
    CHECKSUM_KEY,
    load_tensors,
    read_json,
    safetensors_metadata,
    save_tensors_atomic,
    write_json_atomic,
)
from usae._version import __version__
from usae.config import SAEConfig, TrainConfig, from_json_dict, to_json_dict
from usae.data.store import Store, open_store
from usae.device import resolve_device
from usae.errors import UsaeError
from usae.model.sae import UniversalSAE

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
MODEL_NAME = "model.safetensors"
METRICS_NAME = "metrics.jsonl"
# Run and pretrained artifacts (config.json + model.safetensors). History, see docs/format.md:
#   1: W_enc stored (d, n_latents) until commit 0627d45, (n_latents, d) after it (same number);
#   2: W_enc always (n_latents, d); safetensors files carry a content checksum. 1 is migrated on load.
SCHEMA_VERSION = 2
# Formats whose config.json + model.safetensors describe a UniversalSAE; older schema versions
# that load() migrates (see migrate_tensors).
ARTIFACT_FORMATS = ("usae-run", "usae-pretrained")
MIGRATABLE_VERSIONS = (1,)
# RUN/report.json (one store) or RUN/report-<store>.json (several): `usae evaluate`'s reports.
REPORT_GLOBS = ("report.json", "report-*.json")
# RUN/baselines/<model>/: the independent SAEs `usae baseline` trains beside a run (splice uses them too).
BASELINES_DIR = "baselines"


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
    for key, kind in (("train", dict), ("store", dict), ("models", list)):  # hand-edited: readers index them
        if cfg.get(key) is not None and not isinstance(cfg[key], kind):
            raise UsaeError(f"{path}: field {key!r} must be a JSON {_JSON_KIND[kind]}, got {type(cfg[key]).__name__}")
    return cfg


_JSON_KIND = {dict: "object", list: "array"}


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


# Train-config fields that do not change what a run computes: where it lives and reads from (the
# store's content hash is checked separately), how it reports, where it runs.
RESULT_FREE_FIELDS = frozenset(
    {"resume", "overwrite", "progress", "device", "save_every", "log_every", "log", "store", "out"}
)


def differing_field(saved_train: dict[str, Any], cfg: TrainConfig, free: frozenset[str] = RESULT_FREE_FIELDS):
    """The first train setting where ``cfg`` differs from a saved run's, as (key, cfg's, saved); None if none.

    The one "is this the same run?" check (resume, reuse of a finished run). A field ``cfg`` leaves
    to its default (None: resolved when the run starts) matches whatever the run resolved it to.
    """
    given = to_json_dict(cfg)
    for key, value in saved_train.items():
        current = given.get(key)
        if key not in free and current is not None and current != value:
            return key, current, value
    return None


def load_train_config(run_dir: Path) -> TrainConfig:
    """The TrainConfig saved in a run's config.json (its resolved values: no auto value left None).

    The saved ``train`` object is flat (one key per field, whatever group the field is in); this
    reads files written before the fields were grouped, too.
    """
    saved = read_run_config(run_dir)
    return from_json_dict(TrainConfig, saved["train"], f"{run_dir}/{CONFIG_NAME}: train")


def finished_run(run_dir: Path, cfg: TrainConfig, free: frozenset[str] = RESULT_FREE_FIELDS) -> bool:
    """True when ``run_dir`` holds a complete, loadable run of ``cfg``'s training settings."""
    run_dir = Path(run_dir)
    if not (run_dir / MODEL_NAME).is_file():
        return False
    try:
        saved = read_run_config(run_dir)
        load(run_dir)
    except UsaeError:
        return False
    return differing_field(saved.get("train", {}), cfg, free) is None


def trained_store_hash(run_dir: str | Path) -> str | None:
    """The content hash of the store a run was trained on (None for pretrained or imported runs)."""
    return (read_run_config(Path(run_dir), ARTIFACT_FORMATS, older_ok=True).get("store") or {}).get("hash")


# -- a report and the weights it measured ------------------------------------------------------------
def weights_record(run_dir: str | Path) -> dict[str, Any]:
    """What a report records of the weights it measured: RUN/model.safetensors's own checksum (its
    header's ``usae_sha256``, no re-hash) and the run's newest checkpoint step (None if it has none)."""
    run_dir = Path(run_dir)
    sha = safetensors_metadata(run_dir / MODEL_NAME).get(CHECKSUM_KEY)
    steps = [int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step-*") if p.name[5:].isdigit()]
    return {"sha256": sha, "step": max(steps, default=None)}


def stale_report(run_dir: str | Path, report: dict[str, Any], path: Path) -> str | None:
    """Why ``report`` does not describe the run's weights now (one line naming ``path``), or None.

    A report of step 20 kept after ``train --resume`` to step 200 (or ``--overwrite``) would show
    the older model's numbers; so would a report that records no weights (an older usae wrote it).
    """
    measured = report.get("weights")
    if not isinstance(measured, dict) or not isinstance(measured.get("sha256"), str):
        return f"{path}: records no weights it measured (written by an older usae)"
    now = weights_record(run_dir)
    if measured["sha256"] != now["sha256"]:
        return (
            f"{path}: measured other weights (step {measured.get('step')}) than {Path(run_dir) / MODEL_NAME} "
            f"holds now (step {now['step']})"
        )
    return None


_PER_CONCEPT = {str: [NUMBER]}
REPORT_SCHEMA = {  # what the explorer and the card read of a report.json (docs/report.md has every key)
    "model_names": [str],
    "n_rows": int,
    "n_latents": int,
    "store": {"hash": Maybe(str)},
    "tau": Maybe(NUMBER),
    "fires": _PER_CONCEPT,
    "energy": _PER_CONCEPT,
    "firing_entropy": [Maybe(NUMBER)],
    "cofiring": {"cofires": [NUMBER], "proportion": {str: [Maybe(NUMBER)]}},
    "classes": {"labels": [str]},
    "r2_matrix": [[Maybe(NUMBER)]],
    **{k: Maybe(NUMBER) for k in ("r2_self_mean", "r2_cross_mean")},
    "weights": Maybe({"sha256": Maybe(str), "step": Maybe(int)}),
}


def check_report(report: Any, path: Path) -> dict[str, Any]:
    """``report`` checked against :data:`REPORT_SCHEMA`, every per-concept list ``n_latents`` long."""
    check_schema(report, REPORT_SCHEMA, path)
    n, names = report["n_latents"], report["model_names"]
    lists = {"firing_entropy": report["firing_entropy"], "classes.labels": report["classes"]["labels"]}
    lists |= {"cofiring.cofires": report["cofiring"]["cofires"]}
    lists |= {f"{key}.{m}": (report[key].get(m) or []) for key in ("fires", "energy") for m in names}
    lists |= {f"cofiring.proportion.{m}": report["cofiring"]["proportion"].get(m) or [] for m in names}
    for key, values in lists.items():
        if len(values) != n:
            raise UsaeError(f"{path}: {key!r} lists {len(values)} concepts, the report has n_latents {n}")
    return report


def run_reports(run_dir: str | Path) -> list[Path]:
    """The evaluation reports in a run directory: report.json, then report-<store>.json by name."""
    run_dir = Path(run_dir)
    return [p for pattern in REPORT_GLOBS for p in sorted(run_dir.glob(pattern)) if p.is_file()]


# -- a run beside a store ---------------------------------------------------------------------
def open_run_store(
    run: str | Path | UniversalSAE, store: str | Path | Store, device: str, models: Sequence[str] | None = None
) -> tuple[UniversalSAE, Store]:
    """The run (eval mode, on ``device``) and the store, checked to hold ``models`` (default: all
    of the run's) at the run's widths; one-line UsaeError naming the store and the models otherwise."""
    sae = run if isinstance(run, UniversalSAE) else load(run, device=resolve_device(device))
    store = store if isinstance(store, Store) else open_store(store)
    missing = [n for n in (models or sae.model_names) if store.widths.get(n) != sae.cfg.widths.get(n)]
    if missing:
        raise UsaeError(f"store {store.path} lacks the run's models {missing} at the run's widths")
    return sae.eval(), store


def trained_store_dir(run: str | Path) -> Path:
    """The directory of the store a run was trained on, from any working directory.

    RUN/config.json records it absolute; a relative path (older runs) is tried against the current
    directory and then the run directory's parent and each of its parents, keeping the first
    directory whose store has the recorded content hash (any store when no hash is recorded).
    One-line UsaeError when none is found.
    """
    where = Path(run) / "config.json"
    recorded = read_run_config(Path(run), ("usae-run", "usae-pretrained"), older_ok=True).get("store") or {}
    path = recorded.get("path")
    if not isinstance(path, str) or not path:
        raise UsaeError(f"{where}: records no store (field 'store.path'); pass --store")
    given = Path(path).expanduser()
    if given.is_absolute():
        if given.is_dir():
            return given
        raise UsaeError(f"{where}: field 'store.path' ({path}) is not a store here; pass --store")
    run_abs = Path(run).absolute()
    for base in dict.fromkeys([Path.cwd(), run_abs.parent, *run_abs.parent.parents]):
        if (base / given).is_dir() and _has_hash(base / given, recorded.get("hash")):
            return base / given
    raise UsaeError(
        f"{where}: field 'store.path' ({path}) is relative and no store with the run's hash was found from the "
        "current directory or the run's parent directories; pass --store"
    )


def _has_hash(store_dir: Path, expected: str | None) -> bool:
    """Whether ``store_dir`` is a store with content hash ``expected`` (any store when None)."""
    try:
        return expected is None or open_store(store_dir).hash == expected
    except UsaeError:
        return False


# -- what the explorer reads and writes in a run ------------------------------------------------
# RUN/maximize/: `usae maximize`'s results (concept-<k>/maximize.json + PNGs) and its spectrum cache.
MAXIMIZE_DIR = "maximize"
MAXIMIZE_RESULT_NAME = "maximize.json"


def maximize_dir(run_dir: str | Path) -> Path:
    """RUN/maximize: where `usae maximize` writes by default and the explorer looks."""
    return Path(run_dir) / MAXIMIZE_DIR


def concept_dir(root: str | Path, concept: int) -> Path:
    """Where the maximisation of ``concept`` is written under ``root`` (e.g. RUN/maximize)."""
    return Path(root) / f"concept-{int(concept)}"


def concept_of_dir(path: Path) -> int | None:
    """The concept of a ``concept-<k>`` directory (:func:`concept_dir`); None for any other name."""
    k = path.name.removeprefix("concept-")
    return int(k) if path.name.startswith("concept-") and k.isdigit() else None


def find_report(run_dir: str | Path, model_names: list[str], store: Store) -> tuple[Path, dict[str, Any]] | None:
    """(path, report) of RUN/report.json or a RUN/report-<store>.json (``usae evaluate RUN S1 S2``)
    computed on every row of ``store`` (its content hash, not its path) for these models, with the
    run's weights as they are now (:func:`stale_report`); None if none is. A report that does not fit
    :data:`REPORT_SCHEMA` is skipped with one warning.

    The name is only a hint: report.json is tried first, then the one named after the store's directory.
    """
    hint = f"report-{store.path.name}"
    candidates = sorted(run_reports(run_dir), key=lambda p: (p.name != "report.json", not p.stem.startswith(hint)))
    for path in candidates:
        try:
            report = read_json(path, "report")
        except UsaeError as e:
            log.warning("%s; skipped", e)
            continue
        if not isinstance(report, dict) or not isinstance(report.get("store"), dict):
            continue
        same = report["store"].get("hash") == store.hash and report.get("model_names") == model_names
        if not (same and report.get("n_rows") == store.n_rows and "classes" in report):
            continue
        try:
            check_report(report, path)
        except UsaeError as e:
            log.warning("%s; skipped", e)
            continue
        if (why := stale_report(run_dir, report, path)) is not None:
            log.info("%s; not used", why)
            continue
        return path, report
    return None
