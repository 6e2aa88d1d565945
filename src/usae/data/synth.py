"""Synthetic universal-concept worlds: planted concepts that a universal SAE should recover.

Several models observe one sparse latent scene through their own random dictionaries. Every
draw comes from ``numpy.random.default_rng`` streams spawned from ``seed`` (one stream each for
the concept structure, the dictionaries, the per-model constants, the scene and the noise), so a
world is a pure function of its arguments. The generative model, which docs and tests refer to:

1. **Concepts.** ``n_concepts = n_universal + n_partial + n_specific``, indexed in that order.
   With ``m`` models, ``owners[j, i]`` says whether model ``i`` has concept ``j``: a universal
   concept is owned by all ``m`` models; a partial one by a uniformly random subset whose size is
   uniform in ``2..m-1`` (so partial concepts need ``m >= 3``); the ``j``-th specific concept by
   model ``j % m`` alone (round robin, so per-model counts differ by at most one).
2. **Frequencies.** Concept ``j`` fires independently in each row with probability ``p_j``.
   Zipf weights ``w = (1 + rank) ** -s`` over a random permutation of ranks, with
   ``s = ln 4 / ln n_concepts`` so the commonest concept fires 4x as often as the rarest, and
   ``p = k_active * w / sum(w)``; where that exceeds 1 it is capped at 1 and the rest re-spread
   (water filling), which only narrows the spread. Hence E[active concepts per row] = k_active.
3. **Scene.** ``codes[r, j] = a_rj`` if concept ``j`` fires in row ``r``, else 0, with
   ``a_rj ~ Uniform(0.5, 2.0)`` i.i.d.; ``codes`` is ``(n_rows, n_concepts)``.
4. **Dictionaries.** Model ``i`` has ``D_i`` of shape ``(n_concepts, d_i)``: each owned row an
   i.i.d. standard Gaussian vector scaled to unit norm, each unowned row exactly zero. ``d_i`` may
   be smaller than ``n_concepts`` (an overcomplete world).
5. **Observation.** ``s_i = codes @ D_i``. For models named in ``nonlinear``,
   ``s_i <- s_i + 0.25 * r_i * tanh(s_i / r_i)`` elementwise, ``r_i`` the RMS of ``s_i`` over all
   elements (mild and monotone: slope between 1 and 1.25). Then
   ``x_i = scale_i * s_i + offset_i + noise_i`` with ``scale_i ~ Uniform(0.5, 3)`` unless given,
   ``offset_i ~ Normal(0, rms_i)`` per dimension (one vector shared by all rows),
   ``noise_i ~ Normal(0, (noise * rms_i)**2)`` per element, and ``rms_i`` the RMS of
   ``scale_i * s_i`` over all rows and dimensions of this world.

A planted concept counts as *recovered* by a learned universal dictionary when one latent's rows
have cosine > ``threshold`` with the concept's true direction in every model that owns it; rows
of models that do not own it are ignored (see :func:`recovered_mask`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from usae._io import check_output
from usae.errors import UsaeError

if TYPE_CHECKING:
    from usae.config import SynthConfig

_log = logging.getLogger(__name__)

KINDS = ("universal", "partial", "specific")
DEFAULT_WIDTHS = {"a": 64, "b": 96, "c": 128}
MAX_FREQUENCY_RATIO = 4.0
COEF_RANGE = (0.5, 2.0)
SCALE_RANGE = (0.5, 3.0)
NONLINEAR_STRENGTH = 0.25
_ROWS_PER_CHUNK = 8192  # bounds the temporary uniform draws for the scene to ~32 MB per 1k concepts


class World(NamedTuple):
    """A generated world; all arrays are numpy, per-model dicts are in ``model_names`` order.

    Fields:
        data: name -> ``(n_rows, d_i)`` float32 observations ``x_i`` in raw units.
        dictionaries: name -> ``(n_concepts, d_i)`` float32 true directions ``D_i`` (unit rows
            where the model owns the concept, zero rows elsewhere).
        owners: ``(n_concepts, m)`` bool, column ``i`` is ``model_names[i]``.
        kinds: per concept ``"universal" | "partial" | "specific"``.
        codes: ``(n_rows, n_concepts)`` float32 true scene coefficients (zero where off).
        model_names: model names in the order of ``widths``.
        scales: name -> ``scale_i``.
        offsets: name -> ``(d_i,)`` float32 ``offset_i``.
        firing_probs: ``(n_concepts,)`` float64 per-row firing probability ``p_j``.
    """

    data: dict[str, np.ndarray]
    dictionaries: dict[str, np.ndarray]
    owners: np.ndarray
    kinds: list[str]
    codes: np.ndarray
    model_names: list[str]
    scales: dict[str, float]
    offsets: dict[str, np.ndarray]
    firing_probs: np.ndarray


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_count(name: str, value: object, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise UsaeError(f"{name}: expected an integer >= {minimum}, got {value!r}")


def _check_widths(widths: dict[str, int]) -> None:
    if not isinstance(widths, dict) or len(widths) < 2:
        raise UsaeError(f"widths: expected a dict of at least 2 models, got {widths!r}")
    for name, width in widths.items():
        if not isinstance(name, str) or not name:
            raise UsaeError(f"widths: model names must be non-empty strings, got {name!r}")
        _check_count(f"widths[{name!r}]", width, 1)


def _check_world_args(
    widths: dict[str, int],
    counts: dict[str, object],
    k_active: float,
    noise: float,
    nonlinear: tuple[str, ...],
    scales: dict[str, float] | None,
    seed: int,
) -> None:
    """Raise UsaeError naming the first bad argument of :func:`make_world`."""
    _check_widths(widths)
    for name, value in counts.items():
        _check_count(name, value, 1 if name == "n_rows" else 0)
    n_concepts = sum(v for k, v in counts.items() if k != "n_rows")
    if n_concepts < 1:
        raise UsaeError("n_universal, n_partial, n_specific: need at least one concept in total")
    if len(widths) == 2 and counts["n_partial"] != 0:
        raise UsaeError("n_partial: must be 0 with 2 models (partial concepts need 2..m-1 owners)")
    if not _is_real(k_active) or not 0 < k_active <= n_concepts:
        raise UsaeError(f"k_active: expected a number in (0, {n_concepts}], got {k_active!r}")
    if not _is_real(noise) or not (math.isfinite(noise) and noise >= 0):
        raise UsaeError(f"noise: expected a finite number >= 0, got {noise!r}")
    if isinstance(nonlinear, str) or any(name not in widths for name in nonlinear):
        raise UsaeError(f"nonlinear: expected a tuple of names from {list(widths)}, got {nonlinear!r}")
    for name, scale in (scales or {}).items():
        if name not in widths:
            raise UsaeError(f"scales: unknown model {name!r}; models are {list(widths)}")
        if not _is_real(scale) or not (math.isfinite(scale) and scale > 0):
            raise UsaeError(f"scales[{name!r}]: expected a finite number > 0, got {scale!r}")
    _check_count("seed", seed, 0)


def _draw_owners(
    n_universal: int, n_partial: int, n_specific: int, n_models: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[str]]:
    """Owner matrix ``(n_concepts, m)`` bool and per-concept kinds, by step 1 of the model."""
    owners_cm = np.zeros((n_universal + n_partial + n_specific, n_models), dtype=bool)
    owners_cm[:n_universal] = True
    for j in range(n_universal, n_universal + n_partial):
        size = rng.integers(2, n_models)  # high is exclusive: sizes 2..m-1
        owners_cm[j, rng.choice(n_models, size=size, replace=False)] = True
    for j in range(n_specific):
        owners_cm[n_universal + n_partial + j, j % n_models] = True
    kinds = ["universal"] * n_universal + ["partial"] * n_partial + ["specific"] * n_specific
    return owners_cm, kinds


def _firing_probs(n_concepts: int, k_active: float, rng: np.random.Generator) -> np.ndarray:
    """Per-concept firing probabilities summing to ``k_active``, by step 2 of the model."""
    exponent = math.log(MAX_FREQUENCY_RATIO) / math.log(n_concepts) if n_concepts > 1 else 0.0
    weights = (1.0 + rng.permutation(n_concepts)) ** -exponent
    capped = np.zeros(n_concepts, dtype=bool)
    probs = k_active * weights / weights.sum()
    # Water filling: each pass caps at least one more concept, so this ends within n passes.
    while (over := (probs > 1.0) & ~capped).any():
        capped |= over
        free = ~capped
        probs[capped] = 1.0
        if free.any():
            probs[free] = (k_active - capped.sum()) * weights[free] / weights[free].sum()
    return np.minimum(probs, 1.0)


def _draw_codes(n_rows: int, probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sparse scene ``(n_rows, n_concepts)`` float32, by step 3 of the model."""
    codes_bc = np.zeros((n_rows, probs.size), dtype=np.float32)
    probs32 = probs.astype(np.float32)
    for start in range(0, n_rows, _ROWS_PER_CHUNK):
        chunk = codes_bc[start : start + _ROWS_PER_CHUNK]
        fires = rng.random(chunk.shape, dtype=np.float32) < probs32
        chunk[fires] = rng.uniform(*COEF_RANGE, size=int(fires.sum())).astype(np.float32)
    return codes_bc


