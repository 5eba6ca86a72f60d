"""Optimizer and learning-rate schedule factories.

Both take only parameters and optimizers: nothing here knows about networks. BFR needs no optimizer
support: RepUX-Net's kernels receive the frequency-reweighted gradient through autograd.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from optimizers.lr_scheduler import WarmupCosineLR

__all__ = ["WarmupCosineLR", "build_optimizer", "build_scheduler", "OPTIMIZERS", "SCHEDULERS"]

#: Optimizer names (as the published ``--optim`` flag spells them) and their classes.
OPTIMIZERS: dict[str, type[Optimizer]] = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW, "SGD": torch.optim.SGD}
#: Schedule names accepted by :func:`build_scheduler`.
SCHEDULERS = ("constant", "warmup_cosine")


def _canonical(name: str, choices: Iterable[str], what: str) -> str:
    for choice in choices:
        if choice.lower() == str(name).lower():
            return choice
    raise ValueError(f"unknown {what} {name!r}; choose one of: {', '.join(choices)}")


def build_optimizer(
    model: nn.Module | Iterable[nn.Parameter],
    name: str = "AdamW",
    lr: float = 1e-4,
    weight_decay: float | None = None,
    **kwargs: Any,
) -> Optimizer:
    """Build the optimizer ``name`` over the trainable parameters of ``model``.

    Args:
        model: a module (its parameters that require gradients are optimised) or an iterable of
            parameters or parameter groups.
        name: ``"Adam"``, ``"AdamW"`` or ``"SGD"`` (case-insensitive).
        lr: learning rate (1e-4 as published).
        weight_decay: None keeps torch's default of the optimizer, as the published scripts do
            (0.01 for AdamW, 0 for Adam and SGD).
        **kwargs: further optimizer arguments (``betas``, ``momentum``, ``nesterov``...).
    """
    optimizer_class = OPTIMIZERS[_canonical(name, OPTIMIZERS, "optimizer")]
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if weight_decay is not None:
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay!r}")
        kwargs["weight_decay"] = weight_decay
    if isinstance(model, nn.Module):
        params: Iterable = [p for p in model.parameters() if p.requires_grad]
    else:
        params = list(model)
    if not params:
        raise ValueError("build_optimizer got no trainable parameters")
    return optimizer_class(params, lr=lr, **kwargs)


def _constant_factor(step: int) -> float:
    return 1.0


class FrozenStartFactor:
    """The constant schedule's factor of one group under a frozen start: 0 before ``start_iter`` for a
    ``frozen`` group, else 1 (a callable object, so that the schedule's state_dict records it)."""

    def __init__(self, start_iter: int, frozen: bool) -> None:
        self.start_iter, self.frozen = start_iter, frozen

    def __call__(self, step: int) -> float:
        return 0.0 if self.frozen and step < self.start_iter else 1.0


def build_scheduler(
    optimizer: Optimizer,
    name: str = "constant",
    max_iter: int | None = None,
    warmup_iter: int = 0,
    warmup_start_factor: float = 0.0,
    min_lr: float = 0.0,
    start_iter: int = 0,
    frozen_groups: Sequence[int] = (),
) -> LRScheduler:
    """Build a per-iteration learning-rate schedule; its ``state_dict`` saves and restores it.

    Args:
        optimizer: the optimizer whose rates it sets.
        name: ``"constant"`` (published) or ``"warmup_cosine"`` (linear warm-up, then cosine decay).
        max_iter: total iterations (required for ``warmup_cosine``).
        warmup_iter: warm-up iterations of ``warmup_cosine``.
        warmup_start_factor: fraction of the base rate at the first warm-up step.
        min_lr: final rate of ``warmup_cosine``.
        start_iter: a frozen start: the steps before it train only the groups not in ``frozen_groups`` (at
            their base rate); the schedule (its warm-up included) begins there.
        frozen_groups: indices of the optimizer's groups held still before ``start_iter``.
    """
    name = _canonical(name, SCHEDULERS, "learning-rate schedule")
    if start_iter < 0:
        raise ValueError(f"the frozen start must be non-negative, got {start_iter!r}")
    if name == "constant":  # the base rate at every step, a closed form as the warm-up + cosine one
        if not start_iter:
            return LambdaLR(optimizer, lr_lambda=_constant_factor)
        factors = [FrozenStartFactor(start_iter, i in frozen_groups) for i in range(len(optimizer.param_groups))]
        return LambdaLR(optimizer, lr_lambda=factors)
    if max_iter is None:
        raise ValueError("the warmup_cosine schedule needs max_iter")
    return WarmupCosineLR(optimizer, max_iter, warmup_iter, warmup_start_factor, min_lr, -1, start_iter, frozen_groups)
