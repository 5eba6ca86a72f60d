"""Depthwise 3D convolution with large kernels: native or FFT-based, chosen per device and shape.

``depthwise_conv3d(x, weight, bias, padding)`` computes exactly what
``F.conv3d(x, weight, bias, padding=padding, groups=C)`` computes (stride 1, dilation 1), with forward and
gradients of input, weight and bias. For large kernels it multiplies spectra instead: the cost no longer
grows with ``k^3``, and the native CPU backward of a 21^3 depthwise kernel, which is what makes RepUX-Net
slow to train, is avoided. The FFT path computes in float32 (float64 for float64 inputs), also under autocast,
and returns the dtype a convolution would (the autocast dtype inside autocast).

The choice is automatic (:func:`choose_algorithm`) and can be forced with :func:`set_algorithm`, the
``algorithm`` argument, or the ``REPUXNET_DWCONV`` environment variable (``auto``, ``native``, ``fft``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from scipy.fft import next_fast_len
from torch import nn

__all__ = [
    "ALGORITHMS",
    "DepthwiseConv3d",
    "choose_algorithm",
    "depthwise_conv3d",
    "fft_depthwise_conv3d",
    "full_kernels",
    "get_algorithm",
    "set_algorithm",
    "use_algorithm",
]

ALGORITHMS = ("auto", "native", "fft")


def _checked(algorithm: str, what: str = "depthwise convolution algorithm") -> str:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"{what} must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    return algorithm


_skip_padding_taps = True
_algorithm = _checked(os.environ.get("REPUXNET_DWCONV", "auto").lower(), "REPUXNET_DWCONV")

# Smallest kernel edge for which the FFT path is used, per device type. CPU: measured (BENCHMARKS.md: the
# FFT path is 3-27x faster from k=5 on, on par at k=3). CUDA: a conservative choice not yet measured here.
FFT_MIN_KERNEL = {"cpu": 5, "cuda": 11}


def set_algorithm(algorithm: str) -> None:
    """Set the process-wide algorithm: ``auto`` (per device and shape), ``native`` or ``fft``."""
    global _algorithm
    _algorithm = _checked(algorithm)


def get_algorithm() -> str:
    """The process-wide algorithm setting."""
    return _algorithm


@contextlib.contextmanager
def use_algorithm(algorithm: str) -> Iterator[None]:
    """Context manager forcing ``algorithm`` inside its block."""
    previous = get_algorithm()
    set_algorithm(algorithm)
    try:
        yield
    finally:
        set_algorithm(previous)


@contextlib.contextmanager
def full_kernels() -> Iterator[None]:
    """Inside this block, convolve with every kernel tap, as ``nn.Conv3d`` does (no skipping of taps that
    only meet padding): for measuring the published way and for nominal operation counts."""
    global _skip_padding_taps
    previous, _skip_padding_taps = _skip_padding_taps, False
    try:
        yield
    finally:
        _skip_padding_taps = previous


def choose_algorithm(x: torch.Tensor, kernel_size: tuple[int, int, int], algorithm: str | None = None) -> str:
    """``native`` or ``fft`` for input ``x`` and a kernel of ``kernel_size``: ``algorithm`` when it names
    one, else (``auto``, or None for the process-wide setting) by device and kernel size."""
    algorithm = _checked(algorithm or _algorithm)
    if algorithm != "auto":
        return algorithm
    threshold = FFT_MIN_KERNEL.get(x.device.type)
    return "fft" if threshold is not None and min(kernel_size) >= threshold else "native"


def _crop_to_reach(
    weight: torch.Tensor, padding: tuple[int, ...], spatial: tuple[int, ...]
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Drop the kernel taps that only ever meet zero padding (a 21^3 kernel on a 6^3 map uses 11^3 of
    its taps), with the padding that keeps the output the same. Their gradient is zero either way."""
    slices, new_padding = [slice(None), slice(None)], []
    for k, p, n in zip(weight.shape[2:], padding, spatial, strict=True):
        out = n + 2 * p - k + 1
        first, last = max(0, p - out + 1), min(k - 1, p + n - 1)
        if out < 1 or first > last:
            return weight, padding
        slices.append(slice(first, last + 1))
        new_padding.append(p - first)
    return weight[tuple(slices)], tuple(new_padding)


