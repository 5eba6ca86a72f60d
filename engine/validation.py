"""Validation during training: Dice of sliding-window predictions per case and class (or region), and its
summaries."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dataset.labels import REGION_THRESHOLD, LabelManager, LabelSets
from engine.common import autocast_for
from engine.stitching import stitched_slabs

__all__ = [
    "dice_per_class",
    "dice_per_label_set",
    "dice_per_region",
    "foreground_dice",
    "overlay_slice",
    "source_means",
    "summarise_scores",
    "validation_scores",
]


def validation_scores(
    model: nn.Module,
    loader,
    roi,
    sw_batch_size: int,
    label_manager: LabelManager,
    device: torch.device,
    amp: str | None = None,
    progress: bool = True,
    snapshot: dict | None = None,
    overlap: float = 0.25,
) -> torch.Tensor:
    """Per-case Dice of each output (cases x outputs) of sliding-window predictions: of each class in the
    argmax, background included, NaN where the class is absent from the label (the published rule, MONAI's
    ``DiceMetric``); or of each region above 0.5, as ``test_seg.py --evaluate`` and nnU-Net's evaluation score
    a case (NaN only where the region is absent from both label and prediction: a false alarm scores 0);
    ``0 x outputs`` for a loader without cases.
    Nothing is gathered across processes: the caller collects every process's cases once. Voxels labelled
    the ignore label (nnU-Net's unannotated voxels) count nowhere, predicted or expected.

    The windows are stitched slab by slab as in inference (:func:`engine.stitching.stitched_slabs`), each
    slab turned into labels (or region masks) at once: memory never holds every output's logits.

    With ``snapshot``, its ``"overlay"`` receives the first case's middle axial slice: image, image with
    label, image with the predicted label map (H x W x 3, uint8)."""
    was_training = model.training
    model.eval()
    outputs = label_manager.num_outputs
    sets = label_manager.label_sets
    scores = [torch.empty(0, outputs if sets is None else len(sets.columns))]
    autocast = autocast_for(amp, device)
    regions = label_manager.has_regions

    def finish(logits: torch.Tensor) -> torch.Tensor:
        """A slab's label map, and for regions each region's mask below it (uint8, ``1 + R, ...``)."""
        if not regions:  # the argmax of the logits is the softmax's
            return label_manager.label_map(logits)[None]
        probabilities = label_manager.finish(logits)
        above = (probabilities > REGION_THRESHOLD).to(torch.uint8)
        return torch.cat([label_manager.label_map(probabilities)[None], above])

    with torch.no_grad():
        for batch in tqdm(loader, desc="Validate", dynamic_ncols=True, leave=False, disable=not progress):
            image, label = batch["image"], torch.as_tensor(batch["label"])[0, 0].long()
            prediction = torch.empty(label.shape, dtype=torch.uint8)
            inside = torch.empty((outputs, *label.shape), dtype=torch.bool) if regions else None
            slabs = stitched_slabs(image, model, roi, sw_batch_size, overlap, autocast, device, finish)
            for slab in slabs:
                prediction[..., slab.start : slab.stop] = slab.values[0].cpu()
                if regions:
                    inside[..., slab.start : slab.stop] = slab.values[1:].cpu().bool()
            if snapshot is not None and len(scores) == 1:
                snapshot["overlay"] = overlay_slice(image[0, 0].numpy(), label.numpy(), prediction.numpy())
            if sets is not None:
                scores.append(dice_per_label_set(prediction, label, int(batch["source"][0]), sets)[None])
            elif regions:
                expected = label_manager.region_masks(label[None])[0]
                scores.append(dice_per_region(inside, expected, label_manager.annotated(label))[None])
            else:
                scores.append(dice_per_class(prediction, label, outputs, label_manager.ignore_label)[None])
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


def dice_per_label_set(
    prediction: torch.Tensor, codes: torch.Tensor, source: int, label_sets: LabelSets
) -> torch.Tensor:
    """One validation case of a union: the Dice of each of its source's channels (``LabelSets.channels``: a
    set's prediction is the union of its classes' predictions), NaN where absent from the label as
    :func:`dice_per_class`, in the source's columns of ``label_sets.columns`` (NaN in the other sources')."""
    row = torch.full((len(label_sets.columns),), torch.nan)
    count = len(label_sets.channels(source))
    predicted = torch.tensor(label_sets.class_to_channel(source))[prediction.long()]
    expected = torch.tensor(label_sets.code_to_channel(source))[codes.long()]
    expected = torch.where(expected < 0, count, expected)  # unannotated voxels
    row[label_sets.columns_of(source)] = dice_per_class(predicted, expected, count, ignore_label=count)
    return row


def dice_per_region(
    predicted: torch.Tensor, expected: torch.Tensor, annotated: torch.Tensor | None = None
) -> torch.Tensor:
    """The Dice of each region between predicted and expected masks (``R, ...`` booleans): ``2 TP / (2 TP +
    FP + FN)``, NaN where the region is in neither (nnU-Net's ``compute_metrics``, this repository's
    ``engine.evaluate``), so a region predicted in a case that has none scores 0; voxels outside
    ``annotated`` left out."""
    if annotated is not None:
        predicted, expected = predicted & annotated, expected & annotated
    axes = tuple(range(1, predicted.dim()))
    truth, found = expected.sum(axes).double(), predicted.sum(axes).double()
    dice = 2 * (predicted & expected).sum(axes).double() / (truth + found)
    return torch.where(truth + found > 0, dice, torch.nan).float()


def summarise_scores(scores: torch.Tensor, label_manager: LabelManager | None = None) -> tuple[float, list[float]]:
    """The mean Dice over every (case, output) pair that has a score (a class present in the label,
    background included, as the published training selects its best model; a region present in the label or
    the prediction); and the Dice of each output (mean over the cases where it has one). For a union of
    datasets, the mean over the sources of that mean over each source's columns (a large source does not
    outweigh a small one), and the Dice of each column."""
    per_column = torch.nanmean(scores, dim=0).tolist()
    if label_manager is None or label_manager.label_sets is None:
        return float(torch.nanmean(scores)), per_column
    return _mean_over_sources(scores, label_manager.label_sets, background=True), per_column


def foreground_dice(scores: torch.Tensor, label_manager: LabelManager) -> float:
    """The mean Dice over the (case, output) pairs of the foreground classes (background left out) or of
    the regions, as test_seg.py's evaluation reports it; for a union, the mean of it over the sources."""
    if label_manager.label_sets is not None:
        return _mean_over_sources(scores, label_manager.label_sets, background=False)
    return float(torch.nanmean(scores if label_manager.has_regions else scores[:, 1:]))


