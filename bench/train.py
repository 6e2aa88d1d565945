"""Trainer throughput: `usae.fit` vs a plain dense reference loop, measured in the same run.

The reference is the obvious implementation of the paper's random-source step: encode the sampled
model densely, TopK into a dense (b, n_latents) code, decode *every* model with a dense matmul,
sum the losses, backward, step, renormalise, and read the loss with `.item()` every step (a host
sync, as the released loop logs). Both read the same store rows; both use Adam and the same shapes.

    .venv/bin/python bench/train.py            # M=3, widths 384/512/768, n_latents 8*768, k 32
    .venv/bin/python bench/train.py --quick    # a smaller smoke run
    .venv/bin/python bench/train.py --device cuda --steps 200 --json train.json   # GPU (bench/gpu.sh)

Prints tokens/s for each and the ratio to the reference; `usae.fit` runs with float32 latent
selection and, where the device multiplies bfloat16 natively, with bfloat16 selection (its default
there). Both loops run on --device. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import usae
from usae.data.store import open_store
from usae.device import native_bf16


def reference_loop(
    store_dir: Path, n_latents: int, k: int, steps: int, batch_size: int, seed: int, device: torch.device
) -> float:
    """The dense loop; returns wall seconds for ``steps`` steps (setup included, like fit)."""
    t0 = time.perf_counter()
    store = open_store(store_dir)
    names = store.model_names
    g = torch.Generator().manual_seed(seed)
    params = {}
    for n in names:
        d = store.widths[n]
        W_dec = torch.randn(n_latents, d, generator=g)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        params[n] = {
            "W_enc": W_dec.T.clone().to(device).requires_grad_(),
            "b_enc": torch.zeros(n_latents, device=device, requires_grad=True),
            "W_dec": W_dec.to(device).requires_grad_(),
            "b_dec": torch.zeros(d, device=device, requires_grad=True),
        }
    stats = {n: store.stats(n) for n in names}
    mean = {n: torch.as_tensor(stats[n].mean, dtype=torch.float32, device=device) for n in names}
    opt = torch.optim.Adam([p for ps in params.values() for p in ps.values()], lr=1e-3)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        rows = np.sort(rng.choice(store.n_rows, batch_size, replace=False))
        x = {n: (torch.from_numpy(store.take(n, rows)).to(device).float() - mean[n]) / stats[n].std for n in names}
        src = names[rng.integers(len(names))]
        p = params[src]
        z_pre = (x[src] - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        top = torch.topk(z_pre, k, dim=1)
        z = torch.zeros_like(z_pre).scatter(1, top.indices, torch.relu(top.values))
        loss = sum(((z @ params[n]["W_dec"] + params[n]["b_dec"]) - x[n]).square().mean() for n in names)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for n in names:
                params[n]["W_dec"] /= params[n]["W_dec"].norm(dim=1, keepdim=True)
        loss.item()  # per-step host sync, as the released loop logs every step
    return time.perf_counter() - t0


def fit_loop(
    store_dir: Path, out: Path, n_latents: int, k: int, steps: int, batch_size: int, seed: int, select: str, device: str
) -> float:
    t0 = time.perf_counter()
    cfg = usae.TrainConfig(
        store=store_dir,
        out=out,
        n_latents=n_latents,
        k=k,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        progress=False,
        overwrite=True,
        log_every=max(1, steps // 2),
        select_precision=select,
        device=device,
    )
    usae.fit(cfg)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--widths", type=int, nargs="+", default=[384, 512, 768])
    ap.add_argument("--latent-mult", type=int, default=8, help="n_latents = mult * max width")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="'cpu', 'cuda', ... (both loops)")
    ap.add_argument("--json", type=Path, help="also write the rows (metric, value, ratio) to this JSON file")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.quick:
        args.widths, args.steps, args.repeats, args.batch_size = [64, 96, 128], 20, 1, 1024
    n_latents = args.latent_mult * max(args.widths)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        n_rows = max(4 * args.batch_size, 20_000)
        data = {f"m{i}": rng.standard_normal((n_rows, d), dtype=np.float32) for i, d in enumerate(args.widths)}
        store = usae.write_store(tmp / "store", data, dtype="float16")
        print(
            f"M={len(args.widths)} widths={args.widths} n_latents={n_latents} k={args.k} "
            f"batch={args.batch_size} steps={args.steps} threads={torch.get_num_threads()} device={device}"
        )
        selects = ["float32", "bfloat16"] if native_bf16(device) else ["float32"]
        results: dict[str, list[float]] = {"dense reference": [], **{f"usae.fit {s}": [] for s in selects}}
        for r in range(args.repeats):  # interleaved, so all see the same machine state
            ref = reference_loop(store, n_latents, args.k, args.steps, args.batch_size, r, device)
            results["dense reference"].append(ref)
            for sel in selects:
                run = tmp / "run"
                sec = fit_loop(store, run, n_latents, args.k, args.steps, args.batch_size, r, sel, args.device)
                results[f"usae.fit {sel}"].append(sec)
    tokens = args.steps * args.batch_size
    best = {name: min(times) for name, times in results.items()}
    print(f"{'loop':22s} {'best s':>8s} {'tokens/s':>12s} {'vs reference':>13s}")
    rows = []
    for name, sec in best.items():
        print(f"{name:22s} {sec:8.2f} {tokens / sec:12,.0f} {best['dense reference'] / sec:12.2f}x")
        rows.append({"metric": f"{name} tokens/s", "value": tokens / sec, "ratio": best["dense reference"] / sec})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
