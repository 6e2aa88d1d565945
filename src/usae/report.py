"""Render evaluation reports (``evaluate``'s report.json, one per store) as report.md + PNG figures.

Figures are matplotlib ``Figure`` objects drawn on the Agg canvas (no pyplot, no global state);
report.md comes from one Jinja2 template. Several reports (one run on several stores) are shown
side by side: one heatmap panel, histogram or table column per store. Everything here works on
the streamed sums already in the report, so nothing re-reads the store. See docs/report.md.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

import jinja2
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from usae import metrics
from usae.errors import UsaeError

log = logging.getLogger(__name__)

CLASSES = ("universal", "partial", "specific", "dead")
_CLASS_COLORS = {"universal": "tab:green", "partial": "tab:orange", "specific": "tab:blue", "dead": "tab:gray"}


class ClassThresholds(NamedTuple):
    """How latents are classified (``usae.metrics.classify_latents``)."""

    min_rate: float = 1e-4
    """A model *uses* a latent when the latent fires on at least this fraction of its rows."""
    universal_fe: float = 0.8
    """Universal = used by every model and firing entropy >= this (else partial). Measured on a
    synthetic world with 24 planted universal concepts: 0.8 counts 29 universal latents, 0 counts
    99 (latents firing thousands of times in one model and twice in the others); docs/report.md."""


def thresholds_of(report: dict[str, Any]) -> ClassThresholds:
    """The thresholds a report records under classes.thresholds, else the defaults."""
    saved = report.get("classes", {}).get("thresholds") or {}
    return ClassThresholds(**{k: float(v) for k, v in saved.items() if k in ClassThresholds._fields})


def _fires_ms(report: dict[str, Any]) -> np.ndarray:
    return np.array([report["fires"][n] for n in report["model_names"]], dtype=np.float64)


def _floats(values: list[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def classify(report: dict[str, Any], thresholds: ClassThresholds) -> list[str]:
    """Per-latent class labels recomputed from the report's fire counts with ``thresholds``."""
    fires = torch.from_numpy(_fires_ms(report))
    return metrics.classify_latents(fires, report["n_rows"], thresholds.min_rate, thresholds.universal_fe)


def class_counts(report: dict[str, Any], labels: list[str], thresholds: ClassThresholds) -> dict[str, Any]:
    """Counts per class, and per model: how many latents of each class that model uses."""
    names, labels_s = report["model_names"], np.asarray(labels)
    used_ms = _fires_ms(report) >= max(1.0, thresholds.min_rate * report["n_rows"])
    per_model = {n: {c: int((used_ms[i] & (labels_s == c)).sum()) for c in CLASSES[:3]} for i, n in enumerate(names)}
    return {"total": {c: int((labels_s == c).sum()) for c in CLASSES}, "per_model": per_model}


def top_concepts(report: dict[str, Any], labels: list[str], n_top: int = 8) -> dict[str, list[dict[str, Any]]]:
    """Per class (dead excluded), the ``n_top`` latents of highest energy summed over models."""
    names = report["model_names"]
    energy_ms = np.array([report["energy"][n] for n in names])
    fires_ms, fe_s = _fires_ms(report), _floats(report["firing_entropy"])
    cfp_ms = np.array([_floats(report["cofiring"]["proportion"][n]) for n in names])
    order = np.argsort(-energy_ms.sum(0), kind="stable")
    out = {}
    for c in CLASSES[:3]:
        rows = [s for s in order if labels[s] == c][:n_top]
        out[c] = [
            {
                "latent": int(s),
                "fe": fe_s[s],
                "per_1k": [1000 * fires_ms[i, s] / report["n_rows"] for i in range(len(names))],
                "energy": energy_ms[:, s].tolist(),
                "cfp": cfp_ms[:, s].tolist(),
            }
            for s in rows
        ]
    return out


def loglog_pearson(x_s: np.ndarray, y_s: np.ndarray) -> tuple[float, int]:
    """Pearson r of log10 x vs log10 y over entries where both are > 0, and how many those are."""
    keep = (x_s > 0) & (y_s > 0)
    if keep.sum() < 3:
        return float("nan"), int(keep.sum())
    return float(np.corrcoef(np.log10(x_s[keep]), np.log10(y_s[keep]))[0, 1]), int(keep.sum())


def store_labels(reports: list[dict[str, Any]]) -> list[str]:
    """Short, unique names for the reports' stores (directory names, numbered when repeated)."""
    base = [Path(r.get("store", {}).get("path", f"store{i}")).name or f"store{i}" for i, r in enumerate(reports)]
    return [b if base.count(b) == 1 else f"{b} ({i + 1})" for i, b in enumerate(base)]


