"""3D UX-Net encoder: ConvNeXt-style blocks with a volumetric depthwise kernel."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import DropPath
from torch import nn

from networks.dwconv import DepthwiseConv3d
from networks.layers import LayerNorm, StagedEncoder

__all__ = ["UXBlock", "UXNetEncoder"]


class UXBlock(nn.Module):
    """Depthwise ``ks``^3 convolution, LayerNorm, grouped pointwise MLP, layer scale and residual.

    The pointwise layers are grouped 1x1x1 convolutions (``groups=dim``), which is what the published
    weights hold.

    Args:
        dim: channels.
        ks: depthwise kernel size (odd).
        drop_path: stochastic-depth probability of the residual branch.
        layer_scale_init_value: initial layer scale ``gamma``; 0 or less disables it.
    """

    def __init__(self, dim: int, ks: int = 7, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = DepthwiseConv3d(dim, ks)
        self.norm = LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Conv3d(dim, 4 * dim, kernel_size=1, groups=dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Conv3d(4 * dim, dim, kernel_size=1, groups=dim)
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim)) if layer_scale_init_value > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        x = self.dwconv(x)
        x = self.norm(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        x = self.pwconv2(self.act(self.pwconv1(x)))
        if self.gamma is not None:
            x = self.gamma[:, None, None, None] * x
        return residual + self.drop_path(x)


class UXNetEncoder(StagedEncoder):
    """The 3D UX-Net encoder (state-dict prefix ``uxnet_3d`` in the full network).

    Args:
        in_chans: input channels.
        depths: blocks per stage.
        dims: channels of the four stages.
        ks: depthwise kernel size.
        drop_path_rate: stochastic depth, increasing linearly from 0 to this value over all blocks.
        layer_scale_init_value: initial layer scale of every block.
    """

    def __init__(
        self,
        in_chans: int = 1,
        depths: Sequence[int] = (2, 2, 2, 2),
        dims: Sequence[int] = (48, 96, 192, 384),
        ks: int = 7,
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
    ) -> None:
        count = sum(depths)
        rates = [drop_path_rate * i / max(count - 1, 1) for i in range(count)]  # as torch.linspace
        super().__init__(
            in_chans,
            dims,
            depths,
            lambda dim, i: UXBlock(dim, ks=ks, drop_path=rates[i], layer_scale_init_value=layer_scale_init_value),
        )
