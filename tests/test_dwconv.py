"""The depthwise large-kernel convolution: equivalence with native conv3d, gradients, algorithm choice."""

import pytest
import torch
import torch.nn.functional as F

import networks.dwconv as dwconv
from engine.common import native_bf16_cpu
from networks import build_network
from networks.dwconv import DepthwiseConv3d, choose_algorithm, depthwise_conv3d, set_algorithm, use_algorithm


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def forward_backward(algorithm, x, weight, bias, padding, autocast=False):
    x, weight, bias = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = depthwise_conv3d(x, weight, bias, padding, algorithm)
    # a non-uniform upstream gradient, so every gradient element is exercised
    upstream = torch.linspace(-1, 1, y.numel()).view_as(y)
    (y.float() * upstream).sum().backward()
    return y, x.grad, weight.grad, bias.grad


@pytest.mark.parametrize("kernel", [3, 7, 21])
@pytest.mark.parametrize("size", [(9, 10, 11), (14, 13, 12)])
def test_fft_matches_native_conv3d_forward_and_gradients(kernel, size):
    torch.manual_seed(kernel)
    x = torch.randn(2, 3, *size)
    weight, bias = torch.randn(3, 1, kernel, kernel, kernel), torch.randn(3)
    native = forward_backward("native", x, weight, bias, kernel // 2)
    torch.testing.assert_close(native[0], F.conv3d(x, weight, bias, padding=kernel // 2, groups=3))
    fft = forward_backward("fft", x, weight, bias, kernel // 2)
    for name, ours, reference in zip(("output", "input grad", "weight grad", "bias grad"), fft, native, strict=True):
        assert ours.shape == reference.shape
        assert relative_error(ours, reference) <= 1e-5, name


def test_even_kernel_and_asymmetric_padding():
    x, weight, bias = torch.randn(2, 2, 8, 9, 10), torch.randn(2, 1, 4, 4, 4), torch.randn(2)
    for padding in (2, (1, 2, 0)):
        reference = F.conv3d(x, weight, bias, padding=padding, groups=2)
        ours = depthwise_conv3d(x, weight, bias, padding, "fft")
        assert ours.shape == reference.shape and relative_error(ours, reference) <= 1e-5


def test_bf16_autocast_matches_within_bf16_precision():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 4, 12, 13, 12), torch.randn(4, 1, 7, 7, 7), torch.randn(4)
    reference = forward_backward("native", x, weight, bias, 3)
    # PyTorch's own bf16 convolution is less exact where oneDNN has no bf16 kernels (AVX2 CPUs: its input
    # gradient 3.7e-2 from float32, against 1.8e-2 on the FFT path), so it is held to a looser bound
    for algorithm, bound in (("fft", 2e-2), ("native", 2e-2 if native_bf16_cpu() else 5e-2)):
        result = forward_backward(algorithm, x, weight, bias, 3, autocast=True)
        assert result[0].dtype == torch.bfloat16  # what a convolution returns under autocast
        parts = ("output", "input grad", "weight grad", "bias grad")
        for name, ours, expected in zip(parts, result, reference, strict=True):
            assert relative_error(ours, expected) <= bound, (algorithm, name)
    # the FFT path itself computes in float32: its output is exact up to the final bf16 rounding
    fft = forward_backward("fft", x, weight, bias, 3, autocast=True)
    assert relative_error(fft[0], reference[0]) <= 4e-3


def test_gradcheck_float64():
    x = torch.randn(1, 2, 5, 6, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 1, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w, b: depthwise_conv3d(a, w, b, 1, "fft"), (x, weight, bias))


def test_algorithm_can_be_forced_both_ways(monkeypatch):
    calls = []
    fft = dwconv.fft_depthwise_conv3d
    monkeypatch.setattr(dwconv, "fft_depthwise_conv3d", lambda *args: calls.append("fft") or fft(*args))
    conv = DepthwiseConv3d(2, 21)
    x = torch.randn(1, 2, 8, 8, 8)
    assert choose_algorithm(x, (21, 21, 21)) == "fft" and choose_algorithm(x, (3, 3, 3)) == "native"
    conv(x)
    assert calls == ["fft"]
    with use_algorithm("native"):
        assert choose_algorithm(x, (21, 21, 21)) == "native"
        conv(x)
    assert calls == ["fft"]
    with use_algorithm("fft"):
        depthwise_conv3d(x, torch.randn(2, 1, 3, 3, 3), None, 1)
    assert calls == ["fft", "fft"]
    native_conv = DepthwiseConv3d(2, 21, algorithm="native")
    native_conv(x)
    assert calls == ["fft", "fft"]  # the module's own choice wins over the process setting
    with pytest.raises(ValueError, match="algorithm must be one of auto, native, fft"):
        set_algorithm("winograd")
    with pytest.raises(ValueError, match="expects x"):
        depthwise_conv3d(x, torch.randn(3, 1, 3, 3, 3))


def test_repuxnet_with_fast_convolution_loads_a_native_state_dict():
    kwargs = dict(depths=(1, 1, 1, 1), feat_size=(4, 8, 16, 32), hidden_size=16, ks=7)
    with use_algorithm("native"):
        native = build_network("REPUXNET", 1, 3, **kwargs).eval()
        x = torch.randn(1, 1, 32, 32, 32)
        with torch.no_grad():
            expected = native(x)
    fast = build_network("REPUXNET", 1, 3, **kwargs).eval()
    fast.load_state_dict(native.state_dict(), strict=True)
    with use_algorithm("fft"), torch.no_grad():
        assert relative_error(fast(x), expected) <= 1e-4


@pytest.mark.parametrize("algorithm", ["native", "fft"])
def test_kernel_larger_than_the_input(algorithm):
    """Taps that only meet padding are skipped; results and all gradients are unchanged (zero for them)."""
    torch.manual_seed(1)
    x, weight, bias = torch.randn(2, 3, 4, 5, 6), torch.randn(3, 1, 21, 21, 21), torch.randn(3)
    reference = (x.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_())
    y = F.conv3d(*reference, padding=10, groups=3)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    ours = forward_backward(algorithm, x, weight, bias, 10)
    assert relative_error(ours[0], y) <= 1e-5
    for grad, expected in zip(ours[1:], (t.grad for t in reference), strict=True):
        assert grad.shape == expected.shape and relative_error(grad, expected) <= 1e-5
    assert ours[2][:, :, 0].abs().max() == 0  # an outer tap never meets the input
