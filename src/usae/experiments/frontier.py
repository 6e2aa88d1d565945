"""``usae frontier``: interpretability against fidelity, universal against independent, with controls.

For each grid point (n_latents, k) a universal SAE and one independent SAE per model train at the same
size and budget; a random dictionary of the same shapes is the untrained control. All three are
scored on the held-out store (``frontier_measure.py``: R², naming, task fidelity, classes, dead
share) and tabulated (``frontier_output.py``).

On disk::

    OUT/points/s<n_latents>-k<k>/
      universal/              run directory (usae train)
      independent/<model>/    run directories, one single-model SAE each
      joined/, random/        pretrained directories: the independent SAEs side by side; the random dictionary
      measures/<kind>/        labels.json, splice.json of each kind (naming/, fidelity/)
      timing.json             each run's tokens/s (its own steps)
      point.json              the point's result, written last and atomically
    OUT/frontier.json, frontier.csv, frontier.md, frontier-fidelity.png, frontier-r2.png

Resuming: a point whose point.json was made with the same settings is not touched again; a run that
finished with the same training settings is not retrained (only measured). So killing the command at
any moment and running it again finishes the grid. Runs that read the same rows (all universal runs;
each model's independent runs) train together on one pass over the store (``fit_many``).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any, NamedTuple

from tqdm.auto import tqdm

from usae._io import check_output, read_json, write_json_atomic
from usae.config import EvalConfig, FrontierConfig, TrainConfig, to_json_dict
from usae.config.train import DataConfig
from usae.data.store import Store, held_out_path, open_store
from usae.device import resolve_device
from usae.errors import UsaeError
from usae.experiments.frontier_measure import (
    LabelNaming,
    Naming,
    SpliceFidelity,
    TaskFidelity,
    join_independent,
    random_backbone_section,
    random_dictionary,
    random_models,
    score_dictionary,
)
from usae.experiments.frontier_output import write_outputs
from usae.interop.hub import save_pretrained
from usae.model.sae import UniversalSAE
from usae.run import finished_run, load
from usae.training.fit import FitResult, fit_many

log = logging.getLogger(__name__)

FRONTIER_VERSION = 1
POINT_JSON = "point.json"
TIMING_JSON = "timing.json"
KINDS = ("universal", "independent", "random")


class Point(NamedTuple):
    """One grid point: its directory and the runs it trains."""

    name: str
    n_latents: int
    k: int
    dir: Path
    universal: TrainConfig
    independent: dict[str, TrainConfig]
    """Model name -> its independent SAE's run (empty without ``--independent``)."""

    def runs(self) -> dict[str, TrainConfig]:
        """Every run of the point by key ("universal", "independent/<model>")."""
        return {"universal": self.universal} | {f"independent/{n}": c for n, c in self.independent.items()}


class Context(NamedTuple):
    """What every point is measured with: the stores, the plug-ins, the settings a result depends on."""

    cfg: FrontierConfig
    store: Store
    val: Store
    naming: Naming | None
    fidelity: TaskFidelity | None
    key: dict[str, Any]
    """What a saved point.json must have been made with to be reused."""


def grid(cfg: FrontierConfig, store: Store) -> list[Point]:
    """The points in grid order (n_latents, then k); k larger than n_latents is skipped with a warning."""
    points = []
    for n_latents in cfg.n_latents:
        for k in cfg.k:
            if k > n_latents:
                log.warning("skipping k %d > n_latents %d", k, n_latents)
                continue
            name = f"s{n_latents}-k{k}"
            base = TrainConfig(store=cfg.store, out=cfg.out / "points" / name / "universal", n_latents=n_latents,
                               k=k, steps=cfg.steps, batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device,
                               progress=False, overwrite=True)  # fmt: skip
            # Each model's own seed: with one seed every independent SAE would start latent l from the
            # same token (--init data, the same data order), and agree on names by construction.
            indep = {
                m: dataclasses.replace(base, models=(m,), seed=cfg.seed + 1 + i,
                                       out=cfg.out / "points" / name / "independent" / m)
                for i, m in enumerate(store.model_names if cfg.independent else [])
            }  # fmt: skip
            points.append(Point(name, n_latents, k, cfg.out / "points" / name, base, indep))
    if not points:
        raise UsaeError(f"--k {list(cfg.k)} / --n-latents {list(cfg.n_latents)}: no point has k <= n_latents")
    return points


def _val_store(cfg: FrontierConfig, store: Store) -> Store:
    path = cfg.val if cfg.val is not None else held_out_path(store)
    if path is None:
        log.warning("%s has no held-out twin and no --val was given: measuring on the training rows", store.path)
        return store
    val = open_store(path)
    if val.widths != store.widths:
        raise UsaeError(f"--val {path}: its models {val.widths} are not the training store's {store.widths}")
    return val


# -- training --------------------------------------------------------------------------------------
def _tokens_per_s(result: FitResult, batch_size: int) -> float | None:
    if result.steps_timed <= 0 or result.step_seconds <= 0:
        return None
    return result.steps_timed * batch_size / result.step_seconds


