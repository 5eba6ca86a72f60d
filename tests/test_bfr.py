"""Bayesian frequency re-parameterization: the prior, the W * M rule, checkpoints and deploy."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from torch import nn

from networks import BFRConv3d, build_network, frequency_prior, switch_to_deploy
from networks.dwconv import DepthwiseConv3d, use_algorithm
from networks.RepUXNet_3D.network_backbone import REPUXNET


def bfr_convs(model):
    return [m for m in model.modules() if isinstance(m, BFRConv3d)]


def test_frequency_prior_values():
    prior = frequency_prior(21)
    assert prior.shape == (21, 21, 21)
    assert prior[10, 10, 10] == 1.0
    # corner: distance 10 * sqrt(3) from the centre
    torch.testing.assert_close(prior[0, 0, 0], torch.tensor(1 / (1 + 10 * 3**0.5)), rtol=1e-6, atol=0)
    assert abs(prior[0, 0, 0].item() - 0.0546) < 1e-4
    # a face neighbour of the centre: distance 1
    torch.testing.assert_close(prior[10, 10, 11], torch.tensor(0.5))
    for dims in [(0,), (1,), (2,)]:
        assert torch.equal(prior, prior.flip(dims))
    assert torch.equal(prior, prior.permute(1, 2, 0))
    assert torch.equal(prior, prior.permute(0, 2, 1))
    assert (prior > 0).all() and (prior <= 1).all()


def test_frequency_prior_alpha_and_brute_force():
    alpha, ks = 2.5, 5
    prior = frequency_prior(ks, alpha, dtype=torch.float64)
    c = (ks - 1) / 2
    for i, j, k in [(0, 0, 0), (1, 3, 4), (2, 2, 2), (4, 0, 2)]:
        d = ((i - c) ** 2 + (j - c) ** 2 + (k - c) ** 2) ** 0.5
        assert prior[i, j, k].item() == pytest.approx(alpha / (d + alpha), rel=1e-12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kernel_size=0), "kernel_size"),
        (dict(kernel_size=3.0), "kernel_size"),
        (dict(kernel_size=3, alpha=0), "alpha"),
        (dict(kernel_size=3, alpha=-1.0), "alpha"),
    ],
)
def test_frequency_prior_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        frequency_prior(**kwargs)


def test_prior_is_a_non_persistent_buffer():
    conv = BFRConv3d(3, 5)
    assert "prior" in dict(conv.named_buffers())
    assert set(conv.state_dict()) == {"weight", "bias"}
    assert [name for name, _ in conv.named_parameters()] == ["weight", "bias"]


def test_conv_uses_w_times_m_and_state_dict_holds_it():
    conv = BFRConv3d(3, 5)
    x = torch.randn(2, 3, 8, 8, 8)
    expected = F.conv3d(x, conv.weight * frequency_prior(5), conv.bias, padding=2, groups=3)
    torch.testing.assert_close(conv(x), expected)
    torch.testing.assert_close(conv.state_dict()["weight"], conv.weight.detach() * frequency_prior(5))


def test_load_takes_effective_kernel_and_leaves_callers_dict_alone():
    conv = BFRConv3d(2, 5)
    kernel = torch.randn(2, 1, 5, 5, 5)
    state = {"weight": kernel, "bias": torch.zeros(2)}
    conv.load_state_dict(state)
    assert state["weight"] is kernel
    torch.testing.assert_close(conv.weight.detach(), kernel / frequency_prior(5))
    torch.testing.assert_close(conv.effective_weight.detach(), kernel)
    torch.testing.assert_close(conv.state_dict()["weight"], kernel)


def test_load_reports_shape_mismatch():
    conv = BFRConv3d(2, 5)
    with pytest.raises(RuntimeError, match="size mismatch"):
        conv.load_state_dict({"weight": torch.randn(2, 1, 3, 3, 3), "bias": torch.zeros(2)})


def test_sgd_moves_effective_kernel_by_m_squared():
    """Under SGD the effective kernel W * M moves by M^2 times the plain step (W gets the gradient M * dL/dW_eff)."""
    bfr = BFRConv3d(2, 5, bias=False, dtype=torch.float64)
    plain = nn.Conv3d(2, 2, 5, padding=2, groups=2, bias=False).double()
    plain.load_state_dict(bfr.state_dict())
    x = torch.randn(1, 2, 9, 9, 9, dtype=torch.float64)
    target = torch.randn(1, 2, 9, 9, 9, dtype=torch.float64)
    steps = {}
    for name, conv in (("bfr", bfr), ("plain", plain)):
        before = conv.state_dict()["weight"].clone()
        optimizer = torch.optim.SGD(conv.parameters(), lr=0.1)
        F.mse_loss(conv(x), target).backward()
        optimizer.step()
        steps[name] = conv.state_dict()["weight"] - before
    prior = frequency_prior(5, dtype=torch.float64)
    torch.testing.assert_close(steps["bfr"], prior**2 * steps["plain"], rtol=1e-10, atol=1e-14)


def tiny_repux(**kwargs):
    return REPUXNET(in_chans=1, out_chans=3, **{**TINY, **kwargs})


def test_kernel_gradient_is_m_times_deploy_gradient():
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # a float64 prior, not a float32 one cast up
    try:
        model, deploy = tiny_repux(), tiny_repux(deploy=True)
    finally:
        torch.set_default_dtype(default_dtype)
    deploy.load_state_dict(model.state_dict())
    x = torch.randn(1, 1, 32, 32, 32, dtype=torch.float64)
    target = torch.randn(1, 3, 32, 32, 32, dtype=torch.float64)
    for net in (model, deploy):
        F.mse_loss(net(x), target).backward()
    names = [n for n, _ in model.named_parameters() if n.endswith("dwconv.weight")]
    assert len(names) == 4
    params, deploy_params = dict(model.named_parameters()), dict(deploy.named_parameters())
    prior = frequency_prior(TINY["ks"], dtype=torch.float64)
    for name in names:
        torch.testing.assert_close(params[name].grad, prior * deploy_params[name].grad, rtol=1e-9, atol=1e-12)
    # every other parameter sees the same gradient in both forms
    for name, param in params.items():
        if name not in names:
            torch.testing.assert_close(param.grad, deploy_params[name].grad, rtol=1e-9, atol=1e-12)


def test_adamw_trains_the_periphery_and_evaluation_is_stable():
    """Published defect 1 (the kernel replaced and re-multiplied by M each forward) fails both checks."""
    model = tiny_repux()
    parameters_before = {n: id(p) for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    kernel_key = "repuxnet_3d.stages.0.0.dwconv.weight"
    initial = model.state_dict()[kernel_key].clone()
    x = torch.randn(1, 1, 32, 32, 32)
    target = torch.randint(0, 3, (1, 32, 32, 32))
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), target).backward()
        optimizer.step()
    assert {n: id(p) for n, p in model.named_parameters()} == parameters_before
    trained = model.state_dict()[kernel_key]
    periphery = torch.ones(5, 5, 5, dtype=torch.bool)
    periphery[1:-1, 1:-1, 1:-1] = False
    changed = (trained - initial).abs()[:, :, periphery]
    assert (changed > 1e-6).float().mean() > 0.9
    # AdamW with BFR moves an element by about M * lr per step: the corners move, and less than the centre
    assert changed.mean() > 0.2 * 3 * 1e-2 * frequency_prior(5)[0, 0, 0]
    model.eval()
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.equal(first, second)
    torch.testing.assert_close(model.state_dict()[kernel_key], trained, rtol=0, atol=0)


def test_round_trips_between_training_and_deploy_keep_outputs():
    model = tiny_repux().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm3d):  # non-trivial running statistics
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        reference = model(x)
        deploy = tiny_repux(deploy=True).eval()
        deploy.load_state_dict(model.state_dict(), strict=True)
        torch.testing.assert_close(deploy(x), reference, rtol=1e-5, atol=1e-6)
        back = tiny_repux().eval()
        back.load_state_dict(deploy.state_dict(), strict=True)
        torch.testing.assert_close(back(x), reference, rtol=1e-5, atol=1e-6)
        state_before = {k: v.clone() for k, v in model.state_dict().items()}
        assert model.switch_to_deploy() is model and model.deploy
        assert not bfr_convs(model)
        torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-6)
    state_after = model.state_dict()
    assert list(state_after) == list(state_before)
    for key, value in state_before.items():
        torch.testing.assert_close(state_after[key], value)


def test_switch_to_deploy_function_keeps_training_flags():
    conv = BFRConv3d(2, 3)
    conv.requires_grad_(False)
    plain = switch_to_deploy(conv)
    assert type(plain) is DepthwiseConv3d and isinstance(plain, nn.Conv3d) and not plain.weight.requires_grad
    torch.testing.assert_close(plain.weight, conv.effective_weight)


def test_published_checkpoint_computes_the_published_function():
    """A checkpoint holding effective kernels, evaluated by an independent functional re-implementation
    of the published deploy encoder, gives what our training-mode model computes after a strict load."""
    published = tiny_repux(deploy=True)
    state = {k: v.clone() for k, v in published.state_dict().items()}
    for key, value in state.items():
        if value.is_floating_point():
            state[key] = value + 0.05 * torch.randn_like(value)
        if key.endswith("running_var"):
            state[key] = value.abs() + 0.5
    model = tiny_repux().eval()
    model.load_state_dict(state, strict=True)

    def layer_norm(x, prefix):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + 1e-6)
        return state[prefix + ".weight"][:, None, None, None] * x + state[prefix + ".bias"][:, None, None, None]

    def published_encoder(x):
        p = "repuxnet_3d."
        outs = []
        for i in range(4):
            d = f"{p}downsample_layers.{i}."
            if i == 0:
                x = F.conv3d(x, state[d + "0.weight"], state[d + "0.bias"], stride=2, padding=3)
                x = layer_norm(x, d + "1")
            else:
                x = layer_norm(x, d + "0")
                x = F.conv3d(x, state[d + "1.weight"], state[d + "1.bias"], stride=2)
            b = f"{p}stages.{i}.0."
            channels = x.shape[1]
            x = F.conv3d(x, state[b + "dwconv.weight"], state[b + "dwconv.bias"], padding=2, groups=channels)
            x = F.batch_norm(
                x,
                state[b + "norm.running_mean"],
                state[b + "norm.running_var"],
                state[b + "norm.weight"],
                state[b + "norm.bias"],
                training=False,
                eps=1e-5,
            )
            x = F.gelu(x)
            outs.append(layer_norm(x, f"{p}norm{i}"))
        return outs

    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad(), use_algorithm("native"):  # the FFT path is compared with native in test_dwconv.py
        ours = model.repuxnet_3d(x)
        for a, b in zip(ours, published_encoder(x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        # the whole network: training form loaded from the checkpoint == deploy form loaded from it
        published.load_state_dict(state, strict=True)
        torch.testing.assert_close(model(x), published.eval()(x), rtol=1e-4, atol=1e-5)


def test_bfr_false_is_a_plain_large_kernel_network():
    model = tiny_repux(bfr=False)
    assert not bfr_convs(model)
    assert not any(name.endswith("prior") for name, _ in model.named_buffers())
    assert set(model.state_dict()) == set(tiny_repux().state_dict())


def test_to_dtype_and_device_moves_the_prior():
    model = tiny_repux().to(torch.float64)
    for conv in bfr_convs(model):
        assert conv.prior.dtype == torch.float64 and conv.weight.dtype == torch.float64
    out = model(torch.randn(1, 1, 32, 32, 32, dtype=torch.float64))
    assert out.dtype == torch.float64
    model = model.to(torch.bfloat16)
    assert all(conv.prior.dtype == torch.bfloat16 for conv in bfr_convs(model))
    state = model.state_dict()
    assert state["repuxnet_3d.stages.0.0.dwconv.weight"].dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_move_and_forward():
    model = tiny_repux().cuda()
    assert all(conv.prior.is_cuda for conv in bfr_convs(model))
    out = model(torch.randn(1, 1, 32, 32, 32, device="cuda"))
    out.mean().backward()
    cpu = tiny_repux()
    cpu.load_state_dict(model.state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x.cuda()).cpu(), cpu.eval()(x), rtol=1e-3, atol=1e-4)


def test_registry_builds_bfr_model_with_overrides():
    model = build_network("REPUXNET", 1, 2, **TINY, a=2.0)
    convs = bfr_convs(model)
    assert len(convs) == 4 and all(conv.alpha == 2.0 for conv in convs)
    torch.testing.assert_close(convs[0].prior, frequency_prior(5, 2.0))
    # Deep copies (EMA, best-model snapshots) are independent models with the same outputs.
    twin = copy.deepcopy(model).eval()
    model.eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))
        bfr_convs(twin)[0].weight.add_(1.0)
    assert not torch.equal(bfr_convs(twin)[0].weight, convs[0].weight)
    torch.testing.assert_close(bfr_convs(twin)[0].prior, convs[0].prior)
