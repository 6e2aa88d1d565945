import torch

from usae.model.losses import auxk_loss, reconstruction_loss
from usae.model.sae import _auxk_select


def test_reconstruction_losses_known_values():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x_hat = torch.tensor([[1.0, 0.0], [3.0, 5.0]])
    assert float(reconstruction_loss(x_hat, x, "l2")) == (4 + 1) / 4
    assert float(reconstruction_loss(x_hat, x, "l1")) == (2 + 1) / 4


def test_auxk_code_picks_only_dead_latents():
    z_pre = torch.tensor([[5.0, 1.0, 3.0, -1.0], [0.5, 2.0, -4.0, 7.0]])
    dead = torch.tensor([False, True, True, False])
    idx, val = _auxk_select(z_pre, dead, k_aux=2)
    assert sorted(idx[0].tolist()) == [1, 2]
    assert dict(zip(idx[1].tolist(), val[1].tolist(), strict=True)) == {1: 2.0, 2: 0.0}  # ReLU
    # asking for more than are dead: live latents contribute zero
    idx, val = _auxk_select(z_pre, dead, k_aux=3)
    assert (val[:, :].sum(1) == torch.tensor([4.0, 2.0])).all()


def test_auxk_loss_is_scale_free_and_zero_at_perfect_fit():
    r = torch.randn(100, 8)
    assert float(auxk_loss(r, r)) == 0.0
    assert abs(float(auxk_loss(torch.zeros_like(r), r)) - float(auxk_loss(torch.zeros_like(r), 10 * r))) < 1e-5
