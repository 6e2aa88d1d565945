"""Shared fixtures: small synthetic worlds written as stores, and runs trained once per session.

A test that only *reads* a trained run takes ``small_run`` (built once, never written to: a test
that changed it fails at the end of the session); a test that writes into a run copies it first
with ``run_copy``. A test that needs a run of its own (other settings, a resume where it was made,
a kill mid-training) trains it itself and says why in its docstring.
"""

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

import usae
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
        mp.setattr("usae.training.resume.native_bf16", lambda device: False)
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


# The settings of the shared run: what tests/evaluation trained for itself, module by module.
SMALL_RUN = {"n_latents": 64, "k": 4, "steps": 150, "batch_size": 256}


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def small_run(small_store, tmp_path_factory) -> Path:
    """A run trained once per session on ``small_store`` (``SMALL_RUN``: 64 latents, k=4, 150 steps,
    batch 256) with the public API. Read only: copy it with ``run_copy`` to write into it (an
    ``evaluate`` without ``out=`` writes report.json into the run)."""
    out = tmp_path_factory.mktemp("small_run") / "run"
    usae.fit(usae.TrainConfig(store=small_store, out=out, progress=False, **SMALL_RUN))
    digest = _digest(out)
    yield out
    assert _digest(out) == digest, f"a test wrote into the shared run {out}; use run_copy"


@pytest.fixture
def run_copy(tmp_path):
    """``run_copy(run, name="run")``: a copy of ``run`` at ``tmp_path/name`` for a test to change.
    The copy has moved, so a ``--resume`` of it takes the moved-run path (config.json is rewritten)."""

    def copy(run: Path, name: str = "run") -> Path:
        return Path(shutil.copytree(run, tmp_path / name))

    return copy


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
