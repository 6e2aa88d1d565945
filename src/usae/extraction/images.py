"""Image sources and the canonical view every backbone sees.

An :class:`ImageSet` is an ordered list of image ids plus a way to open each one. Sources:

* a folder (recursive; ``.jpg .jpeg .png .webp .bmp``; sorted by relative POSIX path),
* a Hugging Face ``datasets`` dataset, by hub name (``hf:NAME[:SPLIT]``) or a local
  ``save_to_disk`` directory, with an ``image`` column (ids ``"<split>/<index>"``),
* a plain list of paths (ids are the paths as given),
* ``builtin:demo``, ``builtin:openclipart``, ``builtin:large``: labelled images that installed
  packages ship (photos in scikit-image and scikit-learn, Debian's tuxpaint stamps and openclipart
  clip art), for offline runs; ``builtin_images.py``.

``ImageSet.describe()`` is a JSON object recorded in the store's ``extra.images`` so the explorer can
reopen image ``j`` later with :func:`reopen`.

The canonical view (:func:`canonical_view`) is the rule that makes token rows of different models
line up: every model sees the *same* pixels — the image flattened onto grey if it has alpha, the
largest centred square, resized to the view size. Each backbone then only resizes this square to
its own input resolution and normalises it, so a model's token grid always tiles the same region.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageOps

from usae._input import file_kind, read_user_text, regular_file
from usae.errors import UsaeError
from usae.extraction.builtin_images import builtin_listing

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
GREY = (128, 128, 128)
ALPHA_MARGIN = 0.04  # --alpha-crop keeps this share of the cut-out's size around it
REDUCED_SIDE = 4096
"""A file over PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, 89 Mpx) but under twice
it is decoded, then reduced to fit REDUCED_SIDE² (every view is far smaller); PIL refuses files over
twice the limit (:class:`BadImage`), and the ``builtin:`` sources leave those out when listing."""


class BadImage(Exception):
    """An image that cannot be decoded; extraction skips it with a warning."""


def flatten_alpha(img: Image.Image) -> Image.Image:
    """RGB version of ``img``; transparent pixels are composited onto mid grey."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, GREY + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info)


def crop_to_alpha(img: Image.Image, margin: float = ALPHA_MARGIN) -> Image.Image:
    """``img`` cropped to the bounding box of its visible pixels (alpha > 0), plus a margin; as is without alpha.

    A cut-out (a stamp, a sticker) then fills the canonical view instead of sitting in a flat border.
    """
    if not has_alpha(img):
        return img
    rgba = img.convert("RGBA")
    box = rgba.getchannel("A").getbbox()
    if box is None:
        return rgba
    pad = int(round(margin * max(box[2] - box[0], box[3] - box[1])))
    return rgba.crop(
        (max(0, box[0] - pad), max(0, box[1] - pad), min(rgba.width, box[2] + pad), min(rgba.height, box[3] + pad))
    )


def open_oriented(path: str | Path, alpha_crop: bool = False) -> Image.Image:
    """Decode one image file fully, upright (EXIF), optionally cropped to its alpha; alpha kept.

    Raises :class:`BadImage` naming the file if it cannot be decoded.
    """
    try:
        regular_file(Path(path), "image")  # stat before open: a FIFO in a list would block the read forever
    except UsaeError as e:
        raise BadImage(str(e)) from None
    try:
        with warnings.catch_warnings():
            # over the limit: decoded reduced below instead of a DecompressionBombWarning per file
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                big = Image.MAX_IMAGE_PIXELS is not None and img.width * img.height > Image.MAX_IMAGE_PIXELS
                if big:
                    img.draft("RGB", (REDUCED_SIDE, REDUCED_SIDE))  # JPEG decodes at 1/2..1/8 scale; others ignore it
                img.load()  # decode now: truncated files fail here, not later
                if big:
                    img.thumbnail((REDUCED_SIDE, REDUCED_SIDE), Image.Resampling.LANCZOS, reducing_gap=3.0)
                # camera photos store their rotation in EXIF; models should see them upright
                img = ImageOps.exif_transpose(img)
                return crop_to_alpha(img) if alpha_crop else img
    # PIL's parsers raise more than OSError on damaged bytes: SyntaxError for a broken EXIF block (a
    # WebP's "not a TIFF file"), struct.error, IndexError, ...; each is one unreadable image, not a crash
    except (Exception, Image.DecompressionBombError) as e:
        raise BadImage(f"{path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def load_rgb(path: str | Path, alpha_crop: bool = False) -> Image.Image:
    """Decode one image file fully into RGB (see :func:`open_oriented`); alpha flattened onto grey."""
    return flatten_alpha(open_oriented(path, alpha_crop))


def canonical_view(img: Image.Image, size: int) -> np.ndarray:
    """The pixels every backbone sees: centred square crop resized to ``size``; uint8 (size, size, 3)."""
    img = flatten_alpha(img) if img.mode != "RGB" else img
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    square = img.crop((left, top, left + side, top + side))
    if side != size:
        # PIL's resize is antialiased (area-weighted when shrinking), so small tokens don't alias.
        square = square.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)
    return np.asarray(square, dtype=np.uint8)


