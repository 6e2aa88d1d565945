"""What the dictionary costs each model: task fidelity when a reconstruction is spliced back in.

For every model j whose backbone can run "the rest of the network" from its extracted layer
(``Backbone.task`` is ``"classifier"`` or ``"dense"``; see ``extraction/backbones/base.py``) and every
source model i, j's layer output is replaced by the universal SAE's reconstruction
``D_j(E_i(x_i))`` (raw units) and j's task output is compared with the unmodified one:

* the tokens x_i are model i's on the store's common grid (H, W), recomputed from the store's own
  images; the reconstruction (b, H·W, d_j) is laid back on the grid and resampled to j's native
  (h, w) map (bilinear, ``align_corners=False``; antialiased only when shrinking), then put where
  the layer output was. Prefix tokens (CLS, registers) and everything not stored come from the
  clean forward pass;
* **classifiers** (output: logits over classes): ``agreement``, the fraction of images whose top-1
  class is the clean one; ``kl``, the mean KL(clean ‖ spliced) of the softmax distributions (nats);
  ``ce_top1``, the mean cross-entropy of the spliced logits against the clean top-1 class;
* **dense heads** (output: a map): ``correlation``, the Pearson correlation of the spliced map with
  the clean one, each image's map flattened (a constant map scores 0), averaged over images; ``mse``,
  the mean squared difference;
* ``loss_recovered`` = (L_floor − L_spliced) / (L_floor − L_clean), where the floor is mean
  ablation. L is the cross-entropy of the output against the clean model's predicted distribution
  for classifiers — L − L_clean is then the KL above, so loss recovered = 1 − KL / KL_floor — and the
  MSE to the clean map for dense heads (L_clean = 0). 1: as good as the clean model; 0: no better
  than the dataset mean; negative: worse. Undefined (null) when the floor equals the clean output.

Controls, per destination j, in the same units: ``mean_ablation`` (the layer replaced by the store's
per-channel mean, every native position: the floor), ``zero_ablation``, ``resample_only`` (clean
native map -> store grid -> back to native: the ceiling any reconstruction on the store grid is
measured against) and ``independent_sae`` (a one-model SAE of j, from RUN/baselines/<j>/ when there).

Before anything is measured every image is reopened from the store's image source and checked: a
missing image, or one whose recomputed tokens differ from the stored rows by more than 1% (relative
Frobenius norm per image and model; float16 storage rounds to < 0.1%), is a one-line UsaeError
naming the first such image.

``splice(run, store)`` returns a JSON-ready dict; ``write_splice(result, out)`` writes
``splice.json`` and the figure ``splice.png``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor
from tqdm.auto import tqdm

from usae._io import check_output, one_line, save_figure, write_json_atomic
from usae.data.store import Store, open_store
from usae.device import resolve_device
from usae.errors import UsaeError
from usae.evaluation.fidelity.measures import (
    CONTROLS,
    MATRICES,
    SPLICE_JSON,
    SpliceSums,
    finite_or_none,
    splice_cell,
    task_measures,
    tokens_to_native,
)
from usae.extraction.backbones import Backbone, align, load_backbone, parse_spec
from usae.extraction.images import BadImage, ImageSet, canonical_view, image_by_id, open_images, reopen
from usae.model.sae import UniversalSAE
from usae.run import BASELINES_DIR, MODEL_NAME, load

log = logging.getLogger(__name__)

SPLICE_VERSION = 1
SPLICE_PNG = "splice.png"
CHANGED_TOLERANCE = 1e-2
"""An image whose recomputed tokens differ from the stored rows by more than this (relative
Frobenius norm) has changed since extraction."""
"""The measure whose ratio to the mean-ablation floor gives loss_recovered (L - L_clean)."""


# -- inputs: run, store, images, backbones, independent SAEs --------------------------------------
def _open(run: str | Path | UniversalSAE, store: str | Path | Store, device: torch.device) -> tuple:
    sae = run if isinstance(run, UniversalSAE) else load(run, device=device)
    store = store if isinstance(store, Store) else open_store(store)
    missing = [n for n in sae.model_names if store.widths.get(n) != sae.cfg.widths[n]]
    if missing:
        raise UsaeError(f"store {store.path} lacks the run's models {missing} at the run's widths")
    where = store.path / "metadata.json"
    if store.tokens_per_image is None or store.grid is None or store.image_ids is None:
        raise UsaeError(
            f"{where}: no image layout (image_ids, tokens_per_image, grid); make the store with `usae extract`"
        )
    return sae.to(device).eval(), store


def store_backbones(
    store: Store, names: list[str], device: torch.device, given: Mapping[str, Backbone] | None = None
) -> dict[str, Backbone]:
    """Each model's backbone: ``given[name]``, else rebuilt from the store's ``extra.backbones`` spec."""
    where = store.path / "metadata.json"
    random_init = bool(store.extra.get("extract", {}).get("random_init", False))  # as extracted
    recorded = {b.get("name"): b for b in store.extra.get("backbones", []) if isinstance(b, dict)}
    out = {}
    for name in names:
        if given is not None and name in given:
            backbone = given[name].to(device)
            if backbone.width == 0:
                backbone.probe()
        else:
            spec = recorded.get(name, {}).get("spec")
            if not spec:
                raise UsaeError(f"{where}: field 'extra.backbones' has no spec for model {name!r}")
            if parse_spec(spec)[1] == "torch":
                raise UsaeError(
                    f"model {name!r} was extracted with a backbone built in Python ({spec}); pass it: backbones=[...]"
                )
            backbone = load_backbone(spec, pretrained=not random_init, device=device)
        if backbone.width != store.widths[name]:
            raise UsaeError(f"model {name!r}: backbone width {backbone.width} != store width {store.widths[name]}")
        out[name] = backbone.eval()
    return out


def independent_saes(
    source: str | Path | Mapping[str, UniversalSAE | str | Path] | None, names: list[str], device: torch.device
) -> dict[str, UniversalSAE]:
    """One-model SAEs by model name: from a mapping, or from ``source/<model>/`` where present."""
    if source is None:
        return {}
    out = {}
    for name in names:
        if isinstance(source, Mapping):
            item = source.get(name)
        else:
            item = Path(source) / name
            item = item if (item / MODEL_NAME).is_file() else None
        if item is None:
            continue
        base = item if isinstance(item, UniversalSAE) else load(item, device=device)
        if name not in base.model_names:
            raise UsaeError(f"independent SAE for {name!r} ({item}) has models {base.model_names}, not {name!r}")
        out[name] = base.to(device).eval()
    return out


def _image_source(store: Store, images: str | Path | Sequence[str | Path] | ImageSet | None) -> ImageSet:
    if isinstance(images, ImageSet):
        return images
    if images is not None:
        return open_images(images)
    desc = store.extra.get("images")
    if not isinstance(desc, dict):
        raise UsaeError(f"{store.path / 'metadata.json'}: field 'extra.images' (the image source) is missing")
    return reopen(desc)


def _view(images: ImageSet, image_id: str, j: int, size: int, store: Store) -> np.ndarray:
    try:
        return canonical_view(image_by_id(images, image_id), size)
    except (BadImage, UsaeError, OSError) as e:
        raise UsaeError(f"image {image_id!r} (image {j} of store {store.path}) cannot be read: {one_line(e)}") from None


def _check_unchanged(store: Store, tokens: dict[str, Tensor], idx: list[int]) -> None:
    """Recomputed tokens must match the stored rows of each image (else the image or backbone changed)."""
    t = store.tokens_per_image
    for k, j in enumerate(idx):
        for name, x_btd in tokens.items():
            stored_td = torch.from_numpy(store.rows(name, j * t, (j + 1) * t))
            got_td = x_btd[k].detach().float().cpu()
            rel = float((got_td - stored_td).norm() / stored_td.norm().clamp_min(1e-12))
            if not rel <= CHANGED_TOLERANCE:
                raise UsaeError(
                    f"image {store.image_ids[j]!r} (image {j} of store {store.path}) changed since extraction: "
                    f"model {name}'s recomputed tokens differ from the store's by {rel:.1%} "
                    f"(tolerance {CHANGED_TOLERANCE:.0%}; or its backbone is not the one that extracted the store)"
                )


def _reconstruct(sae: UniversalSAE, src: str, dst: str, x_btd: Tensor) -> Tensor:
    """D_dst(E_src(x)) in raw units, (b, t, d_dst) float32."""
    b, t, d = x_btd.shape
    p = next(sae.parameters())
    x_rd = x_btd.reshape(b * t, d).to(dtype=p.dtype, device=p.device)
    return sae.decode(dst, sae.encode_sparse(src, x_rd)).float().view(b, t, -1)


def _substitutes(
    ctx: tuple, j: str, tokens: dict[str, Tensor], fmap_bdhw: Tensor, mean_d: Tensor
) -> Iterator[tuple[str, Tensor]]:
    """(key, native map) for destination j: each source's reconstruction, then the controls (lazily)."""
    sae, independent, names, grid, native = ctx
    for i in names:
        yield i, tokens_to_native(_reconstruct(sae, i, j, tokens[i]), grid, native)
    yield "mean_ablation", mean_d.to(fmap_bdhw.dtype).view(1, -1, 1, 1).expand_as(fmap_bdhw)
    yield "zero_ablation", torch.zeros_like(fmap_bdhw)
    yield "resample_only", tokens_to_native(tokens[j], grid, native)
    if independent is not None:
        yield "independent_sae", tokens_to_native(_reconstruct(independent, j, j, tokens[j]), grid, native)


