"""A tiny image world for the explorer, maximisation and browser tests: PNGs -> extract -> run.

Two seeded random CNNs (``fake:`` backbones) of different widths and strides see 24 small synthetic
images; a 64-latent universal SAE is trained on their tokens. Everything runs on CPU in seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

MODELS = ("fake:w16s8i64", "fake:w8s4i32")
ODD_NAME = 'odd <b>&amp; "name".png'  # an image id that must be escaped on every page
EVIL_LABEL = "<script>window.__pwned = 1</script> & co"


class World(NamedTuple):
    images_dir: Path
    store: Path
    run: Path


def write_images(out: Path, n: int = 24, seed: int = 0) -> Path:
    """``n`` small PNGs of coloured shapes on coloured grounds, not all square, one with alpha."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = (80, 64) if i % 3 else (64, 64)
        ground = tuple(int(c) for c in rng.integers(0, 256, 3))
        img = Image.new("RGBA" if i == 5 else "RGB", (w, h), ground)
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x, y = rng.integers(0, w - 16), rng.integers(0, h - 16)
            size = int(rng.integers(8, 32))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            shape = [draw.ellipse, draw.rectangle][i % 2]
            shape([int(x), int(y), int(x) + size, int(y) + size], fill=colour)
        if i % 4 == 0:  # stripes: a high-frequency pattern
            for x in range(0, w, 6):
                draw.line([x, 0, x, h], fill=(255, 255, 255), width=2)
        name = ODD_NAME if i == 7 else f"img-{i:02d}.png"
        img.save(out / name)
    return out


def make_world(root: Path, n_images: int = 24, steps: int = 150) -> World:
    """Images, a store extracted by ``usae extract`` (float32) and a trained, evaluated run."""
    import usae
    from usae.config import ExtractConfig
    from usae.extraction.extract import extract

    images = write_images(root / "images", n_images)
    store = extract(
        ExtractConfig(
            images=str(images), models=MODELS, out=root / "store", batch_size=16, dtype="float32", device="cpu"
        )
    )
    run = root / "run"
    usae.fit(
        usae.TrainConfig(
            store=store, out=run, n_latents=64, k=4, steps=steps, batch_size=256, device="cpu", progress=False
        )
    )
    usae.evaluate(run, store, progress=False)
    return World(images, store, run)


_WORLD: dict[str, World] = {}


def shared_world(tmp_path_factory) -> World:
    """One world per test session, whichever test file asks first (fixtures in test files are per file)."""
    if "world" not in _WORLD:
        _WORLD["world"] = make_world(tmp_path_factory.mktemp("explore-world"))
    return _WORLD["world"]


def scored_labels(report: dict, named: dict[int, tuple[str, bool]], flat: tuple[int, ...] = ()) -> dict:
    """A small labels.json as ``usae label`` writes it, for ``report``'s run: one token-level family.

    Concept k in ``named`` is called ``named[k] = (label, agrees)``: significantly in every model when
    it agrees, else in the first model only (the others: a non-significant 'colour/red'). Concepts in
    ``flat`` have flat_share 1 in every model (an artifact mark); every other share is 0.
    """
    models, s = report["model_names"], report["n_latents"]

    def score(name: str, significant: bool = True) -> dict:
        p = 0.001 if significant else 0.2
        return {"label": name, "precision_at_n": 0.9, "lift": 4.0, "auroc": 0.8, "p_value": p, "n": 100, "significant": significant}  # fmt: skip

    concepts = {}
    for k in range(s):
        entry: dict = dict.fromkeys(models)
        if k in named:
            name, agrees = named[k]
            entry = {m: score(name) if agrees or i == 0 else score("colour/red", False) for i, m in enumerate(models)}
        entry.update(agrees=k in named and named[k][1], best=named[k][0] if k in named else None)
        concepts[str(k)] = entry
    summary = {
        "used": dict.fromkeys(models, len(named)),
        "named": {m: sum(a or i == 0 for _, a in named.values()) for i, m in enumerate(models)},
        "shared": len(named),
        "agreed": sum(a for _, a in named.values()),
        "p_threshold": 0.001,
    }
    shuffled = {**summary, "named": dict.fromkeys(models, 0), "agreed": 0, "p_threshold": 0.0}
    family = {
        "level": "token",
        "labels": sorted({"colour/red", *(name for name, _ in named.values())}),
        "n_items": report["n_rows"],
        "summary": summary,
        "shuffled": shuffled,
        "concepts": concepts,
    }
    return {
        "labels_version": 1,
        "run": "run",
        "store": {"path": "store", "hash": "unknown", "n_rows": report["n_rows"], "n_images": 24},
        "trained_on_this_store": True,
        "model_names": models,
        "families": {"pixels": family},
        "artifacts": {
            m: {"flat_share": [float(k in flat) for k in range(s)], "border_share": [0.0] * s} for m in models
        },
    }