def source_means(scores: torch.Tensor, label_sets: LabelSets, background: bool = True) -> list[float]:
    """Each source's mean Dice over its (case, column) pairs (background left out without ``background``;
    NaN for a source without validation cases)."""
    means = []
    for k in range(len(label_sets.sources)):
        block = scores[:, label_sets.columns_of(k)[0 if background else 1 :]]
        means.append(float(torch.nanmean(block)) if (~torch.isnan(block)).any() else float("nan"))
    return means


def _mean_over_sources(scores: torch.Tensor, label_sets: LabelSets, background: bool) -> float:
    """The mean over the sources (those with scores) of each source's mean (:func:`source_means`)."""
    means = [mean for mean in source_means(scores, label_sets, background) if not math.isnan(mean)]
    return sum(means) / len(means) if means else float("nan")


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


def overlay_slice(
    image: np.ndarray, label: np.ndarray, prediction: np.ndarray, alpha: float = 0.45, min_height: int = 256
) -> np.ndarray:
    """The middle axial slice (last axis, RAS) of a volume: image | image + label | image + prediction, each
    voxel repeated (nearest neighbour, by one integer factor) until the panels are ``min_height`` pixels high
    or more: a 96-voxel slice is too small to read in TensorBoard."""
    z = image.shape[-1] // 2
    gray = np.repeat(np.clip(np.rot90(image[..., z]), 0, 1)[..., None] * 255, 3, axis=-1)

    def blend(mask: np.ndarray) -> np.ndarray:
        mask = np.rot90(mask[..., z]).astype(np.int64)
        colours = PALETTE[mask % len(PALETTE)]
        return np.where((mask > 0)[..., None], (1 - alpha) * gray + alpha * colours, gray)

    panels = np.concatenate([gray, blend(label), blend(prediction)], axis=1).astype(np.uint8)
    scale = max(1, -(-min_height // panels.shape[0]))
    return panels.repeat(scale, axis=0).repeat(scale, axis=1)
