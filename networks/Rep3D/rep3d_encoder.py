"""Rep3D encoder (Lee et al., "Spatially-Adaptive Gradient Re-parameterization for 3D Large Kernel
Optimization", leeh43/Rep3D): large-kernel depthwise blocks trained through a learned prior.

Each block's ``ks``^3 kernel ``W`` is applied as ``W * M`` with ``M = P + f(P)``: ``P = 1 / (1 + d^beta)``, ``d``
the distance of a kernel element to the centre, and ``f`` a small generator (7^3 convolution, normalisation,
sigmoid, 7^3 convolution, normalisation) trained with the network; one ``M`` per block, shared by its
channels. As for RepUX-Net's prior (``networks.bfr``), ``W * M`` is computed inside the autograd graph, so
``W`` gets ``M * dL/dW_eff`` and the generator gets the gradient of ``M``.

Changed from the published ``rep3d_encoder.py``, which does not train as written:

- The generator's second convolution has padding 3 (published: 7, which makes ``M`` 29^3 against a 21^3
  kernel: the first forward fails).
- Its normalisations are over the kernel's positions (``GroupNorm(1, 1)``; published: a LayerNorm over the
  one channel, whose output is always its bias: ``f`` was a constant and no gradient reached the generator).
- The last normalisation's scale starts at ``layer_scale_init_value`` (1e-6, the published argument, unused
  there), so ``M`` starts at ``P`` (the fixed prior) and the generator learns a correction; a unit-scale
  start would add a unit-variance field to ``P``, which lies in (0.05, 1].
- ``W * M`` is computed functionally (published: wrapped in a new ``nn.Parameter`` each forward, so the
  optimizer's parameter got no gradient and the mask was multiplied in again at every step).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from networks.bfr import ReparameterizedConv3d, centre_distance
from networks.dwconv import DepthwiseConv3d
from networks.layers import StagedEncoder

__all__ = ["LearnedPriorConv3d", "Rep3DBlock", "Rep3DEncoder", "distance_prior"]


def distance_prior(
    kernel_size: int,
    beta: float = 1.0,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Rep3D's distance prior of a cubic kernel: ``P[i, j, k] = 1 / (1 + d^beta)``, ``d`` the Euclidean distance
    in voxels from ``(i, j, k)`` to the centre (1 at the centre). With ``beta`` 1 it is RepUX-Net's Bayesian
    frequency prior with alpha 1."""
    distance = centre_distance(kernel_size, device)
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta!r}")
    return (1 / (1 + distance**beta)).to(dtype or torch.get_default_dtype())


class LearnedPriorConv3d(ReparameterizedConv3d):
    """A depthwise 3D convolution whose kernel ``W`` is applied as ``W * M``, ``M = P + f(P)`` learned.

    ``weight`` is ``W``; the state dict holds ``W`` and the generator's parameters (``prior_conv``, ``norm_w``,
    ``prior_conv2``, ``norm_w2``, the published names); ``P`` is a non-persistent buffer. :meth:`to_conv3d`
    folds ``W * M`` into a plain depthwise convolution (the deploy form, generator dropped).

    Args:
        channels: input and output channels.
        kernel_size: cubic kernel edge length (odd; padding ``kernel_size // 2``).
        beta: exponent of the distance prior.
        generator_kernel: kernel edge of the generator's two convolutions (odd; 7 as published).
        scale_init: initial scale of the generator's output (``M`` starts within it of ``P``).
        bias: learn a bias (False as published).
        algorithm: convolution algorithm (see :mod:`networks.dwconv`); None follows the process setting.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        beta: float = 1.0,
        generator_kernel: int = 7,
        scale_init: float = 1e-6,
        bias: bool = False,
        algorithm: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(generator_kernel, bool) or not isinstance(generator_kernel, int) or generator_kernel % 2 != 1:
            raise ValueError(f"generator_kernel must be a positive odd integer, got {generator_kernel!r}")
        super().__init__(channels, kernel_size, bias=bias, algorithm=algorithm, device=device, dtype=dtype)
        self.beta = float(beta)
        prior = distance_prior(kernel_size, beta, dtype=self.weight.dtype, device=self.weight.device)
        self.register_buffer("prior", prior, persistent=False)
        factory = {"device": device, "dtype": dtype}
        padding = generator_kernel // 2  # keeps the kernel's size
        self.prior_conv = nn.Conv3d(1, 1, generator_kernel, padding=padding, **factory)
        self.norm_w = nn.GroupNorm(1, 1, eps=1e-6, **factory)
        self.prior_conv2 = nn.Conv3d(1, 1, generator_kernel, padding=padding, **factory)
        self.norm_w2 = nn.GroupNorm(1, 1, eps=1e-6, **factory)
        nn.init.constant_(self.norm_w2.weight, scale_init)

    def mask(self) -> torch.Tensor:
        """``M = P + f(P)``, of shape ``(ks, ks, ks)`` (differentiable w.r.t. the generator)."""
        prior = self.prior[None, None]
        hidden = torch.sigmoid(self.norm_w(self.prior_conv(prior)))
        return self.prior + self.norm_w2(self.prior_conv2(hidden))[0, 0]

    def kernel(self) -> torch.Tensor:
        return self.weight * self.mask()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}"


class Rep3DBlock(nn.Module):
    """Depthwise ``ks``^3 convolution (no bias), BatchNorm and GELU (no residual, no MLP), as published.

    Args:
        dim: channels.
        ks: depthwise kernel size (odd).
        beta: exponent of the distance prior.
        scale_init: initial scale of the generator's output.
        deploy: build the inference form: a plain depthwise convolution holding ``W * M``.
    """

    def __init__(self, dim: int, ks: int = 21, beta: float = 1.0, scale_init: float = 1e-6, deploy: bool = False):
        super().__init__()
        if deploy:
            self.dwconv = DepthwiseConv3d(dim, ks, bias=False)
        else:
            self.dwconv = LearnedPriorConv3d(dim, ks, beta=beta, scale_init=scale_init)
        self.norm = nn.BatchNorm3d(dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.dwconv(x)))


class Rep3DEncoder(StagedEncoder):
    """The Rep3D encoder (state-dict prefix ``rep3d`` in the full network): RepUX-Net's stages with Rep3D
    blocks.

    Args:
        in_chans: input channels.
        depths: blocks per stage.
        dims: channels of the four stages.
        ks: depthwise kernel size.
        beta: exponent of the distance prior.
        scale_init: initial scale of each generator's output.
        deploy: build plain depthwise convolutions holding the folded kernels.
    """

    def __init__(
        self,
        in_chans: int = 1,
        depths: Sequence[int] = (2, 2, 2, 2),
        dims: Sequence[int] = (48, 96, 192, 384),
        ks: int = 21,
        beta: float = 1.0,
        scale_init: float = 1e-6,
        deploy: bool = False,
    ) -> None:
        super().__init__(
            in_chans,
            dims,
            depths,
            lambda dim, _: Rep3DBlock(dim, ks=ks, beta=beta, scale_init=scale_init, deploy=deploy),
        )
