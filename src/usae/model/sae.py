"""UniversalSAE: per-model encoders and decoders around one shared sparse code. Pure math, no I/O.

Model i owns an input normalisation (shift_d, scale_d), a pre-encoder bias b_dec, an encoder
(W_enc, b_enc, and a BatchNorm for the paper's 'mlp' variant) and a decoder W_dec whose rows are
the dictionary. Encoding model i gives a code z over the shared n_latents; decoding z with model
j's decoder reconstructs model j — that is what makes the code universal (Thasarathan et al. 2025).

Public methods take and return *raw* activation units; the ``*_normalized`` internals used by the
trainer work in normalised units, where the loss is computed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from usae.config import SAEConfig
from usae.errors import UsaeError
from usae.model.kernels import SelectLinear, SparseDecode

if TYPE_CHECKING:
    from pathlib import Path


class SparseCode(NamedTuple):
    """A TopK code: for each row, k latent indices and their non-negative values."""

    idx_bk: Tensor
    """(b, k) int64 latent indices."""
    val_bk: Tensor
    """(b, k) float values (>= 0)."""

    def to_dense(self, n_latents: int) -> Tensor:
        """(b, n_latents) dense code."""
        z_bs = self.val_bk.new_zeros(self.val_bk.shape[0], n_latents)
        return z_bs.scatter(1, self.idx_bk, self.val_bk)


Code = SparseCode | Tensor  # a SparseCode, or a dense (b, s) code (BatchTopK, user-given z)


def dense(code: Code, n_latents: int) -> Tensor:
    """Any code as a dense (b, n_latents) tensor."""
    return code.to_dense(n_latents) if isinstance(code, SparseCode) else code


def _auxk_select(z_pre_bs: Tensor, dead_s: Tensor, k_aux: int) -> SparseCode:
    """Top ``k_aux`` ReLU pre-activations among dead latents (Gao et al. 2024, appendix A.2)."""
    masked_bs = z_pre_bs.masked_fill(~dead_s, float("-inf"))
    top = torch.topk(masked_bs, min(k_aux, z_pre_bs.shape[1]), dim=1, sorted=False)
    # -inf (live latents, when fewer than k_aux are dead) becomes 0 and contributes nothing
    return SparseCode(top.indices, F.relu(top.values).nan_to_num(0.0, posinf=0.0, neginf=0.0))


class Head(nn.Module):
    """One model's normalisation, encoder and decoder."""

    def __init__(self, d: int, n_latents: int, encoder: str) -> None:
        super().__init__()
        # (n_latents, d), the nn.Linear layout: one row per latent, like W_dec.
        self.W_enc = nn.Parameter(torch.empty(n_latents, d))
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(torch.empty(n_latents, d))
        self.b_dec = nn.Parameter(torch.zeros(d))
        # Overcomplete's mlp_bn_1 encoder: Linear -> BatchNorm1d -> ReLU (before TopK).
        self.bn = nn.BatchNorm1d(n_latents) if encoder == "mlp" else None
        self.register_buffer("shift_d", torch.zeros(d))
        self.register_buffer("scale_d", torch.ones(d))
        # BatchTopK's inference threshold, an EMA of the smallest value kept in training.
        self.register_buffer("threshold", torch.zeros(()))


