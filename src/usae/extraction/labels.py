"""Per-image labels recorded in a store: folders, a Hugging Face label column or a CSV; and the split.

``--labels folders``: an image's folders below the source root (``animals/marsupials``; naming also
scores the parent ``animals``). ``--labels hf``: a dataset's label column (ClassLabel names).
``--labels PATH.csv``: rows ``image,label[;label...]`` (multi-label; the image as its id in the store,
or its file name). The built-in demo images carry tuxpaint's category/subcategory folders, the
packaged photographs their names, and every stamp the first (English) line of its description;
``builtin:openclipart`` images their top folder and subfolder (``food/fruit``).

``split_images`` holds out a seeded, label-stratified fraction of the images (``--val-fraction``).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np

from usae._io import one_line, read_json, read_user_csv, regular_file
from usae.errors import UsaeError
from usae.extraction.builtin_images import TUXPAINT_STAMPS, folder_label_of
from usae.extraction.images import DatasetImages, FileImages, ImageSet

log = logging.getLogger(__name__)


def image_labels(images: ImageSet, source: str, label_column: str = "label") -> list[list[str]]:
    """Labels of every image of ``images`` (aligned with ``images.ids``) from ``source``."""
    if source == "folders":
        return [folder_label(images, image_id) for image_id in images.ids]
    if source == "hf":
        return _dataset_labels(images, label_column)
    path = Path(source).expanduser()
    if path.suffix.lower() == ".csv" or path.exists():  # a FIFO or directory says what it is
        regular_file(path, "label file")
    if path.suffix.lower() == ".csv":
        return csv_labels(path, images.ids)
    raise UsaeError(f"--labels: {source!r} is not 'folders', 'hf' or a .csv file")


def folder_label(images: ImageSet, image_id: str) -> list[str]:
    path = Path(image_id)
    if isinstance(images, FileImages) and images.root is not None:
        parent = path.parent.as_posix()
        return [] if parent in ("", ".") else [parent]
    desc = images.describe()
    if desc.get("kind") == "builtin":
        # stores made before label_roots was recorded hold the demo: tuxpaint's category/subcategory
        for root, depth in desc.get("label_roots") or [[str(TUXPAINT_STAMPS), None]]:
            if path.is_relative_to(root):  # tuxpaint's category/subcategory, clip art's top/subfolder
                label = folder_label_of(path, Path(root), depth)
                return [label] if label else []
        return [f"photos/{path.stem}"]  # the demo's packaged photographs: their names
    return [path.parent.name] if path.parent.name else []


def _dataset_labels(images: ImageSet, column: str) -> list[list[str]]:
    if not isinstance(images, DatasetImages):
        raise UsaeError("--labels hf: the images are not a Hugging Face dataset (--images hf:NAME or a saved dataset)")
    dataset = images.dataset
    if column not in dataset.column_names:
        raise UsaeError(f"--label-column: dataset has no column {column!r} (columns: {dataset.column_names})")
    feature = dataset.features[column]
    names = getattr(feature, "names", None)  # ClassLabel: ints -> names
    inner = getattr(feature, "feature", None)  # Sequence(ClassLabel): multi-label
    names = names or getattr(inner, "names", None)
    out = []
    for value in dataset[column]:
        values = value if isinstance(value, list | tuple) else [value]
        out.append([str(names[v]) if names is not None and isinstance(v, int) else str(v) for v in values])
    return out


def csv_labels(path: Path, ids: list[str]) -> list[list[str]]:
    """``image,label[;label...]`` rows (read by ``_io.read_user_csv``: UTF-8 or UTF-16 with a BOM, any
    field length); a row that does not parse is a one-line error naming file:line."""
    by_key: dict[str, list[str]] = {}
    for i, (line_no, row) in enumerate(read_user_csv(path, "label file")):
        if not row or (i == 0 and row[0].strip().lower() == "image"):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise UsaeError(
                f"{path}:{line_no}: expected 'image,label[;label...]', got {one_line(','.join(row))[:80]!r}"
            )
        by_key[row[0].strip()] = [lb.strip() for lb in row[1].split(";") if lb.strip()]
    names = [Path(i).name for i in ids]
    unique_name = {n for n in names if names.count(n) == 1}
    out, missing = [], 0
    for image_id, name in zip(ids, names, strict=True):
        labels = by_key.get(image_id) or (by_key.get(name) if name in unique_name else None)
        missing += labels is None
        out.append(labels or [])
    if missing == len(ids):
        raise UsaeError(f"{path}: no row names any of the {len(ids)} images (by id or file name)")
    if missing:
        log.warning("%s: %d of %d images have no labels", path, missing, len(ids))
    return out


def demo_descriptions(images: ImageSet) -> list[str] | None:
    """The first line (English) of each tuxpaint stamp's ``.txt`` description; '' for other images."""
    if images.describe().get("kind") != "builtin":
        return None
    out = []
    for image_id in images.ids:
        txt = Path(image_id).with_suffix(".txt")
        try:
            first = txt.read_text(encoding="utf-8", errors="replace").splitlines()[0].strip() if txt.is_file() else ""
        except (OSError, IndexError):
            first = ""
        out.append(first)
    return out


def split_images(labels: list[list[str]] | None, n: int, fraction: float, seed: int) -> np.ndarray:
    """(n,) bool: which images are held out — ``fraction`` of each label stratum (first label), seeded.

    Deterministic for the same (labels, n, fraction, seed); at least one image stays in training.
    """
    if not 0.0 <= fraction < 1.0:
        raise UsaeError(f"--val-fraction must be in [0, 1), got {fraction}")
    held = np.zeros(n, dtype=bool)
    if fraction == 0.0 or n < 2:
        return held
    strata: dict[str, list[int]] = {}
    for j in range(n):
        strata.setdefault(labels[j][0] if labels and labels[j] else "", []).append(j)
    rng = np.random.default_rng([seed, 7])
    for key in sorted(strata):
        members = np.asarray(strata[key])
        n_val = int(np.floor(fraction * len(members) + rng.random()))  # unbiased rounding per stratum
        held[rng.permutation(members)[:n_val]] = True
    if held.all():
        held[0] = False
    return held


# -- the held-out twin OUT-val ---------------------------------------------------------------------
def val_store_path(out: Path) -> Path:
    """Where ``--val-fraction`` puts the held-out images' store: OUT-val beside OUT."""
    out = Path(os.path.abspath(out))
    return out.with_name(out.name + "-val")


def stale_twin(out: Path) -> Path | None:
    """OUT-val when it is the held-out store an earlier extraction into ``out`` wrote (its
    ``extra.split.other`` names ``out``); None otherwise (absent, or not that store's twin)."""
    twin = val_store_path(out)
    try:
        meta = read_json(twin / "metadata.json", "metadata") if (twin / "metadata.json").is_file() else None
    except UsaeError:
        return None
    split = ((meta.get("extra") or {}).get("split") if isinstance(meta, dict) else None) or {}
    same = isinstance(split, dict) and split.get("name") == "val" and split.get("other")
    return twin if same and os.path.abspath(str(split["other"])) == os.path.abspath(out) else None


def remove_stale_twin(out: Path) -> None:
    """Delete an earlier split's OUT-val once the new store (which holds none) is in place: its images
    are training rows now, so its numbers would be in-sample while called held out."""
    twin = stale_twin(out)
    if twin is None:
        return
    doomed = twin.with_name(f".{twin.name}.stale")  # renamed first: no reader sees a half-deleted store
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(twin, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
    log.warning("removed %s, the held-out store of an earlier split: this extraction holds out no image", twin)
