"""Coordinated activation maximisation: one concept rendered through each model's own eyes.

For concept k and model i, an image is optimised so that k's *pre-activation* in model i's encoder
(before TopK, so a gradient always exists), averaged over the store grid's tokens, is as large as
possible. The path is the one extraction used: canonical view -> the backbone's own resize and
normalisation -> layer -> alignment to the store grid (``Backbone.tokens``) -> the run's
normalisation and encoder (``UniversalSAE.normalize`` / ``pre_activation``).

The image is MACO's parametrisation (Fel et al. 2023, "Unlocking feature visualization for deeper
networks with magnitude constrained optimization"): only the Fourier *phase* is optimised, the
magnitude spectrum is fixed, so the image keeps natural-image statistics instead of drifting to
high-frequency noise. MACO takes the magnitude from ImageNet; offline we use the 1/f power law
that natural images follow (Field 1987). As in MACO the phase is standardised, and the spatial image
standardised and squashed by a sigmoid into [0, 1]. (Recorrelating colours with the ImageNet colour
matrix, as lucid does for decorrelated pixel parametrisations, cut the reachable activation by 2-4x on
the test models: it shrinks the image's contrast.) Each step scores a batch of random crops (random position and scale, resized back: jitter and zoom) with
Gaussian noise, as MACO does. Every model starts from the same random phase (same seed), so the
panels differ only by what each model needs to see. Deterministic on CPU for a given seed.

Results go to ``OUT/concept-<k>/``: ``<model>.png`` per model, ``panel.png`` (side by side) and
``maximize.json`` (activations before and after, settings); the explorer shows them on the
concept's page.
"""

from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

from usae.checkpoint import load, read_run_config
from usae.config import write_json_atomic
from usae.errors import UsaeError
from usae.sae import UniversalSAE
from usae.store import Store, open_store

log = logging.getLogger(__name__)

RESULT_NAME = "maximize.json"
concept_dir_re = re.compile(r"concept-(\d+)")


def concept_dir(root: str | Path, concept: int) -> Path:
    """Where the maximisation of ``concept`` is written under ``root``."""
    return Path(root) / f"concept-{int(concept)}"


class FourierImage(nn.Module):
    """An image whose Fourier phase is the parameter and whose magnitude spectrum is fixed (MACO)."""

    def __init__(self, size: int, generator: torch.Generator, decay: float = 1.0) -> None:
        super().__init__()
        self.size = int(size)
        f_hw = torch.sqrt(torch.fft.fftfreq(size)[:, None] ** 2 + torch.fft.rfftfreq(size)[None, :] ** 2)
        magnitude = 1.0 / f_hw.clamp_min(1.0 / size) ** decay  # natural images: amplitude ~ 1/f
        self.register_buffer("magnitude", magnitude.expand(3, -1, -1).clone())
        phase = (torch.rand(self.magnitude.shape, generator=generator) * 2 - 1) * math.pi
        self.phase = nn.Parameter(phase)

    def forward(self) -> Tensor:
        """(1, 3, size, size) pixels in [0, 1]."""
        phase = (self.phase - self.phase.mean()) / (self.phase.std() + 1e-5)
        img_chw = torch.fft.irfft2(torch.polar(self.magnitude, phase), s=(self.size, self.size))
        img_chw = (img_chw - img_chw.mean()) / (img_chw.std() + 1e-5)
        return torch.sigmoid(img_chw)[None]


class LatentObjective(nn.Module):
    """pixels (b, 3, S, S) in [0, 1] -> (b,) latent ``latent``'s pre-activation in model ``name``,
    averaged over the store grid's tokens."""

    def __init__(self, sae: UniversalSAE, backbone: nn.Module, name: str, grid: tuple[int, int], latent: int) -> None:
        super().__init__()
        self.sae, self.backbone, self.name, self.grid, self.latent = sae, backbone, name, tuple(grid), int(latent)

    def token_values(self, pixels_b3ss: Tensor) -> Tensor:
        """(b, t): the latent's pre-activation on every token of the store grid."""
        x_btd = self.backbone.tokens(pixels_b3ss, self.grid)
        b, t, d = x_btd.shape
        z_pre_rs = self.sae.pre_activation(self.name, self.sae.normalize(self.name, x_btd.reshape(b * t, d)))
        return z_pre_rs[:, self.latent].view(b, t)

    def forward(self, pixels_b3ss: Tensor) -> Tensor:
        return self.token_values(pixels_b3ss).mean(1)


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


def random_crops(img_13ss: Tensor, n: int, scale: tuple[float, float], generator: torch.Generator) -> Tensor:
    """``n`` random square crops of the image (side a uniform fraction ``scale`` of it), resized back."""
    from torchvision.ops import roi_align

    size = img_13ss.shape[-1]
    side_n = size * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, generator=generator))
    x0_n = (size - side_n) * torch.rand(n, generator=generator)
    y0_n = (size - side_n) * torch.rand(n, generator=generator)
    boxes = torch.stack([torch.zeros(n), x0_n, y0_n, x0_n + side_n, y0_n + side_n], 1).to(img_13ss)
    return roi_align(img_13ss, boxes, output_size=size, sampling_ratio=2, aligned=True)


