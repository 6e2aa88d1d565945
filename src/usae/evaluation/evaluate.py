"""Evaluate a trained run on a store, streaming: never holds all codes in memory.

One pass over the store accumulates, per source model i and destination model j, the sums the
metrics need (squared errors, fire counts, co-fire counts, code sums) in float64; the report is
computed from those sums at the end.

``evaluate(cfg)`` is ``usae evaluate``; ``evaluate(run, store, **overrides)`` (``evaluate_run``) is its
notebook form, which builds the config; ``evaluate_sae(sae, store, cfg)`` measures an open SAE.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, overload

import torch
from tqdm.auto import tqdm

from usae._input import check_schema
from usae._io import check_output, output_dir, read_json, write_json_atomic
from usae.config import EvalConfig, LabelConfig
from usae.config.evaluate import ClassThresholds
from usae.data.store import Store, open_store
from usae.device import require_memory, resolve_device
from usae.evaluation.classes import classify, thresholds_of
from usae.evaluation.fidelity.measures import SPLICE_JSON, SPLICE_SCHEMA
from usae.evaluation.naming.label import LABELS_JSON, label, naming_summary, too_small_to_name
from usae.model import metrics
from usae.model.sae import UniversalSAE, dense
from usae.run import open_run_store, trained_store_hash, weights_record

log = logging.getLogger(__name__)

REPORT_VERSION = 1


class _Sums:
    """Streaming sufficient statistics for every metric of the report."""

    def __init__(self, names: list[str], n_latents: int, device: torch.device) -> None:
        m, s = len(names), n_latents
        f64 = {"dtype": torch.float64, "device": device}
        self.sse_mm = torch.zeros(m, m, **f64)  # [src, dst]
        self.sse_joint_m = torch.zeros(m, **f64)  # joint code (summed pre-activations) -> dst
        self.sum_y = {n: None for n in names}  # sum of (x - store mean), per dim, per model
        self.sum_yy = torch.zeros(m, **f64)  # sum of squared centred values per model
        self.fires_ms = torch.zeros(m, s, **f64)  # code > tau
        self.active_ms = torch.zeros(m, s, **f64)  # code != 0 (for dead / L0)
        self.sum_z_ms = torch.zeros(m, s, **f64)
        self.cofires_s = torch.zeros(s, **f64)
        self.n_rows = 0


@torch.no_grad()
def _accumulate(sae: UniversalSAE, x: dict[str, torch.Tensor], means: dict, tau: float, acc: _Sums) -> None:
    names = sae.model_names
    # Pre-activations once per model: they feed each model's own code and the joint code.
    z_pre = {n: sae.pre_activation(n, sae.normalize(n, x[n])) for n in names}
    all_fire_bs = None
    for i, src in enumerate(names):
        code = sae.activate(src, z_pre[src])
        z_bs = dense(code, sae.n_latents)
        fire_bs = z_bs > tau
        acc.fires_ms[i] += fire_bs.sum(0)
        acc.active_ms[i] += (z_bs != 0).sum(0)
        acc.sum_z_ms[i] += z_bs.sum(0)
        all_fire_bs = fire_bs if all_fire_bs is None else all_fire_bs & fire_bs
        for j, dst in enumerate(names):
            x_hat = sae.decode(dst, code)  # a SparseCode decodes by gathering k rows, not a dense matmul
            acc.sse_mm[i, j] += (x[dst].double() - x_hat.double()).square().sum()
    acc.cofires_s += all_fire_bs.sum(0)
    joint = sae.codes_from_pre(z_pre, shared_values=True)[names[0]]
    for j, dst in enumerate(names):
        acc.sse_joint_m[j] += (x[dst].double() - sae.decode(dst, joint).double()).square().sum()
    for j, dst in enumerate(names):
        y = x[dst].double() - means[dst]
        acc.sum_y[dst] = y.sum(0) if acc.sum_y[dst] is None else acc.sum_y[dst] + y.sum(0)
        acc.sum_yy[j] += y.square().sum()
    acc.n_rows += next(iter(x.values())).shape[0]


def evaluate_sae(sae: UniversalSAE, store: Store, cfg: EvalConfig, trained_on: str | None = None) -> dict[str, Any]:
    """Stream ``store`` through the open ``sae`` and return the report dict (see ``evaluate``).

    ``cfg``: its batch_size, max_rows, tau, thresholds and progress (the run and stores it names are
    the open ``sae`` and ``store``, which ``open_run_store`` has checked). ``trained_on``: content
    hash of the store the run was trained on (its config.json), so the report says whether it measured
    in-sample rows or images the dictionary never saw (None: unknown).
    """
    names = sae.model_names
    device = next(sae.parameters()).device
    sae.eval()
    stop = store.n_rows if cfg.max_rows is None else min(cfg.max_rows, store.n_rows)
    means = {n: torch.as_tensor(store.stats(n).mean, dtype=torch.float64, device=device) for n in names}
    acc = _Sums(names, sae.n_latents, device)
    bar = tqdm(total=stop, unit="row", desc="evaluate", disable=not cfg.progress)
    for _, batch in store.iter_batches(cfg.batch_size, names=names, start=0, stop=stop):
        x = {n: torch.from_numpy(batch[n]).to(device) for n in names}
        _accumulate(sae, x, means, cfg.tau, acc)
        bar.update(next(iter(batch.values())).shape[0])
    bar.close()
    report = _report(sae, store, acc, means, cfg.tau, cfg.thresholds)
    report["store"]["trained_on"] = None if trained_on is None else trained_on == store.hash
    return report


def _report(
    sae: UniversalSAE, store: Store, acc: _Sums, means: dict, tau: float, thresholds: ClassThresholds
) -> dict[str, Any]:
    names, n = sae.model_names, acc.n_rows
    sums = [(acc.sum_y[d], acc.sum_yy[j], means[d]) for j, d in enumerate(names)]
    sst_m = torch.stack([metrics.sst_from_sums(n, sy, syy, mu) for sy, syy, mu in sums])
    sst_global_m = torch.stack([metrics.sst_from_sums(n, sy, syy, mu, global_mean=True) for sy, syy, mu in sums])
    r2_mm = metrics.r2_from_sums(acc.sse_mm, sst_m[None, :])
    r2_paper_mm = metrics.r2_from_sums(acc.sse_mm, sst_global_m[None, :])
    fe_s = metrics.firing_entropy(acc.fires_ms)
    cfp_ms = metrics.cofire_proportion(acc.cofires_s, acc.fires_ms)
    dict_norm_ms = torch.stack([sae.dictionary(nm).norm(dim=1).double() for nm in names]).to(acc.sum_z_ms)
    energy_ms = metrics.energy(acc.sum_z_ms / n, dict_norm_ms)
    labels = metrics.classify_latents(acc.fires_ms, n, cofires_s=acc.cofires_s, thresholds=thresholds)
    self_mean, cross_mean = metrics.self_cross_means(r2_mm.tolist())
    return {
        "report_version": REPORT_VERSION,
        "model_names": names,
        "n_rows": n,
        "n_latents": sae.n_latents,
        "k": sae.k,
        "tau": tau,
        "store": {
            "path": str(store.path),
            "hash": store.hash,
            "split": (store.extra.get("split") or {}).get("name"),
        },
        "r2_matrix": _nan_to_none(r2_mm.tolist()),
        "r2_matrix_paper": _nan_to_none(r2_paper_mm.tolist()),
        "r2_self_mean": self_mean,
        "r2_joint": {nm: float(metrics.r2_from_sums(acc.sse_joint_m[j], sst_m[j])) for j, nm in enumerate(names)},
        "r2_cross_mean": cross_mean,
        "fvu": {nm: float(1 - r2_mm[i, i]) for i, nm in enumerate(names)},
        "l0": {nm: float(acc.active_ms[i].sum() / n) for i, nm in enumerate(names)},
        "dead_fraction": {nm: float(metrics.dead_fraction(acc.active_ms[i])) for i, nm in enumerate(names)},
        "dead_fraction_all": float(metrics.dead_fraction(acc.active_ms.sum(0))),
        "gamma": {nm: _nan_to_none(_gamma(store, nm)) for nm in names},
        "firing_entropy": _nan_to_none(fe_s.tolist()),
        "firing_entropy_mean": _nan_to_none(float(fe_s.nanmean())),
        "fires": {nm: acc.fires_ms[i].long().tolist() for i, nm in enumerate(names)},
        "cofiring": {
            "cofires": acc.cofires_s.long().tolist(),
            "proportion": {nm: _nan_to_none(cfp_ms[i].tolist()) for i, nm in enumerate(names)},
        },
        "energy": {nm: energy_ms[i].tolist() for i, nm in enumerate(names)},
        "classes": {
            "counts": {c: labels.count(c) for c in metrics.CLASSES},
            "labels": labels,
            "rule": _RULE.format(**thresholds.to_dict()),
            "thresholds": thresholds.to_dict(),
        },
    }


_RULE = (
    "model i uses concept k: fires_ik >= max({min_count}, {min_rate} * rows) and fires_ik >= {min_share} * max_j"
    " fires_jk; universal: used by all, FE >= {universal_fe} and CFP >= {universal_cofire} in every model; partial:"
    " used by >= 2, not universal; specific: by 1; rare: by none but fires; dead: never fires"
)


def _gamma(store: Store, name: str) -> float:
    """γ of model ``name`` (the store's stats: recorded, or computed on read for older stores); NaN
    when not finite (JSON null)."""
    value = store.stats(name).gamma
    return value if math.isfinite(value) else float("nan")


def _nan_to_none(v: Any) -> Any:
    """JSON has no NaN: undefined values (latents that never fire) become null."""
    if isinstance(v, list):
        return [_nan_to_none(x) for x in v]
    return None if isinstance(v, float) and v != v else v


@overload
def evaluate(cfg: EvalConfig, /) -> list[dict[str, Any]]: ...
@overload
def evaluate(
    cfg: str | Path | UniversalSAE, store: str | Path | Store, /, out: str | Path | None = None, **overrides: Any
) -> dict[str, Any]: ...
def evaluate(cfg, store=None, /, out=None, **overrides):
    """``usae evaluate RUN STORE [STORE ...]``: one report.json per store, then report.md + figures.

    Returns the reports, one per store. Report keys: r2_matrix ([src][dst] cross-reconstruction R²
    in raw units), r2_matrix_paper (the same with SST around one global mean, as the paper's code
    computes it), r2_joint (per model, decoding one code chosen from all models' summed
    pre-activations: the crosscoder's own metric, a consensus code for the others), fvu, l0,
    dead_fraction (per model), gamma (per model: ‖mean‖ / ‖std‖ of its activations on the store, the
    per-dimension outlier measure that predicts dead latents), firing_entropy (per latent), cofiring, energy (per model, per latent),
    classes. docs/report.md describes each.

    ``evaluate(run, store, out=None, **overrides)``, a run (or an open UniversalSAE) and one store
    instead of a config: ``evaluate_run``, the notebook form, which returns the one report.
    """
    if not isinstance(cfg, EvalConfig):
        return evaluate_run(cfg, store, out, **overrides)
    out_dir, json_paths = _report_paths(cfg)
    # Reports go into the run or a directory of their own, never into a store or other artifact.
    check_output(out_dir, ("", "usae-run"), reading=cfg.stores, replaces=False)
    device = resolve_device(cfg.device)
    sae, _ = open_run_store(cfg.run, cfg.stores[0], str(device))
    require_memory(
        device,
        sae.cfg.batch_bytes(cfg.batch_size, training=False),
        f"a batch of --batch-size {cfg.batch_size} x {sae.n_latents} concepts",
        "lower --batch-size",
    )
    with output_dir(out_dir):  # a failed evaluation leaves no empty --out
        return _evaluate_into(cfg, sae, out_dir, json_paths)


def evaluate_run(
    run: str | Path | UniversalSAE, store: str | Path | Store, out: str | Path | None = None, **overrides: Any
) -> dict[str, Any]:
    """The report of ``run`` on one ``store``: ``evaluate(EvalConfig(run, (store,), out, **overrides))``
    without report.md (``report=False``) or naming (``label=False``) unless ``overrides`` ask.

    Writes ``out`` (default RUN/report.json). ``run`` may be an open UniversalSAE (``store`` an open
    Store): then nothing is written unless ``out`` is given, and the report does not know the
    training store. ``overrides``: any EvalConfig field (``batch_size=``, ``thresholds=``, ...).
    """
    store_path = store.path if isinstance(store, Store) else Path(store)
    options = {"report": False, "label": False} | overrides
    if not isinstance(run, UniversalSAE):
        cfg = EvalConfig(run=Path(run), stores=(store_path,), out=None if out is None else Path(out), **options)
        return evaluate(cfg)[0]
    cfg = EvalConfig(run=Path(), stores=(store_path,), **options)  # an open SAE has no run directory
    sae, store = open_run_store(run, store, cfg.device)
    report = evaluate_sae(sae, store, cfg)
    if out is not None:
        write_json_atomic(Path(out), report)
        log.info("wrote %s", out)
    return report


def _evaluate_into(cfg: EvalConfig, sae: UniversalSAE, out_dir: Path, json_paths: list[Path]) -> list[dict[str, Any]]:
    if cfg.report and cfg.label:
        _label_if_labelled(cfg)
    trained_on = trained_store_hash(cfg.run)
    weights = weights_record(cfg.run)  # ties each report to these weights: explore and export check it
    reports = []
    for store_path, json_path in zip(cfg.stores, json_paths, strict=True):
        _, store = open_run_store(sae, store_path, cfg.device)
        reports.append(evaluate_sae(sae, store, cfg, trained_on=trained_on) | {"weights": weights})
        write_json_atomic(json_path, reports[-1])
        log.info("wrote %s", json_path)
    if cfg.report:
        from usae.evaluation.report.markdown import write_report  # matplotlib only when rendering

        baselines_path = cfg.run / "baselines.json"
        baselines = read_json(baselines_path, "baselines") if baselines_path.is_file() else None
        splice_path = cfg.run / SPLICE_JSON
        splice = read_json(splice_path, "splice results") if splice_path.is_file() else None
        if splice is not None:
            check_schema(splice, SPLICE_SCHEMA, splice_path)
        write_report(reports, out_dir, baselines, splice=splice, naming=_naming(cfg.run, reports))
    return reports


def _label_if_labelled(cfg: EvalConfig) -> None:
    """Run ``usae label`` on the first store when it records labels and RUN/labels.json is not for it."""
    store = open_store(cfg.stores[0])
    if "labels" not in store.extra:
        return
    path = Path(cfg.run) / LABELS_JSON
    if path.is_file() and (read_json(path, "concept labels").get("store") or {}).get("hash") == store.hash:
        return
    defaults = LabelConfig(run=cfg.run, store=store.path)
    if (why := too_small_to_name(store, defaults.n_top, defaults.n_top_tokens)) is not None:
        log.info("not naming the concepts: %s (usae label RUN STORE --n-top N names them)", why)
        return
    n_images = len(store.image_ids) if store.image_ids is not None else store.n_rows
    log.info(
        "naming the concepts first (usae label %s %s: %d images, as it records labels); pass --no-label to skip",
        cfg.run, store.path, n_images,
    )  # fmt: skip
    label(LabelConfig(run=cfg.run, store=store.path, device=cfg.device, progress=cfg.progress))


def _naming(run: Path, reports: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The summary of RUN/labels.json (``usae label``) for the report of the store it was measured on."""
    path = Path(run) / LABELS_JSON
    if not path.is_file():
        return None
    labels = read_json(path, "concept labels")
    report = next((r for r in reports if r["store"]["hash"] == labels.get("store", {}).get("hash")), None)
    if report is None:
        log.info("%s was measured on another store than these; not in the report", path)
        return None
    return naming_summary(labels, report, classify(report, thresholds_of(report)))


def _report_paths(cfg: EvalConfig) -> tuple[Path, list[Path]]:
    """(directory for report.md and figures, one report JSON path per store).

    ``--out X.json`` names the report file itself (the issue's contract: ``--out report.json``);
    any other ``--out`` is a directory.
    """
    if cfg.out is not None and cfg.out.suffix == ".json":
        out_dir = cfg.out.parent
        if len(cfg.stores) == 1:
            return out_dir, [cfg.out]
        return out_dir, [out_dir / n.replace("report", cfg.out.stem, 1) for n in _report_names(cfg.stores)]
    out_dir = cfg.out or cfg.run
    return out_dir, [out_dir / n for n in _report_names(cfg.stores)]


def _report_names(stores: tuple[Path, ...]) -> list[str]:
    """report.json for one store; report-<store dir name>.json per store (numbered on repeats)."""
    if len(stores) == 1:
        return ["report.json"]
    names = [Path(s).name for s in stores]
    return [f"report-{n}.json" if names.count(n) == 1 else f"report-{n}-{i + 1}.json" for i, n in enumerate(names)]


def format_summary(report: dict) -> str:
    """A short text table of a report: the R² matrix and per-model FVU / L0 / dead."""
    names = report["model_names"]
    width = max(8, *(len(n) for n in names)) + 1
    lines = ["cross-reconstruction R² (row: encode with, column: decode to)"]
    lines.append(" " * width + "".join(n.rjust(width) for n in names))
    for src, row in zip(names, report["r2_matrix"], strict=True):
        lines.append(src.ljust(width) + "".join(f"{v:{width}.3f}" for v in row))
    lines.append("")
    lines.append("model".ljust(width) + "FVU".rjust(width) + "L0".rjust(width) + "dead%".rjust(width))
    for n in names:
        fvu, l0, dead = report["fvu"][n], report["l0"][n], 100 * report["dead_fraction"][n]
        lines.append(n.ljust(width) + f"{fvu:{width}.3f}{l0:{width}.1f}{dead:{width}.1f}")
    counts = report["classes"]["counts"]
    lines.append("")
    lines.append("concepts: " + ", ".join(f"{c} {counts[c]}" for c in metrics.CLASSES if c in counts))
    return "\n".join(lines)


def evaluate_command(cfg: EvalConfig) -> str:
    """``usae evaluate``: write the reports; what the command prints."""
    reports = evaluate(cfg)
    parts = []
    for report in reports:
        if len(reports) > 1:
            parts.append(f"\n== store {report['store']['path']}")
        parts.append(format_summary(report))
    if cfg.report:
        parts.append(f"\nreport: {(cfg.out or cfg.run) / 'report.md'}")
    return "\n".join(parts)
