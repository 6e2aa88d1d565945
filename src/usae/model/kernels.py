"""The sparse autograd kernels of the training step: TopK decode and encode in O(b k d), not O(b s d).

Only the one matmul that chooses each row's k latents is dense; decoding, every gradient and the
code bookkeeping gather k dictionary rows per row. Same numbers as the dense products (tested
against dense autograd in tests/model/test_sae.py).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

# A code with at least 1/DENSE_FROM of the latents per row (an AuxK code of k_aux = 256 of 512
# latents) is cheaper as a dense (b, s) matrix through BLAS than gathered: on a 2-core Zen 4,
# S^T y for b 4096, s 512, d 128 takes 31 ms dense vs 466 ms sorted and gathered at 264 entries
# per row (sorting 1M entries alone is ~80 ms), 26 vs 44 ms at 64, 26 vs 8 ms at 8;
# at s 6144, 32 per row, the sparse path is 20x faster. Same numbers up to float summation order.
DENSE_FROM = 8


def _dense(idx_bk: Tensor, n_latents: int) -> bool:
    return idx_bk.shape[1] * DENSE_FROM >= n_latents


def _scatter(idx_bk: Tensor, val_bk: Tensor, n_latents: int) -> Tensor:
    """The (b, n_latents) dense code (repeated indices summed)."""
    return val_bk.new_zeros(idx_bk.shape[0], n_latents).scatter_add_(1, idx_bk, val_bk)


def _by_latent(idx_bk: Tensor, n_latents: int) -> tuple[Tensor, Tensor, Tensor] | tuple[Tensor, int]:
    """A TopK code's entries grouped by latent: (order, row of each entry, first entry of each latent).

    The (n_latents, b) transpose of the code as embedding_bag inputs, so ``S^T y`` products are
    one fused gather-and-sum kernel (~3x faster than torch.sparse.mm of a COO or CSR tensor on CPU).
    A dense code (``_dense``) is kept as (idx_bk, n_latents) and multiplied densely instead.
    """
    if _dense(idx_bk, n_latents):
        return idx_bk, n_latents
    flat = idx_bk.reshape(-1)
    # The stable order by latent, as an unstable sort of unique keys (latent, position): the same
    # permutation as argsort(stable=True), ~4x faster on CPU (3.4 vs 15 ms for 4096 x 8 entries).
    n = flat.numel()
    order = torch.sort(flat * n + torch.arange(n, device=flat.device)).indices
    rows = torch.div(order, idx_bk.shape[1], rounding_mode="floor")
    counts = torch.bincount(flat, minlength=n_latents)
    return order, rows, counts.cumsum(0) - counts


def _code_t_mm(by_latent: tuple[Tensor, Tensor, Tensor], val_bk: Tensor, y_bd: Tensor) -> Tensor:
    """(n_latents, d) = S^T y for the sparse (b, n_latents) code S[r, idx[r, j]] = val[r, j]."""
    if len(by_latent) == 2:
        idx_bk, n_latents = by_latent
        return _scatter(idx_bk, val_bk, n_latents).t() @ y_bd
    order, rows, starts = by_latent
    w = val_bk.reshape(-1)[order]
    b, d = y_bd.shape
    # On CPU, gathering random rows of a y bigger than the cache is latency-bound: gathering from
    # column blocks of ~1 MB, each staying in L2, is 2-3x faster at d >= 768 (tuned on a Zen 4).
    width = d if y_bd.device.type != "cpu" else max(16, (1 << 20) // (b * y_bd.element_size()))
    if width >= d:
        return F.embedding_bag(rows, y_bd, starts, per_sample_weights=w, mode="sum")
    out_sd = y_bd.new_empty(starts.shape[0], d)
    for c in range(0, d, width):
        block = y_bd[:, c : c + width].contiguous()
        out_sd[:, c : c + width] = F.embedding_bag(rows, block, starts, per_sample_weights=w, mode="sum")
    return out_sd


def gather_dot(idx_bk: Tensor, W_sd: Tensor, y_bd: Tensor) -> Tensor:
    """(b, k) with entry [r, j] = W_sd[idx_bk[r, j]] . y_bd[r]: a sampled dense-dense product (SDDMM).

    Rows of ``idx_bk`` may repeat indices and be unsorted. Never materialises the (b, k, d) gather.
    """
    b, k = idx_bk.shape
    if _dense(idx_bk, W_sd.shape[0]):
        return (y_bd @ W_sd.t()).gather(1, idx_bk)
    if W_sd.device.type not in ("cpu", "cuda"):  # sampled_addmm is CPU/CUDA only
        with torch.enable_grad():
            weights_bk = torch.ones(idx_bk.shape, dtype=y_bd.dtype, device=y_bd.device, requires_grad=True)
            out_bd = F.embedding_bag(idx_bk, W_sd.detach(), per_sample_weights=weights_bk, mode="sum")
            return torch.autograd.grad(out_bd, weights_bk, y_bd)[0]
    crow = torch.arange(0, b * k + 1, k, device=idx_bk.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": sampled_addmm is what we need
        warnings.simplefilter("ignore")
        pattern_bs = torch.sparse_csr_tensor(
            crow, idx_bk.reshape(-1), y_bd.new_zeros(b * k), (b, W_sd.shape[0]), check_invariants=False
        )
        return torch.sparse.sampled_addmm(pattern_bs, y_bd, W_sd.t(), beta=0.0).values().view(b, k)


class SparseDecode(torch.autograd.Function):
    """x_hat_m = sum_j val[b, j] * W_m[idx[b, j]] for each decoder W_m: k rows gathered per row.

    Same numbers as ``dense_code @ W_m``; forward and backward cost O(b k d) instead of O(b s d).
    All decoders of one code share one backward, so the code's transpose is built once.
    """

    @staticmethod
    def forward(ctx, idx_bk: Tensor, val_bk: Tensor, *W_sd: Tensor) -> tuple[Tensor, ...]:
        ctx.save_for_backward(idx_bk, val_bk, *W_sd)
        ctx.set_materialize_grads(False)
        if _dense(idx_bk, W_sd[0].shape[0]):
            z_bs = _scatter(idx_bk, val_bk, W_sd[0].shape[0])
            return tuple(z_bs @ W for W in W_sd)
        return tuple(F.embedding_bag(idx_bk, W, per_sample_weights=val_bk, mode="sum") for W in W_sd)

    @staticmethod
    def backward(ctx, *grad_bd: Tensor | None):
        idx_bk, val_bk, *W_sd = ctx.saved_tensors
        used = [(i, W, g) for i, (W, g) in enumerate(zip(W_sd, grad_bd, strict=True)) if g is not None]
        grad_val = None
        if ctx.needs_input_grad[1] and used:
            grad_val = sum(gather_dot(idx_bk, W, g) for _, W, g in used)
        grads_W: list[Tensor | None] = [None] * len(W_sd)
        wanted = [(i, g) for i, _, g in used if ctx.needs_input_grad[2 + i]]
        if wanted:
            by_latent = _by_latent(idx_bk, W_sd[0].shape[0])
            for i, g in wanted:
                grads_W[i] = _code_t_mm(by_latent, val_bk, g)
        return None, grad_val, *grads_W


class SelectLinear(torch.autograd.Function):
    """Entries idx of z_pre = (x - b_dec) W^T + b_enc, with gradients that touch only those entries.

    TopK passes gradient to k of n_latents pre-activations per row, so the encoder's weight
    gradient is a sparse-dense product, O(b k d) instead of the dense O(b s d). ``val_bk``: the
    entries when the caller already has them exactly (from an fp32 selection matmul); None
    computes them here in full precision (after a low-precision selection).
    """

    @staticmethod
    def forward(ctx, x_bd: Tensor, b_dec_d: Tensor, W_sd: Tensor, b_s: Tensor, idx_bk: Tensor, val_bk) -> Tensor:
        x_c_bd = x_bd - b_dec_d
        ctx.save_for_backward(x_c_bd, W_sd, idx_bk)
        if val_bk is None:
            return gather_dot(idx_bk, W_sd, x_c_bd) + b_s[idx_bk]
        return val_bk.clone()

    @staticmethod
    def backward(ctx, grad_bk: Tensor):
        x_c_bd, W_sd, idx_bk = ctx.saved_tensors
        n_latents = W_sd.shape[0]
        grad_x = grad_b_dec = grad_W = grad_b = None
        # W is (n_latents, d) like a decoder, so every product reads its rows: no transposes.
        if ctx.needs_input_grad[0] and _dense(idx_bk, n_latents):
            grad_x = _scatter(idx_bk, grad_bk, n_latents) @ W_sd
        elif ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx_bk, W_sd, per_sample_weights=grad_bk, mode="sum")
        if ctx.needs_input_grad[2]:
            grad_W = _code_t_mm(_by_latent(idx_bk, n_latents), grad_bk, x_c_bd)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            grad_b = grad_bk.new_zeros(n_latents).index_add_(0, idx_bk.reshape(-1), grad_bk.reshape(-1))
        if ctx.needs_input_grad[1]:
            # d/d b_dec of sum_(r,j) g[r,j] (x_r - b_dec) . W[idx[r,j]] = -(per-latent sums of g) @ W
            grad_b_dec = -(grad_b @ W_sd)
        return grad_x, grad_b_dec, grad_W, grad_b if ctx.needs_input_grad[3] else None, None, None