def run_store(run: str | Path, store: str | Path | Store | None) -> Store:
    """``store``, or the store the run was trained on (RUN/config.json: store.path)."""
    if isinstance(store, Store):
        return store
    if store is None:
        path = read_run_config(Path(run)).get("store", {}).get("path")
        if not path or not Path(path).is_dir():
            raise UsaeError(
                f"{Path(run) / 'config.json'}: field 'store.path' ({path}) is not a store here; pass --store"
            )
        store = path
    return open_store(store)


def load_backbones(store: Store, names: list[str], device: torch.device) -> dict[str, nn.Module]:
    """The backbone each model of the store was extracted with (``extra.backbones``), frozen."""
    from usae.backbones import load_backbone

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
    device: str = "auto",
    progress: bool = True,
) -> MaximizeResult:
    """Optimise one image per model (default: all the run's models) to excite ``concept``.

    ``size``: side of the optimised canonical view (default: the store's view size). ``store``:
    where the backbone specs and token grid are read (default: the run's store).
    """
    from usae.train import resolve_device

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
    settings |= {"lr": lr, "seed": seed, "magnitude": "1/f", "objective": "mean pre-activation over tokens"}
    images, act, start_act, obj, start_obj = {}, {}, {}, {}, {}
    started = time.perf_counter()
    for name in names:
        objective = LatentObjective(sae, backbones[name], name, store.grid, int(concept))
        img, start_t, final_t = _optimize(objective, size, steps, n_crops, crop_scale, noise, lr, seed, progress)
        images[name] = img
        act[name], start_act[name] = float(final_t.clamp_min(0).mean()), float(start_t.clamp_min(0).mean())
        obj[name], start_obj[name] = float(final_t.mean()), float(start_t.mean())
        log.info("concept %d, model %s: activation %.3g -> %.3g", concept, name, start_act[name], act[name])
    settings["seconds"] = round(time.perf_counter() - started, 2)
    return MaximizeResult(int(concept), images, act, start_act, obj, start_obj, settings)


def _optimize(
    objective: LatentObjective,
    size: int,
    steps: int,
    n_crops: int,
    crop_scale,
    noise: float,
    lr: float,
    seed: int,
    progress: bool,
) -> tuple[Image.Image, Tensor, Tensor]:
    """The optimised image and the latent's (t,) token pre-activations on the start and final images."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    device = next(objective.sae.parameters()).device
    param = FourierImage(size, gen).to(device)
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
    pixels = (final_13ss[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(pixels), start_t, final_t


def panel(images: dict[str, Image.Image], captions: dict[str, str]) -> Image.Image:
    """The images side by side, each with its caption underneath."""
    size = max(img.width for img in images.values())
    pad, text_h = 6, 28
    out = Image.new("RGB", (len(images) * (size + pad) + pad, size + text_h + 2 * pad), "white")
    draw, font = ImageDraw.Draw(out), ImageFont.load_default()
    for i, (name, img) in enumerate(images.items()):
        x = pad + i * (size + pad)
        out.paste(img.resize((size, size)), (x, pad))
        for line_no, line in enumerate([name, captions.get(name, "")]):
            draw.text((x, size + pad + 2 + 12 * line_no), line, fill="black", font=font)
    return out


def write_maximization(result: MaximizeResult, out_root: str | Path, concept: int | None = None) -> Path:
    """``OUT/concept-<k>/``: one PNG per model, panel.png and maximize.json; returns the directory."""
    out = concept_dir(out_root, result.concept if concept is None else concept)
    out.mkdir(parents=True, exist_ok=True)
    models = {}
    for i, (name, img) in enumerate(result.images.items()):
        png = f"model-{i}.png"  # model names may hold characters a file name should not
        img.save(out / png)
        models[name] = {
            "png": png,
            "activation": result.activation[name],
            "start_activation": result.start_activation[name],
            "objective": result.objective[name],
            "start_objective": result.start_objective[name],
        }
    captions = {n: f"{result.start_activation[n]:.3g} -> {result.activation[n]:.3g}" for n in result.images}
    panel(result.images, captions).save(out / "panel.png")
    write_json_atomic(out / RESULT_NAME, {"concept": result.concept, "models": models, **result.settings})
    return out


def maximize_cli(cfg: Any) -> list[Path]:
    """``usae maximize RUN --concept K [K ...]``: write each concept's images under --out (default RUN/maximize)."""
    out_root = cfg.out or Path(cfg.run) / "maximize"
    written = []
    for k in cfg.concept:
        result = maximize(
            cfg.run, k, cfg.models, store=cfg.store, steps=cfg.steps, size=cfg.size, n_crops=cfg.n_crops,
            lr=cfg.lr, seed=cfg.seed, device=cfg.device, progress=cfg.progress,
        )  # fmt: skip
        written.append(write_maximization(result, out_root))
    return written


def token_values_of(objective: LatentObjective, image: Image.Image | np.ndarray) -> np.ndarray:
    """(t,) the latent's pre-activation on each token of one RGB uint8 image (e.g. a result PNG)."""
    device = next(objective.sae.parameters()).device
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        return objective.token_values(pixels.to(device))[0].cpu().numpy()
