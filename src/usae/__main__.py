"""The ``usae`` command line: each subcommand is a config dataclass mapped to a library function."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from pathlib import Path
from typing import Any

import tyro

from usae._io import one_line
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
    LabelConfig,
    MaximizeConfig,
    SpliceConfig,
    SynthConfig,
    TrainConfig,
    VerifyConfig,
)
from usae.errors import UsaeError

log = logging.getLogger("usae")


def synth(cfg: SynthConfig) -> Path:
    """Generate a synthetic world, write it as a store and its ground truth beside it."""
    from usae.data.synth import write_world

    return write_world(cfg)


# Rows `usae train` measures R² on when it ends (a few seconds on CPU).
SUMMARY_ROWS = 8192


def train(cfg: TrainConfig) -> None:
    from usae.training.fit import fit

    result = fit(cfg)
    print(format_trained(result.sae, result.run_dir, cfg))


def format_trained(sae: Any, run_dir: Path, cfg: TrainConfig) -> str:
    """Where the run is, its self/cross R² on a sample (held-out rows when the store has a twin), what next."""
    from usae.data.store import held_out_path, open_store
    from usae.evaluation.evaluate import evaluate as evaluate_sample

    store = open_store(cfg.store)
    held_out = held_out_path(store)
    sample = open_store(held_out) if held_out is not None else store
    n = min(SUMMARY_ROWS, sample.n_rows)
    report = evaluate_sample(sae, sample, max_rows=n, progress=False, batch_size=min(4096, n))
    r2, m = report["r2_matrix"], len(report["r2_matrix"])
    self_r2 = sum(r2[i][i] for i in range(m)) / m
    cross = [r2[i][j] for i in range(m) for j in range(m) if i != j]
    where = "held-out store " + str(held_out) if held_out is not None else "the training store (in-sample)"
    cross_text = f", cross {sum(cross) / len(cross):.3f}" if cross else ""
    return (
        f"run: {run_dir}\n"
        f"R² on the first {n} rows of {where}: self {self_r2:.3f}{cross_text}\n"
        f"next: usae evaluate {run_dir} {held_out or cfg.store}"
    )


def evaluate(cfg: EvalConfig) -> None:
    from usae.evaluation.evaluate import evaluate_cli

    reports = evaluate_cli(cfg)
    for report in reports:
        if len(reports) > 1:
            print(f"\n== store {report['store']['path']}")
        print(format_summary(report))
    if cfg.report:
        print(f"\nreport: {(cfg.out or cfg.run) / 'report.md'}")


def baseline(cfg: BaselineConfig) -> None:
    from usae.experiments.baseline import baseline_cli

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
    lines.append(
        "concepts: "
        + ", ".join(f"{c} {counts[c]}" for c in ("universal", "partial", "specific", "rare", "dead") if c in counts)
    )
    return "\n".join(lines)


def extract(cfg: ExtractConfig) -> None:
    from usae.extraction.extract import extract as run_extract

    path = run_extract(cfg)
    print(f"store: {path}")


def demo(cfg: DemoConfig) -> dict:
    from usae.demo import run_demo, run_synthetic_demo
    from usae.evaluation.splice import format_splice

    summary = run_synthetic_demo(cfg) if cfg.synthetic else run_demo(cfg)
    report = summary["report_data"]
    if summary.get("evaluated_on"):
        print(f"measured on held-out images: {summary['evaluated_on']} ({report['n_rows']} rows)")
    print(format_summary(report))
    if summary.get("r2_in_sample"):
        print("\n" + format_r2_gap(report, summary["r2_in_sample"]))
    if summary.get("splice_data"):
        print("\n" + format_splice(summary["splice_data"]))
    if summary.get("labels_data"):
        print("\n" + format_named(summary["labels_data"], report))
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


def format_r2_gap(report: dict, r2_in_sample: list[list[float]]) -> str:
    """Mean self and cross R², held-out vs in-sample (the images the dictionary was trained on)."""

    def means(r2: list[list[float]]) -> tuple[float, float]:
        m = len(r2)
        self_r2 = sum(r2[i][i] for i in range(m)) / m
        cross_r2 = sum(r2[i][j] for i in range(m) for j in range(m) if i != j) / max(1, m * (m - 1))
        return self_r2, cross_r2

    (hs, hc), (ts, tc) = means(report["r2_matrix"]), means(r2_in_sample)
    return (
        f"R² held-out vs in-sample: self {hs:.3f} vs {ts:.3f} (gap {ts - hs:+.3f}), "
        f"cross {hc:.3f} vs {tc:.3f} (gap {tc - hc:+.3f})"
    )


def format_named(labels: dict, report: dict, n_show: int = 8) -> str:
    """Per label family: the top universal concepts (by normalised energy) named alike in every model."""
    from usae.evaluation.classes import energy_share
    from usae.evaluation.labeling import artifact_marks, border_share_by_chance

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


def label(cfg: LabelConfig) -> None:
    from usae.evaluation.labeling import format_labels, label

    print(format_labels(label(cfg)))
    print(f"\nlabels: {(cfg.out or cfg.run) / 'labels.json'}")


def splice(cfg: SpliceConfig) -> None:
    from usae.evaluation.splice import format_splice, splice_cli

    result, path = splice_cli(cfg)
    print(format_splice(result))
    print(f"splice: {path}")


def explore(cfg: ExploreConfig) -> None:
    from usae.explorer.site import explore_cli

    print(f"concept explorer: {explore_cli(cfg)}")


def maximize(cfg: MaximizeConfig) -> None:
    from usae.explorer.maximize import maximize_cli

    for out in maximize_cli(cfg):
        print(f"maximisation: {out / 'panel.png'}")


def ablate(cfg: AblateConfig) -> None:
    from usae.experiments.ablate import ablate as run_ablate
    from usae.experiments.ablate import format_table

    print(format_table(run_ablate(cfg)))


def encode(cfg: EncodeConfig) -> None:
    from usae.data.codes import encode_store

    print(f"codes: {encode_store(cfg)}")


def import_official(cfg: ImportOfficialConfig) -> None:
    from usae.interop.official import import_official as run_import

    sae = run_import(cfg.config_yaml, cfg.checkpoint_dir, cfg.out, overwrite=cfg.overwrite)
    print(f"run: {cfg.out}  models: {', '.join(sae.model_names)}  concepts: {sae.n_latents}  k: {sae.k}")


def export(cfg: ExportConfig) -> None:
    from usae.interop.hub import export_run

    out = export_run(
        cfg.run, cfg.out, dtype=cfg.dtype, push_to_hub=cfg.push_to_hub, private=cfg.private, overwrite=cfg.overwrite
    )
    print(f"pretrained: {out}" + (f"  hub: {cfg.push_to_hub}" if cfg.push_to_hub else ""))


def verify(cfg: VerifyConfig) -> None:
    from usae.verify import verify as run_verify

    print(run_verify(cfg.path))


# command -> (config dataclass: the flags, --help and saved config; handler)
COMMANDS: dict[str, tuple[type, Any]] = {
    "synth": (SynthConfig, synth),
    "train": (TrainConfig, train),
    "evaluate": (EvalConfig, evaluate),
    "baseline": (BaselineConfig, baseline),
    "ablate": (AblateConfig, ablate),
    "extract": (ExtractConfig, extract),
    "demo": (DemoConfig, demo),
    "label": (LabelConfig, label),
    "splice": (SpliceConfig, splice),
    "explore": (ExploreConfig, explore),
    "maximize": (MaximizeConfig, maximize),
    "encode": (EncodeConfig, encode),
    "import-official": (ImportOfficialConfig, import_official),
    "export": (ExportConfig, export),
    "verify": (VerifyConfig, verify),
}


class ParseError(Exception):
    """The command line did not parse (unknown flag, bad value, missing argument)."""


def parse(config_cls: type, command: str, args: list[str]) -> Any:
    """``tyro.cli`` for one command, its errors squeezed from a multi-line box to one line.

    --help still prints tyro's full text (to stdout, exit 0).
    """
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return tyro.cli(config_cls, prog=f"usae {command}", args=args)
    except SystemExit as e:
        if not e.code:
            raise
        raise ParseError(f"{_box_text(captured.getvalue())}; see usae {command} --help") from None


def _box_text(text: str) -> str:
    """A tyro error box as one line: its title and the text up to its first rule."""
    title, body = "", []
    for raw in text.splitlines():
        line = raw.strip().strip("│").strip()
        if raw.strip().startswith("╭"):
            title = line.strip("╭╮─ ")
        elif line and set(line) <= {"─"}:  # the rule before the help hint
            break
        elif line and not line.startswith("╰"):
            body.append(line)
    if body and body[0].endswith(":"):  # "Missing from usae train:" / the argument / its help text
        body = body[:2]
    text = " ".join(body)
    if title and not text.startswith(title):
        text = f"{title}: {text}" if text else title
    return one_line(text or "invalid arguments")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in COMMANDS:
        if not args or not args[0].startswith("-"):
            given = f"unknown command {args[0]!r}" if args else "no command given"
            print(f"usae: error: {given} (one of {', '.join(COMMANDS)}); see usae --help", file=sys.stderr)
            return 2
        tyro.extras.subcommand_cli_from_dict({c: cls for c, (cls, _) in COMMANDS.items()}, prog="usae", args=args)
        return 2
    try:
        config_cls, handler = COMMANDS[args[0]]
        handler(parse(config_cls, args[0], args[1:]))
    except UsaeError as e:
        print(f"usae: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions, ... anywhere: one line naming the file, not a traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"usae: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except ParseError as e:
        print(f"usae: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("usae: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
