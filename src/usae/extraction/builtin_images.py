"""The ``builtin:`` image sources: labelled images that installed packages ship, for offline runs.

* ``builtin:demo``: the colour photos inside scikit-image and scikit-learn, and Debian's
  ``tuxpaint-stamps-default`` photographic cut-outs (~560 images);
* ``builtin:openclipart``: Debian's ``openclipart-png`` clip art (public domain): of its 8,121
  files, content duplicates dropped and at most :data:`OPENCLIPART_CAP` per folder (3,296);
* ``builtin:large``: both (~3,860 images).

Each source is a :class:`Listing`: absolute paths and a description (``images.builtin_images``
makes it a ``FileImages``; this module knows files, not decoding) that records the folder roots
its labels are read under (``label_roots``: ``[root, depth]`` pairs; ``labels.folder_label``): a
tuxpaint stamp's label is its category/subcategory, a clip art's its top folder and subfolder
(``animals/mammals``; deeper folders, e.g. an icon theme, are cut to those two levels). Naming
scores each label with its parent, so both levels are named.

openclipart is skewed (computer icons 1,853, stars 1,378 of 8,121): each folder label keeps at most
``cap`` files, chosen by a hash of the file's path (deterministic, spread over its subfolders, and
stable when other folders change). A file whose header claims more than twice PIL's
decompression-bomb limit (3 in the package, 231–623 Mpx) is left out of the source, counted in one
log line; files between the limit and twice it decode reduced (``images.open_oriented``).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image

from usae.errors import UsaeError

log = logging.getLogger(__name__)

TUXPAINT_STAMPS = Path("/usr/share/tuxpaint/stamps")
OPENCLIPART = Path("/usr/share/openclipart/png")
OPENCLIPART_CAP = 100
"""At most this many clip-art files per folder label (top/subfolder): 3,906 of the 8,121 files."""
OPENCLIPART_DEPTH = 2  # labels: top folder and subfolder
BUILTIN_SOURCES = ("demo", "openclipart", "large")

# tuxpaint categories that are drawings or symbols rather than photographs
_TUXPAINT_SKIP = ("symbols", "cartoon")
_SKIMAGE_PHOTOS = (
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
    "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "logo.png",
)  # fmt: skip


def _demo_paths() -> list[Path]:
    paths: list[Path] = []
    try:
        import skimage

        skdir = Path(skimage.__file__).parent / "data"
        paths += [skdir / n for n in _SKIMAGE_PHOTOS if (skdir / n).is_file()]
    except ImportError:
        pass
    try:
        import sklearn

        paths += sorted((Path(sklearn.__file__).parent / "datasets" / "images").glob("*.jpg"))
    except ImportError:
        pass
    if TUXPAINT_STAMPS.is_dir():
        paths += sorted(
            p for p in TUXPAINT_STAMPS.rglob("*.png") if p.relative_to(TUXPAINT_STAMPS).parts[0] not in _TUXPAINT_SKIP
        )
    else:
        log.warning(
            "%s not found (Debian package tuxpaint-stamps-default); demo uses only packaged photos", TUXPAINT_STAMPS
        )
    return paths


class Listing(NamedTuple):
    """A built-in source's files, in order, and the description a store records (``extra.images``)."""

    paths: list[str]
    description: dict[str, Any]


def demo_listing() -> Listing:
    """The offline demo set: packaged colour photos plus tuxpaint's photographic stamps (if installed)."""
    paths = _demo_paths()
    if not paths:
        raise UsaeError("no demo images: install scikit-image, scikit-learn or tuxpaint-stamps-default")
    return _builtin("demo", paths, [(TUXPAINT_STAMPS, None)])


class Screened(NamedTuple):
    """A listing's files that PIL can open, and what was left out."""

    kept: list[Path]
    n_bombs: int
    """Files whose header claims more than twice ``Image.MAX_IMAGE_PIXELS`` (PIL refuses them)."""
    n_unreadable: int
    """Files whose header PIL cannot read."""


def screen(paths: Iterable[Path]) -> Screened:
    """Read each file's header only (PIL opens lazily: ~0.5 ms a file) and drop what cannot decode."""
    kept, n_bombs, n_unreadable = [], 0, 0
    with warnings.catch_warnings():
        # 1-2x the limit: decoded reduced later (open_oriented); the warning would repeat per file
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for p in paths:
            try:
                with Image.open(p):
                    pass
            except Image.DecompressionBombError:
                n_bombs += 1
                continue
            except (OSError, ValueError, SyntaxError):
                n_unreadable += 1
                continue
            kept.append(p)
    return Screened(kept, n_bombs, n_unreadable)


