"""Coordinated activation maximisation: one concept rendered through each model's own eyes.

For concept k and model i, an image is optimised so that k's *pre-activation* in model i's encoder
(before TopK, so a gradient always exists), averaged over the store grid's tokens, is as large as
possible. The path is the one extraction used: canonical view -> the backbone's own resize and
normalisation -> layer -> alignment to the store grid (``Backbone.tokens``) -> the run's
normalisation and encoder (``UniversalSAE.normalize`` / ``pre_activation``).

The image is MACO's parametrisation (Fel et al. 2023, "Unlocking feature visualization for deeper
networks with magnitude constrained optimization"): only the Fourier *phase* is optimised, the
magnitude spectrum is fixed, so the image keeps natural-image statistics instead of drifting to
high-frequency noise. MACO takes the magnitude from ImageNet; we estimate it from the store's own
images (``usae.explorer.spectrum``: mean magnitude spectrum of their canonical views in the
principal axes of their colours, cached as ``RUN/maximize/spectrum-<size>.safetensors``). The three
decorrelated channels (roughly luminance and two opponent colours) each get their phase and are
mixed back to RGB with that colour basis, so colours co-vary as in the data. Without images (or with
``spectrum="1/f"``) the magnitude is the 1/f power law natural images roughly follow (Field 1987),
in R, G, B. (Recorrelating 1/f channels with lucid's ImageNet colour matrix cut the reachable
activation 2-4x on the test models: it shrinks the image's contrast.) As in MACO the phase is
standardised, and the spatial image standardised and squashed by a sigmoid into [0, 1]. Each step
scores a batch of random crops (random position and scale, resized back: jitter and zoom) with
Gaussian noise, as MACO does. Every model starts from the same random phase (same seed), so the
panels differ only by what each model needs to see. Deterministic on CPU for a given seed.

Each result is compared with natural images: per model, the optimised image's *score* (the
concept's largest code over its tokens, the explorer's image score) against the best natural
image's (the largest code over all the store's tokens, one streaming pass): a ratio above 1 is a
superstimulus. And *transfer*: the image optimised for model i measured in every model j.

Results go to ``OUT/concept-<k>/``: ``model-<i>.png`` per model, ``panel.png`` (side by side) and
``maximize.json`` (activations before and after, scores, best natural images, transfer matrix,
settings; :func:`read_maximization` reads old and new files alike); the explorer shows them on the
concept's page.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

from usae._io import check_output, read_json, write_json_atomic
from usae.config import MaximizeConfig
from usae.data.store import Store, open_store
from usae.errors import UsaeError
from usae.explorer.concepts import scan_top_images, writing
from usae.explorer.maco import FourierImage, LatentObjective, random_crops, to_image
from usae.explorer.spectrum import MAX_IMAGES, data_spectrum
from usae.model.sae import UniversalSAE
from usae.run import load, trained_store_dir

log = logging.getLogger(__name__)

RESULT_NAME = "maximize.json"
concept_dir_re = re.compile(r"concept-(\d+)")
Spectrum = Literal["data", "1/f"]
SPECTRA = ("data", "1/f")


def concept_dir(root: str | Path, concept: int) -> Path:
    """Where the maximisation of ``concept`` is written under ``root``."""
    return Path(root) / f"concept-{int(concept)}"


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


def run_store(run: str | Path, store: str | Path | Store | None) -> Store:
    """``store``, or the store the run was trained on (RUN/config.json: store.path, see :func:`trained_store_dir`)."""
    if isinstance(store, Store):
        return store
    return open_store(trained_store_dir(run) if store is None else store)


def load_backbones(store: Store, names: list[str], device: torch.device) -> dict[str, nn.Module]:
    """The backbone each model of the store was extracted with (``extra.backbones``), frozen."""
    from usae.extraction.backbones import load_backbone

    random_init = bool(store.extra.get("extract", {}).get("random_init", False))  # as extracted
    recorded = {b.get("name"): b for b in store.extra.get("backbones", []) if isinstance(b, dict)}
    out = {}
    for name in names:
        if name not in recorded or "spec" not in recorded[name]:
            raise UsaeError(f"{store.path / 'metadata.json'}: field 'extra.backbones' has no spec for model {name!r}")
        backbone = load_backbone(recorded[name]["spec"], pretrained=not random_init, device=device)
        if backbone.width != store.widths[name]:
            raise UsaeError(f"model {name!r}: backbone width {backbone.width} != store width {store.widths[name]}")
        out[name] = backbone
    return out


def has_images(store: Store) -> bool:
    """Whether the store records its images (source and layout), so the data spectrum can be estimated."""
    return isinstance(store.extra.get("images"), dict) and store.image_ids is not None


def natural_best(
    sae: UniversalSAE,
    store: Store,
    concepts: Sequence[int],
    *,
    batch_images: int = 64,
    progress: bool = True,
) -> dict[int, dict[str, NaturalBest]]:
    """Per concept and model, the store image where the concept fires most: one streaming pass
    (``concepts.scan_top_images``) over every image, for all ``concepts`` at once."""
    from usae.extraction.images import image_layout

    concepts = [int(k) for k in concepts]
    ids = image_layout(store).image_ids
    top = scan_top_images(sae, store, 1, latents=concepts, batch_images=batch_images, progress=progress)
    out: dict[int, dict[str, NaturalBest]] = {k: {} for k in concepts}
    for i, name in enumerate(sae.model_names):
        for c, k in enumerate(concepts):
            j, v = int(top.image_msn[i, c, 0]), float(top.value_msn[i, c, 0])
            out[k][name] = NaturalBest(v if j >= 0 else 0.0, j, ids[j] if j >= 0 else None)
    return out


def _can_compare(sae: UniversalSAE, store: Store) -> bool:
    """A store with an image layout and all the run's models (what the streaming pass reads)."""
    if store.image_ids is None or store.tokens_per_image is None:
        log.info("store %s records no image layout: no comparison with natural images", store.path)
        return False
    missing = [n for n in sae.model_names if store.widths.get(n) != sae.cfg.widths[n]]
    if missing:
        log.warning(
            "store %s lacks models %s at the run's widths: no comparison with natural images", store.path, missing
        )
        return False
    return True


