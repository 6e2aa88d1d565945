"""``usae label``: name every concept from labels of held-out images, with a measured chance level.

Two label families, each scored with ``naming/scores.py`` (precision of a concept's top-N
activations per label, lift over the base rate, AUROC, a permutation p-value for the best label):

* **dataset labels**, per image: those the store records (``usae extract --labels``), else the folders
  an image sits in (``animals/marsupials`` also gives ``animals``); scored on each image's largest code.
* **pixel labels**, per token (``naming/pixels.py``): colour terms, brightness,
  flat / edge / textured, border / centre, foreground / background from the canonical view.

Every family is also run on shuffled labels (the control must name nothing). Per concept and model
the share of its top tokens on flat regions and on the border flags position/background concepts.
"""

from __future__ import annotations

import logging
import math
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy import sparse
from tqdm.auto import tqdm

from usae._io import check_output, write_json_atomic
from usae.config import LabelConfig
from usae.data.store import Store
from usae.errors import UsaeError
from usae.evaluation.classes import USED_CLASSES, energy_share
from usae.evaluation.naming.pixels import PixelLabels, pixel_labels, stack_pixel_labels
from usae.evaluation.naming.scores import LabelMatrix, label_matrix, name_concepts, shuffled_control, top_n
from usae.extraction.images import image_layout, load_source_image, reopen_cached, source_of
from usae.extraction.labels import folder_label
from usae.model.sae import SparseCode, UniversalSAE
from usae.run import open_run_store, trained_store_hash

log = logging.getLogger(__name__)

LABELS_VERSION = 1
LABELS_JSON = "labels.json"
NAMES_JSON = "names.json"
# Pixel labels that describe where a token is or how flat it is: the artifact flags.
FLAT, BORDER = "texture/flat", "position/border"


ARTIFACT_SHARE = 0.5
ARTIFACT_BORDER_LIFT = 2.0
ARTIFACT_TOP = 50
"""The artifact rule, the one definition the table, the concept pages and the index count use.

labels.json records per model and concept the share of its top tokens that are flat regions
(``flat_share``) and that lie on the grid's outer ring (``border_share``); NaN / null where the
model does not use the concept (fires on fewer tokens than the labeller's top-N). A concept is
marked **flat** when ``flat_share >= ARTIFACT_SHARE`` in every model with a share, and **border**
when ``border_share >= max(ARTIFACT_SHARE, ARTIFACT_BORDER_LIFT x ring share)`` in every model
with a share, the ring share being the fraction of all tokens on the border (what a random top-N
gets: 24 of 49 tokens on a 7x7 grid, so a bare 0.5 would mark concepts by chance). A concept no
model has a share for is never marked. The index counts the marked concepts among the
``ARTIFACT_TOP`` universal concepts of most energy (the table's default order).
"""


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
    """Pixel labels of every row of the store (in store order), from its images' canonical views.

    A token-subsampled store's rows get the labels of the grid tokens they hold (``layout.positions``).
    """
    layout = image_layout(store)
    source = source_of(store)
    parts = []
    for j, image_id in enumerate(tqdm(layout.image_ids, desc="pixel labels", unit="image", disable=not progress)):
        view, alpha = load_source_image(source, image_id, layout.view_size)
        labels = pixel_labels(view, layout.grid, alpha)
        parts.append(labels if layout.positions is None else labels.take(layout.positions[j]))
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


def too_small_to_name(store: Store, n_top: int, n_top_tokens: int) -> str | None:
    """Why ``store`` is too small to name concepts on (a one-line reason in images and tokens), or None.

    Naming ranks each concept's top ``n_top`` images (the dataset's labels) and ``n_top_tokens``
    tokens (pixel labels); fewer items than that cannot be ranked.
    """
    n_images = len(store.image_ids or [])  # a store without images: label() says so itself
    if store.image_ids is not None and dataset_labels(store) is not None and n_images < n_top:
        return f"{store.path}: the store has {n_images} images and naming needs at least --n-top {n_top}"
    if store.n_rows < n_top_tokens:
        return (
            f"{store.path}: the store has {store.n_rows} tokens and naming needs at least --n-top-tokens {n_top_tokens}"
        )
    return None


