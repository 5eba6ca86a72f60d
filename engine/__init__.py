"""The engine behind the three scripts: flags -> dataset and registry network -> training or inference.

``run_training`` (main_train.py, main_finetune.py) and ``run_inference`` (test_seg.py).
"""

from engine.common import (
    BEST_WEIGHTS,
    LAST_CHECKPOINT,
    RunStopped,
    UsageError,
    autocast_for,
    load_weights,
    model_card_path,
    select_device,
)
from engine.infer import run_inference
from engine.stitching import stitching_device
from engine.train import run_training
from engine.validation import foreground_dice, summarise_scores, validation_scores

__all__ = [
    "BEST_WEIGHTS",
    "LAST_CHECKPOINT",
    "RunStopped",
    "UsageError",
    "autocast_for",
    "foreground_dice",
    "load_weights",
    "model_card_path",
    "run_inference",
    "run_training",
    "select_device",
    "stitching_device",
    "summarise_scores",
    "validation_scores",
]