class ImageSet:
    """An ordered, deterministic list of images.

    ``ids[j]`` names image ``j`` in the store; ``load(j)`` returns it as RGB (or raises BadImage).
    """

    def __init__(self, ids: list[str], description: dict[str, Any]) -> None:
        self.ids = ids
        self._description = description

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, j: int) -> Image.Image:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """JSON object that :func:`reopen` turns back into this set."""
        return dict(self._description)


class FileImages(ImageSet):
    """Images that are files: ``ids`` are paths relative to ``root`` (or absolute when root is None)."""

    def __init__(self, ids: list[str], root: Path | None, description: dict[str, Any]) -> None:
        super().__init__(ids, description)
        self.root = root
        self.alpha_crop = bool(description.get("alpha_crop", False))
        """Images with transparency are cropped to their visible pixels (``usae extract --alpha-crop``)."""
        self.not_images: dict[str, int] = {}
        """A folder source's other files by extension (most frequent first), which are not read."""
        self.special: dict[str, int] = {}
        """Entries left out because they are no regular file (FIFO, socket, device, broken link), by kind."""

    def path(self, j: int) -> Path:
        return self.root / self.ids[j] if self.root is not None else Path(self.ids[j])

    def path_of(self, image_id: str) -> Path:
        return self.root / image_id if self.root is not None else Path(image_id)

    def load(self, j: int) -> Image.Image:
        return load_rgb(self.path(j), self.alpha_crop)


class DatasetImages(ImageSet):
    """Rows of a Hugging Face ``datasets`` dataset with an image column."""

    def __init__(self, dataset: Any, column: str, split: str, description: dict[str, Any]) -> None:
        super().__init__([f"{split}/{i}" for i in range(len(dataset))], description)
        self._dataset, self._column = dataset, column

    @property
    def dataset(self) -> Any:
        """The underlying ``datasets.Dataset`` (its other columns hold labels)."""
        return self._dataset

    def load(self, j: int) -> Image.Image:
        try:
            value = self._dataset[j][self._column]
        except Exception as e:  # a damaged row of an arrow file is still one bad image
            raise BadImage(f"{self.ids[j]}: {type(e).__name__}: {e}") from None
        if isinstance(value, Image.Image):
            try:
                value.load()
                return flatten_alpha(value)
            except OSError as e:
                raise BadImage(f"{self.ids[j]}: {e}") from None
        if isinstance(value, dict) and value.get("path"):
            return load_rgb(value["path"])
        raise BadImage(f"{self.ids[j]}: column {self._column!r} holds {type(value).__name__}, not an image")