# -- figures ------------------------------------------------------------------------------------
def _figure(n_rows: int, n_cols: int, panel: tuple[float, float] = (4.2, 3.4)) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(panel[0] * n_cols, panel[1] * n_rows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, np.atleast_2d(np.asarray(fig.subplots(n_rows, n_cols, squeeze=False)))


def figure_r2(reports: list[dict[str, Any]], labels: list[str]) -> Figure:
    """One annotated heatmap per store of the [src][dst] cross-reconstruction R², shared colour bar."""
    fig, axes = _figure(1, len(reports))
    for ax, report, label in zip(axes[0], reports, labels, strict=True):
        names, r2_mm = report["model_names"], _floats([v for row in report["r2_matrix"] for v in row])
        r2_mm = r2_mm.reshape(len(names), len(names))
        image = ax.imshow(r2_mm, vmin=0.0, vmax=1.0, cmap="viridis")
        for (i, j), v in np.ndenumerate(r2_mm):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black")
        ax.set_xticks(range(len(names)), names)
        ax.set_yticks(range(len(names)), names)
        ax.set(xlabel="decode to (dst)", ylabel="encode with (src)", title=f"R² — {label}")
    fig.colorbar(image, ax=list(axes[0]), label="R²", shrink=0.8)
    return fig


def figure_firing_entropy(reports: list[dict[str, Any]], labels: list[str], thresholds: ClassThresholds) -> Figure:
    """Histogram of firing entropy over live latents, one outline per store; universal threshold marked."""
    fig, axes = _figure(1, 1, (6.0, 3.6))
    ax = axes[0, 0]
    for report, label in zip(reports, labels, strict=True):
        fe_s = _floats(report["firing_entropy"])
        ax.hist(fe_s[~np.isnan(fe_s)], bins=20, range=(0.0, 1.0), histtype="step", linewidth=1.6, label=label)
    ax.axvline(
        thresholds.universal_fe, color="black", linestyle="--", label=f"universal FE ≥ {thresholds.universal_fe}"
    )
    ax.set(xlabel="firing entropy (0: one model, 1: all models equally)", ylabel="concepts", title="Firing entropy")
    ax.legend()
    return fig


def figure_cofire_rank(reports: list[dict[str, Any]], labels: list[str]) -> Figure:
    """Per store: co-fire proportion of each latent vs its rank by energy, one series per model."""
    fig, axes = _figure(1, len(reports))
    for ax, report, label in zip(axes[0], reports, labels, strict=True):
        for name in report["model_names"]:
            order = np.argsort(-np.asarray(report["energy"][name]), kind="stable")
            cfp_s = _floats(report["cofiring"]["proportion"][name])[order]
            ax.plot(np.arange(1, cfp_s.size + 1), cfp_s, ".", markersize=3, alpha=0.7, label=name)
        ax.set_xscale("log")
        ax.set(xlabel="concept rank by energy (1 = most energy)", ylabel="co-fire proportion", ylim=(-0.02, 1.02))
        ax.set_title(f"Co-firing vs energy rank — {label}")
        ax.legend(title="model", markerscale=3)
    return fig


def figure_cofire_energy(reports: list[dict[str, Any]], labels: list[str]) -> Figure:
    """Log-log co-fire count vs energy, one panel per (store, model), Pearson r of the logs in the title."""
    names = reports[0]["model_names"]
    fig, axes = _figure(len(reports), len(names), (3.8, 3.2))
    for row, report, label in zip(axes, reports, labels, strict=True):
        cofires_s = np.asarray(report["cofiring"]["cofires"], dtype=np.float64)
        for ax, name in zip(row, report["model_names"], strict=True):
            energy_s = np.asarray(report["energy"][name], dtype=np.float64)
            r, n = loglog_pearson(energy_s, cofires_s)
            keep = (energy_s > 0) & (cofires_s > 0)
            ax.set_title(f"{label} / {name}: r = {r:.2f} (n={n})", fontsize=9)
            ax.set(xlabel=f"energy ({name})", ylabel="co-fire count")
            if not keep.any():  # log axes need a positive point; a model can have none (all dead)
                ax.text(0.5, 0.5, "no concept with energy > 0\nthat co-fires", ha="center", va="center", transform=ax.transAxes)
                continue
            ax.scatter(energy_s[keep], cofires_s[keep], s=5, alpha=0.6)
            ax.set(xscale="log", yscale="log")
    return fig


def figure_dead_l0(reports: list[dict[str, Any]], labels: list[str]) -> Figure:
    """Two panels of grouped bars per model: L0 (active concepts per row) and dead percentage."""
    names = reports[0]["model_names"]
    fig, axes = _figure(1, 2)
    width = 0.8 / len(reports)
    for ax, key, scale, title in ((axes[0, 0], "l0", 1.0, "L0"), (axes[0, 1], "dead_fraction", 100.0, "dead %")):
        for i, (report, label) in enumerate(zip(reports, labels, strict=True)):
            values = [scale * report[key][n] for n in names]
            ax.bar(np.arange(len(names)) + i * width, values, width, label=label)
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
        ax.set(xlabel="model", ylabel=title, title=f"{title} per model")
        ax.legend(fontsize="small")
    return fig


def figure_classes(tables: list[dict[str, Any]], labels: list[str]) -> Figure:
    """Per store: stacked bars per model of the concepts it uses, by class."""
    fig, axes = _figure(1, len(tables))
    for ax, table, label in zip(axes[0], tables, labels, strict=True):
        names = list(table["per_model"])
        bottom = np.zeros(len(names))
        for c in CLASSES[:3]:
            counts = np.array([table["per_model"][n][c] for n in names], dtype=np.float64)
            ax.bar(names, counts, bottom=bottom, color=_CLASS_COLORS[c], label=c)
            bottom += counts
        ax.set(xlabel="model", ylabel="concepts used", title=f"Concept classes — {label}")
        ax.legend()
    return fig


def figure_matching(baselines: dict[str, Any]) -> Figure:
    """Per model pair: matched activation correlation, sorted, independent SAEs vs USAE same index."""
    pairs = baselines["matching"]
    fig, axes = _figure(1, len(pairs))
    for ax, pair in zip(axes[0], pairs, strict=True):
        ax.plot(pair["independent_sorted"], label="independent SAEs (Hungarian)")
        ax.plot(pair["usae_sorted"], label="USAE (same latent)")
        ax.axhline(pair["independent"]["threshold"], color="black", linestyle="--", linewidth=1)
        ax.set(xlabel="latent pair (sorted)", ylabel="activation correlation", title=" vs ".join(pair["models"]))
        ax.legend()
    return fig


def figure_dictionary_agreement(baselines: dict[str, Any]) -> Figure:
    """Per model: Hungarian-matched cosine of USAE vs independent dictionary rows, and random rows."""
    agreement = baselines["dictionary_agreement"]
    fig, axes = _figure(1, len(agreement))
    for ax, (name, a) in zip(axes[0], agreement.items(), strict=True):
        ax.plot(a["cosines"], label="USAE vs independent")
        ax.plot(a["random_cosines"], label="USAE vs random directions")
        ax.axhline(a["threshold"], color="black", linestyle="--", linewidth=1)
        ax.set(xlabel="matched pair (sorted)", ylabel="cosine", title=f"Dictionary agreement — {name}")
        ax.legend()
    return fig


# -- report.md ----------------------------------------------------------------------------------
_REPORT_MD = r"""# USAE evaluation report

Run models: {{ names | join(", ") }} · {{ stores[0].n_latents }} concepts · k = {{ stores[0].k }} ·
stores: {% for s in stores %}`{{ s.label }}` ({{ s.n_rows }} rows){{ ", " if not loop.last }}{% endfor %}.
Concept classes use min rate {{ thresholds.min_rate | num }} (a model *uses* a concept firing on at
least this fraction of rows) and universal firing entropy ≥ {{ thresholds.universal_fe | num }};
a concept fires when its code exceeds τ = {{ stores[0].tau | num }}. See docs/report.md.

## Summary

| |{% for s in stores %} {{ s.label }} |{% endfor %}

|---|{% for s in stores %}---:|{% endfor %}

{% for key, title in summary_rows %}
| {{ title }} |{% for s in stores %} {{ s[key] | num }} |{% endfor %}

{% endfor %}

## Cross-reconstruction R²

Row: encode with (src); column: decode to (dst).

![Cross-reconstruction R² matrices](r2_matrix.png)

{% for s in stores %}
**{{ s.label }}**

| src \ dst |{% for n in names %} {{ n }} |{% endfor %}

|---|{% for n in names %}---:|{% endfor %}

{% for src in names %}
| {{ src }} |{% for v in s.r2_matrix[loop.index0] %} {{ v | num }} |{% endfor %}

{% endfor %}

{% endfor %}
## Per model: FVU, L0, dead

| model |{% for q in ("FVU", "L0", "dead %") %}{% for s in stores %} {{ q }} ({{ s.label }}) |{% endfor %}{% endfor %}

|---|{% for _ in range(3 * stores | length) %}---:|{% endfor %}

{% for n in names %}
| {{ n }} |{% for s in stores %} {{ s.fvu[n] | num }} |{% endfor %}{% for s in stores %} {{ s.l0[n] | num }} |{% endfor %}{% for s in stores %} {{ (100 * s.dead_fraction[n]) | num }} |{% endfor %}

{% endfor %}

![L0 and dead concepts per model](dead_l0.png)

## Concept classes

| class |{% for s in stores %} all ({{ s.label }}) |{% for n in names %} {{ n }} ({{ s.label }}) |{% endfor %}{% endfor %}

|---|{% for _ in range((names | length + 1) * stores | length) %}---:|{% endfor %}

{% for c in classes %}
| {{ c }} |{% for s in stores %} {{ s.classes.total[c] }} |{% for n in names %} {{ s.classes.per_model[n][c] if c != "dead" else "–" }} |{% endfor %}{% endfor %}

{% endfor %}

Per-model columns count the concepts that model uses.

![Concept classes per model](classes.png)

![Firing entropy](firing_entropy.png)

## Co-firing and energy

![Co-fire proportion vs energy rank](cofire_rank.png)

![Co-fire count vs energy](cofire_energy.png)

| store |{% for n in names %} Pearson r ({{ n }}) |{% endfor %}

|---|{% for n in names %}---:|{% endfor %}

{% for s in stores %}
| {{ s.label }} |{% for n in names %} {{ s.loglog_r[n] | num }} |{% endfor %}

{% endfor %}

## Top concepts per class

Ranked by energy summed over models. Fires: per 1000 rows; CFP: co-fire proportion.
{% for s in stores %}
{% for c in classes[:3] %}

**{{ c }} — {{ s.label }}**

| concept | FE |{% for n in names %} fires {{ n }} |{% endfor %}{% for n in names %} energy {{ n }} |{% endfor %}{% for n in names %} CFP {{ n }} |{% endfor %}

|---:|---:|{% for _ in range(3 * names | length) %}---:|{% endfor %}

{% for t in s.top[c] %}
| {{ t.latent }} | {{ t.fe | num }} |{% for v in t.per_1k %} {{ v | num }} |{% endfor %}{% for v in t.energy %} {{ v | num }} |{% endfor %}{% for v in t.cfp %} {{ v | num }} |{% endfor %}

{% else %}
| none | |{% for _ in range(3 * names | length) %} |{% endfor %}

{% endfor %}
{% endfor %}
{% endfor %}
{% if b %}

## Baselines: independent SAEs

One TopK SAE per model, trained by the same code with the run's settings ({{ b.independent.n_latents }}
concepts, k = {{ b.independent.k }}, {{ b.independent.steps }} steps of {{ b.independent.batch_size }} rows),
under `{{ b.independent.dir }}`; compared on {{ b.n_rows }} rows of `{{ b.store.path }}`.

### Latent matching across models

| models | independent: matched (> {{ b.matching[0].independent.threshold | num }}) | independent: mean corr | USAE same latent: matched | USAE: mean corr |
|---|---:|---:|---:|---:|
{% for p in b.matching %}
| {{ p.models | join(" / ") }} | {{ p.independent.matched_fraction | num }} | {{ p.independent.mean_similarity | num }} | {{ p.usae_same_index.matched_fraction | num }} | {{ p.usae_same_index.mean_similarity | num }} |
{% endfor %}

![Matched activation correlation](matching.png)

### Dictionary agreement (USAE vs independent SAE of the same model)

| model | cosine > {{ (b.dictionary_agreement.values() | first).threshold | num }} | mean cosine | random: cosine > {{ (b.dictionary_agreement.values() | first).threshold | num }} | random: mean cosine |
|---|---:|---:|---:|---:|
{% for n, a in b.dictionary_agreement.items() %}
| {{ n }} | {{ a.fraction_above | num }} | {{ a.mean_cosine | num }} | {{ a.random_fraction_above | num }} | {{ a.random_mean_cosine | num }} |
{% endfor %}

![Dictionary agreement](dictionary_agreement.png)

### Representation similarity ({{ b.similarity.n_rows }} rows, k = {{ b.similarity.knn_k }})

| models |{% for kind in sim_kinds %} CKA {{ sim_titles.get(kind, kind) }} |{% endfor %}{% for kind in sim_kinds %} mutual k-NN {{ sim_titles.get(kind, kind) }} |{% endfor %}

|---|{% for _ in range(2 * sim_kinds | length) %}---:|{% endfor %}

{% for i, j in pairs %}
| {{ names[i] }} / {{ names[j] }} |{% for kind in sim_kinds %} {{ b.similarity.cka[kind][i][j] | num }} |{% endfor %}{% for kind in sim_kinds %} {{ b.similarity.mutual_knn[kind][i][j] | num }} |{% endfor %}

{% endfor %}
{% if b.recovery %}

### Planted-concept recovery (cosine > {{ b.recovery.threshold }} in every owning model)

| kind | USAE | independent SAEs + matching |
|---|---:|---:|
{% for kind in ("universal", "partial", "specific", "all") %}
| {{ kind }} | {{ b.recovery.usae[kind] | num }} | {{ b.recovery.independent_matched[kind] | num }} |
{% endfor %}
{% endif %}
{% endif %}
"""


def _num(v: Any) -> str:
    """A table cell: '–' for missing, integers as is, floats to 3 significant digits."""
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    if isinstance(v, int | np.integer):
        return str(int(v))
    v = float(v) + 0.0  # -0.0 prints as "0"
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True
    )
    env.filters["num"] = _num
    return env


