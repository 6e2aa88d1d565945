"""The code transpose's entry order: deterministic, and the stable order by latent."""

import torch

from usae.model.kernels import _by_latent


def test_entries_by_latent_are_in_the_stable_order():
    g = torch.Generator().manual_seed(0)
    for b, k, s in ((4096, 8, 512), (37, 5, 64), (3, 1, 64)):
        idx_bk = torch.randint(0, s, (b, k), generator=g)
        idx_bk[:, -1] = idx_bk[:, 0]  # repeated indices in a row keep their order too
        order, rows, starts = _by_latent(idx_bk, s)
        assert torch.equal(order, torch.argsort(idx_bk.reshape(-1), stable=True))
        assert torch.equal(rows, order // k)
        counts = torch.bincount(idx_bk.reshape(-1), minlength=s)
        assert torch.equal(starts, counts.cumsum(0) - counts)