# -- the driver ------------------------------------------------------------------------------------
def splice(
    run: str | Path | UniversalSAE,
    store: str | Path | Store,
    *,
    images: str | Path | Sequence[str | Path] | ImageSet | None = None,
    batch_images: int = 16,
    max_images: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    backbones: Mapping[str, Backbone] | Sequence[Backbone] | None = None,
    baselines: str | Path | Mapping[str, UniversalSAE | str | Path] | None = None,
) -> dict[str, Any]:
    """Splice every model's reconstruction (from every source) back into it; return the JSON-ready result.

    ``run``: run directory (or a UniversalSAE). ``store``: the store made by ``usae extract`` (its
    images, token grid and backbone specs). ``images``: another source for the same image ids (a
    folder, a list file, ``hf:NAME``; default: the store's ``extra.images``). ``max_images``: that many
    of the store's images, spread evenly. ``backbones``: ready backbones by model name (needed for
    ones built in Python; others are rebuilt from their specs). ``baselines``: independent SAEs, a
    directory with ``<model>/`` run dirs or a mapping; default RUN/baselines/ when ``run`` is a path.
    """
    if batch_images < 1:
        raise UsaeError(f"splice: batch_images must be >= 1, got {batch_images}")
    if max_images is not None and max_images < 1:
        raise UsaeError(f"splice: max_images must be >= 1, got {max_images}")
    dev = resolve_device(device)
    sae, store = _open(run, store, dev)
    names = sae.model_names
    if backbones is not None and not isinstance(backbones, Mapping):
        backbones = {b.name: b for b in backbones}
    models = store_backbones(store, names, dev, backbones)
    if baselines is None and not isinstance(run, UniversalSAE):
        baselines = Path(run) / BASELINES_DIR
    indep = independent_saes(baselines, names, dev)
    grid = tuple(store.grid)

    reasons = {n: models[n].splice_check() for n in names}
    avail = [n for n in names if reasons[n] is None]
    for n in names:
        if reasons[n] is not None:
            log.warning("%s", reasons[n])
    tasks = {n: models[n].task if reasons[n] is None else None for n in names}

    n_all = len(store.image_ids)
    chosen = list(range(n_all))
    if max_images is not None and max_images < n_all:
        chosen = sorted({int(round(i)) for i in np.linspace(0, n_all - 1, max_images)})
    if not avail:
        log.warning("no model of %s can splice: nothing to measure", names)
        chosen = []
    image_set = _image_source(store, images) if chosen else None
    view = int(store.extra.get("view_size") or max(b.input_size for b in models.values()))
    mean_d = {n: torch.from_numpy(store.stats(n).mean).to(dev) for n in avail}
    cells = {(key, j): SpliceSums() for j in avail for key in [*names, *CONTROLS]}
    clean_sums = {j: SpliceSums() for j in avail}
    native: dict[str, tuple[int, int]] = {n: tuple(models[n].native_grid) for n in names}

    bar = tqdm(total=len(chosen), desc="splice", unit="img", disable=not progress or None)
    for start in range(0, len(chosen), batch_images):
        idx = chosen[start : start + batch_images]
        views = [_view(image_set, store.image_ids[j], j, view, store) for j in idx]
        pixels = torch.from_numpy(np.stack(views)).to(dev).permute(0, 3, 1, 2).float() / 255.0
        with torch.inference_mode():
            fmaps, outs, tokens = {}, {}, {}
            for n in names:
                if n in avail:
                    seen: list[Tensor] = []
                    outs[n] = models[n].splice_forward(pixels, lambda f, seen=seen: seen.append(f.clone()) or f)
                    fmaps[n] = seen[0]
                else:
                    fmaps[n] = models[n](pixels)
                tokens[n] = align(fmaps[n], grid).float()
            _check_unchanged(store, tokens, idx)
            for j in avail:
                native[j] = tuple(fmaps[j].shape[-2:])
                clean_sums[j].add(task_measures(tasks[j], outs[j], outs[j]))
                ctx = (sae, indep.get(j), names, grid, native[j])
                for key, new_bdhw in _substitutes(ctx, j, tokens, fmaps[j], mean_d[j]):
                    new_bdhw = new_bdhw.clone(
                        memory_format=torch.contiguous_format
                    )  # downstream ops may write in place
                    out = models[j].splice_forward(pixels, lambda f, new=new_bdhw: new.to(f.dtype))
                    cells[(key, j)].add(task_measures(tasks[j], outs[j], out))
        bar.update(len(idx))
    bar.close()
    return _result(store, names, avail, reasons, tasks, native, cells, clean_sums, indep, len(chosen), run)


