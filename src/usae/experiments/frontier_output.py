"""``usae frontier``'s outputs: one row per (point, dictionary kind) in frontier.json / .csv / .md, and figures.

Row keys (frontier.csv columns; "/<model>" columns follow the headline ones):

* ``r2_self``, ``r2_cross`` (ours: SST per dimension) and ``r2_self_paper``, ``r2_cross_paper`` (the
  paper's code: SST around one global mean) on the held-out store;
* ``loss_recovered_own`` / ``loss_recovered_cross``: mean over models of each model's loss recovered
  from its own code / the mean over the other models' codes (task fidelity; empty without a task);
* ``named_share``: concepts with the same name beyond chance in every model using them, per latent
  (family ``naming_family``: dataset labels, else row labels, else pixel labels), beside
  ``named_share_shuffled`` (the shuffled-label control) and ``named_share_chance`` (the agreement of
  unrelated latents: each model's concepts permuted); ``named_per_model``: each model's named
  share of the concepts it uses, averaged;
* ``universal`` / ``partial`` / ``specific`` (concept counts), ``dead_pct``, ``l0``, ``tokens_per_s``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from usae._io import save_figure, write_json_atomic, write_text_atomic

REACHED = 0.9
"""``k_reaching``: the smallest k whose own-code loss recovered is at least this."""
FAMILIES = ("dataset", "rows", "pixels")
"""The naming family the headline columns and the figure use: the first of these present."""
HEADLINE = ["point", "n_latents", "k", "kind", "r2_self", "r2_cross", "r2_self_paper", "r2_cross_paper",
            "loss_recovered_own", "loss_recovered_cross", "named_share", "named_share_shuffled",
            "named_share_chance", "named_per_model", "naming_family", "universal", "partial", "specific", "dead_pct", "l0",
            "tokens_per_s"]  # fmt: skip
TABLE = ["n_latents", "k", "kind", "r2_self", "r2_cross", "loss_recovered_own", "loss_recovered_cross",
         "named_share", "named_share_chance", "named_share_shuffled", "named_per_model", "universal", "dead_pct",
         "tokens_per_s"]  # fmt: skip
_COLORS = {"universal": "tab:green", "independent": "tab:blue", "random": "tab:gray"}


def _mean(values: Any) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _family(naming: dict[str, Any] | None) -> str | None:
    return next((f for f in FAMILIES if naming and f in naming), None)


def rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per (point, kind) in grid order (keys: the module docstring)."""
    out = []
    for p in summary["points"]:
        for kind, s in p["kinds"].items():
            names, fid, naming = s["model_names"], s["loss_recovered"], s["naming"]
            family = _family(naming)
            fam = naming[family] if family else None
            counts = s["classes"]
            row = {"point": p["point"], "n_latents": p["n_latents"], "k": p["k"], "kind": kind,
                   "r2_self": s["r2_self"], "r2_cross": s["r2_cross"], "r2_self_paper": s["r2_self_paper"],
                   "r2_cross_paper": s["r2_cross_paper"],
                   "loss_recovered_own": _mean(fid["own"].values()) if fid else None,
                   "loss_recovered_cross": _mean(fid["cross"].values()) if fid else None,
                   "named_share": fam["named_share"] if fam else None,
                   "named_share_shuffled": fam["named_share_shuffled"] if fam else None,
                   "named_share_chance": fam["named_share_chance"] if fam else None,
                   "named_per_model": _mean(fam["per_model"].values()) if fam else None, "naming_family": family,
                   "universal": counts["universal"], "partial": counts["partial"], "specific": counts["specific"],
                   "dead_pct": 100 * s["dead_fraction_all"], "l0": _mean(s["l0"].values()),
                   "tokens_per_s": _mean((s.get("tokens_per_s") or {}).values())}  # fmt: skip
            for m in names:
                row[f"loss_recovered_own/{m}"] = fid["own"][m] if fid else None
                row[f"loss_recovered_cross/{m}"] = fid["cross"][m] if fid else None
                row[f"named_per_model/{m}"] = fam["per_model"].get(m) if fam else None
                row[f"dead_pct/{m}"] = 100 * s["dead_fraction"][m]
            out.append(row)
    return out


def k_reaching(table: list[dict[str, Any]], names: list[str], level: float = REACHED) -> dict[str, Any]:
    """{kind: {n_latents: {model: the smallest k with own loss recovered >= level, or None}}}."""
    out: dict[str, Any] = {}
    for row in sorted(table, key=lambda r: r["k"]):
        per = out.setdefault(row["kind"], {}).setdefault(str(row["n_latents"]), dict.fromkeys(names))
        for m in names:
            v = row.get(f"loss_recovered_own/{m}")
            if per[m] is None and v is not None and v >= level:
                per[m] = row["k"]
    return out


def write_outputs(summary: dict[str, Any], out: Path) -> dict[str, Any]:
    """Add ``rows`` and ``k_reaching`` to ``summary``; write frontier.json/.csv/.md and the figures."""
    table = rows(summary)
    names = summary["model_names"]
    has_fidelity = any(r["loss_recovered_own"] is not None for r in table)
    summary = summary | {"rows": table, "k_reaching": k_reaching(table, names) if has_fidelity else None}
    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(HEADLINE + [c for r in table for c in r]))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(table)
    write_text_atomic(out / "frontier.csv", text.getvalue())
    figures = {"frontier-r2.png": figure_r2_l0(table)}
    if has_fidelity:
        figures["frontier-fidelity.png"] = figure_fidelity_naming(table, names)
    for name, fig in figures.items():
        save_figure(fig, out / name)
    summary["figures"] = sorted(figures)
    write_text_atomic(out / "frontier.md", format_markdown(summary))
    write_json_atomic(out / "frontier.json", summary)
    return summary


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def format_table(table: list[dict[str, Any]]) -> str:
    """The headline columns as a markdown table."""
    lines = ["| " + " | ".join(TABLE) + " |", "|" + "---|" * len(TABLE)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in TABLE) + " |" for r in table]
    return "\n".join(lines)


