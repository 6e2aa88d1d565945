"""``usae baseline``: train (or reuse) one independent SAE per model beside a run and compare them.

Independent SAEs go to RUN/baselines/<model>/, the comparison (evaluation/baselines/) to
RUN/baselines.json.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from usae._io import write_json_atomic
from usae.config import BaselineConfig
from usae.data.store import held_out_path
from usae.device import resolve_device
from usae.errors import UsaeError
from usae.evaluation.baselines import (
    dictionary_agreement,
    match_latents,
    representation_similarity,
    stitch_dictionaries,
    stream_correlations,
)
from usae.evaluation.baselines.matching import matching_section
from usae.model.sae import UniversalSAE
from usae.run import (
    BASELINES_DIR,
    MODEL_NAME,
    RESULT_FREE_FIELDS,
    differing_field,
    load,
    load_train_config,
    open_run_store,
    read_run_config,
)
from usae.training.fit import fit

log = logging.getLogger(__name__)

BASELINES_VERSION = 1
BASELINES_JSON = "baselines.json"


def train_independent(
    run_dir: str | Path, store_dir: str | Path, *, retrain: bool = False, device: str = "auto", progress: bool = True
) -> dict[str, UniversalSAE]:
    """One TopK SAE per model of the run, trained by ``fit`` with the run's own train config.

    Only ``models`` (one), ``out`` (RUN/baselines/<model>) and ``store`` change, so width, k,
    steps, batch size, LR, normalisation and seed are the USAE's. An existing
    RUN/baselines/<model>/model.safetensors is reused unless ``retrain``; one trained with
    different settings is an error.
    """
    run_dir = Path(run_dir)
    train = load_train_config(run_dir)
    # the run's models are its SAE's widths, in order (train.models may be empty: all of the store's)
    names = list(read_run_config(run_dir)["sae"]["widths"])
    saes = {}
    for name in names:
        out = run_dir / BASELINES_DIR / name
        if (out / MODEL_NAME).is_file() and not retrain:
            diff = differing_field(read_run_config(out)["train"], train, RESULT_FREE_FIELDS | {"models", "extend"})
            if diff is not None:
                key, current, value = diff
                raise UsaeError(
                    f"{out}/config.json: {key}={value!r} differs from the run's {current!r}; pass --retrain to replace it"
                )
            log.info("reusing independent SAE %s", out)
            saes[name] = load(out, device=resolve_device(device))
            continue
        log.info("training independent SAE for model %r -> %s", name, out)
        # extend=None: the baseline of a universe grown by --extend is still trained from scratch
        changes = {"store": Path(store_dir), "out": out, "models": (name,), "extend": None, "resume": False}
        changes |= {"overwrite": True, "save_every": 0, "device": device, "progress": progress}
        saes[name] = fit(dataclasses.replace(train, **changes)).sae
    return saes


def _recovery(sae: UniversalSAE, indep: dict[str, UniversalSAE], matchings: dict, truth: Path) -> dict[str, Any]:
    from usae.data.synth import load_truth, recovery

    world, names = load_truth(truth), sae.model_names
    stitched = stitch_dictionaries(
        {n: indep[n].dictionary(n).cpu().numpy() for n in names},
        names[0],
        {names[j]: matchings[(0, j)] for j in range(1, len(names))},
    )
    return {
        "threshold": 0.9,
        "usae": recovery({n: sae.dictionary(n).cpu().numpy() for n in names}, world),
        "independent_matched": recovery(stitched, world),
    }


def baseline(cfg: BaselineConfig) -> dict[str, Any]:
    """``usae baseline RUN STORE``: train (or reuse) independent SAEs under RUN/baselines/, compare,
    write RUN/baselines.json; return it.

    Keys: ``matching`` (per model pair: independent SAEs matched by activation correlation +
    Hungarian, vs the USAE's same-index correlation), ``dictionary_agreement`` (per model, the
    paper's cosine > 0.5 comparison with a random baseline), ``similarity`` (CKA and mutual k-NN,
    (m, m) per representation), ``recovery`` (only with ``cfg.truth``). The independent SAEs train
    on ``cfg.store``; matching and similarity are measured on its held-out store when it has one
    (``usae extract --val-fraction``), else on it. See docs/report.md.
    """
    run_dir = Path(cfg.run)
    sae, store = open_run_store(run_dir, cfg.store, cfg.device)
    names = sae.model_names
    if len(names) < 2:
        raise UsaeError(f"{run_dir}: baselines compare models; this run has one ({names})")
    run_config = read_run_config(run_dir)
    if run_config.get("store", {}).get("hash") not in (None, store.hash):
        log.warning("%s is not the store %s was trained on; the independent SAEs train on it", store.path, run_dir)
    indep = train_independent(run_dir, store.path, retrain=cfg.retrain, device=cfg.device, progress=cfg.progress)
    # Match and compare on images neither dictionary saw when the store has a held-out part.
    held = held_out_path(store)
    if held is not None:
        _, store = open_run_store(sae, held, cfg.device)
    stop = store.n_rows if cfg.max_rows is None else min(cfg.max_rows, store.n_rows)
    corr, same = stream_correlations(sae, indep, store, stop=stop, batch_size=cfg.batch_size, progress=cfg.progress)
    matchings = {p: match_latents(c) for p, c in corr.items()}
    train = run_config["train"]
    result: dict[str, Any] = {
        "baselines_version": BASELINES_VERSION,
        "run": str(run_dir),
        "store": {"path": str(store.path), "hash": store.hash, "held_out": held is not None},
        "trained_on": str(Path(cfg.store)),
        "model_names": names,
        "n_rows": stop,
        "independent": {
            "dir": str(run_dir / BASELINES_DIR),
            **{key: train[key] for key in ("n_latents", "k", "steps", "batch_size", "seed")},
        },
        "matching": matching_section(names, matchings, same, cfg.match_threshold),
        "dictionary_agreement": {
            n: dictionary_agreement(
                sae.dictionary(n).cpu(), indep[n].dictionary(n).cpu(), cfg.cosine_threshold, cfg.seed
            )
            for n in names
        },
        "similarity": representation_similarity(
            sae, indep, store, stop=stop, n_rows=cfg.similarity_rows, knn_k=cfg.knn_k, seed=cfg.seed
        ),
    }
    if cfg.truth is not None:
        result["recovery"] = _recovery(sae, indep, matchings, Path(cfg.truth))
    write_json_atomic(run_dir / BASELINES_JSON, result)
    log.info("wrote %s", run_dir / BASELINES_JSON)
    return result


def run_baselines(run_dir: str | Path, store_dir: str | Path, **overrides: Any) -> dict[str, Any]:
    """The notebook form of ``baseline``: ``baseline(BaselineConfig(run_dir, store_dir, **overrides))``."""
    return baseline(BaselineConfig(run=Path(run_dir), store=Path(store_dir), **overrides))


def format_baselines(result: dict) -> str:
    """A short text summary of RUN/baselines.json."""
    lines = ["latent matching (fraction of pairs with activation correlation > threshold)"]
    for p in result["matching"]:
        ind, usae = p["independent"], p["usae_same_index"]
        lines.append(
            f"  {' / '.join(p['models'])}: independent+Hungarian {ind['matched_fraction']:.3f}, USAE {usae['matched_fraction']:.3f}"
        )
    lines.append("dictionary agreement, USAE vs independent (cosine > 0.5 after Hungarian; random directions)")
    for name, a in result["dictionary_agreement"].items():
        lines.append(f"  {name}: {a['fraction_above']:.3f} (random {a['random_fraction_above']:.3f})")
    if "recovery" in result:
        rec = result["recovery"]
        lines.append(
            f"planted universal concepts recovered: USAE {rec['usae']['universal']:.3f}, independent {rec['independent_matched']['universal']:.3f}"
        )
    return "\n".join(lines)


def baseline_command(cfg: BaselineConfig) -> str:
    """``usae baseline``: what the command prints."""
    return format_baselines(baseline(cfg))