def _result(store, names, avail, reasons, tasks, native, cells, clean_sums, indep, n_images, run) -> dict[str, Any]:
    matrices: dict[str, list[list[float | None]]] = {k: [] for k in MATRICES}
    for i in names:
        rows = {k: [] for k in MATRICES}
        for j in names:
            cell = splice_cell(tasks[j], cells[(i, j)], cells[("mean_ablation", j)]) if j in avail and n_images else {}
            for k in MATRICES:
                rows[k].append(cell.get(k))
        for k in MATRICES:
            matrices[k].append(rows[k])
    controls = {}
    for j in avail:
        if not n_images:
            continue
        floor = cells[("mean_ablation", j)]
        controls[j] = {c: splice_cell(tasks[j], cells[(c, j)], floor) for c in CONTROLS if cells[(c, j)].n}
    return {
        "splice_version": SPLICE_VERSION,
        "run": None if isinstance(run, UniversalSAE) else str(run),
        "store": str(store.path),
        "models": list(names),
        "n_images": int(n_images),
        "grid": list(store.grid),
        "native_grid": {n: list(native[n]) for n in names},
        "available": {n: n in avail for n in names},
        "unavailable_reasons": {n: reasons[n] for n in names if reasons[n] is not None},
        "task": {n: tasks[n] for n in names},
        "independent_sae": {n: n in indep for n in names},
        "matrices": matrices,
        "controls": controls,
        "clean": {j: {k: finite_or_none(v) for k, v in clean_sums[j].means().items()} for j in avail if n_images},
        "definitions": {
            "matrices": "[source i][destination j]; null where j cannot splice or the measure is not j's task's",
            "agreement": "classifiers: fraction of images whose spliced top-1 class is the clean one",
            "kl": "classifiers: mean KL(clean || spliced) of the softmax distributions, nats",
            "ce_top1": "classifiers: mean cross-entropy of the spliced logits against the clean top-1 class",
            "correlation": "dense: mean over images of the Pearson r of the flattened spliced and clean maps",
            "mse": "dense: mean squared difference of the spliced and clean maps",
            "loss_recovered": "1 - D/D_floor with D = kl (classifiers) or mse (dense), floor = mean ablation",
            "clean": "each measure of the clean output against itself (ce_top1: the clean model's own loss)",
        },
    }


