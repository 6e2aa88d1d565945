"""The splice measures: task fidelity of a spliced output against the clean one, per image; loss recovered.

Pure tensor functions (classifier logits: top-1 agreement, KL(clean ‖ spliced), cross-entropy
against the clean top-1; dense maps: Pearson correlation, MSE) and the running sums that turn them
into one cell of splice.json. Definitions: ``fidelity/splice.py``'s docstring.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from usae._input import NUMBER, NUMBER_OR_NULL, Maybe
from usae.errors import UsaeError

SPLICE_JSON = "splice.json"
CONTROLS = ("mean_ablation", "zero_ablation", "resample_only", "independent_sae")
MATRICES = ("agreement", "kl", "ce_top1", "loss_recovered", "correlation", "mse")
CLASSIFIER_MEASURES = ("agreement", "kl", "ce_top1")
DENSE_MEASURES = ("correlation", "mse")
DIVERGENCE = {"classifier": "kl", "dense": "mse"}


def top1_agreement(clean_logits_bc: Tensor, logits_bc: Tensor) -> Tensor:
    """(b,) 1.0 where the spliced top-1 class is the clean one, else 0.0."""
    return (logits_bc.argmax(1) == clean_logits_bc.argmax(1)).double()


def kl_to_clean(clean_logits_bc: Tensor, logits_bc: Tensor) -> Tensor:
    """(b,) KL(softmax(clean) ‖ softmax(spliced)) in nats."""
    logp_bc = F.log_softmax(clean_logits_bc.double(), 1)
    logq_bc = F.log_softmax(logits_bc.double(), 1)
    return (logp_bc.exp() * (logp_bc - logq_bc)).sum(1).clamp_min(0.0)


def clean_top1_loss(clean_logits_bc: Tensor, logits_bc: Tensor) -> Tensor:
    """(b,) cross-entropy of the spliced logits against the clean model's top-1 class."""
    return F.cross_entropy(logits_bc.double(), clean_logits_bc.argmax(1), reduction="none")


def map_correlation(clean_b_: Tensor, spliced_b_: Tensor) -> Tensor:
    """(b,) Pearson correlation of each image's flattened spliced map with its clean map; 0 if either is constant."""
    a_bn = clean_b_.reshape(clean_b_.shape[0], -1).double()
    c_bn = spliced_b_.reshape(spliced_b_.shape[0], -1).double()
    a_bn = a_bn - a_bn.mean(1, keepdim=True)
    c_bn = c_bn - c_bn.mean(1, keepdim=True)
    norm_b = a_bn.norm(dim=1) * c_bn.norm(dim=1)
    r_b = (a_bn * c_bn).sum(1) / norm_b.clamp_min(1e-300)
    return torch.where(norm_b > 0, r_b, torch.zeros_like(r_b))


def map_mse(clean_b_: Tensor, spliced_b_: Tensor) -> Tensor:
    """(b,) mean squared difference of each image's maps."""
    diff_bn = (spliced_b_.double() - clean_b_.double()).reshape(clean_b_.shape[0], -1)
    return diff_bn.pow(2).mean(1)


def loss_recovered(floor: float, spliced: float, clean: float = 0.0) -> float | None:
    """(floor − spliced) / (floor − clean): 1 at the clean loss, 0 at the floor; None when floor ≈ clean."""
    gap = floor - clean
    if not np.isfinite(gap) or abs(gap) <= 1e-12 * max(abs(floor), abs(clean), 1e-300):
        return None
    return float((floor - spliced) / gap)


def task_measures(task: str, clean_out: Tensor, out: Tensor) -> dict[str, Tensor]:
    """Every per-image measure of ``task`` ('classifier' or 'dense'): name -> (b,) float64."""
    if task == "classifier":
        return {
            "agreement": top1_agreement(clean_out, out),
            "kl": kl_to_clean(clean_out, out),
            "ce_top1": clean_top1_loss(clean_out, out),
        }
    return {"correlation": map_correlation(clean_out, out), "mse": map_mse(clean_out, out)}


def tokens_to_native(x_btd: Tensor, grid: tuple[int, int], native: tuple[int, int]) -> Tensor:
    """(b, H·W, d) tokens on the store grid -> (b, d, h, w) native map (bilinear, pixel centres aligned)."""
    b, t, d = x_btd.shape
    h, w = grid
    if t != h * w:
        raise UsaeError(f"splice: {t} tokens do not tile a {h}x{w} grid")
    map_bdhw = x_btd.transpose(1, 2).reshape(b, d, h, w)
    if (h, w) == tuple(native):
        return map_bdhw.contiguous()
    shrink = native[0] < h or native[1] < w
    return F.interpolate(map_bdhw, size=tuple(native), mode="bilinear", align_corners=False, antialias=shrink)


class SpliceSums:
    """Per-image measures summed in float64 (means at the end)."""

    def __init__(self) -> None:
        self.n = 0
        self.sums: dict[str, float] = {}

    def add(self, values: dict[str, Tensor]) -> None:
        for key, v_b in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(v_b.sum())
        self.n += int(next(iter(values.values())).shape[0])

    def means(self) -> dict[str, float]:
        return {k: v / self.n for k, v in self.sums.items()} if self.n else {}


def finite_or_none(v: float | None) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


def splice_cell(task: str, sums: SpliceSums, floor: SpliceSums) -> dict[str, float | None]:
    means, floor_means = sums.means(), floor.means()
    key = DIVERGENCE[task]
    cell: dict[str, float | None] = {k: finite_or_none(v) for k, v in means.items()}
    cell["loss_recovered"] = finite_or_none(
        loss_recovered(floor_means.get(key, float("nan")), means.get(key, float("nan")))
    )
    return cell


def headline(result: dict, j: str) -> str:
    """The measure splice.json's tables and figure show first for destination ``j``: its task's fidelity."""
    return "agreement" if result["task"].get(j) == "classifier" else "correlation"


# What report.md reads of RUN/splice.json (check_schema: a hand edit of the wrong type is one line)
SPLICE_SCHEMA = {
    "models": [str],
    "task": {str: Maybe(str)},
    "available": {str: bool},
    "matrices": {str: [[NUMBER_OR_NULL]]},
    "controls": {str: {str: Maybe({str: NUMBER_OR_NULL})}},
    "n_images": NUMBER,
    "store": str,
    "unavailable_reasons": Maybe({str: str}),
}
