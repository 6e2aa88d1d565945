"""``usae label``: name every concept from labels of held-out images, with a measured chance level.

Two label families, each scored with ``evaluation/naming.py`` (precision of a concept's top-N
activations per label, lift over the base rate, AUROC, a permutation p-value for the best label):

* **dataset labels**, per image: those the store records (``usae extract --labels``), else the folders
  an image sits in (``animals/marsupials`` also gives ``animals``); scored on each image's largest code.
* **pixel labels**, per token (``extraction/pixel_labels.py``): colour terms, brightness,
  flat / edge / textured, border / centre, foreground / background from the canonical view.

Every family is also run on shuffled labels (the control must name nothing). Per concept and model
the share of its top tokens on flat regions and on the border flags position/background concepts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy import sparse
from tqdm.auto import tqdm

from usae._io import write_json_atomic
from usae.config import LabelConfig
from usae.data.store import Store, open_store
from usae.device import resolve_device
from usae.errors import UsaeError
from usae.evaluation.naming import LabelMatrix, label_matrix, name_concepts, shuffled_control, top_n
from usae.extraction.images import image_layout, load_source_image, reopen_cached, source_of
from usae.extraction.labels import folder_label
from usae.extraction.pixel_labels import PixelLabels, pixel_labels, stack_pixel_labels
from usae.model.sae import SparseCode, UniversalSAE
from usae.run import load

log = logging.getLogger(__name__)

LABELS_VERSION = 1
LABELS_JSON = "labels.json"
NAMES_JSON = "names.json"
# Pixel labels that describe where a token is or how flat it is: the artifact flags.
FLAT, BORDER = "texture/flat", "position/border"


class Codes(NamedTuple):
    """One model's codes over a store: token-level sparse matrix and its per-image max."""

    token_ts: sparse.csr_matrix
    """(tokens, s) code values (TopK: k non-zeros per row)."""
    image_ns: np.ndarray
    """(images, s) float32: each image's largest code per concept."""


def dataset_labels(store: Store) -> tuple[str, list[list[str]]] | None:
    """(source, per-image labels) the store records (``usae extract --labels``); else the images' folders.

    None when neither gives any image a label.
    """
    stored = store.extra.get("labels")
    if isinstance(stored, dict) and isinstance(stored.get("per_image"), list):
        return (str(stored.get("source")), stored["per_image"]) if any(stored["per_image"]) else None
    images = reopen_cached(source_of(store))
    derived = [folder_label(images, image_id) for image_id in image_layout(store).image_ids]
    return ("folders", derived) if any(derived) else None


