"""Render evaluation reports (``evaluate``'s report.json, one per store) as report.md + PNG figures.

Figures are matplotlib ``Figure`` objects drawn on the Agg canvas (no pyplot, no global state);
report.md comes from one Jinja2 template. Several reports (one run on several stores) are shown
side by side: one heatmap panel, histogram or table column per store. Everything here works on
the streamed sums already in the report, so nothing re-reads the store. See docs/report.md.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from usae._io import save_figure, write_text_atomic
from usae.errors import UsaeError
from usae.evaluation.classes import (
    CLASSES,
    USED_CLASSES,
    ClassThresholds,
    class_counts,
    classify,
    thresholds_of,
    top_concepts,
)
from usae.evaluation.fidelity.splice import splice_table
from usae.evaluation.report.figures import (
    figure_classes,
    figure_cofire_energy,
    figure_cofire_rank,
    figure_dead_l0,
    figure_dictionary_agreement,
    figure_firing_entropy,
    figure_matching,
    figure_r2,
    figure_splice,
    loglog_pearson,
)
from usae.evaluation.report.templating import environment
from usae.model.metrics import self_cross_means

log = logging.getLogger(__name__)


def store_labels(reports: list[dict[str, Any]]) -> list[str]:
    """Short, unique names for the reports' stores (directory names, numbered when repeated)."""
    base = [Path(r.get("store", {}).get("path", f"store{i}")).name or f"store{i}" for i, r in enumerate(reports)]
    return [b if base.count(b) == 1 else f"{b} ({i + 1})" for i, b in enumerate(base)]


def r2_gap(reports: list[dict[str, Any]]) -> dict[str, float] | None:
    """Mean self / cross R² on the first held-out store vs the store the run was trained on (None unless both)."""
    held = next((r for r in reports if r.get("store", {}).get("trained_on") is False), None)
    seen = next((r for r in reports if r.get("store", {}).get("trained_on") is True), None)
    if held is None or seen is None:
        return None
    out = {"held_self": held["r2_self_mean"], "in_self": seen["r2_self_mean"]}
    out |= {"held_cross": held["r2_cross_mean"], "in_cross": seen["r2_cross_mean"]}
    gaps = {"gap_self": ("in_self", "held_self"), "gap_cross": ("in_cross", "held_cross")}
    # a one-model run has no cross R² (null): its gap is undefined too, not a crash
    return out | {g: None if None in (out[a], out[b]) else out[a] - out[b] for g, (a, b) in gaps.items()}


def _store_context(report: dict[str, Any], label: str, thresholds: ClassThresholds, n_top: int) -> dict[str, Any]:
    labels = classify(report, thresholds)
    cofires_s = np.asarray(report["cofiring"]["cofires"], dtype=np.float64)
    loglog_r = {n: loglog_pearson(np.asarray(report["energy"][n]), cofires_s)[0] for n in report["model_names"]}
    classes = class_counts(report, labels, thresholds)
    counts = {f"count_{c}": classes["total"][c] for c in CLASSES}
    r2_paper = report.get("r2_matrix_paper")  # absent from reports written before it existed
    r2_self_paper = self_cross_means(r2_paper)[0] if r2_paper else None
    return {
        **report,
        **counts,
        "r2_matrix_paper": r2_paper,
        "r2_self_mean_paper": r2_self_paper,
        "label": label,
        "classes": classes,
        "top": top_concepts(report, labels, n_top),
        "loglog_r": loglog_r,
    }


_SUMMARY_ROWS = [
    ("n_rows", "rows"),
    ("r2_self_mean", "R² self (mean over models)"),
    ("r2_cross_mean", "R² cross (mean over src ≠ dst)"),
    ("r2_self_mean_paper", "R² self, paper-compatible (global-mean SST)"),
    ("firing_entropy_mean", "firing entropy (mean over live concepts)"),
    ("dead_fraction_all", "dead in every model (fraction)"),
    *((f"count_{c}", f"{c} concepts") for c in CLASSES),
]


def _figures(
    reports: list[dict[str, Any]],
    labels: list[str],
    stores: list[dict[str, Any]],
    thresholds: ClassThresholds,
    splice: dict[str, Any] | None,
    baselines: dict[str, Any] | None,
) -> dict[str, Any]:
    """The report's figures by file stem (report.md.j2 links each ``<stem>.png``)."""
    figures = {
        "r2_matrix": figure_r2(reports, labels),
        "firing_entropy": figure_firing_entropy(reports, labels, thresholds),
        "cofire_rank": figure_cofire_rank(reports, labels),
        "cofire_energy": figure_cofire_energy(reports, labels),
        "dead_l0": figure_dead_l0(reports, labels),
        "classes": figure_classes([s["classes"] for s in stores], labels),
    }
    if splice is not None:
        figures["splice"] = figure_splice(splice)
    if baselines is not None:
        figures["matching"] = figure_matching(baselines)
        figures["dictionary_agreement"] = figure_dictionary_agreement(baselines)
    return figures


def write_report(
    report: dict[str, Any] | list[dict[str, Any]],
    out_dir: str | Path,
    baselines: dict[str, Any] | None = None,
    *,
    splice: dict[str, Any] | None = None,
    naming: dict[str, Any] | None = None,
    thresholds: ClassThresholds | None = None,
    n_top: int = 8,
) -> Path:
    """Write OUT_DIR/report.md and its PNG figures; return the report.md path.

    ``report``: one ``evaluate`` report, or several of the same run on different stores (shown
    side by side, in the given order). ``splice``: ``splice``'s result (RUN/splice.json), rendered
    as the task-fidelity section. ``naming``: ``naming.label.naming_summary`` of RUN/labels.json (the
    concept-names section). ``baselines``: ``baseline``'s result (RUN/baselines.json),
    rendered as its own section. ``thresholds`` default to those the first report records, else
    ``ClassThresholds()``; classes are recomputed from the fire counts with them.
    """
    reports = [report] if isinstance(report, dict) else list(report)
    if not reports:
        raise UsaeError("write_report: no report given")
    names = reports[0]["model_names"]
    for r in reports[1:]:
        if r["model_names"] != names or r["n_latents"] != reports[0]["n_latents"]:
            raise UsaeError(f"write_report: report for store {r.get('store', {}).get('path')} is not of the same run")
    thresholds = thresholds or thresholds_of(reports[0])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = store_labels(reports)
    stores = [_store_context(r, lb, thresholds, n_top) for r, lb in zip(reports, labels, strict=True)]
    figures = _figures(reports, labels, stores, thresholds, splice, baselines)
    for stem, fig in figures.items():
        save_figure(fig, out_dir / f"{stem}.png")
    text = (
        environment(Path(__file__).parent / "templates", html=False)
        .get_template("report.md.j2")
        .render(
            names=names,
            stores=stores,
            thresholds=thresholds.to_dict(),
            classes=CLASSES,
            used_classes=USED_CLASSES,
            summary_rows=_SUMMARY_ROWS,
            b=baselines,
            splice=splice,
            naming=naming,
            splice_table=splice_table(splice) if splice is not None else None,
            pairs=[(i, j) for i in range(len(names)) for j in range(i + 1, len(names))],
            sim_kinds=list((baselines or {}).get("similarity", {}).get("cka", {})),
            sim_titles={"raw": "raw", "usae_codes": "USAE codes", "independent_codes": "indep. codes"},
            r2_gap=r2_gap(reports),
        )
    )
    path = out_dir / "report.md"
    write_text_atomic(path, text)
    log.info("wrote %s and %d figures", path, len(figures))
    return path