def folder_label_of(path: Path, root: Path, depth: int | None) -> str:
    """``path``'s folders below ``root``, the first ``depth`` of them (all when None); '' at the root."""
    parts = path.relative_to(root).parent.parts
    return "/".join(parts[:depth] if depth is not None else parts)


def _hash_key(path: Path, root: Path) -> bytes:
    return hashlib.blake2b(path.relative_to(root).as_posix().encode(), digest_size=8).digest()


def capped(paths: list[Path], root: Path, cap: int, depth: int | None = OPENCLIPART_DEPTH) -> list[Path]:
    """At most ``cap`` of ``paths`` per folder label, chosen by a hash of the relative path; sorted."""
    if cap < 1:
        raise UsaeError(f"per-folder cap must be >= 1, got {cap}")
    by_label: dict[str, list[Path]] = defaultdict(list)
    for p in paths:
        by_label[folder_label_of(p, root, depth)].append(p)
    out = [p for group in by_label.values() for p in sorted(group, key=lambda q: _hash_key(q, root))[:cap]]
    return sorted(out)


def unique_content(paths: list[Path]) -> list[Path]:
    """``paths`` (sorted) without files whose bytes equal an earlier one's (openclipart holds 905 such
    copies, e.g. an icon in two themes): a copy would otherwise sit in training and held-out at once."""
    seen: set[bytes] = set()
    out = []
    for p in sorted(paths):
        digest = hashlib.blake2b(p.read_bytes(), digest_size=16).digest()
        if digest not in seen:
            seen.add(digest)
            out.append(p)
    return out


def openclipart_paths(root: Path = OPENCLIPART, cap: int = OPENCLIPART_CAP) -> list[Path]:
    """The clip-art files of :func:`openclipart_images`, with one log line for those left out."""
    if not root.is_dir():
        raise UsaeError(
            f"{root} not found: install the Debian package openclipart-png (apt-get install openclipart-png)"
        )
    every = sorted(p for p in root.rglob("*.png") if p.is_file())
    unique = unique_content(every)
    screened = screen(unique)
    kept = capped(screened.kept, root, cap)
    if screened.n_bombs or screened.n_unreadable:
        log.warning(
            "openclipart: skipped %d files PIL will not decode (%d over %d Mpx, %d unreadable); "
            "files over %d Mpx decode reduced",
            screened.n_bombs + screened.n_unreadable, screened.n_bombs, 2 * _limit_mpx(), screened.n_unreadable,
            _limit_mpx(),
        )  # fmt: skip
    log.info(
        "openclipart: %d of %d files (%d content copies dropped, at most %d per folder)",
        len(kept), len(every), len(every) - len(unique), cap,
    )  # fmt: skip
    return kept


def _limit_mpx() -> int:
    return int((Image.MAX_IMAGE_PIXELS or 0) / 1e6)


def openclipart_listing(root: Path = OPENCLIPART, cap: int = OPENCLIPART_CAP) -> Listing:
    """Debian's openclipart-png clip art, labelled by top folder and subfolder, at most ``cap`` per folder."""
    return _builtin("openclipart", openclipart_paths(root, cap), [(root, OPENCLIPART_DEPTH)])


def large_listing(root: Path = OPENCLIPART, cap: int = OPENCLIPART_CAP) -> Listing:
    """The demo's photos and stamps followed by the capped clip art (``builtin:large``)."""
    paths = _demo_paths() + openclipart_paths(root, cap)
    return _builtin("large", paths, [(TUXPAINT_STAMPS, None), (root, OPENCLIPART_DEPTH)])


def _builtin(name: str, paths: list[Path], label_roots: list[tuple[Path, int | None]]) -> Listing:
    ids = [str(p) for p in paths]
    roots = [[str(r), d] for r, d in label_roots]
    return Listing(ids, {"kind": "builtin", "name": name, "paths": ids, "label_roots": roots})


def builtin_listing(name: str) -> Listing:
    """``builtin:NAME`` for NAME in :data:`BUILTIN_SOURCES`."""
    if name == "demo":
        return demo_listing()
    if name == "openclipart":
        return openclipart_listing()
    if name == "large":
        return large_listing()
    raise UsaeError(f"builtin:{name}: unknown built-in image source (known: {', '.join(BUILTIN_SOURCES)})")
