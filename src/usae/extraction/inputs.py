"""What `usae extract` reads from this disk, so that its --out can never delete it (issue 24, H2:
``--images OUT/imgs --out OUT --overwrite`` deleted the images): ``check_output``'s ``reading``."""

from __future__ import annotations

from pathlib import Path

from usae.config import ExtractConfig
from usae.extraction.images import folder_images, list_file_paths


def source_inputs(spec: str) -> tuple[Path, ...]:
    """The image files an --out may not be or contain (``check_output``'s ``reading``): replacing it
    would delete them. Writing a store inside the image folder, beside the images, stays allowed.

    One image per folder (an --out contains an image exactly when it is or contains its folder) of a
    folder source or a list file (and the list file itself); a local dataset directory. Hub datasets
    and the ``builtin:`` sets (inside installed packages) give none.
    """
    text = str(spec)
    if text.startswith("builtin:"):
        return ()
    if text.startswith("hf:"):
        local = Path(text[3:].partition(":")[0]).expanduser()
        return (local,) if local.is_dir() else ()
    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() == ".txt":
        listed, first = list_file_paths(path), (path,)
    elif path.is_dir() and not ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()):
        images = folder_images(path)
        listed, first = [images.path(j) for j in range(len(images))], ()
    else:
        return (path,)
    by_folder = {p.expanduser().absolute().parent: p for p in listed}
    return (*first, *by_folder.values())


def extraction_inputs(cfg: ExtractConfig) -> tuple[Path, ...]:
    """What extraction reads from this disk: the image source (``source_inputs``) and a label CSV."""
    labels = () if cfg.labels in (None, "folders", "hf") else (Path(cfg.labels).expanduser(),)
    return source_inputs(cfg.images) + labels
