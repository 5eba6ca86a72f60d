"""``checkpoint_last.pth``: everything needed to continue a run exactly where it stopped."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dataset.description import card_preprocessing
from engine.common import BEST_WEIGHTS, LAST_CHECKPOINT, UsageError, as_json, save_torch
from networks import BFRConv3d

__all__ = [
    "APPLIED_ON_RESUME",
    "CARD_KEPT_ON_RESUME",
    "REFUSED_ON_RESUME",
    "check_resumed_run",
    "load_checkpoint",
    "recorded_flags",
    "resolve_resume",
    "restore_training_state",
    "save_checkpoint",
]

FORMAT_VERSION = 1

#: Model card entries a resumed run must share with its checkpoint (the model, its preprocessing, its
#: mirroring, its foreground crops, its regions and a union's loss rule; the channels' names may change, not
#: their count or normalisation). A card without ``pseudo_labels`` trained without them.
CARD_KEPT_ON_RESUME = (
    "network",
    "network_args",
    "network_plugin",
    "in_channels",
    "out_channels",
    "roi_size",
    "spacing",
    "normalization",
    "mirror_axes",
    "lateral_pairs",
    "foreground_crops",
    "regions",
    "regions_class_order",
    "unannotated",
    "pseudo_labels",
)

#: Training flags a checkpoint records. A resumed run refuses other values of these: the exact replay
#: depends on them (data order and augmentation: seed, batch_size, crop_sample, fold) or the saved state
#: does (optimizer and schedule state).
REFUSED_ON_RESUME = (
    "seed",
    "batch_size",
    "crop_sample",
    "fold",
    "num_folds",
    "optim",
    "lr_schedule",
    "warmup_iter",
    "select",
)
#: ... and applies other values of these from the resumed step on, saying so (flag: what then changes).
APPLIED_ON_RESUME = {
    "lr": "the schedule takes it as its base rate from the resumed step on",
    "max_iter": "the run and its learning-rate schedule end there",
    "eval_step": "validation follows it from the resumed step on",
    "max_bad_steps": "the bound on non-finite steps in a row follows it",
    "amp": "the resumed steps run in that precision",
    "patience": "the early stop counts validations without a better selection score against it",
}
#: The value of a flag that checkpoints from before it existed trained with.
FLAG_DEFAULTS = {"select": "best", "patience": None}


def _rates(scheduler: torch.optim.lr_scheduler.LRScheduler) -> list[float]:
    """The rates of the schedule's current step for its base rates: what ``get_lr`` computes, without the
    warning it gives outside ``step()`` (the constant schedule is a LambdaLR, the other has ``lr_at``)."""
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        pairs = zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
        return [lr * factor(scheduler.last_epoch) for lr, factor in pairs]
    return [scheduler.lr_at(lr, scheduler.last_epoch, group) for group, lr in enumerate(scheduler.base_lrs)]


def rng_states() -> dict:
    """Python, NumPy, torch and CUDA random states, as tensors and plain values (``weights_only`` loads)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    states = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    progress: dict,
    card: dict,
    flags: dict | None = None,
) -> None:
    """Write the run's state atomically: model (published state-dict format, plus the raw BFR kernels
    ``W`` so that training resumes bit for bit), optimizer, schedule, scaler, progress (with the count of
    non-finite steps in a row), RNG states, the model card and the training flags."""
    raw_bfr = {name: module.weight.detach() for name, module in model.named_modules() if isinstance(module, BFRConv3d)}
    save_torch(
        {
            "format": FORMAT_VERSION,
            "model": model.state_dict(),
            "bfr_raw_weights": raw_bfr,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "progress": dict(progress),
            "rng": rng_states(),
            "card": card,
            "flags": flags,
        },
        path,
    )


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; a clear UsageError for anything else."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise UsageError(f"--resume {path}: cannot read the checkpoint ({type(error).__name__}: {error})") from None
    keys = {"format", "model", "optimizer", "scheduler", "scaler", "progress", "rng", "card"}
    if not isinstance(checkpoint, dict) or not keys <= set(checkpoint):
        raise UsageError(f"--resume {path}: not a training checkpoint (checkpoint_last.pth of this repository)")
    if checkpoint["format"] != FORMAT_VERSION:
        raise UsageError(f"--resume {path}: checkpoint format {checkpoint['format']}, expected {FORMAT_VERSION}")
    return checkpoint


def resolve_resume(resume: str | None, output: Path, overwrite: bool = False) -> Path | None:
    """The checkpoint ``--resume`` names: a path, ``auto`` (``<output>/checkpoint_last.pth`` when it
    exists; else a fresh start with a note, unless the folder holds the best weights of a run that cannot
    be continued and ``overwrite`` is not set), or None."""
    if not resume:
        return None
    if resume == "auto":
        path = output / LAST_CHECKPOINT
        if path.is_file():
            return path
        if (output / BEST_WEIGHTS).exists() and not overwrite:
            raise UsageError(
                f"--resume auto: {output} holds {BEST_WEIGHTS} but no {LAST_CHECKPOINT}, so its run cannot be "
                "continued; pass --overwrite to start over there, or choose another --output"
            )
        print(f"note: --resume auto: no {LAST_CHECKPOINT} in {output}; starting a new run")
        return None
    path = Path(resume)
    if not path.is_file():
        raise UsageError(f"--resume {path}: no such file")
    return path


