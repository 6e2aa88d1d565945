"""Shared fixtures: small synthetic worlds written as stores."""

from pathlib import Path

import pytest
import torch

from usae.__main__ import main
from usae.data.store import write_store
from usae.data.synth import make_world

torch.set_num_threads(1)  # CI has 2 cores; 1 thread avoids oversubscription under load


@pytest.fixture(scope="session", autouse=True)
def _float32_selection_by_default():
    """In-process runs choose latents in float32 whatever the CPU, so results do not depend on the
    test machine's bf16 support; bf16 selection has its own tests, and CLI subprocesses keep the
    real default."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("usae.training.run_dir.native_bf16", lambda device: False)
        yield


@pytest.fixture(scope="session")
def small_world():
    """Three models of different widths observing one planted concept set."""
    return make_world(
        {"a": 32, "b": 48, "c": 40},
        n_rows=6000,
        n_universal=24,
        n_partial=8,
        n_specific=9,
        k_active=4,
        seed=3,
    )


@pytest.fixture(scope="session")
def small_store(small_world, tmp_path_factory) -> Path:
    return write_store(
        tmp_path_factory.mktemp("store") / "s",
        small_world.data,
        dtype="float32",
        rows_per_shard=2048,
    )


@pytest.fixture
def cli(capsys):
    """Run ``usae ARGV`` in-process: (exit code, stderr lines)."""

    def run(argv) -> tuple[int, list[str]]:
        capsys.readouterr()
        rc = main([str(a) for a in argv])
        return rc, capsys.readouterr().err.strip().splitlines()

    return run


@pytest.fixture
def tree():
    """``tree(root)``: every file below ``root`` as {relative path: bytes}, to show nothing changed."""

    def snapshot(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    return snapshot
