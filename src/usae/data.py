"""Streaming training data: which rows each step reads (``DataOrder``) and reading them (``Loader``)."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from usae.store import Store


class DataOrder:
    """Rows of batch ``step``: a pure function of (seed, step), shuffled at the token level.

    Each epoch permutes the store's chunks of ``chunk_rows`` contiguous rows (seeded by seed, epoch),
    groups them into windows of about ``window_rows`` rows and shuffles the rows inside each window
    (seeded by seed, epoch, window). A batch is the next slice of that sequence, so it reads from one
    or two windows of the file instead of the whole store. A store smaller than a window gets a
    uniform permutation per epoch.
    """

    def __init__(
        self, n_rows: int, batch_size: int, seed: int, chunk_rows: int = 4096, window_rows: int = 1 << 20
    ) -> None:
        self.n_rows, self.batch_size, self.seed = n_rows, batch_size, seed
        self.chunk_rows = max(1, min(chunk_rows, n_rows))
        self.n_chunks = -(-n_rows // self.chunk_rows)
        self.chunks_per_window = max(1, window_rows // self.chunk_rows)
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._windows: dict[tuple[int, int], np.ndarray] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(chunk permutation, cumulative row count at the end of each window)."""
        if epoch not in self._epochs:
            if len(self._epochs) > 2:
                self._epochs.pop(min(self._epochs))
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_chunks)
            sizes = np.minimum(self.chunk_rows, self.n_rows - perm * self.chunk_rows)
            window_ends = np.cumsum(sizes)[self.chunks_per_window - 1 :: self.chunks_per_window]
            if len(window_ends) == 0 or window_ends[-1] != self.n_rows:
                window_ends = np.append(window_ends, self.n_rows)
            self._epochs[epoch] = (perm, window_ends)
        return self._epochs[epoch]

    def _window(self, epoch: int, window: int) -> np.ndarray:
        """The shuffled row ids of one window."""
        key = (epoch, window)
        if key not in self._windows:
            if len(self._windows) > 3:
                self._windows.pop(min(self._windows))
            perm, _ = self._epoch(epoch)
            chunks = perm[window * self.chunks_per_window : (window + 1) * self.chunks_per_window]
            rows = np.concatenate(
                [np.arange(c * self.chunk_rows, min((c + 1) * self.chunk_rows, self.n_rows)) for c in chunks]
            )
            self._windows[key] = np.random.default_rng([self.seed, epoch, window, 1]).permutation(rows)
        return self._windows[key]

    def rows(self, step: int) -> np.ndarray:
        """(batch_size,) int64 row ids of batch ``step``."""
        pos = np.arange(step * self.batch_size, (step + 1) * self.batch_size, dtype=np.int64)
        epoch_p, offset_p = np.divmod(pos, self.n_rows)
        out = np.empty_like(pos)
        for e in np.unique(epoch_p):
            in_epoch = epoch_p == e
            _, window_ends = self._epoch(int(e))
            window_p = np.searchsorted(window_ends, offset_p[in_epoch], side="right")
            starts = np.concatenate([[0], window_ends[:-1]])
            for w in np.unique(window_p):
                sel = window_p == w
                idx = np.flatnonzero(in_epoch)[sel]
                out[idx] = self._window(int(e), int(w))[offset_p[idx] - starts[w]]
        return out


class Loader:
    """Batches of every model for consecutive steps, read ahead by a background thread.

    With ``world`` data-parallel ranks, rank r reads rows r, r + world, ... of the global batch,
    so ranks read disjoint rows and the global batch does not depend on the world size. The store's
    memory maps are dropped every ``RELEASE_EVERY`` reads so RSS stays flat however large it is.
    """

    RELEASE_EVERY = 32

    def __init__(
        self, store: Store, names: list[str], order: DataOrder, device: torch.device, rank: int = 0, world: int = 1
    ) -> None:
        self.store, self.names, self.order, self.device = store, names, order, device
        self.rank, self.world = rank, world
        self.pin = device.type == "cuda"
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._queue: deque[tuple[int, Future]] = deque()
        self._n_reads = 0

    def _read(self, step: int) -> dict[str, Tensor]:
        rows = self.order.rows(step)[self.rank :: self.world]
        batch = {name: torch.from_numpy(self.store.take(name, rows)) for name in self.names}
        self._n_reads += 1
        if self._n_reads % self.RELEASE_EVERY == 0:
            self.store.release_pages()
        return {k: v.pin_memory() for k, v in batch.items()} if self.pin else batch

    def get(self, step: int, prefetch: int = 2) -> dict[str, Tensor]:
        while self._queue and self._queue[0][0] != step:
            self._queue.popleft()[1].cancel()
        batch = self._queue.popleft()[1].result() if self._queue else self._read(step)
        nxt = self._queue[-1][0] + 1 if self._queue else step + 1
        while len(self._queue) < prefetch:
            self._queue.append((nxt, self._pool.submit(self._read, nxt)))
            nxt += 1
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
