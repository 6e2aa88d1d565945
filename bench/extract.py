"""Extraction overhead: `usae extract` images/s vs the same models' bare forward passes.

Both sides run the same backbones on the same images with the same batch size and threads:

* **bare**: images decoded and preprocessed beforehand (not timed), then only each model's forward
  up to its layer (``Backbone.feature_map`` on prepared inputs) — the floor;
* **usae extract**: the whole command from image files to a finished store (decode, canonical view,
  resize + normalise, forward, grid alignment, float16, part files, finalise with statistics + hash).

Prints both rates and the ratio of times (target: extraction ≤ 1.1× the bare forwards), then, in
the same run, the store size and extraction time per 1k images of every token against
``--tokens-per-image N`` (default 16; the models still see every pixel, only the write shrinks).

    .venv/bin/python bench/extract.py [--models effnet-lite0 open-nsfw craft-vgg16] [--n-images 128]
    .venv/bin/python bench/extract.py --models dino=fake:w384s16i224 siglip=fake:w768s16i224 \
        vit=fake:w768s16i224 --n-images 64          # the paper's widths and 14x14 grid, random CNNs

Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["effnet-lite0", "open-nsfw", "craft-vgg16"])
    ap.add_argument("--images", default="builtin:demo")
    ap.add_argument("--n-images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many runs for each side")
    ap.add_argument("--tokens-per-image", type=int, default=16, help="the subsampled store's tokens per image")
    ap.add_argument("--json", type=Path, help="also write the rows (metric, value, ratio) to this JSON file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from usae.config import ExtractConfig
    from usae.extraction.backbones import load_backbone
    from usae.extraction.extract import common_grid, extract, select_images
    from usae.extraction.images import canonical_view, open_images

    device = torch.device(args.device)
    images = open_images(args.images)
    chosen = select_images(len(images), args.n_images)
    backbones = [load_backbone(m, device=device) for m in args.models]
    grid = common_grid(backbones, None)
    view = max(b.input_size for b in backbones)
    views = np.stack([canonical_view(images.load(j), view) for j in chosen])
    pixels = torch.from_numpy(views).permute(0, 3, 1, 2).float().div(255)
    batches = [pixels[i : i + args.batch_size].to(device) for i in range(0, len(pixels), args.batch_size)]
    prepared = [[b.prepare(x) for b in backbones] for x in batches]

    def bare() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for inputs in prepared:
                for b, x in zip(backbones, inputs, strict=True):
                    b.feature_map(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def full(tokens_per_image: int | None = None) -> tuple[float, int]:
        """(seconds, bytes on disk) of one `usae extract` into a fresh store."""
        with tempfile.TemporaryDirectory() as tmp:
            cfg = ExtractConfig(
                images=args.images, models=tuple(args.models), out=Path(tmp) / "store",
                max_images=args.n_images, batch_size=args.batch_size, device=args.device,
                tokens_per_image=tokens_per_image, progress=False,
            )  # fmt: skip
            start = time.perf_counter()
            out = extract(cfg, backbones=backbones)
            seconds = time.perf_counter() - start
            return seconds, sum(p.stat().st_size for p in out.rglob("*") if p.is_file())

    bare()  # warm-up: kernels, allocator
    t_bare = min(bare() for _ in range(args.repeats))
    (t_full, size_full), (t_sub, size_sub) = (
        min(full(tokens) for _ in range(args.repeats)) for tokens in (None, args.tokens_per_image)
    )
    n = len(chosen)
    print(f"models: {', '.join(f'{b.name} (d {b.width}, grid {b.native_grid})' for b in backbones)} -> grid {grid}")
    print(f"images: {n}, batch {args.batch_size}, device {args.device}, threads {torch.get_num_threads()}")
    print(f"{'':24s}{'seconds':>10s}{'images/s':>10s}")
    print(f"{'bare forwards':24s}{t_bare:10.2f}{n / t_bare:10.1f}")
    print(f"{'usae extract':24s}{t_full:10.2f}{n / t_full:10.1f}")
    print(f"extraction / bare forwards = {t_full / t_bare:.3f}x (target <= 1.1x)")
    t_grid, n_sub = grid[0] * grid[1], min(args.tokens_per_image, grid[0] * grid[1])
    print(f"\nper 1k images ({n} measured; float16):{'MB':>10s}{'seconds':>10s}")
    print(f"{f'every token ({t_grid})':38s}{size_full / n / 1e3:10.2f}{t_full * 1000 / n:10.1f}")
    print(f"{f'--tokens-per-image {n_sub}':38s}{size_sub / n / 1e3:10.2f}{t_sub * 1000 / n:10.1f}")
    print(f"subsampled / every token: size {size_sub / size_full:.3f}x, time {t_sub / t_full:.3f}x")
    if args.json:
        rows = [
            {"metric": "bare forwards images/s", "value": n / t_bare, "ratio": 1.0},
            {
                "metric": "usae extract images/s (ratio: time / bare, target <= 1.1)",
                "value": n / t_full,
                "ratio": t_full / t_bare,
            },
            {"metric": "store MB per 1k images, every token", "value": size_full / n / 1e3, "ratio": 1.0},
            {
                "metric": f"store MB per 1k images, --tokens-per-image {n_sub}",
                "value": size_sub / n / 1e3,
                "ratio": size_sub / size_full,
            },
            {"metric": "extract s per 1k images, every token", "value": t_full * 1000 / n, "ratio": 1.0},
            {
                "metric": f"extract s per 1k images, --tokens-per-image {n_sub}",
                "value": t_sub * 1000 / n,
                "ratio": t_sub / t_full,
            },
        ]
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
