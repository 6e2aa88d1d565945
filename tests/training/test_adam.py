"""FusedAdam (training/adam.py) against torch.optim.Adam(fused=True), and the dense path of the kernels."""

import subprocess
import sys

import pytest
import torch

from usae.model import kernels
from usae.training.adam import FusedAdam


def _params():
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(7, 5, generator=g)), torch.nn.Parameter(torch.randn(3, generator=g))]


def test_fused_adam_steps_and_saves_like_torch_adam():
    """Bit-identical updates (groups, weight decay, a parameter without a gradient, LR changes), both
    for Adam and AdamW, and state_dicts that load into each other."""
    g = torch.Generator().manual_seed(1)
    for decoupled, cls in ((False, torch.optim.Adam), (True, torch.optim.AdamW)):
        ours, theirs = _params(), _params()
        opt = FusedAdam(
            [{"params": ours[:1], "weight_decay": 0.1}, {"params": ours[1:]}],
            lr=0.01,
            betas=(0.9, 0.99),
            decoupled=decoupled,
        )
        ref = cls([{"params": theirs[:1], "weight_decay": 0.1}, {"params": theirs[1:], "weight_decay": 0.0}], lr=0.01, betas=(0.9, 0.99), fused=True)  # fmt: skip
        for step in range(6):
            grads = [torch.randn(7, 5, generator=g), torch.randn(3, generator=g)]
            for ps in (ours, theirs):
                ps[0].grad, ps[1].grad = grads[0].clone(), None if step % 2 else grads[1].clone()
            opt.step()
            ref.step()
            for o in (opt, ref):
                for group in o.param_groups:
                    group["lr"] = 0.01 * (step + 2)
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
        mine, torchs = opt.state_dict(), ref.state_dict()
        assert mine["param_groups"] == torchs["param_groups"]
        for i, per in torchs["state"].items():
            assert all(torch.equal(per[k], mine["state"][i][k]) for k in per)
        again = FusedAdam([{"params": ours[:1]}, {"params": ours[1:]}], lr=0.0, betas=(0.9, 0.999))
        again.load_state_dict(torchs)
        assert again.param_groups[0]["lr"] == opt.param_groups[0]["lr"] and again.param_groups[0]["betas"] == (
            0.9,
            0.99,
        )
        ref.load_state_dict(mine)


@pytest.mark.slow  # a fresh interpreter that imports torch and usae: ~10-25 s on 2 loaded cores
def test_training_does_not_import_dynamo(tmp_path):
    """torch.optim's first call imports torch._dynamo (seconds per process); the trainer never does."""
    code = (
        "import sys, usae, numpy as np; from pathlib import Path\n"
        "x = np.random.default_rng(0).standard_normal((600, 8), dtype=np.float32)\n"
        f"s = usae.write_store(Path(r'{tmp_path}') / 's', {{'a': x, 'b': x[:, :6]}}, dtype='float32')\n"
        f"usae.fit(usae.TrainConfig(store=s, out=Path(r'{tmp_path}') / 'r', n_latents=16, k=2, steps=30, batch_size=64, progress=False, save_every=10))\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dense_codes_match_the_sparse_kernels(monkeypatch):
    """Codes with many latents per row go through dense products (DENSE_FROM); same numbers."""
    g = torch.Generator().manual_seed(0)
    b, k, s, d = 300, 24, 64, 40
    idx = torch.stack([torch.randperm(s, generator=g)[:k] for _ in range(b)])
    idx[:, 1] = idx[:, 0]  # a repeated latent
    val = torch.rand(b, k, generator=g, dtype=torch.float64)
    y = torch.randn(b, d, generator=g, dtype=torch.float64)
    W = torch.randn(s, d, generator=g, dtype=torch.float64)

    def products():
        W_ = W.clone().requires_grad_()
        val_ = val.clone().requires_grad_()
        (out,) = kernels.SparseDecode.apply(idx, val_, W_)
        (out * y).sum().backward()
        return out, val_.grad, W_.grad, kernels.gather_dot(idx, W, y)

    assert kernels._dense(idx, s)
    dense = products()
    monkeypatch.setattr(kernels, "DENSE_FROM", 1)  # k * 1 < s: the sparse path
    assert not kernels._dense(idx, s)
    for a, b_ in zip(dense, products(), strict=True):
        torch.testing.assert_close(a, b_)
