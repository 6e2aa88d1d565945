"""Shareable artifacts: ``save_pretrained`` / ``from_pretrained``, a model card, Hub upload.

A pretrained directory is three files (specified in docs/format.md, readable without usae)::

    DIR/
      config.json         format "usae-pretrained", schema_version, the SAE architecture, dtype,
                          models (name, width, backbone details), training and data summary, metrics
      model.safetensors   every tensor of the UniversalSAE, named heads.<model>.<tensor>
      README.md           a model card generated from config.json

``from_pretrained`` takes such a directory, a run directory, or a Hugging Face Hub repo id
(downloaded with ``huggingface_hub.snapshot_download``; offline, only the local cache is used).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from usae._input import NUMBER, Maybe, check_schema
from usae._io import check_output, output_dir, read_json, save_tensors_atomic, write_json_atomic, write_text_atomic
from usae._version import __version__
from usae.config import ExportConfig, to_json_dict
from usae.errors import UsaeError
from usae.model.sae import UniversalSAE
from usae.run import CONFIG_NAME, MODEL_NAME, SCHEMA_VERSION, read_run_config, run_reports, stale_report
from usae.run import load as load_artifact

log = logging.getLogger(__name__)

FORMAT = "usae-pretrained"
CARD_NAME = "README.md"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_REPO_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
# Headline numbers copied from an evaluation report (report.json) into config.json and the card.
HEADLINE_KEYS = ("r2_self_mean", "r2_cross_mean", "fvu", "l0", "dead_fraction")


def pretrained_config(
    sae: UniversalSAE,
    *,
    dtype: str = "float32",
    models_info: dict[str, dict[str, Any]] | None = None,
    train: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The config.json of a pretrained directory (see docs/format.md)."""
    models_info = models_info or {}
    unknown = sorted(set(models_info) - set(sae.model_names))
    if unknown:
        raise UsaeError(f"save_pretrained: models_info names models {unknown} that the SAE does not have")
    models = []
    for name in sae.model_names:
        h = sae.head(name)
        models.append(
            {
                "name": name,
                "width": sae.cfg.widths[name],
                "scale_mean": float(h.scale_d.mean()),
                "shift_norm": float(h.shift_d.norm()),
                **models_info.get(name, {}),
            }
        )
    cfg = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "usae_version": __version__,
        "sae": to_json_dict(sae.cfg),
        "dtype": dtype,
        "models": models,
        "train": train,
        "data": data,
        "metrics": metrics,
    }
    try:
        json.dumps(cfg, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UsaeError(f"save_pretrained: metadata is not JSON-serialisable ({e})") from None
    return cfg


def save_pretrained(
    sae: UniversalSAE,
    save_dir: str | Path,
    *,
    dtype: str = "float32",
    models_info: dict[str, dict[str, Any]] | None = None,
    train: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
) -> Path:
    """Write ``sae`` as config.json + model.safetensors + README.md into ``save_dir``.

    ``dtype`` casts floating tensors ('float16'/'bfloat16' halve the file). ``models_info``
    (model name -> e.g. {"backbone": ..., "layer": ...}), ``train``, ``data`` and ``metrics``
    are free-form JSON recorded in config.json and shown in the card. Each file is written
    atomically; an existing directory that is not a usae artifact is refused. ``push_to_hub``:
    also upload the directory to that Hub repo id (needs network and a token).
    """
    if dtype not in DTYPES:
        raise UsaeError(f"save_pretrained: dtype must be one of {list(DTYPES)}, got {dtype!r}")
    # An existing pretrained directory is replaced file by file; a run or any other directory is refused.
    save_dir = check_output(save_dir, FORMAT, overwrite=True, flag="save_pretrained")
    cfg = pretrained_config(sae, dtype=dtype, models_info=models_info, train=train, data=data, metrics=metrics)
    save_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in sae.state_dict().items()}
    save_tensors_atomic(save_dir / MODEL_NAME, tensors, metadata={"format": FORMAT})
    write_json_atomic(save_dir / CONFIG_NAME, cfg)
    write_text_atomic(save_dir / CARD_NAME, model_card(cfg))
    log.info("saved %s (%d models, %d latents)", save_dir, len(sae.model_names), sae.n_latents)
    if push_to_hub is not None:
        upload(save_dir, push_to_hub, private=private)
    return save_dir