def _store_context(report: dict[str, Any], label: str, thresholds: ClassThresholds, n_top: int) -> dict[str, Any]:
    labels = classify(report, thresholds)
    cofires_s = np.asarray(report["cofiring"]["cofires"], dtype=np.float64)
    loglog_r = {n: loglog_pearson(np.asarray(report["energy"][n]), cofires_s)[0] for n in report["model_names"]}
    classes = class_counts(report, labels, thresholds)
    counts = {f"count_{c}": classes["total"][c] for c in CLASSES}
    return {
        **report,
        **counts,
        "label": label,
        "classes": classes,
        "top": top_concepts(report, labels, n_top),
        "loglog_r": loglog_r,
    }


_SUMMARY_ROWS = [
    ("n_rows", "rows"),
    ("r2_self_mean", "R² self (mean over models)"),
    ("r2_cross_mean", "R² cross (mean over src ≠ dst)"),
    ("firing_entropy_mean", "firing entropy (mean over live concepts)"),
    ("dead_fraction_all", "dead in every model (fraction)"),
    *((f"count_{c}", f"{c} concepts") for c in CLASSES),
]


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=110)
    log.debug("wrote %s", path)


def write_report(
    report: dict[str, Any] | list[dict[str, Any]],
    out_dir: str | Path,
    baselines: dict[str, Any] | None = None,
    *,
    thresholds: ClassThresholds | None = None,
    n_top: int = 8,
) -> Path:
    """Write OUT_DIR/report.md and its PNG figures; return the report.md path.

    ``report``: one ``evaluate`` report, or several of the same run on different stores (shown
    side by side, in the given order). ``baselines``: ``run_baselines``' result (RUN/baselines.json),
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
    figures = {
        "r2_matrix": figure_r2(reports, labels),
        "firing_entropy": figure_firing_entropy(reports, labels, thresholds),
        "cofire_rank": figure_cofire_rank(reports, labels),
        "cofire_energy": figure_cofire_energy(reports, labels),
        "dead_l0": figure_dead_l0(reports, labels),
        "classes": figure_classes([s["classes"] for s in stores], labels),
    }
    if baselines is not None:
        figures["matching"] = figure_matching(baselines)
        figures["dictionary_agreement"] = figure_dictionary_agreement(baselines)
    for stem, fig in figures.items():
        _save(fig, out_dir / f"{stem}.png")
    text = (
        _environment()
        .from_string(_REPORT_MD)
        .render(
            names=names,
            stores=stores,
            thresholds=thresholds._asdict(),
            classes=CLASSES,
            summary_rows=_SUMMARY_ROWS,
            b=baselines,
            pairs=[(i, j) for i in range(len(names)) for j in range(i + 1, len(names))],
            sim_kinds=list((baselines or {}).get("similarity", {}).get("cka", {})),
            sim_titles={"raw": "raw", "usae_codes": "USAE codes", "independent_codes": "indep. codes"},
        )
    )
    path = out_dir / "report.md"
    path.write_text(text)
    log.info("wrote %s and %d figures", path, len(figures))
    return path
