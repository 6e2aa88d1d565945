import importlib.util
import inspect
import math
from pathlib import Path

import pytest
import torch

from usae.config.evaluate import ClassThresholds
from usae.model import metrics


def test_r2_and_fvu_known_values():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])  # per-dim means (2, 1): SST = 1+1+1+1 = 4
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 2.0]])  # SSE = 1
    assert float(metrics.r2(x, x_hat)) == pytest.approx(0.75)
    assert float(metrics.fvu(x, x_hat)) == pytest.approx(0.25)
    assert float(metrics.r2(x, x)) == 1.0
    # predicting the mean gives R² = 0
    assert float(metrics.r2(x, x.mean(0).expand_as(x))) == pytest.approx(0.0)
    assert float(metrics.r2_from_sums(2.0, 8.0)) == 0.75


def test_l0_and_dead_fraction():
    z = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]])
    assert float(metrics.l0(z)) == 1.5
    assert float(metrics.dead_fraction(torch.tensor([0, 5, 0, 1]))) == 0.5


def test_firing_entropy_known_answers():
    fires = torch.tensor(
        [
            [10, 10, 0, 0, 4],
            [10, 0, 0, 0, 0],
            [10, 0, 0, 0, 0],
        ],
        dtype=torch.float64,
    )
    fe = metrics.firing_entropy(fires)
    assert fe[0] == pytest.approx(1.0)  # equal in all models
    assert fe[1] == pytest.approx(0.0)  # one model
    assert math.isnan(fe[2])  # never fires
    two_of_three = metrics.firing_entropy(torch.tensor([[5.0], [5.0], [0.0]]))
    assert float(two_of_three[0]) == pytest.approx(math.log(2) / math.log(3))


def test_cofire_proportion_and_energy():
    fires = torch.tensor([[4.0, 0.0], [8.0, 2.0]])
    cofires = torch.tensor([2.0, 0.0])
    cfp = metrics.cofire_proportion(cofires, fires)
    assert cfp[0, 0] == 0.5 and cfp[1, 0] == 0.25
    assert math.isnan(cfp[0, 1]) and cfp[1, 1] == 0.0
    e = metrics.energy(torch.tensor([[0.5, 2.0]]), torch.tensor([[2.0, 0.0]]))
    assert e.tolist() == [[1.0, 0.0]]


