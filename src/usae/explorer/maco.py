"""MACO's image parametrisation (fixed magnitude spectrum, optimised phase, colour basis) and the latent objective.

Fel et al. 2023 (MACO): the image is the inverse FFT of a fixed magnitude times a free phase, so it
keeps natural-image statistics while the phase is optimised. ``LatentObjective`` reads one concept's
code off a backbone's tokens of a batch of crops. Used by ``explorer/maximize.py``.
"""

from __future__ import annotations

import math

import torch
from PIL import Image
from torch import Tensor, nn

from usae.errors import UsaeError
from usae.explorer.spectrum import power_law_spectrum
from usae.model.sae import UniversalSAE, dense


class FourierImage(nn.Module):
    """An image whose Fourier phase is the parameter and whose magnitude spectrum is fixed (MACO).

    Three channels are generated, each from its magnitude and phase, and mixed into RGB by the
    ``colour`` basis (column d: the RGB direction of channel d; default: the channels are R, G, B).
    """

    def __init__(
        self,
        size: int,
        generator: torch.Generator,
        decay: float = 1.0,
        magnitude: Tensor | None = None,
        colour: Tensor | None = None,
    ) -> None:
        """``magnitude``: the fixed (3, size, size // 2 + 1) spectrum and ``colour`` its (3, 3) basis
        (``spectrum.data_spectrum``); default the 1/f^decay power law in R, G, B."""
        super().__init__()
        self.size = int(size)
        shape = (3, self.size, self.size // 2 + 1)
        if magnitude is None:
            magnitude = power_law_spectrum(self.size, decay)
        elif tuple(magnitude.shape) != shape:
            raise UsaeError(f"magnitude spectrum of shape {tuple(magnitude.shape)}; a {size}-px image needs {shape}")
        if colour is not None and tuple(colour.shape) != (3, 3):
            raise UsaeError(f"colour basis of shape {tuple(colour.shape)}; it needs (3, 3)")
        self.register_buffer("magnitude", magnitude.detach().float().clone())
        self.register_buffer("colour", None if colour is None else colour.detach().float().clone())
        phase = (torch.rand(self.magnitude.shape, generator=generator) * 2 - 1) * math.pi
        self.phase = nn.Parameter(phase)

    def forward(self) -> Tensor:
        """(1, 3, size, size) pixels in [0, 1]."""
        phase = (self.phase - self.phase.mean()) / (self.phase.std() + 1e-5)
        img_chw = torch.fft.irfft2(torch.polar(self.magnitude, phase), s=(self.size, self.size))
        if self.colour is not None:
            img_chw = torch.einsum("cd,dhw->chw", self.colour, img_chw)
        img_chw = (img_chw - img_chw.mean()) / (img_chw.std() + 1e-5)
        return torch.sigmoid(img_chw)[None]


class LatentObjective(nn.Module):
    """pixels (b, 3, S, S) in [0, 1] -> (b,) latent ``latent``'s pre-activation in model ``name``,
    averaged over the store grid's tokens."""

    def __init__(self, sae: UniversalSAE, backbone: nn.Module, name: str, grid: tuple[int, int], latent: int) -> None:
        super().__init__()
        self.sae, self.backbone, self.name, self.grid, self.latent = sae, backbone, name, tuple(grid), int(latent)

    def pre_activations(self, pixels_b3ss: Tensor) -> Tensor:
        """(b, t, s): every latent's pre-activation on every token of the store grid."""
        x_btd = self.backbone.tokens(pixels_b3ss, self.grid)
        b, t, d = x_btd.shape
        z_pre_rs = self.sae.pre_activation(self.name, self.sae.normalize(self.name, x_btd.reshape(b * t, d)))
        return z_pre_rs.view(b, t, -1)

    def token_values(self, pixels_b3ss: Tensor) -> Tensor:
        """(b, t): the latent's pre-activation on every token of the store grid."""
        return self.pre_activations(pixels_b3ss)[..., self.latent]

    @torch.no_grad()
    def token_codes(self, pixels_b3ss: Tensor) -> tuple[Tensor, Tensor]:
        """((b, t) pre-activations, (b, t) codes): the latent's value before and after the run's
        sparsification (TopK), on every token; the code is what the explorer's scores are made of."""
        z_bts = self.pre_activations(pixels_b3ss)
        b, t, s = z_bts.shape
        code_rs = dense(self.sae.activate(self.name, z_bts.reshape(b * t, s)), s)
        return z_bts[..., self.latent], code_rs[:, self.latent].view(b, t)

    def forward(self, pixels_b3ss: Tensor) -> Tensor:
        return self.token_values(pixels_b3ss).mean(1)


def random_crops(img_13ss: Tensor, n: int, scale: tuple[float, float], generator: torch.Generator) -> Tensor:
    """``n`` random square crops of the image (side a uniform fraction ``scale`` of it), resized back."""
    from torchvision.ops import roi_align

    size = img_13ss.shape[-1]
    side_n = size * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, generator=generator))
    x0_n = (size - side_n) * torch.rand(n, generator=generator)
    y0_n = (size - side_n) * torch.rand(n, generator=generator)
    boxes = torch.stack([torch.zeros(n), x0_n, y0_n, x0_n + side_n, y0_n + side_n], 1).to(img_13ss)
    return roi_align(img_13ss, boxes, output_size=size, sampling_ratio=2, aligned=True)


def to_image(pixels_13ss: Tensor) -> Image.Image:
    """(1, 3, S, S) pixels in [0, 1] -> RGB PIL image (8 bit)."""
    return Image.fromarray((pixels_13ss[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())