def format_markdown(summary: dict[str, Any]) -> str:
    """frontier.md: the table, k reaching loss recovered 0.9, random backbones, the figures."""
    val = summary["val"]
    parts = [
        "# Interpretability against fidelity",
        "",
        f"Trained on `{summary['store']['path']}`, measured on `{val['path']}`"
        + ("" if val["held_out"] else " (the training rows: no held-out store)")
        + ".",
        "",
        format_table(summary["rows"]),
        "",
        "named_share: concepts with the same name beyond chance (BH FDR) in every model using them, per latent; "
        "named_share_shuffled: the same with shuffled labels; named_share_chance: the agreement expected of "
        "unrelated latents (each model's concepts permuted); named_per_model: each model's named share of "
        "the concepts it uses. random: an untrained dictionary of the same shapes (what training earned is the gap).",
    ]
    if summary.get("k_reaching"):
        parts += ["", f"## k where loss recovered (own code) reaches {REACHED}", ""]
        for kind, sizes in summary["k_reaching"].items():
            for size, per in sizes.items():
                cells = ", ".join(f"{m} {'not within the grid' if k is None else k}" for m, k in per.items())
                parts.append(f"- {kind}, {size} latents: {cells}")
    else:
        parts += ["", "No task fidelity: no model of the store splices and no task head was given."]
    parts += _random_backbones(summary)
    parts += ["", *[f"![{f}]({f})" for f in summary.get("figures", [])]]
    return "\n".join(parts) + "\n"


def _random_backbones(summary: dict[str, Any]) -> list[str]:
    lines = []
    for p in summary["points"]:
        for kind, sec in (p.get("random_backbone") or {}).items():
            if not sec:
                continue
            for name, v in sec.items():
                if name != "real_r2_cross":
                    lines.append(f"- {p['point']} {kind}: {name} R² from real {_fmt(v['r2_from_real'])}, to real "
                                 f"{_fmt(v['r2_to_real'])} (real–real {_fmt(sec['real_r2_cross'])}); concepts shared "
                                 f"with a real model {_fmt(v['shared_with_real'])}")  # fmt: skip
    return ["", "## Random backbones against the real ones", "", *lines] if lines else []


def format_frontier(summary: dict[str, Any]) -> str:
    """What ``usae frontier`` prints: the table and where a model reaches loss recovered 0.9."""
    return format_markdown(summary).split("\n![")[0].strip()


# -- figures ----------------------------------------------------------------------------------------
def _figure(n_cols: int) -> tuple[Figure, list[Any]]:
    fig = Figure(figsize=(4.4 * n_cols, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(1, n_cols, squeeze=False)[0])


def _curves(table: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Rows by (kind, n_latents), each sorted by k: one curve each."""
    curves: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in table:
        curves.setdefault((row["kind"], row["n_latents"]), []).append(row)
    return {key: sorted(rs, key=lambda r: r["k"]) for key, rs in curves.items()}


def _plot(ax: Any, curves: dict, x_key: str, y_key: str) -> None:
    sizes = sorted({n for _, n in curves})
    for (kind, n_latents), rs in curves.items():
        pts = [(r[x_key], r[y_key], r["k"]) for r in rs if r.get(x_key) is not None and r.get(y_key) is not None]
        if not pts:
            continue
        xs, ys, ks = zip(*pts, strict=True)
        style = ("-", "--", ":", "-.")[sizes.index(n_latents) % 4]
        ax.plot(xs, ys, style, marker="o", color=_COLORS.get(kind, "black"), label=f"{kind} {n_latents}")
        for x, y, k in pts:
            ax.annotate(f"k{k}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)


def figure_fidelity_naming(table: list[dict[str, Any]], names: list[str]) -> Figure:
    """One panel per model: loss recovered from its own code against its named share, one curve per
    dictionary kind and size, k along each curve."""
    fig, axes = _figure(len(names))
    curves = _curves(table)
    for ax, m in zip(axes, names, strict=True):
        _plot(ax, curves, f"named_per_model/{m}", f"loss_recovered_own/{m}")
        ax.set(title=m, xlabel="named share (concepts named beyond chance)", ylabel="loss recovered (own code)")
        ax.axhline(0.0, color="0.6", linewidth=0.8)
    axes[0].legend(fontsize=7)
    return fig


def figure_r2_l0(table: list[dict[str, Any]]) -> Figure:
    """Self and cross R² (held out) against L0, one curve per dictionary kind and size, k along each."""
    fig, axes = _figure(2)
    curves = _curves(table)
    for ax, key in zip(axes, ("r2_self", "r2_cross"), strict=True):
        _plot(ax, curves, "l0", key)
        ax.set(title=key.replace("_", " "), xlabel="L0 (active latents per row)", ylabel="R² (held out)")
    axes[0].legend(fontsize=7)
    return fig
