"""Optimizer and learning-rate schedule factories."""

import math

import pytest
import torch
from torch import nn

from optimizers import build_optimizer, build_scheduler


def test_published_defaults():
    model = nn.Linear(3, 2)
    optimizer = build_optimizer(model)
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.defaults["lr"] == 1e-4 and optimizer.defaults["weight_decay"] == 0.01
    assert build_optimizer(model, "adam").defaults["weight_decay"] == 0
    sgd = build_optimizer(model, "SGD", lr=0.1, weight_decay=1e-4, momentum=0.9)
    assert type(sgd) is torch.optim.SGD
    assert (sgd.defaults["lr"], sgd.defaults["weight_decay"], sgd.defaults["momentum"]) == (0.1, 1e-4, 0.9)


def test_only_trainable_parameters_are_optimised():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    model[0].requires_grad_(False)
    optimizer = build_optimizer(model)
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in model[1].parameters()]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="Lion"), r"unknown optimizer 'Lion'; choose one of: Adam, AdamW, SGD"),
        (dict(lr=0), "lr must be positive"),
        (dict(weight_decay=-1.0), "weight_decay"),
    ],
)
def test_optimizer_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_optimizer(nn.Linear(2, 2), **kwargs)


def test_constant_schedule_keeps_the_rate():
    optimizer = build_optimizer(nn.Linear(2, 2), lr=3e-4)
    scheduler = build_scheduler(optimizer)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 3e-4


def test_warmup_cosine_values():
    optimizer = build_optimizer(nn.Linear(2, 2), lr=1.0)
    scheduler = build_scheduler(optimizer, "warmup_cosine", max_iter=110, warmup_iter=10, min_lr=0.1)
    rates = []
    for _ in range(120):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == 0.0 and rates[5] == pytest.approx(0.5) and rates[10] == pytest.approx(1.0)
    assert rates[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert rates[110] == pytest.approx(0.1) and rates[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(rates[10:-1], rates[11:], strict=True))


def _two_groups(lr: float = 1.0):
    head, encoder = nn.Linear(2, 2), nn.Linear(2, 2)
    return build_optimizer([{"params": head.parameters()}, {"params": encoder.parameters(), "lr": lr / 10}], lr=lr)


def _rates(optimizer, scheduler, steps: int) -> list[list[float]]:
    rates = []
    for _ in range(steps):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return rates


def test_frozen_start_holds_the_frozen_group_then_starts_the_schedule():
    optimizer = _two_groups()
    scheduler = build_scheduler(
        optimizer, "warmup_cosine", max_iter=30, warmup_iter=10, start_iter=10, frozen_groups=(1,)
    )
    rates = _rates(optimizer, scheduler, 32)
    assert rates[:10] == [[1.0, 0.0]] * 10  # frozen: the head at its base rate, the encoder still
    assert rates[10] == [0.0, 0.0] and rates[15] == pytest.approx([0.5, 0.05])  # the warm-up starts at step 10
    assert rates[20] == pytest.approx([1.0, 0.1]) and rates[25] == pytest.approx([0.5, 0.05])  # cosine to step 30
    assert rates[30] == pytest.approx([0.0, 0.0])
    constant = _two_groups()
    rates = _rates(constant, build_scheduler(constant, start_iter=3, frozen_groups=(1,)), 5)
    assert rates == [[1.0, 0.0]] * 3 + [[1.0, 0.1]] * 2
    with pytest.raises(ValueError, match="warmup_iter must be in"):
        build_scheduler(_two_groups(), "warmup_cosine", max_iter=30, warmup_iter=10, start_iter=20)


def test_schedule_state_restores_exactly():
    def make():
        torch.manual_seed(0)
        model = nn.Linear(2, 2)
        optimizer = build_optimizer(model, lr=1e-2)
        return model, optimizer, build_scheduler(optimizer, "warmup_cosine", max_iter=20, warmup_iter=5)

    def train(model, optimizer, scheduler, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            model(torch.ones(1, 2)).sum().backward()
            optimizer.step()
            scheduler.step()

    reference = make()
    train(*reference, 12)
    first = make()
    train(*first, 7)
    saved = (first[1].state_dict(), first[2].state_dict())
    resumed = make()
    resumed[1].load_state_dict(saved[0])
    resumed[2].load_state_dict(saved[1])
    resumed[0].load_state_dict(first[0].state_dict())
    train(*resumed, 5)
    assert resumed[1].param_groups[0]["lr"] == reference[1].param_groups[0]["lr"]
    torch.testing.assert_close(resumed[0].weight, reference[0].weight, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="step"), "unknown learning-rate schedule 'step'"),
        (dict(name="warmup_cosine"), "needs max_iter"),
        (dict(name="warmup_cosine", max_iter=10, warmup_iter=10), "warmup_iter"),
    ],
)
def test_schedule_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_scheduler(build_optimizer(nn.Linear(2, 2)), **kwargs)