def maximize(
    run: str | Path,
    concept: int,
    models: list[str] | tuple[str, ...] | None = None,
    *,
    store: str | Path | Store | None = None,
    steps: int = 256,
    size: int | None = None,
    n_crops: int = 6,
    crop_scale: tuple[float, float] = (0.8, 1.0),
    noise: float = 0.05,
    lr: float = 1.0,
    seed: int = 0,
    spectrum: Spectrum | None = None,
    spectrum_images: int = MAX_IMAGES,
    compare: bool = True,
    natural: Mapping[str, NaturalBest] | None = None,
    device: str = "auto",
    progress: bool = True,
) -> MaximizeResult:
    """Optimise one image per model (default: all the run's models) to excite ``concept``.

    ``size``: side of the optimised canonical view (default: the store's view size). ``store``:
    where the backbone specs, token grid and images are read (default: the run's store).
    ``spectrum``: MACO's fixed magnitude, ``"data"`` (the mean spectrum of at most
    ``spectrum_images`` of the store's images, cached in RUN/maximize) or ``"1/f"``; default
    ``"data"`` when the store records its images, else ``"1/f"``. ``compare``: also find the best
    natural image per model (one pass over the store; or pass ``natural``, from
    :func:`natural_best`) and measure every image in every model (``transfer``).
    """
    from usae.device import resolve_device

    if spectrum not in (None, *SPECTRA):
        raise UsaeError(f"spectrum {spectrum!r}: choose one of {', '.join(SPECTRA)}")
    dev = resolve_device(device)
    sae = load(run, device=dev)
    if not 0 <= int(concept) < sae.n_latents:
        raise UsaeError(f"--concept {concept} outside [0, {sae.n_latents})")
    names = list(models) if models else sae.model_names
    for name in names:
        sae.head(name)  # unknown model -> UsaeError naming the run's models
    store = run_store(run, store)
    if store.grid is None:
        raise UsaeError(f"{store.path / 'metadata.json'}: no token grid; make the store with `usae extract`")
    backbones = load_backbones(store, names, dev)
    size = int(size or store.extra.get("view_size") or max(b.input_size for b in backbones.values()))
    settings = {"steps": steps, "size": size, "n_crops": n_crops, "crop_scale": list(crop_scale), "noise": noise}
    settings |= {"lr": lr, "seed": seed, "objective": "mean pre-activation over tokens"}
    magnitude = colour = None
    spectrum = spectrum or ("data" if has_images(store) else "1/f")
    if spectrum == "data":
        if not has_images(store):
            raise UsaeError(f"{store.path / 'metadata.json'}: no image source (extra.images); use spectrum '1/f'")
        data = data_spectrum(store, size, Path(run) / "maximize", spectrum_images, progress=progress)
        magnitude, colour = data.magnitude, data.colour
        settings |= {"spectrum_images": data.images, "colour_basis": data.colour.T.tolist()}
    settings["magnitude"] = spectrum
    if compare and natural is None and _can_compare(sae, store):
        natural = natural_best(sae, store, [int(concept)], progress=progress)[int(concept)]
    images, finals, act, start_act, obj, start_obj = {}, {}, {}, {}, {}, {}
    started = time.perf_counter()
    for name in names:
        objective = LatentObjective(sae, backbones[name], name, store.grid, int(concept))
        final_13ss, start_t, final_t = _optimize(
            objective, size, steps, n_crops, crop_scale, noise, lr, seed, magnitude, colour, progress
        )
        images[name], finals[name] = to_image(final_13ss), final_13ss
        act[name], start_act[name] = float(final_t.clamp_min(0).mean()), float(start_t.clamp_min(0).mean())
        obj[name], start_obj[name] = float(final_t.mean()), float(start_t.mean())
        log.info("concept %d, model %s: activation %.3g -> %.3g", concept, name, start_act[name], act[name])
    settings["seconds"] = round(time.perf_counter() - started, 2)
    result = MaximizeResult(int(concept), images, act, start_act, obj, start_obj, settings)
    if not compare:
        return result
    # every optimised image through every model: its score (largest code) and mean activation
    score_ij: dict[str, dict[str, float]] = {i: {} for i in names}
    act_ij: dict[str, dict[str, float]] = {i: {} for i in names}
    for j in names:
        objective = LatentObjective(sae, backbones[j], j, store.grid, int(concept))
        for i in names:
            pre_t, code_t = (v[0].cpu() for v in objective.token_codes(finals[i]))
            score_ij[i][j], act_ij[i][j] = float(code_t.max()), float(pre_t.clamp_min(0).mean())
    kept = {n: natural[n] for n in names if n in natural} if natural is not None else None
    result = result._replace(
        score={n: score_ij[n][n] for n in names}, natural=kept, transfer=score_ij, transfer_activation=act_ij
    )
    for name, ratio in result.superstimulus().items():
        if ratio is not None:
            log.info("concept %d, model %s: %.3g x the best natural image's score", concept, name, ratio)
    return result


