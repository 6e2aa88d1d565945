"""Concept classes: which latents are universal, partial, specific, rare or dead, from a report's counts.

The rules themselves are ``usae.model.metrics.used_latents`` / ``classify_latents`` (pure tensors);
this module applies them to a report (report.json) with its recorded thresholds, counts classes per
model and ranks top concepts by scale-free energy. docs/report.md defines every rule.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from usae.config.evaluate import ClassThresholds
from usae.model import metrics
from usae.model.metrics import CLASSES, USED_CLASSES


def thresholds_of(report: dict[str, Any]) -> ClassThresholds:
    """The thresholds a report records under classes.thresholds; defaults for those it lacks (older reports)."""
    return ClassThresholds.from_dict(report.get("classes", {}).get("thresholds") or {})


def report_fires_ms(report: dict[str, Any]) -> np.ndarray:
    return np.array([report["fires"][n] for n in report["model_names"]], dtype=np.float64)


def floats(values: list[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def used(report: dict[str, Any], thresholds: ClassThresholds) -> np.ndarray:
    """Bool (m, s): which model uses which latent under the support rule of ``thresholds``."""
    fires = torch.from_numpy(report_fires_ms(report))
    return metrics.used_latents(fires, report["n_rows"], thresholds).numpy()


def classify(report: dict[str, Any], thresholds: ClassThresholds) -> list[str]:
    """Per-latent class labels recomputed from the report's fire and co-fire counts with ``thresholds``."""
    fires = torch.from_numpy(report_fires_ms(report))
    cofires = torch.tensor(report["cofiring"]["cofires"], dtype=torch.float64)
    return metrics.classify_latents(fires, report["n_rows"], cofires_s=cofires, thresholds=thresholds)


def class_counts(report: dict[str, Any], labels: list[str], thresholds: ClassThresholds) -> dict[str, Any]:
    """Counts per class, and per model: how many latents of each used class that model uses."""
    names, labels_s = report["model_names"], np.asarray(labels)
    used_ms = used(report, thresholds)
    per_model = {n: {c: int((used_ms[i] & (labels_s == c)).sum()) for c in USED_CLASSES} for i, n in enumerate(names)}
    return {"total": {c: int((labels_s == c).sum()) for c in CLASSES}, "per_model": per_model}


def energy_share(report: dict[str, Any]) -> np.ndarray:
    """(m, s): each model's energy divided by that model's total energy over latents (0 if it has none).

    Raw energy scales with the square of a model's activation scale, so summing it over models lets
    the model with the largest activations decide; shares sum to 1 per model and are scale-free.
    """
    energy_ms = np.array([report["energy"][n] for n in report["model_names"]], dtype=np.float64)
    total_m1 = energy_ms.sum(1, keepdims=True)
    return np.divide(energy_ms, total_m1, out=np.zeros_like(energy_ms), where=total_m1 > 0)


def top_concepts(report: dict[str, Any], labels: list[str], n_top: int = 8) -> dict[str, list[dict[str, Any]]]:
    """Per used class, the ``n_top`` latents of highest energy share summed over models (``energy_share``)."""
    names = report["model_names"]
    energy_ms, share_ms = np.array([report["energy"][n] for n in names]), energy_share(report)
    fires_ms, fe_s = report_fires_ms(report), floats(report["firing_entropy"])
    cfp_ms = np.array([floats(report["cofiring"]["proportion"][n]) for n in names])
    score_s = share_ms.sum(0)
    order = np.argsort(-score_s, kind="stable")
    out = {}
    for c in USED_CLASSES:
        rows = [s for s in order if labels[s] == c][:n_top]
        out[c] = [
            {
                "latent": int(s),
                "fe": fe_s[s],
                "per_1k": [1000 * fires_ms[i, s] / report["n_rows"] for i in range(len(names))],
                "energy": energy_ms[:, s].tolist(),
                "energy_share": share_ms[:, s].tolist(),
                "score": float(score_s[s]),
                "cfp": cfp_ms[:, s].tolist(),
            }
            for s in rows
        ]
    return out