def train_points(points: list[Point], progress: bool) -> None:
    """Train every run of ``points`` that has not finished with its settings, those reading the same
    rows together (one ``fit_many`` pass per group), then record each run's tokens/s in its point."""
    todo: dict[DataConfig, list[tuple[Point, str, TrainConfig]]] = {}
    for point in points:
        for key, run in point.runs().items():
            if not finished_run(run.out, run):
                todo.setdefault(run.data, []).append((point, key, run))
    for i, group in enumerate(todo.values()):
        runs = [run for _, _, run in group]
        runs[0] = dataclasses.replace(runs[0], progress=progress)
        log.info("training %d runs on one pass (group %d of %d)", len(runs), i + 1, len(todo))
        for (point, key, run), result in zip(group, fit_many(runs), strict=True):
            timing_path = point.dir / TIMING_JSON
            timing = read_json(timing_path, "frontier timing") if timing_path.is_file() else {}
            write_json_atomic(timing_path, timing | {key: _tokens_per_s(result, run.batch_size)})


# -- measuring -------------------------------------------------------------------------------------
def _kinds(point: Point, ctx: Context) -> dict[str, tuple[Path, UniversalSAE]]:
    """Each dictionary kind of the point as (directory it can be opened from, the open SAE)."""
    device = resolve_device(ctx.cfg.device)
    kinds = {"universal": (point.universal.out, load(point.universal.out, device=device))}
    if point.independent:
        joined = join_independent({m: load(c.out) for m, c in point.independent.items()})
        save_pretrained(
            joined, point.dir / "joined", train={"independent": [str(c.out) for c in point.independent.values()]}
        )
        kinds["independent"] = (point.dir / "joined", joined.to(device))
    if ctx.cfg.random_dictionary:
        rand = random_dictionary(point.universal, ctx.store, ctx.store.model_names)
        save_pretrained(rand, point.dir / "random", train={"random_dictionary": True, "seed": ctx.cfg.seed})
        kinds["random"] = (point.dir / "random", rand.to(device))
    return kinds


def measure_point(point: Point, ctx: Context) -> dict[str, Any]:
    """Score every kind of ``point`` on the held-out store; the point's JSON-ready result."""
    cfg = ctx.cfg
    eval_cfg = EvalConfig(run=Path(), stores=(ctx.val.path,), max_rows=cfg.max_eval_rows, report=False,
                          label=False, progress=False)  # fmt: skip
    timing_path = point.dir / TIMING_JSON
    timing = read_json(timing_path, "frontier timing") if timing_path.is_file() else {}
    kinds = {}
    for kind, (kind_dir, sae) in _kinds(point, ctx).items():
        out_dir = point.dir / "measures" / kind
        shutil.rmtree(out_dir, ignore_errors=True)  # a killed earlier attempt's outputs (ours)
        kinds[kind] = score_dictionary(kind_dir, sae, ctx.val, out_dir, eval_cfg, ctx.naming, ctx.fidelity)
        kinds[kind]["dir"] = str(kind_dir)
    kinds["universal"]["tokens_per_s"] = {"universal": timing.get("universal")}
    if "independent" in kinds:
        kinds["independent"]["tokens_per_s"] = {m: timing.get(f"independent/{m}") for m in point.independent}
    randoms = random_models(ctx.store, cfg.random_models)
    return {
        "key": ctx.key | {"n_latents": point.n_latents, "k": point.k},
        "point": point.name,
        "n_latents": point.n_latents,
        "k": point.k,
        "kinds": kinds,
        "random_backbones": randoms,
        "random_backbone": {kind: random_backbone_section(s, randoms) for kind, s in kinds.items()}
        if randoms
        else None,
    }


def _finished_point(point: Point, key: dict[str, Any]) -> dict[str, Any] | None:
    """The saved result of ``point`` if it was made with the same settings (and its runs are there)."""
    path = point.dir / POINT_JSON
    if not path.is_file():
        return None
    try:
        saved = read_json(path, "frontier point")
    except UsaeError:
        return None
    if saved.get("key") != key | {"n_latents": point.n_latents, "k": point.k}:
        return None
    return saved if all(finished_run(run.out, run) for run in point.runs().values()) else None


def _key(cfg: FrontierConfig, store: Store, val: Store, naming: Naming | None, fidelity: TaskFidelity | None) -> dict:
    """The settings a point's numbers depend on (a saved point.json is reused only when they match)."""
    fields = ("steps", "batch_size", "seed", "independent", "random_dictionary", "random_models", "max_eval_rows",
              "splice_images", "n_perm")  # fmt: skip
    return {
        "frontier_version": FRONTIER_VERSION,
        "store": store.hash,
        "val": val.hash,
        **{f: to_json_dict(cfg)[f] for f in fields},
        "naming": None if naming is None else getattr(naming, "name", type(naming).__name__),
        "fidelity": None if fidelity is None else getattr(fidelity, "name", type(fidelity).__name__),
    }


