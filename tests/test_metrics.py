import math

import pytest
import torch

from usae import metrics


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
    assert metrics.classify_latents(fires, n_rows=1000) == [
        "universal",
        "specific",
        "dead",
        "specific",
        "partial",
    ]
    # a model firing on fewer than min_rate of rows does not count as using the latent
    assert metrics.classify_latents(torch.tensor([[100.0], [1.0]]), 1000, min_rate=0.01) == ["specific"]
