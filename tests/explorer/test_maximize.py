"""Coordinated activation maximisation (MACO parametrisation) on tiny fake backbones: the data
spectrum, the comparison with the best natural images and the transfer matrix."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from explore_world import shared_world

import usae
from usae.__main__ import main
from usae.config import ExploreConfig, MaximizeConfig
from usae.errors import UsaeError
from usae.explorer import spectrum as spectrum_mod
from usae.explorer.concepts import load_view, top_images
from usae.explorer.maco import FourierImage, LatentObjective, random_crops
from usae.explorer.maximize import load_backbones, maximize, natural_best, token_values_of
from usae.explorer.maximize_result import read_maximization, write_maximization
from usae.explorer.site import explore
from usae.explorer.spectrum import (
    colour_basis,
    data_spectrum,
    estimate_spectrum,
    image_spectrum,
    power_law_spectrum,
    spectrum_images,
    spectrum_path,
    standardize_views,
)
from usae.run import MAXIMIZE_RESULT_NAME as RESULT_NAME


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


@pytest.fixture(scope="module")
def results(world, universal):
    """Three selective universal concepts maximised with the default (data) spectrum, 60 steps."""
    return {k: maximize(world.run, k, steps=60, device="cpu", progress=False) for k in universal[:3]}


GAIN = 3.0  # activation over the starting image's, after 60 steps (measured 3.8-24)
MIN_RATIO = 0.5  # score over the best natural image's, after 60 steps (measured 0.62-1.03)


def _views(*planes_ss3: np.ndarray) -> np.ndarray:
    return np.stack([np.clip(np.round(p * 255), 0, 255).astype(np.uint8) for p in planes_ss3])


# -- the data spectrum -----------------------------------------------------------------------------
def test_spectrum_of_sinusoids_peaks_at_their_frequency():
    """Images that are one sinusoid (any phase, any colour) have their spectrum's peak there."""
    size, f0, f1 = 32, 5, 3
    x = np.arange(size) / size
    colour = np.array([1.0, 0.6, 0.2])
    horizontal = [0.5 + 0.4 * np.sin(2 * np.pi * f0 * x + ph)[None, :, None] * colour + 0 * x[:, None, None]
                  for ph in (0.0, 1.0, 2.5)]  # fmt: skip
    mag = image_spectrum(_views(*horizontal))  # in R, G, B
    assert mag.shape == (3, size, size // 2 + 1) and mag.dtype == torch.float32
    for c in range(3):
        assert np.unravel_index(int(mag[c].argmax()), mag[c].shape) == (0, f0)
        off = mag[c].clone()
        off[0, f0] = 0
        assert off.max() < 0.3 * mag[c, 0, f0]  # the periodic component spreads little elsewhere
    # in the images' colour basis all of it is in the first channel, along the sinusoid's colour
    basis = colour_basis(standardize_views(_views(*horizontal)))
    assert abs(float(basis[:, 0] @ torch.tensor(colour / np.linalg.norm(colour), dtype=torch.float32))) > 0.999
    torch.testing.assert_close(basis.T @ basis, torch.eye(3), atol=1e-5, rtol=0)
    decorrelated = image_spectrum(_views(*horizontal), basis)
    assert np.unravel_index(int(decorrelated[0].argmax()), decorrelated[0].shape) == (0, f0)
    assert float(decorrelated[1:].max()) < 0.02 * float(decorrelated[0, 0, f0])
    vertical = [np.broadcast_to(0.5 + 0.3 * np.cos(2 * np.pi * f1 * x)[:, None, None], (size, size, 3))]
    mag = image_spectrum(_views(*vertical))
    peak = mag[0].argmax()
    assert np.unravel_index(int(peak), mag[0].shape) in ((f1, 0), (size - f1, 0))
    torch.testing.assert_close(mag[:, f1, 0], mag[:, size - f1, 0])  # a real image's spectrum is symmetric


def test_spectrum_of_constant_images_is_only_dc():
    colours = [np.full((16, 16, 3), c) for c in ([0.9, 0.2, 0.4], [0.1, 0.5, 0.5], [0.3, 0.3, 0.8])]
    for basis in (None, colour_basis(standardize_views(_views(*colours)))):
        mag = image_spectrum(_views(*colours), basis)
        assert mag[:, 0, 0].sum() > 1
        off = mag.clone()
        off[:, 0, 0] = 0
        assert float(off.abs().max()) < 1e-4
    grey = image_spectrum(_views(np.full((16, 16, 3), 0.5)))
    assert float(grey.abs().max()) < 1e-4  # standardised: a flat grey image has no spectrum at all


def test_spectrum_is_the_mean_over_the_stores_canonical_views(world):
    store = usae.open_store(world.store)
    size = store.extra["view_size"]
    mag, basis, n = estimate_spectrum(store, size, progress=False)
    assert n == len(store.image_ids) and mag.shape == (3, size, size // 2 + 1) and basis.shape == (3, 3)
    views = np.stack([load_view(store, j) for j in range(len(store.image_ids))])
    torch.testing.assert_close(basis, colour_basis(standardize_views(views)), rtol=0, atol=1e-5)
    torch.testing.assert_close(mag, image_spectrum(views, basis), rtol=1e-4, atol=1e-5)
    picked = spectrum_images(store, 5)
    assert len(picked) == 5 and picked[0] == store.image_ids[0] and picked[-1] == store.image_ids[-1]
    assert estimate_spectrum(store, 24, 5, progress=False)[2] == 5


def test_spectrum_cache_round_trip(world, tmp_path, monkeypatch):
    store = usae.open_store(world.store)
    first = data_spectrum(store, 24, tmp_path, 8, progress=False)
    assert not first.cached and first.images == 8 and first.file == str(spectrum_path(tmp_path, 24))

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(spectrum_mod, "estimate_spectrum", refuse)
    again = data_spectrum(store, 24, tmp_path, 8, progress=False)
    assert again.cached and again.file == first.file and again.images == 8
    assert torch.equal(first.magnitude, again.magnitude) and torch.equal(first.colour, again.colour)
    monkeypatch.undo()
    other = data_spectrum(store, 24, tmp_path, 6, progress=False)  # another budget: recomputed
    assert not other.cached and not torch.equal(first.magnitude, other.magnitude)
    spectrum_path(tmp_path, 24).write_bytes(b"garbage")  # a damaged cache is recomputed, not an error
    torch.testing.assert_close(data_spectrum(store, 24, tmp_path, 6, progress=False).magnitude, other.magnitude)
    assert data_spectrum(store, 24, None, 6, progress=False).file is None  # no cache directory: not cached


def test_fourier_image_keeps_the_given_magnitude_and_colours():
    size = 16
    magnitude = torch.zeros(3, size, size // 2 + 1)
    magnitude[:, 0, 4] = 1.0  # one frequency: the image is a sinusoid of 4 cycles across
    img = FourierImage(size, torch.Generator().manual_seed(0), magnitude=magnitude)
    assert torch.equal(img.magnitude, magnitude) and [n for n, _ in img.named_parameters()] == ["phase"]
    logit = torch.logit(img()[0].detach().double().clamp(1e-6, 1 - 1e-6))
    spec = torch.fft.rfft2(logit - logit.mean()).abs()
    assert int(spec[0].argmax()) == 4  # row 0, column 4
    # only the first channel has energy: every pixel's colour lies on the basis' first direction
    basis = torch.linalg.qr(torch.tensor([[0.6, 1.0, 0.0], [0.7, 0.0, 1.0], [0.4, 0.0, 0.0]]))[0]
    only_first = torch.zeros(3, size, size // 2 + 1)
    only_first[0] = power_law_spectrum(size)[0]
    pixels = FourierImage(size, torch.Generator().manual_seed(0), magnitude=only_first, colour=basis)()[0]
    logit = torch.logit(pixels.detach().double().clamp(1e-6, 1 - 1e-6)).reshape(3, -1)
    singular = torch.linalg.svdvals(logit - logit.mean(1, keepdim=True))
    assert singular[1] < 1e-3 * singular[0]
    assert abs(float(torch.linalg.svd(logit - logit.mean(1, keepdim=True))[0][:, 0] @ basis[:, 0].double())) > 0.999
    with pytest.raises(UsaeError, match="needs"):
        FourierImage(size, torch.Generator(), magnitude=torch.ones(3, size, size))
    with pytest.raises(UsaeError, match="colour basis"):
        FourierImage(size, torch.Generator(), colour=torch.eye(2))
    torch.testing.assert_close(FourierImage(size, torch.Generator()).magnitude, power_law_spectrum(size))


def test_one_over_f_fallback(world, universal):
    """A store without images falls back to 1/f; 'data' there is an error; '1/f' can be asked for."""
    store = usae.open_store(world.store)
    assert maximize(world.run, universal[0], steps=1, progress=False).settings["magnitude"] == "data"
    store.extra = {k: v for k, v in store.extra.items() if k != "images"}
    r = maximize(world.run, universal[0], store=store, steps=1, compare=False, progress=False)
    assert r.settings["magnitude"] == "1/f" and "spectrum_images" not in r.settings and r.transfer is None
    with pytest.raises(UsaeError, match="no image source"):
        maximize(world.run, universal[0], store=store, spectrum="data", steps=1, progress=False)
    explicit = maximize(world.run, universal[0], spectrum="1/f", steps=1, compare=False, progress=False)
    assert explicit.settings["magnitude"] == "1/f"
    with pytest.raises(UsaeError, match="spectrum"):
        maximize(world.run, universal[0], spectrum="pink", steps=1, progress=False)


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


def test_maximisation_excites_its_concept(world, results):
    """Per model: well above the starting image, and more than the other concepts' images get."""
    sae, store = usae.load(world.run), usae.open_store(world.store)
    backbones = load_backbones(store, sae.model_names, torch.device("cpu"))
    for name in sae.model_names:
        for k, r in results.items():
            assert r.settings["magnitude"] == "data" and r.settings["spectrum_images"] == len(store.image_ids)
            assert np.array(r.settings["colour_basis"]).shape == (3, 3)
            assert r.activation[name] >= GAIN * r.start_activation[name] > 0, (
                name,
                k,
                r.activation,
                r.start_activation,
            )
            assert r.objective[name] > r.start_objective[name]
            objective = LatentObjective(sae, backbones[name], name, store.grid, k)
            # measured again on the saved 8-bit image, against the other concepts' images
            act = {k2: np.maximum(token_values_of(objective, results[k2].images[name]), 0).mean() for k2 in results}
            assert act[k] == pytest.approx(r.activation[name], rel=0.05, abs=1e-3)
            assert all(act[k] > act[k2] for k2 in results if k2 != k), (name, k, act)


def test_best_natural_image_and_superstimulus(world, results):
    """The best natural image is the concept's largest code over the store; the ratio divides by it."""
    sae, store = usae.load(world.run), usae.open_store(world.store)
    natural = natural_best(sae, store, list(results), progress=False)
    for k, r in results.items():
        assert r.natural == natural[k]
        top = {t.model: t for t in top_images(world.run, world.store, k, n=1)}
        for name in sae.model_names:
            with torch.no_grad():
                codes = sae.encode(name, torch.from_numpy(store.rows(name, 0, store.n_rows)))[:, k]
            best = r.natural[name]
            assert best.score == pytest.approx(float(codes.max()), rel=1e-5)
            assert best.image_index == int(codes.argmax()) // store.tokens_per_image == top[name].image_index
            assert best.image_id == store.image_ids[best.image_index]
            assert r.superstimulus()[name] == pytest.approx(r.score[name] / best.score)
            assert r.superstimulus()[name] > MIN_RATIO, (k, name, r.superstimulus())


def test_transfer_matrix(world, results):
    """transfer[i][j]: the image made for model i, scored in model j; the diagonal is its own score."""
    sae, store = usae.load(world.run), usae.open_store(world.store)
    names = sae.model_names
    backbones = load_backbones(store, names, torch.device("cpu"))
    for k, r in results.items():
        assert list(r.transfer) == names and all(list(row) == names for row in r.transfer.values())
        ratio = r.transfer_ratio()
        for i in names:
            assert r.transfer[i][i] == r.score[i] and r.transfer_activation[i][i] == pytest.approx(r.activation[i])
            assert ratio[i][i] == pytest.approx(r.superstimulus()[i])
            for j in names:
                objective = LatentObjective(sae, backbones[j], j, store.grid, k)
                pre_t, code_t = objective.token_codes(
                    torch.from_numpy(np.array(r.images[i])).permute(2, 0, 1)[None] / 255
                )
                assert r.transfer[i][j] == pytest.approx(float(code_t.max()), rel=0.05, abs=1e-3)
                assert r.transfer_activation[i][j] == pytest.approx(
                    float(pre_t.clamp_min(0).mean()), rel=0.05, abs=1e-3
                )
                assert ratio[i][j] == pytest.approx(r.transfer[i][j] / r.natural[j].score)
        # an image made for one model excites the concept in that model more than the other's image does
        assert all(r.transfer_activation[i][i] > r.transfer_activation[j][i] for i in names for j in names if j != i)


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
    names = list(a.images)
    for name, entry in saved["models"].items():
        assert entry["score"] == a.score[name] and entry["superstimulus"] == pytest.approx(a.superstimulus()[name])
        assert entry["natural"] == {"score": a.natural[name].score, "image_index": a.natural[name].image_index,
                                    "image_id": a.natural[name].image_id}  # fmt: skip
    transfer = saved["transfer"]
    assert transfer["models"] == names
    for key in ("score", "activation", "ratio"):
        assert np.array(transfer[key], dtype=float).shape == (len(names), len(names))
    assert [transfer["score"][i][i] for i in range(len(names))] == [a.score[n] for n in names]
    assert [transfer["ratio"][i][i] for i in range(len(names))] == pytest.approx([a.superstimulus()[n] for n in names])
    assert saved["magnitude"] == "data" and read_maximization(out) == saved


def test_read_older_results(tmp_path):
    """Results written before the comparison with natural images read with None in the new fields."""
    old = {
        "concept": 3,
        "models": {"m": {"png": "model-0.png", "activation": 2.0, "start_activation": 0.1, "objective": 1.5,
                         "start_objective": -0.2}},
        "steps": 48, "size": 64, "n_crops": 2, "crop_scale": [0.8, 1.0], "noise": 0.05, "lr": 1.0, "seed": 0,
        "magnitude": "1/f", "objective": "mean pre-activation over tokens", "seconds": 1.0,
    }  # fmt: skip
    (tmp_path / "concept-3").mkdir()
    (tmp_path / "concept-3" / RESULT_NAME).write_text(json.dumps({k: v for k, v in old.items() if k != "magnitude"}))
    got = read_maximization(tmp_path / "concept-3")
    assert got["transfer"] is None and got["magnitude"] == "1/f" and got["steps"] == 48
    assert got["models"]["m"] == {**old["models"]["m"], "score": None, "natural": None, "superstimulus": None}
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(UsaeError, match="not a maximisation result"):
        read_maximization(tmp_path / "bad.json")


def test_explorer_shows_maximisations(world, universal, tmp_path, caplog):
    """Results under RUN/maximize appear on their concept pages; --maximize-top makes new ones and
    says so in one line naming the `usae maximize` it runs."""
    run = tmp_path / "run"
    shutil.copytree(world.run, run)  # keep the shared run free of maximize/
    result = maximize(run, universal[1], models=[usae.load(run).model_names[0]], steps=2, progress=False)
    write_maximization(result, run / "maximize")
    with caplog.at_level(logging.INFO, "usae.explorer.site"):
        site = explore(
            ExploreConfig(
                run, world.store, tmp_path / "site", n_top=2, maximize_top=1, maximize_steps=2, progress=False
            )
        ).parent
    said = [r.getMessage() for r in caplog.records if "usae maximize" in r.getMessage()]
    assert len(said) == 1 and "--maximize-top 0 skips it" in said[0]
    page = (site / "concepts" / f"{universal[1]}.html").read_text()
    assert "Coordinated activation maximisation" in page
    assert (site / "max" / str(universal[1]) / "model-0.png").is_file()
    made = [p for p in (run / "maximize").glob("concept-*") if p.name != f"concept-{universal[1]}"]
    assert len(made) == 1 and (made[0] / RESULT_NAME).is_file()  # the top universal concept by energy
    size = usae.open_store(world.store).extra["view_size"]
    assert [p.name for p in (run / "maximize").glob("spectrum-*")] == [f"spectrum-{size}.safetensors"]
    assert read_maximization(made[0])["models"]["w16s8i64"]["superstimulus"] > 0
    assert (site / "max" / made[0].name.removeprefix("concept-") / "model-1.png").is_file()


def test_maximize_errors(world):
    with pytest.raises(UsaeError, match="outside"):
        maximize(world.run, 10_000, steps=1, progress=False)
    with pytest.raises(UsaeError, match="unknown model"):
        maximize(world.run, 0, models=["nope"], steps=1, progress=False)


def test_the_keyword_form_builds_the_config(world, universal, monkeypatch):
    """``maximize(run, concept, **settings)`` is MaximizeConfig with those fields: its defaults, its
    checks, no setting of its own; the settings recorded are the config's."""
    import usae.explorer.maximize as max_mod

    seen = []
    real = max_mod._render
    monkeypatch.setattr(max_mod, "_render", lambda cfg, *a: seen.append(cfg) or real(cfg, *a))
    r = maximize(world.run, universal[0], steps=1, noise=0.0, crop_scale=(0.5, 1.0), compare=False, progress=False)
    want = MaximizeConfig(world.run, (universal[0],), steps=1, noise=0.0, crop_scale=(0.5, 1.0), compare=False)
    assert seen == [dataclasses.replace(want, progress=False)]
    assert r.settings["noise"] == 0.0 and r.settings["crop_scale"] == [0.5, 1.0] and r.settings["n_crops"] == 6
    with pytest.raises(UsaeError, match="noise"):
        maximize(world.run, universal[0], noise=-1.0)
    with pytest.raises(TypeError, match="batch"):
        maximize(world.run, universal[0], batch=3)


def test_cli_maximize(world, tmp_path, capsys):
    out = tmp_path / "max"
    args = ["maximize", str(world.run), "--concept", "1", "2", "--steps", "2", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert (out / "concept-1" / "panel.png").is_file() and (out / "concept-2" / RESULT_NAME).is_file()
    assert "panel.png" in capsys.readouterr().out
    assert main(["maximize", str(world.run), "--concept", "1", "--store", str(tmp_path / "none")]) == 2


def test_cli_maximize_finds_the_runs_store_from_another_directory(world, tmp_path, monkeypatch, capsys):
    """A run that recorded its store relative to where it was trained (older runs) still finds it
    when ``usae maximize`` runs from another directory; a path leading to another store is refused."""
    project = tmp_path / "project"
    run = project / "runs" / "r"
    shutil.copytree(world.run, run, ignore=shutil.ignore_patterns("maximize"))
    (project / "stores").mkdir()
    (project / "stores" / "s").symlink_to(world.store, target_is_directory=True)
    cfg = json.loads((run / "config.json").read_text())
    cfg["store"]["path"] = "stores/s"  # as given on the command line, inside project/
    (run / "config.json").write_text(json.dumps(cfg))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    args = ["maximize", str(run), "--concept", "1", "--steps", "1", "--spectrum", "1/f", "--no-compare"]
    assert main([*args, "--no-progress"]) == 0
    assert (run / "maximize" / "concept-1" / RESULT_NAME).is_file()
    cfg["store"]["hash"] = "0" * 64  # the run was trained on another store than the one found there
    (run / "config.json").write_text(json.dumps(cfg))
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "stores/s" in err[-1] and "pass --store" in err[-1]
