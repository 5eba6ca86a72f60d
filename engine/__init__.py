"""The engine behind the scripts: flags -> dataset and registry network -> training, inference or export.

``run_training`` (main_train.py, main_finetune.py), ``run_inference`` (test_seg.py) and ``run_export``
(export.py). Each name is imported from its module when first used (PEP 562): a script parses its flags,
``--help`` included, before PyTorch and MONAI are loaded.
"""

import importlib

#: Each name of the engine and the module that defines it.
_NAMES = {
    "BEST_WEIGHTS": "engine.common",
    "LAST_CHECKPOINT": "engine.common",
    "RunStopped": "engine.common",
    "UsageError": "engine.common",
    "autocast_for": "engine.common",
    "load_weights": "engine.common",
    "model_card_path": "engine.common",
    "select_device": "engine.common",
    "run_export": "engine.export",
    "run_inference": "engine.infer",
    "stitching_device": "engine.stitching",
    "run_training": "engine.train",
    "foreground_dice": "engine.validation",
    "summarise_scores": "engine.validation",
    "validation_scores": "engine.validation",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
