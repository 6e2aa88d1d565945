"""Step cost against its floor, and cost per token as the number of models M grows.

1. Floor: a random-source step cannot be cheaper than the dense encoder matmul
   (b x d) @ (d x n_latents) that picks the top k. Prints step time / that matmul's time, both
   averaged over the models (each step encodes one), for each selection precision: float32, and
   bfloat16 where the CPU/GPU multiplies it natively (then compared with both floors).
2. M scaling: time per token of `train_step` for M = 2, 4, 8, 16 models of the same width.

    .venv/bin/python bench/scaling.py [--quick] [--device cuda] [--json scaling.json]

Both measured in this one run on in-memory batches (no I/O), same thread count; every number is
the best of several repeats (this is a shared machine: the minimum is the least disturbed run).
The floor matmul writes into a preallocated output, i.e. it is the bare BLAS call. Not a test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from usae.config import SAEConfig, TrainConfig
from usae.device import native_bf16
from usae.model.sae import UniversalSAE
from usae.training.build import make_optimizer
from usae.training.resume import resolve
from usae.training.step import TrainerState, train_step


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # GPU work is asynchronous: time it finished, not launched


def _best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def floor_seconds(sae: UniversalSAE, x_n: dict[str, torch.Tensor], dtype: torch.dtype, repeats: int) -> float:
    """Mean over models of the best bare encoder matmul (into a preallocated output)."""
    total = 0.0
    with torch.no_grad():
        for name, x in x_n.items():
            h = sae.heads[name]
            xs, W, b = x.to(dtype), h.W_enc.to(dtype), h.b_enc.to(dtype)
            out = torch.empty(x.shape[0], W.shape[0], dtype=dtype, device=x.device)
            total += _best(lambda xs=xs, W=W, b=b, out=out: torch.addmm(b, xs, W.t(), out=out), repeats)
    return total / len(x_n)


def step_seconds(
    widths: dict[str, int],
    n_latents: int,
    k: int,
    batch: int,
    repeats: int,
    select: torch.dtype,
    device: torch.device | str = "cpu",
) -> tuple[float, UniversalSAE, dict[str, torch.Tensor]]:
    """Best mean train_step seconds over one cycle that encodes each model once."""
    torch.manual_seed(0)
    sae = UniversalSAE(SAEConfig(widths=widths, n_latents=n_latents, k=k)).to(device)
    select_precision = str(select).removeprefix("torch.")
    cfg = TrainConfig(store="unused", n_latents=n_latents, k=k, batch_size=batch, select_precision=select_precision)
    cfg = resolve(cfg, widths, torch.device(device))  # the config as the loop reads it
    opt = make_optimizer(sae, cfg)
    for group in opt.param_groups:
        group["lr"] = 1e-3
    x_n = {n: torch.randn(batch, d, device=device) for n, d in widths.items()}
    state = TrainerState.fresh(len(widths), n_latents, torch.device(device))  # no latent dead: AuxK stays off

    def cycle() -> None:
        for name in widths:
            train_step(sae, opt, x_n, [name], cfg, state)

    return _best(cycle, repeats) / len(widths), sae, x_n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="toy sizes, one repeat: checks the plumbing only")
    ap.add_argument("--device", default="cpu", help="'cpu', 'cuda', ...")
    ap.add_argument("--json", type=Path, help="also write the rows (metric, value, ratio) to this JSON file")
    args = ap.parse_args()
    q = args.quick
    device = torch.device(args.device)
    repeats = 1 if args.tiny else 2 if q else 5
    bf16 = native_bf16(device)
    print(f"threads={torch.get_num_threads()} device={device} native bf16={bf16}")
    rows = []
    widths = {"a": 384, "b": 512, "c": 768} if not q else {"a": 64, "b": 96, "c": 128}
    n_latents, batch = (8 * max(widths.values()), 4096) if not q else (1024, 1024)
    if args.tiny:
        widths, n_latents, batch = {"a": 16, "b": 24, "c": 32}, 64, 64
    print(
        f"\n## Step vs encoder-matmul floor (M=3, widths {list(widths.values())}, n_latents {n_latents}, k 32, b {batch})"
    )
    print("| selection | step ms | floor ms (same precision) | step / floor | step / float32 floor |")
    print("|---|---:|---:|---:|---:|")
    f32_floor = None
    for dtype in (torch.float32, torch.bfloat16) if bf16 else (torch.float32,):
        step, sae, x_n = step_seconds(widths, n_latents, 32, batch, repeats, dtype, device)
        floor = floor_seconds(sae, x_n, dtype, repeats)
        f32_floor = f32_floor or floor
        name = str(dtype).removeprefix("torch.")
        print(f"| {name} | {step * 1e3:.1f} | {floor * 1e3:.1f} | {step / floor:.2f} | {step / f32_floor:.2f} |")
        rows.append(
            {"metric": f"{name} step ms (ratio: / its floor matmul)", "value": step * 1e3, "ratio": step / floor}
        )
    d, n_latents, batch = (256, 2048, 2048) if not q else (64, 512, 512)
    if args.tiny:
        d, n_latents, batch = 16, 64, 64
    select = torch.bfloat16 if bf16 else torch.float32
    print(
        f"\n## Time per token vs number of models (d {d}, n_latents {n_latents}, k 32, b {batch}, {str(select).removeprefix('torch.')} selection)"
    )
    print("| M | step ms | us / token | vs M=2 | per model vs M=2 |\n|---:|---:|---:|---:|---:|")
    base = None
    for m in (2, 4, 8, 16):
        step, _, _ = step_seconds({f"m{i}": d for i in range(m)}, n_latents, 32, batch, repeats, select, device)
        base = base or step
        print(
            f"| {m} | {step * 1e3:.1f} | {step / batch * 1e6:.2f} | {step / base:.2f}x | {step / base * 2 / m:.2f}x |"
        )
        rows.append(
            {
                "metric": f"M={m} us/token (ratio: per model vs M=2)",
                "value": step / batch * 1e6,
                "ratio": step / base * 2 / m,
            }
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