# -- the driver ------------------------------------------------------------------------------------
def frontier(
    cfg: FrontierConfig, *, naming: Naming | None = None, fidelity: TaskFidelity | None = None
) -> dict[str, Any]:
    """``usae frontier STORE``: train, score and tabulate every grid point; return frontier.json.

    ``naming`` / ``fidelity``: plug-ins (``frontier_measure.py``) that replace the defaults,
    ``usae label`` (``cfg.label``; stores with images) and ``usae splice`` (backbones that splice),
    e.g. ``RowLabelNaming`` and ``LinearTaskFidelity`` on a synthetic world.
    """
    store = open_store(cfg.store)
    val = _val_store(cfg, store)
    check_output(cfg.out, "", reading=(cfg.store, val.path), replaces=False)
    if naming is None and cfg.label:
        naming = LabelNaming(n_perm=cfg.n_perm, device=cfg.device)
    fidelity = fidelity or SpliceFidelity(max_images=cfg.splice_images, device=cfg.device)
    ctx = Context(cfg, store, val, naming, fidelity, _key(cfg, store, val, naming, fidelity))
    points = grid(cfg, store)
    results = {p.name: r for p in points if (r := _finished_point(p, ctx.key)) is not None}
    todo = [p for p in points if p.name not in results]
    if results:
        log.info("reusing %d finished points of %d", len(results), len(points))
    train_points(todo, cfg.progress)
    bar = tqdm(total=len(points), initial=len(results), desc="frontier", unit="point", disable=not cfg.progress)
    for point in todo:
        bar.set_postfix_str(point.name)
        results[point.name] = measure_point(point, ctx)
        write_json_atomic(point.dir / POINT_JSON, results[point.name])
        bar.update()
    bar.close()
    summary = {
        "frontier_version": FRONTIER_VERSION,
        "config": to_json_dict(cfg),
        "store": {"path": str(store.path), "hash": store.hash},
        "val": {"path": str(val.path), "hash": val.hash, "held_out": val.path != store.path},
        "model_names": store.model_names,
        "points": [results[p.name] for p in points],
    }
    return write_outputs(summary, cfg.out)


def random_control_line(run_dir: Path, store: Path, out_dir: Path, *, splice_images: int | None = 8,
                        n_perm: int = 5000, device: str = "auto") -> str:  # fmt: skip
    """One frontier line for a trained run against its random-dictionary control (``usae demo``).

    The run's own numbers come from RUN/labels.json and RUN/splice.json (``usae label`` / ``splice``
    on ``store``, as the demo runs them; "–" where absent); the random dictionary of the run's shapes
    and normalisation is scored on ``store`` into ``out_dir`` by the same naming and splicing.
    """
    from usae.experiments.frontier_measure import fidelity_summary, naming_summary
    from usae.run import load_train_config

    sae, val = load(run_dir), open_store(store)
    rand = random_dictionary(load_train_config(run_dir), val, sae.model_names)
    save_pretrained(rand, out_dir / "random", train={"random_dictionary": True})
    scored = score_dictionary(out_dir / "random", rand, val, out_dir / "measures",
                              EvalConfig(run=Path(), stores=(val.path,), report=False, label=False, progress=False),
                              LabelNaming(n_perm=n_perm, device=device), SpliceFidelity(splice_images, device=device))  # fmt: skip
    own: dict[str, Any] = {"naming": None, "loss_recovered": None}
    if (run_dir / "labels.json").is_file():
        fams = read_json(run_dir / "labels.json", "concept labels")["families"]
        concepts = {f: [fam["concepts"][str(k)] for k in range(sae.n_latents)] for f, fam in fams.items()}
        own["naming"] = {f: naming_summary(fam["summary"], fam["shuffled"], concepts[f], sae.n_latents) for f, fam in fams.items()}  # fmt: skip
    if (run_dir / "splice.json").is_file():
        spliced = read_json(run_dir / "splice.json", "splice results")
        if any(spliced["available"].values()):
            own["loss_recovered"] = fidelity_summary(spliced["matrices"]["loss_recovered"], spliced["models"])
    from usae.experiments.frontier_output import _family, _fmt, _mean

    def numbers(s: dict[str, Any]) -> tuple[str, str]:
        fam = _family(s["naming"])
        named = _fmt(s["naming"][fam]["named_share"]) if fam else "–"
        fid = s["loss_recovered"]
        return named, _fmt(_mean(fid["own"].values()) if fid else None)

    (n_run, lr_run), (n_rand, lr_rand) = numbers(own), numbers(scored)
    return (f"frontier point ({sae.n_latents} latents, k {sae.k}): named share {n_run} (random dictionary {n_rand}); "
            f"loss recovered, own code {lr_run} (random dictionary {lr_rand})")  # fmt: skip


def frontier_command(cfg: FrontierConfig) -> str:
    """``usae frontier``: what the command prints."""
    from usae.experiments.frontier_output import format_frontier

    return format_frontier(frontier(cfg)) + f"\n\nfrontier: {cfg.out / 'frontier.md'}"
