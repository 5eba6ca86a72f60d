"""Rep3D: the learned prior trains (gradients, identities, determinism), folds into a plain kernel for deploy,
the published block's choices fail as the issue says (shown on an independent rewrite of its logic), and
the network trains in the registry."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from torch import nn

from networks import build_network, frequency_prior
from networks.deploy import deploy_form, repository_modules
from networks.dwconv import DepthwiseConv3d
from networks.Rep3D.network_backbone import REP3D
from networks.Rep3D.rep3d_encoder import LearnedPriorConv3d, distance_prior
from optimizers import build_optimizer

GENERATOR = ("prior_conv.weight", "prior_conv.bias", "norm_w.weight", "norm_w.bias", "prior_conv2.weight")
GENERATOR += ("prior_conv2.bias", "norm_w2.weight", "norm_w2.bias")


def learned_convs(model):
    return [m for m in model.modules() if isinstance(m, LearnedPriorConv3d)]


def test_distance_prior_against_its_formula():
    ks, beta = 7, 1.7
    prior = distance_prior(ks, beta, dtype=torch.float64)
    for i, j, k in [(0, 0, 0), (3, 3, 3), (1, 5, 6), (6, 2, 3)]:
        d = math.sqrt((i - 3) ** 2 + (j - 3) ** 2 + (k - 3) ** 2)
        assert abs(float(prior[i, j, k]) - 1 / (1 + d**beta)) < 1e-12
    # beta 1: RepUX-Net's Bayesian frequency prior with alpha 1 (the README's beta / (d + beta))
    torch.testing.assert_close(distance_prior(21), frequency_prior(21, 1.0))
    with pytest.raises(ValueError, match="beta must be positive"):
        distance_prior(5, 0)


def test_gradients_reach_w_and_every_generator_parameter():
    conv = LearnedPriorConv3d(3, 5)
    x = torch.randn(2, 3, 8, 8, 8)
    conv(x).square().sum().backward()
    grads = dict(conv.named_parameters())
    assert set(GENERATOR) | {"weight"} == set(grads)
    for name, parameter in grads.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_the_kernel_is_w_times_m_and_w_gets_m_times_the_kernels_gradient():
    torch.manual_seed(1)
    conv = LearnedPriorConv3d(2, 5, scale_init=0.3)
    x = torch.randn(1, 2, 7, 7, 7)
    mask = conv.mask().detach()
    assert mask.shape == (5, 5, 5)
    kernel = (conv.weight * mask).detach().requires_grad_(True)
    expected = F.conv3d(x, kernel, padding=2, groups=2)
    output = conv(x)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    output.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(conv.weight.grad, kernel.grad * mask, rtol=1e-5, atol=1e-6)


def test_parameters_keep_their_identity_and_two_forwards_agree():
    torch.manual_seed(0)
    model = build_network("REP3D", 1, 3, **TINY).eval()
    before = {name: id(p) for name, p in model.named_parameters()}
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    x = torch.randn(1, 1, 32, 32, 32)
    first, second = model(x), model(x)
    assert torch.equal(first, second)
    assert before == {name: id(p) for name, p in model.named_parameters()}
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())


def test_the_mask_starts_at_the_prior_and_the_generator_learns():
    torch.manual_seed(0)
    model = build_network("REP3D", 1, 3, **TINY)
    convs = learned_convs(model)
    assert len(convs) == 4
    for conv in convs:
        assert float((conv.mask() - conv.prior).detach().abs().max()) < 1e-5
    optimizer = build_optimizer(model, "AdamW", lr=1e-2)
    x, target = torch.randn(2, 1, 32, 32, 32), torch.randint(0, 3, (2, 32, 32, 32))
    for _ in range(5):
        optimizer.zero_grad()
        F.cross_entropy(model(x), target).backward()
        optimizer.step()
    moved = [float((conv.mask() - conv.prior).detach().abs().mean()) for conv in convs]
    assert all(value > 1e-3 for value in moved), moved


def test_the_generator_follows_the_models_learning_rate():
    model = build_network("REP3D", 1, 3, **TINY)
    optimizer = build_optimizer(model, "AdamW", lr=3e-4)
    in_groups = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    generator = [p for conv in learned_convs(model) for name, p in conv.named_parameters() if name != "weight"]
    assert generator and all(in_groups[id(p)] == 3e-4 for p in generator)


def test_the_deploy_form_equals_the_training_form_and_holds_no_generator():
    torch.manual_seed(0)
    model = build_network("REP3D", 2, 3, **TINY, layer_scale_init_value=0.5)
    for conv in learned_convs(model):  # a generator away from its start
        nn.init.normal_(conv.prior_conv.weight, std=0.2)
    model.eval()
    x = torch.randn(1, 2, 32, 32, 32)
    expected = model(x)
    deployed = deploy_form(model)
    assert not repository_modules(deployed)
    assert not any("prior_conv" in key or "norm_w" in key for key in deployed.state_dict())
    torch.testing.assert_close(deployed(x), expected, rtol=1e-5, atol=1e-5)
    plain = REP3D(2, 3, deploy=True, **TINY).eval()
    plain.load_state_dict(deployed.state_dict())
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)
    model.switch_to_deploy()
    assert not learned_convs(model) and model.deploy
    assert all(type(m) is DepthwiseConv3d for m in model.modules() if isinstance(m, DepthwiseConv3d))
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_a_checkpoint_holds_w_and_the_generator_and_restores_the_function():
    torch.manual_seed(0)
    model = build_network("REP3D", 1, 3, **TINY, layer_scale_init_value=0.2).eval()
    state = model.state_dict()
    assert "rep3d.stages.0.0.dwconv.weight" in state and "rep3d.stages.0.0.dwconv.prior_conv2.weight" in state
    assert not any(key.endswith(".prior") for key in state)  # the prior is rebuilt, never stored
    torch.testing.assert_close(state["rep3d.stages.0.0.dwconv.weight"], learned_convs(model)[0].weight.detach())
    torch.manual_seed(1)
    other = build_network("REP3D", 1, 3, **TINY).eval()
    other.load_state_dict(state)
    x = torch.randn(1, 1, 32, 32, 32)
    assert torch.equal(other(x), model(x))


def test_wrong_arguments_are_refused():
    with pytest.raises(ValueError, match="drop_path_rate must be 0 for Rep3D"):
        REP3D(drop_path_rate=0.1, **TINY)
    with pytest.raises(ValueError, match="beta"):
        REP3D(beta=0, **TINY)
    with pytest.raises(ValueError, match="generator_kernel must be a positive odd integer"):
        LearnedPriorConv3d(2, 5, generator_kernel=4)


# The published block's generator and forward, rewritten from the description in leeh43/Rep3D's
# rep3d_encoder.py (not imported: the repository is not a dependency).
class PublishedChannelsLastLayerNorm(nn.Module):
    """The published LayerNorm over the last (channel) axis, of one channel."""

    def __init__(self) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(1)), nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return F.layer_norm(x, (1,), self.weight, self.bias, 1e-6)


def published_correction(prior, conv1, norm1, conv2, norm2):
    """The generator's output f(P); the published mask is ``prior + f(P)``."""
    hidden = norm1(conv1(prior).permute(0, 2, 3, 4, 1))
    hidden = torch.sigmoid(hidden.permute(0, 4, 1, 2, 3))
    hidden = norm2(conv2(hidden).permute(0, 2, 3, 4, 1))
    return hidden.permute(0, 4, 1, 2, 3)