@torch.no_grad()
def encode_codes(sae: UniversalSAE, store: Store, batch_images: int, progress: bool) -> dict[str, Codes]:
    """Every model's codes over the whole store, as sparse token codes and per-image maxima."""
    layout = image_layout(store)
    t, n_images, s = layout.tokens_per_image, len(layout.image_ids), sae.n_latents
    device = next(sae.parameters()).device
    out = {}
    for name in sae.model_names:
        rows, cols, vals = [], [], []
        bar = tqdm(total=store.n_rows, unit="row", desc=f"encode {name}", disable=not progress)
        for start in range(0, store.n_rows, batch_images * t):
            stop = min(store.n_rows, start + batch_images * t)
            x_bd = torch.from_numpy(store.rows(name, start, stop)).to(device)
            code = sae.encode_sparse(name, x_bd)
            if not isinstance(code, SparseCode):  # BatchTopK: a dense code
                idx = code.nonzero(as_tuple=True)
                rows.append(idx[0].cpu().numpy() + start), cols.append(idx[1].cpu().numpy())
                vals.append(code[idx].float().cpu().numpy())
            else:
                keep = code.val_bk > 0
                r = torch.arange(start, stop, device=device)[:, None].expand_as(code.idx_bk)
                rows.append(r[keep].cpu().numpy()), cols.append(code.idx_bk[keep].cpu().numpy())
                vals.append(code.val_bk[keep].float().cpu().numpy())
            bar.update(stop - start)
        bar.close()
        r, c, v = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
        token_ts = sparse.csr_matrix((v, (r, c)), shape=(store.n_rows, s), dtype=np.float32)
        image_ns = np.zeros((n_images, s), dtype=np.float32)
        np.maximum.at(image_ns, (r // t, c), v)
        out[name] = Codes(token_ts, image_ns)
    return out


def store_pixel_labels(store: Store, progress: bool) -> PixelLabels:
    """Pixel labels of every token of the store (rows in store order), from its images' canonical views."""
    layout = image_layout(store)
    source = source_of(store)
    parts = []
    for image_id in tqdm(layout.image_ids, desc="pixel labels", unit="image", disable=not progress):
        view, alpha = load_source_image(source, image_id, layout.view_size)
        parts.append(pixel_labels(view, layout.grid, alpha))
    return stack_pixel_labels(parts)


def artifact_flags(codes: dict[str, Codes], pixels: PixelLabels, n_top: int) -> dict[str, dict[str, list[float]]]:
    """Per model: for each concept, the share of its top-``n_top`` tokens that are flat / on the border.

    NaN where the concept fires on fewer than ``n_top`` tokens.
    """
    cols = [pixels.names.index(FLAT), pixels.names.index(BORDER)]
    out = {}
    for name, c in codes.items():
        top = top_n(c.token_ts, n_top)
        valid_s = top.fires_s >= n_top
        share = pixels.labels_tl[:, cols][np.clip(top.index_sn, 0, None)].mean(1)  # (s, 2)
        share[~valid_s] = np.nan
        out[name] = {"flat_share": share[:, 0].round(4).tolist(), "border_share": share[:, 1].round(4).tolist()}
    return out


def _family(acts: dict[str, Any], labels: LabelMatrix, cfg: LabelConfig, level: str) -> dict[str, Any]:
    """Naming by one label family, and the same naming on shuffled labels (the chance control)."""
    opts = {
        "n_top": cfg.n_top if level == "image" else cfg.n_top_tokens,
        "n_perm": cfg.n_perm,
        "min_support": cfg.min_support,
        "alpha": cfg.alpha,
    }
    named = name_concepts(acts, labels, seed=cfg.seed, **opts)
    control = shuffled_control(acts, labels, seed=cfg.seed + 1, **opts)
    summary = {k: v for k, v in named._asdict().items() if k != "concepts"}
    return {
        "level": level,
        "labels": labels.names,
        "n_items": int(labels.labels_nl.shape[0]),
        "summary": summary,
        "shuffled": {k: v for k, v in control._asdict().items() if k != "concepts"},
        "concepts": {str(k): entry for k, entry in enumerate(named.concepts)},
    }


def label(cfg: LabelConfig) -> dict[str, Any]:
    """Name the run's concepts on ``cfg.store``; write OUT/labels.json and OUT/names.json; return labels.json."""
    sae = load(cfg.run, device=resolve_device(cfg.device))
    store = open_store(cfg.store)
    missing = [n for n in sae.model_names if store.widths.get(n) != sae.cfg.widths[n]]
    if missing:
        raise UsaeError(f"store {store.path} lacks the run's models {missing} at the run's widths")
    layout = image_layout(store)
    log.info("naming on %s: %d images, %d rows", store.path, len(layout.image_ids), store.n_rows)
    codes = encode_codes(sae, store, cfg.batch_images, cfg.progress)
    families: dict[str, Any] = {}
    found = dataset_labels(store)
    if found is not None:
        source, per_image = found
        family = _family({n: c.image_ns for n, c in codes.items()}, label_matrix(per_image), cfg, "image")
        families["dataset"] = family | {"source": source}
    pixels = store_pixel_labels(store, cfg.progress)
    families["pixels"] = _family(
        {n: c.token_ts for n, c in codes.items()}, LabelMatrix(pixels.labels_tl, pixels.names), cfg, "token"
    )
    result = {
        "labels_version": LABELS_VERSION,
        "run": str(cfg.run),
        "store": {
            "path": str(store.path),
            "hash": store.hash,
            "n_rows": store.n_rows,
            "n_images": len(layout.image_ids),
        },
        "trained_on_this_store": _trained_on(cfg.run, store),
        "model_names": sae.model_names,
        "families": families,
        "artifacts": artifact_flags(codes, pixels, cfg.n_top_tokens),
    }
    out = Path(cfg.out or cfg.run)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / LABELS_JSON, result)
    write_json_atomic(out / NAMES_JSON, concept_names(result))
    log.info("wrote %s", out / LABELS_JSON)
    return result


def _trained_on(run: Path, store: Store) -> bool:
    from usae.run import read_run_config

    return read_run_config(run).get("store", {}).get("hash") == store.hash


def concept_names(result: dict[str, Any]) -> dict[str, str]:
    """{concept: name} for the explorer: each concept's agreeing (else best) significant label per family."""
    names: dict[str, list[str]] = {}
    for family in result["families"].values():
        for k, entry in family["concepts"].items():
            best = entry.get("best")
            if best is not None:
                names.setdefault(k, []).append(best + ("" if entry.get("agrees") else "?"))
    return {k: ", ".join(v) for k, v in sorted(names.items(), key=lambda kv: int(kv[0]))}


def format_labels(result: dict[str, Any], n_show: int = 8) -> str:
    """A short text summary: per family, named concepts vs the shuffled control, and the top agreeing names."""
    lines = []
    for fam, f in result["families"].items():
        s, c = f["summary"], f["shuffled"]
        lines.append(
            f"{fam} ({f['level']} level, {f['n_items']} items, {len(f['labels'])} labels): "
            f"named per model {s['named']} (shuffled labels {c['named']}); "
            f"same name in every model using it: {s['agreed']} of {s['shared']} shared (shuffled {c['agreed']})"
        )
        agreeing = [(k, e) for k, e in f["concepts"].items() if e.get("agrees")]
        agreeing.sort(key=lambda ke: -min(v["precision_at_n"] for m, v in ke[1].items() if isinstance(v, dict)))
        for k, e in agreeing[:n_show]:
            per = ", ".join(
                f"{m} p@N {v['precision_at_n']:.2f} lift {v['lift']:.1f}"
                for m, v in e.items()
                if isinstance(v, dict) and v.get("label") == e["best"]
            )
            lines.append(f"  concept {k}: {e['best']} ({per})")
    return "\n".join(lines)
