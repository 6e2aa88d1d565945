"""Step cost against its floor, and cost per token as the number of models M grows.

1. Floor: a random-source step cannot be cheaper than the dense encoder matmul
   (b x d) @ (d x n_latents) that picks the top k. Prints step time / that matmul's time,
   averaged over the models (each step encodes one).
2. M scaling: time per token of `train_step` for M = 2, 4, 8, 16 models of the same width.

    .venv/bin/python bench/scaling.py [--quick]

Both measured in this one run on in-memory batches (no I/O), same thread count. Not a test.
"""

from __future__ import annotations

import argparse
import time

import torch

from usae.config import SAEConfig, TrainConfig
from usae.sae import UniversalSAE
from usae.train import make_optimizer, train_step


def _timeit(fn, repeats: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def step_seconds(widths: dict[str, int], n_latents: int, k: int, batch: int, repeats: int) -> tuple[float, float]:
    """(mean train_step seconds over sources, mean encoder-matmul seconds over models)."""
    torch.manual_seed(0)
    sae = UniversalSAE(SAEConfig(widths=widths, n_latents=n_latents, k=k))
    cfg = TrainConfig(store="unused", n_latents=n_latents, k=k, batch_size=batch)
    opt = make_optimizer(sae, cfg)
    for group in opt.param_groups:
        group["lr"] = 1e-3
    x_n = {n: torch.randn(batch, d) for n, d in widths.items()}
    since = torch.zeros(len(widths), n_latents, dtype=torch.int64)
    names = list(widths)
    i = iter(range(10**9))
    step = _timeit(lambda: train_step(sae, opt, x_n, [names[next(i) % len(names)]], cfg, since, 0), repeats)
    with torch.no_grad():
        mm = sum(
            _timeit(lambda h=sae.heads[n], x=x_n[n]: torch.addmm(h.b_enc, x, h.W_enc.t()), repeats) for n in names
        ) / len(names)
    return step, mm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    q = args.quick
    repeats = 3 if q else 6
    print(f"threads={torch.get_num_threads()}")
    widths = {"a": 384, "b": 512, "c": 768} if not q else {"a": 64, "b": 96, "c": 128}
    n_latents, batch = (8 * max(widths.values()), 4096) if not q else (1024, 1024)
    step, mm = step_seconds(widths, n_latents, 32, batch, repeats)
    print(
        f"\n## Step vs encoder-matmul floor (M=3, widths {list(widths.values())}, n_latents {n_latents}, k 32, b {batch})"
    )
    print("| step ms | encoder matmul ms | step / floor |\n|---:|---:|---:|")
    print(f"| {step * 1e3:.1f} | {mm * 1e3:.1f} | {step / mm:.2f} |")
    d, n_latents, batch = (256, 2048, 2048) if not q else (64, 512, 512)
    print(f"\n## Time per token vs number of models (d {d}, n_latents {n_latents}, k 32, b {batch})")
    print("| M | step ms | us / token | vs M=2 |\n|---:|---:|---:|---:|")
    base = None
    for m in (2, 4, 8, 16):
        step, _ = step_seconds({f"m{i}": d for i in range(m)}, n_latents, 32, batch, repeats)
        base = base or step
        print(f"| {m} | {step * 1e3:.1f} | {step / batch * 1e6:.2f} | {step / base:.2f}x |")


if __name__ == "__main__":
    main()
