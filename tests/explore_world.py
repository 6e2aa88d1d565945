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
    from usae.extract import extract

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
