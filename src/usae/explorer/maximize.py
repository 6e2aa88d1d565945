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

``maximize(cfg)`` is ``usae maximize``: it writes each concept's result to ``OUT/concept-<k>/``
(``usae.explorer.maximize_result``), where the explorer shows it on the concept's page.
``maximize(run, concept, ...)`` (``maximize_concept``) is the notebook's way: it builds the same
``MaximizeConfig`` for one concept and returns the result without writing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, overload

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from usae._io import check_output
from usae.config import MaximizeConfig
from usae.data.store import Store, open_store
from usae.errors import UsaeError
from usae.explorer.concepts import scan_top_images
from usae.explorer.maco import FourierImage, LatentObjective, random_crops, to_image
from usae.explorer.maximize_result import MaximizeResult, NaturalBest, write_maximization
from usae.explorer.spectrum import data_spectrum
from usae.model.sae import UniversalSAE
from usae.run import load, maximize_dir, open_run_store, trained_store_dir

log = logging.getLogger(__name__)


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
    try:
        open_run_store(sae, store, "cpu")  # the one "are the run's models in this store" check
    except UsaeError as e:
        log.warning("%s: no comparison with natural images", e)
        return False
    return True


class _Setup(NamedTuple):
    """What every concept of one maximisation shares: the run, the store, the backbones and the spectrum."""

    sae: UniversalSAE
    store: Store
    names: list[str]
    """The models rendered through (``--models``, default all the run's), in that order."""
    backbones: dict[str, nn.Module]
    size: int
    magnitude: Tensor | None
    """MACO's fixed magnitude spectrum (None: 1/f) and the colour basis it goes with."""
    colour: Tensor | None
    settings: dict[str, Any]
    """What maximize.json records of the settings (resolved size and spectrum included)."""


def _prepare(cfg: MaximizeConfig, store: Store | None = None) -> _Setup:
    """Load the run, its (or ``store``'s) backbones and the spectrum; check every ``cfg.concept``."""
    from usae.device import resolve_device

    dev = resolve_device(cfg.device)
    sae = load(cfg.run, device=dev)
    for k in cfg.concept:
        if not 0 <= int(k) < sae.n_latents:
            raise UsaeError(f"--concept {k} outside [0, {sae.n_latents})")
    names = list(cfg.models) if cfg.models else sae.model_names
    for name in names:
        sae.head(name)  # unknown model -> UsaeError naming the run's models
    store = run_store(cfg.run, cfg.store) if store is None else store
    if store.grid is None:
        raise UsaeError(f"{store.path / 'metadata.json'}: no token grid; make the store with `usae extract`")
    backbones = load_backbones(store, names, dev)
    size = int(cfg.size or store.extra.get("view_size") or max(b.input_size for b in backbones.values()))
    settings = {"steps": cfg.steps, "size": size, "n_crops": cfg.n_crops, "crop_scale": list(cfg.crop_scale)}
    settings |= {"noise": cfg.noise, "lr": cfg.lr, "seed": cfg.seed, "objective": "mean pre-activation over tokens"}
    magnitude = colour = None
    spectrum = cfg.spectrum or ("data" if has_images(store) else "1/f")
    if spectrum == "data":
        if not has_images(store):
            raise UsaeError(f"{store.path / 'metadata.json'}: no image source (extra.images); use spectrum '1/f'")
        data = data_spectrum(store, size, maximize_dir(cfg.run), cfg.spectrum_images, progress=cfg.progress)
        magnitude, colour = data.magnitude, data.colour
        settings |= {"spectrum_images": data.images, "colour_basis": data.colour.T.tolist()}
    settings["magnitude"] = spectrum
    return _Setup(sae, store, names, backbones, size, magnitude, colour, settings)


def maximize_concept(
    run: str | Path,
    concept: int,
    models: list[str] | tuple[str, ...] | None = None,
    *,
    store: str | Path | Store | None = None,
    natural: Mapping[str, NaturalBest] | None = None,
    **settings: Any,
) -> MaximizeResult:
    """Optimise one image per model (default: all the run's models) to excite ``concept``; writes nothing.

    ``settings`` are the fields of :class:`usae.config.MaximizeConfig` (``steps``, ``size``,
    ``n_crops``, ``crop_scale``, ``noise``, ``lr``, ``seed``, ``spectrum``, ``spectrum_images``,
    ``compare``, ``device``, ``progress``), with its defaults: this builds that config. ``store``: a
    path or an open Store (default: the run's store). ``natural``: the best natural images per model
    (from :func:`natural_best`), to skip the pass over the store that ``compare`` makes.
    """
    opened = store if isinstance(store, Store) else None
    where = opened.path if opened is not None else (Path(store) if store is not None else None)
    cfg = MaximizeConfig(
        run=Path(run), concept=(int(concept),), models=tuple(models) if models else None, store=where, **settings
    )
    setup = _prepare(cfg, opened)
    if cfg.compare and natural is None and _can_compare(setup.sae, setup.store):
        natural = natural_best(setup.sae, setup.store, [int(concept)], progress=cfg.progress)[int(concept)]
    return _render(cfg, setup, int(concept), natural)