def fft_depthwise_conv3d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, int, int]
) -> torch.Tensor:
    """FFT form of a stride-1 depthwise cross-correlation with zero padding (see module docstring)."""
    device_type = x.device.type
    # Return what a convolution would: the autocast dtype inside autocast, else the input's dtype.
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    kernel = weight.shape[2:]
    spatial = x.shape[2:]
    out_shape = [n + 2 * p - k + 1 for n, p, k in zip(spatial, padding, kernel, strict=True)]
    # A linear (not circular) convolution needs transforms of at least n + k - 1 points.
    lengths = [next_fast_len(n + k - 1, real=True) for n, k in zip(spatial, kernel, strict=True)]
    # float32 at least: half-precision FFTs are restricted and inaccurate; float64 stays float64.
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=device_type, enabled=False):
        signal = x.to(compute)
        flipped = weight.to(compute).flip((2, 3, 4))[:, 0]  # C x k x k x k: correlation = convolution with the flip
        spectrum = torch.fft.rfftn(signal, s=lengths, dim=(2, 3, 4)) * torch.fft.rfftn(
            flipped, s=lengths, dim=(1, 2, 3)
        )
        full = torch.fft.irfftn(spectrum, s=lengths, dim=(2, 3, 4))
        starts = [k - 1 - p for k, p in zip(kernel, padding, strict=True)]
        out = full[
            :,
            :,
            starts[0] : starts[0] + out_shape[0],
            starts[1] : starts[1] + out_shape[1],
            starts[2] : starts[2] + out_shape[2],
        ]
        if bias is not None:
            out = out + bias.to(compute).view(1, -1, 1, 1, 1)
    return out.to(dtype)


def depthwise_conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    padding: int | tuple[int, int, int] = 0,
    algorithm: str | None = None,
) -> torch.Tensor:
    """Depthwise 3D convolution (stride 1, zero padding): ``F.conv3d(x, weight, bias, padding, groups=C)``.

    Args:
        x: input ``(N, C, D, H, W)``.
        weight: kernels ``(C, 1, kd, kh, kw)``.
        bias: ``(C,)`` or None.
        padding: zero padding per side (an int or one per spatial axis).
        algorithm: ``native``, ``fft`` or ``auto``; None follows the process-wide setting.
    """
    if x.ndim != 5 or weight.ndim != 5 or weight.shape[1] != 1 or weight.shape[0] != x.shape[1]:
        raise ValueError(
            f"depthwise_conv3d expects x (N, C, D, H, W) and weight (C, 1, k, k, k), got {tuple(x.shape)} "
            f"and {tuple(weight.shape)}"
        )
    padding = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
    if _skip_padding_taps:
        weight, padding = _crop_to_reach(weight, padding, tuple(x.shape[2:]))
    if choose_algorithm(x, tuple(weight.shape[2:]), algorithm) == "fft":
        return fft_depthwise_conv3d(x, weight, bias, padding)
    return F.conv3d(x, weight, bias, padding=padding, groups=x.shape[1])


class DepthwiseConv3d(nn.Conv3d):
    """``nn.Conv3d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)`` computed by
    :func:`depthwise_conv3d`: same parameters, state dict and results, fast for large kernels.

    Args:
        channels: input and output channels.
        kernel_size: cubic kernel edge length.
        bias: learn a bias.
        algorithm: ``native``, ``fft``, ``auto``, or None for the process-wide setting.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        bias: bool = True,
        algorithm: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            channels,
            channels,
            kernel_size,
            padding=kernel_size // 2,
            groups=channels,
            bias=bias,
            device=device,
            dtype=dtype,
        )
        self.algorithm = algorithm if algorithm is None else _checked(algorithm)

    def kernel(self) -> torch.Tensor:
        """The kernel the convolution applies."""
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv3d(x, self.kernel(), self.bias, self.padding, self.algorithm)
