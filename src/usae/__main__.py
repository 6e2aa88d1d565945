"""The ``usae`` command line: each subcommand is a config dataclass mapped to a library function."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import tyro

from usae.config import (
    AblateConfig,
    BaselineConfig,
    DemoConfig,
    EncodeConfig,
    EvalConfig,
    ExploreConfig,
    ExportConfig,
    ExtractConfig,
    ImportOfficialConfig,
    MaximizeConfig,
    SynthConfig,
    TrainConfig,
    VerifyConfig,
)
from usae.errors import UsaeError

log = logging.getLogger("usae")


def synth(cfg: SynthConfig) -> Path:
    """Generate a synthetic world, write it as a store and its ground truth beside it."""
    from usae.synth import write_world

    return write_world(cfg)


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


def extract(cfg: ExtractConfig) -> None:
    from usae.extract import extract as run_extract

    path = run_extract(cfg)
    print(f"store: {path}")


def demo(cfg: DemoConfig) -> dict:
    from usae.demo import run_demo, run_synthetic_demo

    summary = run_synthetic_demo(cfg) if cfg.synthetic else run_demo(cfg)
    print(format_summary(summary["report_data"]))
    if "recovery" in summary:
        print("\nplanted concepts recovered (cosine > 0.9 in every owning model):")
        for kind, frac in summary["recovery"].items():
            print(f"  {kind:10s} {100 * frac:5.1f}%")
    if summary.get("timings"):
        print("\ntimes: " + ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in summary["timings"].items()))
    print(f"\nrun: {summary['run']}\nreport: {summary['report']}")
    if summary.get("explorer"):
        print(f"concept explorer: {summary['explorer']}")
    return summary


def explore(cfg: ExploreConfig) -> None:
    from usae.explore import explore_cli

    print(f"concept explorer: {explore_cli(cfg)}")


def maximize(cfg: MaximizeConfig) -> None:
    from usae.maximize import maximize_cli

    for out in maximize_cli(cfg):
        print(f"maximisation: {out / 'panel.png'}")


def ablate(cfg: AblateConfig) -> None:
    from usae.ablate import ablate as run_ablate
    from usae.ablate import format_table

    print(format_table(run_ablate(cfg)))


def encode(cfg: EncodeConfig) -> None:
    from usae.codes import encode_store

    print(f"codes: {encode_store(cfg)}")


def import_official(cfg: ImportOfficialConfig) -> None:
    from usae.official import import_official as run_import

    sae = run_import(cfg.config_yaml, cfg.checkpoint_dir, cfg.out, overwrite=cfg.overwrite)
    print(f"run: {cfg.out}  models: {', '.join(sae.model_names)}  concepts: {sae.n_latents}  k: {sae.k}")


def export(cfg: ExportConfig) -> None:
    from usae.hub import export_run

    out = export_run(cfg.run, cfg.out, dtype=cfg.dtype, push_to_hub=cfg.push_to_hub, private=cfg.private)
    print(f"pretrained: {out}" + (f"  hub: {cfg.push_to_hub}" if cfg.push_to_hub else ""))


def verify(cfg: VerifyConfig) -> None:
    from usae.checkpoint import verify as run_verify

    print(run_verify(cfg.path))


COMMANDS = {
    "synth": SynthConfig,
    "train": TrainConfig,
    "evaluate": EvalConfig,
    "baseline": BaselineConfig,
    "ablate": AblateConfig,
    "extract": ExtractConfig,
    "demo": DemoConfig,
    "explore": ExploreConfig,
    "maximize": MaximizeConfig,
    "encode": EncodeConfig,
    "import-official": ImportOfficialConfig,
    "export": ExportConfig,
    "verify": VerifyConfig,
}
HANDLERS = {
    "synth": synth,
    "train": train,
    "evaluate": evaluate,
    "baseline": baseline,
    "ablate": ablate,
    "extract": extract,
    "demo": demo,
    "explore": explore,
    "maximize": maximize,
    "encode": encode,
    "import-official": import_official,
    "export": export,
    "verify": verify,
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
    except OSError as e:  # disk full, permissions, ... anywhere: one line naming the file, not a traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"usae: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("usae: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
