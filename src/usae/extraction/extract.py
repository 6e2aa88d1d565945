"""Run M frozen backbones over an image set and write a paired activation store.

Every batch of images goes through all M models before the next batch, so row r of every model is
the same token of the same image. Work is cut into *parts* of ``images_per_part`` images, written to
``OUT.parts/part-NNNNN/`` (temporary name, fsync, atomic rename); a rerun after a crash or kill -9
skips finished parts, and only when every part exists are they streamed, in image order, into the
store (which itself appears atomically). With torchrun each rank takes parts ``p ≡ rank (mod
world)``; rank 0 finalises. A part's content does not depend on who computed it, so the store equals
a single-process extraction.

Unreadable images are skipped with one warning each (and counted at the end); their ids are not in
the store.

With ``--tokens-per-image N`` (or a ``--max-rows`` budget) each image keeps N of its grid tokens,
drawn by ``subsample.token_positions`` from (seed, image id), the same for every model; the
models still run on the whole image and the kept rows are taken right after the forward pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from usae import distributed
from usae._io import (
    check_output,
    dir_lock,
    output_dir,
    publish_dir,
    read_json,
    save_npy,
    sibling_lock,
    write_json_atomic,
)
from usae.config import ExtractConfig, to_json_dict
from usae.data.store import StoreWriter
from usae.device import resolve_device
from usae.errors import UsaeError
from usae.extraction.backbones import Backbone, check_alias, check_spec, load_backbone
from usae.extraction.images import (
    BadImage,
    ImageSet,
    alpha_cropped,
    canonical_view,
    open_images,
)
from usae.extraction.inputs import extraction_inputs
from usae.extraction.labels import (  # noqa: F401  (val_store_path: extraction's public API)
    demo_descriptions,
    image_labels,
    remove_stale_twin,
    split_images,
    stale_twin,
    val_store_path,
)
from usae.extraction.subsample import RULE, kept_rows, positions_of, token_budget

log = logging.getLogger(__name__)

PARTS_SUFFIX = ".parts"
PLAN_NAME = "plan.json"
_FP16_MAX = float(np.finfo(np.float16).max)


def parts_dir_for(out: Path) -> Path:
    """Where extraction into ``out`` keeps its finished parts until the store is finalised."""
    out = Path(os.path.abspath(out))
    return out.with_name(out.name + PARTS_SUFFIX)


def select_images(n: int, max_images: int | None) -> list[int]:
    """Indices of the images to use: all, or ``max_images`` spread evenly over the sorted source."""
    if max_images is None or max_images >= n:
        return list(range(n))
    if max_images < 1:
        raise UsaeError(f"max_images must be >= 1, got {max_images}")
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, max_images)})


def common_grid(backbones: list[Backbone], side: int | None) -> tuple[int, int]:
    """The store's token grid: ``side``×``side`` if given, else the smallest native grid (per axis)."""
    if side is not None:
        if side < 1:
            raise UsaeError(f"grid must be >= 1, got {side}")
        return side, side
    return min(b.native_grid[0] for b in backbones), min(b.native_grid[1] for b in backbones)


def _plan(
    cfg: ExtractConfig, images: ImageSet, chosen: list[int], backbones: list[Backbone], grid, view, keep: int | None
) -> dict:
    ids_hash = hashlib.sha256("\n".join(images.ids[j] for j in chosen).encode()).hexdigest()
    # only a subsampled plan names its draw, so a work directory from before subsampling still resumes
    sampling = {} if keep is None else {"tokens_per_image": keep, "token_seed": cfg.token_seed}
    return sampling | {
        "format": "usae-extract-plan",
        "models": [b.describe() for b in backbones],
        "grid": list(grid),
        "view_size": view,
        "dtype": cfg.dtype,
        "random_init": cfg.random_init,
        "images_per_part": cfg.images_per_part,
        "batch_size": cfg.batch_size,
        "n_images": len(chosen),
        "image_ids_sha256": ids_hash,
        "images": images.describe(),
        "labels": cfg.labels,
        "val_fraction": cfg.val_fraction,
        "val_seed": cfg.val_seed,
    }


def _prepare_parts_dir(parts_dir: Path, plan: dict) -> None:
    """Create the parts directory with its plan, or check that a leftover one is the same job."""
    plan_path = parts_dir / PLAN_NAME
    if plan_path.is_file() and not _any_finished_part(parts_dir):
        # nothing to resume: a plan that never wrote a part does not hold back another command
        if read_json(plan_path, "extraction plan") != plan:
            log.info("%s: replacing the plan of an earlier extraction that finished no part", parts_dir)
        write_json_atomic(plan_path, plan)
        return
    if plan_path.is_file():
        old = read_json(plan_path, "extraction plan")
        if old != plan:
            diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
            raise UsaeError(
                f"{parts_dir}: an unfinished extraction with different settings ({', '.join(diff)}) is here; "
                "rerun it with the same arguments to resume, or delete that directory to start over"
            )
        log.info("resuming extraction from %s", parts_dir)
        return
    parts_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(plan_path, plan)


