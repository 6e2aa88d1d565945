import json
import subprocess
import sys

import pytest

from usae.__main__ import main
from usae.data.store import open_store


def test_synth_train_evaluate(tmp_path, capsys):
    """synth → train → evaluate → resume through the CLI. Trains its own run: `usae train` is what it tests."""
    store, run = tmp_path / "store", tmp_path / "run"
    assert main(["synth", str(store), "--widths", "16", "24", "--n-rows", "3000", "--n-partial", "0"]) == 0
    assert open_store(store).widths == {"a": 16, "b": 24}
    assert (tmp_path / "store.truth.safetensors").is_file()
    args = [
        "train",
        str(store),
        "--out",
        str(run),
        "--n-latents",
        "64",
        "--k",
        "4",
        "--steps",
        "40",
    ]
    args += [
        "--batch-size",
        "256",
        "--seed",
        "0",
        "--rule",
        "random-source",
        "--save-every",
        "20",
        "--no-progress",
    ]
    assert main(args) == 0
    assert json.loads((run / "config.json").read_text())["train"]["save_every"] == 20
    assert (
        main(
            [
                "evaluate",
                str(run),
                str(store),
                "--out",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["r2_matrix"]) == 2
    assert "cross-reconstruction R²" in capsys.readouterr().out
    # resume of a finished run is a no-op that keeps the weights
    before = (run / "model.safetensors").read_bytes()
    assert main([*args, "--resume"]) == 0
    assert (run / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "{tmp}/nostore", "--out", "{tmp}/r"], "no store at"),
        (["train", "{tmp}/nostore", "--n-latents", "4", "--k", "8"], "k must be in"),
        (["evaluate", "{tmp}/norun", "{tmp}/nostore"], "no run directory"),
    ],
)
def test_errors_are_one_line(tmp_path, capsys, argv, message):
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("usae: error:") and message in err[0]


def test_evaluate_out_json_names_the_report_file(small_run, small_store, tmp_path):
    out = tmp_path / "reports" / "report.json"
    assert main(["evaluate", str(small_run), str(small_store), "--out", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    for key in ("r2_matrix", "fvu", "l0", "dead_fraction", "firing_entropy", "cofiring", "energy"):
        assert key in report
    assert (tmp_path / "reports" / "report.md").is_file()


def test_help_documents_flags():
    out = subprocess.run([sys.executable, "-m", "usae", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for flag in (
        "--n-latents",
        "--k",
        "--steps",
        "--batch-size",
        "--rule",
        "--lr",
        "--encoder",
        "--activation",
    ):
        assert flag in out.stdout
    assert "Active concepts per token" in out.stdout


def test_baseline_then_evaluate_two_stores(tmp_path, capsys):
    """Trains its own run: `usae baseline` writes into it, and needs the truth file `usae synth` writes beside
    the store it was trained on (the shared small_store has none)."""
    store, shifted, run = tmp_path / "store", tmp_path / "shifted", tmp_path / "run"
    for path, seed in ((store, "0"), (shifted, "1")):
        assert (
            main(["synth", str(path), "--widths", "16", "24", "--n-rows", "3000", "--n-partial", "0", "--seed", seed])
            == 0
        )
    train = ["train", str(store), "--out", str(run), "--n-latents", "32", "--k", "4", "--steps", "40"]
    assert main([*train, "--batch-size", "256", "--no-progress"]) == 0
    truth = tmp_path / "store.truth.safetensors"
    assert (
        main(["baseline", str(run), str(store), "--similarity-rows", "300", "--truth", str(truth), "--no-progress"])
        == 0
    )
    assert (run / "baselines" / "a" / "model.safetensors").is_file()
    assert "dictionary agreement" in capsys.readouterr().out
    assert main(["evaluate", str(run), str(store), str(shifted), "--out", str(tmp_path / "rep"), "--no-progress"]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| | store | shifted |" in md and "## Baselines" in md
    assert (tmp_path / "rep" / "report-store.json").is_file() and (tmp_path / "rep" / "matching.png").is_file()