def label(cfg: LabelConfig) -> dict[str, Any]:
    """Name the run's concepts on ``cfg.store``; write OUT/labels.json and OUT/names.json; return labels.json."""
    out = check_output(cfg.out or cfg.run, ("", "usae-run"), reading=(cfg.store,), replaces=False)
    sae, store = open_run_store(cfg.run, cfg.store, cfg.device)
    layout = image_layout(store)
    if (why := too_small_to_name(store, cfg.n_top, cfg.n_top_tokens)) is not None:
        raise UsaeError(f"{why} (lower it, or name on a larger store)")
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
            "grid": list(layout.grid),
            "split": (store.extra.get("split") or {}).get("name"),
        },
        "trained_on_this_store": trained_store_hash(cfg.run) == store.hash,
        "model_names": sae.model_names,
        "families": families,
        "artifacts": artifact_flags(codes, pixels, cfg.n_top_tokens),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / LABELS_JSON, result)
    write_json_atomic(out / NAMES_JSON, concept_names(result))
    log.info("wrote %s", out / LABELS_JSON)
    return result


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


# -- reading labels.json: the artifact rule and the report's summary ----------------------------------
def border_share_by_chance(scored: dict[str, Any], grid: tuple[int, int]) -> float:
    """Share of all tokens on the grid's outer ring: from the pixel labels' support if recorded, else ``grid``."""
    for f in scored["families"].values():
        n_items = f.get("n_items")
        for entry in f["concepts"].values():
            for s in entry.values():
                if isinstance(s, dict) and s.get("label") == BORDER and isinstance(s.get("n"), int) and n_items:
                    return s["n"] / n_items
    h, w = grid
    return (h * w - max(h - 2, 0) * max(w - 2, 0)) / (h * w)


def artifact_share(artifacts: dict[str, Any], model: str, key: str, k: int) -> float | None:
    shares = (artifacts.get(model) or {}).get(key)
    v = shares[k] if shares is not None else None
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def artifact_marks(
    artifacts: dict[str, Any], k: int, model_names: list[str], border_base: float
) -> list[dict[str, Any]]:
    """Concept k's artifact marks (``ARTIFACT_SHARE``'s rule): [{"kind": "flat" | "border", "bar", "shares"}]."""
    bars = {"flat": ARTIFACT_SHARE, "border": max(ARTIFACT_SHARE, ARTIFACT_BORDER_LIFT * border_base)}
    marks = []
    for kind, bar in bars.items():
        shares = {m: v for m in model_names if (v := artifact_share(artifacts, m, f"{kind}_share", k)) is not None}
        if shares and all(v >= bar for v in shares.values()):
            marks.append({"kind": kind, "bar": bar, "shares": shares})
    return marks


def naming_summary(labels: dict[str, Any], report: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    """What report.md shows of labels.json measured on ``report``'s store.

    Per family and concept class: how many concepts of the class get the same name beyond chance in
    every model that uses them, beside the shuffled-label control's total; and how many of the
    ``ARTIFACT_TOP`` universal concepts of most energy share carry an artifact mark.
    """
    names = report["model_names"]
    share_s = energy_share(report).sum(0)
    families = {}
    for fam, f in labels["families"].items():
        agreed = {int(k) for k, e in f["concepts"].items() if e.get("agrees")}
        per_class = {c: {"n": classes.count(c), "named": sum(classes[k] == c for k in agreed)} for c in USED_CLASSES}
        families[fam] = {"level": f["level"], "n_items": f["n_items"], "n_labels": len(f["labels"]), "classes": per_class,
                         "agreed": f["summary"]["agreed"], "shuffled_agreed": f["shuffled"]["agreed"]}  # fmt: skip
    universal = [k for k in np.argsort(-share_s, kind="stable") if classes[k] == "universal"][:ARTIFACT_TOP]
    base = border_share_by_chance(labels, tuple(labels["store"].get("grid") or (1, 1)))
    marks = [artifact_marks(labels.get("artifacts", {}), int(k), names, base) for k in universal]
    kinds = [m["kind"] for ms in marks for m in ms]
    artifacts = {
        "n": len(universal),
        "marked": sum(bool(ms) for ms in marks),
        "flat": kinds.count("flat"),
        "border": kinds.count("border"),
    }
    return {"families": families, "artifacts": artifacts, "store": labels["store"]}


def label_command(cfg: LabelConfig) -> str:
    """``usae label``: what the command prints."""
    return format_labels(label(cfg)) + f"\n\nlabels: {(cfg.out or cfg.run) / LABELS_JSON}"