def from_pretrained(
    name_or_path: str | Path,
    *,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> UniversalSAE:
    """Load a UniversalSAE from a pretrained or run directory, or a Hub repo id ("owner/name").

    A local directory wins over a repo id of the same spelling. Loading checks format, schema
    version (migrating older ones of ours), every tensor's presence, shape and dtype, and the
    file checksum; each problem is a one-line UsaeError naming the file and field.
    """
    path = Path(name_or_path)
    if not path.exists() and isinstance(name_or_path, str) and _REPO_ID_RE.fullmatch(name_or_path):
        path = download(name_or_path, revision=revision, cache_dir=cache_dir)
    elif not path.is_dir():
        raise UsaeError(f"{name_or_path}: no such directory (and not a Hub repo id 'owner/name')")
    return load_artifact(path, device=device)


def download(repo_id: str, *, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """Fetch a pretrained directory from the Hub (or the local cache when offline); returns its path."""
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=[CONFIG_NAME, MODEL_NAME, CARD_NAME],
        )
    except Exception as e:  # network, auth, offline-and-not-cached: all end the same way for the user
        msg = " ".join(str(e).split())[:200] or e.__class__.__name__
        raise UsaeError(f"{repo_id}: could not download from the Hugging Face Hub ({msg})") from None
    return Path(local)


def upload(save_dir: str | Path, repo_id: str, *, private: bool = False, message: str | None = None) -> str:
    """Upload a pretrained directory to the Hub repo ``repo_id`` (created if needed); returns its URL."""
    from huggingface_hub import HfApi

    save_dir = Path(save_dir)
    read_run_config(save_dir, (FORMAT, "usae-run"))  # refuse to upload something that would not load
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(save_dir),
            allow_patterns=[CONFIG_NAME, MODEL_NAME, CARD_NAME],
            commit_message=message or f"usae {__version__}: upload {save_dir.name}",
        )
    except Exception as e:
        msg = " ".join(str(e).split())[:200] or e.__class__.__name__
        raise UsaeError(f"{repo_id}: upload to the Hugging Face Hub failed ({msg})") from None
    return f"https://huggingface.co/{repo_id}"


# -- from a run ---------------------------------------------------------------------------------
def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    dtype: str = "float32",
    push_to_hub: str | None = None,
    private: bool = False,
    overwrite: bool = False,
) -> Path:
    """``save_pretrained`` of a trained run, with its training summary, store details and report.

    Headline metrics come from the run's reports when present (``usae evaluate`` writes report.json,
    or report-<store>.json per store; a held-out store's is preferred); model details from the store's ``extra["backbones"]`` (written by ``usae extract``) when the store is still there.
    Refuses, before writing anything, an ``out`` that is the run (or inside it, or contains it), any
    other artifact, or an existing non-empty directory unless ``overwrite`` (and then only a
    pretrained directory). A failed export leaves no empty ``out``.
    """
    run_dir = Path(run_dir)
    out = check_output(out, FORMAT, overwrite=overwrite, reading=(run_dir,))
    run_cfg = read_run_config(run_dir, ("usae-run",), older_ok=True)
    sae = load_artifact(run_dir)
    store = run_cfg.get("store") if isinstance(run_cfg.get("store"), dict) else {}
    data = {k: store.get(k) for k in ("hash", "n_rows") if k in store}
    models_info = _store_models_info(store.get("path"), sae.model_names, data)
    metrics = _headline(run_dir)
    train = run_cfg.get("train") if isinstance(run_cfg.get("train"), dict) else None
    if isinstance(run_cfg.get("imported_from"), dict):
        data["imported_from"] = run_cfg["imported_from"]
    with output_dir(out):
        return save_pretrained(
            sae,
            out,
            dtype=dtype,
            models_info=models_info,
            train=train,
            data=data,
            metrics=metrics,
            push_to_hub=push_to_hub,
            private=private,
        )


