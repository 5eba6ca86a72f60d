"""3D RepUX-Net (Lee et al., MICCAI 2023), with the published constructor and state-dict layout."""

from __future__ import annotations

from collections.abc import Sequence

from networks.bfr import switch_to_deploy
from networks.RepUXNet_3D.repuxnet_encoder import RepUXNetEncoder
from networks.unetr_decoder import HierarchicalEncoderUNETRDecoder, check_ux_arguments

__all__ = ["REPUXNET"]


class REPUXNET(HierarchicalEncoderUNETRDecoder):
    """3D RepUX-Net: a RepUX-Net encoder (``repuxnet_3d``) and the 3D UX-Net decoder.

    Each encoder block trains its ``ks``^3 depthwise kernel ``W`` through the Bayesian frequency prior
    ``M`` (the convolution uses ``W * M``); checkpoints hold ``W * M`` under ``...dwconv.weight``, as
    published checkpoints do. Inputs must have spatial sizes that are multiples of 16.

    Args:
        in_chans: input channels.
        out_chans: output channels (segmentation classes, background included).
        depths: blocks in each of the four encoder stages.
        feat_size: channels of the four encoder stages; the output head takes ``feat_size[0]``.
        ks: depthwise kernel size (odd; 21 in the paper).
        a: alpha of the Bayesian frequency prior ``a / (d + a)``.
        drop_path_rate: published argument; must be 0 (RepUX-Net blocks have no residual to drop).
        layer_scale_init_value: published argument, unused: RepUX-Net blocks have no layer scale.
        hidden_size: channels of the decoder bottleneck.
        norm_name: MONAI normalisation of the decoder blocks.
        conv_block: published argument, unused by the published network too.
        res_block: residual decoder blocks.
        spatial_dims: must be 3.
        deploy: build the inference network (plain depthwise convolutions holding the effective kernels).
        bfr: train the kernels through the prior (False: plain large kernels, the paper's ablation).
    """

    def __init__(
        self,
        in_chans: int = 1,
        out_chans: int = 13,
        depths: Sequence[int] = (2, 2, 2, 2),
        feat_size: Sequence[int] = (48, 96, 192, 384),
        ks: int = 21,
        a: float = 1.0,
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        hidden_size: int = 768,
        norm_name: tuple | str = "instance",
        conv_block: bool = True,
        res_block: bool = True,
        spatial_dims: int = 3,
        deploy: bool = False,
        bfr: bool = True,
    ) -> None:
        check_ux_arguments(in_chans, out_chans, depths, feat_size, hidden_size, ks, spatial_dims)
        if drop_path_rate != 0:
            raise ValueError(
                f"drop_path_rate must be 0 for RepUX-Net (its blocks have no residual branch), got {drop_path_rate!r}"
            )
        if not a > 0:
            raise ValueError(f"a (alpha of the frequency prior) must be positive, got {a!r}")
        encoder = RepUXNetEncoder(in_chans, depths, feat_size, ks=ks, a=a, bfr=bfr, deploy=deploy)
        super().__init__(
            "repuxnet_3d", encoder, in_chans, out_chans, feat_size, hidden_size, norm_name, res_block, spatial_dims
        )
        self.depths, self.ks, self.a, self.bfr, self.deploy = tuple(depths), ks, a, bfr, deploy

    def switch_to_deploy(self) -> REPUXNET:
        """Turn this trained network into its deploy form in place; outputs and state dict are unchanged."""
        switch_to_deploy(self)
        self.deploy = True
        return self
