"""Rep3D (Lee et al., leeh43/Rep3D): RepUX-Net's layout with a learned prior, the published constructor."""

from __future__ import annotations

from collections.abc import Sequence

from networks.bfr import switch_to_deploy
from networks.Rep3D.rep3d_encoder import Rep3DEncoder
from networks.unetr_decoder import HierarchicalEncoderUNETRDecoder, check_ux_arguments

__all__ = ["REP3D"]


class REP3D(HierarchicalEncoderUNETRDecoder):
    """Rep3D: a Rep3D encoder (``rep3d``) and the 3D UX-Net decoder, as published.

    Each encoder block applies its ``ks``^3 depthwise kernel ``W`` as ``W * M`` with the learned mask
    ``M = P + f(P)`` (``networks.Rep3D.rep3d_encoder``: what was changed from the published code and why).
    Checkpoints hold ``W`` and the generators; the deploy form (:meth:`switch_to_deploy`, ``deploy=True``)
    holds plain depthwise kernels ``W * M``. Inputs must have spatial sizes that are multiples of 16.

    Args:
        in_chans: input channels.
        out_chans: output channels (segmentation classes, background included).
        depths: blocks in each of the four encoder stages.
        feat_size: channels of the four encoder stages; the output head takes ``feat_size[0]`` (published:
            48 whatever ``feat_size``).
        ks: depthwise kernel size (odd; 21 as published).
        a: published argument, unused by the published network too (its prior is ``1 / (1 + d^beta)``).
        drop_path_rate: published argument; must be 0 (Rep3D blocks have no residual to drop).
        layer_scale_init_value: the initial scale of each generator's output (published argument, unused
            there), so that ``M`` starts at ``P``.
        hidden_size: channels of the decoder bottleneck.
        norm_name: MONAI normalisation of the decoder blocks.
        conv_block: published argument, unused by the published network too.
        res_block: residual decoder blocks.
        spatial_dims: must be 3.
        deploy: build the inference network (plain depthwise convolutions holding ``W * M``).
        beta: exponent of the distance prior (1 as published).
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
        beta: float = 1.0,
    ) -> None:
        check_ux_arguments(in_chans, out_chans, depths, feat_size, hidden_size, ks, spatial_dims)
        if drop_path_rate != 0:
            raise ValueError(
                f"drop_path_rate must be 0 for Rep3D (its blocks have no residual branch), got {drop_path_rate!r}"
            )
        if not beta > 0:
            raise ValueError(f"beta (exponent of the distance prior) must be positive, got {beta!r}")
        encoder = Rep3DEncoder(
            in_chans, depths, feat_size, ks=ks, beta=beta, scale_init=layer_scale_init_value, deploy=deploy
        )
        super().__init__(
            "rep3d", encoder, in_chans, out_chans, feat_size, hidden_size, norm_name, res_block, spatial_dims
        )
        self.depths, self.ks, self.beta, self.deploy = tuple(depths), ks, beta, deploy

    def switch_to_deploy(self) -> REP3D:
        """Fold each block's ``W * M`` into a plain depthwise kernel, in place (the generators are dropped);
        the outputs are unchanged."""
        switch_to_deploy(self)
        self.deploy = True
        return self
