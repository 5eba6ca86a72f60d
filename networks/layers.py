"""Layers shared by the 3D UX-Net family, and the swap of one layer type for another."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerNorm", "StagedEncoder", "replace_layers"]


class LayerNorm(nn.Module):
    """LayerNorm over the channel axis, for channels-last or channels-first tensors (as in ConvNeXt).

    Args:
        normalized_shape: number of channels.
        eps: added to the variance.
        data_format: ``"channels_last"`` (``N, D, H, W, C``) or ``"channels_first"`` (``N, C, D, H, W``).
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-6, data_format: str = "channels_last") -> None:
        super().__init__()
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError(f"data_format must be 'channels_last' or 'channels_first', got {data_format!r}")
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps
        self.data_format = data_format
        self.normalized_shape = (normalized_shape,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        mean = x.mean(1, keepdim=True)
        variance = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(variance + self.eps)
        shape = (-1,) + (1,) * (x.ndim - 2)
        return self.weight.view(shape) * x + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape[0]}, eps={self.eps}, data_format={self.data_format}"


class StagedEncoder(nn.Module):
    """The four-stage encoder skeleton of 3D UX-Net and RepUX-Net (ConvNeXt-style).

    A stride-2 7^3 stem and three stride-2 2^3 downsamplings, each stage a sequence of blocks made by
    ``make_block``, and a channels-first LayerNorm (``norm0..3``) on each stage's output. Returns the four
    normalised stage outputs; the next stage continues from the unnormalised one.

    Args:
        in_chans: input channels.
        dims: channels of the four stages.
        depths: blocks per stage.
        make_block: ``make_block(dim, block_index)`` builds one block; ``block_index`` counts blocks over
            all stages (for stochastic-depth schedules).
    """

    def __init__(
        self, in_chans: int, dims: Sequence[int], depths: Sequence[int], make_block: Callable[[int, int], nn.Module]
    ) -> None:
        super().__init__()
        self.downsample_layers = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv3d(in_chans, dims[0], kernel_size=7, stride=2, padding=3),
                    LayerNorm(dims[0], eps=1e-6, data_format="channels_first"),
                )
            ]
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(
                    LayerNorm(dims[i], eps=1e-6, data_format="channels_first"),
                    nn.Conv3d(dims[i], dims[i + 1], kernel_size=2, stride=2),
                )
            )
        self.stages = nn.ModuleList()
        first = 0
        for dim, depth in zip(dims, depths, strict=True):
            self.stages.append(nn.Sequential(*[make_block(dim, first + j) for j in range(depth)]))
            first += depth
        for i, dim in enumerate(dims):
            self.add_module(f"norm{i}", LayerNorm(dim, eps=1e-6, data_format="channels_first"))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        for i, (downsample, stage) in enumerate(zip(self.downsample_layers, self.stages, strict=True)):
            x = stage(downsample(x))
            outs.append(getattr(self, f"norm{i}")(x))
        return tuple(outs)


Layer = TypeVar("Layer", bound=nn.Module)


def replace_layers(module: nn.Module, kind: type[Layer], convert: Callable[[Layer], nn.Module]) -> nn.Module:
    """Replace every submodule of type ``kind`` inside ``module`` by ``convert(submodule)``, in place.
    Returns ``module`` (a bare ``kind`` is returned converted)."""
    if isinstance(module, kind):
        return convert(module)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kind):
                setattr(parent, name, convert(child))
    return module
