"""Ablation sweeps: train and evaluate a grid of configurations, tabulate the headline numbers.

Each grid point is an ordinary run directory under OUT/runs/<name>; a point whose run already
holds a report for the same resolved configuration is reused, not retrained, so an interrupted
or extended sweep only trains what is missing. Points that read the same data (same store and
models) train together on one pass over the store. Results go to OUT/ablation.csv and
OUT/ablation.md.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
from pathlib import Path
from typing import Any

import jinja2

from usae._io import check_output, read_json, write_json_atomic, write_text_atomic
from usae.config import AblateConfig, TrainConfig, to_json_dict
from usae.config.train import DataConfig
from usae.data.store import held_out_path, open_store
from usae.errors import UsaeError
from usae.evaluation.evaluate import evaluate
from usae.run import finished_run
from usae.training.fit import FitResult, fit_many

log = logging.getLogger(__name__)

TOKENS_PER_S_NOTE = "training rows per second of this run's own steps; data loading excluded"
COLUMNS = [
    "store",
    "rule",
    "n_models",
    "n_latents",
    "k",
    "r2_cross_mean",
    "r2_self_mean",
    "r2_cross_held_out",
    "r2_self_held_out",
    "universal_pct",
    "dead_pct",
    "tokens_per_s",
]

_TABLE = jinja2.Template(
    "| {{ columns | join(' | ') }} |\n|{% for c in columns %}---|{% endfor %}\n"
    "{% for row in rows %}| {% for c in columns %}{{ fmt(row[c]) }} | {% endfor %}\n{% endfor %}"
)


def grid(cfg: AblateConfig) -> list[TrainConfig]:
    """The TrainConfigs of the sweep, one per grid point, each with its own run directory.

    Without ``n_models`` every store contributes all of its models (so the sweep runs on any store).
    """
    points = []
    for store_dir in cfg.stores:
        names = open_store(store_dir).model_names
        points += _store_points(cfg, Path(store_dir), names)
    return points


def _store_points(cfg: AblateConfig, store_dir: Path, names: list[str]) -> list[TrainConfig]:
    points = []
    n_models_axis = cfg.n_models or (len(names),)
    for rule, n_models, n_latents, k in itertools.product(cfg.rules, n_models_axis, cfg.n_latents, cfg.k):
        if n_models > len(names):
            raise UsaeError(f"--n-models {n_models}: store {store_dir} has only {len(names)} models")
        if k > n_latents:
            raise UsaeError(f"--k {k} exceeds --n-latents {n_latents}")
        name = f"{store_dir.name}-{rule}-m{n_models}-s{n_latents}-k{k}"
        points.append(
            TrainConfig(
                store=store_dir,
                out=cfg.out / "runs" / name,
                models=tuple(names[:n_models]),
                rule=rule,
                n_latents=n_latents,
                k=k,
                steps=cfg.steps,
                batch_size=cfg.batch_size,
                seed=cfg.seed,
                device=cfg.device,
                progress=False,
                overwrite=True,
            )
        )
    return points


def _finished(point: TrainConfig) -> dict[str, Any] | None:
    """The saved result of a grid point, if its run finished with this very configuration.

    A result saved before ``tokens_per_s`` was timed per run (it held its group's average, the same
    on every row) keeps its numbers but loses that column.
    """
    result_path = point.out / "ablation.json"
    if not result_path.is_file() or not (point.out / "report.json").is_file() or not finished_run(point.out, point):
        return None
    try:
        row = read_json(result_path, "ablation result")
    except UsaeError:
        return None
    if not isinstance(row, dict) or not set(COLUMNS) <= set(row):
        return None
    if row.get("notes", {}).get("tokens_per_s") != TOKENS_PER_S_NOTE:
        row["tokens_per_s"] = None
    return row


def _row(
    point: TrainConfig, report: dict[str, Any], held: dict[str, Any] | None, tokens_per_s: float | None
) -> dict[str, Any]:
    """One table row: in-sample numbers, and R² on the store's held-out images when it has them."""
    counts = report["classes"]["counts"]
    return {
        "store": point.store.name,
        "rule": point.rule,
        "n_models": len(report["model_names"]),
        "n_latents": point.n_latents,
        "k": point.k,
        "r2_cross_mean": report["r2_cross_mean"],
        "r2_self_mean": report["r2_self_mean"],
        "r2_cross_held_out": held["r2_cross_mean"] if held else None,
        "r2_self_held_out": held["r2_self_mean"] if held else None,
        "universal_pct": 100 * counts["universal"] / point.n_latents,
        "dead_pct": 100 * report["dead_fraction_all"],
        "tokens_per_s": tokens_per_s,
        "notes": {"tokens_per_s": TOKENS_PER_S_NOTE},
    }


