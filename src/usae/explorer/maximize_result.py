"""What a coordinated maximisation returns and writes: ``MaximizeResult`` and ``OUT/concept-<k>/``.

``OUT/concept-<k>/`` holds ``model-<i>.png`` per model (run order), ``panel.png`` (side by side) and
``maximize.json`` (activations before and after, scores, best natural images, transfer matrix,
settings; docs/explore.md lists its fields). :func:`read_maximization` reads old and new files alike;
:func:`copy_maximizations` brings RUN/maximize's results into the explorer site.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image, ImageDraw, ImageFont

from usae._io import read_json, write_json_atomic
from usae.errors import UsaeError
from usae.explorer.concepts import writing
from usae.run import MAXIMIZE_RESULT_NAME, concept_dir, concept_of_dir

log = logging.getLogger(__name__)


class NaturalBest(NamedTuple):
    """The store image where a concept fires most in one model."""

    score: float
    """The concept's largest code over the store's tokens of this model (0: it never fires)."""
    image_index: int
    """Store image index (-1 when the concept never fires)."""
    image_id: str | None


class MaximizeResult(NamedTuple):
    """What ``maximize`` returns (one entry per model, in run order)."""

    concept: int
    images: dict[str, Image.Image]
    """The optimised canonical view per model (RGB, size x size)."""
    activation: dict[str, float]
    """How strongly the concept fires on the final image: max(pre-activation, 0) averaged over tokens."""
    start_activation: dict[str, float]
    """The same on the starting image (random phase, the same image for every model)."""
    objective: dict[str, float]
    """The optimised objective on the final image: the pre-activation averaged over tokens."""
    start_objective: dict[str, float]
    settings: dict[str, Any]
    score: dict[str, float] | None = None
    """The concept's largest code over the final image's tokens (the explorer's image score)."""
    natural: dict[str, NaturalBest] | None = None
    """Per model, the store image where the concept fires most (None: not compared)."""
    transfer: dict[str, dict[str, float]] | None = None
    """``transfer[i][j]``: score of the image optimised for model i, measured in model j."""
    transfer_activation: dict[str, dict[str, float]] | None = None
    """The same for ``activation`` (mean of max(pre-activation, 0) over tokens)."""

    def superstimulus(self) -> dict[str, float | None]:
        """Per model: score of its optimised image / score of the best natural image (> 1: a
        superstimulus); None where not compared or the concept never fires on the store."""
        out: dict[str, float | None] = {}
        for name in self.images:
            best = (self.natural or {}).get(name)
            out[name] = self.score[name] / best.score if self.score and best and best.score > 0 else None
        return out

    def transfer_ratio(self) -> dict[str, dict[str, float | None]] | None:
        """``transfer`` divided by the measuring model's best natural score (the diagonal is
        ``superstimulus``); None when not compared."""
        if self.transfer is None or not self.natural:
            return None
        return {
            i: {j: (v / self.natural[j].score if j in self.natural and self.natural[j].score > 0 else None)
                for j, v in row.items()}
            for i, row in self.transfer.items()
        }  # fmt: skip


def panel(images: dict[str, Image.Image], captions: dict[str, str]) -> Image.Image:
    """The images side by side, each with its caption (one or more lines) underneath."""
    size = max(img.width for img in images.values())
    n_lines = 1 + max((len(c.splitlines()) for c in captions.values()), default=0)
    pad, text_h = 6, 4 + 12 * n_lines
    out = Image.new("RGB", (len(images) * (size + pad) + pad, size + text_h + 2 * pad), "white")
    draw, font = ImageDraw.Draw(out), ImageFont.load_default()
    for i, (name, img) in enumerate(images.items()):
        x = pad + i * (size + pad)
        out.paste(img.resize((size, size)), (x, pad))
        for line_no, line in enumerate([name, *captions.get(name, "").splitlines()]):
            draw.text((x, size + pad + 2 + 12 * line_no), line, fill="black", font=font)
    return out


def _natural_json(best: NaturalBest | None) -> dict[str, Any] | None:
    return None if best is None else {"score": best.score, "image_index": best.image_index, "image_id": best.image_id}


def result_json(result: MaximizeResult) -> dict[str, Any]:
    """The ``maximize.json`` object of a result (``png`` names: ``model-<i>.png`` in run order)."""
    ratio = result.superstimulus()
    models = {}
    for i, name in enumerate(result.images):
        models[name] = {
            "png": f"model-{i}.png",  # model names may hold characters a file name should not
            "activation": result.activation[name],
            "start_activation": result.start_activation[name],
            "objective": result.objective[name],
            "start_objective": result.start_objective[name],
            "score": result.score[name] if result.score else None,
            "natural": _natural_json((result.natural or {}).get(name)),
            "superstimulus": ratio[name],
        }
    transfer = None
    if result.transfer is not None:
        names = list(result.images)
        ratios = result.transfer_ratio()
        transfer = {
            "models": names,
            "score": [[result.transfer[i][j] for j in names] for i in names],
            "activation": [[result.transfer_activation[i][j] for j in names] for i in names],
            "ratio": [[ratios[i][j] for j in names] for i in names] if ratios else None,
        }
    return {"concept": result.concept, "models": models, "transfer": transfer, **result.settings}


def write_maximization(result: MaximizeResult, out_root: str | Path, concept: int | None = None) -> Path:
    """``OUT/concept-<k>/``: one PNG per model, panel.png and maximize.json; returns the directory."""
    out = concept_dir(out_root, result.concept if concept is None else concept)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    data = result_json(result)
    for name, img in result.images.items():
        with writing(out / data["models"][name]["png"]) as path:
            img.save(path)
    captions = {}
    for name, entry in data["models"].items():
        lines = [f"{entry['start_activation']:.3g} -> {entry['activation']:.3g}"]
        if entry["superstimulus"] is not None:
            lines.append(f"{entry['superstimulus']:.2g}x best photo")
        captions[name] = "\n".join(lines)
    with writing(out / "panel.png") as path:
        panel(result.images, captions).save(path)
    write_json_atomic(out / MAXIMIZE_RESULT_NAME, data)
    return out


def read_maximization(path: str | Path) -> dict[str, Any]:
    """A ``maximize.json`` (or its ``concept-<k>`` directory), older files included: fields added
    since (per model ``score``, ``natural``, ``superstimulus``; ``transfer``) are None when absent,
    and ``magnitude`` is ``"1/f"`` (the only spectrum before the data spectrum)."""
    path = Path(path)
    data = read_json(path / MAXIMIZE_RESULT_NAME if path.is_dir() else path, "maximisation result")
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise UsaeError(f"{path}: not a maximisation result (no 'models' object)")
    data.setdefault("transfer", None)
    data.setdefault("magnitude", "1/f")
    for entry in data["models"].values():
        for key in ("score", "natural", "superstimulus"):
            entry.setdefault(key, None)
    return data


def copy_maximizations(max_dir: Path, site_dir: Path, names: list[str]) -> dict[int, dict[str, Any]]:
    """Copy every ``max_dir/concept-<k>/`` result (RUN/maximize) into ``site_dir/max/<k>/``; concept ->
    what its page shows. An unreadable result is skipped with a warning."""
    found = {}
    for src in sorted(max_dir.glob("concept-*")) if max_dir.is_dir() else []:
        k = concept_of_dir(src)
        if k is None or not (src / MAXIMIZE_RESULT_NAME).is_file():
            continue
        try:
            result = read_maximization(src)
        except UsaeError as e:
            log.warning("%s; not shown", e)
            continue
        dst = site_dir / "max" / str(k)
        with writing(dst):
            dst.mkdir(parents=True)
        models = []
        for name, r in result["models"].items():
            if name in names and (src / r["png"]).is_file():
                with writing(dst / r["png"]):
                    shutil.copy2(src / r["png"], dst / r["png"])
                models.append({"name": name, "src": f"../max/{k}/{r['png']}", **r})
        if models:
            keys = ("steps", "seed", "magnitude", "transfer")
            found[k] = {"models": models, **{key: result.get(key) for key in keys}}
    return found