def folder_images(root: str | Path) -> FileImages:
    """Every image file under ``root`` (recursive), sorted by relative path."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise UsaeError(f"{root}: not a directory of images")
    ids: list[str] = []
    others: Counter[str] = Counter()
    special: Counter[str] = Counter()
    for p in root.rglob("*"):
        kind = file_kind(p)
        if kind == "file" and p.suffix.lower() in IMAGE_SUFFIXES:
            ids.append(p.relative_to(root).as_posix())
        elif kind == "file":
            others[p.suffix.lower() or "(no extension)"] += 1
        elif kind != "directory":
            special[kind] += 1
    if not ids:
        raise UsaeError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    images = FileImages(sorted(ids), root, {"kind": "folder", "root": str(root)})
    images.not_images, images.special = dict(others.most_common()), dict(special.most_common())
    return images


def log_not_images(images: ImageSet) -> None:
    """One log line for the files of a folder source that are not images (they are not extracted), and
    one for the entries of a folder or list that are no regular file (a FIFO, socket or device)."""
    special = getattr(images, "special", None)
    if special:
        log.warning(
            "skipped %d entries that are not regular files (%s): a FIFO, socket or device is never read as an image",
            sum(special.values()), ", ".join(f"{kind} {n}" for kind, n in special.items()),
        )  # fmt: skip
    counts = getattr(images, "not_images", None)
    if not counts:
        return
    shown = ", ".join(f"{ext} {n}" for ext, n in list(counts.items())[:6]) + (", …" if len(counts) > 6 else "")
    log.warning(
        "skipped %d files that are not images (%s); images are %s",
        sum(counts.values()), shown, " ".join(IMAGE_SUFFIXES),
    )  # fmt: skip


def path_images(paths: Sequence[str | Path]) -> FileImages:
    """A plain list of image paths, in the order given (ids are the absolute paths).

    Entries that exist but are no regular file (a FIFO, socket or device) are left out and counted
    (``special``); a missing file stays, to be skipped as unreadable like a damaged one.
    """
    ids: list[str] = []
    special: Counter[str] = Counter()
    for p in paths:
        path = Path(p).expanduser()
        kind = file_kind(path)
        if kind in ("file", "missing file"):
            ids.append(str(path.resolve()))
        else:
            special[kind] += 1
    if not ids:
        raise UsaeError(f"no image files in the list of {len(paths)} paths" if paths else "empty list of image paths")
    images = FileImages(ids, None, {"kind": "paths", "paths": ids})
    images.special = dict(special.most_common())
    return images


def list_file_paths(path: Path) -> list[Path]:
    """The image paths a list file (.txt) names, one per line; relative ones are under the list's folder."""
    lines = [ln.strip() for ln in read_user_text(path, "image list").splitlines() if ln.strip()]
    return [Path(ln) if Path(ln).is_absolute() else path.parent / ln for ln in lines]


def dataset_images(name: str, split: str = "train", column: str = "image") -> DatasetImages:
    """A Hugging Face dataset by hub name or local ``save_to_disk`` / data directory."""
    try:
        import datasets
    except ImportError:
        raise UsaeError("Hugging Face datasets need the `datasets` package: pip install 'usae[datasets]'") from None
    path = Path(name).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise UsaeError(f"dataset {name!r} (split {split!r}): {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if column not in ds.column_names:
        raise UsaeError(f"dataset {name!r} has no column {column!r} (columns: {', '.join(ds.column_names)})")
    desc = {"kind": "hf", "name": str(path.resolve()) if path.is_dir() else name, "split": split, "column": column}
    return DatasetImages(ds, column, split, desc)


def builtin_images(name: str) -> FileImages:
    """``builtin:NAME``: ``demo``, ``openclipart`` or ``large`` (``builtin_images.py`` lists them)."""
    listing = builtin_listing(name)
    return FileImages(listing.paths, None, listing.description)


def demo_images() -> FileImages:
    """The offline demo set: packaged colour photos plus tuxpaint's photographic stamps (if installed)."""
    return builtin_images("demo")


def open_images(spec: str | Path | Sequence[str | Path], split: str = "train", column: str = "image") -> ImageSet:
    """Resolve a user's image source: folder, ``hf:NAME[:SPLIT]``, dataset dir, ``builtin:NAME`` or a list."""
    if isinstance(spec, (list, tuple)):
        return path_images(spec)
    text = str(spec)
    if text.startswith("builtin:"):
        return builtin_images(text.removeprefix("builtin:"))
    if text.startswith("hf:"):
        name, _, hf_split = text[3:].partition(":")
        return dataset_images(name, hf_split or split, column)
    path = Path(text).expanduser()
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()):
        return dataset_images(text, split, column)
    if path.is_dir():
        images = folder_images(path)
        log_not_images(images)
        return images
    if path.suffix.lower() == ".txt" and (path.exists() or path.is_symlink()):
        images = path_images(list_file_paths(path))
        log_not_images(images)
        return images
    raise UsaeError(
        f"{text}: not a folder of images, a list file (.txt), 'hf:NAME[:SPLIT]' or 'builtin:demo|openclipart|large'"
    )


