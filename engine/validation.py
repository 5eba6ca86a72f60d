"""Validation during training: Dice of sliding-window predictions per case and class, and its summaries."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from engine.common import autocast_for
from engine.stitching import argmax_of_classes, stitched_slabs

__all__ = ["dice_per_class", "foreground_dice", "overlay_slice", "summarise_scores", "validation_scores"]


def validation_scores(
    model: nn.Module,
    loader,
    roi,
    sw_batch_size: int,
    num_classes: int,
    device: torch.device,
    amp: str | None = None,
    progress: bool = True,
    snapshot: dict | None = None,
    ignore_label: int | None = None,
    overlap: float = 0.25,
) -> torch.Tensor:
    """Per-case, per-class Dice (cases x classes, NaN where a class is absent from the label) of the
    argmax of sliding-window predictions, background included; ``0 x classes`` for a loader without
    cases. Nothing is gathered across processes: the caller collects every process's cases once. Voxels
    labelled ``ignore_label`` (nnU-Net's unannotated voxels) count in no class, predicted or expected.

    The windows are stitched slab by slab as in inference (:func:`engine.stitching.stitched_slabs`), each
    slab turned into labels at once: memory holds the label map, never every class's logits.

    With ``snapshot``, its ``"overlay"`` receives the first case's middle axial slice: image, image with
    label, image with prediction (H x W x 3, uint8)."""
    was_training = model.training
    model.eval()
    scores = [torch.empty(0, num_classes)]
    autocast = autocast_for(amp, device)
    with torch.no_grad():
        for batch in tqdm(loader, desc="Validate", dynamic_ncols=True, leave=False, disable=not progress):
            image, label = batch["image"], torch.as_tensor(batch["label"])[0, 0].long()
            prediction = torch.empty(label.shape, dtype=torch.uint8)
            slabs = stitched_slabs(image, model, roi, sw_batch_size, overlap, autocast, device, argmax_of_classes)
            for slab in slabs:
                prediction[..., slab.start : slab.stop] = slab.values.cpu()
            if snapshot is not None and len(scores) == 1:
                snapshot["overlay"] = overlay_slice(image[0, 0].numpy(), label.numpy(), prediction.numpy())
            scores.append(dice_per_class(prediction, label, num_classes, ignore_label)[None])
    model.train(was_training)
    return torch.cat(scores)


def dice_per_class(
    prediction: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_label: int | None = None
) -> torch.Tensor:
    """The Dice of each class between two label maps (NaN where the class is absent from ``label``, as
    MONAI's ``compute_dice``), from their joint counts; voxels labelled ``ignore_label`` left out."""
    prediction, label = prediction.reshape(-1).long(), label.reshape(-1).long()
    if ignore_label is not None:
        annotated = label != ignore_label
        prediction, label = prediction[annotated], label[annotated]
    joint = torch.bincount(label * num_classes + prediction, minlength=num_classes**2).reshape(num_classes, -1)
    truth, predicted = joint.sum(dim=1).double(), joint.sum(dim=0).double()
    dice = 2 * joint.diagonal().double() / (truth + predicted)
    return torch.where(truth > 0, dice, torch.nan).float()


def summarise_scores(scores: torch.Tensor) -> tuple[float, list[float]]:
    """The mean Dice over every (case, class) pair whose class is present in the label, background
    included, as the published training selects its best model; and the Dice of each class (mean over
    the cases where it is present)."""
    return float(torch.nanmean(scores)), torch.nanmean(scores, dim=0).tolist()


def foreground_dice(scores: torch.Tensor) -> float:
    """The mean Dice over the (case, class) pairs of the foreground classes (background left out), as
    test_seg.py's evaluation reports it."""
    return float(torch.nanmean(scores[:, 1:]))


# Distinct colours for label values 1, 2, ... (value 0 is background).
PALETTE = np.array(
    [
        [0, 0, 0],
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
        [0, 128, 128],
        [220, 190, 255],
        [170, 110, 40],
        [255, 250, 200],
        [128, 0, 0],
    ],
    dtype=np.float32,
)


def overlay_slice(image: np.ndarray, label: np.ndarray, prediction: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The middle axial slice (last axis, RAS) of a volume: image | image + label | image + prediction."""
    z = image.shape[-1] // 2
    gray = np.repeat(np.clip(np.rot90(image[..., z]), 0, 1)[..., None] * 255, 3, axis=-1)

    def blend(mask: np.ndarray) -> np.ndarray:
        mask = np.rot90(mask[..., z]).astype(np.int64)
        colours = PALETTE[mask % len(PALETTE)]
        return np.where((mask > 0)[..., None], (1 - alpha) * gray + alpha * colours, gray)

    return np.concatenate([gray, blend(label), blend(prediction)], axis=1).astype(np.uint8)
