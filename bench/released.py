"""`usae.fit` vs the paper's RELEASED training loop, run as released, on the synthetic world; one run.

The released loop (github.com/YorkUCVIL/UniversalSAE, as docs/research notes describe it, "run as
released"): one Overcomplete TopK SAE per model (encoder Linear -> BatchNorm -> ReLU, TopK; a
dictionary of unscaled Gaussian rows, l2-normalised in every forward; no decoder bias), one Adam per
model at 3e-4, scalar mean/std per model; each step samples one model, encodes it, decodes into every
model (L1 loss), adds an "aux" loss over half of the unselected latents for every decoder, steps only
the sampled model's optimiser, and reads the loss with `.item()`; rows come from a per-token Python
Dataset through a shuffling DataLoader.

    .venv/bin/python bench/released.py                       # 490 x 4096 on the world (2M token-steps)
    .venv/bin/python bench/released.py --released-steps 100  # the released loop's tokens/s on fewer steps

Prints tokens/s of both, their ratio, and `usae.fit`'s wall time against the sum of its steps
(FitResult.step_seconds). The two loops alternate `--repeats` times (the shared machine's load hits
both alike). Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import usae
from usae.data.store import Store, open_store, write_store


class TokenDataset(Dataset):
    """One token (a row of every model) per item, as the release reads its activations."""

    def __init__(self, store: Store) -> None:
        self.x = {n: torch.from_numpy(store.rows(n, 0, store.n_rows, dtype=np.float32)) for n in store.model_names}
        self.n = store.n_rows

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {n: x[i] for n, x in self.x.items()}


class ReleasedSAE(torch.nn.Module):
    """Overcomplete's TopKSAE with the 'mlp_bn_1' encoder and an l2-normalised dictionary."""

    def __init__(self, d: int, n_latents: int, k: int) -> None:
        super().__init__()
        self.enc = torch.nn.Linear(d, n_latents)
        self.bn = torch.nn.BatchNorm1d(n_latents)
        self.dictionary = torch.nn.Parameter(torch.randn(n_latents, d))  # unscaled: row norm ~ sqrt(d)
        self.k = k

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_pre = F.relu(self.bn(self.enc(x)))
        top = torch.topk(z_pre, self.k, dim=1)
        z = torch.zeros_like(z_pre).scatter(1, top.indices, top.values)
        return z_pre, z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ F.normalize(self.dictionary, dim=1)


def released_loop(store_dir: Path, n_latents: int, k: int, steps: int, batch_size: int, seed: int) -> float:
    """Seconds for ``steps`` released steps (set-up included); every step ends with ``.item()``."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    store = open_store(store_dir)
    names = store.model_names
    mean = {n: float(store.stats(n).scalar_mean) for n in names}
    std = {n: float(store.stats(n).std) for n in names}
    saes = {n: ReleasedSAE(store.widths[n], n_latents, k) for n in names}
    opts = {n: torch.optim.Adam(saes[n].parameters(), lr=3e-4) for n in names}
    loader = DataLoader(TokenDataset(store), batch_size=batch_size, shuffle=True, drop_last=True)
    rng = np.random.default_rng(seed)
    done = 0
    while done < steps:
        for batch in loader:
            x = {n: (batch[n] - mean[n]) / std[n] for n in names}
            src = names[rng.integers(len(names))]
            z_pre, z = saes[src].encode(x[src])
            # aux: half of the latents TopK did not select, decoded by every model, every step
            rest = z_pre.masked_fill(z > 0, 0)
            aux_top = torch.topk(rest, (n_latents - k) // 2, dim=1)
            z_aux = torch.zeros_like(rest).scatter(1, aux_top.indices, aux_top.values)
            loss = torch.zeros(())
            for n in names:
                x_hat = saes[n].decode(z)
                loss = loss + F.l1_loss(x_hat, x[n])
                loss = loss + F.mse_loss(saes[n].decode(z_aux), (x[n] - x_hat).detach())
            for opt in opts.values():
                opt.zero_grad()
            loss.backward()
            opts[src].step()  # only the sampled model's optimiser steps
            loss.item()
            done += 1
            if done == steps:
                break
    return time.perf_counter() - t0


def fit_loop(store_dir: Path, out: Path, n_latents: int, k: int, steps: int, batch_size: int, seed: int):
    t0 = time.perf_counter()
    cfg = usae.TrainConfig(
        store=store_dir, out=out, n_latents=n_latents, k=k, steps=steps, batch_size=batch_size, seed=seed,
        progress=False, overwrite=True, log_every=50,
    )  # fmt: skip
    result = usae.fit(cfg)
    return time.perf_counter() - t0, result.step_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=490, help="usae.fit steps")
    ap.add_argument("--released-steps", type=int, default=490, help="released-loop steps (its tokens/s is steady)")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--n-latents", type=int, default=512)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        world = usae.make_world(n_rows=args.rows, seed=0)  # widths 64/96/128
        store = write_store(tmp / "world", world.data, dtype="float16")
        print(
            f"world: widths 64/96/128, {args.rows} rows; n_latents {args.n_latents}, k {args.k}, b {args.batch_size}; "
            f"fit {args.steps} steps, released {args.released_steps}; threads {torch.get_num_threads()}"
        )
        rel, fits = [], []
        for r in range(args.repeats):  # alternated: both see the same machine load
            rel.append(released_loop(store, args.n_latents, args.k, args.released_steps, args.batch_size, r))
            fits.append(fit_loop(store, tmp / "run", args.n_latents, args.k, args.steps, args.batch_size, r))
    rel_tps = args.released_steps * args.batch_size / min(rel)
    wall, step_sec = min(fits)
    fit_tps = args.steps * args.batch_size / wall
    print(f"{'loop':26s} {'best s':>8s} {'tokens/s':>10s} {'ratio':>7s}")
    print(f"{'released loop':26s} {min(rel):8.1f} {rel_tps:10,.0f} {1:6.2f}x")
    print(f"{'usae.fit (wall)':26s} {wall:8.1f} {fit_tps:10,.0f} {fit_tps / rel_tps:6.2f}x")
    print(f"usae.fit wall / sum of its steps: {wall:.1f} s / {step_sec:.1f} s = {wall / step_sec:.3f}")


if __name__ == "__main__":
    main()
