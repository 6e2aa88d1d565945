"""The two end-to-end demos behind ``usae demo``.

* :func:`run_demo` (the default): three pretrained models that ship inside installed packages
  (EfficientNet-Lite0, Open-NSFW, CRAFT's VGG16-BN) on the offline photos → store → universal SAE →
  report → concept explorer. Each stage is skipped when its output is already complete, so a rerun
  picks up where an interrupted one stopped.
* :func:`run_synthetic_demo` (``--synthetic``): a synthetic world with planted universal, partial
  and specific concepts, and how many of them the trained dictionary recovers.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from usae.config import DemoConfig, EvalConfig, ExtractConfig, SynthConfig, TrainConfig, read_json, write_json_atomic
from usae.errors import UsaeError

log = logging.getLogger(__name__)


def _trained(run_dir: Path, cfg: TrainConfig) -> bool:
    """True when ``run_dir`` holds a finished run of exactly ``cfg``'s training settings."""
    from usae.checkpoint import load

    if not (run_dir / "model.safetensors").is_file() or not (run_dir / "config.json").is_file():
        return False
    try:
        saved = read_json(run_dir / "config.json", "run config").get("train", {})
        load(run_dir)
    except (UsaeError, AttributeError):
        return False
    want = {"steps": cfg.steps, "n_latents": cfg.n_latents, "k": cfg.k, "batch_size": cfg.batch_size, "seed": cfg.seed}
    return all(saved.get(key) == value for key, value in want.items())


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Pretrained models on offline photos -> store -> universal SAE -> report -> explorer."""
    from usae.evaluate import evaluate_cli
    from usae.extract import extract
    from usae.train import fit, resolve_device

    out = Path(cfg.out)
    store_dir, run_dir = out / "store", out / "run"
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if not (store_dir / "metadata.json").is_file():
        extract(
            ExtractConfig(
                images=cfg.images, models=cfg.models, out=store_dir, max_images=cfg.max_images, device=cfg.device
            )
        )
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
    if not _trained(run_dir, train_cfg):
        fit(train_cfg)
    timings["train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    report = evaluate_cli(EvalConfig(run=run_dir, stores=(store_dir,), device=cfg.device))[0]
    timings["evaluate_s"] = time.perf_counter() - t0

    explorer = None
    try:
        from usae.explore import explore
    except ImportError:  # the explorer is optional in a minimal install
        explore = None
    if explore is not None:
        t0 = time.perf_counter()
        # Coordinated maximisation through three CNNs costs minutes per concept on a CPU: keep it
        # short there (about a minute for one concept), full length on a GPU.
        on_gpu = resolve_device(cfg.device).type == "cuda"
        explorer = explore(
            run_dir, store_dir, out / "explorer", device=cfg.device, maximize_top=cfg.maximize,
            maximize_steps=256 if on_gpu else 48, maximize_crops=6 if on_gpu else 2,
        )  # fmt: skip
        timings["explore_s"] = time.perf_counter() - t0
    summary = {
        "store": str(store_dir),
        "run": str(run_dir),
        "report": str(run_dir / "report.md"),
        "explorer": str(explorer) if explorer else None,
        "timings": timings,
        "report_data": report,
    }
    write_json_atomic(out / "summary.json", {k: v for k, v in summary.items() if k != "report_data"})
    return summary


def run_synthetic_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Synthetic world -> universal SAE -> report -> recovery of the planted concepts."""
    from usae.checkpoint import load
    from usae.evaluate import evaluate
    from usae.synth import load_truth, recovery, truth_path, write_world
    from usae.train import fit

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
