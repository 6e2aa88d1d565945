import pytest
import torch

from usae.config import SAEConfig
from usae.errors import UsaeError
from usae.model.sae import SparseCode, UniversalSAE

WIDTHS = {"a": 12, "b": 20}


def make(**kw) -> UniversalSAE:
    cfg = SAEConfig(widths=WIDTHS, n_latents=kw.pop("n_latents", 64), k=kw.pop("k", 4), **kw)
    return UniversalSAE(cfg, generator=torch.Generator().manual_seed(0)).double()


def assert_same_grads(sae: UniversalSAE, fast, slow) -> None:
    """Per parameter: equal gradients, where a missing gradient equals an all-zero one."""
    for (name, _), a, b in zip(sae.named_parameters(), fast, slow, strict=True):
        if a is None or b is None:
            assert a is None and b is None or float((a if a is not None else b).abs().max()) == 0, name
            continue
        torch.testing.assert_close(a, b, msg=name)


def test_encode_has_k_nonzeros_and_decodes_every_model():
    sae = make()
    x = torch.randn(50, 12, dtype=torch.float64) * 3 + 1
    z = sae.encode("a", x)
    assert z.shape == (50, 64)
    assert ((z != 0).sum(1) <= 4).all() and (z >= 0).all()
    assert (z != 0).sum(1).float().mean() > 3  # ReLU can zero a few, not most
    assert sae.decode("b", z).shape == (50, 20)
    out = sae("a", x)
    assert set(out) == {"a", "b"} and out["b"].shape == (50, 20)


def test_encode_accepts_numpy_and_other_dtypes():
    sae = make()
    x = torch.randn(5, 12, dtype=torch.float64)
    z = sae.encode("a", x.numpy())
    torch.testing.assert_close(z, sae.encode("a", x.float()))
    torch.testing.assert_close(sae.decode("b", z.float()), sae.decode("b", z))


def test_sparse_decode_matches_dense_forward_and_gradients():
    sae = make()
    x = torch.randn(30, 12, dtype=torch.float64)
    z_pre = sae.pre_activation("a", sae.normalize("a", x))
    code = sae.activate("a", z_pre)
    assert isinstance(code, SparseCode)
    g = torch.randn(30, 20, dtype=torch.float64)
    sparse = sae.decode_normalized("b", code)
    params = [sae.heads["b"].W_dec, sae.heads["a"].W_enc]
    grads_sparse = torch.autograd.grad((sparse * g).sum(), params, retain_graph=True)
    dense = sae.decode_normalized("b", code.to_dense(64))
    grads_dense = torch.autograd.grad((dense * g).sum(), params)
    torch.testing.assert_close(sparse, dense)
    for gs, gd in zip(grads_sparse, grads_dense, strict=True):
        torch.testing.assert_close(gs, gd)


def test_normalisation_is_owned_by_the_sae():
    """Raw-unit round trip: shifting/scaling the data and the normalisation together changes nothing."""
    sae = make()
    x = torch.randn(40, 12, dtype=torch.float64)
    z1 = sae.encode("a", x)
    shift, scale = (
        torch.linspace(-5, 5, 12, dtype=torch.float64),
        torch.tensor(7.0, dtype=torch.float64),
    )
    sae.set_normalization_("a", shift, scale)
    z2 = sae.encode("a", x * scale + shift)
    torch.testing.assert_close(z1, z2)
    # decode returns raw units of the destination model
    sae.set_normalization_("b", torch.full((20,), 2.0), torch.tensor(3.0))
    torch.testing.assert_close(sae.decode("b", z1), sae.decode_normalized("b", z1) * 3.0 + 2.0)
    # dictionary rows are in raw units: the normalisation scale multiplies them
    torch.testing.assert_close(sae.dictionary("b"), sae.heads["b"].W_dec.detach() * 3.0)


def test_init_encoder_is_decoder_transpose_with_unit_rows():
    sae = make()
    for h in sae.heads.values():
        torch.testing.assert_close(h.W_enc, h.W_dec)  # W_enc is (n_latents, d): transpose-tied
        torch.testing.assert_close(h.W_dec.norm(dim=1), torch.ones(64, dtype=torch.float64))


def test_init_from_data_uses_the_same_rows_in_every_model():
    sae = make(n_latents=8)
    base = torch.randn(100, 3, dtype=torch.float64)
    x_n = {
        "a": base @ torch.randn(3, 12, dtype=torch.float64),
        "b": base @ torch.randn(3, 20, dtype=torch.float64),
    }
    sae.init_from_data_(x_n, generator=torch.Generator().manual_seed(1))
    # each latent's rows are (centred) data rows: find the row index that matches in both models
    for k in range(8):
        ra = sae.heads["a"].W_dec[k]
        ca = torch.nn.functional.cosine_similarity(x_n["a"] - x_n["a"].mean(0), ra[None], dim=1)
        i = int(ca.argmax())
        assert ca[i] > 0.999
        cb = torch.nn.functional.cosine_similarity(x_n["b"][i] - x_n["b"].mean(0), sae.heads["b"].W_dec[k], dim=0)
        assert cb > 0.999


