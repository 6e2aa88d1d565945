"""The three routes to ImageNet-scale training, measured in one run on the same images and models.

1. **store, every token**: `usae extract` then `usae train` on the store;
2. **store, --tokens-per-image N**: the same with N tokens of each image kept (the disk shrinks by
   grid/N; the models still see every pixel);
3. **backbones in the loop**: `usae train --images` (no store: every chunk of rows is made by the
   backbones as the loader asks for it, so each step's tokens cost forward passes).

For each: disk written, extraction seconds, training tokens/s, and for route 3 the split of its
time (backbones vs SAE steps: which one bounds the run). Then, in the same run, the ratio of
`usae.fit` to the paper's released loop on the synthetic world (bench/released.py).

    .venv/bin/python bench/routes.py                     # CPU: three random CNNs at the paper's widths
    .venv/bin/python bench/routes.py --device cuda --n-images 512 --steps 200 --json routes.json

Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # bench/released.py's loops

PAPER_LIKE = ["dino=fake:w384s16i224", "siglip=fake:w768s16i224", "vit=fake:w768s16i224"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=PAPER_LIKE)
    ap.add_argument("--images", default="builtin:demo")
    ap.add_argument("--n-images", type=int, default=64)
    ap.add_argument("--tokens-per-image", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--n-latents", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--random-init", action="store_true", help="random weights (timm/hf models without a download)")
    ap.add_argument("--released-steps", type=int, default=100, help="0: skip the released-loop comparison")
    ap.add_argument("--json", type=Path, help="also write the rows (metric, value, ratio) to this JSON file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from usae.config import ExtractConfig, TrainConfig
    from usae.extraction.extract import extract
    from usae.pipeline import open_source, train

    sae = dict(
        n_latents=args.n_latents, k=args.k, steps=args.steps, batch_size=args.batch_size, device=args.device,
        progress=False, val_every=0,
    )  # fmt: skip
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results = {}
        for route, tokens in (
            ("store, every token", None),
            (f"store, --tokens-per-image {args.tokens_per_image}", args.tokens_per_image),
        ):
            cfg = ExtractConfig(
                images=args.images, models=tuple(args.models), out=tmp / f"store{tokens}", max_images=args.n_images,
                device=args.device, tokens_per_image=tokens, progress=False, random_init=args.random_init,
            )  # fmt: skip
            began = time.perf_counter()
            store = extract(cfg)
            t_extract = time.perf_counter() - began
            size = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
            began = time.perf_counter()
            fit = train(TrainConfig(store=store, out=tmp / f"run{tokens}", **sae))
            t_train = time.perf_counter() - began
            results[route] = (size, t_extract, t_train, fit.step_seconds, None)
        cfg = TrainConfig(
            images=args.images, models=tuple(args.models), max_images=args.n_images, out=tmp / "run-images",
            random_init=args.random_init, **sae,
        )  # fmt: skip
        began = time.perf_counter()
        source = open_source(cfg)
        fit = train(cfg, source)
        t_train = time.perf_counter() - began
        results["backbones in the loop"] = (0, 0.0, t_train, fit.step_seconds, source.rows)

    tokens = args.steps * args.batch_size
    print(f"models: {', '.join(args.models)}; {args.n_images} images; {args.steps} steps x {args.batch_size} rows")
    print(f"{'route':34s}{'disk MB':>9s}{'extract s':>11s}{'train s':>9s}{'tokens/s':>11s}{'SAE steps s':>13s}")
    base = results["store, every token"]
    for route, (size, t_ext, t_tr, t_steps, _) in results.items():
        print(f"{route:34s}{size / 1e6:9.1f}{t_ext:11.1f}{t_tr:9.1f}{tokens / t_tr:11,.0f}{t_steps:13.1f}")
        rows += [
            {"metric": f"{route}: disk MB", "value": size / 1e6, "ratio": size / base[0]},
            {
                "metric": f"{route}: extract + train s",
                "value": t_ext + t_tr,
                "ratio": (t_ext + t_tr) / (base[1] + base[2]),
            },
            {"metric": f"{route}: train tokens/s", "value": tokens / t_tr, "ratio": base[2] / t_tr},
        ]
    in_loop = results["backbones in the loop"][4]
    steps_s = results["backbones in the loop"][3]
    bound = "backbones" if in_loop.make_seconds > steps_s else "SAE steps"
    print(
        f"backbones in the loop: {in_loop.images_run} images run ({in_loop.make_seconds:.1f} s making rows, "
        f"{in_loop.forward_seconds:.1f} s of forward passes) vs SAE steps {steps_s:.1f} s: the {bound} bound it"
    )
    rows.append(
        {
            "metric": "in the loop: backbone s / SAE step s",
            "value": in_loop.make_seconds,
            "ratio": in_loop.make_seconds / max(steps_s, 1e-9),
        }
    )
    print(f"ImageNet-1k train at 196 tokens, {sum(_width(m) for m in args.models)} dims, float16: "
          f"{1_281_167 * 196 * sum(_width(m) for m in args.models) * 2 / 1e12:.2f} TB every token, "
          f"{1_281_167 * args.tokens_per_image * sum(_width(m) for m in args.models) * 2 / 1e12:.3f} TB at "
          f"{args.tokens_per_image} tokens per image, 0 in the loop")  # fmt: skip
    if args.released_steps:
        rows.append(_released(args))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def _width(spec: str) -> int:
    """The width of a fake:wNs... spec (the default models); 0 when the spec does not say."""
    ident = spec.split("=")[-1]
    return int(ident.split(":w")[1].split("s")[0]) if ident.startswith("fake:w") else 0


def _released(args) -> dict:
    """usae.fit vs the released loop on the synthetic world, in this run (bench/released.py)."""
    from released import fit_loop, released_loop

    from usae.data.store import write_store
    from usae.data.synth import make_world

    with tempfile.TemporaryDirectory() as tmp:
        store = write_store(Path(tmp) / "world", make_world(n_rows=100_000, seed=0).data, dtype="float16")
        t_rel = released_loop(store, 512, 8, args.released_steps, 4096, 0)
        t_fit, _ = fit_loop(store, Path(tmp) / "run", 512, 8, 490, 4096, 0)
    ratio = (490 / t_fit) / (args.released_steps / t_rel)
    print(f"usae.fit vs the released loop (synthetic world, 490 x 4096 token-steps): {ratio:.2f}x its tokens/s")
    return {"metric": "usae.fit tokens/s vs the released loop", "value": 490 * 4096 / t_fit, "ratio": ratio}


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
