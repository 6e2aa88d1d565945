"""The ``usae`` command line: the command table, each command a config dataclass and one function.

Each command's function takes its config and returns the text it prints; it lives beside what it
runs (``module:function``), imported only when its command runs, so ``usae --help`` starts without torch.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import sys
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
    FrontierConfig,
    ImportOfficialConfig,
    LabelConfig,
    MaximizeConfig,
    SpliceConfig,
    SynthConfig,
    TrainConfig,
    VerifyConfig,
)
from usae.device import check_devices
from usae.errors import UsaeError

log = logging.getLogger("usae")

# command -> (config dataclass: the flags, --help and saved config; "module:function" taking it)
COMMANDS: dict[str, tuple[type, str]] = {
    "synth": (SynthConfig, "usae.data.synth:synth_command"),
    "train": (TrainConfig, "usae.pipeline:train_command"),
    "evaluate": (EvalConfig, "usae.evaluation.evaluate:evaluate_command"),
    "baseline": (BaselineConfig, "usae.experiments.baseline:baseline_command"),
    "ablate": (AblateConfig, "usae.experiments.ablate:ablate_command"),
    "frontier": (FrontierConfig, "usae.experiments.frontier:frontier_command"),
    "extract": (ExtractConfig, "usae.extraction.extract:extract_command"),
    "demo": (DemoConfig, "usae.demo:demo_command"),
    "label": (LabelConfig, "usae.evaluation.naming.label:label_command"),
    "splice": (SpliceConfig, "usae.evaluation.fidelity.splice:splice_command"),
    "explore": (ExploreConfig, "usae.explorer.site:explore_command"),
    "maximize": (MaximizeConfig, "usae.explorer.maximize:maximize_command"),
    "encode": (EncodeConfig, "usae.evaluation.encode:encode_command"),
    "import-official": (ImportOfficialConfig, "usae.interop.official:import_official_command"),
    "export": (ExportConfig, "usae.interop.hub:export_command"),
    "verify": (VerifyConfig, "usae.verify:verify_command"),
}


def command_function(command: str) -> Any:
    """The function behind ``command`` (imported now)."""
    module, name = COMMANDS[command][1].split(":")
    return getattr(importlib.import_module(module), name)


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
        cfg = parse(COMMANDS[args[0]][0], args[0], args[1:])
        check_devices(cfg)
        print(command_function(args[0])(cfg))
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
