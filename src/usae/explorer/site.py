"""The concept explorer's pages: Jinja2 templates (``explorer/templates``, autoescaped) filled from
the report, the streamed top images and their token maps, and the concept labels (label_pages.py).
See ``usae.explorer.concepts`` for the image layout.

``explore(cfg)`` is ``usae explore``. It reads a report of ``usae evaluate`` from the run
(``usae.run.find_report``) and the maximisations under RUN/maximize; it runs either stage itself
only when it must (no report) or is asked to (``--maximize-top``), and says so in one log line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import jinja2
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from usae._io import check_output, output_dir, save_figure
from usae.config import ExploreConfig, MaximizeConfig
from usae.data.store import Store
from usae.errors import UsaeError
from usae.evaluation import classes as concept_classes
from usae.evaluation.evaluate import evaluate
from usae.evaluation.naming.label import ARTIFACT_TOP, artifact_marks, border_share_by_chance
from usae.evaluation.report import figures as report_figures
from usae.evaluation.report.markdown import store_labels
from usae.evaluation.report.templating import environment
from usae.explorer.concepts import (
    OVERLAY_ALPHA,
    SITE_MARKER,
    THUMB_SIZE,
    TopImages,
    colormap_lut,
    image_layout,
    iter_image_codes,
    load_view,
    scan_top_images,
    write_page,
    writing,
)
from usae.explorer.label_pages import (
    ConceptLabels,
    all_label_names,
    artifact_summary,
    label_pages,
    label_parts,
    label_scores,
    label_slugs,
    labels_path,
    read_concept_labels,
    same_store,
)
from usae.explorer.maximize import maximize
from usae.explorer.maximize_result import copy_maximizations
from usae.extraction.images import ImageLayout
from usae.model.sae import UniversalSAE
from usae.run import find_report, maximize_dir, open_run_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Site:
    """What every page writer reads: the config, the run and its store, the store's image layout,
    the Jinja environment with the values every template gets (``common``), and the site directory."""

    cfg: ExploreConfig
    sae: UniversalSAE
    store: Store
    layout: ImageLayout
    env: jinja2.Environment
    common: dict[str, Any]
    dir: Path


def _environment() -> jinja2.Environment:
    env = environment(Path(__file__).parent / "templates", html=True)
    env.filters["short"] = lambda image_id: str(image_id).rstrip("/").rsplit("/", 1)[-1]  # paths: the file name
    return env


def _run_report(cfg: ExploreConfig, sae: UniversalSAE, store: Store) -> dict[str, Any]:
    """The run's report computed on this store (:func:`usae.run.find_report`), else a fresh ``evaluate`` (not saved)."""
    found = find_report(Path(cfg.run), sae.model_names, store)
    if found is not None:
        log.info("explore: using the report %s", found[0])
        return found[1]
    log.info(
        "explore: no report of this store in %s: evaluating it now (not saved); run `usae evaluate %s %s` "
        "first to reuse one",
        cfg.run, cfg.run, cfg.store,
    )  # fmt: skip
    return evaluate(sae, store, out=None, progress=cfg.progress)


def _write_figures(report: dict[str, Any], fig_dir: Path) -> list[dict[str, str]]:
    with writing(fig_dir):
        fig_dir.mkdir()
    reports, labels = [report], store_labels([report])
    thresholds = concept_classes.thresholds_of(report)
    table = concept_classes.class_counts(report, concept_classes.classify(report, thresholds), thresholds)
    figures = {
        "r2_matrix": (
            "Cross-reconstruction R² (row: encode with, column: decode to)",
            report_figures.figure_r2(reports, labels),
        ),
        "firing_entropy": (
            "Firing entropy of live concepts",
            report_figures.figure_firing_entropy(reports, labels, thresholds),
        ),
        "classes": ("Concepts each model uses, by class", report_figures.figure_classes([table], labels)),
        "cofire_rank": ("Co-fire proportion vs energy rank", report_figures.figure_cofire_rank(reports, labels)),
    }
    out = []
    for stem, (title, fig) in figures.items():
        save_figure(fig, fig_dir / f"{stem}.png", dpi=80)
        out.append({"src": f"figures/{stem}.png", "title": title})
    return out


