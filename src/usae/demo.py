"""The two end-to-end demos behind ``usae demo``.

* :func:`run_demo` (the default): three pretrained models that ship inside installed packages
  (EfficientNet-Lite0, Open-NSFW, CRAFT's VGG16-BN) on the offline photos → a store and a held-out
  store (a quarter of the images, by folder) → universal SAE trained on the first → report on the
  held-out images beside the in-sample one → concept names with their chance level → explorer.
  Extraction and training are skipped when their output is already complete, so a rerun picks up
  where an interrupted one stopped.
* :func:`run_synthetic_demo` (``--synthetic``): a synthetic world with planted universal, partial
  and specific concepts, and how many of them the trained dictionary recovers.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from usae._io import check_output, write_json_atomic
from usae.config import DemoConfig, EvalConfig, ExtractConfig, LabelConfig, SpliceConfig, SynthConfig, TrainConfig
from usae.data.synth import load_truth, recovery, truth_path, write_world
from usae.device import resolve_device
from usae.evaluation.classes import energy_share
from usae.evaluation.evaluate import evaluate, format_summary
from usae.evaluation.fidelity.splice import format_splice, splice
from usae.evaluation.naming.label import artifact_marks, border_share_by_chance, label
from usae.experiments.frontier import random_control_line
from usae.explorer.site import explore
from usae.extraction.extract import extract, val_store_path
from usae.model.metrics import self_cross_means
from usae.run import finished_run, load
from usae.training.fit import fit

log = logging.getLogger(__name__)


def _extract_and_train(cfg: DemoConfig, store_dir: Path, run_dir: Path) -> dict[str, float]:
    """The store (and its held-out twin) and the run, each skipped when already complete; their times."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if not (store_dir / "metadata.json").is_file():
        extract(
            ExtractConfig(
                images=cfg.images, models=cfg.models, out=store_dir, max_images=cfg.max_images, device=cfg.device,
                labels="folders", val_fraction=cfg.val_fraction, val_seed=cfg.seed, alpha_crop=cfg.alpha_crop,
                overwrite=True,
            )
        )  # fmt: skip
    timings["extract_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    train_cfg = TrainConfig(
        store=store_dir,
        out=run_dir,
        n_latents=cfg.n_latents,
        k=cfg.k,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        device=cfg.device,
        overwrite=True,
        val_every=0,  # the demo measures the held-out store right after training; per-step validation cost 84 s
    )
    if not finished_run(run_dir, train_cfg):
        fit(train_cfg)
    timings["train_s"] = time.perf_counter() - t0
    return timings


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Pretrained models on offline photos -> store (+ held-out store) -> universal SAE -> held-out
    report with the in-sample one beside it -> concept names -> explorer."""
    out = check_output(cfg.out, "", replaces=False)
    store_dir, run_dir = out / "store", out / "run"
    val_dir = val_store_path(store_dir)
    timings = _extract_and_train(cfg, store_dir, run_dir)

    held_out = val_dir.is_dir()
    stores = (val_dir, store_dir) if held_out else (store_dir,)
    t0 = time.perf_counter()
    on_gpu = resolve_device(cfg.device).type == "cuda"
    # Splicing runs every model 1 + M + 4 times per image: a few images on a CPU, more on a GPU.
    max_images = 64 if on_gpu else cfg.splice_images
    spliced = splice(SpliceConfig(run=run_dir, store=stores[0], max_images=max_images, device=cfg.device))
    timings["splice_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    # The demo names its concepts as a step of its own (timed), so evaluate finds labels.json current.
    labels = label(LabelConfig(run=run_dir, store=stores[0], out=run_dir, device=cfg.device))
    timings["label_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    # One point of the interpretability-vs-fidelity frontier: this run against a random dictionary of
    # its shapes, named and spliced the same way (`usae frontier` draws the whole curve).
    frontier_line = random_control_line(
        run_dir, stores[0], out / "frontier-control", splice_images=max_images, n_perm=2000, device=cfg.device
    )
    timings["frontier_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    reports = evaluate(EvalConfig(run=run_dir, stores=stores, device=cfg.device))
    report = reports[0]
    if held_out:  # RUN/report.json is the held-out report: what the explorer and label read
        write_json_atomic(run_dir / "report.json", report)
    timings["evaluate_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    # Coordinated maximisation through three CNNs costs minutes per concept on a CPU: keep it
    # short there (about a minute for one concept), full length on a GPU.
    explorer = explore(
        run_dir, stores[0], out / "explorer", device=cfg.device, maximize_top=cfg.maximize,
        maximize_steps=256 if on_gpu else 48, maximize_crops=6 if on_gpu else 2,
    )  # fmt: skip
    timings["explore_s"] = time.perf_counter() - t0
    summary = {
        "store": str(store_dir),
        "evaluated_on": str(stores[0]),
        "run": str(run_dir),
        "report": str(run_dir / "report.md"),
        "labels": str(run_dir / "labels.json"),
        "explorer": str(explorer),
        "timings": timings,
        "r2_in_sample": reports[1]["r2_matrix"] if held_out else None,
        "report_data": report,
        "labels_data": labels,
        "splice_data": spliced,
        "frontier_line": frontier_line,
    }
    write_json_atomic(out / "summary.json", {k: v for k, v in summary.items() if not k.endswith("_data")})
    return summary


def run_synthetic_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Synthetic world -> universal SAE -> report -> recovery of the planted concepts."""
    store_dir, run_dir = cfg.out / "synthetic-store", cfg.out / "synthetic-run"
    if not (store_dir / "metadata.json").is_file():
        write_world(SynthConfig(out=store_dir, n_rows=120_000, seed=cfg.seed, overwrite=True))
    fit(
        TrainConfig(
            store=store_dir, out=run_dir, n_latents=512, k=8, steps=1500, batch_size=1024,
            seed=cfg.seed, device=cfg.device, overwrite=True,
        )
    )  # fmt: skip
    report = evaluate(EvalConfig(run=run_dir, stores=(store_dir,), report=False, device=cfg.device))[0]
    sae = load(run_dir)
    rec = recovery({n: sae.dictionary(n).numpy() for n in sae.model_names}, load_truth(truth_path(store_dir)))
    summary = {"recovery": rec, "run": str(run_dir), "report": str(run_dir / "report.json"), "report_data": report}
    write_json_atomic(cfg.out / "summary.json", {k: v for k, v in summary.items() if k != "report_data"})
    return summary


