"""The UNETR-style decoder that 3D UX-Net and RepUX-Net put behind their four-stage encoders."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from torch import nn

__all__ = ["HierarchicalEncoderUNETRDecoder", "check_ux_arguments"]

#: The stem halves the input and three downsamplings halve it again.
INPUT_MULTIPLE = 16


def check_ux_arguments(
    in_chans: int,
    out_chans: int,
    depths: Sequence[int],
    feat_size: Sequence[int],
    hidden_size: int,
    ks: int,
    spatial_dims: int,
) -> None:
    """Raise a ValueError naming the first invalid constructor argument of a UX-family network."""
    for name, value in (("in_chans", in_chans), ("out_chans", out_chans), ("hidden_size", hidden_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if len(depths) != 4 or any(int(d) < 1 for d in depths):
        raise ValueError(f"depths must be four positive integers, got {list(depths)!r}")
    if len(feat_size) != 4 or any(int(f) < 1 for f in feat_size):
        raise ValueError(f"feat_size must be four positive integers, got {list(feat_size)!r}")
    if isinstance(ks, bool) or not isinstance(ks, int) or ks < 1 or ks % 2 == 0:
        raise ValueError(f"ks (the depthwise kernel size) must be a positive odd integer, got {ks!r}")
    if spatial_dims != 3:
        raise ValueError(f"spatial_dims must be 3 (the encoder is volumetric), got {spatial_dims!r}")


class HierarchicalEncoderUNETRDecoder(nn.Module):
    """A four-stage encoder under ``encoder_name`` and the UNETR-style decoder of 3D UX-Net.

    The encoder returns four feature maps at 1/2, 1/4, 1/8 and 1/16 of the input size with
    ``feat_size`` channels. The decoder (MONAI blocks, kernel 3) adds a full-resolution branch on the
    input and a ``hidden_size`` bottleneck, and upsamples back to the input size. Attribute names match
    the published checkpoints (``encoder1..5``, ``decoder5..1``, ``out``).

    Args:
        encoder_name: attribute name of the encoder (its state-dict prefix).
        encoder: the encoder module.
        in_chans: input channels.
        out_chans: output channels (segmentation classes).
        feat_size: channels of the four encoder stages.
        hidden_size: channels of the bottleneck.
        norm_name: MONAI normalisation of the decoder blocks.
        res_block: residual decoder blocks.
        spatial_dims: must be 3.
    """

    def __init__(
        self,
        encoder_name: str,
        encoder: nn.Module,
        in_chans: int,
        out_chans: int,
        feat_size: Sequence[int],
        hidden_size: int,
        norm_name: tuple | str,
        res_block: bool,
        spatial_dims: int,
    ) -> None:
        super().__init__()
        self.in_chans, self.out_chans = in_chans, out_chans
        self.feat_size, self.hidden_size = tuple(feat_size), hidden_size
        self.encoder_name = encoder_name
        self.add_module(encoder_name, encoder)
        f0, f1, f2, f3 = feat_size

        def basic(cin: int, cout: int) -> UnetrBasicBlock:
            return UnetrBasicBlock(
                spatial_dims, cin, cout, kernel_size=3, stride=1, norm_name=norm_name, res_block=res_block
            )

        def up(cin: int, cout: int) -> UnetrUpBlock:
            return UnetrUpBlock(
                spatial_dims, cin, cout, kernel_size=3, upsample_kernel_size=2, norm_name=norm_name, res_block=res_block
            )

        self.encoder1 = basic(in_chans, f0)
        self.encoder2 = basic(f0, f1)
        self.encoder3 = basic(f1, f2)
        self.encoder4 = basic(f2, f3)
        self.encoder5 = basic(f3, hidden_size)
        self.decoder5 = up(hidden_size, f3)
        self.decoder4 = up(f3, f2)
        self.decoder3 = up(f2, f1)
        self.decoder2 = up(f1, f0)
        self.decoder1 = basic(f0, f0)
        self.out = UnetOutBlock(spatial_dims=spatial_dims, in_channels=f0, out_channels=out_chans)

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        spatial = tuple(x_in.shape[2:])
        if x_in.ndim != 5 or any(s % INPUT_MULTIPLE for s in spatial):
            raise ValueError(
                f"{type(self).__name__} expects input of shape (N, C, D, H, W) with D, H, W multiples of "
                f"{INPUT_MULTIPLE}, got {tuple(x_in.shape)}"
            )
        outs = getattr(self, self.encoder_name)(x_in)
        enc1 = self.encoder1(x_in)
        enc2 = self.encoder2(outs[0])
        enc3 = self.encoder3(outs[1])
        enc4 = self.encoder4(outs[2])
        enc_hidden = self.encoder5(outs[3])
        dec3 = self.decoder5(enc_hidden, enc4)
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        dec0 = self.decoder2(dec1, enc1)
        return self.out(self.decoder1(dec0))