def test_classify_latents():
    fires = torch.tensor(
        [
            [100.0, 100.0, 0.0, 0.0, 100.0],
            [100.0, 0.0, 0.0, 100.0, 100.0],
            [100.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    cofires = torch.tensor([100.0, 0.0, 0.0, 0.0, 0.0])  # latent 0 fires on the same rows in all
    assert metrics.classify_latents(fires, n_rows=1000, cofires_s=cofires) == [
        "universal",
        "specific",
        "dead",
        "specific",
        "partial",
    ]
    # a model firing on fewer than min_rate of rows does not count as using the latent
    one = torch.tensor([[100.0], [1.0]])
    strict = ClassThresholds(min_rate=0.01)
    assert metrics.classify_latents(one, 1000, cofires_s=torch.tensor([1.0]), thresholds=strict) == ["specific"]


def _counts(*codes: torch.Tensor, tau: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(fires_ms, cofires_s) from dense per-model codes (n, s), as evaluate accumulates them."""
    fire = torch.stack([z > tau for z in codes])
    return fire.sum(1).double(), fire.all(0).sum(0).double()


def test_universal_requires_cofiring():
    # the audit's case: fires once in A and once in B, on different rows: FE 1.0, CFP 0
    za, zb = torch.zeros(7154, 1), torch.zeros(7154, 1)
    za[0, 0] = zb[1, 0] = 1.0
    fires, cofires = _counts(za, zb)
    assert float(metrics.firing_entropy(fires)[0]) == pytest.approx(1.0)
    assert metrics.cofire_proportion(cofires, fires)[:, 0].tolist() == [0.0, 0.0]
    assert metrics.classify_latents(fires, 7154, cofires_s=cofires) == ["rare"]  # too few rows to be used
    no_support_floor = ClassThresholds(min_rate=0.0, min_count=1, min_share=0.0)
    assert metrics.classify_latents(fires, 7154, cofires_s=cofires, thresholds=no_support_floor) == ["partial"]
    # same counts, same rows: universal; the co-fire rule alone made the difference
    zb = za.clone()
    fires, cofires = _counts(za, zb)
    assert metrics.classify_latents(fires, 7154, cofires_s=cofires, thresholds=no_support_floor) == ["universal"]
    # well supported, equal counts, but on different rows: not universal
    za, zb = torch.zeros(1000, 1), torch.zeros(1000, 1)
    za[:50, 0] = zb[50:100, 0] = 1.0
    fires, cofires = _counts(za, zb)
    assert metrics.classify_latents(fires, 1000, cofires_s=cofires) == ["partial"]
    # threshold: min over models of CFP = cofires / max fires; at exactly UNIVERSAL_COFIRE it passes
    fires = torch.tensor([[100.0, 100.0], [60.0, 60.0]])
    cofire = ClassThresholds().universal_cofire
    cofires = torch.tensor([100.0 * cofire, 100.0 * cofire - 1])
    assert metrics.min_cofire_proportion(cofires, fires).tolist() == pytest.approx([0.2, 0.19])
    labels = metrics.classify_latents(fires, 1000, cofires_s=cofires, thresholds=ClassThresholds(universal_fe=0.0))
    assert labels == ["universal", "partial"]


def test_support_rule_scales_with_the_store():
    # the audit's concept 398: 2911 effnet tokens, 4 open-nsfw tokens, FE 0.015, on 7154 rows
    fires = torch.tensor([[2911.0], [4.0]])
    assert float(metrics.firing_entropy(fires)[0]) == pytest.approx(0.015, abs=5e-4)
    assert metrics.classify_latents(fires, 7154, cofires_s=torch.tensor([4.0])) == ["specific"]
    assert metrics.used_latents(fires, 7154).flatten().tolist() == [True, False]
    # min_share alone: 10x the store, 40 tokens pass count and rate but are 0.14% of 29110
    fires10 = torch.tensor([[29110.0], [40.0]])
    no_share = ClassThresholds(min_share=0.0)
    assert metrics.used_latents(fires10, 71540, no_share).flatten().tolist() == [True, True]
    assert metrics.used_latents(fires10, 71540).flatten().tolist() == [True, False]
    # min_count alone: 5 tokens in each model is used by none (rare), 10 is enough
    fires = torch.tensor([[5.0, 10.0], [5.0, 10.0]])
    assert metrics.classify_latents(fires, 7154, cofires_s=torch.tensor([5.0, 10.0])) == ["rare", "universal"]
    # min_rate still applies on a large store: 1e-4 of 10M rows is 1000
    assert metrics.used_latents(torch.tensor([[999.0], [1000.0]]), 10_000_000).flatten().tolist() == [False, True]
    # the share is of the model where it fires most: equal counts always pass, whatever m
    assert metrics.used_latents(torch.full((5, 1), 20.0), 1000).all()


def test_rare_and_dead_classes():
    fires = torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    cofires = torch.zeros(3)
    assert metrics.classify_latents(fires, 1000, cofires_s=cofires) == ["dead", "rare", "dead"]
    # one model: every used latent is specific
    assert metrics.classify_latents(torch.tensor([[50.0, 2.0]]), 1000, cofires_s=torch.tensor([50.0, 2.0])) == [
        "specific",
        "rare",
    ]


def test_class_threshold_defaults_are_the_constants():
    params = inspect.signature(metrics.classify_latents).parameters
    assert params["thresholds"].default == ClassThresholds() and ClassThresholds().universal_fe == 0.8
    assert ClassThresholds().to_dict() == {
        "min_rate": 1e-4, "universal_fe": 0.8, "min_count": 10, "min_share": 0.05, "universal_cofire": 0.2,
    }  # fmt: skip
    assert ClassThresholds.from_dict({"min_count": 5.0}) == ClassThresholds(min_count=5)
    assert metrics.CLASSES == ("universal", "partial", "specific", "rare", "dead")
    with pytest.raises(TypeError, match="cofires_s"):  # co-firing is required, not silently skipped
        metrics.classify_latents(torch.ones(2, 1), 10)


def test_r2_paper_known_answer():
    # dims with different means; predicting each dim's mean: ours 0, paper-compatible ~1
    x = torch.tensor([[0.0, 100.0], [2.0, 102.0]])
    mean_pred = x.mean(0).expand_as(x)  # SSE = 4; SST per dim = 4; SST around 51 = 10004
    assert float(metrics.r2(x, mean_pred)) == pytest.approx(0.0)
    assert float(metrics.r2_paper(x, mean_pred)) == pytest.approx(1 - 4 / 10004)
    assert float(metrics.r2_paper(x, mean_pred)) > 0.9995
    # equal means in every dim: the two agree
    y = torch.tensor([[1.0, 3.0], [3.0, 1.0]])
    y_hat = torch.tensor([[1.5, 2.0], [2.0, 2.0]])
    assert float(metrics.r2_paper(y, y_hat)) == pytest.approx(float(metrics.r2(y, y_hat)))


def test_sst_from_streamed_sums():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=gen, dtype=torch.float64) * torch.arange(1, 6) + 1e4 * torch.arange(5)
    offset = x[:7].mean(0)  # any per-dim offset: evaluate uses the store's mean
    sum_y, sum_yy = torch.zeros(5, dtype=torch.float64), 0.0
    for batch in x.split(64):
        y = batch - offset
        sum_y, sum_yy = sum_y + y.sum(0), sum_yy + float(y.square().sum())
    per_dim = metrics.sst_from_sums(300, sum_y, sum_yy, offset)
    glob = metrics.sst_from_sums(300, sum_y, sum_yy, offset, global_mean=True)
    assert float(per_dim) == pytest.approx(float((x - x.mean(0)).square().sum()), rel=1e-9)
    assert float(glob) == pytest.approx(float((x - x.mean()).square().sum()), rel=1e-9)


def _overcomplete_metrics():
    """overcomplete/metrics.py alone (torch + scipy): importing the package pulls in its plotting and
    model zoo (~10 s, and a colormap call matplotlib >= 3.9 removed), none of which r2_score needs."""
    spec = importlib.util.find_spec("overcomplete")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("overcomplete is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "metrics.py"
    module_spec = importlib.util.spec_from_file_location("_overcomplete_metrics", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_r2_paper_equals_overcomplete_r2_score():
    oc = _overcomplete_metrics()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=gen) + torch.arange(6.0)  # dims with different means
    x_hat = x + 0.3 * torch.randn(64, 6, generator=gen)
    ours_paper, theirs = float(metrics.r2_paper(x, x_hat)), float(oc.r2_score(x, x_hat))
    assert ours_paper == pytest.approx(theirs, rel=1e-5)  # theirs adds 1e-6 to the mean SST
    assert float(metrics.r2(x, x_hat)) < ours_paper
    mean_pred = x.mean(0).expand_as(x)
    assert float(metrics.r2_paper(x, mean_pred)) == pytest.approx(float(oc.r2_score(x, mean_pred)), rel=1e-5)
