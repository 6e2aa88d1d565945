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

``splice(cfg)`` (``usae splice``) measures the run's dictionary on the store, writes ``splice.json``
and the figure ``splice.png`` (``write_splice``) and returns the JSON-ready dict.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from usae._io import check_output, one_line, save_figure, write_json_atomic
from usae.config import SpliceConfig
from usae.data.store import Store
from usae.device import resolve_device
from usae.errors import UsaeError
from usae.evaluation.fidelity.measures import (
    CONTROLS,
    MATRICES,
    SPLICE_JSON,
    SpliceSums,
    finite_or_none,
    headline,
    splice_cell,
    task_measures,
    tokens_to_native,
)
from usae.extraction.backbones import Backbone, align, load_backbone, parse_spec
from usae.extraction.images import BadImage, ImageSet, canonical_view, image_by_id, open_images, reopen
from usae.model.sae import UniversalSAE
from usae.run import BASELINES_DIR, MODEL_NAME, load, open_run_store

log = logging.getLogger(__name__)

SPLICE_VERSION = 1
SPLICE_PNG = "splice.png"
CHANGED_TOLERANCE = 1e-2
"""An image whose recomputed tokens differ from the stored rows by more than this (relative
Frobenius norm) has changed since extraction."""
"""The measure whose ratio to the mean-ablation floor gives loss_recovered (L - L_clean)."""


# -- inputs: run, store, images, backbones, independent SAEs --------------------------------------
def _check_layout(store: Store) -> None:
    if store.tokens_per_image is None or store.grid is None or store.image_ids is None:
        raise UsaeError(
            f"{store.path / 'metadata.json'}: no image layout (image_ids, tokens_per_image, grid); "
            "make the store with `usae extract`"
        )
    if getattr(store, "subsampled", False):
        raise UsaeError(
            f"{store.path}: a token-subsampled store (usae extract --tokens-per-image); splicing needs every token "
            "of an image: extract the images to splice on again without --tokens-per-image / --max-rows"
        )


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


def _image_source(store: Store, images: str | None) -> ImageSet:
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