def _draw_dictionary(owned_c: np.ndarray, width: int, rng: np.random.Generator) -> np.ndarray:
    """True directions ``(n_concepts, width)`` float32, by step 4 of the model."""
    rows_cd = rng.standard_normal((owned_c.size, width))
    rows_cd /= np.linalg.norm(rows_cd, axis=1, keepdims=True)
    return (rows_cd * owned_c[:, None]).astype(np.float32)


def _rms(x: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(x * x, dtype=np.float64)))
    return rms if rms > 0 else 1.0  # an all-zero signal (tiny worlds) would divide by zero


def _observe(
    codes_bc: np.ndarray,
    dictionary_cd: np.ndarray,
    scale: float,
    offset_unit_d: np.ndarray,
    noise: float,
    is_nonlinear: bool,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """One model's observations and offset ``(x_bd, offset_d)``, by step 5 of the model."""
    x_bd = codes_bc @ dictionary_cd
    if is_nonlinear:
        r = np.float32(_rms(x_bd))
        x_bd += np.float32(NONLINEAR_STRENGTH) * r * np.tanh(x_bd / r)
    x_bd *= np.float32(scale)
    rms = _rms(x_bd)
    offset_d = (rms * offset_unit_d).astype(np.float32)
    x_bd += offset_d
    if noise > 0:
        x_bd += np.float32(noise * rms) * rng.standard_normal(x_bd.shape, dtype=np.float32)
    return x_bd, offset_d


def make_world(
    widths: dict[str, int] | None = None,
    *,
    n_rows: int = 100_000,
    n_universal: int = 64,
    n_partial: int = 32,
    n_specific: int = 32,
    k_active: float = 8,
    noise: float = 0.05,
    nonlinear: tuple[str, ...] = (),
    scales: dict[str, float] | None = None,
    seed: int = 0,
) -> World:
    """Generate a world by the generative model in the module docstring.

    Args:
        widths: model name -> width ``d_i``, at least 2 models; default ``{"a": 64, "b": 96,
            "c": 128}``. Its order is the model order everywhere.
        n_rows: number of observed rows (scenes).
        n_universal, n_partial, n_specific: concept counts per kind (``n_partial`` must be 0
            with 2 models).
        k_active: expected number of active concepts per row, in ``(0, n_concepts]``.
        noise: Gaussian noise std relative to each model's per-element signal RMS.
        nonlinear: models whose clean signal goes through the mild monotone nonlinearity.
        scales: optional fixed ``scale_i`` for some models; the others are drawn.
        seed: non-negative integer; equal arguments give equal worlds.

    Raises:
        UsaeError: on any bad argument, naming it.
    """
    widths = dict(DEFAULT_WIDTHS) if widths is None else widths
    counts = {"n_rows": n_rows, "n_universal": n_universal, "n_partial": n_partial}
    counts["n_specific"] = n_specific
    _check_world_args(widths, counts, k_active, noise, nonlinear, scales, seed)
    names = list(widths)
    structure_rng, dict_rng, param_rng, scene_rng, noise_rng = (
        np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(5)
    )
    owners_cm, kinds = _draw_owners(n_universal, n_partial, n_specific, len(names), structure_rng)
    probs = _firing_probs(len(kinds), k_active, structure_rng)
    dictionaries = {name: _draw_dictionary(owners_cm[:, i], widths[name], dict_rng) for i, name in enumerate(names)}
    drawn_scales = param_rng.uniform(*SCALE_RANGE, size=len(names))
    world_scales = {n: float((scales or {}).get(n, s)) for n, s in zip(names, drawn_scales, strict=True)}
    offset_units = {name: param_rng.standard_normal(widths[name]) for name in names}
    codes_bc = _draw_codes(n_rows, probs, scene_rng)
    data, offsets = {}, {}
    for name in names:
        constants = (world_scales[name], offset_units[name], noise, name in nonlinear)
        data[name], offsets[name] = _observe(codes_bc, dictionaries[name], *constants, noise_rng)
    _log.debug("world seed=%d: %d concepts, %d rows, models %s", seed, len(kinds), n_rows, names)
    return World(data, dictionaries, owners_cm, kinds, codes_bc, names, world_scales, offsets, probs)


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm in float64; zero rows stay zero (cosine 0 with everything)."""
    rows = np.asarray(rows, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)


def _check_learned(dictionaries: dict[str, np.ndarray], world: World, threshold: float) -> None:
    if not _is_real(threshold) or not -1.0 <= threshold <= 1.0:
        raise UsaeError(f"threshold: expected a number in [-1, 1], got {threshold!r}")
    if not isinstance(dictionaries, dict) or set(dictionaries) != set(world.model_names):
        got = list(dictionaries) if isinstance(dictionaries, dict) else dictionaries
        raise UsaeError(f"dictionaries: expected keys {world.model_names}, got {got!r}")
    n_latents = None
    for name in world.model_names:
        shape = np.shape(dictionaries[name])
        width = world.dictionaries[name].shape[1]
        if len(shape) != 2 or shape[1] != width:
            raise UsaeError(f"dictionaries[{name!r}]: expected shape (n_latents, {width}), got {shape}")
        if n_latents is not None and shape[0] != n_latents:
            raise UsaeError(f"dictionaries[{name!r}]: has {shape[0]} latents, others {n_latents}")
        n_latents = shape[0]


def recovered_mask(dictionaries: dict[str, np.ndarray], world: World, threshold: float = 0.9) -> np.ndarray:
    """Which planted concepts a learned universal dictionary recovers.

    Args:
        dictionaries: model name -> ``(n_latents, d_i)`` learned decoder rows in raw units, one
            entry per model of ``world`` and the same ``n_latents`` for all; row norms are
            irrelevant (zero rows match nothing; rows with NaN match nothing).
        world: the world whose concepts are scored.
        threshold: cosine that must be strictly exceeded.

    Returns:
        ``(n_concepts,)`` bool: concept ``j`` is recovered when some latent ``l`` has
        cosine(``dictionaries[i][l]``, ``world.dictionaries[i][j]``) > ``threshold`` for every
        model ``i`` that owns ``j``; other models' rows are ignored.

    Raises:
        UsaeError: on a missing/extra model, a width or latent-count mismatch, or a bad threshold.
    """
    _check_learned(dictionaries, world, threshold)
    worst_sc = None
    for i, name in enumerate(world.model_names):
        cos_sc = _unit_rows(dictionaries[name]) @ _unit_rows(world.dictionaries[name]).T
        cos_sc[np.isnan(cos_sc)] = -np.inf  # a non-finite learned row matches nothing
        # A model that lacks the concept must not veto it: +inf never wins the min over owners.
        cos_sc[:, ~world.owners[:, i]] = np.inf
        worst_sc = cos_sc if worst_sc is None else np.minimum(worst_sc, cos_sc)
    return (worst_sc > threshold).any(axis=0)


def recovery(dictionaries: dict[str, np.ndarray], world: World, threshold: float = 0.9) -> dict[str, float]:
    """Fraction of planted concepts recovered, per kind and overall.

    Same arguments and criterion as :func:`recovered_mask`. Returns
    ``{"universal": f, "partial": f, "specific": f, "all": f}`` with each ``f`` in ``[0, 1]``;
    a kind with no concepts in ``world`` gives NaN (0/0 is not a score of 0).
    """
    mask_c = recovered_mask(dictionaries, world, threshold)
    kinds_c = np.asarray(world.kinds)
    result = {}
    for kind in KINDS:
        of_kind = mask_c[kinds_c == kind]
        result[kind] = float(of_kind.mean()) if of_kind.size else math.nan
    result["all"] = float(mask_c.mean())
    return result


def save_truth(path, world: World) -> None:
    """Write a world's ground truth (dictionaries, owners, kinds, scales, offsets) as safetensors.

    Data and codes are not saved (the store holds the data). Read back with :func:`load_truth`.
    """
    import json
    from pathlib import Path

    from safetensors.numpy import save_file

    tensors = {f"dictionary.{n}": np.ascontiguousarray(d) for n, d in world.dictionaries.items()}
    tensors |= {f"offset.{n}": np.ascontiguousarray(o) for n, o in world.offsets.items()}
    tensors["owners"] = world.owners.astype(np.uint8)
    tensors["firing_probs"] = np.asarray(world.firing_probs, dtype=np.float64)
    meta = {
        "format": "usae-synth-truth",
        "model_names": json.dumps(world.model_names),
        "kinds": json.dumps(world.kinds),
        "scales": json.dumps(world.scales),
    }
    save_file(tensors, str(Path(path)), metadata=meta)


def load_truth(path) -> World:
    """Read :func:`save_truth`'s file as a World with empty ``data`` and ``codes``."""
    import json
    from pathlib import Path

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(Path(path)), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        if meta.get("format") != "usae-synth-truth":
            raise UsaeError(f"{path}: not a synthetic-world truth file")
        names = json.loads(meta["model_names"])
        return World(
            data={},
            dictionaries={n: tensors[f"dictionary.{n}"] for n in names},
            owners=tensors["owners"].astype(bool),
            kinds=json.loads(meta["kinds"]),
            codes=np.zeros((0, len(json.loads(meta["kinds"]))), np.float32),
            model_names=names,
            scales=json.loads(meta["scales"]),
            offsets={n: tensors[f"offset.{n}"] for n in names},
            firing_probs=tensors["firing_probs"],
        )
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise UsaeError(f"{path}: unreadable synthetic-world truth file ({e.__class__.__name__}: {e})") from None


def write_world(cfg: SynthConfig) -> Path:
    """Generate a synthetic world, write it as a store and its ground truth beside it."""
    from usae.data.store import write_store

    check_output(cfg.out, "usae-store", overwrite=cfg.overwrite)
    names = [chr(ord("a") + i) if i < 26 else f"m{i}" for i in range(len(cfg.widths))]
    world = make_world(
        dict(zip(names, cfg.widths, strict=True)),
        n_rows=cfg.n_rows,
        n_universal=cfg.n_universal,
        n_partial=cfg.n_partial,
        n_specific=cfg.n_specific,
        k_active=cfg.k_active,
        noise=cfg.noise,
        seed=cfg.seed,
    )
    extra = {"synthetic": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "overwrite")}}
    path = write_store(cfg.out, world.data, dtype="float32", overwrite=cfg.overwrite, extra=extra)
    save_truth(truth_path(cfg.out), world)
    _log.info("wrote store %s (%d rows) and ground truth %s", path, cfg.n_rows, truth_path(cfg.out))
    return path


def truth_path(store_dir: Path) -> Path:
    """Where `usae synth` puts a world's ground truth: beside the store, STORE.truth.safetensors."""
    store_dir = Path(store_dir)
    return store_dir.with_name(store_dir.name + ".truth.safetensors")


def synth_command(cfg: SynthConfig) -> str:
    """``usae synth``: write the world; what the command prints."""
    return f"store: {write_world(cfg)}"
