"""Each run's own step time (``FitResult.step_seconds``), also when ``fit_many`` trains runs together."""

from __future__ import annotations

import time
from typing import Any

import torch


class StepTimer:
    """Seconds each run spends in its own steps: the wall clock on CPU; on CUDA, events recorded
    around each step and read in batches, so the GPU's real time is measured without the host sync
    per step that ``torch.cuda.synchronize`` would add (it would stall the queue and slow training)."""

    READ_EVERY = 512  # pending event pairs: one host sync per this many timed steps

    def __init__(self, n_runs: int, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.total = [0.0] * n_runs
        self.n_steps = [0] * n_runs
        self.pending: list[tuple[int, Any, Any]] = []

    def start(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))  # the run's device, whichever is current
        return event

    def stop(self, i: int, began: Any) -> None:
        self.n_steps[i] += 1
        if not self.cuda:
            self.total[i] += time.perf_counter() - began
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record(torch.cuda.current_stream(self.device))
        self.pending.append((i, began, end))
        if len(self.pending) >= self.READ_EVERY:
            self._read()

    def seconds(self) -> list[float]:
        self._read()
        return list(self.total)

    def _read(self) -> None:
        if self.pending:
            self.pending[-1][2].synchronize()
        for i, began, end in self.pending:
            self.total[i] += began.elapsed_time(end) / 1000  # elapsed_time is in ms
        self.pending.clear()