def test_decoder_constraints():
    unit, max1 = make(decoder_norm="unit"), make(decoder_norm="max1")
    for sae in (unit, max1):
        with torch.no_grad():
            sae.heads["a"].W_dec.mul_(torch.linspace(0.2, 3, 64, dtype=torch.float64)[:, None])
        sae.constrain_decoders_()
    torch.testing.assert_close(unit.heads["a"].W_dec.norm(dim=1), torch.ones(64, dtype=torch.float64))
    norms = max1.heads["a"].W_dec.norm(dim=1)
    assert norms.max() <= 1 + 1e-12 and norms.min() < 0.25  # small rows are kept small


def test_parallel_gradient_removed():
    sae = make(decoder_norm="unit")
    W = sae.heads["a"].W_dec
    W.grad = torch.randn_like(W) + 5 * W.detach()
    sae.remove_parallel_grads_()
    assert (W.grad * W.detach()).sum(1).abs().max() < 1e-10


def test_mlp_encoder_has_batchnorm_and_batchtopk_threshold():
    sae = make(encoder="mlp", activation="batchtopk")
    assert isinstance(sae.heads["a"].bn, torch.nn.BatchNorm1d)
    sae.train()
    x = torch.randn(64, 12, dtype=torch.float64)
    z = sae.encode_sparse("a", x)
    assert isinstance(z, torch.Tensor) and int((z > 0).sum()) <= 64 * 4
    assert float(sae.heads["a"].threshold) > 0
    sae.eval()
    z_eval = sae.encode("a", x)
    assert (z_eval[z_eval > 0] > sae.heads["a"].threshold).all()


def test_bad_inputs():
    sae = make()
    with pytest.raises(UsaeError, match="unknown model 'zz'"):
        sae.encode("zz", torch.zeros(2, 12))
    with pytest.raises(UsaeError, match=r"expects \(n, 12\)"):
        sae.encode("a", torch.zeros(2, 13, dtype=torch.float64))
    with pytest.raises(UsaeError, match="k must be"):
        SAEConfig(widths=WIDTHS, n_latents=8, k=9)
    with pytest.raises(UsaeError, match="decode: code must be"):
        sae.decode("a", torch.zeros(2, 63, dtype=torch.float64))


def test_sparse_encoder_path_matches_dense_autograd():
    """The fast TopK path (sparse encoder and decoder gradients) equals plain dense autograd."""
    sae = make(n_latents=40, k=5)
    x_n = torch.randn(25, 12, dtype=torch.float64)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = True
    g_b = torch.randn(25, 20, dtype=torch.float64)

    def loss_of(code, aux):
        out = (sae.decode_normalized("b", code) * g_b).sum()
        return out + (sae.decode_normalized("a", aux, bias=False) ** 2).sum()

    code, aux = sae.encode_normalized("a", x_n, dead, k_aux=6)
    params = [p for p in sae.parameters()]
    fast = torch.autograd.grad(loss_of(code, aux), params, allow_unused=True)
    # reference: dense pre-activations through autograd, dense codes
    z_pre = sae.pre_activation("a", x_n)
    top = torch.topk(z_pre, 5, dim=1)
    dense_code = torch.zeros_like(z_pre).scatter(1, top.indices, torch.relu(top.values))
    aux_dense = torch.zeros_like(z_pre).scatter(
        1, aux.idx_bk, torch.relu(z_pre.gather(1, aux.idx_bk)) * dead[aux.idx_bk]
    )
    slow = torch.autograd.grad(loss_of(dense_code, aux_dense), params, allow_unused=True)
    torch.testing.assert_close(code.to_dense(40), dense_code)
    assert (dead[aux.idx_bk] | (aux.val_bk == 0)).all()  # aux slots hold dead latents or zeros
    assert_same_grads(sae, fast, slow)


