"""Coordinated activation maximisation (MACO parametrisation) on tiny fake backbones."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from explore_world import shared_world

import usae
from usae.__main__ import main
from usae.errors import UsaeError
from usae.explore import explore, load_view
from usae.maximize import (
    RESULT_NAME,
    FourierImage,
    LatentObjective,
    load_backbones,
    maximize,
    random_crops,
    token_values_of,
    write_maximization,
)


def _read_png(path):
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shared_world(tmp_path_factory)


@pytest.fixture(scope="module")
def universal(world) -> list[int]:
    """The run's selective universal concepts: rarest first among those firing on >= 2% of tokens.

    A concept that fires on most tokens of any image (the densest ones here fire on ~20%) already
    fires on the starting noise, leaving no room for a 5x gain: maximisation is meant for
    selective concepts.
    """
    report = json.loads((world.run / "report.json").read_text())
    rate = np.sum([report["fires"][n] for n in report["model_names"]], axis=0) / (
        len(report["model_names"]) * report["n_rows"]
    )
    ranked = [int(k) for k in np.argsort(rate, kind="stable") if report["classes"]["labels"][k] == "universal"]
    ranked = [k for k in ranked if rate[k] >= 0.02]
    assert len(ranked) >= 3
    return ranked


def test_fourier_image_is_a_phase_only_parametrisation():
    a = FourierImage(32, torch.Generator().manual_seed(1))
    b = FourierImage(32, torch.Generator().manual_seed(1))
    img = a()
    assert img.shape == (1, 3, 32, 32) and img.min() >= 0 and img.max() <= 1
    torch.testing.assert_close(img, b())  # seeded
    assert [n for n, _ in a.named_parameters()] == ["phase"]  # the magnitude spectrum is fixed
    assert a.magnitude[0, 0, 1] > a.magnitude[0, 0, -1] > 0  # 1/f: low frequencies dominate
    crops = random_crops(img, 5, (0.5, 1.0), torch.Generator().manual_seed(0))
    assert crops.shape == (5, 3, 32, 32)


def test_objective_follows_the_extraction_path(world):
    """The objective on an image's canonical view equals the pre-activation computed from the store rows."""
    sae, store = usae.load(world.run), usae.open_store(world.store)
    backbones = load_backbones(store, sae.model_names, torch.device("cpu"))
    t = store.tokens_per_image
    for name in sae.model_names:
        objective = LatentObjective(sae, backbones[name], name, store.grid, 3)
        got = token_values_of(objective, load_view(store, 2))
        x = torch.from_numpy(store.rows(name, 2 * t, 3 * t))
        want = sae.pre_activation(name, sae.normalize(name, x))[:, 3].detach().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_maximisation_excites_its_concept(world, universal):
    """Per model: >= 5x the starting noise's activation, and more than the other concepts' images get."""
    concepts = universal[:3]
    results = {k: maximize(world.run, k, steps=60, device="cpu", progress=False) for k in concepts}
    sae, store = usae.load(world.run), usae.open_store(world.store)
    backbones = load_backbones(store, sae.model_names, torch.device("cpu"))
    for name in sae.model_names:
        for k in concepts:
            r = results[k]
            assert r.activation[name] >= 5 * r.start_activation[name] > 0, (name, k, r.activation, r.start_activation)
            assert r.objective[name] > r.start_objective[name]
            objective = LatentObjective(sae, backbones[name], name, store.grid, k)
            # measured again on the saved 8-bit image, against the other concepts' images
            act = {k2: np.maximum(token_values_of(objective, results[k2].images[name]), 0).mean() for k2 in concepts}
            assert act[k] == pytest.approx(r.activation[name], rel=0.05, abs=1e-3)
            assert all(act[k] > act[k2] for k2 in concepts if k2 != k), (name, k, act)


def test_maximisation_is_deterministic_and_written(world, universal, tmp_path):
    a = maximize(world.run, universal[0], steps=3, device="cpu", progress=False)
    b = maximize(world.run, universal[0], steps=3, device="cpu", progress=False)
    for name in a.images:
        assert np.array_equal(np.asarray(a.images[name]), np.asarray(b.images[name]))
    out = write_maximization(a, tmp_path / "max")
    assert out == tmp_path / "max" / f"concept-{universal[0]}"
    saved = json.loads((out / RESULT_NAME).read_text())
    assert saved["concept"] == universal[0] and saved["steps"] == 3 and set(saved["models"]) == set(a.images)
    for name, entry in saved["models"].items():
        assert np.array_equal(np.asarray(_read_png(out / entry["png"])), np.asarray(a.images[name]))
    panel = _read_png(out / "panel.png")
    assert panel.width > 2 * a.images[next(iter(a.images))].width


def test_explorer_shows_maximisations(world, universal, tmp_path):
    """Results under RUN/maximize appear on their concept pages; --maximize-top makes new ones."""
    run = tmp_path / "run"
    shutil.copytree(world.run, run)  # keep the shared run free of maximize/
    result = maximize(run, universal[1], models=[usae.load(run).model_names[0]], steps=2, progress=False)
    write_maximization(result, run / "maximize")
    site = explore(
        run, world.store, tmp_path / "site", n_top=2, maximize_top=1, maximize_steps=2, progress=False
    ).parent
    page = (site / "concepts" / f"{universal[1]}.html").read_text()
    assert "Coordinated activation maximisation" in page
    assert (site / "max" / str(universal[1]) / "model-0.png").is_file()
    made = [p for p in (run / "maximize").iterdir() if p.name != f"concept-{universal[1]}"]
    assert len(made) == 1 and (made[0] / RESULT_NAME).is_file()  # the top universal concept by energy
    assert (site / "max" / made[0].name.removeprefix("concept-") / "model-1.png").is_file()


def test_maximize_errors(world):
    with pytest.raises(UsaeError, match="outside"):
        maximize(world.run, 10_000, steps=1, progress=False)
    with pytest.raises(UsaeError, match="unknown model"):
        maximize(world.run, 0, models=["nope"], steps=1, progress=False)


def test_cli_maximize(world, tmp_path, capsys):
    out = tmp_path / "max"
    args = ["maximize", str(world.run), "--concept", "1", "2", "--steps", "2", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert (out / "concept-1" / "panel.png").is_file() and (out / "concept-2" / RESULT_NAME).is_file()
    assert "panel.png" in capsys.readouterr().out
    assert main(["maximize", str(world.run), "--concept", "1", "--store", str(tmp_path / "none")]) == 2