def alpha_cropped(images: ImageSet) -> ImageSet:
    """The same image files, each cropped to its visible (alpha > 0) pixels; recorded in ``describe()``.

    Only file sources have alpha to crop; other sources are returned as they are.
    """
    if not isinstance(images, FileImages):
        log.warning("--alpha-crop applies to image files only; %s is used as it is", images.describe().get("kind"))
        return images
    return FileImages(images.ids, images.root, images.describe() | {"alpha_crop": True})


def reopen(description: dict[str, Any]) -> ImageSet:
    """The :class:`ImageSet` that ``describe()`` recorded (e.g. from a store's ``extra['images']``)."""
    kind = description.get("kind")
    if kind == "folder":
        images = folder_images(description["root"])
        return alpha_cropped(images) if description.get("alpha_crop") else images
    if kind in ("paths", "builtin"):
        ids = list(description["paths"])
        return FileImages(ids, None, dict(description))
    if kind == "hf":
        return dataset_images(
            description["name"], description.get("split", "train"), description.get("column", "image")
        )
    raise UsaeError(f"unknown image source kind {kind!r} in store metadata (extra.images)")


def image_by_id(images: ImageSet, image_id: str) -> Image.Image:
    """Open one image of a set by its id (as written in a store's ``image_ids``)."""
    if isinstance(images, FileImages):
        return load_rgb(images.path_of(image_id), images.alpha_crop)
    try:
        j = images.ids.index(image_id)
    except ValueError:
        raise UsaeError(f"image id {image_id!r} is not in {images.describe()}") from None
    return images.load(j)


# -- a store's images ------------------------------------------------------------------------------
class ImageLayout(NamedTuple):
    """How a store's rows map to images: image j owns rows j*t .. (j+1)*t - 1.

    Row j*t + k is grid token k (row-major) of image j, or token ``positions[j, k]`` in a
    token-subsampled store (``usae extract --tokens-per-image``), where t < h*w.
    """

    image_ids: list[str]
    tokens_per_image: int
    grid: tuple[int, int]
    view_size: int | None
    """Side of the canonical view in pixels (``extra.view_size``), None if not recorded."""
    positions: np.ndarray | None = None
    """(images, t) int64: each row's grid token in a subsampled store; None when every token is stored."""


def image_layout(store: Any) -> ImageLayout:
    """The image layout a store recorded at extraction; a store without one is a one-line UsaeError."""
    where = store.path / "metadata.json"
    if store.tokens_per_image is None or store.grid is None or store.image_ids is None:
        raise UsaeError(
            f"{where}: no image layout (image_ids, tokens_per_image, grid); make the store with `usae extract`"
        )
    view = store.extra.get("view_size")
    positions = getattr(store, "positions", None)
    return ImageLayout(
        list(store.image_ids), store.tokens_per_image, tuple(store.grid), int(view) if view else None, positions
    )


def source_of(store: Any) -> dict[str, Any]:
    """The image source a store recorded (``extra.images``, what :func:`reopen` takes)."""
    desc = store.extra.get("images")
    if not isinstance(desc, dict):
        raise UsaeError(f"{store.path / 'metadata.json'}: field 'extra.images' (the image source) is missing")
    return desc


_IMAGE_SETS: dict[str, ImageSet] = {}


def reopen_cached(description: dict[str, Any]) -> ImageSet:
    """:func:`reopen`, cached for the last source: a folder source lists its files once per process."""
    key = repr(sorted(description.items()))
    if key not in _IMAGE_SETS:
        _IMAGE_SETS.clear()
        _IMAGE_SETS[key] = reopen(description)
    return _IMAGE_SETS[key]


def load_source_image(
    source: dict[str, Any], image_id: str, view_size: int | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(canonical view (S, S, 3) uint8, alpha (S, S) uint8 or None) of one image of a store's source.

    The alpha plane gets the same square crop and resize as the view; a missing or unreadable
    image is a one-line UsaeError naming it.
    """
    images = reopen_cached(source)
    try:
        img = open_oriented(images.path_of(image_id), images.alpha_crop) if isinstance(images, FileImages) else None
        img = img if img is not None else image_by_id(images, image_id)
    except BadImage as e:
        raise UsaeError(f"cannot open image {image_id!r}: {e}") from None
    size = view_size or min(img.size)
    alpha = canonical_view(img.convert("RGBA").getchannel("A").convert("RGB"), size)[..., 0] if has_alpha(img) else None
    return canonical_view(img, size), alpha