def demo_command(cfg: DemoConfig) -> str:
    """``usae demo``: run it; what the command prints."""
    summary = run_synthetic_demo(cfg) if cfg.synthetic else run_demo(cfg)
    report = summary["report_data"]
    lines = []
    if summary.get("evaluated_on"):
        lines.append(f"measured on held-out images: {summary['evaluated_on']} ({report['n_rows']} rows)")
    lines.append(format_summary(report))
    if summary.get("r2_in_sample"):
        lines.append("\n" + format_r2_gap(report, summary["r2_in_sample"]))
    if summary.get("splice_data"):
        lines.append("\n" + format_splice(summary["splice_data"]))
    if summary.get("labels_data"):
        lines.append("\n" + format_named(summary["labels_data"], report))
    if summary.get("frontier_line"):
        lines.append("\n" + summary["frontier_line"])
    if "recovery" in summary:
        lines.append("\nplanted concepts recovered (cosine > 0.9 in every owning model):")
        lines += [f"  {kind:10s} {100 * frac:5.1f}%" for kind, frac in summary["recovery"].items()]
    if summary.get("timings"):
        lines.append(
            "\ntimes: " + ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in summary["timings"].items())
        )
    lines.append(f"\nrun: {summary['run']}\nreport: {summary['report']}")
    if summary.get("explorer"):
        lines.append(f"concept explorer: {summary['explorer']}")
    return "\n".join(lines)


def format_r2_gap(report: dict, r2_in_sample: list[list[float]]) -> str:
    """Mean self and cross R², held-out vs in-sample (the images the dictionary was trained on)."""

    (hs, hc), (ts, tc) = self_cross_means(report["r2_matrix"]), self_cross_means(r2_in_sample)
    hc, tc = hc or 0.0, tc or 0.0
    return (
        f"R² held-out vs in-sample: self {hs:.3f} vs {ts:.3f} (gap {ts - hs:+.3f}), "
        f"cross {hc:.3f} vs {tc:.3f} (gap {tc - hc:+.3f})"
    )


def format_named(labels: dict, report: dict, n_show: int = 8) -> str:
    """Per label family: the top universal concepts (by normalised energy) named alike in every model."""
    classes, names = report["classes"]["labels"], report["model_names"]
    share_s = energy_share(report).sum(0)
    base = border_share_by_chance(labels, tuple(labels["store"].get("grid") or (1, 1)))
    lines = []
    for fam, f in labels["families"].items():
        universal = [k for k, e in f["concepts"].items() if e.get("agrees") and classes[int(k)] == "universal"]
        summary, control = f["summary"], f["shuffled"]
        lines.append(
            f"{fam} labels ({f['level']} level): {len(universal)} universal concepts get the same name in every "
            f"model (all classes {summary['agreed']}; shuffled labels {control['agreed']}; FDR p <= {summary['p_threshold']:.2g})"
        )
        for k in sorted(universal, key=lambda k: -share_s[int(k)])[:n_show]:
            e = f["concepts"][k]
            per = "; ".join(
                f"{n} p@N {e[n]['precision_at_n']:.2f} vs chance {e[n]['precision_at_n'] / max(e[n]['lift'], 1e-9):.2f}, p {e[n]['p_value']:.2g}"
                for n in names
                if isinstance(e.get(n), dict)
            )
            marks = [m["kind"] for m in artifact_marks(labels.get("artifacts", {}), int(k), names, base)]
            flag = f" (artifact: {', '.join(marks)})" if marks else ""
            lines.append(f"  concept {k}: {e['best']}{flag} [{per}]")
    return "\n".join(lines)