@dataclass
class _Splicer:
    """What every batch needs: the open run and store, each model's backbone and task, the running sums."""

    sae: UniversalSAE
    store: Store
    models: dict[str, Backbone]
    indep: dict[str, UniversalSAE]
    reasons: dict[str, str | None]
    device: torch.device
    names: list[str] = field(init=False)
    avail: list[str] = field(init=False)
    tasks: dict[str, str | None] = field(init=False)
    native: dict[str, tuple[int, int]] = field(init=False)
    cells: dict[tuple[str, str], SpliceSums] = field(init=False)
    clean: dict[str, SpliceSums] = field(init=False)
    mean_d: dict[str, Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.names = self.sae.model_names
        self.avail = [n for n in self.names if self.reasons[n] is None]
        self.tasks = {n: self.models[n].task if self.reasons[n] is None else None for n in self.names}
        self.native = {n: tuple(self.models[n].native_grid) for n in self.names}
        self.cells = {(key, j): SpliceSums() for j in self.avail for key in [*self.names, *CONTROLS]}
        self.clean = {j: SpliceSums() for j in self.avail}
        self.mean_d = {n: torch.from_numpy(self.store.stats(n).mean).to(self.device) for n in self.avail}

    @torch.inference_mode()
    def add(self, idx: list[int], views: list[np.ndarray]) -> None:
        """Splice every substitute into every available model for the images ``idx`` (their ``views``)."""
        pixels = torch.from_numpy(np.stack(views)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        fmaps, outs, tokens = {}, {}, {}
        for n in self.names:
            if n in self.avail:
                seen: list[Tensor] = []
                outs[n] = self.models[n].splice_forward(pixels, lambda f, seen=seen: seen.append(f.clone()) or f)
                fmaps[n] = seen[0]
            else:
                fmaps[n] = self.models[n](pixels)
            tokens[n] = align(fmaps[n], tuple(self.store.grid)).float()
        _check_unchanged(self.store, tokens, idx)
        for j in self.avail:
            self.native[j] = tuple(fmaps[j].shape[-2:])
            self.clean[j].add(task_measures(self.tasks[j], outs[j], outs[j]))
            for key, new_bdhw in self._substitutes(j, tokens, fmaps[j]):
                new_bdhw = new_bdhw.clone(memory_format=torch.contiguous_format)  # downstream ops may write in place
                out = self.models[j].splice_forward(pixels, lambda f, new=new_bdhw: new.to(f.dtype))
                self.cells[(key, j)].add(task_measures(self.tasks[j], outs[j], out))

    def _substitutes(self, j: str, tokens: dict[str, Tensor], fmap_bdhw: Tensor) -> Iterator[tuple[str, Tensor]]:
        """(key, native map) for destination j: each source's reconstruction, then the controls (lazily)."""
        grid, native = tuple(self.store.grid), self.native[j]
        for i in self.names:
            yield i, tokens_to_native(_reconstruct(self.sae, i, j, tokens[i]), grid, native)
        yield "mean_ablation", self.mean_d[j].to(fmap_bdhw.dtype).view(1, -1, 1, 1).expand_as(fmap_bdhw)
        yield "zero_ablation", torch.zeros_like(fmap_bdhw)
        yield "resample_only", tokens_to_native(tokens[j], grid, native)
        if j in self.indep:
            yield "independent_sae", tokens_to_native(_reconstruct(self.indep[j], j, j, tokens[j]), grid, native)


# -- the driver ------------------------------------------------------------------------------------
def splice(cfg: SpliceConfig, backbones: Mapping[str, Backbone] | Sequence[Backbone] | None = None) -> dict[str, Any]:
    """``usae splice RUN STORE``: splice every model's reconstruction (from every source) back into it.

    Writes OUT/splice.json and OUT/splice.png (OUT: ``cfg.out``, default RUN) and returns the
    JSON-ready result. The store is the one ``usae extract`` made (its images, token grid and
    backbone specs); an independent SAE in RUN/baselines/<model>/ is added as a control.
    ``backbones``: ready backbones (a list, or by model name), needed for ones built in Python; the
    others are rebuilt from the store's specs.
    """
    out = check_output(cfg.out or cfg.run, ("", "usae-run"), reading=(cfg.store,), replaces=False)
    device = resolve_device(cfg.device)
    sae, store = open_run_store(cfg.run, cfg.store, str(device))
    _check_layout(store)
    if backbones is not None and not isinstance(backbones, Mapping):
        backbones = {b.name: b for b in backbones}
    models = store_backbones(store, sae.model_names, device, backbones)
    indep = independent_saes(Path(cfg.run) / BASELINES_DIR, sae.model_names, device)
    reasons = {n: models[n].splice_check() for n in sae.model_names}
    for why in filter(None, reasons.values()):
        log.warning("%s", why)
    splicer = _Splicer(sae, store, models, indep, reasons, device)
    chosen = _chosen_images(len(store.image_ids), cfg.max_images)
    if not splicer.avail:
        log.warning("no model of %s can splice: nothing to measure", sae.model_names)
        chosen = []
    image_set = _image_source(store, cfg.images) if chosen else None
    view = int(store.extra.get("view_size") or max(b.input_size for b in models.values()))
    bar = tqdm(total=len(chosen), desc="splice", unit="img", disable=not cfg.progress or None)
    for start in range(0, len(chosen), cfg.batch_images):
        idx = chosen[start : start + cfg.batch_images]
        splicer.add(idx, [_view(image_set, store.image_ids[j], j, view, store) for j in idx])
        bar.update(len(idx))
    bar.close()
    result = _result(splicer, len(chosen), cfg.run)
    write_splice(result, out)
    return result


def _chosen_images(n_all: int, max_images: int | None) -> list[int]:
    """All image indices, or ``max_images`` of them spread evenly."""
    if max_images is None or max_images >= n_all:
        return list(range(n_all))
    return sorted({int(round(i)) for i in np.linspace(0, n_all - 1, max_images)})


def _result(sp: _Splicer, n_images: int, run: Path) -> dict[str, Any]:
    store, names, avail, tasks, cells = sp.store, sp.names, sp.avail, sp.tasks, sp.cells
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
        "run": str(run),
        "store": str(store.path),
        "models": list(names),
        "n_images": int(n_images),
        "grid": list(store.grid),
        "native_grid": {n: list(sp.native[n]) for n in names},
        "available": {n: n in avail for n in names},
        "unavailable_reasons": {n: why for n, why in sp.reasons.items() if why is not None},
        "task": {n: tasks[n] for n in names},
        "independent_sae": {n: n in sp.indep for n in names},
        "matrices": matrices,
        "controls": controls,
        "clean": {j: {k: finite_or_none(v) for k, v in sp.clean[j].means().items()} for j in avail if n_images},
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
def write_splice(result: dict[str, Any], out_dir: str | Path) -> Path:
    """Write OUT_DIR/splice.json (atomically) and OUT_DIR/splice.png; return the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / SPLICE_JSON
    write_json_atomic(path, result)
    from usae.evaluation.report.figures import figure_splice  # matplotlib only when writing

    save_figure(figure_splice(result), out / SPLICE_PNG)
    log.info("wrote %s and %s", path, out / SPLICE_PNG)
    return path


def splice_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(column titles, rows): one row per source model then per control, one column per destination
    model; each cell "<headline measure> / <loss recovered>" ("–" where the destination cannot splice)."""
    models, m = result["models"], result["matrices"]
    titles = [f"{j} ({headline(result, j)} / loss rec.)" for j in models]
    rows = []
    for r, i in enumerate(models):
        rows.append([i] + [
            f"{_fmt(m[headline(result, j)][r][c])} / {_fmt(m['loss_recovered'][r][c])}" if result["available"][j] else "–"
            for c, j in enumerate(models)
        ])  # fmt: skip
    for name in CONTROLS:
        cells = []
        for j in models:
            ctl = result["controls"].get(j, {}).get(name)
            cells.append(f"{_fmt(ctl.get(headline(result, j)))} / {_fmt(ctl.get('loss_recovered'))}" if ctl else "–")
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


def splice_command(cfg: SpliceConfig) -> str:
    """``usae splice``: what the command prints."""
    result = splice(cfg)
    return f"{format_splice(result)}\nsplice: {(cfg.out or cfg.run) / SPLICE_JSON}"
