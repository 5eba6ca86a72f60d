"""``checkpoint_last.pth``: everything needed to continue a run exactly where it stopped."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.common import LAST_CHECKPOINT, UsageError, save_torch
from networks import BFRConv3d

__all__ = ["load_checkpoint", "resolve_resume", "restore_training_state", "save_checkpoint"]

FORMAT_VERSION = 1


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
) -> None:
    """Write the run's state atomically: model (published state-dict format, plus the raw BFR kernels
    ``W`` so that training resumes bit for bit), optimizer, schedule, scaler, progress, RNG states."""
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


def resolve_resume(resume: str | None, output: Path) -> Path | None:
    """The checkpoint ``--resume`` names: a path, ``auto`` (``<output>/checkpoint_last.pth`` when it
    exists, else a fresh start with a note), or None."""
    if not resume:
        return None
    if resume == "auto":
        path = output / LAST_CHECKPOINT
        if not path.is_file():
            print(f"note: --resume auto: no {LAST_CHECKPOINT} in {output}; starting a new run")
            return None
        return path
    path = Path(resume)
    if not path.is_file():
        raise UsageError(f"--resume {path}: no such file")
    return path


def restore_training_state(
    checkpoint: dict,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
) -> dict:
    """Load a checkpoint into the run's objects and RNGs; returns its progress dict."""
    model.load_state_dict(checkpoint["model"], strict=True)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, weight in checkpoint.get("bfr_raw_weights", {}).items():
            modules[name].weight.copy_(weight)
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    scaler.load_state_dict(checkpoint["scaler"])
    set_rng_states(checkpoint["rng"])
    return dict(checkpoint["progress"])