def _concept_rows(
    report: dict[str, Any], labels: ConceptLabels, top: TopImages, slugs: dict[str, str], grid: tuple[int, int]
) -> list[dict[str, Any]]:
    """Per concept: the report's numbers, its class, labels and artifact marks, and whether it has any top image."""
    names, n_rows = report["model_names"], report["n_rows"]
    scored = labels.scored
    border_base = border_share_by_chance(scored, grid) if scored else 0.0
    classes = concept_classes.classify(report, concept_classes.thresholds_of(report))
    share_ms = concept_classes.energy_share(report)  # ranks concepts whatever each model's activation scale
    rows = []
    for k in range(report["n_latents"]):
        fires = [report["fires"][n][k] for n in names]
        energy = [report["energy"][n][k] for n in names]
        rows.append(
            {
                "id": k,
                "label": labels.text.get(k, ""),
                "label_parts": [{**p, "slug": slugs[p["name"]]} for p in label_parts(scored, k)] if scored else [],
                "scores": label_scores(scored, k, names, slugs) if scored else [],
                "marks": artifact_marks(scored["artifacts"], k, names, border_base) if scored else [],
                "cls": classes[k],
                "fe": report["firing_entropy"][k],
                "energy": float(share_ms[:, k].sum()),
                "energy_m": energy,
                "cfp_m": [report["cofiring"]["proportion"][n][k] for n in names],
                "fires_m": fires,
                "per_1k_m": [1000 * f / n_rows for f in fires],
                "cofires": report["cofiring"]["cofires"][k],
                "live": bool((top.image_msn[:, k, 0] >= 0).any()),
                # thumbnail: the top image in the model where the concept fires most often
                "thumb_model": int(np.argmax(fires)),
                "thumb": None,
            }
        )
    return rows


