"""RepUX-Net encoder: large-kernel depthwise blocks trained through Bayesian frequency re-parameterization."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from networks.bfr import BFRConv3d
from networks.dwconv import DepthwiseConv3d
from networks.layers import StagedEncoder

__all__ = ["RepUXBlock", "RepUXNetEncoder"]


class RepUXBlock(nn.Module):
    """Depthwise ``ks``^3 convolution, BatchNorm and GELU (no residual, no MLP), as published.

    Args:
        dim: channels.
        ks: depthwise kernel size (odd).
        a: alpha of the Bayesian frequency prior.
        bfr: train the kernel through ``W * M`` (True) or as a plain large kernel (False, the ablation).
        deploy: build the inference form: a plain depthwise convolution holding the effective kernel.
    """

    def __init__(self, dim: int, ks: int = 21, a: float = 1.0, bfr: bool = True, deploy: bool = False) -> None:
        super().__init__()
        self.dwconv = BFRConv3d(dim, ks, alpha=a) if bfr and not deploy else DepthwiseConv3d(dim, ks)
        self.norm = nn.BatchNorm3d(dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.dwconv(x)))


class RepUXNetEncoder(StagedEncoder):
    """The RepUX-Net encoder (state-dict prefix ``repuxnet_3d`` in the full network).

    Args:
        in_chans: input channels.
        depths: blocks per stage.
        dims: channels of the four stages.
        ks: depthwise kernel size.
        a: alpha of the Bayesian frequency prior.
        bfr: train the kernels through the prior.
        deploy: build plain depthwise convolutions holding the effective kernels.
    """

    def __init__(
        self,
        in_chans: int = 1,
        depths: Sequence[int] = (2, 2, 2, 2),
        dims: Sequence[int] = (48, 96, 192, 384),
        ks: int = 21,
        a: float = 1.0,
        bfr: bool = True,
        deploy: bool = False,
    ) -> None:
        super().__init__(in_chans, dims, depths, lambda dim, _: RepUXBlock(dim, ks=ks, a=a, bfr=bfr, deploy=deploy))
