import numpy as np
import pytest
import torch

from usae.data.loader import DataOrder, Loader
from usae.data.store import open_store, write_store


@pytest.mark.parametrize(("n", "batch", "chunk", "window"), [(100, 30, 7, 20), (1000, 64, 16, 100), (10, 25, 3, 4)])
def test_every_row_once_per_epoch_and_pure_in_step(n, batch, chunk, window):
    order = DataOrder(n, batch, seed=1, chunk_rows=chunk, window_rows=window)
    rows = np.concatenate([order.rows(s) for s in range((3 * n) // batch + 1)])
    for e in range(3):
        assert sorted(rows[e * n : (e + 1) * n].tolist()) == list(range(n))
    fresh = DataOrder(n, batch, seed=1, chunk_rows=chunk, window_rows=window)
    assert (fresh.rows(5) == order.rows(5)).all()
    assert not (DataOrder(n, batch, seed=2, chunk_rows=chunk, window_rows=window).rows(0) == order.rows(0)).all()


def test_batches_are_shuffled_at_token_level():
    order = DataOrder(100_000, 1000, seed=0, chunk_rows=1000, window_rows=20_000)
    rows = order.rows(0)
    assert len(np.unique(rows // 1000)) >= 15  # drawn from many chunks of the window, not one
    assert len(np.unique(rows // 20_000)) <= 20


@pytest.fixture(scope="module")
def id_store(tmp_path_factory):
    """Row r holds the value r in every column, so batch contents reveal row ids."""
    ids = np.arange(5000, dtype=np.float32)[:, None]
    arrays = {"a": np.repeat(ids, 3, 1), "b": np.repeat(ids, 5, 1)}
    return open_store(write_store(tmp_path_factory.mktemp("ids") / "s", arrays, dtype="float32", rows_per_shard=700))


def test_loader_returns_the_rows_of_the_order(id_store):
    order = DataOrder(id_store.n_rows, 256, seed=3, chunk_rows=300, window_rows=1200)
    loader = Loader(id_store, ["a", "b"], order, torch.device("cpu"))
    try:
        for step in (0, 1, 7, 19, 20, 45):  # crosses windows and epochs
            batch = loader.get(step)
            got = batch["a"][:, 0].long().sort().values
            assert got.tolist() == sorted(order.rows(step).tolist())
            assert torch.equal(batch["a"][:, 0], batch["b"][:, 4])  # paired rows
    finally:
        loader.close()


def test_ranks_read_disjoint_chunks_and_cover_the_global_batch(id_store):
    order = DataOrder(id_store.n_rows, 256, seed=3, chunk_rows=300, window_rows=1200)
    loaders = [Loader(id_store, ["a"], order, torch.device("cpu"), rank=r, world=2) for r in range(2)]
    try:
        for step in (0, 3, 21):
            parts = [ld.get(step)["a"][:, 0].long().tolist() for ld in loaders]
            assert not set(parts[0]) & set(parts[1])
            assert sorted(parts[0] + parts[1]) == sorted(order.rows(step).tolist())
            chunks = [{r // 300 for r in p} for p in parts]
            assert not chunks[0] & chunks[1]
    finally:
        for ld in loaders:
            ld.close()
