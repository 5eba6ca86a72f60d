"""Bayesian frequency re-parameterization (BFR) of large 3D kernels.

RepUX-Net trains each large depthwise kernel through ``W_eff = W * M``, where ``W`` is the trainable
parameter and ``M`` is the Bayesian frequency prior: ``M = alpha / (d + alpha)``, ``d`` the Euclidean
distance of a kernel element to the kernel centre. Because the convolution sees ``W * M``, autograd
hands ``W`` the gradient ``M * dL/dW_eff``: the spatial prior rescales every kernel element's gradient,
with any optimizer or training loop.

Checkpoints always hold the effective kernel ``W * M`` under the plain convolution's key, which is what
published RepUX-Net checkpoints hold and what the deploy-mode network (a plain convolution) uses.
"""

from __future__ import annotations

import torch
from torch import nn

from networks.dwconv import DepthwiseConv3d
from networks.layers import replace_layers

__all__ = ["BFRConv3d", "ReparameterizedConv3d", "centre_distance", "frequency_prior", "switch_to_deploy"]


def centre_distance(kernel_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The Euclidean distance in voxels of each element of a cubic kernel to its centre, ``(ks, ks, ks)`` in
    float64 (which keeps a prior computed from it exact to the last bit of the target dtype)."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
        raise ValueError(f"kernel_size must be a positive integer, got {kernel_size!r}")
    offsets = torch.arange(kernel_size, dtype=torch.float64, device=device) - (kernel_size - 1) / 2
    return torch.sqrt(offsets[:, None, None] ** 2 + offsets[None, :, None] ** 2 + offsets[None, None, :] ** 2)


def frequency_prior(
    kernel_size: int,
    alpha: float = 1.0,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bayesian frequency matrix of a cubic 3D kernel.

    Args:
        kernel_size: edge length ``ks`` of the kernel; the result has shape ``(ks, ks, ks)``.
        alpha: the prior's scale ``a`` (> 0); larger values flatten the prior towards 1.
        dtype: dtype of the result (the default floating dtype when None).
        device: device of the result.

    Returns:
        ``M[i, j, k] = alpha / (d + alpha)`` with ``d`` the Euclidean distance in voxels from
        ``(i, j, k)`` to the kernel centre: 1 at the centre, decreasing towards the corners.
    """
    distance = centre_distance(kernel_size, device)
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha!r}")
    prior = alpha / (distance + alpha)
    return prior.to(dtype or torch.get_default_dtype())


class ReparameterizedConv3d(DepthwiseConv3d):
    """A depthwise convolution trained through a re-parameterized kernel: ``kernel()`` computes the kernel the
    convolution applies from the parameters, inside the autograd graph (so the parameters get the gradient
    the re-parameterization prescribes and keep their identity). Its deploy form is a plain depthwise
    convolution holding that kernel (:meth:`to_conv3d`)."""

    def kernel(self) -> torch.Tensor:
        raise NotImplementedError

    def to_conv3d(self) -> DepthwiseConv3d:
        """The deploy form of this layer: a plain depthwise convolution holding the kernel it applies."""
        conv = DepthwiseConv3d(
            self.in_channels,
            self.kernel_size[0],
            bias=self.bias is not None,
            algorithm=self.algorithm,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.kernel())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        conv.train(self.training)
        conv.requires_grad_(self.weight.requires_grad)
        return conv


class BFRConv3d(ReparameterizedConv3d):
    """A depthwise 3D convolution whose cubic kernel is trained through the Bayesian frequency prior.

    The trainable parameter ``weight`` is ``W``; every forward convolves with ``W * prior``. ``prior``
    is a non-persistent buffer, so it follows the module across ``.to()`` and never enters a checkpoint.
    ``state_dict()`` stores the effective kernel ``W * prior`` under ``weight`` and ``load_state_dict()``
    takes an effective kernel and sets ``W = K / prior``: checkpoints are interchangeable with a plain
    depthwise ``nn.Conv3d`` of the same shape.

    Args:
        channels: input and output channels.
        kernel_size: cubic kernel edge length (padding ``kernel_size // 2``).
        alpha: the prior's scale ``a`` (see :func:`frequency_prior`).
        bias: learn a bias.
        algorithm: convolution algorithm (see :mod:`networks.dwconv`); None follows the process setting.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        alpha: float = 1.0,
        bias: bool = True,
        algorithm: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(channels, kernel_size, bias=bias, algorithm=algorithm, device=device, dtype=dtype)
        self.alpha = float(alpha)
        prior = frequency_prior(kernel_size, alpha, dtype=self.weight.dtype, device=self.weight.device)
        self.register_buffer("prior", prior, persistent=False)

    @property
    def effective_weight(self) -> torch.Tensor:
        """The kernel the convolution applies, ``W * prior`` (differentiable w.r.t. ``W``)."""
        return self.weight * self.prior

    def kernel(self) -> torch.Tensor:
        return self.effective_weight

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        effective = self.effective_weight
        destination[prefix + "weight"] = effective if keep_vars else effective.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "weight"
        kernel = state_dict.get(key)
        if isinstance(kernel, torch.Tensor) and kernel.shape == self.weight.shape:
            # Module.load_state_dict hands each module its own copy of the mapping, so the
            # caller's dict is untouched.
            state_dict[key] = kernel / self.prior.to(kernel.device, kernel.dtype)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def switch_to_deploy(module: nn.Module) -> nn.Module:
    """Replace every re-parameterized convolution inside ``module`` (BFR's, Rep3D's learned prior) by its plain
    depthwise deploy form.

    The network computes the same function afterwards. Its state dict is unchanged for BFR, which holds the
    effective kernel already; a learned prior's generator is dropped once its mask is folded into the
    kernel. Returns ``module`` (converted in place; a bare layer is returned converted).
    """
    return replace_layers(module, ReparameterizedConv3d, ReparameterizedConv3d.to_conv3d)