# -- output ------------------------------------------------------------------------------------------
def _headline(result: dict[str, Any], j: str) -> str:
    return "agreement" if result["task"].get(j) == "classifier" else "correlation"


def figure_splice(result: dict[str, Any]) -> Figure:
    """Two heatmaps: task fidelity (agreement for classifiers, correlation for dense heads) and loss
    recovered; rows are the sources then the controls, columns the destinations (grey: unavailable)."""
    names = result["models"]
    row_labels = [f"from {n}" for n in names] + [c.replace("_", " ") for c in CONTROLS]
    m = len(names)
    panels = (("fidelity", "task fidelity (agreement / correlation)"), ("loss_recovered", "loss recovered"))
    fig = Figure(figsize=(2.2 + 1.6 * m * len(panels), 1.6 + 0.45 * len(row_labels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, title) in zip(axes, panels, strict=True):
        v_rm = np.full((len(row_labels), m), np.nan)
        for c, j in enumerate(names):
            k = _headline(result, j) if key == "fidelity" else key
            for r in range(m):
                v = result["matrices"][k][r][c]
                v_rm[r, c] = np.nan if v is None else v
            for r, control in enumerate(CONTROLS, start=m):
                v = result["controls"].get(j, {}).get(control, {}).get(k)
                v_rm[r, c] = np.nan if v is None else v
        ax.set_facecolor("0.85")
        image = ax.imshow(np.ma.masked_invalid(v_rm), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for (r, c), v in np.ndenumerate(v_rm):
            text = "n/a" if np.isnan(v) else f"{v:.2f}"
            ax.text(c, r, text, ha="center", va="center", color="black" if np.isnan(v) or v >= 0.6 else "white")
        ax.axhline(m - 0.5, color="white", linewidth=3)
        labels = [f"{j}\n({result['task'].get(j) or 'unavailable'})" for j in names]
        ax.set_xticks(range(m), labels)
        ax.set_yticks(range(len(row_labels)), row_labels)
        ax.set(xlabel="spliced into (destination)", title=title)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(f"Splicing reconstructions back into each model ({result['n_images']} images)")
    return fig


def write_splice(result: dict[str, Any], out_dir: str | Path) -> Path:
    """Write OUT_DIR/splice.json (atomically) and OUT_DIR/splice.png; return the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / SPLICE_JSON
    write_json_atomic(path, result)
    save_figure(figure_splice(result), out / SPLICE_PNG)
    log.info("wrote %s and %s", path, out / SPLICE_PNG)
    return path


def splice_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(column titles, rows): one row per source model then per control, one column per destination
    model; each cell "<headline measure> / <loss recovered>" ("–" where the destination cannot splice)."""
    models, m = result["models"], result["matrices"]
    titles = [f"{j} ({_headline(result, j)} / loss rec.)" for j in models]
    rows = []
    for r, i in enumerate(models):
        rows.append([i] + [
            f"{_fmt(m[_headline(result, j)][r][c])} / {_fmt(m['loss_recovered'][r][c])}" if result["available"][j] else "–"
            for c, j in enumerate(models)
        ])  # fmt: skip
    for name in CONTROLS:
        cells = []
        for j in models:
            ctl = result["controls"].get(j, {}).get(name)
            cells.append(f"{_fmt(ctl.get(_headline(result, j)))} / {_fmt(ctl.get('loss_recovered'))}" if ctl else "–")
        if any(c != "–" for c in cells):
            rows.append([name.replace("_", " ")] + cells)
    return titles, rows


def format_splice(result: dict[str, Any]) -> str:
    """A text table: each destination's task measure / loss recovered from each source code and the controls."""
    titles, rows = splice_table(result)
    width = [max(len(r[c]) for r in [["source \\ spliced into", *titles], *rows]) for c in range(len(titles) + 1)]
    lines = [f"task fidelity, reconstructions spliced back into each model ({result['n_images']} images):"]
    for row in [["source \\ spliced into", *titles], *rows]:
        lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, width, strict=True)))
    lines += [f"  {j}: {why}" for j, why in result["unavailable_reasons"].items()]
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def splice_cli(cfg: Any) -> tuple[dict[str, Any], Path]:
    """``usae splice RUN STORE``: ``splice`` with the config's settings, written to ``cfg.out`` (default RUN).

    Returns the result and the path of splice.json.
    """
    out = check_output(
        cfg.out if cfg.out is not None else cfg.run, ("", "usae-run"), reading=(cfg.store,), replaces=False
    )
    result = splice(
        cfg.run,
        cfg.store,
        images=cfg.images,
        batch_images=cfg.batch_images,
        max_images=cfg.max_images,
        device=cfg.device,
        progress=cfg.progress,
    )
    return result, write_splice(result, out)


def splice_command(cfg: Any) -> str:
    """``usae splice``: what the command prints."""
    result, path = splice_cli(cfg)
    return f"{format_splice(result)}\nsplice: {path}"