class UniversalSAE(nn.Module):
    """A universal sparse autoencoder over ``cfg.widths`` models sharing ``cfg.n_latents`` latents."""

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.heads = nn.ModuleDict({name: Head(d, cfg.n_latents, cfg.encoder) for name, d in cfg.widths.items()})
        self._scratch_bs: Tensor | None = None  # see _scratch; not state
        self.reset_parameters(generator)

    def train(self, mode: bool = True) -> UniversalSAE:
        if not mode:  # the selection buffer only serves training steps; eval() gives its memory back
            self._scratch_bs = None
        return super().train(mode)

    # -- sharing (I/O lives in usae.interop.hub; imported lazily to keep this module pure) ------------
    def save_pretrained(self, save_dir: str | Path, **kwargs: Any) -> Path:
        """Write config.json + model.safetensors + a model card README.md; see ``usae.interop.hub.save_pretrained``."""
        from usae.interop.hub import save_pretrained

        return save_pretrained(self, save_dir, **kwargs)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **kwargs: Any) -> UniversalSAE:
        """Load from a pretrained/run directory or a Hub repo id; see ``usae.interop.hub.from_pretrained``."""
        from usae.interop.hub import from_pretrained

        return from_pretrained(name_or_path, **kwargs)

    # -- structure --------------------------------------------------------------------------
    @property
    def model_names(self) -> list[str]:
        """Model names in store order."""
        return list(self.cfg.widths)

    @property
    def n_latents(self) -> int:
        return self.cfg.n_latents

    @property
    def k(self) -> int:
        return self.cfg.k

    def head(self, name: str) -> Head:
        if name not in self.heads:
            raise UsaeError(f"unknown model {name!r}; this SAE has models {self.model_names}")
        return self.heads[name]  # type: ignore[return-value]

    # -- initialisation ---------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm dictionary rows; each encoder starts as its decoder's transpose."""
        for h in self.heads.values():
            W_dec = torch.randn(h.W_dec.shape, generator=generator, dtype=h.W_dec.dtype)
            self._set_dictionary_(h, W_dec.to(h.W_dec.device))

    @torch.no_grad()
    def init_from_data_(self, x_n: dict[str, Tensor], generator: torch.Generator | None = None) -> None:
        """Start every model's dictionary from the *same* data rows (index-aligned across models).

        ``x_n[name]`` is (b, d) in normalised units. b_dec starts at the batch mean, so the rows
        are centred data points; rows are unit-normalised. Measured best in docs/defaults.md.
        """
        b = next(iter(x_n.values())).shape[0]
        rows = torch.randint(b, (self.n_latents,), generator=generator)
        for name, x_bd in x_n.items():
            h = self.head(name)
            h.b_dec.copy_(x_bd.mean(0))
            W_dec = x_bd[rows.to(x_bd.device)] - h.b_dec
            # a constant data row would give a zero direction; fall back to random ones
            dead = W_dec.norm(dim=1) < 1e-6
            if dead.any():
                W_dec[dead] = torch.randn(int(dead.sum()), W_dec.shape[1], generator=generator).to(W_dec)
            self._set_dictionary_(h, W_dec)

    @staticmethod
    def _set_dictionary_(h: Head, W_dec_sd: Tensor) -> None:
        W_dec_sd = W_dec_sd / W_dec_sd.norm(dim=1, keepdim=True).clamp_min(1e-12)
        h.W_dec.copy_(W_dec_sd)
        h.W_enc.copy_(W_dec_sd)
        h.b_enc.zero_()

    @torch.no_grad()
    def set_normalization_(self, name: str, shift_d: Tensor, scale_d: Tensor) -> None:
        """Set model ``name``'s normalisation: x_n = (x - shift) / scale (scale broadcast to d)."""
        h = self.head(name)
        h.shift_d.copy_(torch.as_tensor(shift_d, dtype=h.shift_d.dtype).expand_as(h.shift_d))
        h.scale_d.copy_(torch.as_tensor(scale_d, dtype=h.scale_d.dtype).expand_as(h.scale_d))

    # -- normalised-unit internals (the trainer's path) --------------------------------------
    def normalize(self, name: str, x_bd: Tensor) -> Tensor:
        h = self.head(name)
        return (x_bd - h.shift_d) / h.scale_d

    def denormalize(self, name: str, x_n_bd: Tensor) -> Tensor:
        h = self.head(name)
        return x_n_bd * h.scale_d + h.shift_d

    def pre_activation(self, name: str, x_n_bd: Tensor) -> Tensor:
        """(b, d) normalised input -> (b, s) pre-activations (before ReLU/TopK; differentiable)."""
        h = self.head(name)
        z_pre_bs = F.linear(x_n_bd - h.b_dec, h.W_enc, h.b_enc)
        return h.bn(z_pre_bs) if h.bn is not None else z_pre_bs

    def activate(self, name: str, z_pre_bs: Tensor) -> Code:
        """Sparsify pre-activations of model ``name``: a SparseCode (TopK) or a dense code (BatchTopK)."""
        if self.cfg.activation == "topk":
            top = torch.topk(z_pre_bs, self.k, dim=1, sorted=False)
            return SparseCode(top.indices, F.relu(top.values))
        z_bs = F.relu(z_pre_bs)
        h = self.head(name)
        if not self.training:
            return z_bs * (z_bs > h.threshold)
        n_keep = min(self.k * z_bs.shape[0], z_bs.numel())
        top = torch.topk(z_bs.flatten(), n_keep, sorted=False)
        z_bs = torch.zeros_like(z_bs).flatten().scatter(0, top.indices, top.values).view_as(z_bs)
        with torch.no_grad():
            kept_min = top.values.min().clamp_min(0)
            h.threshold.copy_(torch.where(h.threshold > 0, h.threshold.lerp(kept_min, 0.01), kept_min))
        return z_bs

    def encode_normalized(
        self,
        name: str,
        x_n_bd: Tensor,
        dead_s: Tensor | None = None,
        k_aux: int = 0,
        select_dtype: torch.dtype | None = None,
    ) -> tuple[Code, SparseCode | None]:
        """The trainer's encoder: (code, AuxK code over ``dead_s`` latents or None when k_aux = 0).

        Linear TopK encoders take the sparse path: the dense pre-activations are computed once
        without autograd, only to choose each row's latents, and only the chosen entries carry
        gradients (``SelectLinear``). ``select_dtype`` (e.g. bfloat16) runs that one dense matmul
        in lower precision; the chosen entries' values are then recomputed in full precision, so
        only near-ties at the k-th place can differ from a full-precision choice.
        """
        h = self.head(name)
        if self.cfg.encoder != "linear" or self.cfg.activation != "topk":
            z_pre_bs = self.pre_activation(name, x_n_bd)
            aux = _auxk_select(z_pre_bs, dead_s, k_aux) if k_aux > 0 and dead_s is not None else None
            return self.activate(name, z_pre_bs), aux
        exact = select_dtype is None or select_dtype == h.W_enc.dtype
        with torch.no_grad():
            dt = h.W_enc.dtype if exact else select_dtype
            x_c_bd = (x_n_bd - h.b_dec).to(dt)
            z_pre_bs = torch.addmm(h.b_enc.to(dt), x_c_bd, h.W_enc.to(dt).t(), out=self._scratch(x_c_bd, dt))
            top = torch.topk(z_pre_bs, self.k, dim=1, sorted=False)
            all_idx, top_val = top.indices, top.values if exact else None
            aux_idx_bk = None
            if k_aux > 0 and dead_s is not None:
                masked_bs = z_pre_bs.masked_fill_(~dead_s, float("-inf"))  # in place: z_pre is done with
                aux = torch.topk(masked_bs, min(k_aux, self.n_latents), dim=1, sorted=False)
                aux_idx_bk = aux.indices
                all_idx = torch.cat([all_idx, aux_idx_bk], 1)
                top_val = torch.cat([top_val, aux.values], 1) if exact else None
        val_bj = F.relu(SelectLinear.apply(x_n_bd, h.b_dec, h.W_enc, h.b_enc, all_idx, top_val))
        code = SparseCode(top.indices, val_bj[:, : self.k])
        if aux_idx_bk is None:
            return code, None
        # live latents fill the aux slots when fewer than k_aux are dead (-inf above): they add nothing
        return code, SparseCode(aux_idx_bk, val_bj[:, self.k :] * dead_s[aux_idx_bk])

    def _scratch(self, x_bd: Tensor, dtype: torch.dtype) -> Tensor:
        """A reused (b, n_latents) buffer for the selection matmul's output.

        On CPU a fresh 100 MB tensor per step is mapped anew by the allocator and page-faulted on
        first write: reusing one buffer makes the encoder matmul up to ~25% faster on a 2-core Zen 4.
        CUDA's caching allocator already reuses memory, so there a fresh tensor is returned.
        """
        shape = (x_bd.shape[0], self.n_latents)
        if x_bd.device.type != "cpu":
            return x_bd.new_empty(shape, dtype=dtype)
        buf = self._scratch_bs
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self._scratch_bs = torch.empty(shape, dtype=dtype)
        return buf

    def encode_global(self, x_n: dict[str, Tensor], shared_values: bool) -> dict[str, SparseCode]:
        """Codes chosen from the pre-activations summed over models (every model's rows needed).

        ``shared_values=False`` is SPARC's global TopK: one index set per row from the summed
        pre-activations, each model keeping its own values there. ``shared_values=True`` is an
        acausal crosscoder: one code, TopK of the summed pre-activations, the same for every model.
        """
        return self.codes_from_pre({n: self.pre_activation(n, x) for n, x in x_n.items()}, shared_values)

    def codes_from_pre(self, z_pre: dict[str, Tensor], shared_values: bool) -> dict[str, SparseCode]:
        """``encode_global`` from already computed pre-activations (model -> (b, n_latents))."""
        summed_bs = sum(z_pre.values())
        if shared_values:
            top = torch.topk(summed_bs, self.k, dim=1, sorted=False)
            code = SparseCode(top.indices, F.relu(top.values))
            return dict.fromkeys(z_pre, code)
        idx_bk = torch.topk(summed_bs.detach(), self.k, dim=1, sorted=False).indices
        return {n: SparseCode(idx_bk, F.relu(z.gather(1, idx_bk))) for n, z in z_pre.items()}

    def encode_joint(self, x: dict[str, Tensor]) -> Tensor:
        """Raw activations of every model on the same rows -> one dense code (crosscoder-style)."""
        for name, x_bd in x.items():
            self._check_input(name, x_bd)
        code = next(iter(self.encode_global({n: self.normalize(n, v) for n, v in x.items()}, True).values()))
        return code.to_dense(self.n_latents)

    def decode_normalized(self, name: str, code: Code, bias: bool = True) -> Tensor:
        """Code -> (b, d) reconstruction of model ``name`` in normalised units (``bias``: add b_dec)."""
        return self.decode_many_normalized([name], code, bias)[name]

    def decode_many_normalized(self, names: list[str], code: Code, bias: bool = True) -> dict[str, Tensor]:
        """``decode_normalized`` into several models at once (one shared sparse backward)."""
        heads = [self.head(n) for n in names]
        if isinstance(code, SparseCode):
            # Gather k dictionary rows per row instead of a dense (b, s) @ (s, d) product.
            x_hats = SparseDecode.apply(code.idx_bk, code.val_bk, *(h.W_dec for h in heads))
        else:
            x_hats = [code @ h.W_dec for h in heads]
        return {n: x + h.b_dec if bias else x for n, h, x in zip(names, heads, x_hats, strict=True)}

    # -- public API in raw units -------------------------------------------------------------
    def encode_sparse(self, name: str, x_bd: Tensor) -> Code:
        """Raw activations of model ``name`` (b, d) -> its code (SparseCode for TopK)."""
        return self.activate(name, self.pre_activation(name, self.normalize(name, x_bd)))

    def encode(self, name: str, x_bd: Tensor) -> Tensor:
        """Raw activations (b, d_name) -> dense code (b, n_latents) with k non-zeros per row (TopK).

        ``x_bd`` may be any tensor or array; it is moved to the SAE's dtype and device.
        """
        x_bd = self._as_param_tensor(x_bd)
        self._check_input(name, x_bd)
        code = self.encode_sparse(name, x_bd)
        return dense(code, self.n_latents)

    def decode(self, name: str, z_bs: Tensor | SparseCode) -> Tensor:
        """Code (b, n_latents) -> (b, d_name) reconstruction of model ``name`` in raw units."""
        if not isinstance(z_bs, SparseCode):
            z_bs = self._as_param_tensor(z_bs)
        if isinstance(z_bs, Tensor) and (z_bs.ndim != 2 or z_bs.shape[1] != self.n_latents):
            raise UsaeError(f"decode: code must be (n, {self.n_latents}), got {tuple(z_bs.shape)}")
        return self.denormalize(name, self.decode_normalized(name, z_bs))

    def forward(self, src: str, x_bd: Tensor) -> dict[str, Tensor]:
        """Encode model ``src`` and reconstruct every model (raw units), keyed by model name."""
        code = self.encode_sparse(src, x_bd)
        return {dst: self.decode(dst, code) for dst in self.model_names}

    def dictionary(self, name: str) -> Tensor:
        """(n_latents, d_name): each latent's decoder direction for model ``name`` in raw units.

        Row norms carry meaning with ``decoder_norm='max1'``: a model fades latents it lacks.
        """
        h = self.head(name)
        return h.W_dec.detach() * h.scale_d

    def _as_param_tensor(self, x: Tensor) -> Tensor:
        p = next(self.parameters())
        return torch.as_tensor(x, dtype=p.dtype, device=p.device)

    def _check_input(self, name: str, x_bd: Tensor) -> None:
        d = self.head(name).W_dec.shape[1]
        if x_bd.ndim != 2 or x_bd.shape[1] != d:
            raise UsaeError(f"encode: model {name!r} expects (n, {d}) activations, got {tuple(x_bd.shape)}")

    # -- decoder upkeep (called by the trainer around optimizer.step) -----------------------
    @torch.no_grad()
    def remove_parallel_grads_(self) -> None:
        """Drop the gradient component parallel to each unit dictionary row (decoder_norm='unit')."""
        for h in self.heads.values():
            if h.W_dec.grad is None:
                continue
            W_unit = h.W_dec / h.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
            parallel_s = (h.W_dec.grad * W_unit).sum(1, keepdim=True)
            h.W_dec.grad.sub_(parallel_s * W_unit)

    @torch.no_grad()
    def constrain_decoders_(self) -> None:
        """Project dictionary rows back to norm 1 ('unit') or into the unit ball ('max1')."""
        for h in self.heads.values():
            if not h.W_dec.requires_grad:  # frozen (--extend): leave it bit-for-bit as loaded
                continue
            norm_s1 = h.W_dec.norm(dim=1, keepdim=True)
            if self.cfg.decoder_norm == "unit":
                h.W_dec.div_(norm_s1.clamp_min(1e-12))
            else:
                h.W_dec.div_(norm_s1.clamp_min(1.0))
