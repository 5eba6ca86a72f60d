"""Learning-rate schedules stepped once per training iteration."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["WarmupCosineLR"]


class WarmupCosineLR(LRScheduler):
    """Linear warm-up from ``warmup_start_factor * lr`` to ``lr``, then cosine decay to ``min_lr``.

    The rate is a closed-form function of the step, so a restored ``state_dict`` continues exactly.

    Args:
        optimizer: the wrapped optimizer.
        max_iter: total number of iterations; the rate reaches ``min_lr`` here and stays there.
        warmup_iter: iterations of linear warm-up (0 for none).
        warmup_start_factor: fraction of the base rate at step 0 of the warm-up.
        min_lr: final learning rate.
        last_epoch: index of the last step taken (-1 to start fresh), as in torch schedulers.
        start_iter: a frozen start: before this step the groups of ``frozen_groups`` have rate 0 and the
            others their base rate; the warm-up and the decay begin here (and end at ``max_iter``).
        frozen_groups: indices of the optimizer's groups that the frozen start holds still.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        max_iter: int,
        warmup_iter: int = 0,
        warmup_start_factor: float = 0.0,
        min_lr: float = 0.0,
        last_epoch: int = -1,
        start_iter: int = 0,
        frozen_groups: Sequence[int] = (),
    ) -> None:
        if max_iter < 1:
            raise ValueError(f"max_iter must be at least 1, got {max_iter!r}")
        if not 0 <= start_iter < max_iter:
            raise ValueError(f"the frozen start must be in [0, max_iter={max_iter}), got {start_iter!r}")
        if not 0 <= warmup_iter < max_iter - start_iter:
            raise ValueError(
                f"warmup_iter must be in [0, max_iter={max_iter}{f' - {start_iter} frozen' * bool(start_iter)}), "
                f"got {warmup_iter!r}"
            )
        if not 0 <= warmup_start_factor <= 1:
            raise ValueError(f"warmup_start_factor must be in [0, 1], got {warmup_start_factor!r}")
        if min_lr < 0:
            raise ValueError(f"min_lr must be non-negative, got {min_lr!r}")
        self.max_iter = max_iter
        self.warmup_iter = warmup_iter
        self.warmup_start_factor = warmup_start_factor
        self.min_lr = min_lr
        self.start_iter = start_iter
        self.frozen_groups = tuple(frozen_groups)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr: float, step: int, group: int = 0) -> float:
        """The learning rate of group ``group``, of base rate ``base_lr``, at iteration ``step``."""
        if step < self.start_iter:
            return 0.0 if group in self.frozen_groups else base_lr
        step -= self.start_iter
        if step < self.warmup_iter:
            factor = self.warmup_start_factor + (1 - self.warmup_start_factor) * step / self.warmup_iter
            return base_lr * factor
        progress = min(1.0, (step - self.warmup_iter) / (self.max_iter - self.start_iter - self.warmup_iter))
        return self.min_lr + (base_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        return [self.lr_at(base_lr, self.last_epoch, group) for group, base_lr in enumerate(self.base_lrs)]
