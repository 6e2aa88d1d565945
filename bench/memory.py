"""Peak RSS of training vs store size: the store is memory-mapped and streamed, so RSS stays flat.

Trains the same configuration (same steps, batch, model and shuffle buffer) on a store the size
of the data budget and on one 4x larger, each in a fresh process, and prints peak RSS (VmHWM) of
both and their ratio. Peak RSS includes torch itself (~0.5 GB of libraries on this CUDA build).

    .venv/bin/python bench/memory.py [--budget-mb 300] [--quick]

Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

WIDTHS = (256, 384, 512)


def write(store_dir: Path, n_rows: int) -> None:
    from usae.data.store import StoreWriter

    rng = np.random.default_rng(0)
    with StoreWriter(store_dir, {f"m{i}": d for i, d in enumerate(WIDTHS)}, dtype="float16") as w:
        for start in range(0, n_rows, 65536):
            b = min(65536, n_rows - start)
            w.append({f"m{i}": rng.standard_normal((b, d), dtype=np.float32) for i, d in enumerate(WIDTHS)})


def child(store: str, out: str, steps: int, shuffle_mb: int) -> None:
    import usae

    cfg = usae.TrainConfig(
        store=Path(store),
        out=Path(out),
        n_latents=2048,
        k=32,
        steps=steps,
        batch_size=4096,
        progress=False,
        overwrite=True,
        log_every=steps,
        shuffle_buffer_mb=shuffle_mb,
    )
    usae.fit(cfg)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork/exec.
    status = Path("/proc/self/status").read_text().splitlines()
    hwm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
    print(json.dumps({"max_rss_mb": hwm_kb / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-mb", type=float, default=300.0)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]), int(args.child[3]))
        return
    if args.quick:
        args.budget_mb, args.steps = 40.0, 40
    row_bytes = 2 * sum(WIDTHS)
    big_rows = int(4 * args.budget_mb * 2**20 / row_bytes)
    # the shuffle buffer (two windows in memory) takes half the budget; model, optimiser and
    # torch itself the rest
    shuffle_mb = max(1, int(args.budget_mb / 4))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, n_rows in (("store = budget / 1", big_rows // 4), ("store = 4 x budget", big_rows)):
            store = Path(tmp) / f"s{n_rows}"
            write(store, n_rows)
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    str(store),
                    str(Path(tmp) / "run"),
                    str(args.steps),
                    str(shuffle_mb),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            results[label] = (n_rows * row_bytes / 2**20, json.loads(out.stdout.strip().splitlines()[-1])["max_rss_mb"])
    print(
        f"RSS budget {args.budget_mb:.0f} MB (shuffle buffer {shuffle_mb} MB x 2 windows), {args.steps} steps x 4096 rows, "
        f"widths {WIDTHS}, n_latents 2048, float16 store"
    )
    print("| store | store MB | peak RSS MB |\n|---|---:|---:|")
    for label, (mb, rss) in results.items():
        print(f"| {label} | {mb:.0f} | {rss:.0f} |")
    (_, small), (_, big) = results.values()
    print(f"peak RSS ratio (4x store / 1x store): {big / small:.2f}")


if __name__ == "__main__":
    main()
