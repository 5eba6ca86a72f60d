"""3D UX-Net (Lee et al., ICLR 2023), with the published constructor and state-dict layout."""

from __future__ import annotations

from collections.abc import Sequence

from networks.unetr_decoder import HierarchicalEncoderUNETRDecoder, check_ux_arguments
from networks.UXNet_3D.uxnet_encoder import UXNetEncoder

__all__ = ["UXNET"]


class UXNET(HierarchicalEncoderUNETRDecoder):
    """3D UX-Net: a 3D UX-Net encoder (``uxnet_3d``) and its UNETR-style decoder.

    Inputs must have spatial sizes that are multiples of 16.

    Args:
        in_chans: input channels.
        out_chans: output channels (segmentation classes, background included).
        depths: blocks in each of the four encoder stages.
        feat_size: channels of the four encoder stages; the output head takes ``feat_size[0]``.
        drop_path_rate: stochastic depth of the encoder blocks (linear over blocks up to this value).
        layer_scale_init_value: initial layer scale of the encoder blocks.
        hidden_size: channels of the decoder bottleneck.
        norm_name: MONAI normalisation of the decoder blocks.
        conv_block: published argument, unused by the published network too.
        res_block: residual decoder blocks.
        spatial_dims: must be 3.
        ks: depthwise kernel size (odd; 7 as published, 21 for the paper's "3D UX-Net (k=21)").
    """

    def __init__(
        self,
        in_chans: int = 1,
        out_chans: int = 13,
        depths: Sequence[int] = (2, 2, 2, 2),
        feat_size: Sequence[int] = (48, 96, 192, 384),
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        hidden_size: int = 768,
        norm_name: tuple | str = "instance",
        conv_block: bool = True,
        res_block: bool = True,
        spatial_dims: int = 3,
        ks: int = 7,
    ) -> None:
        check_ux_arguments(in_chans, out_chans, depths, feat_size, hidden_size, ks, spatial_dims)
        if not 0 <= drop_path_rate < 1:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
        encoder = UXNetEncoder(
            in_chans,
            depths,
            feat_size,
            ks=ks,
            drop_path_rate=drop_path_rate,
            layer_scale_init_value=layer_scale_init_value,
        )
        super().__init__(
            "uxnet_3d", encoder, in_chans, out_chans, feat_size, hidden_size, norm_name, res_block, spatial_dims
        )
        self.depths, self.ks = tuple(depths), ks
