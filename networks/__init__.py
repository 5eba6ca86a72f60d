"""Segmentation networks of the RepUX-Net benchmark, built by name through one registry.

``build_network("REPUXNET", in_channels=1, out_channels=5)`` returns the paper's RepUX-Net; overrides
replace constructor arguments of the published configuration.

Each network is registered by the path of its class and imported when first built, and the BFR names are
imported when first used: ``import networks`` and :func:`available_networks` need no PyTorch (the
scripts' ``--help`` lists the networks in well under a second).
"""

import importlib

from networks.registry import (
    NetworkSpec,
    available_networks,
    build_network,
    canonical_name,
    get_spec,
    overrides_from_flags,
    register_network,
    replace_head,
)

__all__ = [
    "BFRConv3d",
    "NetworkSpec",
    "REP3D",
    "REPUXNET",
    "UXNET",
    "available_networks",
    "build_network",
    "canonical_name",
    "frequency_prior",
    "get_spec",
    "overrides_from_flags",
    "register_network",
    "replace_head",
    "switch_to_deploy",
]

#: The names this package gives from its modules, each imported when first used (PEP 562).
_LAZY = {
    "BFRConv3d": "networks.bfr",
    "frequency_prior": "networks.bfr",
    "switch_to_deploy": "networks.bfr",
    "REPUXNET": "networks.RepUXNet_3D.network_backbone",
    "REP3D": "networks.Rep3D.network_backbone",
    "UXNET": "networks.UXNet_3D.network_backbone",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'networks' has no attribute {name!r}")


UX_FLAGS = {"feat_size": "feat_size", "kernel_size": "ks", "hidden_size": "hidden_size"}
# Their bottleneck is 1/16 of the input, instance-normalised: 16 would leave it a single voxel.
register_network(
    "REPUXNET",
    NetworkSpec(
        "networks.RepUXNet_3D.network_backbone:REPUXNET", "in_chans", "out_chans", min_input=32, flag_args=UX_FLAGS
    ),
)
register_network(
    "3DUXNET",
    NetworkSpec("networks.UXNet_3D.network_backbone:UXNET", "in_chans", "out_chans", min_input=32, flag_args=UX_FLAGS),
)
# The published benchmark's configurations for 96^3 patches.
register_network(
    "UNETR",
    NetworkSpec(
        "monai.networks.nets:UNETR",
        defaults=dict(
            img_size=(96, 96, 96),
            feature_size=16,
            hidden_size=768,
            mlp_dim=3072,
            num_heads=12,
            proj_type="perceptron",
            norm_name="instance",
            res_block=True,
            dropout_rate=0.0,
        ),
        flag_args={"roi_size": "img_size"},  # its position embedding is fixed to one input size
        any_size_export=False,
    ),
)
# Its deepest map is 1/32 of the input. Its window padding and attention masks are computed from the input
# shape in Python: a trace holds those of the ROI.
register_network(
    "SwinUNETR",
    NetworkSpec(
        "monai.networks.nets:SwinUNETR",
        defaults=dict(feature_size=48, use_checkpoint=False),
        input_multiple=32,
        min_input=64,
        any_size_export=False,
    ),
)
# The published benchmark's nnFormer: crop 96^3, embedding 192, depths 2,2,2,2, heads 6,12,24,48,
# patch 2,4,4, windows 4,4,8,4 (the constructor's defaults); 149.27 M parameters at 5 classes.
register_network(
    "nnFormer",
    NetworkSpec(
        "networks.nnFormer.nnformer:nnFormer",
        input_multiple=32,
        flag_args={"roi_size": "crop_size"},
        any_size_export=False,
    ),
)
# The published benchmark's TransBTS: image 96, patch 8, embedding 512, 8 heads, 4 layers, MLP 4096.
register_network(
    "TransBTS",
    NetworkSpec(
        "networks.TransBTS.transbts:TransBTS",
        input_multiple=8,
        flag_args={"roi_size": "img_size", "hidden_size": "embedding_dim"},
        any_size_export=False,
    ),
)
# nnU-Net's default plan for 96^3 patches: 31.18 M parameters at 5 classes (the paper's table: 31.2 M).
register_network(
    "nnUNet",
    NetworkSpec(
        "monai.networks.nets:DynUNet",
        defaults=dict(
            spatial_dims=3,
            kernel_size=[3] * 6,
            strides=[1, 2, 2, 2, 2, 2],
            upsample_kernel_size=[2] * 5,
            filters=[32, 64, 128, 256, 320, 320],
            norm_name="instance",
            deep_supervision=False,
        ),
        head="output_block",
        input_multiple=32,
        min_input=64,  # instance norm at 1/32 of the input
    ),
)


def _new_unet_head(model, out_channels: int) -> None:
    # The top up-sampling block of MONAI's UNet ends in out_channels, residual unit included: take it from
    # a UNet of the same settings built for out_channels.
    from monai.networks.nets import UNet

    settings = ("channels", "strides", "kernel_size", "up_kernel_size", "num_res_units", "act", "norm", "dropout")
    fresh = UNet(
        spatial_dims=model.dimensions,
        in_channels=model.in_channels,
        out_channels=out_channels,
        bias=model.bias,
        adn_ordering=model.adn_ordering,
        **{name: getattr(model, name) for name in settings},
    )
    model.model[2] = fresh.model[2]
    model.out_channels = out_channels


# The published TRAINING.md lists these without a configuration: MONAI's defaults (SegResNet) and the
# MONAI tutorials' 3D U-Net.
register_network(
    "SegResNet",
    NetworkSpec("monai.networks.nets:SegResNet", defaults=dict(spatial_dims=3), head="conv_final", input_multiple=8),
)
register_network(
    "UNet",
    NetworkSpec(
        "monai.networks.nets:UNet",
        defaults=dict(spatial_dims=3, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2),
        input_multiple=16,
        min_input=32,  # instance norm at 1/16 of the input
        head="model.2",
        new_head=_new_unet_head,
    ),
)
# The authors' follow-up (leeh43/Rep3D): RepUX-Net's layout with a learned prior.
register_network(
    "REP3D",
    NetworkSpec("networks.Rep3D.network_backbone:REP3D", "in_chans", "out_chans", min_input=32, flag_args=UX_FLAGS),
)