def _save_thumb(store: Store, j: int, path: Path) -> None:
    """img/<j>.jpg: the canonical view (at most THUMB_SIZE px); a grey tile if the file is gone."""
    try:
        view = load_view(store, j)
    except UsaeError as e:
        log.warning("%s; drawing a grey tile", e)
        view = np.full((THUMB_SIZE, THUMB_SIZE, 3), 128, np.uint8)
    img = Image.fromarray(view)
    if img.width > THUMB_SIZE:
        img = img.resize((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BICUBIC)
    with writing(path):
        img.save(path, quality=88)


def _write_assets(site_dir: Path) -> None:
    """The page directories, the stylesheet and script, and the heatmap colours."""
    for sub in ("concepts", "images", "img", "assets"):
        with writing(site_dir / sub):
            (site_dir / sub).mkdir()
    for asset in ("explorer.css", "explorer.js"):
        with writing(site_dir / "assets" / asset):
            shutil.copy2(Path(__file__).parent / "templates" / asset, site_dir / "assets" / asset)
    # the heatmap colours, shared with overlay(); a script file, since file:// pages cannot fetch JSON
    write_page(site_dir / "assets" / "colormap.js", f"window.USAE_LUT = {json.dumps(colormap_lut().tolist())};\n")


def build_site(cfg: ExploreConfig, site_dir: Path) -> None:
    """Every page of the explorer into the (empty) directory ``site_dir``."""
    sae, store = open_run_store(cfg.run, cfg.store, cfg.device)
    layout = image_layout(store)
    if not isinstance(store.extra.get("images"), dict):
        raise UsaeError(f"{store.path / 'metadata.json'}: field 'extra.images' (the image source) is missing")
    labels = read_concept_labels(labels_path(cfg), sae.n_latents, sae.model_names, explicit=cfg.labels is not None)
    report = _run_report(cfg, sae, store)
    if cfg.maximize_top:
        _maximize_top(cfg, report, labels)
    common = {"names": sae.model_names, "grid": list(layout.grid), "alpha": OVERLAY_ALPHA}
    site = _Site(cfg, sae, store, layout, _environment(), common, site_dir)
    _write_assets(site_dir)
    figures = _write_figures(report, site_dir / "figures")
    top = scan_top_images(sae, store, cfg.n_top, batch_images=cfg.batch_images, progress=cfg.progress)
    slugs = label_slugs(all_label_names(labels.scored)) if labels.scored else {}
    concepts = _concept_rows(report, labels, top, slugs, layout.grid)
    heat_et, ent = _image_pass(site, top, concepts, float(report.get("tau", 0.1)))
    maxi = copy_maximizations(maximize_dir(cfg.run), site_dir, sae.model_names)
    _concept_pages(site, top, concepts, heat_et, ent, maxi)
    label_families = label_pages(labels.scored, concepts, slugs, site.env, common, site_dir) if labels.scored else []
    write_page(
        site_dir / "index.html",
        site.env.get_template("index.html").render(
            **common,
            root="",
            title="Concept explorer",
            concepts=concepts,
            report=report,
            figures=figures,
            n_images=len(layout.image_ids),
            n_live=sum(c["live"] for c in concepts),
            n_maximized=len(maxi),
            labels=labels,
            label_families=label_families,
            labels_same_store=same_store(labels.scored, store),
            artifacts=artifact_summary(concepts) if labels.scored and labels.scored["artifacts"] else None,
            artifact_top=ARTIFACT_TOP,
        ),
    )


def _entries(top: TopImages) -> tuple[np.ndarray, np.ndarray]:
    """Every filled top slot as rows (model, concept, rank), sorted by image; and their images."""
    ent = np.argwhere(top.image_msn.numpy() >= 0)
    img = top.image_msn.numpy()[ent[:, 0], ent[:, 1], ent[:, 2]]
    order = np.argsort(img, kind="stable")
    return ent[order], img[order]


def _image_pass(site: _Site, top: TopImages, concepts: list[dict], tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Re-encode the images that are in some top list: their token maps, thumbnails and image pages.

    Returns the (entries, t) token maps of the top entries and the entries (model, concept, rank)."""
    sae, store, layout, cfg = site.sae, site.store, site.layout, site.cfg
    ent, ent_img = _entries(top)
    wanted = np.unique(ent_img)
    heat_et = np.zeros((len(ent), layout.grid[0] * layout.grid[1]), np.float32)  # the whole grid, subsampled or not
    vmax_ms = top.value_msn[:, :, 0].numpy()
    template = site.env.get_template("image.html")
    bar = tqdm(total=len(wanted), unit="img", desc="explore: image pages", disable=not cfg.progress)
    # PIL decodes and encodes with the GIL released: thumbnails overlap with the rendering below.
    with ThreadPoolExecutor(2) as pool:
        for chunk, codes in iter_image_codes(sae, store, wanted, batch_images=cfg.batch_images):
            thumbs = [pool.submit(_save_thumb, store, j, site.dir / "img" / f"{j}.jpg") for j in chunk.tolist()]
            z_mbts = torch.stack([codes[n] for n in sae.model_names]).cpu()
            lo, hi = np.searchsorted(ent_img, [chunk[0], chunk[-1] + 1])
            loc_e = torch.from_numpy(np.searchsorted(chunk, ent_img[lo:hi]))
            m_e, k_e = torch.from_numpy(ent[lo:hi, 0]), torch.from_numpy(ent[lo:hi, 1])
            heat_et[lo:hi] = z_mbts[m_e, loc_e, :, k_e].numpy()  # (entries, t)
            seen = _seen_by(z_mbts, vmax_ms, concepts, cfg.concepts_per_image, tau)
            for loc, j in enumerate(chunk.tolist()):
                page = template.render(
                    **site.common, root="../", title=f"Image {j}", j=j, image_id=layout.image_ids[j], seen=seen[loc]
                )
                write_page(site.dir / "images" / f"{j}.html", page)
            for future in thumbs:
                future.result()
            bar.update(len(chunk))
    bar.close()
    return heat_et, ent


def _seen_by(z_mbts: Tensor, vmax_ms: np.ndarray, concepts: list, n: int, tau: float) -> list[list[list[dict]]]:
    """For each of b images, per model: the ``n`` concepts firing most on it, with their token maps.

    ``z_mbts``: (m, b, t, s) codes. ``shared`` marks concepts that fire (code > tau) on the image in
    every model. Heatmaps are scaled to the concept's top image in that model (``vmax_ms``).
    """
    m, b, t, s = z_mbts.shape
    score_mbs = z_mbts.amax(2)
    shared_bs = (score_mbs > tau).all(0).numpy()
    top = score_mbs.topk(min(n, s), dim=2)  # (m, b, n)
    idx_mbn, val_mbn = top.indices.numpy(), top.values.numpy()
    maps_mbtn = z_mbts.gather(3, top.indices[:, :, None, :].expand(-1, -1, t, -1)).numpy()
    scale_mbn = vmax_ms[np.arange(m)[:, None, None], idx_mbn]
    scale_mbn = np.where(scale_mbn > 0, scale_mbn, 1.0)
    q_mbtn = np.clip(np.round(maps_mbtn / scale_mbn[:, :, None, :] * 255), 0, 255).astype(np.uint8)
    out = []
    for loc in range(b):
        per_model = []
        for i in range(m):
            col = []
            for r, (k, v) in enumerate(zip(idx_mbn[i, loc].tolist(), val_mbn[i, loc].tolist(), strict=True)):
                if v > 0:
                    c, hx = concepts[k], q_mbtn[i, loc, :, r].tobytes().hex()
                    col.append(
                        {
                            "k": k,
                            "label": c["label"],
                            "cls": c["cls"],
                            "value": v,
                            "hex": hx,
                            "shared": bool(shared_bs[loc, k]),
                        }
                    )
            per_model.append(col)
        out.append(per_model)
    return out


def _concept_pages(
    site: _Site, top: TopImages, concepts: list[dict], heat_et: np.ndarray, ent: np.ndarray, maxi: dict[int, dict]
) -> None:
    """concepts/<k>.html for every live concept: per model its top images with heatmaps, and its maximisation."""
    template = site.env.get_template("concept.html")
    value_msn, image_msn = top.value_msn.numpy(), top.image_msn.numpy()
    # one byte per token, scaled to the concept's top image in that model
    vmax_e = value_msn[ent[:, 0], ent[:, 1], 0]
    q_et = np.clip(np.round(heat_et / np.where(vmax_e > 0, vmax_e, 1.0)[:, None] * 255), 0, 255).astype(np.uint8)
    hex_msn = np.full(image_msn.shape, "", dtype=object)
    hex_msn[ent[:, 0], ent[:, 1], ent[:, 2]] = [row.tobytes().hex() for row in q_et]
    live = [c for c in concepts if c["live"]]
    for c in tqdm(live, unit="page", desc="explore: concept pages", disable=not site.cfg.progress):
        k, columns = c["id"], []
        for i, name in enumerate(site.common["names"]):
            cards = [
                {"j": int(j), "image_id": site.layout.image_ids[j], "value": float(v), "hex": hx}
                for j, v, hx in zip(image_msn[i, k], value_msn[i, k], hex_msn[i, k], strict=True)
                if j >= 0
            ]
            columns.append({"name": name, "cards": cards})
        # the index's thumbnail: the top image in the model that fires most, else in any model
        firsts = [columns[c["thumb_model"]]["cards"][:1], *(col["cards"][:1] for col in columns)]
        c["thumb"] = next((f[0] for f in firsts if f), None)
        page = template.render(**site.common, root="../", title=f"Concept {k}", c=c, columns=columns, maxi=maxi.get(k))
        write_page(site.dir / "concepts" / f"{k}.html", page)


def _maximize_top(cfg: ExploreConfig, report: dict[str, Any], labels: ConceptLabels) -> None:
    """``usae maximize`` for the ``maximize_top`` universal concepts of most energy share, into
    RUN/maximize; named ones (the same name in every model, no artifact mark) first when labels.json is there."""
    classes = concept_classes.classify(report, concept_classes.thresholds_of(report))
    energy_s = concept_classes.energy_share(report).sum(0)
    ranked = [int(k) for k in np.argsort(-energy_s, kind="stable") if classes[k] == "universal"]
    if labels.scored is not None:
        scored, names = labels.scored, report["model_names"]
        base = border_share_by_chance(scored, tuple(scored["store"].get("grid") or (1, 1)))
        named = {
            int(k)
            for f in scored["families"].values()
            for k, e in f["concepts"].items()
            if e.get("agrees") and not artifact_marks(scored.get("artifacts", {}), int(k), names, base)
        }
        ranked = sorted(ranked, key=lambda k: k not in named)  # stable: energy order within each group
    chosen = tuple(ranked[: cfg.maximize_top])
    if not chosen:
        log.info("explore: --maximize-top %d: the report has no universal concept to maximise", cfg.maximize_top)
        return
    ks = " ".join(map(str, chosen))
    log.info(
        "explore: --maximize-top %d: running `usae maximize %s --concept %s --steps %d --n-crops %d` now "
        "(into %s); --maximize-top 0 skips it",
        cfg.maximize_top, cfg.run, ks, cfg.maximize_steps, cfg.maximize_crops, maximize_dir(cfg.run),
    )  # fmt: skip
    maximize(
        MaximizeConfig(
            run=Path(cfg.run), concept=chosen, store=Path(cfg.store), steps=cfg.maximize_steps,
            n_crops=cfg.maximize_crops, device=cfg.device, progress=cfg.progress,
        )
    )  # fmt: skip


@overload
def explore(cfg: ExploreConfig, /) -> Path: ...
@overload
def explore(run: str | Path, store: str | Path, out: str | Path, /, **fields: Any) -> Path: ...
def explore(cfg, store=None, out=None, /, **fields):
    """``usae explore``: build the site in a temporary sibling directory, then move it into place;
    returns OUT/index.html (OUT as given, symlinks kept).

    --out is checked before anything is written: not the run or the store (nor inside or around
    them), and either absent, empty or an earlier explorer site (which is replaced). A failed
    build leaves neither the partial site nor a newly created empty parent directory.

    ``explore(run, store, out, **fields)`` is ``explore(ExploreConfig(run, store, out, **fields))``.
    """
    if not isinstance(cfg, ExploreConfig):
        cfg = ExploreConfig(run=Path(cfg), store=Path(store), out=Path(out), **fields)
    # replaces=True: an earlier site is deleted whole, so OUT may not contain an input either (a run
    # copied inside an old site would go with it)
    inputs = (cfg.run, cfg.store) + (() if cfg.labels is None else (cfg.labels,))
    out = check_output(cfg.out, "", overwrite=True, reading=inputs, replaces=True)
    if out.exists() and not ((out / SITE_MARKER).is_file() or not any(out.iterdir())):
        raise UsaeError(f"{out} exists and is not a concept explorer site; refusing to replace it")
    tmp = out.with_name(f"{out.name}.partial")
    started = time.perf_counter()
    with output_dir(out.parent):
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with writing(tmp):
                tmp.mkdir()
            build_site(cfg, tmp)
            write_page(tmp / SITE_MARKER, "usae concept explorer\n")
        except OSError as e:  # a write no helper named (writing() covers the site's own files)
            shutil.rmtree(tmp, ignore_errors=True)
            raise UsaeError(f"{e.filename or tmp}: could not write ({e.strerror or e}); {out} is unchanged") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        with writing(out):
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
    shown = Path(os.path.abspath(cfg.out))  # as given (symlinks kept), for the log and the caller
    log.info("wrote concept explorer %s in %.1f s", shown / "index.html", time.perf_counter() - started)
    return shown / "index.html"


def explore_command(cfg: ExploreConfig) -> str:
    """``usae explore``: what the command prints."""
    return f"concept explorer: {explore(cfg)}"
