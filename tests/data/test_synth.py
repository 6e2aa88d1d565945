"""Tests for usae.data.synth: the world is the documented generative model, and recovery scores it."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from usae.data.synth import World, make_world, recovered_mask, recovery
from usae.errors import UsaeError

WIDTHS = {"a": 24, "b": 32, "c": 40, "d": 48}
SCALE_LOW, SCALE_HIGH = 0.5, 3.0


@pytest.fixture(scope="module")
def world() -> World:
    # Four models so partial concepts can have 2 or 3 owners; widths < n_concepts (overcomplete).
    return make_world(WIDTHS, n_rows=4000, n_universal=20, n_partial=16, n_specific=12, seed=1)


@pytest.fixture(scope="module")
def clean_world() -> World:
    return make_world(n_rows=2000, noise=0.0, seed=3)


def _signal(world: World, name: str) -> np.ndarray:
    return world.scales[name] * (world.codes.astype(np.float64) @ world.dictionaries[name])


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def _true_rows(world: World) -> dict[str, np.ndarray]:
    return {name: world.dictionaries[name].copy() for name in world.model_names}


# --- the world --------------------------------------------------------------------------------


def test_shapes_and_dtypes(world: World) -> None:
    n_concepts = 48
    assert world.model_names == list(WIDTHS)
    assert world.codes.shape == (4000, n_concepts) and world.codes.dtype == np.float32
    assert world.owners.shape == (n_concepts, 4) and world.owners.dtype == np.bool_
    assert len(world.kinds) == n_concepts
    assert world.firing_probs.shape == (n_concepts,)
    for name, width in WIDTHS.items():
        assert world.data[name].shape == (4000, width) and world.data[name].dtype == np.float32
        assert world.dictionaries[name].shape == (n_concepts, width)
        assert world.dictionaries[name].dtype == np.float32
        assert world.offsets[name].shape == (width,) and world.offsets[name].dtype == np.float32
        assert SCALE_LOW <= world.scales[name] <= SCALE_HIGH
        assert np.isfinite(world.data[name]).all()


def test_default_widths() -> None:
    small = make_world(n_rows=10)
    assert {name: x.shape[1] for name, x in small.data.items()} == {"a": 64, "b": 96, "c": 128}
    assert small.kinds.count("universal") == 64 and small.kinds.count("partial") == 32


def test_same_seed_gives_equal_worlds_other_seed_differs() -> None:
    args = dict(n_rows=500, n_universal=8, n_partial=4, n_specific=6, nonlinear=("b",))
    first, again, other = make_world(**args, seed=5), make_world(**args, seed=5), make_world(**args)
    for field in ("owners", "codes", "firing_probs"):
        np.testing.assert_array_equal(getattr(first, field), getattr(again, field))
    for name in first.model_names:
        np.testing.assert_array_equal(first.data[name], again.data[name])
        np.testing.assert_array_equal(first.dictionaries[name], again.dictionaries[name])
        np.testing.assert_array_equal(first.offsets[name], again.offsets[name])
        assert not np.allclose(first.data[name], other.data[name])
        assert not np.allclose(first.dictionaries[name], other.dictionaries[name])
    assert first.scales == again.scales and first.scales != other.scales
    assert not np.array_equal(first.codes, other.codes)


def test_owners_match_kinds(world: World) -> None:
    n_owners = world.owners.sum(axis=1)
    kinds = np.array(world.kinds)
    assert list(kinds) == ["universal"] * 20 + ["partial"] * 16 + ["specific"] * 12
    assert (n_owners[kinds == "universal"] == 4).all()
    assert ((n_owners[kinds == "partial"] >= 2) & (n_owners[kinds == "partial"] <= 3)).all()
    assert set(n_owners[kinds == "partial"]) == {2, 3}  # both sizes occur with 16 draws
    assert (n_owners[kinds == "specific"] == 1).all()
    # Specific concepts are spread evenly: 12 over 4 models is 3 each.
    assert world.owners[kinds == "specific"].sum(axis=0).tolist() == [3, 3, 3, 3]


def test_dictionary_rows_are_unit_where_owned_and_zero_elsewhere(world: World) -> None:
    for i, name in enumerate(world.model_names):
        norms = np.linalg.norm(world.dictionaries[name].astype(np.float64), axis=1)
        owned = world.owners[:, i]
        np.testing.assert_allclose(norms[owned], 1.0, atol=1e-6)
        assert (world.dictionaries[name][~owned] == 0).all()


def test_active_concepts_per_row_is_k_active() -> None:
    big = make_world(n_rows=20_000, noise=0.0, k_active=8, seed=2)
    n_active = (big.codes > 0).sum(axis=1)
    assert abs(n_active.mean() - 8) < 0.8
    assert math.isclose(big.firing_probs.sum(), 8.0, rel_tol=1e-9)
    # Mild Zipf spread: rarer concepts exist, but none more than 4x rarer than the commonest.
    ratio = big.firing_probs.max() / big.firing_probs.min()
    assert 3.9 < ratio <= 4.0 + 1e-9
    assert (big.codes > 0).sum(axis=0).min() > 500  # every concept fires often enough to learn
    on = big.codes[big.codes > 0]
    assert on.min() >= 0.5 and on.max() <= 2.0


def test_k_active_equal_to_n_concepts_turns_everything_on() -> None:
    full = make_world(n_rows=200, n_universal=3, n_partial=2, n_specific=1, k_active=6)
    np.testing.assert_allclose(full.firing_probs, 1.0)
    assert (full.codes > 0).all()


def test_data_is_the_generative_model_without_noise(clean_world: World) -> None:
    for name in clean_world.model_names:
        expected = _signal(clean_world, name)
        got = clean_world.data[name] - clean_world.offsets[name].astype(np.float64)
        scale = np.abs(clean_world.data[name]).max()
        np.testing.assert_allclose(got, expected, atol=1e-5 * scale, rtol=0)


def test_offsets_are_comparable_to_the_signal(clean_world: World) -> None:
    for name in clean_world.model_names:
        ratio = _rms(clean_world.offsets[name]) / _rms(_signal(clean_world, name))
        assert 0.5 < ratio < 2.0


def test_noise_std_is_relative_to_signal_rms(clean_world: World) -> None:
    noisy = make_world(n_rows=2000, noise=0.1, seed=3)
    np.testing.assert_array_equal(noisy.codes, clean_world.codes)
    for name in noisy.model_names:
        noise = noisy.data[name] - clean_world.data[name]
        assert abs(_rms(noise) / _rms(_signal(clean_world, name)) - 0.1) < 0.005
        assert abs(noise.mean()) < 0.05 * _rms(noise)


def test_nonlinear_model_is_mild_monotone_and_only_itself(clean_world: World) -> None:
    bent = make_world(n_rows=2000, noise=0.0, seed=3, nonlinear=("b",))
    for name in ("a", "c"):
        np.testing.assert_array_equal(bent.data[name], clean_world.data[name])
    linear = (bent.codes.astype(np.float64) @ bent.dictionaries["b"]).ravel()
    observed = ((bent.data["b"] - bent.offsets["b"]) / bent.scales["b"]).ravel()
    assert not np.allclose(observed, linear, atol=1e-3)
    order = np.argsort(linear, kind="stable")
    assert (np.diff(observed[order]) >= -1e-5).all()  # monotone in the clean signal
    assert np.corrcoef(observed, linear)[0, 1] > 0.99  # and mild


def test_given_scales_are_used_and_leave_the_rest_alone() -> None:
    drawn = make_world(n_rows=50, seed=4)
    fixed = make_world(n_rows=50, seed=4, scales={"a": 1.25})
    assert fixed.scales["a"] == 1.25
    assert fixed.scales["b"] == drawn.scales["b"] and fixed.scales["c"] == drawn.scales["c"]


def test_two_models_have_no_partial_concepts() -> None:
    pair = make_world({"x": 16, "y": 8}, n_rows=100, n_partial=0, n_universal=4, n_specific=4)
    assert pair.owners.shape == (8, 2)
    assert pair.owners[4:].sum(axis=0).tolist() == [2, 2]


@settings(max_examples=30, deadline=None)
@given(
    widths=st.lists(st.integers(1, 12), min_size=2, max_size=5),
    n_universal=st.integers(0, 6),
    n_partial=st.integers(0, 6),
    n_specific=st.integers(0, 6),
    k_fraction=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**32),
)
def test_world_invariants_hold_for_any_valid_arguments(
    widths, n_universal, n_partial, n_specific, k_fraction, seed
) -> None:
    if len(widths) == 2:
        n_partial = 0
    n_concepts = n_universal + n_partial + n_specific
    if n_concepts == 0:
        n_specific = n_concepts = 1
    named = {f"m{i}": w for i, w in enumerate(widths)}
    k_active = k_fraction * n_concepts
    counts = {"n_universal": n_universal, "n_partial": n_partial, "n_specific": n_specific}
    w = make_world(named, n_rows=20, k_active=k_active, seed=seed, **counts)
    n_owners = w.owners.sum(axis=1)
    assert all(
        (kind == "universal" and n == len(widths))
        or (kind == "partial" and 2 <= n <= len(widths) - 1)
        or (kind == "specific" and n == 1)
        for kind, n in zip(w.kinds, n_owners, strict=True)
    )
    assert math.isclose(w.firing_probs.sum(), k_active, rel_tol=1e-9)
    assert w.firing_probs.max() <= 1.0
    assert w.firing_probs.max() <= 4.0 * (1 + 1e-9) * w.firing_probs.min()  # 4x up to rounding
    for i, name in enumerate(w.model_names):
        norms = np.linalg.norm(w.dictionaries[name], axis=1)
        np.testing.assert_allclose(norms, w.owners[:, i].astype(float), atol=1e-6)
        assert np.isfinite(w.data[name]).all()


# --- recovery ---------------------------------------------------------------------------------


def test_true_dictionaries_scaled_permuted_and_padded_recover_everything(world: World) -> None:
    rng = np.random.default_rng(0)
    n_concepts, n_extra = len(world.kinds), 200
    order = rng.permutation(n_concepts + n_extra)
    learned = {}
    for name in world.model_names:
        rows = world.dictionaries[name] * rng.uniform(0.01, 50.0, size=(n_concepts, 1))
        extra = rng.standard_normal((n_extra, rows.shape[1]))
        learned[name] = np.concatenate([rows, extra])[order]
    result = recovery(learned, world)
    assert result == {"universal": 1.0, "partial": 1.0, "specific": 1.0, "all": 1.0}
    assert recovered_mask(learned, world).all()


def test_random_dictionaries_recover_nothing(world: World) -> None:
    rng = np.random.default_rng(1)
    learned = {n: rng.standard_normal((4096, d.shape[1])) for n, d in world.dictionaries.items()}
    assert recovery(learned, world) == {
        "universal": 0.0,
        "partial": 0.0,
        "specific": 0.0,
        "all": 0.0,
    }


def test_every_owner_must_match_but_non_owners_are_ignored(world: World) -> None:
    rng = np.random.default_rng(2)
    learned = _true_rows(world)
    kinds = np.array(world.kinds)
    universal, partial = 0, int(np.flatnonzero(kinds == "partial")[0])
    specific = int(np.flatnonzero(kinds == "specific")[0])
    learned["b"][universal] = rng.standard_normal(WIDTHS["b"])  # one of four owners wrong
    partial_owner = world.model_names[int(np.flatnonzero(world.owners[partial])[-1])]
    learned[partial_owner][partial] *= -1.0  # an anti-aligned row is not a match either
    for i, name in enumerate(world.model_names):
        if not world.owners[specific, i]:  # garbage in models that lack the concept is fine
            learned[name][specific] = rng.standard_normal(WIDTHS[name])
    mask = recovered_mask(learned, world)
    assert not mask[universal] and not mask[partial] and mask[specific]
    assert mask.sum() == len(kinds) - 2
    result = recovery(learned, world)
    assert result["universal"] == pytest.approx(19 / 20) and result["partial"] == 15 / 16
    assert result["specific"] == 1.0 and result["all"] == pytest.approx(46 / 48)


def test_one_latent_must_match_in_all_owners(world: World) -> None:
    # Right directions split across two latents (model a's in one, the rest in another) fail.
    learned = {n: np.zeros((2, d.shape[1])) for n, d in world.dictionaries.items()}
    learned["a"][0] = world.dictionaries["a"][0]
    for name in ("b", "c", "d"):
        learned[name][1] = world.dictionaries[name][0]
    assert not recovered_mask(learned, world)[0]


def test_threshold_is_a_strict_cosine_bound(world: World) -> None:
    rng = np.random.default_rng(3)
    learned = {}
    for name, true in world.dictionaries.items():
        tilt = rng.standard_normal(true.shape).astype(np.float64)
        tilt -= (tilt * true).sum(axis=1, keepdims=True) * true  # orthogonal to each true row
        tilt /= np.linalg.norm(tilt, axis=1, keepdims=True)
        learned[name] = 0.95 * true + math.sqrt(1 - 0.95**2) * tilt  # cosine 0.95 where owned
    assert recovery(learned, world, threshold=0.9)["all"] == 1.0
    assert recovery(learned, world, threshold=0.97)["all"] == 0.0


def test_zero_and_nan_rows_match_nothing(world: World) -> None:
    learned = {n: np.zeros((5, d.shape[1])) for n, d in world.dictionaries.items()}
    assert not recovered_mask(learned, world).any()
    nan_rows = {n: np.full((3, d.shape[1]), np.nan) for n, d in world.dictionaries.items()}
    padded = {n: np.concatenate([d, nan_rows[n]]) for n, d in _true_rows(world).items()}
    assert recovered_mask(padded, world).all()
    padded["a"][0] = np.nan  # concept 0 is universal, so model a's NaN row loses it
    assert not recovered_mask(padded, world)[0]


def test_absent_kind_is_nan() -> None:
    pair = make_world({"x": 16, "y": 8}, n_rows=50, n_universal=4, n_partial=0, n_specific=4)
    result = recovery(_true_rows(pair), pair)
    assert math.isnan(result["partial"])
    assert result["universal"] == result["specific"] == result["all"] == 1.0


def test_recovery_at_scale_is_fast_enough_to_call() -> None:
    big = make_world(n_rows=10, n_universal=300, n_partial=100, n_specific=100)
    rng = np.random.default_rng(4)
    learned = {n: rng.standard_normal((4096, d.shape[1])) for n, d in big.dictionaries.items()}
    learned = {n: np.concatenate([rows, big.dictionaries[n]]) for n, rows in learned.items()}
    assert recovery(learned, big)["all"] == 1.0


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"n_universal": -1}, "n_universal"),
        ({"n_specific": 2.5}, "n_specific"),
        ({"n_rows": 0}, "n_rows"),
        ({"n_universal": 0, "n_partial": 0, "n_specific": 0}, "n_universal"),
        ({"k_active": 200}, "k_active"),
        ({"k_active": 0}, "k_active"),
        ({"noise": -0.1}, "noise"),
        ({"noise": float("nan")}, "noise"),
        ({"nonlinear": ("z",)}, "nonlinear"),
        ({"nonlinear": "a"}, "nonlinear"),
        ({"scales": {"z": 1.0}}, "scales"),
        ({"scales": {"a": -1.0}}, "scales"),
        ({"seed": -3}, "seed"),
        ({"widths": {"a": 8}}, "widths"),
        ({"widths": {"a": 8, "b": 0}}, "widths"),
        ({"widths": {"a": 8, "b": 4.0}}, "widths"),
        ({"widths": {"a": 8, "": 4}}, "widths"),
        ({"widths": [8, 4]}, "widths"),
        ({"widths": {"a": 8, "b": 4}}, "n_partial"),
    ],
)
def test_bad_world_arguments_raise_naming_them(kwargs: dict, names: str) -> None:
    widths = kwargs.pop("widths", None)
    with pytest.raises(UsaeError, match=names) as info:
        make_world(widths, n_rows=kwargs.pop("n_rows", 10), **kwargs)
    assert "\n" not in str(info.value)


def test_bad_recovery_arguments_raise_naming_them(world: World) -> None:
    good = _true_rows(world)
    bad_cases = [
        ({k: v for k, v in good.items() if k != "a"}, "dictionaries"),
        ({**good, "z": good["a"]}, "dictionaries"),
        ({**good, "b": good["b"][:, :-1]}, r"dictionaries\['b'\]"),
        ({**good, "c": good["c"][:-1]}, r"dictionaries\['c'\]"),
        ({**good, "d": good["d"][0]}, r"dictionaries\['d'\]"),
    ]
    for learned, names in bad_cases:
        with pytest.raises(UsaeError, match=names):
            recovery(learned, world)
    with pytest.raises(UsaeError, match="threshold"):
        recovered_mask(good, world, threshold=1.5)