def _part_name(p: int) -> str:
    return f"part-{p:05d}"


def _empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _any_finished_part(parts_dir: Path) -> bool:
    return any(p.name.startswith("part-") and p.suffix != ".tmp" and p.is_dir() for p in parts_dir.iterdir())


def load_view(images: ImageSet, j: int, size: int) -> tuple[int, np.ndarray | None, str]:
    try:
        return j, canonical_view(images.load(j), size), ""
    except BadImage as e:
        return j, None, str(e)


def forward_views(
    backbones: list[Backbone], views: list[np.ndarray], grid, device: torch.device
) -> dict[str, np.ndarray]:
    """All models on one batch of canonical views -> {name: (b·t, d) float32 array}."""
    pixels = torch.from_numpy(np.stack(views)).to(device, non_blocking=True).permute(0, 3, 1, 2).float() / 255.0
    out = {}
    for bb in backbones:
        tokens_btd = bb.tokens(pixels, grid)
        out[bb.name] = tokens_btd.reshape(-1, tokens_btd.shape[-1]).float().cpu().numpy()
    return out


def check_values(x: np.ndarray, name: str, ids: list[str], t: int, dtype: str) -> None:
    """Refuse NaN/inf (and float16 overflow) in ``x``, rows of ``t`` per image, naming the image."""
    nonfinite_rows = ~np.isfinite(x).all(axis=1)
    bad_rows = nonfinite_rows | (np.abs(x) > _FP16_MAX).any(axis=1) if dtype == "float16" else nonfinite_rows
    if bad_rows.any():
        first = ids[int(np.argmax(bad_rows)) // t]
        what = "NaN/inf" if nonfinite_rows.any() else "values beyond float16 range (use --dtype float32)"
        raise UsaeError(f"model {name}: {what} in its activations of image {first}")


def _write_part(parts_dir: Path, p: int, arrays: dict[str, list[np.ndarray]], kept: list[int], skipped, dtype) -> None:
    tmp = parts_dir / (_part_name(p) + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, chunks in arrays.items():
        path = tmp / f"{name}.npy"
        save_npy(path, np.concatenate(chunks).astype(dtype))
    write_json_atomic(tmp / "ids.json", {"kept": kept, "skipped": skipped})
    publish_dir(tmp, parts_dir / _part_name(p))


def _run_part(ctx: dict, p: int, indices: list[int], pool: ThreadPoolExecutor, bar: tqdm) -> None:
    backbones, grid, images, cfg = ctx["backbones"], ctx["grid"], ctx["images"], ctx["cfg"]
    arrays: dict[str, list[np.ndarray]] = {b.name: [] for b in backbones}
    kept: list[int] = []
    skipped: list[list[Any]] = []
    batch_idx: list[int] = []
    batch_views: list[np.ndarray] = []
    t, keep = grid[0] * grid[1], ctx["keep"]

    def flush() -> None:
        with torch.inference_mode():
            out = forward_views(backbones, batch_views, grid, ctx["device"])
        ids = [images.ids[j] for j in batch_idx]
        if keep is not None:  # the same rows of every model: the draw depends on the image only
            rows = kept_rows(positions_of(ids, cfg.token_seed, t, keep), t)
            out = {name: x[rows] for name, x in out.items()}
        for name, x in out.items():
            check_values(x, name, ids, keep or t, cfg.dtype)
            arrays[name].append(x)
        kept.extend(batch_idx)
        bar.update(len(batch_idx))
        batch_idx.clear()
        batch_views.clear()

    for j, view, reason in pool.map(lambda j: load_view(images, j, ctx["view"]), indices):
        if view is None:
            log.warning("skipping unreadable image %s", reason)
            skipped.append([j, reason])
            bar.update(1)
            continue
        batch_idx.append(j)
        batch_views.append(view)
        if len(batch_idx) == cfg.batch_size:
            flush()
    if batch_idx:
        flush()
    if not kept:  # every image of the part was unreadable: keep empty arrays of the right width
        for b in backbones:
            arrays[b.name].append(np.zeros((0, b.width), np.float32))
    _write_part(ctx["parts_dir"], p, arrays, kept, skipped, cfg.dtype)


def _finalize(ctx: dict, n_parts: int) -> Path:
    """Stream every part, in image order, into the store (and the held-out store); then remove the parts."""
    cfg, backbones, grid, images, parts_dir = ctx["cfg"], ctx["backbones"], ctx["grid"], ctx["images"], ctx["parts_dir"]
    kept: list[int] = []
    skipped: list[list[Any]] = []
    for p in range(n_parts):
        ids = read_json(parts_dir / _part_name(p) / "ids.json", "extraction part")
        kept += ids["kept"]
        skipped += ids["skipped"]
    if not kept:
        raise UsaeError(f"no readable images among the {len(skipped)} selected from {cfg.images}")
    labels, descriptions = ctx["labels"], demo_descriptions(images)
    held = split_images([labels[j] for j in kept] if labels else None, len(kept), cfg.val_fraction, cfg.val_seed)
    if cfg.val_fraction > 0 and not held.any():
        log.warning(
            "--val-fraction %g holds out 0 of %d images: there is no held-out store, so every number is in-sample; "
            "raise --val-fraction to hold out at least one image", cfg.val_fraction, len(kept),
        )  # fmt: skip
    outs = {"train": ctx["out"]} | ({"val": val_store_path(ctx["out"])} if held.any() else {})
    t, keep = grid[0] * grid[1], ctx["keep"]
    writers = {}
    for split, out in outs.items():
        members = [j for j, h in zip(kept, held, strict=True) if h == (split == "val")]
        extra = {
            "images": images.describe(),
            "backbones": [b.describe() for b in backbones],
            "view_size": ctx["view"],
            "alignment": "centred square view; bilinear antialiased resampling of each feature map to the grid",
            "extract": to_json_dict(cfg),
            "skipped_images": [images.ids[j] for j, _ in skipped],
        }
        if keep is not None:
            extra["token_sampling"] = {"tokens_per_image": keep, "grid_tokens": t, "seed": cfg.token_seed, "rule": RULE}
        if labels is not None:
            extra["labels"] = {"source": cfg.labels, "per_image": [labels[j] for j in members]}
        if descriptions is not None:
            extra["descriptions"] = [descriptions[j] for j in members]
        if len(outs) > 1:
            other = outs["val" if split == "train" else "train"]
            extra["split"] = {
                "name": split,
                "val_fraction": cfg.val_fraction,
                "seed": cfg.val_seed,
                "other": str(other),
            }
        writers[split] = StoreWriter(
            out,
            {b.name: b.width for b in backbones},
            dtype=cfg.dtype,
            image_ids=[images.ids[j] for j in members],
            tokens_per_image=keep or t,
            grid=grid,
            extra=extra,
            overwrite=cfg.overwrite or _empty_dir(out),  # an empty directory made for the store is no store
            positions=None if keep is None else positions_of([images.ids[j] for j in members], cfg.token_seed, t, keep),
        )
    split_of = dict(zip(kept, held, strict=True))
    for p in tqdm(range(n_parts), desc="finalise store", unit="part", disable=n_parts < 4 or not cfg.progress):
        part_dir = parts_dir / _part_name(p)
        part_kept = read_json(part_dir / "ids.json", "extraction part")["kept"]
        if not part_kept:
            continue
        arrays = {b.name: np.load(part_dir / f"{b.name}.npy", mmap_mode="r", allow_pickle=False) for b in backbones}
        rows_val = np.repeat(np.array([split_of[j] for j in part_kept]), keep or t)  # an image's rows are consecutive
        for split, writer in writers.items():
            mask = rows_val if split == "val" else ~rows_val
            if mask.any():
                writer.append({name: a[mask] for name, a in arrays.items()} if not mask.all() else arrays)
    paths = {split: writer.finalize() for split, writer in writers.items()}
    if "val" not in paths:
        remove_stale_twin(ctx["out"])
    shutil.rmtree(parts_dir)
    if skipped:
        log.warning("skipped %d unreadable image(s) of %d", len(skipped), len(skipped) + len(kept))
    if "val" in paths:
        log.info("held out %d of %d images into %s", int(held.sum()), len(kept), paths["val"])
    return paths["train"]


def check_model_names(specs: tuple[str, ...], backbones: list[Backbone] | None = None) -> list[str]:
    """Every model's name (of ``backbones`` when given, else of the specs), checked (safe as a file
    name, unique ignoring case) before anything loads."""
    if backbones is None:
        names = [check_spec(spec)[1] for spec in specs]
    else:
        names = [check_alias(b.name, b.spec) for b in backbones]
    if not names:
        raise UsaeError("no models given (--models SPEC ...)")
    if len({n.lower() for n in names}) != len(names):
        raise UsaeError(f"two models share a name ({', '.join(names)}); give aliases: NAME=SPEC")
    return names


def _check_outputs(cfg: ExtractConfig) -> Path:
    """Refuse, before anything is loaded or written, an --out (or its OUT-val twin) that would clobber
    a store, a foreign directory or an input (the images, their list, the label CSV)."""
    reading = extraction_inputs(cfg)
    out = check_output(cfg.out, "usae-store", overwrite=cfg.overwrite, reading=reading, replaces=True)
    twin = val_store_path(out)
    if cfg.val_fraction > 0 or stale_twin(out) is not None:  # a twin left by an earlier split is replaced too
        flag = f"--out {cfg.out}: its held-out store"
        check_output(twin, "usae-store", overwrite=cfg.overwrite, reading=reading, replaces=True, flag=flag)
    parts = parts_dir_for(out)
    foreign = (parts.exists() or parts.is_symlink()) and not (parts / PLAN_NAME).is_file()
    if foreign and (not parts.is_dir() or any(parts.iterdir())):
        raise UsaeError(f"{parts}: is in the way of the extraction's work directory (it holds no {PLAN_NAME})")
    return out


def extract(cfg: ExtractConfig, backbones: list[Backbone] | None = None) -> Path:
    """Extract ``cfg.models`` on ``cfg.images`` into the store ``cfg.out``; resumable; torchrun-aware.

    ``backbones`` (Python only) replaces ``cfg.models`` with ready :class:`Backbone` objects, e.g. a
    ``TorchBackbone`` around your own module and layer. Model names and the output paths are
    checked before any model is loaded or any file written; a failed run leaves no empty directory
    (only ``OUT.parts/`` once a part is finished, for the rerun to resume from).
    """
    check_model_names(cfg.models, backbones)
    out = _check_outputs(cfg)
    world, device = distributed.init(resolve_device(cfg.device))
    parts_dir = parts_dir_for(out)
    # One extraction per store: rank 0 holds the store's lock (the writer re-enters it) until it is published.
    lock = dir_lock(sibling_lock(out), f"store {out}") if world.is_main else contextlib.nullcontext()
    with output_dir(out.parent), lock:
        try:
            return _extract(cfg, out, backbones, world, device)
        except BaseException:
            # nothing finished: the work directory holds only a plan, nothing to resume; leave no trace
            if world.is_main and parts_dir.is_dir() and not _any_finished_part(parts_dir):
                shutil.rmtree(parts_dir, ignore_errors=True)
            raise


def _extract(
    cfg: ExtractConfig, out: Path, backbones: list[Backbone] | None, world: distributed.World, device: torch.device
) -> Path:
    images = open_images(cfg.images, cfg.split, cfg.column)
    images = alpha_cropped(images) if cfg.alpha_crop else images
    chosen = select_images(len(images), cfg.max_images)
    if backbones is None:
        backbones = [load_backbone(spec, pretrained=not cfg.random_init, device=device) for spec in cfg.models]
    else:
        backbones = [b.to(device).probe() for b in backbones]
    grid = common_grid(backbones, cfg.grid)
    chosen, keep = token_budget(chosen, grid[0] * grid[1], cfg.tokens_per_image, cfg.max_rows)
    view = cfg.view_size or max(b.input_size for b in backbones)
    # every input is read and checked before the work directory exists (a bad label CSV used to fail
    # only once every image was extracted, and its plan then refused the corrected command)
    labels = image_labels(images, cfg.labels, cfg.label_column) if cfg.labels else None
    parts_dir = parts_dir_for(out)
    if world.is_main:
        _prepare_parts_dir(parts_dir, _plan(cfg, images, chosen, backbones, grid, view, keep))
    distributed.barrier(world)

    per = cfg.images_per_part
    n_parts = math.ceil(len(chosen) / per)
    todo = [p for p in range(n_parts) if p % world.size == world.rank and not (parts_dir / _part_name(p)).is_dir()]
    n_todo = sum(len(chosen[p * per : (p + 1) * per]) for p in todo)
    ctx = dict(cfg=cfg, out=out, backbones=backbones, grid=grid, view=view, images=images, device=device)
    ctx |= dict(parts_dir=parts_dir, keep=keep, labels=labels)
    log.info(
        "extracting %d images × %d models (%s) on a %dx%d grid%s; %d of %d parts to do",
        len(chosen), len(backbones), ", ".join(f"{b.name} d={b.width}" for b in backbones), *grid,
        "" if keep is None else f", {keep} tokens per image", len(todo), n_parts,
    )  # fmt: skip
    start = time.perf_counter()
    bar = tqdm(total=n_todo, desc="extract", unit="img", disable=not (cfg.progress and world.is_main))
    with ThreadPoolExecutor(cfg.decode_threads) as pool:
        for p in todo:
            _run_part(ctx, p, chosen[p * per : (p + 1) * per], pool, bar)
    bar.close()
    elapsed = time.perf_counter() - start
    if n_todo:
        log.info("extracted %d images in %.1f s (%.1f images/s)", n_todo, elapsed, n_todo / max(elapsed, 1e-9))
    distributed.barrier(world)
    if world.is_main:
        _finalize(ctx, n_parts)
    distributed.barrier(world)
    return out


def extract_command(cfg: ExtractConfig) -> str:
    """``usae extract``: what the command prints."""
    return f"store: {extract(cfg)}"
