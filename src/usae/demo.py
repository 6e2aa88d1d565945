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
from typing import Any

from usae._io import check_output, write_json_atomic
from usae.config import DemoConfig, EvalConfig, ExtractConfig, LabelConfig, SynthConfig, TrainConfig
from usae.data.synth import load_truth, recovery, truth_path, write_world
from usae.device import resolve_device
from usae.evaluation.evaluate import evaluate, evaluate_cli
from usae.evaluation.labeling import label
from usae.evaluation.splice import splice, write_splice
from usae.explorer.site import explore
from usae.extraction.extract import extract, val_store_path
from usae.run import finished_run, load
from usae.training.fit import fit

log = logging.getLogger(__name__)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Pretrained models on offline photos -> store (+ held-out store) -> universal SAE -> held-out
    report with the in-sample one beside it -> concept names -> explorer."""
    out = check_output(cfg.out, "", replaces=False)
    store_dir, run_dir = out / "store", out / "run"
    val_dir = val_store_path(store_dir)
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
    )
    if not finished_run(run_dir, train_cfg):
        fit(train_cfg)
    timings["train_s"] = time.perf_counter() - t0

    held_out = val_dir.is_dir()
    stores = (val_dir, store_dir) if held_out else (store_dir,)
    t0 = time.perf_counter()
    on_gpu = resolve_device(cfg.device).type == "cuda"
    # Splicing runs every model 1 + M + 4 times per image: a few images on a CPU, more on a GPU.
    spliced = splice(run_dir, stores[0], max_images=64 if on_gpu else cfg.splice_images, device=cfg.device)
    write_splice(spliced, run_dir)
    timings["splice_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    labels = label(LabelConfig(run=run_dir, store=stores[0], out=run_dir, device=cfg.device))
    timings["label_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    reports = evaluate_cli(EvalConfig(run=run_dir, stores=stores, device=cfg.device))
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
    report = evaluate(run_dir, store_dir)
    sae = load(run_dir)
    rec = recovery({n: sae.dictionary(n).numpy() for n in sae.model_names}, load_truth(truth_path(store_dir)))
    summary = {"recovery": rec, "run": str(run_dir), "report": str(run_dir / "report.json"), "report_data": report}
    write_json_atomic(cfg.out / "summary.json", {k: v for k, v in summary.items() if k != "report_data"})
    return summary
