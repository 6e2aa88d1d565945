"""The concept explorer's pages: Jinja2 templates (``usae/templates``, autoescaped) filled from
the report, the streamed top images and their token maps. See ``usae.explore`` for the layout.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from usae import report as report_mod
from usae.config import ExploreConfig, read_json
from usae.errors import UsaeError
from usae.evaluate import evaluate
from usae.explore import (
    OVERLAY_ALPHA,
    THUMB_SIZE,
    TopImages,
    colormap_lut,
    image_layout,
    iter_image_codes,
    load_view,
    open_run_store,
    scan_top_images,
)
from usae.maximize import RESULT_NAME, concept_dir_re, maximize, write_maximization
from usae.sae import UniversalSAE
from usae.store import Store

log = logging.getLogger(__name__)


def _fmt(v: Any) -> str:
    """A number for a page: '–' when undefined, ints as is, floats to 3 significant digits."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, int | np.integer):
        return str(int(v))
    return f"{float(v) + 0.0:.3g}"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=jinja2.select_autoescape(["html"], default_for_string=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = _fmt
    env.filters["short"] = lambda image_id: str(image_id).rstrip("/").rsplit("/", 1)[-1]  # paths: the file name
    return env


def _read_labels(path: Path | None, n_latents: int) -> dict[int, str]:
    """User concept labels: a JSON object {"<concept>": "label"} (e.g. written by hand or a labeller)."""
    if path is None:
        return {}
    data = read_json(path, "concept labels")
    if not isinstance(data, dict):
        raise UsaeError(f"{path}: concept labels must be a JSON object mapping concept ids to text")
    labels = {}
    for key, text in data.items():
        if not str(key).isdigit() or not 0 <= int(key) < n_latents or not isinstance(text, str):
            raise UsaeError(f"{path}: entry {str(key)[:40]!r} is not '<concept in [0, {n_latents})>': '<text>'")
        labels[int(key)] = text
    return labels


def _run_report(cfg: ExploreConfig, sae: UniversalSAE, store: Store) -> dict[str, Any]:
    """RUN/report.json when it was computed on this store, else a fresh ``evaluate`` (not saved to RUN)."""
    path = Path(cfg.run) / "report.json"
    if path.is_file():
        report = read_json(path, "report")
        same = report.get("store", {}).get("hash") == store.hash and report.get("model_names") == sae.model_names
        if same and report.get("n_rows") == store.n_rows:
            return report
    log.info("no report for this store in %s; evaluating", cfg.run)
    return evaluate(sae, store, out=None, progress=cfg.progress)


def _write_figures(report: dict[str, Any], fig_dir: Path) -> list[dict[str, str]]:
    fig_dir.mkdir()
    reports, labels = [report], report_mod.store_labels([report])
    thresholds = report_mod.thresholds_of(report)
    table = report_mod.class_counts(report, report_mod.classify(report, thresholds), thresholds)
    figures = {
        "r2_matrix": (
            "Cross-reconstruction R² (row: encode with, column: decode to)",
            report_mod.figure_r2(reports, labels),
        ),
        "firing_entropy": (
            "Firing entropy of live concepts",
            report_mod.figure_firing_entropy(reports, labels, thresholds),
        ),
        "classes": ("Concepts each model uses, by class", report_mod.figure_classes([table], labels)),
        "cofire_rank": ("Co-fire proportion vs energy rank", report_mod.figure_cofire_rank(reports, labels)),
    }
    out = []
    for stem, (title, fig) in figures.items():
        fig.savefig(fig_dir / f"{stem}.png", dpi=80)
        out.append({"src": f"figures/{stem}.png", "title": title})
    return out


def _concept_rows(report: dict[str, Any], labels: dict[int, str], top: TopImages) -> list[dict[str, Any]]:
    """Per concept: the report's numbers, its class and label, and whether it has any top image."""
    names, n_rows = report["model_names"], report["n_rows"]
    classes = report_mod.classify(report, report_mod.thresholds_of(report))
    rows = []
    for k in range(report["n_latents"]):
        fires = [report["fires"][n][k] for n in names]
        energy = [report["energy"][n][k] for n in names]
        rows.append(
            {
                "id": k,
                "label": labels.get(k, ""),
                "cls": classes[k],
                "fe": report["firing_entropy"][k],
                "energy": sum(energy),
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


def _maximizations(max_dir: Path, site_dir: Path, names: list[str]) -> dict[int, dict[str, Any]]:
    """Copy every RUN/maximize/concept-<k>/ result into the site; concept -> page data."""
    found = {}
    for src in sorted(max_dir.glob("concept-*")) if max_dir.is_dir() else []:
        m = concept_dir_re.fullmatch(src.name)
        if not m or not (src / RESULT_NAME).is_file():
            continue
        k, result = int(m[1]), read_json(src / RESULT_NAME, "maximisation result")
        dst = site_dir / "max" / str(k)
        dst.mkdir(parents=True)
        models = []
        for name, r in result.get("models", {}).items():
            if name in names and (src / r["png"]).is_file():
                shutil.copy2(src / r["png"], dst / r["png"])
                models.append({"name": name, "src": f"../max/{k}/{r['png']}", **r})
        if models:
            found[k] = {"models": models, "steps": result.get("steps"), "seed": result.get("seed")}
    return found


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
    img.save(path, quality=88)


def build_site(cfg: ExploreConfig, site: Path) -> None:
    """Every page of the explorer into the (empty) directory ``site``."""
    sae, store = open_run_store(cfg.run, cfg.store, cfg.device)
    layout = image_layout(store)
    if not isinstance(store.extra.get("images"), dict):
        raise UsaeError(f"{store.path / 'metadata.json'}: field 'extra.images' (the image source) is missing")
    labels = _read_labels(cfg.labels, sae.n_latents)
    report = _run_report(cfg, sae, store)
    if cfg.maximize_top:
        _maximize_top(cfg, report)
    env, names = _environment(), sae.model_names
    for sub in ("concepts", "images", "img", "assets"):
        (site / sub).mkdir()
    for asset in ("explorer.css", "explorer.js"):
        shutil.copy2(Path(__file__).parent / "templates" / asset, site / "assets" / asset)
    # the heatmap colours, shared with overlay(); a script file, since file:// pages cannot fetch JSON
    (site / "assets" / "colormap.js").write_text(f"window.USAE_LUT = {json.dumps(colormap_lut().tolist())};\n")
    figures = _write_figures(report, site / "figures")
    top = scan_top_images(sae, store, cfg.n_top, batch_images=cfg.batch_images, progress=cfg.progress)
    concepts = _concept_rows(report, labels, top)
    common = {"names": names, "grid": list(layout.grid), "alpha": OVERLAY_ALPHA}
    heat_et, ent = _image_pass(cfg, sae, store, top, concepts, report.get("tau", 0.1), env, common, site)
    maxi = _maximizations(Path(cfg.run) / "maximize", site, names)
    _concept_pages(top, concepts, heat_et, ent, layout, maxi, env, common, site, cfg.progress)
    (site / "index.html").write_text(
        env.get_template("index.html").render(
            **common,
            root="",
            title="Concept explorer",
            concepts=concepts,
            report=report,
            figures=figures,
            n_images=len(layout.image_ids),
            n_live=sum(c["live"] for c in concepts),
            n_maximized=len(maxi),
        )
    )


def _entries(top: TopImages) -> tuple[np.ndarray, np.ndarray]:
    """Every filled top slot as rows (model, concept, rank), sorted by image; and their images."""
    ent = np.argwhere(top.image_msn.numpy() >= 0)
    img = top.image_msn.numpy()[ent[:, 0], ent[:, 1], ent[:, 2]]
    order = np.argsort(img, kind="stable")
    return ent[order], img[order]


def _image_pass(cfg, sae, store, top, concepts, report_tau, env, common, site) -> tuple[np.ndarray, np.ndarray]:
    """Re-encode the images that are in some top list: their token maps, thumbnails and image pages."""
    layout = image_layout(store)
    ent, ent_img = _entries(top)
    wanted = np.unique(ent_img)
    heat_et = np.zeros((len(ent), layout.tokens_per_image), np.float32)
    vmax_ms = top.value_msn[:, :, 0].numpy()
    template = env.get_template("image.html")
    bar = tqdm(total=len(wanted), unit="img", desc="explore: image pages", disable=not cfg.progress)
    # PIL decodes and encodes with the GIL released: thumbnails overlap with the rendering below.
    with ThreadPoolExecutor(2) as pool:
        for chunk, codes in iter_image_codes(sae, store, wanted, batch_images=cfg.batch_images):
            thumbs = [pool.submit(_save_thumb, store, j, site / "img" / f"{j}.jpg") for j in chunk.tolist()]
            z_mbts = torch.stack([codes[n] for n in sae.model_names]).cpu()
            lo, hi = np.searchsorted(ent_img, [chunk[0], chunk[-1] + 1])
            loc_e = torch.from_numpy(np.searchsorted(chunk, ent_img[lo:hi]))
            m_e, k_e = torch.from_numpy(ent[lo:hi, 0]), torch.from_numpy(ent[lo:hi, 1])
            heat_et[lo:hi] = z_mbts[m_e, loc_e, :, k_e].numpy()  # (entries, t)
            seen = _seen_by(z_mbts, vmax_ms, concepts, cfg.concepts_per_image, float(report_tau))
            for loc, j in enumerate(chunk.tolist()):
                page = template.render(
                    **common, root="../", title=f"Image {j}", j=j, image_id=layout.image_ids[j], seen=seen[loc]
                )
                (site / "images" / f"{j}.html").write_text(page)
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


def _concept_pages(top, concepts, heat_et, ent, layout, maxi, env, common, site, progress) -> None:
    template = env.get_template("concept.html")
    value_msn, image_msn = top.value_msn.numpy(), top.image_msn.numpy()
    # one byte per token, scaled to the concept's top image in that model
    vmax_e = value_msn[ent[:, 0], ent[:, 1], 0]
    q_et = np.clip(np.round(heat_et / np.where(vmax_e > 0, vmax_e, 1.0)[:, None] * 255), 0, 255).astype(np.uint8)
    hex_msn = np.full(image_msn.shape, "", dtype=object)
    hex_msn[ent[:, 0], ent[:, 1], ent[:, 2]] = [row.tobytes().hex() for row in q_et]
    for c in tqdm([c for c in concepts if c["live"]], unit="page", desc="explore: concept pages", disable=not progress):
        k, columns = c["id"], []
        for i, name in enumerate(common["names"]):
            cards = [
                {"j": int(j), "image_id": layout.image_ids[j], "value": float(v), "hex": hx}
                for j, v, hx in zip(image_msn[i, k], value_msn[i, k], hex_msn[i, k], strict=True)
                if j >= 0
            ]
            columns.append({"name": name, "cards": cards})
        # the index's thumbnail: the top image in the model that fires most, else in any model
        firsts = [columns[c["thumb_model"]]["cards"][:1], *(col["cards"][:1] for col in columns)]
        c["thumb"] = next((f[0] for f in firsts if f), None)
        page = template.render(**common, root="../", title=f"Concept {k}", c=c, columns=columns, maxi=maxi.get(k))
        (site / "concepts" / f"{k}.html").write_text(page)


def _maximize_top(cfg: ExploreConfig, report: dict[str, Any]) -> None:
    """Run coordinated maximisation for the ``maximize_top`` universal concepts of most energy."""
    classes = report_mod.classify(report, report_mod.thresholds_of(report))
    energy_s = np.sum([report["energy"][n] for n in report["model_names"]], axis=0)
    ranked = [int(k) for k in np.argsort(-energy_s, kind="stable") if classes[k] == "universal"]
    for k in ranked[: cfg.maximize_top]:
        result = maximize(
            cfg.run, k, store=cfg.store, steps=cfg.maximize_steps, n_crops=cfg.maximize_crops,
            device=cfg.device, progress=cfg.progress,
        )
        write_maximization(result, Path(cfg.run) / "maximize", k)
