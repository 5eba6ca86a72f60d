"""The deploy form of a trained network: what leaves the repository (TorchScript, ONNX).

Every depthwise convolution of this repository becomes a plain ``nn.Conv3d`` holding the kernel it applies:
a BFR layer's effective kernel ``W * M`` (what its state dict holds), a Rep3D layer's ``W * M`` with its learned
mask (its generator dropped once folded): no FFT, no prior, no generator, no module or setting of this
repository left inside. The result computes the
training-form network's function with PyTorch's native convolution.
"""

from __future__ import annotations

import copy

from torch import nn

from networks.bfr import switch_to_deploy
from networks.dwconv import DepthwiseConv3d
from networks.layers import replace_layers

__all__ = ["deploy_form", "repository_modules"]


def _native(conv: DepthwiseConv3d) -> nn.Conv3d:
    """A plain ``nn.Conv3d`` with ``conv``'s shape and state dict."""
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
    """A copy of ``model`` in evaluation mode, its re-parameterized kernels folded and every depthwise
    convolution a native ``nn.Conv3d`` (``model`` itself is left as it is). Its state dict equals ``model``'s
    but for a learned prior's (Rep3D's): its kernel folded, its generator gone."""
    deployed = replace_layers(switch_to_deploy(copy.deepcopy(model)), DepthwiseConv3d, _native)
    return deployed.eval().requires_grad_(False)


def repository_modules(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that only this repository can run (its depthwise convolutions, BFR
    ones included); empty for a deploy form."""
    return [name or type(model).__name__ for name, m in model.named_modules() if isinstance(m, DepthwiseConv3d)]
