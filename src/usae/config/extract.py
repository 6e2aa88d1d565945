"""The extraction stage's config: `usae extract`.

Each dataclass is a subcommand of ``usae``; its field docstrings become ``--help``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from usae.config.convert import refuse_invalid

MAX_GRID = 256
"""The largest token grid side: 65 536 tokens per image, far beyond any backbone's native grid."""
MAX_VIEW_SIZE = 4096
"""The largest canonical view (and maximisation image) side, in pixels: images are decoded to fit it."""


@dataclass(frozen=True)
class ExtractConfig:
    """Run M frozen vision backbones over an image set and write a paired activation store."""

    images: str
    """Image source: a folder (recursive), a .txt list of paths, 'hf:NAME[:SPLIT]' or a saved
    datasets directory (image column), or 'builtin:demo' (offline photos)."""
    models: tuple[str, ...]
    """Backbone specs [ALIAS=]KIND:ID[@LAYER][?OPTIONS]: timm:NAME, hf:REPO, openclip:ARCH/TAG,
    onnx:PATH@TENSOR, fake:w16s8, or a built-in name (effnet-lite0, open-nsfw, craft-vgg16). OPTIONS
    override the preprocessing: size=320 (or HxW), mean=R,G,B, std=R,G,B, scale=1|255 (with mean and
    std), bgr=0|1, layout=nchw|nhwc, joined by '&' (quote the spec in a shell); see docs/backbones.md."""
    out: Path
    """Store directory to create (work in progress lives in OUT.parts/ until it is finalised)."""
    grid: int | None = None
    """Side of the common token grid; default: the smallest native grid among the models."""
    view_size: int | None = None
    """Side of the canonical square view, in pixels; default: the largest model input size."""
    batch_size: int = 32
    """Images per forward pass."""
    max_images: int | None = None
    """Use at most this many images, spread evenly over the sorted source."""
    tokens_per_image: int | None = None
    """Keep only this many tokens of each image's grid, drawn per image from (--token-seed, image id)
    and the same for every model, so rows stay paired; their grid positions are recorded in the
    store (token_positions.npy). Default (or N >= the grid's tokens): every token."""
    max_rows: int | None = None
    """Row budget (train and held-out stores together): with --tokens-per-image N, at most
    max_rows // N images (spread evenly); without it, every image with max_rows // n_images tokens
    each (one token from max_rows images when fewer than one per image fits)."""
    token_seed: int = 0
    """Seed of the token draw of --tokens-per-image / --max-rows."""
    images_per_part: int = 256
    """Images per resumable unit of work (an interrupted run redoes at most one part)."""
    dtype: Literal["float16", "float32"] = "float16"
    """Store dtype."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda', 'cuda:1', ..."""
    split: str = "train"
    """Split of a Hugging Face dataset."""
    column: str = "image"
    """Image column of a Hugging Face dataset."""
    random_init: bool = False
    """Randomly initialised backbones (no weights download): for dry runs and tests."""
    decode_threads: int = 2
    """Threads decoding images ahead of the forward passes."""
    alpha_crop: bool = False
    """Crop images with transparency (cut-outs) to their visible pixels before the centred square, so
    the object fills the view instead of a flat border (the demo's stamps)."""
    labels: str | None = None
    """Per-image labels to record in the store: 'folders' (each image's folders below the source root),
    'hf' (a Hugging Face dataset's --label-column) or a CSV file of 'image,label[;label...]' rows."""
    label_column: str = "label"
    """Label column of a Hugging Face dataset (ClassLabel names are stored)."""
    val_fraction: float = 0.0
    """Hold out this fraction of the images (seeded, stratified by label) into a second store, OUT-val."""
    val_seed: int = 0
    """Seed of the held-out split."""
    overwrite: bool = False
    """Replace an existing finished store."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        checks = {
            "batch_size": self.batch_size >= 1,
            "images_per_part": self.images_per_part >= 1,
            "decode_threads": self.decode_threads >= 1,
            "grid": self.grid is None or 1 <= self.grid <= MAX_GRID,
            "view_size": self.view_size is None or 1 <= self.view_size <= MAX_VIEW_SIZE,
            "max_images": self.max_images is None or self.max_images >= 1,
            "tokens_per_image": self.tokens_per_image is None or self.tokens_per_image >= 1,
            "max_rows": self.max_rows is None or self.max_rows >= 1,
            "val_fraction": 0.0 <= self.val_fraction < 1.0,
        }
        refuse_invalid("extract config", self, checks)
