"""FitResult.step_seconds: each run's own step time, also when fit_many trains runs in lockstep."""

import pytest
import torch

from usae.config import TrainConfig
from usae.training.fit import fit, fit_many
from usae.training.timing import StepTimer


def cfg_for(store, out, **kw) -> TrainConfig:
    base = dict(store=store, out=out, n_latents=64, k=4, steps=20, batch_size=1024, progress=False, log_every=10)
    return TrainConfig(**(base | kw))


def test_fit_many_times_each_run_on_its_own_steps(small_store, tmp_path):
    """A 4096-latent run costs far more per step than a 64-latent one trained beside it (~50x the
    encoder flops); the group average, the same for both, would hide that."""
    small, big = fit_many(
        [cfg_for(small_store, tmp_path / "small"), cfg_for(small_store, tmp_path / "big", n_latents=4096)]
    )
    assert small.steps_timed == big.steps_timed == 20
    assert small.step_seconds > 0 and big.step_seconds > 2 * small.step_seconds


def test_cuda_timer_reads_events_in_batches(monkeypatch):
    """The CUDA path's bookkeeping, with a stand-in event whose clock is set by hand: per-run sums in
    seconds (events report ms), one host sync per READ_EVERY steps and one at the end."""
    clock = {"ms": 0.0}
    syncs = []

    class FakeEvent:
        def __init__(self, enable_timing: bool) -> None:
            assert enable_timing

        def record(self, stream=None) -> None:
            self.ms = clock["ms"]

        def synchronize(self) -> None:
            syncs.append(clock["ms"])

        def elapsed_time(self, end: "FakeEvent") -> float:
            return end.ms - self.ms

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: None)
    monkeypatch.setattr(StepTimer, "READ_EVERY", 4)
    timer = StepTimer(2, torch.device("cuda"))
    for _ in range(5):  # run 0 takes 1 ms a step, run 1 takes 3 ms
        for i, cost in enumerate((1.0, 3.0)):
            began = timer.start()
            clock["ms"] += cost
            timer.stop(i, began)
    assert timer.seconds() == pytest.approx([0.005, 0.015])
    assert timer.n_steps == [5, 5] and len(syncs) == 3  # after 4 and 8 pending steps, and at the end


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_time_is_measured_and_training_matches_cpu(small_store, tmp_path):
    """On CUDA, step_seconds come from events (no per-step sync) and still rank the runs; the CUDA
    run trains like the CPU reference (float32 selection; summation order differs, so losses are
    compared within 5%)."""
    kw = dict(select_precision="float32")
    small, big = fit_many(
        [
            cfg_for(small_store, tmp_path / "small", device="cuda", **kw),
            # 2**17 latents: enough GPU work per step to outweigh the kernel launches both runs share
            cfg_for(small_store, tmp_path / "big", device="cuda", n_latents=2**17, **kw),
        ]
    )
    assert small.steps_timed == big.steps_timed == 20
    assert 0 < small.step_seconds < big.step_seconds
    cpu = fit(cfg_for(small_store, tmp_path / "cpu", device="cpu", **kw))
    assert small.last_metrics["train/loss"] == pytest.approx(cpu.last_metrics["train/loss"], rel=0.05)
