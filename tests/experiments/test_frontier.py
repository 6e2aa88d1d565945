"""``usae frontier`` on a synthetic world with known answers.

The world: 2 models observe scenes of exactly ``PLANTED_K`` of 24 universal concepts (coefficients in
[0.5, 2]) through their own random dictionaries, with per-dimension offsets and a little noise. Each
row's labels are its active concepts ("concepts follow labels"), and each model's task head is the
least-squares readout of the planted coefficients from its activations (a linear head reading the
planted concepts). One frontier over k in {1, PLANTED_K} is trained once for the module (module
fixture: every test only reads it, except the resume tests, which copy it).
"""

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from usae.config import FrontierConfig
from usae.data.store import write_store
from usae.evaluation.naming.scores import LabelMatrix
from usae.experiments import frontier as frontier_module
from usae.experiments.frontier import frontier
from usae.experiments.frontier_measure import (
    LinearTaskFidelity,
    RowLabelNaming,
    chance_agreement,
    join_independent,
    random_dictionary,
)

PLANTED_K = 3
N_CONCEPTS = 24
WIDTHS = {"a": 32, "b": 48}
N_TRAIN, N_VAL = 8000, 3000


def _world(seed: int = 1):
    """(data per model, codes): exactly PLANTED_K active concepts per row."""
    rng = np.random.default_rng(seed)
    n = N_TRAIN + N_VAL
    codes = np.zeros((n, N_CONCEPTS), np.float32)
    active = np.argsort(rng.random((n, N_CONCEPTS)), axis=1)[:, :PLANTED_K]
    np.put_along_axis(codes, active, rng.uniform(0.5, 2.0, (n, PLANTED_K)).astype(np.float32), axis=1)
    data = {}
    for name, d in WIDTHS.items():
        dict_cd = rng.standard_normal((N_CONCEPTS, d))
        dict_cd /= np.linalg.norm(dict_cd, axis=1, keepdims=True)
        x = codes @ dict_cd * rng.uniform(0.5, 3.0)
        rms = np.sqrt((x**2).mean())
        data[name] = (x + rms * rng.standard_normal(d) + 0.02 * rms * rng.standard_normal(x.shape)).astype(np.float32)
    return data, codes


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    data, codes = _world()
    root = tmp_path_factory.mktemp("frontier-world")
    train = write_store(root / "train", {n: x[:N_TRAIN] for n, x in data.items()}, dtype="float32")
    val = write_store(root / "val", {n: x[N_TRAIN:] for n, x in data.items()}, dtype="float32")
    heads = {}
    for name, x in data.items():
        x_c = x[:N_TRAIN].astype(np.float64) - x[:N_TRAIN].mean(0)
        heads[name] = torch.from_numpy(np.linalg.lstsq(x_c, codes[:N_TRAIN].astype(np.float64), rcond=None)[0])
    labels = LabelMatrix(codes[N_TRAIN:] > 0, [f"concept{j}" for j in range(N_CONCEPTS)])
    plugins = {"naming": RowLabelNaming(labels, n_perm=1000), "fidelity": LinearTaskFidelity(heads)}
    return {"train": train, "val": val, "plugins": plugins, "root": root}


def _cfg(world, out, **overrides):
    settings = {"k": (1, PLANTED_K), "n_latents": (48,), "steps": 300, "batch_size": 256, "device": "cpu",
                "progress": False} | overrides  # fmt: skip
    return FrontierConfig(store=world["train"], val=world["val"], out=out, **settings)


@pytest.fixture(scope="module")
def result(world):
    out = world["root"] / "out"
    return frontier(_cfg(world, out), **world["plugins"]), out


def _row(result, kind, k):
    return next(r for r in result[0]["rows"] if r["kind"] == kind and r["k"] == k)


def test_loss_recovered_rises_with_k_to_the_planted_k(result):
    low, planted = _row(result, "universal", 1), _row(result, "universal", PLANTED_K)
    assert planted["loss_recovered_own"] > low["loss_recovered_own"] + 0.2
    assert planted["loss_recovered_own"] >= 0.95, planted
    assert planted["loss_recovered_cross"] >= 0.9  # the universal code serves the other model's task too
    assert result[0]["k_reaching"]["universal"]["48"] == {"a": PLANTED_K, "b": PLANTED_K}
    assert result[0]["k_reaching"]["random"]["48"] == {"a": None, "b": None}