def test_the_published_padding_makes_the_mask_larger_than_the_kernel():
    ks, channels = 21, 2
    prior = distance_prior(ks)[None, None].repeat(channels, 1, 1, 1, 1)
    norms = PublishedChannelsLastLayerNorm(), PublishedChannelsLastLayerNorm()
    correction = published_correction(
        prior, nn.Conv3d(1, 1, 7, padding=3), norms[0], nn.Conv3d(1, 1, 7, padding=7), norms[1]
    )
    assert correction.shape[2:] == (29, 29, 29)  # 21 + 2 * 7 - 6
    with pytest.raises(RuntimeError, match="must match"):  # the first forward's M = P + f(P)
        prior + correction


def test_the_published_normalisation_makes_the_generator_a_constant_without_gradient():
    ks = 9
    prior = distance_prior(ks)[None, None]
    conv1, conv2 = nn.Conv3d(1, 1, 7, padding=3), nn.Conv3d(1, 1, 7, padding=3)  # the padding mended
    norm1, norm2 = PublishedChannelsLastLayerNorm(), PublishedChannelsLastLayerNorm()
    with torch.no_grad():
        norm2.bias.fill_(0.25)
    correction = published_correction(prior, conv1, norm1, conv2, norm2)
    # over one channel, (x - mean) is 0: the output is the bias, whatever the generator's input
    torch.testing.assert_close(correction, torch.full_like(prior, 0.25))
    (prior + correction).sum().backward()
    for module in (conv1, conv2, norm1):
        assert all(p.grad is None or not p.grad.any() for p in module.parameters())
    assert float(norm2.weight.grad.abs()) < 1e-3  # the normalised value is 0 up to rounding
    # ours, normalised over the kernel's positions: the correction varies over the kernel and trains
    ours = LearnedPriorConv3d(1, ks, scale_init=1.0)
    correction = ours.mask() - ours.prior
    assert float(correction.detach().std()) > 0.1
    correction.square().sum().backward()
    assert ours.prior_conv.weight.grad.abs().sum() > 0


def test_the_published_parameter_wrapping_loses_the_gradient_and_compounds_the_mask():
    conv = nn.Conv3d(2, 2, 3, padding=1, groups=2, bias=False)
    optimizer_parameter = conv.weight
    original = conv.weight.detach().clone()
    mask = torch.full((1, 1, 3, 3, 3), 0.5)
    for _ in range(2):  # the published forward: a new Parameter holding W * M each time
        conv.weight = nn.Parameter(conv.weight * mask)
        conv(torch.randn(1, 2, 4, 4, 4)).sum().backward()
    assert optimizer_parameter.grad is None  # what the optimizer steps never receives a gradient
    torch.testing.assert_close(conv.weight.detach(), original * 0.25)  # M applied twice


def test_rep3d_trains_through_the_registry_and_its_flags():
    from networks import overrides_from_flags

    overrides = overrides_from_flags("rep3d", feat_size=(4, 8, 16, 32), kernel_size=5, hidden_size=32)
    model = build_network("REP3D", 1, 2, depths=(1, 1, 1, 1), **overrides)
    assert model.ks == 5 and model.feat_size == (4, 8, 16, 32)
    optimizer = build_optimizer(model, "AdamW", lr=1e-3)
    x, target = torch.randn(1, 1, 32, 32, 32), torch.randint(0, 2, (1, 32, 32, 32))
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
