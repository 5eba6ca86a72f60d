"""The deploy form of a trained network: what leaves the repository (TorchScript, ONNX).

Every BFR kernel is folded into its effective kernel ``W * M`` (:func:`networks.bfr.switch_to_deploy`)
and every depthwise convolution of this repository becomes a plain ``nn.Conv3d`` holding the same weights:
no FFT, no frequency prior, no module or setting of this repository left inside. The result computes the
training-form network's function with PyTorch's native convolution.
"""

from __future__ import annotations

import copy

from torch import nn

from networks.bfr import BFRConv3d, switch_to_deploy
from networks.dwconv import DepthwiseConv3d

__all__ = ["deploy_form", "repository_modules"]


def _native(conv: DepthwiseConv3d) -> nn.Conv3d:
    plain = nn.Conv3d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        padding=conv.padding,
        groups=conv.groups,
        bias=conv.bias is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    plain.load_state_dict(conv.state_dict())
    return plain


def deploy_form(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in evaluation mode, BFR folded and every depthwise convolution a native
    ``nn.Conv3d`` (``model`` itself is left as it is). Its state dict equals ``model``'s."""
    deployed = switch_to_deploy(copy.deepcopy(model))
    if isinstance(deployed, DepthwiseConv3d):
        deployed = _native(deployed)
    for parent in list(deployed.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DepthwiseConv3d):
                setattr(parent, name, _native(child))
    return deployed.eval().requires_grad_(False)


def repository_modules(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that only this repository can run (BFR or FFT convolutions);
    empty for a deploy form."""
    return [
        name or type(model).__name__ for name, m in model.named_modules() if isinstance(m, BFRConv3d | DepthwiseConv3d)
    ]