def recorded_flags(args) -> dict:
    """The training flags a checkpoint records (see :data:`REFUSED_ON_RESUME`, :data:`APPLIED_ON_RESUME`)."""
    return {name: getattr(args, name) for name in (*REFUSED_ON_RESUME, *APPLIED_ON_RESUME)}


def check_resumed_run(checkpoint: dict, card: dict, args, resume: Path) -> list[str]:
    """Check a resumed run against its checkpoint: a UsageError naming every model card entry
    (:data:`CARD_KEPT_ON_RESUME`) and every flag whose change is refused; otherwise the notes (one line each)
    of the flag changes that are applied."""
    # A checkpoint from before mirroring was recorded mirrored nothing, so its pairs swapped nothing either;
    # one from before foreground_crops centred on voxels.
    before = {"mirror_axes": [], "lateral_pairs": card["lateral_pairs"], "foreground_crops": "voxels"}
    saved_card = {"in_channels": 1, **before, **checkpoint["card"], **card_preprocessing(checkpoint["card"])}
    saved_card = {k: as_json(saved_card.get(k)) for k in CARD_KEPT_ON_RESUME}
    current_card = {k: as_json(card.get(k)) for k in CARD_KEPT_ON_RESUME}
    differing = [
        f"{k} {saved_card[k]} (flags: {current_card[k]})" for k in saved_card if saved_card[k] != current_card[k]
    ]
    if differing:
        remedies = []
        if saved_card["mirror_axes"] != current_card["mirror_axes"]:
            remedies.append(f"pass --mirror_axes {','.join(map(str, saved_card['mirror_axes'])) or 'none'}")
        if saved_card["foreground_crops"] != current_card["foreground_crops"]:
            remedies.append(f"pass --foreground_crops {saved_card['foreground_crops']}")
        if saved_card["pseudo_labels"] != current_card["pseudo_labels"]:
            threshold = "false" if saved_card["pseudo_labels"] is None else saved_card["pseudo_labels"]
            remedies.append(f'give the union JSON "pseudo_labels": {threshold}')
        hint = f"; {' and '.join(remedies)} to continue it as it was trained" if remedies else ""
        raise UsageError(f"--resume {resume}: the checkpoint is of another model or data: {'; '.join(differing)}{hint}")
    saved = checkpoint.get("flags")
    if saved is None:
        return [f"note: --resume {resume}: the checkpoint records no training flags; they are not checked"]
    current, saved = recorded_flags(args), {**FLAG_DEFAULTS, **saved}
    refused = [
        f"--{n} {current[n]} (checkpoint: {saved.get(n)})" for n in REFUSED_ON_RESUME if current[n] != saved.get(n)
    ]
    if refused:
        raise UsageError(
            f"--resume {resume}: {'; '.join(refused)}: a resumed run keeps these flags, which its data order, "
            "augmentation and optimizer state depend on; pass the checkpoint's values or start a new run"
        )
    return [
        f"note: --{n} {current[n]} (checkpoint: {saved.get(n)}): applied: {what}"
        for n, what in APPLIED_ON_RESUME.items()
        if current[n] != saved.get(n)
    ]


def restore_training_state(
    checkpoint: dict,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    lr: Sequence[float] | None = None,
    max_iter: int | None = None,
) -> dict:
    """Load a checkpoint into the run's objects and RNGs; returns its progress dict. ``lr`` and
    ``max_iter``: new base learning rates (one per optimizer group) and a new end of the schedule (one that
    has an end), applied from the checkpoint's step on."""
    model.load_state_dict(checkpoint["model"], strict=True)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, weight in checkpoint.get("bfr_raw_weights", {}).items():
            modules[name].weight.copy_(weight)
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler_state = dict(checkpoint["scheduler"])
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):  # older checkpoints: a hand-written constant
        scheduler_state.setdefault("lr_lambdas", [None] * len(optimizer.param_groups))
    scheduler.load_state_dict(scheduler_state)
    if lr is not None and scheduler.base_lrs != list(lr):
        scheduler.base_lrs = list(lr)
        for group, base, value in zip(optimizer.param_groups, lr, _rates(scheduler), strict=True):
            group["initial_lr"], group["lr"] = base, value
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    if max_iter is not None and hasattr(scheduler, "max_iter"):
        scheduler.max_iter = max_iter
    if checkpoint["scaler"] and scaler.is_enabled():  # a run without fp16 saves an empty scaler state
        scaler.load_state_dict(checkpoint["scaler"])
    set_rng_states(checkpoint["rng"])
    progress = {"nonfinite_in_a_row": 0, "first_nonfinite": 0}  # absent from older checkpoints
    return {**progress, **checkpoint["progress"]}
