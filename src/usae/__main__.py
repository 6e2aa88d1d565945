"""The ``usae`` command line: each subcommand is a config dataclass mapped to a library function."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import tyro

from usae.config import (
    AblateConfig,
    BaselineConfig,
    DemoConfig,
    EvalConfig,
    SynthConfig,
    TrainConfig,
    write_json_atomic,
)
from usae.errors import UsaeError

log = logging.getLogger("usae")


def synth(cfg: SynthConfig) -> Path:
    """Generate a synthetic world, write it as a store and its ground truth beside it."""
    from usae.store import write_store
    from usae.synth import make_world, save_truth

    names = [chr(ord("a") + i) if i < 26 else f"m{i}" for i in range(len(cfg.widths))]
    world = make_world(
        dict(zip(names, cfg.widths, strict=True)),
        n_rows=cfg.n_rows,
        n_universal=cfg.n_universal,
        n_partial=cfg.n_partial,
        n_specific=cfg.n_specific,
        k_active=cfg.k_active,
        noise=cfg.noise,
        seed=cfg.seed,
    )
    extra = {"synthetic": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "overwrite")}}
    path = write_store(cfg.out, world.data, dtype="float32", overwrite=cfg.overwrite, extra=extra)
    save_truth(truth_path(cfg.out), world)
    log.info("wrote store %s (%d rows) and ground truth %s", path, cfg.n_rows, truth_path(cfg.out))
    return path


def truth_path(store_dir: Path) -> Path:
    """Where `usae synth` puts a world's ground truth: beside the store, STORE.truth.safetensors."""
    store_dir = Path(store_dir)
    return store_dir.with_name(store_dir.name + ".truth.safetensors")


def train(cfg: TrainConfig) -> None:
    from usae.train import fit

    result = fit(cfg)
    print(json.dumps(result.last_metrics, indent=1))


def evaluate(cfg: EvalConfig) -> None:
    from usae.evaluate import evaluate_cli

    reports = evaluate_cli(cfg)
    for report in reports:
        if len(reports) > 1:
            print(f"\n== store {report['store']['path']}")
        print(format_summary(report))
    if cfg.report:
        print(f"\nreport: {(cfg.out or cfg.run) / 'report.md'}")


def baseline(cfg: BaselineConfig) -> None:
    from usae.baselines import baseline_cli

    print(format_baselines(baseline_cli(cfg)))


def format_baselines(result: dict) -> str:
    """A short text summary of RUN/baselines.json."""
    lines = ["latent matching (fraction of pairs with activation correlation > threshold)"]
    for p in result["matching"]:
        ind, usae = p["independent"], p["usae_same_index"]
        lines.append(
            f"  {' / '.join(p['models'])}: independent+Hungarian {ind['matched_fraction']:.3f}, USAE {usae['matched_fraction']:.3f}"
        )
    lines.append("dictionary agreement, USAE vs independent (cosine > 0.5 after Hungarian; random directions)")
    for name, a in result["dictionary_agreement"].items():
        lines.append(f"  {name}: {a['fraction_above']:.3f} (random {a['random_fraction_above']:.3f})")
    if "recovery" in result:
        rec = result["recovery"]
        lines.append(
            f"planted universal concepts recovered: USAE {rec['usae']['universal']:.3f}, independent {rec['independent_matched']['universal']:.3f}"
        )
    return "\n".join(lines)


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
    lines.append("concepts: " + ", ".join(f"{c} {counts[c]}" for c in ("universal", "partial", "specific", "dead")))
    return "\n".join(lines)


def demo(cfg: DemoConfig) -> dict:
    """Synthetic world -> universal SAE -> report -> recovery of the planted concepts."""
    from usae.checkpoint import load
    from usae.evaluate import evaluate as run_evaluate
    from usae.synth import load_truth, recovery

    store_dir, run_dir = cfg.out / "store", cfg.out / "run"
    if not (store_dir / "metadata.json").is_file():
        synth(SynthConfig(out=store_dir, n_rows=120_000, seed=cfg.seed, overwrite=True))
    train_cfg = TrainConfig(
        store=store_dir,
        out=run_dir,
        n_latents=512,
        k=8,
        steps=cfg.steps,
        batch_size=1024,
        seed=cfg.seed,
        device=cfg.device,
        overwrite=True,
    )
    from usae.train import fit

    fit(train_cfg)
    report = run_evaluate(run_dir, store_dir)
    sae = load(run_dir)
    rec = recovery({n: sae.dictionary(n).numpy() for n in sae.model_names}, load_truth(truth_path(store_dir)))
    summary = {
        "recovery": rec,
        "r2_cross_mean": report["r2_cross_mean"],
        "r2_self_mean": report["r2_self_mean"],
    }
    write_json_atomic(cfg.out / "summary.json", summary)
    print(format_summary(report))
    print("\nplanted concepts recovered (cosine > 0.9 in every owning model):")
    for kind, frac in rec.items():
        print(f"  {kind:10s} {100 * frac:5.1f}%")
    print(f"\nrun: {run_dir}  report: {run_dir / 'report.json'}  summary: {cfg.out / 'summary.json'}")
    return summary


def ablate(cfg: AblateConfig) -> None:
    from usae.ablate import ablate as run_ablate
    from usae.ablate import format_table

    print(format_table(run_ablate(cfg)))


COMMANDS = {
    "synth": SynthConfig,
    "train": TrainConfig,
    "evaluate": EvalConfig,
    "baseline": BaselineConfig,
    "ablate": AblateConfig,
    "demo": DemoConfig,
}
HANDLERS = {
    "synth": synth,
    "train": train,
    "evaluate": evaluate,
    "baseline": baseline,
    "ablate": ablate,
    "demo": demo,
}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in COMMANDS:
        tyro.extras.subcommand_cli_from_dict(COMMANDS, prog="usae", args=args)
        return 2
    try:
        cfg = tyro.cli(COMMANDS[args[0]], prog=f"usae {args[0]}", args=args[1:])
        HANDLERS[args[0]](cfg)
    except UsaeError as e:
        print(f"usae: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("usae: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
