"""The report's figures: matplotlib ``Figure`` objects drawn on the Agg canvas (no pyplot, no global state).

Each ``figure_*`` takes one or several reports (one run on several stores: one panel or column per
store) and works on the streamed sums already in them, so nothing re-reads the store.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from usae.evaluation.classes import CLASSES, USED_CLASSES, ClassThresholds, floats
from usae.evaluation.fidelity.measures import CONTROLS, headline

_CLASS_COLORS = dict(zip(CLASSES, ("tab:green", "tab:orange", "tab:blue", "tab:olive", "tab:gray"), strict=True))


def loglog_pearson(x_s: np.ndarray, y_s: np.ndarray) -> tuple[float, int]:
    """Pearson r of log10 x vs log10 y over entries where both are > 0, and how many those are."""
    keep = (x_s > 0) & (y_s > 0)
    if keep.sum() < 3:
        return float("nan"), int(keep.sum())
    return float(np.corrcoef(np.log10(x_s[keep]), np.log10(y_s[keep]))[0, 1]), int(keep.sum())


def _figure(n_rows: int, n_cols: int, panel: tuple[float, float] = (4.2, 3.4)) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(panel[0] * n_cols, panel[1] * n_rows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, np.atleast_2d(np.asarray(fig.subplots(n_rows, n_cols, squeeze=False)))


def figure_r2(reports: list[dict[str, Any]], labels: list[str]) -> Figure:
    """One annotated heatmap per store of the [src][dst] cross-reconstruction R², shared colour bar."""
    fig, axes = _figure(1, len(reports))
    for ax, report, label in zip(axes[0], reports, labels, strict=True):
        names, r2_mm = report["model_names"], floats([v for row in report["r2_matrix"] for v in row])
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
        fe_s = floats(report["firing_entropy"])
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
            cfp_s = floats(report["cofiring"]["proportion"][name])[order]
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
                ax.text(
                    0.5,
                    0.5,
                    "no concept with energy > 0\nthat co-fires",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                )
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
        for c in USED_CLASSES:
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


def figure_splice(result: dict[str, Any]) -> Figure:
    """Two heatmaps: task fidelity (agreement for classifiers, correlation for dense heads) and loss
    recovered; rows are the sources then the controls, columns the destinations (grey: unavailable)."""
    names = result["models"]
    row_labels = [f"from {n}" for n in names] + [c.replace("_", " ") for c in CONTROLS]
    m = len(names)
    panels = (("fidelity", "task fidelity (agreement / correlation)"), ("loss_recovered", "loss recovered"))
    fig = Figure(figsize=(2.2 + 1.6 * m * len(panels), 1.6 + 0.45 * len(row_labels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, title) in zip(axes, panels, strict=True):
        v_rm = np.full((len(row_labels), m), np.nan)
        for c, j in enumerate(names):
            k = headline(result, j) if key == "fidelity" else key
            for r in range(m):
                v = result["matrices"][k][r][c]
                v_rm[r, c] = np.nan if v is None else v
            for r, control in enumerate(CONTROLS, start=m):
                v = result["controls"].get(j, {}).get(control, {}).get(k)
                v_rm[r, c] = np.nan if v is None else v
        ax.set_facecolor("0.85")
        image = ax.imshow(np.ma.masked_invalid(v_rm), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for (r, c), v in np.ndenumerate(v_rm):
            text = "n/a" if np.isnan(v) else f"{v:.2f}"
            ax.text(c, r, text, ha="center", va="center", color="black" if np.isnan(v) or v >= 0.6 else "white")
        ax.axhline(m - 0.5, color="white", linewidth=3)
        labels = [f"{j}\n({result['task'].get(j) or 'unavailable'})" for j in names]
        ax.set_xticks(range(m), labels)
        ax.set_yticks(range(len(row_labels)), row_labels)
        ax.set(xlabel="spliced into (destination)", title=title)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(f"Splicing reconstructions back into each model ({result['n_images']} images)")
    return fig