def _tokens_per_s(result: FitResult, batch_size: int) -> float | None:
    """Training tokens (rows) per second of one run's own steps: its step time only, so runs that
    trained together in lockstep are compared fairly (data loading, shared by the group, is excluded)."""
    if result.steps_timed <= 0 or result.step_seconds <= 0:
        return None  # a resumed run with no step left to take
    return result.steps_timed * batch_size / result.step_seconds


def train_points(points: list[TrainConfig], max_eval_rows: int | None) -> list[dict[str, Any]]:
    """Train the points (all with the same ``data`` group) in one pass over their store, then evaluate each on
    it and on its held-out store (``usae extract --val-fraction``) when there is one.

    ``tokens_per_s`` of each point is timed on its own steps (``FitResult.step_seconds``).
    """
    results = fit_many(points)
    rows = []
    held_out = held_out_path(open_store(points[0].store))
    for point, result in zip(points, results, strict=True):
        report = evaluate(point.out, point.store, max_rows=max_eval_rows, progress=False)
        held = None
        if held_out is not None:
            held = evaluate(
                point.out, held_out, out=point.out / "report-held-out.json", max_rows=max_eval_rows, progress=False
            )
        row = _row(point, report, held, _tokens_per_s(result, point.batch_size))
        write_json_atomic(point.out / "ablation.json", row)
        rows.append(row)
    return rows


def ablate(cfg: AblateConfig) -> list[dict[str, Any]]:
    """Run the sweep; write OUT/ablation.csv and OUT/ablation.md; return the rows in grid order.

    Finished points are reused; the others are grouped by the data they read (store and models)
    and each group trains in lockstep on one pass over its store (``fit_many``).
    """
    check_output(cfg.out, "", reading=tuple(cfg.stores), replaces=False)
    points = grid(cfg)
    rows: dict[Path, dict[str, Any]] = {}
    todo: dict[DataConfig, list[TrainConfig]] = {}
    for point in points:
        done = _finished(point)
        if done is not None:
            log.info("reusing %s", point.out)
            rows[point.out] = done
        else:
            todo.setdefault(point.data, []).append(point)  # the rows each step reads: one pass per group
    for group in todo.values():
        for point, row in zip(group, train_points(group, cfg.max_eval_rows), strict=True):
            rows[point.out] = row
    ordered = [rows[p.out] for p in points]
    cfg.out.mkdir(parents=True, exist_ok=True)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore")  # a row's "notes" stay in its JSON
    writer.writeheader()
    writer.writerows(ordered)
    write_text_atomic(cfg.out / "ablation.csv", text.getvalue())
    write_text_atomic(cfg.out / "ablation.md", format_table(ordered))
    write_json_atomic(cfg.out / "ablation-config.json", to_json_dict(cfg))
    return ordered


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the headline numbers."""

    def fmt(v: Any) -> str:
        if v is None:
            return "–"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    return _TABLE.render(columns=COLUMNS, rows=rows, fmt=fmt) + f"\ntokens_per_s: {TOKENS_PER_S_NOTE}.\n"


def ablate_command(cfg: AblateConfig) -> str:
    """``usae ablate``: what the command prints."""
    return format_table(ablate(cfg))