def test_random_dictionary_names_nothing_beyond_chance_and_recovers_no_more_than_the_floor(result):
    for k in (1, PLANTED_K):
        rand, trained = _row(result, "random", k), _row(result, "universal", k)
        assert rand["loss_recovered_own"] <= 0.05, rand  # 0 is the mean-ablation floor
        assert rand["named_share"] <= rand["named_share_chance"] + 0.06, rand
        assert trained["named_share"] >= trained["named_share_chance"] + 0.2, trained
        assert rand["named_share_shuffled"] == trained["named_share_shuffled"] == 0.0


def test_independent_saes_have_no_cross_model_code(result):
    """Unrelated latents decode another model's code into noise: cross R² no better than the mean
    (0), about minus the self R² (the added variance), while the universal code crosses."""
    for k in (1, PLANTED_K):
        indep, univ = _row(result, "independent", k), _row(result, "universal", k)
        assert indep["r2_cross"] <= 0.05 and univ["r2_cross"] > 0.5, (indep, univ)
        assert indep["loss_recovered_cross"] < 0.2 < univ["loss_recovered_cross"]
        assert indep["r2_self"] > 0.4  # a working SAE of its own model all the same
        assert indep["r2_cross_paper"] is not None and indep["tokens_per_s"] > 0


def test_outputs_table_csv_and_figures(result):
    summary, out = result
    rows = list(csv.DictReader((out / "frontier.csv").open()))
    assert [(r["kind"], r["k"]) for r in rows] == [
        (kind, str(k)) for k in (1, PLANTED_K) for kind in ("universal", "independent", "random")
    ]
    assert "loss_recovered_own/a" in rows[0] and "named_per_model/b" in rows[0]
    table = (out / "frontier.md").read_text()
    assert table.count("\n| 48 |") == 6 and "reaches 0.9" in table
    assert {"frontier-fidelity.png", "frontier-r2.png"} <= {p.name for p in out.iterdir()}
    saved = json.loads((out / "frontier.json").read_text())
    assert saved["config"]["k"] == [1, PLANTED_K] and len(saved["points"]) == 2
    assert saved["val"]["held_out"] is True


def test_a_finished_grid_is_not_retrained_or_remeasured(result, world, monkeypatch):
    summary, out = result

    def refuse(*args, **kwargs):
        raise AssertionError("a finished point was trained or measured again")

    monkeypatch.setattr(frontier_module, "fit_many", refuse)
    monkeypatch.setattr(frontier_module, "measure_point", refuse)
    again = frontier(_cfg(world, out), **world["plugins"])
    assert again["rows"] == summary["rows"]


def test_killed_mid_grid_rerun_finishes_only_what_is_missing(result, world, tmp_path, monkeypatch):
    """As a kill -9 leaves it: the first point done, the second trained only in part (its point.json
    and one run's weights missing). The rerun trains that one run and measures that one point."""
    _, out = result
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    second = copy / "points" / f"s48-k{PLANTED_K}"
    (second / "point.json").unlink()
    (second / "universal" / "model.safetensors").unlink()
    trained, measured = [], []
    real_fit, real_measure = frontier_module.fit_many, frontier_module.measure_point
    monkeypatch.setattr(frontier_module, "fit_many", lambda runs: trained.extend(r.out for r in runs) or real_fit(runs))
    monkeypatch.setattr(
        frontier_module, "measure_point", lambda p, ctx: measured.append(p.name) or real_measure(p, ctx)
    )
    again = frontier(_cfg(world, copy), **world["plugins"])
    assert trained == [second / "universal"] and measured == [f"s48-k{PLANTED_K}"]
    assert len(again["rows"]) == 6 and (second / "point.json").is_file()


def test_other_settings_remeasure_but_reuse_the_trained_runs(result, world, tmp_path, monkeypatch):
    _, out = result
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    monkeypatch.setattr(frontier_module, "fit_many", lambda runs: pytest.fail(f"retrained {runs}"))
    again = frontier(_cfg(world, copy, random_dictionary=False), **world["plugins"])
    assert {r["kind"] for r in again["rows"]} == {"universal", "independent"}


def test_random_dictionary_is_the_stated_control(world):
    from usae.config import TrainConfig
    from usae.data.store import open_store

    store = open_store(world["train"])
    sae = random_dictionary(TrainConfig(store=world["train"], n_latents=40, k=3), store, store.model_names)
    for name in store.model_names:
        h = sae.head(name)
        assert torch.allclose(h.W_dec.norm(dim=1), torch.ones(40)) and torch.equal(h.W_enc, h.W_dec)
        assert torch.allclose(h.shift_d, torch.from_numpy(store.stats(name).mean))  # the store's normalisation
    assert sae.k == 3 and not torch.allclose(sae.head("a").W_dec[:, :32], sae.head("b").W_dec[:, :32])


