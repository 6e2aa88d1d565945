"""Maximisation: the data spectrum vs 1/f, as the activation ratio optimised / best natural image.

For a run's top universal concepts by energy (RUN/report.json: ``classes.labels`` and ``energy``
summed over models), each concept is maximised twice with the same steps, crops and seed: MACO's
fixed magnitude estimated from the store's images (``spectrum="data"``) and the 1/f power law.
For each model the result is the **superstimulus ratio**: the concept's largest code over the
optimised image's tokens / its largest code over all the store's tokens (> 1: the optimised image
excites the concept more than any natural image does). Prints a table per concept and model, and
the ratio of ratios (data / 1/f; geometric mean over concepts and models).

    .venv/bin/python bench/maximize.py RUN STORE [--concepts 3] [--steps 48] [--n-crops 2] [--out DIR]

``--out`` also writes both panels of every concept (DIR/<data|1-f>/concept-<k>/) to look at.
Not a test: numbers depend on the machine, the run and the step budget.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch


def top_universal(run: Path, n: int) -> list[int]:
    """The ``n`` universal concepts of most energy (summed over models), from RUN/report.json."""
    report = json.loads((run / "report.json").read_text())
    energy_s = np.sum([report["energy"][m] for m in report["model_names"]], axis=0)
    labels = report["classes"]["labels"]
    return [int(k) for k in np.argsort(-energy_s, kind="stable") if labels[k] == "universal"][:n]


def spectrum_slope(mag_hw: torch.Tensor) -> float:
    """Slope of log(magnitude) vs log(radial frequency) over 2..S/2 cycles (1/f: -1)."""
    size = mag_hw.shape[-2]
    f_hw = torch.sqrt(torch.fft.fftfreq(size)[:, None] ** 2 + torch.fft.rfftfreq(size)[None, :] ** 2) * size
    keep = (f_hw >= 2) & (f_hw <= size / 2)
    bins = torch.round(f_hw[keep]).long()
    radial = torch.zeros(int(bins.max()) + 1).index_add_(0, bins, mag_hw[keep].float())
    radial = radial / torch.zeros_like(radial).index_add_(0, bins, torch.ones_like(bins, dtype=torch.float))
    f = torch.arange(len(radial))[2:].float()
    return float(np.polyfit(np.log(f.numpy()), np.log(radial[2:].numpy()), 1)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("store", type=Path)
    ap.add_argument("--concepts", type=int, default=3, help="top universal concepts by energy")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--n-crops", type=int, default=2)
    ap.add_argument("--size", type=int, default=None, help="optimised image side (default: the store's view)")
    ap.add_argument("--spectrum-images", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="also write the panels here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import usae
    from usae.explorer.maximize import maximize, natural_best
    from usae.explorer.maximize_result import write_maximization
    from usae.explorer.spectrum import data_spectrum
    from usae.run import maximize_dir

    sae, store = usae.load(args.run), usae.open_store(args.store)
    concepts = top_universal(args.run, args.concepts)
    size = args.size or int(store.extra.get("view_size") or 224)
    t0 = time.perf_counter()
    data = data_spectrum(store, size, maximize_dir(args.run), args.spectrum_images, progress=False)
    slopes = ", ".join(f"{spectrum_slope(m):.2f}" for m in data.magnitude)
    print(
        f"data spectrum: {data.images} images at {size} px ({'cached' if data.cached else 'estimated'}, "
        f"{time.perf_counter() - t0:.1f} s); radial slope per colour channel {slopes} (1/f: -1.00)"
    )
    basis = "; ".join("(" + ", ".join(f"{v:+.2f}" for v in row) + ")" for row in data.colour.T.tolist())
    print(f"colour basis, RGB direction of each channel: {basis}")
    t0 = time.perf_counter()
    natural = natural_best(sae, store, concepts, progress=False)
    print(f"best natural images of {len(concepts)} concepts: one store pass, {time.perf_counter() - t0:.1f} s")
    print(f"concepts {concepts}; {args.steps} steps x {args.n_crops} crops, seed {args.seed}, {args.device}\n")

    header = f"{'concept':>7} {'model':<16} {'best nat.':>9} {'data score':>10} {'data ratio':>10} "
    header += f"{'1/f score':>9} {'1/f ratio':>9} {'data/1/f':>8}"
    print(header)
    print("-" * len(header))
    log_rr, per_model, seconds = [], {}, {"data": 0.0, "1/f": 0.0}
    for k in concepts:
        results = {}
        for spectrum in ("data", "1/f"):
            results[spectrum] = maximize(
                args.run, k, store=store, steps=args.steps, size=size, n_crops=args.n_crops, seed=args.seed,
                spectrum=spectrum, spectrum_images=args.spectrum_images, natural=natural[k], device=args.device,
                progress=False,
            )  # fmt: skip
            seconds[spectrum] += results[spectrum].settings["seconds"]
            if args.out:
                write_maximization(results[spectrum], args.out / spectrum.replace("/", "-"))
        ratio = {s: r.superstimulus() for s, r in results.items()}
        for name in results["data"].images:
            rd, rf = ratio["data"][name], ratio["1/f"][name]
            rr = rd / rf if rd and rf else float("nan")
            if rd and rf:
                log_rr.append(math.log(rr))
                per_model.setdefault(name, []).append(math.log(rr))
            print(
                f"{k:>7} {name:<16} {natural[k][name].score:>9.3g} {results['data'].score[name]:>10.3g} "
                f"{(rd or float('nan')):>10.3f} {results['1/f'].score[name]:>9.3g} {(rf or float('nan')):>9.3f} "
                f"{rr:>8.3f}"
            )
    print()
    for name, logs in per_model.items():
        print(f"ratio of ratios (data / 1/f), {name}: {math.exp(np.mean(logs)):.3f} (geometric mean of {len(logs)})")
    if log_rr:
        print(f"ratio of ratios (data / 1/f), all: {math.exp(np.mean(log_rr)):.3f} (geometric mean of {len(log_rr)})")
    print(f"optimisation time: data {seconds['data']:.1f} s, 1/f {seconds['1/f']:.1f} s")


if __name__ == "__main__":
    main()
