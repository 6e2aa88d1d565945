"""Measure the training defaults (LR and its scaling, warmup, init, decoder norm) on synthetic worlds.

Builds several differently shaped universal-concept worlds (``usae.data.synth.make_world``), writes each
as a store, trains ``usae.fit`` over a grid of settings and scores every run by planted-concept
recovery (cosine > 0.9 in every owning model, per kind), reconstruction FVU and wall time. Results
go to a CSV (one row per run, appended as runs finish; an interrupted study resumes where it
stopped) and the summary tables of ``docs/defaults.md`` are printed from it.

    .venv/bin/python bench/defaults_study.py            # full study: 133 runs, ~2.4 h of
                                                        # 1-thread training, 2 runs at a time
    .venv/bin/python bench/defaults_study.py --quick    # smoke test (~15 s)
    .venv/bin/python bench/defaults_study.py --analyze  # tables from an existing CSV only

LR multipliers are relative to ``reference_lr`` (the rule the study tested, 1e-2·sqrt(512/s)),
fixed in this file so the CSV keeps its meaning after the library default changes.

Blocks (each run is one TrainConfig; configurations shared by blocks run once):

* ``scaling``: world ``base`` at n_latents 2x/4x/8x concepts and batch 1024 (1500 steps) or 4096
  (375 steps, same tokens) x LR multipliers of the current rule -> the LR exponent in n_latents
  and in batch size.
* ``worlds``: the other worlds at 4x (and ``narrow4`` at 8x and batch 4096) x LR multipliers.
* ``factors``: one factor at a time around the default on every world: warmup 0 / 20 %, random
  init, unit-norm rows, each at LR multipliers 1 and 2.
* ``budget``: world ``base`` at 500 and 4000 steps x LR multipliers (does the best LR move with
  the number of steps?).
* ``seeds``: training seed 1 for the headline LR comparison on every world.
* ``proposed``: the chosen default (``PROPOSED_LR`` at every size) on every world and both seeds,
  with warmup 0 / 20 % and random init on the hardest world, at batch 4096 (LR x1 and x2) and at
  4096 latents against the old rule.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CSV = ROOT / "bench" / "results" / "defaults_study.csv"


# -- worlds -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WorldSpec:
    name: str
    widths: dict
    n_universal: int
    n_partial: int
    n_specific: int
    k_active: float
    k: int
    noise: float = 0.05
    nonlinear: tuple = ()
    scales: dict | None = None
    seed: int = 0
    n_rows: int = 100_000
    about: str = ""

    @property
    def n_concepts(self) -> int:
        return self.n_universal + self.n_partial + self.n_specific

    @property
    def mean_width(self) -> float:
        return sum(self.widths.values()) / len(self.widths)


WORLDS = [
    WorldSpec(
        "base",
        {"a": 64, "b": 96, "c": 128},
        64,
        32,
        32,
        8,
        8,
        seed=0,
        about="3 models 64/96/128; 128 concepts (64 universal, 32 partial, 32 specific); 8 active",
    ),
    WorldSpec(
        "wide2",
        {"a": 192, "b": 256},
        192,
        0,
        64,
        12,
        12,
        seed=1,
        about="2 wide models 192/256; 256 concepts (192 universal, 64 specific); 12 active",
    ),
    WorldSpec(
        "narrow4",
        {"a": 32, "b": 48, "c": 48, "d": 64},
        100,
        60,
        40,
        8,
        8,
        nonlinear=("d",),
        seed=2,
        about="4 narrow models 32/48/48/64, 200 concepts (100/60/40; overcomplete: more concepts "
        "than any width); model d nonlinear; 8 active",
    ),
    WorldSpec(
        "noisy",
        {"a": 96, "b": 128, "c": 160},
        96,
        32,
        32,
        16,
        16,
        noise=0.1,
        scales={"a": 0.1, "b": 1.0, "c": 10.0},
        seed=3,
        about="3 models 96/128/160, scales 0.1/1/10, noise 0.1; 160 concepts (96/32/32); 16 active",
    ),
]

QUICK_WORLDS = [
    dataclasses.replace(WORLDS[0], n_rows=8192, n_universal=16, n_partial=8, n_specific=8),
    dataclasses.replace(WORLDS[1], widths={"a": 48, "b": 64}, n_rows=8192, n_universal=24, n_specific=8),
]

# -- grid ---------------------------------------------------------------------------------------
FIELDS = ["world", "n_latents", "batch_size", "steps", "lr_mult", "warmup_frac", "init", "decoder_norm", "seed"]
RESULT_FIELDS = FIELDS + [
    "n_models",
    "n_concepts",
    "latents_per_concept",
    "tokens",
    "lr",
    "warmup_steps",
    "rec_universal",
    "rec_partial",
    "rec_specific",
    "rec_all",
    "train_loss",
    "fvu_self",
    "fvu_cross",
    "dead_max",
    "wall_s",
    "blocks",
]
DEFAULT_RUN = {"warmup_frac": "default", "init": "data", "decoder_norm": "max1", "seed": 0}
MULTS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
PROPOSED_LR = 3e-2  # the default this study arrived at: one LR for every n_latents and batch


def reference_lr(n_latents: int) -> float:
    """The LR rule under study (usae's default_lr when the study ran); multipliers are relative to
    it. Kept here, fixed, so the CSV means the same after the library's default changes."""
    return 1e-2 * math.sqrt(512 / n_latents)


def proposed_mult(world: WorldSpec, lpc: int) -> float:
    return PROPOSED_LR / reference_lr(lpc * world.n_concepts)


def run(world: WorldSpec, lpc: int, batch: int, steps: int, mult: float, **kw) -> dict:
    r = dict(
        DEFAULT_RUN, world=world.name, n_latents=lpc * world.n_concepts, batch_size=batch, steps=steps, lr_mult=mult
    )
    r.update(kw)
    return r


def grid(worlds: list[WorldSpec], quick: bool) -> list[dict]:
    by = {w.name: w for w in worlds}
    runs: list[tuple[str, dict]] = []
    if quick:
        for w in worlds:
            for m in (0.5, 1.0, 2.0):
                runs.append(("scaling", run(w, 4, 256, 40, m)))
            runs.append(("factors", run(w, 4, 256, 40, 1.0, decoder_norm="unit")))
            runs.append(("factors", run(w, 4, 256, 40, 1.0, init="random")))
        return _merge(runs)
    base = by["base"]
    for lpc in (2, 4, 8):
        for batch, steps in ((1024, 1500), (4096, 375)):
            for m in MULTS + ((16.0,) if lpc == 4 else ()):
                runs.append(("scaling", run(base, lpc, batch, steps, m)))
    for name in ("wide2", "narrow4", "noisy"):
        for m in MULTS if name != "wide2" else MULTS[:-1]:  # wide2 is the costly one
            runs.append(("worlds", run(by[name], 4, 1024, 1500, m)))
    for m in MULTS:
        if m < 8:
            runs.append(("worlds", run(by["narrow4"], 8, 1024, 1500, m)))
        runs.append(("worlds", run(by["narrow4"], 4, 4096, 375, m)))
    factors = [
        {"warmup_frac": 0.0},
        {"warmup_frac": 0.2},
        {"init": "random"},
        {"decoder_norm": "unit"},
    ]
    for w in worlds:
        for f in factors:
            for m in (1.0, 2.0):
                runs.append(("factors", run(w, 4, 1024, 1500, m, **f)))
    for steps in (500, 4000):
        for m in (0.5, 1.0, 2.0, 4.0) + ((8.0,) if steps == 500 else ()):
            runs.append(("budget", run(base, 4, 1024, steps, m)))
    for w in worlds:
        for m in (0.5, 1.0, 2.0, 4.0) if w.name in ("wide2", "noisy") else (1.0, 4.0):
            runs.append(("seeds", run(w, 4, 1024, 1500, m, seed=1)))
    # the proposed default (PROPOSED_LR at every size), checked where the sweeps did not reach
    for w in worlds:
        for seed in (0, 1) if w.name != "wide2" else (0,):
            runs.append(("proposed", run(w, 4, 1024, 1500, proposed_mult(w, 4), seed=seed)))
    n4 = by["narrow4"]
    for f in ({"warmup_frac": 0.0}, {"warmup_frac": 0.2}, {"init": "random"}):
        runs.append(("proposed", run(n4, 4, 1024, 1500, proposed_mult(n4, 4), **f)))
    for m in (1.0, 2.0):  # batch 4096 at the same number of steps (4x the tokens)
        runs.append(("proposed", run(base, 4, 4096, 1500, m * proposed_mult(base, 4))))
    for m in (1.0, proposed_mult(base, 32)):  # 4096 latents: the old rule vs the proposed LR
        runs.append(("proposed", run(base, 32, 1024, 1500, m)))
    return _merge(runs)


def key(r: dict) -> tuple:
    return tuple(str(r[f]) for f in FIELDS)


def _merge(runs: list[tuple[str, dict]]) -> list[dict]:
    out: dict[tuple, dict] = {}
    for block, r in runs:
        k = key(r)
        if k in out:
            if block not in out[k]["blocks"].split(";"):
                out[k]["blocks"] += ";" + block
        else:
            out[k] = dict(r, blocks=block)
    return list(out.values())


# -- one run ------------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _world_dirs(tmp: Path, name: str) -> tuple[Path, Path]:
    return tmp / name / "store", tmp / name / "truth.safetensors"


def build_worlds(worlds: list[WorldSpec], tmp: Path) -> None:
    from usae.data.store import write_store
    from usae.data.synth import make_world, save_truth

    for w in worlds:
        store, truth = _world_dirs(tmp, w.name)
        if store.exists():
            continue
        t = time.time()
        world = make_world(
            w.widths,
            n_rows=w.n_rows,
            n_universal=w.n_universal,
            n_partial=w.n_partial,
            n_specific=w.n_specific,
            k_active=w.k_active,
            noise=w.noise,
            nonlinear=w.nonlinear,
            scales=w.scales,
            seed=w.seed,
        )
        store.parent.mkdir(parents=True, exist_ok=True)
        write_store(store, world.data, dtype="float32")
        save_truth(truth, world)
        print(f"world {w.name}: {w.about} ({time.time() - t:.1f}s)", flush=True)


def _fvu(sae, store, n_rows: int = 8192) -> tuple[float, float]:
    """Mean FVU of self (encode i, decode i) and cross (encode i, decode j != i) reconstruction."""
    import torch

    names = sae.model_names
    n = min(n_rows, store.n_rows)
    x = {m: torch.from_numpy(np.ascontiguousarray(store.rows(m, 0, n))) for m in names}
    self_f, cross_f = [], []
    with torch.no_grad():
        for src in names:
            code = sae.encode_sparse(src, x[src])
            for dst in names:
                err = (sae.decode(dst, code) - x[dst]).pow(2).sum()
                tot = (x[dst] - x[dst].mean(0)).pow(2).sum()
                (self_f if src == dst else cross_f).append(float(err / tot))
    return float(np.mean(self_f)), float(np.mean(cross_f))


def train_one(args: tuple[dict, str, dict]) -> dict:
    r, tmp, spec_d = args

    from usae.config import TrainConfig
    from usae.config.train import default_warmup
    from usae.data.store import open_store
    from usae.data.synth import load_truth, recovery
    from usae.training.fit import fit

    tmp = Path(tmp)
    spec = WorldSpec(**spec_d)
    store_dir, truth_path = _world_dirs(tmp, spec.name)
    if "truth" not in _WORKER or _WORKER["truth"][0] != spec.name:
        _WORKER["truth"] = (spec.name, load_truth(truth_path))
    truth = _WORKER["truth"][1]
    steps, n_latents = int(r["steps"]), int(r["n_latents"])
    lr = float(r["lr_mult"]) * reference_lr(n_latents)
    warmup = None if r["warmup_frac"] == "default" else int(round(float(r["warmup_frac"]) * steps))
    out = tmp / "runs" / f"{os.getpid()}"
    cfg = TrainConfig(
        store=store_dir,
        out=out,
        n_latents=n_latents,
        k=spec.k,
        steps=steps,
        batch_size=int(r["batch_size"]),
        seed=int(r["seed"]),
        lr=lr,
        warmup_steps=warmup,
        init=r["init"],
        decoder_norm=r["decoder_norm"],
        device="cpu",
        progress=False,
        log_every=10**9,
        overwrite=True,
    )
    t = time.time()
    res = fit(cfg)
    wall = time.time() - t
    sae = res.sae
    rec = recovery({n: sae.dictionary(n).numpy() for n in sae.model_names}, truth)
    fvu_self, fvu_cross = _fvu(sae, open_store(store_dir))
    dead = max(v for k, v in res.last_metrics.items() if k.startswith("train/dead/"))
    shutil.rmtree(out, ignore_errors=True)
    return dict(
        r,
        n_models=len(spec.widths),
        n_concepts=spec.n_concepts,
        latents_per_concept=n_latents / spec.n_concepts,
        tokens=steps * int(r["batch_size"]),
        lr=lr,
        warmup_steps=warmup if warmup is not None else default_warmup(steps),
        rec_universal=rec["universal"],
        rec_partial=rec["partial"],
        rec_specific=rec["specific"],
        rec_all=rec["all"],
        train_loss=res.last_metrics["train/loss"],
        fvu_self=fvu_self,
        fvu_cross=fvu_cross,
        dead_max=dead,
        wall_s=wall,
    )


def _cost(r: dict, specs: dict) -> float:
    w = specs[r["world"]]
    return r["steps"] * r["batch_size"] * (w.mean_width * r["n_latents"] + 30_000)


def run_study(csv_path: Path, quick: bool, jobs: int, threads: int, keep_tmp: Path | None) -> None:
    worlds = QUICK_WORLDS if quick else WORLDS
    specs = {w.name: w for w in worlds}
    todo = grid(worlds, quick)
    done = {key(r) for r in read_csv(csv_path)} if csv_path.exists() else set()
    todo = [r for r in todo if key(r) not in done]
    todo.sort(key=lambda r: -_cost(r, specs))
    print(f"{len(todo)} runs to do ({len(done)} already in {csv_path})", flush=True)
    if not todo:
        return
    tmp = keep_tmp or Path(tempfile.mkdtemp(prefix="usae-defaults-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        build_worlds([specs[n] for n in sorted({r["world"] for r in todo})], tmp)
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        new = not csv_path.exists()
        t0 = time.time()
        tasks = [(r, str(tmp), dataclasses.asdict(specs[r["world"]])) for r in todo]
        with open(csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, RESULT_FIELDS)
            if new:
                writer.writeheader()
            ctx = mp.get_context("spawn")
            with ctx.Pool(jobs, initializer=_init_worker, initargs=(threads,)) as pool:
                for i, res in enumerate(pool.imap_unordered(train_one, tasks, chunksize=1)):
                    writer.writerow({k: res.get(k) for k in RESULT_FIELDS})
                    f.flush()
                    print(
                        f"[{i + 1}/{len(tasks)} {time.time() - t0:6.0f}s] {res['world']} "
                        f"s={res['n_latents']} b={res['batch_size']} steps={res['steps']} "
                        f"x{res['lr_mult']:.3g} lr={res['lr']:.3g} wu={res['warmup_frac']} {res['init']} "
                        f"{res['decoder_norm']} seed={res['seed']}: "
                        f"U/P/S {res['rec_universal']:.2f}/{res['rec_partial']:.2f}/"
                        f"{res['rec_specific']:.2f} fvu {res['fvu_self']:.3f}/"
                        f"{res['fvu_cross']:.3f} ({res['wall_s']:.0f}s)",
                        flush=True,
                    )
    finally:
        if keep_tmp is None:
            shutil.rmtree(tmp, ignore_errors=True)


# -- analysis -----------------------------------------------------------------------------------
def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("n_latents", "batch_size", "steps", "seed", "tokens", "warmup_steps", "n_models", "n_concepts"):
            r[k] = int(r[k])
        for k in (
            "lr_mult",
            "lr",
            "latents_per_concept",
            "rec_universal",
            "rec_partial",
            "rec_specific",
            "rec_all",
            "train_loss",
            "fvu_self",
            "fvu_cross",
            "dead_max",
            "wall_s",
        ):
            r[k] = float(r[k]) if r[k] not in ("", "nan") else math.nan
    return rows


def _pct(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:.0f}"


def _rec(r: dict) -> str:
    return "/".join(_pct(r[f"rec_{k}"]) for k in ("universal", "partial", "specific"))


def _select(rows, **kw):
    return [r for r in rows if all(str(r[k]) == str(v) for k, v in kw.items())]


def _mean(rows: list[dict], k: str) -> float:
    v = [r[k] for r in rows if not math.isnan(r[k])]
    return float(np.mean(v)) if v else math.nan


GOOD_FVU = 1.25  # a run is "good" when fvu_self <= GOOD_FVU x the best of its sweep ...
GOOD_REC = 0.02  # ... and it recovers within 2 points of the sweep's best recovery


def good_range(cells: list[dict]) -> tuple[float, float, float]:
    """(best mult, lowest good mult, highest good mult) of one LR sweep.

    Best: highest recovery, ties broken by lower fvu_self. Good: recovery within GOOD_REC of the
    best and fvu_self within GOOD_FVU x the best. The low edge is interpolated in log2(mult) on
    fvu_self between the last bad and the first good multiplier, so it is finer than the grid.
    """
    cells = sorted(cells, key=lambda r: r["lr_mult"])
    best = max(cells, key=lambda r: (round(r["rec_all"], 6), -r["fvu_self"]))
    fvu_best = min(r["fvu_self"] for r in cells if r["rec_all"] >= best["rec_all"] - GOOD_REC)
    good = [r["rec_all"] >= best["rec_all"] - GOOD_REC and r["fvu_self"] <= GOOD_FVU * fvu_best for r in cells]
    first = good.index(True)
    last = len(good) - 1 - good[::-1].index(True)
    lo = cells[first]["lr_mult"]
    if first > 0:
        r0, r1 = cells[first - 1], cells[first]
        x0, x1 = math.log2(r0["lr_mult"]), math.log2(r1["lr_mult"])
        y0, y1, t = math.log(r0["fvu_self"]), math.log(r1["fvu_self"]), math.log(GOOD_FVU * fvu_best)
        if y0 > t >= y1:
            lo = 2.0 ** (x0 + (x1 - x0) * (y0 - t) / (y0 - y1))
    return best["lr_mult"], lo, cells[last]["lr_mult"]


def _cell(r: dict | None) -> str:
    return f"{_rec(r)}; {r['fvu_self']:.3f}" if r else ""


def analyze(csv_path: Path) -> str:
    default_lr = reference_lr
    rows = read_csv(csv_path)
    out: list[str] = []
    p = out.append
    worlds = [w.name for w in WORLDS if any(r["world"] == w.name for r in rows)]
    worlds += sorted({r["world"] for r in rows} - set(worlds))
    dflt = dict(DEFAULT_RUN)

    # LR sweeps: every (world, n_latents, batch, steps) with >= 3 multipliers at defaults, seed 0
    p("### LR sweeps\n")
    p(
        "Seed 0, warmup/init/decoder at their defaults. Cell: % recovered universal/partial/"
        "specific; FVU of self-reconstruction. 'good': recovery within 2 points of the sweep's "
        "best and FVU within 1.25x its best (low edge interpolated).\n"
    )
    sweeps: dict = {}
    for r in _select(rows, **dflt):
        if r["blocks"] == "proposed":  # off-grid LRs; shown in their own table
            continue
        sweeps.setdefault((r["world"], r["n_latents"], r["batch_size"], r["steps"]), []).append(r)
    sweeps = {k: v for k, v in sweeps.items() if len(v) >= 3}
    mults = sorted({r["lr_mult"] for v in sweeps.values() for r in v})
    p(
        "| world | latents | batch | steps | rule LR | "
        + " | ".join(f"x{m:g}" for m in mults)
        + " | best | good range |"
    )
    p("|" + "---|" * (7 + len(mults)))
    edges = []
    order = {w: i for i, w in enumerate(worlds)}
    for (w, s, b, steps), cells in sorted(sweeps.items(), key=lambda kv: (order[kv[0][0]], kv[0][1:])):
        by_m = {r["lr_mult"]: r for r in cells}
        row = [w, str(s), str(b), str(steps), f"{default_lr(s):.2g}"]
        row += [_cell(by_m.get(m)) for m in mults]
        bm, lo, hi = good_range(cells)
        top = "+" if hi == max(by_m) else ""
        row += [f"x{bm:g}", f"x{lo:.2g}–x{hi:g}{top}"]
        p("| " + " | ".join(row) + " |")
        edges.append(
            dict(
                world=w,
                n_latents=s,
                batch=b,
                steps=steps,
                lo=lo * default_lr(s),
                hi=hi * default_lr(s),
                hi_open=bool(top),
                best=bm * default_lr(s),
                n_concepts=cells[0]["n_concepts"],
            )
        )
    p("\n('+': the range reaches the largest multiplier tried.)\n")

    p("### Absolute LRs of the good range\n")
    p("Low edge interpolated; high edge: the largest good LR tried ('+': the largest tried).\n")
    p("| world | latents | latents/concept | batch | steps | low edge | best | high edge |")
    p("|---|---|---|---|---|---|---|---|")
    for e in edges:
        p(
            f"| {e['world']} | {e['n_latents']} | {e['n_latents'] / e['n_concepts']:g} | "
            f"{e['batch']} | {e['steps']} | {e['lo']:.2g} | {e['best']:.2g} | "
            f"{e['hi']:.2g}{'+' if e['hi_open'] else ''} |"
        )
    p("")
    pts = [e for e in edges if e["world"] == "base" and e["steps"] * e["batch"] == 1500 * 1024]
    if len(pts) >= 3:
        X = np.array([[1.0, math.log(e["n_latents"] / 512), math.log(e["batch"] / 1024)] for e in pts])
        y = np.array([math.log(e["lo"]) for e in pts])
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        p(
            "Least-squares fit of the low edge on world base at equal tokens: low edge ≈ "
            f"{math.exp(coef[0]):.3g} · (n_latents/512)^{coef[1]:+.2f} · "
            f"(batch/1024)^{coef[2]:+.2f}\n"
        )

    # the proposed default against the old rule, config by config
    prop = [r for r in rows if "proposed" in r["blocks"] and r["lr_mult"] != 1.0]
    if prop:
        p(f"### The proposed default LR {PROPOSED_LR:g} vs the old rule\n")
        p("Same configuration at the old rule's LR (x1) where the grid has it; '·' = not run.\n")
        p(
            "| world | latents | batch | steps | variant | seed | old rule: LR; U/P/S; FVU | "
            f"{PROPOSED_LR:g}: U/P/S; FVU |"
        )
        p("|---|---|---|---|---|---|---|---|")
        for r in sorted(
            prop, key=lambda r: (order.get(r["world"], 99), r["n_latents"], r["batch_size"], r["lr"], r["seed"])
        ):
            variant = (
                ", ".join(f"{k} {r[k]}" for k in ("warmup_frac", "init", "decoder_norm") if str(r[k]) != str(dflt[k]))
                or "default"
            )
            if abs(r["lr"] - PROPOSED_LR) > 1e-9:
                variant += f"; LR {r['lr']:.2g}"
            sel = {k: r[k] for k in FIELDS if k != "lr_mult"}
            old_r = [q for q in _select(rows, **sel) if q["lr_mult"] == 1.0]
            p(
                f"| {r['world']} | {r['n_latents']} | {r['batch_size']} | {r['steps']} | {variant} | "
                f"{r['seed']} | " + (f"{old_r[0]['lr']:.2g}; {_cell(old_r[0])}" if old_r else "·") + f" | {_cell(r)} |"
            )
        p("")

    # seed-averaged headline
    hm = [0.5, 1.0, 2.0, 4.0]
    p("### Two training seeds (4x latents, batch 1024, 1500 steps)\n")
    p(f"Mean over seeds 0 and 1: % recovered universal/partial/specific; FVU self. Last column: LR {PROPOSED_LR:g}.\n")
    p("| world | " + " | ".join(f"x{m:g}" for m in hm) + f" | {PROPOSED_LR:g} |")
    p("|---|" + "---|" * (len(hm) + 1))
    for w in worlds:
        cells = []
        for m in hm + [None]:
            rs = [
                r
                for r in rows
                if r["world"] == w
                and r["batch_size"] == 1024
                and r["steps"] == 1500
                and r["latents_per_concept"] == 4
                and r["seed"] in (0, 1)
                and all(str(r[k]) == str(dflt[k]) for k in ("warmup_frac", "init", "decoder_norm"))
                and (r["lr_mult"] == m if m is not None else abs(r["lr"] - PROPOSED_LR) < 1e-9)
            ]
            if len(rs) < 2:
                cells.append(_cell(rs[0]) + " (seed 0)" if rs else "")
                continue
            cells.append(
                "/".join(_pct(_mean(rs, f"rec_{k}")) for k in ("universal", "partial", "specific"))
                + f"; {_mean(rs, 'fvu_self'):.3f}"
            )
        p(f"| {w} | " + " | ".join(cells) + " |")
    p("")

    # one factor at a time
    p("### One factor at a time (4x latents, batch 1024, 1500 steps, seed 0)\n")
    variants = [
        ("default (warmup 5 %, data init, max1)", {}),
        ("warmup 0", {"warmup_frac": 0.0}),
        ("warmup 20 %", {"warmup_frac": 0.2}),
        ("init random", {"init": "random"}),
        ("decoder unit", {"decoder_norm": "unit"}),
    ]
    for m in (1.0, 2.0):
        p(f"LR multiplier x{m:g}:\n")
        p("| variant | " + " | ".join(worlds) + " |")
        p("|---|" + "---|" * len(worlds))
        for label, v in variants:
            cells = []
            for w in worlds:
                sel = dict(dflt, world=w, batch_size=1024, steps=1500, lr_mult=m, seed=0)
                sel.update(v)
                rs = [r for r in _select(rows, **sel) if r["latents_per_concept"] == 4]
                cells.append(_cell(rs[0] if rs else None))
            p(f"| {label} | " + " | ".join(cells) + " |")
        p("")

    # budget
    bm = sorted({r["lr_mult"] for r in rows if "budget" in r["blocks"]})
    p("### Steps budget (world base, 512 latents, batch 1024, seed 0)\n")
    p("| steps | " + " | ".join(f"x{m:g}" for m in bm) + " |")
    p("|---|" + "---|" * len(bm))
    for steps in (500, 1500, 4000):
        cells = [
            _cell(
                next(
                    iter(
                        _select(
                            rows, **dict(dflt, world="base", n_latents=512, batch_size=1024, steps=steps, lr_mult=m)
                        )
                    ),
                    None,
                )
            )
            for m in bm
        ]
        p(f"| {steps} | " + " | ".join(cells) + " |")
    p("")
    total = sum(r["wall_s"] for r in rows)
    p(
        f"{len(rows)} runs, {total / 60:.0f} min of training (sum over runs, 1 torch thread each, "
        "2 runs at a time on a shared 2-core CPU)."
    )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny worlds and grid (smoke test)")
    ap.add_argument("--csv", type=Path, default=None, help=f"results CSV (default {DEFAULT_CSV})")
    ap.add_argument("--jobs", type=int, default=2, help="parallel training processes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--analyze", action="store_true", help="only print tables from the CSV")
    ap.add_argument("--tmp", type=Path, default=None, help="keep worlds here (default: temp dir)")
    a = ap.parse_args(argv)
    csv_path = a.csv or (Path(tempfile.gettempdir()) / "defaults_study_quick.csv" if a.quick else DEFAULT_CSV)
    if not a.analyze:
        run_study(csv_path, a.quick, a.jobs, a.threads, a.tmp)
    print(analyze(csv_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