def test_joined_independent_saes_keep_every_head(world):
    from usae.config import TrainConfig
    from usae.data.store import open_store

    store = open_store(world["train"])
    one = {m: random_dictionary(TrainConfig(store=world["train"], n_latents=8, k=2, seed=i), store, [m])
           for i, m in enumerate(store.model_names)}  # fmt: skip
    joined = join_independent(one)
    assert joined.model_names == store.model_names
    for m, sae in one.items():
        assert all(torch.equal(v, joined.head(m).state_dict()[k]) for k, v in sae.head(m).state_dict().items())


def test_chance_agreement_known_answers():
    named = lambda label: {"label": label, "significant": True}  # noqa: E731
    # every concept of both models carries the one label "x": any pairing agrees
    assert chance_agreement([{"a": named("x"), "b": named("x")}] * 5, ["a", "b"]) == 5
    # two labels half and half: a random pairing agrees on half of the concepts on average
    concepts = [{"a": named(lab), "b": named(lab)} for lab in "xy" * 50]
    assert abs(chance_agreement(concepts, ["a", "b"], n_perm=400) - 50) < 3
    # a model that uses no concept leaves nothing to agree on
    assert chance_agreement([{"a": named("x"), "b": None}] * 4, ["a", "b"]) == 0


def test_cli_frontier_on_a_store_without_images_or_backbones(world, tmp_path, cli):
    """The command line on a synthetic store: no held-out twin (warned), nothing to name or splice,
    R² and classes all the same."""
    out = tmp_path / "F"
    argv = ["frontier", world["train"], "--k", "2", "--n-latents", "16", "--steps", "5", "--batch-size", "128",
            "--max-eval-rows", "500", "--out", out, "--no-progress", "--device", "cpu"]  # fmt: skip
    rc, err = cli(argv)
    assert rc == 0, err
    saved = json.loads((out / "frontier.json").read_text())
    assert saved["val"]["held_out"] is False and saved["k_reaching"] is None
    assert [r["kind"] for r in saved["rows"]] == ["universal", "independent", "random"]
    assert all(r["named_share"] is None and r["r2_self"] is not None for r in saved["rows"])
    assert (out / "frontier-r2.png").is_file() and not (out / "frontier-fidelity.png").exists()
    assert "No task fidelity" in (out / "frontier.md").read_text()