def _store_models_info(store_path: Any, names: list[str], data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    if not isinstance(store_path, str) or not (Path(store_path) / "metadata.json").is_file():
        return {}
    from usae.data.store import open_store

    try:
        store = open_store(store_path)
    except UsaeError as e:
        log.warning("not reading model details from store %s: %s", store_path, e)
        return {}
    data.update(dtype=store.metadata.get("dtype"), tokens_per_image=store.tokens_per_image, grid=store.grid)
    if store.image_ids is not None:
        data["n_images"] = len(store.image_ids)
    backbones = store.extra.get("backbones")
    if isinstance(backbones, list):  # `usae extract` writes one {"name", "spec", "layer", ...} per model
        backbones = {b["name"]: b for b in backbones if isinstance(b, dict) and isinstance(b.get("name"), str)}
    if not isinstance(backbones, dict):
        return {}
    return {n: dict(backbones[n]) for n in names if isinstance(backbones.get(n), dict)}


_HEADLINE_SCHEMA = {
    **{k: Maybe(NUMBER) for k in ("r2_self_mean", "r2_cross_mean")},
    **{k: Maybe({str: Maybe(NUMBER)}) for k in ("fvu", "l0", "dead_fraction")},
    "store": Maybe({"path": Maybe(str), "trained_on": Maybe(bool)}),
    "classes": Maybe({"counts": Maybe({str: int})}),
}


def _headline(run_dir: Path) -> dict[str, Any] | None:
    """Headline numbers of the run's reports: a held-out store's first, else the first readable one.

    A report of other weights than the run's now (``stale_report``) is refused: the card would show
    an older model's numbers. One that does not parse or fit the schema is skipped with a warning.
    """
    reports = []
    for path in run_reports(run_dir):
        try:
            report = read_json(path, "report")
            check_schema(report, _HEADLINE_SCHEMA, path)
        except UsaeError as e:
            log.warning("%s; not used for the card's metrics", e)
            continue
        if (why := stale_report(run_dir, report, path)) is not None:
            raise UsaeError(f"{why}; run `usae evaluate {run_dir} STORE` again (or delete it) before exporting")
        reports.append(report)
    if not reports:
        return None
    report = next((r for r in reports if (r.get("store") or {}).get("trained_on") is False), reports[0])
    out = {k: report[k] for k in HEADLINE_KEYS if k in report}
    classes = report.get("classes")
    if isinstance(classes, dict) and isinstance(classes.get("counts"), dict):
        out["concept_classes"] = classes["counts"]
    store = report.get("store") if isinstance(report.get("store"), dict) else {}
    if out and isinstance(store.get("path"), str):
        out["measured_on"] = {"store": store["path"], "held_out": store.get("trained_on") is False}
    return out or None


# -- model card ---------------------------------------------------------------------------------
def model_card(cfg: dict[str, Any]) -> str:
    """README.md for a pretrained directory: Hub front matter, models, training data, metrics, usage."""
    sae, models = cfg["sae"], cfg["models"]
    names = [m["name"] for m in models]
    lines = [
        "---",
        "library_name: usae",
        "tags:",
        "- sparse-autoencoder",
        "- universal-sparse-autoencoder",
        "- interpretability",
        "---",
        "",
        f"# Universal sparse autoencoder over {len(names)} models: {', '.join(names)}",
        "",
        f"One dictionary of **{sae['n_latents']} concepts** shared by {len(names)} vision models; "
        f"each token activates **k = {sae['k']}** of them ({sae['activation']}, {sae['encoder']} encoder, "
        f"decoder rows {sae['decoder_norm']}). A code from any model's encoder reconstructs every model "
        "(Thasarathan et al. 2025, arXiv 2502.03714).",
        "",
        "## Models",
        "",
    ]
    extra_keys = sorted({k for m in models for k in m} - {"name", "width", "scale_mean", "shift_norm"})
    header = ["model", "width", *extra_keys]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in models:
        cells = [m["name"], str(m["width"]), *(_cell(m.get(k)) for k in extra_keys)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Training", ""]
    lines += _summary_lines(cfg.get("train"), ("rule", "steps", "batch_size", "lr", "normalization", "seed", "loss"))
    lines += _summary_lines(cfg.get("data"), ("n_rows", "n_images", "tokens_per_image", "grid", "dtype", "hash"))
    if isinstance(cfg.get("data"), dict) and isinstance(cfg["data"].get("imported_from"), dict):
        lines.append(f"- imported from the official release: `{json.dumps(cfg['data']['imported_from'])}`")
    if len(lines) and lines[-1] == "":
        lines.append("(not recorded)")
    lines += ["", "## Metrics", ""]
    lines += _metric_lines(cfg.get("metrics"), names)
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import usae",
        'sae = usae.from_pretrained("THIS_DIR_OR_REPO_ID")',
        f'z = sae.encode("{names[0]}", x)        # (n, {sae["n_latents"]}) codes of raw activations',
        f'x_hat = sae.decode("{names[-1]}", z)   # reconstruct another model from the same code',
        "```",
        "",
        "Without usae: `config.json` is plain JSON and `model.safetensors` plain safetensors; the",
        "equations that turn them into codes are in usae's docs/format.md.",
        "",
    ]
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    text = v if isinstance(v, str) else json.dumps(v)
    return text.replace("|", "\\|")


def _summary_lines(d: Any, keys: tuple[str, ...]) -> list[str]:
    if not isinstance(d, dict):
        return []
    return [f"- {k}: `{_cell(d[k])}`" for k in keys if d.get(k) is not None]


def _metric_lines(metrics: Any, names: list[str]) -> list[str]:
    if not isinstance(metrics, dict) or not metrics:
        return ["No evaluation report was attached (run `usae evaluate RUN STORE` before `usae export`)."]
    lines = []
    for key in ("r2_self_mean", "r2_cross_mean"):
        if isinstance(metrics.get(key), int | float):
            lines.append(f"- {key.replace('_', ' ')}: {metrics[key]:.3f}")
    per_model = [k for k in ("fvu", "l0", "dead_fraction") if isinstance(metrics.get(k), dict)]
    if per_model:
        lines += ["", "| model | " + " | ".join(per_model) + " |", "|---|" + "---|" * len(per_model)]
        for n in names:
            lines.append(f"| {n} | " + " | ".join(_num(metrics[k].get(n)) for k in per_model) + " |")
    where = metrics.get("measured_on")
    if isinstance(where, dict) and isinstance(where.get("store"), str):
        split = "held-out images" if where.get("held_out") else "images it was trained on"
        lines += ["", f"Measured on store `{where['store']}` ({split})."]
    if isinstance(metrics.get("concept_classes"), dict):
        counts = ", ".join(f"{k} {v}" for k, v in metrics["concept_classes"].items())
        lines += ["", f"Concepts by class: {counts}."]
    return lines


def _num(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, int | float) else "-"


def export_command(cfg: ExportConfig) -> str:
    """``usae export``: what the command prints."""
    out = export_run(
        cfg.run, cfg.out, dtype=cfg.dtype, push_to_hub=cfg.push_to_hub, private=cfg.private, overwrite=cfg.overwrite
    )
    return f"pretrained: {out}" + (f"  hub: {cfg.push_to_hub}" if cfg.push_to_hub else "")