def test_global_topk_and_crosscoder_codes():
    sae = make(n_latents=30, k=3)
    x_n = {"a": torch.randn(7, 12, dtype=torch.float64), "b": torch.randn(7, 20, dtype=torch.float64)}
    summed = sae.pre_activation("a", x_n["a"]) + sae.pre_activation("b", x_n["b"])
    top = torch.topk(summed, 3, dim=1).indices.sort(1).values
    sparc = sae.encode_global(x_n, shared_values=False)
    assert torch.equal(sparc["a"].idx_bk.sort(1).values, top) and torch.equal(sparc["b"].idx_bk, sparc["a"].idx_bk)
    # SPARC: each model keeps its own values at the shared indices
    torch.testing.assert_close(
        sparc["b"].val_bk, torch.relu(sae.pre_activation("b", x_n["b"]).gather(1, sparc["b"].idx_bk))
    )
    cross = sae.encode_global(x_n, shared_values=True)
    assert cross["a"] is cross["b"]
    torch.testing.assert_close(cross["a"].val_bk, torch.relu(summed.gather(1, cross["a"].idx_bk)))
    dense = sae.encode_joint({n: sae.denormalize(n, v) for n, v in x_n.items()})
    torch.testing.assert_close(dense, cross["a"].to_dense(30))


def test_bf16_selection_keeps_exact_values_and_sparse_gradients():
    """A bfloat16 choice of latents: values are the exact pre-activations there, gradients equal
    dense autograd on the chosen support, and the choice is the exact TopK up to near-ties."""
    sae = make(n_latents=200, k=8)
    with torch.no_grad():
        for h in sae.heads.values():
            h.b_dec.normal_()
            h.b_enc.normal_()
    x_n = torch.randn(300, 12, dtype=torch.float64)
    dead = torch.rand(200, generator=torch.Generator().manual_seed(1)) < 0.3
    code, aux = sae.encode_normalized("a", x_n, dead, k_aux=5, select_dtype=torch.bfloat16)
    z_pre = sae.pre_activation("a", x_n)
    torch.testing.assert_close(code.val_bk, torch.relu(z_pre.gather(1, code.idx_bk)))
    exact = torch.zeros_like(z_pre, dtype=torch.bool).scatter(1, torch.topk(z_pre, 8, dim=1).indices, True)
    chosen = torch.zeros_like(exact).scatter(1, code.idx_bk, True)
    assert float((exact & chosen).sum()) / exact.sum() >= 0.97
    g_b = torch.randn(300, 20, dtype=torch.float64)
    params = list(sae.parameters())

    def loss_of(c, a):
        return (sae.decode_normalized("b", c) * g_b).sum() + (sae.decode_normalized("a", a, bias=False) ** 2).sum()

    fast = torch.autograd.grad(loss_of(code, aux), params, allow_unused=True)
    dense = code.to_dense(200)
    dense_code = torch.zeros_like(z_pre).scatter(1, code.idx_bk, torch.relu(z_pre.gather(1, code.idx_bk)))
    aux_dense = torch.zeros_like(z_pre).scatter(
        1, aux.idx_bk, torch.relu(z_pre.gather(1, aux.idx_bk)) * dead[aux.idx_bk]
    )
    slow = torch.autograd.grad(loss_of(dense_code, aux_dense), params, allow_unused=True)
    torch.testing.assert_close(dense, dense_code.detach())
    assert_same_grads(sae, fast, slow)


def test_sparse_kernels_match_dense_products():
    """The code-transpose product (column-blocked on CPU) and the sampled dot products, against
    dense references, with repeated and unsorted indices in a row."""
    from usae.model.kernels import _by_latent, _code_t_mm
    from usae.model.kernels import gather_dot as _gather_dot

    g = torch.Generator().manual_seed(0)
    b, k, s, d = 2048, 6, 50, 100  # float64 at b=2048: 64-column blocks, so two of them
    idx = torch.randint(s, (b, k), generator=g)
    idx[:, 1] = idx[:, 0]  # a repeated latent in every row
    val = torch.rand(b, k, generator=g, dtype=torch.float64)
    y = torch.randn(b, d, generator=g, dtype=torch.float64)
    W = torch.randn(s, d, generator=g, dtype=torch.float64)
    dense_bs = torch.zeros(b, s, dtype=torch.float64).index_put_(
        (torch.arange(b)[:, None].expand(b, k), idx), val, accumulate=True
    )
    torch.testing.assert_close(_code_t_mm(_by_latent(idx, s), val, y), dense_bs.T @ y)
    torch.testing.assert_close(_code_t_mm(_by_latent(idx, s), val, y[:, :10].contiguous()), dense_bs.T @ y[:, :10])
    torch.testing.assert_close(_gather_dot(idx, W, y), (W[idx] * y[:, None, :]).sum(-1))


def test_decode_many_equals_decoding_one_by_one():
    sae = make()
    code = sae.activate("a", sae.pre_activation("a", torch.randn(30, 12, dtype=torch.float64)))
    many = sae.decode_many_normalized(["a", "b"], code)
    for name in ("a", "b"):
        torch.testing.assert_close(many[name], sae.decode_normalized(name, code))