def _render(
    cfg: MaximizeConfig, setup: _Setup, concept: int, natural: Mapping[str, NaturalBest] | None
) -> MaximizeResult:
    """Optimise ``concept``'s image for each model; with ``cfg.compare``, measure every image in every model."""
    sae, grid = setup.sae, setup.store.grid
    images, finals, act, start_act, obj, start_obj = {}, {}, {}, {}, {}, {}
    started = time.perf_counter()
    for name in setup.names:
        objective = LatentObjective(sae, setup.backbones[name], name, grid, concept)
        final_13ss, start_t, final_t = _optimize(objective, cfg, setup)
        images[name], finals[name] = to_image(final_13ss), final_13ss
        act[name], start_act[name] = float(final_t.clamp_min(0).mean()), float(start_t.clamp_min(0).mean())
        obj[name], start_obj[name] = float(final_t.mean()), float(start_t.mean())
        log.info("concept %d, model %s: activation %.3g -> %.3g", concept, name, start_act[name], act[name])
    settings = {**setup.settings, "seconds": round(time.perf_counter() - started, 2)}
    result = MaximizeResult(concept, images, act, start_act, obj, start_obj, settings)
    if not cfg.compare:
        return result
    # every optimised image through every model: its score (largest code) and mean activation
    score_ij: dict[str, dict[str, float]] = {i: {} for i in setup.names}
    act_ij: dict[str, dict[str, float]] = {i: {} for i in setup.names}
    for j in setup.names:
        objective = LatentObjective(sae, setup.backbones[j], j, grid, concept)
        for i in setup.names:
            pre_t, code_t = (v[0].cpu() for v in objective.token_codes(finals[i]))
            score_ij[i][j], act_ij[i][j] = float(code_t.max()), float(pre_t.clamp_min(0).mean())
    kept = {n: natural[n] for n in setup.names if n in natural} if natural is not None else None
    score = {n: score_ij[n][n] for n in setup.names}
    result = result._replace(score=score, natural=kept, transfer=score_ij, transfer_activation=act_ij)
    for name, ratio in result.superstimulus().items():
        if ratio is not None:
            log.info("concept %d, model %s: %.3g x the best natural image's score", concept, name, ratio)
    return result


def _optimize(objective: LatentObjective, cfg: MaximizeConfig, setup: _Setup) -> tuple[Tensor, Tensor, Tensor]:
    """The optimised (1, 3, S, S) pixels and the latent's (t,) token pre-activations on the start
    and final images."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(cfg.seed)
    device = next(objective.sae.parameters()).device
    param = FourierImage(setup.size, gen, magnitude=setup.magnitude, colour=setup.colour).to(device)
    opt = torch.optim.NAdam(param.parameters(), lr=cfg.lr)
    with torch.no_grad():
        start_t = objective.token_values(param())[0].cpu()
    bar = tqdm(range(cfg.steps), desc=f"maximize {objective.name}", unit="step", disable=not cfg.progress)
    for _ in bar:
        crops = random_crops(param(), cfg.n_crops, cfg.crop_scale, gen)
        crops = crops + cfg.noise * torch.randn(crops.shape, generator=gen).to(crops)
        loss = -objective(crops).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(activation=f"{-loss.item():.3g}", refresh=False)
    with torch.no_grad():
        final_13ss = param()
        final_t = objective.token_values(final_13ss)[0].cpu()
    return final_13ss.detach(), start_t, final_t


@overload
def maximize(cfg: MaximizeConfig, /) -> list[Path]: ...
@overload
def maximize(
    cfg: str | Path,
    /,
    concept: int,
    models: list[str] | tuple[str, ...] | None = None,
    *,
    store: str | Path | Store | None = None,
    natural: Mapping[str, NaturalBest] | None = None,
    **settings: Any,
) -> MaximizeResult: ...
def maximize(cfg, /, concept=None, models=None, **options):
    """``usae maximize RUN --concept K [K ...]``: write each concept's images under --out (default
    RUN/maximize); returns the ``concept-<k>`` directories.

    The run and the backbones are loaded once, and the best natural images of all the concepts are
    found in one pass over the store.

    ``maximize(run, concept, models, store=..., natural=..., **settings)``, a run and one concept
    instead of a config: :func:`maximize_concept`, the notebook form, which returns the result and
    writes nothing.
    """
    if not isinstance(cfg, MaximizeConfig):
        return maximize_concept(cfg, concept, models, **options)
    # the run's own store is an input too, found as _prepare finds it (--out STORE/b wrote into it)
    store_dir = cfg.store or trained_store_dir(cfg.run)
    out_root = check_output(cfg.out or maximize_dir(cfg.run), "", reading=(store_dir,), replaces=False)
    setup = _prepare(cfg)
    natural: dict[int, dict[str, NaturalBest]] = {}
    if cfg.compare and _can_compare(setup.sae, setup.store):
        natural = natural_best(setup.sae, setup.store, cfg.concept, progress=cfg.progress)
    written = []
    for k in cfg.concept:
        result = _render(cfg, setup, int(k), natural.get(int(k), {}) if cfg.compare else None)
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
    return "\n".join(f"maximisation: {out / 'panel.png'}" for out in maximize(cfg))