def _optimize(
    objective: LatentObjective,
    size: int,
    steps: int,
    n_crops: int,
    crop_scale,
    noise: float,
    lr: float,
    seed: int,
    magnitude: Tensor | None,
    colour: Tensor | None,
    progress: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The optimised (1, 3, S, S) pixels and the latent's (t,) token pre-activations on the start
    and final images."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    device = next(objective.sae.parameters()).device
    param = FourierImage(size, gen, magnitude=magnitude, colour=colour).to(device)
    opt = torch.optim.NAdam(param.parameters(), lr=lr)
    with torch.no_grad():
        start_t = objective.token_values(param())[0].cpu()
    bar = tqdm(range(steps), desc=f"maximize {objective.name}", unit="step", disable=not progress)
    for _ in bar:
        crops = random_crops(param(), n_crops, crop_scale, gen)
        crops = crops + noise * torch.randn(crops.shape, generator=gen).to(crops)
        loss = -objective(crops).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(activation=f"{-loss.item():.3g}", refresh=False)
    with torch.no_grad():
        final_13ss = param()
        final_t = objective.token_values(final_13ss)[0].cpu()
    return final_13ss.detach(), start_t, final_t


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
    write_json_atomic(out / RESULT_NAME, data)
    return out


def read_maximization(path: str | Path) -> dict[str, Any]:
    """A ``maximize.json`` (or its ``concept-<k>`` directory), older files included: fields added
    since (per model ``score``, ``natural``, ``superstimulus``; ``transfer``) are None when absent,
    and ``magnitude`` is ``"1/f"`` (the only spectrum before the data spectrum)."""
    path = Path(path)
    data = read_json(path / RESULT_NAME if path.is_dir() else path, "maximisation result")
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise UsaeError(f"{path}: not a maximisation result (no 'models' object)")
    data.setdefault("transfer", None)
    data.setdefault("magnitude", "1/f")
    for entry in data["models"].values():
        for key in ("score", "natural", "superstimulus"):
            entry.setdefault(key, None)
    return data


def maximize_cli(cfg: MaximizeConfig) -> list[Path]:
    """``usae maximize RUN --concept K [K ...]``: write each concept's images under --out (default RUN/maximize).

    The best natural images of all the concepts are found in one pass over the store.
    """
    from usae.device import resolve_device

    out_root = check_output(
        cfg.out or Path(cfg.run) / "maximize", "", reading=(cfg.store,) if cfg.store else (), replaces=False
    )
    compare = cfg.compare
    natural: dict[int, dict[str, NaturalBest]] = {}
    if compare:
        sae = load(cfg.run, device=resolve_device(cfg.device))
        store = run_store(cfg.run, cfg.store)
        if _can_compare(sae, store):
            natural = natural_best(sae, store, cfg.concept, progress=cfg.progress)
        del sae
    written = []
    for k in cfg.concept:
        result = maximize(
            cfg.run, k, cfg.models, store=cfg.store, steps=cfg.steps, size=cfg.size, n_crops=cfg.n_crops,
            lr=cfg.lr, seed=cfg.seed, spectrum=cfg.spectrum,
            spectrum_images=cfg.spectrum_images, compare=compare,
            natural=natural.get(int(k), {}) if compare else None, device=cfg.device, progress=cfg.progress,
        )  # fmt: skip
        written.append(write_maximization(result, out_root))
    return written


def token_values_of(objective: LatentObjective, image: Image.Image | np.ndarray) -> np.ndarray:
    """(t,) the latent's pre-activation on each token of one RGB uint8 image (e.g. a result PNG)."""
    device = next(objective.sae.parameters()).device
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        return objective.token_values(pixels.to(device))[0].cpu().numpy()


def maximize_command(cfg: MaximizeConfig) -> str:
    """``usae maximize``: what the command prints."""
    return "\n".join(f"maximisation: {out / 'panel.png'}" for out in maximize_cli(cfg))