def test_extracted_store_named_by_usae_label_with_a_random_backbone_beside(tmp_path):
    """The defaults on a store from `usae extract`: names from `usae label` (folder and pixel labels) on
    the held-out twin, no task (random CNNs do not splice), and one model declared a random backbone
    against the other."""
    from PIL import Image

    from usae.config import ExtractConfig
    from usae.data.store import open_store
    from usae.extraction.extract import extract

    rng = np.random.default_rng(0)
    for name, rgb in {"red": (220, 30, 30), "blue": (30, 40, 220), "green": (30, 180, 40)}.items():
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(36):
            pixels = np.clip(np.array(rgb) + rng.integers(-40, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i:02d}.png")
    store = extract(ExtractConfig(images=str(tmp_path / "images"), models=("fake:w16s8i32", "fake:w8s4i32"),
                                  out=tmp_path / "store", labels="folders", val_fraction=0.25, device="cpu",
                                  dtype="float32"))  # fmt: skip
    names = open_store(store).model_names
    cfg = FrontierConfig(store=store, out=tmp_path / "F", k=(4,), n_latents=(32,), steps=40, batch_size=128,
                         random_models=(names[1],), n_perm=500, device="cpu", progress=False)  # fmt: skip
    summary = frontier(cfg)
    assert summary["val"]["held_out"] is True
    universal = summary["points"][0]["kinds"]["universal"]
    assert {"dataset", "pixels"} <= set(universal["naming"]) and universal["loss_recovered"] is None
    assert (tmp_path / "F" / "points" / "s32-k4" / "measures" / "random" / "naming" / "labels.json").is_file()
    section = summary["points"][0]["random_backbone"]["universal"]
    assert set(section) == {"real_r2_cross", names[1]} and section[names[1]]["r2_from_real"] is not None
    assert summary["rows"][0]["naming_family"] == "dataset"
    assert "Random backbones against the real ones" in (tmp_path / "F" / "frontier.md").read_text()


@pytest.mark.slow
def test_kill_9_mid_grid_then_rerun_finishes_the_grid(world, tmp_path, cli):
    """A real kill -9 of `usae frontier` just after its first point is written; the rerun reuses that
    point untouched and finishes the others."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "F"
    args = ["frontier", str(world["train"]), "--val", str(world["val"]), "--k", "1", "2", "3", "4", "--n-latents",
            "16", "32", "--steps", "30", "--batch-size", "128", "--out", str(out), "--no-progress", "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "usae", *args], env=env, stderr=subprocess.DEVNULL)
    first = out / "points" / "s16-k1" / "point.json"
    end = time.monotonic() + 300
    while not first.exists():
        assert proc.poll() is None and time.monotonic() < end, "frontier ended before its first point"
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "frontier.json").exists(), "the grid finished before the kill; make it longer"
    before = first.read_bytes()
    rc, err = cli(args)
    assert rc == 0, err
    saved = json.loads((out / "frontier.json").read_text())
    assert len(saved["points"]) == 8 and first.read_bytes() == before


# -- γ per model in the report (issue 22, item 3) ------------------------------------------------------
def test_outlier_gamma_known_answers():
    from usae.model.metrics import outlier_gamma

    assert outlier_gamma(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 1.0])) == pytest.approx(5 / 2**0.5)
    assert outlier_gamma(torch.zeros(3), torch.ones(3)) == 0.0
    assert outlier_gamma(torch.ones(2), torch.zeros(2)) == float("inf")


def test_report_gamma_equals_the_formula_on_a_store_of_known_means_and_stds(tmp_path):
    from usae.config import EvalConfig, TrainConfig
    from usae.data.store import open_store
    from usae.evaluation.evaluate import evaluate_sae
    from usae.evaluation.report.markdown import write_report

    rng = np.random.default_rng(0)
    means = {"a": rng.normal(0, 5, 6), "b": np.zeros(4)}
    stds = {"a": rng.uniform(0.5, 2, 6), "b": np.array([1.0, 2.0, 3.0, 4.0])}
    data = {}
    for n in means:
        z = rng.standard_normal((4000, len(means[n])))
        z = (z - z.mean(0)) / z.std(0)  # exactly the given mean and (population) std per dimension
        data[n] = (means[n] + stds[n] * z).astype(np.float32)
    store = open_store(write_store(tmp_path / "s", data, dtype="float32"))
    sae = random_dictionary(TrainConfig(store=store.path, n_latents=8, k=2), store, store.model_names)
    report = evaluate_sae(sae, store, EvalConfig(run=tmp_path, stores=(store.path,), progress=False))
    for n in means:
        assert report["gamma"][n] == pytest.approx(
            np.linalg.norm(means[n]) / np.linalg.norm(stds[n]), rel=1e-4, abs=1e-6
        )
    assert report["gamma"]["b"] < 1e-6  # centred data: no outlier at all
    text = write_report(report, tmp_path / "rep").read_text()
    assert "## Per model: FVU, L0, dead, γ" in text and "dead % (" in text


def test_random_control_line_for_the_demo(tmp_path):
    """The demo's one frontier line: its run's names (RUN/labels.json) beside the random dictionary's."""
    from PIL import Image

    from usae.config import ExtractConfig, LabelConfig, TrainConfig
    from usae.evaluation.naming.label import label
    from usae.experiments.frontier import random_control_line
    from usae.extraction.extract import extract, val_store_path
    from usae.training.fit import fit

    rng = np.random.default_rng(1)
    for name, rgb in {"red": (220, 30, 30), "blue": (30, 40, 220)}.items():
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(40):
            pixels = np.clip(np.array(rgb) + rng.integers(-40, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i:02d}.png")
    store = extract(ExtractConfig(images=str(tmp_path / "images"), models=("fake:w16s8i32", "fake:w8s4i32"),
                                  out=tmp_path / "store", labels="folders", val_fraction=0.25, device="cpu",
                                  dtype="float32"))  # fmt: skip
    run = tmp_path / "run"
    fit(TrainConfig(store=store, out=run, n_latents=32, k=4, steps=40, batch_size=128, progress=False))
    label(LabelConfig(run=run, store=val_store_path(store), n_perm=500, progress=False))
    line = random_control_line(run, val_store_path(store), tmp_path / "control", n_perm=500, device="cpu")
    assert line.startswith("frontier point (32 latents, k 4): named share ") and "random dictionary" in line
    assert "named share – " not in line and "(random dictionary –)" not in line.split(";")[0]
