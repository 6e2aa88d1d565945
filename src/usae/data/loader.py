"""Streaming training data: which rows each step uses (``DataOrder``) and reading them (``Loader``).

The store is cut into chunks of ``chunk_rows`` contiguous rows. Each epoch permutes the chunks and
groups them into *windows*; a window is read whole, chunk by chunk, into a shuffle buffer and its
rows are consumed in a random order. So reads are large and contiguous, shuffling is at the token
level, and memory is two windows (the one in use and the next, read ahead) whatever the store size.
Everything is a pure function of (seed, step), so a resumed run reads exactly the same batches.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from usae.data.store import Store

Window = tuple[int, int]  # (epoch, window index)


class Segment(NamedTuple):
    """The part of one batch that lies in one window."""

    window: Window
    positions: np.ndarray
    """Positions in the window's shuffled row sequence."""


class DataOrder:
    """Which rows batch ``step`` holds: a pure function of (seed, step)."""

    def __init__(self, n_rows: int, batch_size: int, seed: int, chunk_rows: int = 4096, window_rows: int = 1 << 18):
        self.n_rows, self.batch_size, self.seed = n_rows, batch_size, seed
        self.chunk_rows = max(1, min(chunk_rows, n_rows))
        self.n_chunks = -(-n_rows // self.chunk_rows)
        self.chunks_per_window = max(1, window_rows // self.chunk_rows)
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._perms: OrderedDict[Window, np.ndarray] = OrderedDict()

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(chunk permutation, cumulative row count at the end of each window) of an epoch."""
        if epoch not in self._epochs:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_chunks)
            sizes = np.minimum(self.chunk_rows, self.n_rows - perm * self.chunk_rows)
            ends = np.cumsum(sizes)[self.chunks_per_window - 1 :: self.chunks_per_window]
            if len(ends) == 0 or ends[-1] != self.n_rows:
                ends = np.append(ends, self.n_rows)
            self._epochs[epoch] = (perm, ends)
            if len(self._epochs) > 3:
                self._epochs.popitem(last=False)
        return self._epochs[epoch]

    def chunks(self, window: Window) -> np.ndarray:
        """Chunk ids of a window, in the order they are read into the buffer."""
        perm, _ = self._epoch(window[0])
        return perm[window[1] * self.chunks_per_window : (window[1] + 1) * self.chunks_per_window]

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        return chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.n_rows)

    def buffer_order(self, window: Window) -> np.ndarray:
        """The window's rows in consumption order, as positions in its buffer (chunks concatenated)."""
        if window not in self._perms:
            n = sum(b - a for a, b in map(self.chunk_range, self.chunks(window)))
            self._perms[window] = np.random.default_rng([self.seed, *window, 1]).permutation(n)
            if len(self._perms) > 4:
                self._perms.popitem(last=False)
        return self._perms[window]

    def segments(self, step: int) -> list[Segment]:
        """Batch ``step`` as positions in the shuffled sequences of one or more windows."""
        pos = np.arange(step * self.batch_size, (step + 1) * self.batch_size, dtype=np.int64)
        epoch_p, offset_p = np.divmod(pos, self.n_rows)
        out = []
        for e in np.unique(epoch_p):
            offsets = offset_p[epoch_p == e]
            _, ends = self._epoch(int(e))
            window_p = np.searchsorted(ends, offsets, side="right")
            starts = np.concatenate([[0], ends[:-1]])
            for w in np.unique(window_p):
                out.append(Segment((int(e), int(w)), offsets[window_p == w] - starts[w]))
        return out

    def next_window(self, window: Window) -> Window:
        _, ends = self._epoch(window[0])
        return (window[0], window[1] + 1) if window[1] + 1 < len(ends) else (window[0] + 1, 0)

    def rows(self, step: int) -> np.ndarray:
        """(batch_size,) global row ids of batch ``step`` (for inspection and tests)."""
        parts = []
        for seg in self.segments(step):
            row_ids = np.concatenate([np.arange(*self.chunk_range(c)) for c in self.chunks(seg.window)])
            parts.append(row_ids[self.buffer_order(seg.window)[seg.positions]])
        return np.concatenate(parts)


class _Buffer(NamedTuple):
    """One window's rows held in memory (only the chunks this rank owns)."""

    x: dict[str, np.ndarray]
    """model -> (rows owned, d) in the store's dtype."""
    local: np.ndarray
    """Window buffer position -> row in ``x``, or -1 for rows of chunks another rank owns."""


class Loader:
    """Batches of every model for consecutive steps, from shuffle buffers filled by a background thread.

    With ``world`` data-parallel ranks, rank r owns every world-th chunk of each window: it reads
    only those chunks (ranks read disjoint parts of the store) and gets the rows of the global
    batch that fall in them, so the global batch is the same whatever the world size. The share of
    a rank varies a little from step to step; ``get`` returns it with the global batch size so the
    trainer can weight the loss to the exact global mean.
    """

    def __init__(
        self, store: Store, names: list[str], order: DataOrder, device: torch.device, rank: int = 0, world: int = 1
    ) -> None:
        self.store, self.names, self.order, self.device = store, names, order, device
        self.rank, self.world = rank, world
        self.pin = device.type == "cuda"
        self._pool = ThreadPoolExecutor(max_workers=1)  # fills windows
        self._buffers: OrderedDict[Window, Future] = OrderedDict()
        # Assembles batch step+1 while step trains (9 ms a step on the critical path otherwise, on
        # the synthetic world of docs/training.md). One thread: batches are made one at a time, in
        # order, so the window cache and DataOrder are only ever touched from it.
        self._batcher = ThreadPoolExecutor(max_workers=1)
        self._next: tuple[int, Future] | None = None

    def _fill(self, window: Window) -> _Buffer:
        chunks = self.order.chunks(window)
        ranges = [self.order.chunk_range(c) for c in chunks]
        mine = [i % self.world == self.rank for i in range(len(chunks))]
        n_owned = sum(b - a for (a, b), m in zip(ranges, mine, strict=True) if m)
        x = {name: np.empty((n_owned, self.store.widths[name]), self.store.dtype) for name in self.names}
        at = 0
        for i, ((a, b), m) in enumerate(zip(ranges, mine, strict=True)):
            if not m:
                continue
            for name in self.names:
                x[name][at : at + b - a] = self.store.rows(name, a, b, dtype=None)
            at += b - a
            if i % 16 == 15:
                # the buffer holds copies; unmapping keeps RSS at the buffers, not the store
                self.store.release_pages()
        self.store.release_pages()
        owned = np.concatenate([np.full(b - a, m) for (a, b), m in zip(ranges, mine, strict=True)])
        local = np.full(owned.size, -1, dtype=np.int64)
        local[owned] = np.arange(n_owned)
        return _Buffer(x, local)

    def _buffer(self, window: Window) -> _Buffer:
        if window not in self._buffers:
            self._buffers[window] = self._pool.submit(self._fill, window)
        nxt = self.order.next_window(window)
        if nxt not in self._buffers:  # read the next window ahead while this one is used
            self._buffers[nxt] = self._pool.submit(self._fill, nxt)
        while len(self._buffers) > 3:
            old, fut = self._buffers.popitem(last=False)
            fut.cancel()
        return self._buffers[window].result()

    def get(self, step: int) -> dict[str, Tensor]:
        """This rank's rows of batch ``step``: model -> (b_rank, d) float32 on the device.

        Batch ``step + 1`` is then assembled in the background (the usual next call); any other
        step is assembled on demand, so the rows of a step never depend on the order of calls.
        """
        ahead = self._next
        use_ahead = ahead is not None and ahead[0] == step
        batch = ahead[1] if use_ahead else self._batcher.submit(self._assemble, step)
        self._next = (step + 1, self._batcher.submit(self._assemble, step + 1))
        return {n: t.to(self.device, non_blocking=True) for n, t in batch.result().items()}

    def _assemble(self, step: int) -> dict[str, Tensor]:
        """Batch ``step`` on the host: model -> (b_rank, d) contiguous float32 (pinned for CUDA)."""
        parts: dict[str, list[np.ndarray]] = {n: [] for n in self.names}
        for seg in self.order.segments(step):
            buf = self._buffer(seg.window)
            local = buf.local[self.order.buffer_order(seg.window)[seg.positions]]
            local = np.sort(local[local >= 0])  # in storage order: the gather reads forwards
            for n in self.names:
                parts[n].append(buf.x[n][local])
        batch = {n: torch.from_numpy(np.concatenate(p).astype(np.float32, copy=False)) for n, p in parts.items()}
        if self.pin:
            batch = {n: t.pin_memory() for n, t in batch.items()}
        return batch

    def close(self) -> None:
        self._batcher.shutdown(wait=True, cancel_futures=True)
        self._pool.shutdown(wait=True, cancel_futures=True)
