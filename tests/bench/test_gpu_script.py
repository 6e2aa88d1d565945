"""bench/gpu.sh: valid bash, one line and exit 0 without CUDA, and a CPU dry run through every step
that prints the one table with a row per bench."""

import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu.sh"
BENCHES = ("pytest", "train", "scaling", "extract", "routes")


def run(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=os.environ | (env or {}),
        timeout=timeout,
    )


def test_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run for real")
def test_without_cuda_it_skips_in_one_line():
    done = run(env={"USAE_GPU_DRY_RUN": "0"}, timeout=120)
    assert done.returncode == 0
    assert done.stdout.strip().count("\n") == 0 and "no CUDA" in done.stdout


@pytest.mark.slow  # every bench of bench/gpu.sh end to end on the CPU: ~25 s
def test_dry_run_prints_one_table_with_a_row_per_bench(tmp_path):
    began = time.monotonic()
    done = run("--dry-run", env={"USAE_GPU_OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert time.monotonic() - began < 240
    table = done.stdout[done.stdout.index("## bench/gpu.sh on cpu") :].splitlines()
    assert table[1].split() == ["bench", "metric", "value", "ratio"]
    benches = [line.split()[0] for line in table[3:] if line and not line.startswith("logs:")]
    assert set(benches) == set(BENCHES) and "FAILED" not in done.stdout
    assert "gpu tests passed / failed / skipped" in done.stdout  # the GPU tests were collected, then skipped on CPU
    for name in BENCHES[1:]:
        assert (tmp_path / f"{name}.json").is_file() and (tmp_path / f"{name}.log").is_file()
