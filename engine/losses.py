"""The training loss: MONAI's Dice + cross-entropy as published, over the annotated voxels only when the
dataset has nnU-Net's ignore label; for regions, nnU-Net's soft Dice + binary cross-entropy; for a union of
datasets that annotate different classes, the same Dice + cross-entropy on each source's label sets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss
from torch import nn

from dataset.labels import LabelManager, LabelSets

__all__ = ["AnnotatedDiceCELoss", "LabelSetDiceCELoss", "RegionDiceBCELoss", "segmentation_loss"]


class AnnotatedDiceCELoss(nn.Module):
    """MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)`` (Dice and cross-entropy, each of weight 1) over
    the voxels whose label is not ``ignore_label``: they add nothing to either term, as in nnU-Net. The Dice
    term is the mean over the crops that have annotated voxels: a crop of unannotated voxels only (a sparse
    annotation's common case) has no Dice to learn from, and counting it as 0 would shrink the others'.

    Args:
        ignore_label: the label value of unannotated voxels (the value after the classes).
    """

    def __init__(self, ignore_label: int) -> None:
        super().__init__()
        self.ignore_label = ignore_label
        # MONAI's DiceCELoss defaults, on the masked inputs; per crop and class, averaged over annotated crops
        self.dice = DiceLoss(include_background=True, reduction="none")

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        label = label[:, 0].long() if label.dim() == logits.dim() else label.long()
        annotated = label != self.ignore_label
        target = torch.where(annotated, label, 0)
        mask = annotated.unsqueeze(1).to(logits.dtype)
        probabilities = torch.softmax(logits, 1) * mask
        one_hot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(logits.dtype) * mask
        crops = annotated.flatten(1).any(1)
        if not crops.any():  # unannotated voxels only: nothing to learn from these labels
            return logits.sum() * 0
        dice = self.dice(probabilities, one_hot).flatten(1)[crops].mean()
        cross_entropy = F.cross_entropy(logits, label, ignore_index=self.ignore_label)
        return dice + cross_entropy


class RegionDiceBCELoss(nn.Module):
    """nnU-Net v2's ``DC_and_BCE_loss`` of region-based training, plus 1: binary cross-entropy of each region's
    logit (``BCEWithLogitsLoss``) plus 1 - soft Dice (``MemoryEfficientSoftDiceLoss`` on the sigmoid, per crop
    and region, smooth 1e-5, the mean over both). nnU-Net adds -Dice; 1 - Dice keeps the logged loss positive,
    as MONAI's Dice losses do, with the same gradients. Its Dice is per crop (nnU-Net's ``batch_dice`` False,
    as MONAI's DiceCE of the class loss).

    Without an ignore label the cross-entropy is the mean over voxels and regions. With one (nnU-Net's loss
    mask), unannotated voxels are left out of both terms: the cross-entropy is summed over the regions and
    divided by the annotated voxels (nnU-Net's masked sum, not a mean over regions x voxels), and the Dice term
    is the mean over the crops that have annotated voxels, as :class:`AnnotatedDiceCELoss` does. That is a
    deliberate difference from nnU-Net, whose masked soft Dice of a fully unannotated crop is smooth / smooth
    = 1, a perfect score that shrinks the term of the crops that have labels.

    Args:
        label_manager: the regions (their label values) and the ignore label.
    """

    SMOOTH = 1e-5

    def __init__(self, label_manager: LabelManager) -> None:
        super().__init__()
        if not label_manager.has_regions:
            raise ValueError("RegionDiceBCELoss needs regions")
        self.label_manager = label_manager

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        label = label[:, 0] if label.dim() == logits.dim() else label
        logits = logits.float()
        target = self.label_manager.region_masks(label).to(logits.dtype)
        annotated = self.label_manager.annotated(label)
        probabilities = torch.sigmoid(logits)
        axes = tuple(range(2, logits.dim()))
        if annotated is None:
            intersection, predicted = (probabilities * target).sum(axes), probabilities.sum(axes)
            truth = target.sum(axes)
            bce = F.binary_cross_entropy_with_logits(logits, target)
            crops = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        else:
            crops = annotated.flatten(1).any(1)
            if not crops.any():  # unannotated voxels only: nothing to learn from these labels
                return logits.sum() * 0
            mask = annotated.unsqueeze(1).to(logits.dtype)
            intersection, predicted = (probabilities * target * mask).sum(axes), (probabilities * mask).sum(axes)
            truth = (target * mask).sum(axes)
            voxels = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * mask
            bce = voxels.sum() / mask.sum().clamp_min(1e-8)
        dice = (2 * intersection + self.SMOOTH) / (truth + predicted + self.SMOOTH).clamp_min(1e-8)
        return bce + 1 - dice[crops].mean()


class LabelSetDiceCELoss(nn.Module):
    """The label-set (marginal) loss of a union of datasets (Fidon et al., "Label-set loss functions for
    partial supervision", 2021; Shi et al., "Marginal loss and exclusion loss", 2021): the softmax of the
    unified classes is summed, for each crop, into the channels of its source (``LabelSets.channels``: the
    background set, which takes every class the source does not annotate, then one set per source label),
    and MONAI's Dice + cross-entropy of :class:`AnnotatedDiceCELoss` is computed on those marginal
    probabilities: cross-entropy ``-log`` of the marginal probability of the voxel's set (a log-sum-exp of
    the log-softmax, stable), the mean over the annotated voxels of the batch; Dice per crop and channel
    (smooth 1e-5 above and below, as MONAI's), the mean over a crop's channels, then over the crops that have
    annotated voxels. A source that annotates every class, each alone, gives exactly the published loss.

    With ``label_sets.pseudo_labels`` (a probability ``t``), a voxel of a source's background set whose
    predicted probability of one class the source does not annotate is above ``t`` is trained by the
    cross-entropy as that class alone (``-log p`` of the class, not of the set; the prediction detached): the
    classes a source does not annotate are then supervised in its cases too, where the network already finds
    them. Foreground classes only: a confident background would teach the network that a class it has not yet
    learnt is background, the naive merging the label sets avoid. A source's own labels that hold several
    classes (FLARE's kidney) stay sets: they say what the voxel is, and reinforcing the network's guess of the
    side cost Dice on the kidneys in the benchmark (BENCHMARKS.md). The Dice term stays on the sets.

    Args:
        label_sets: the union's sources and their sets.
    """

    SMOOTH = 1e-5

    def __init__(self, label_sets: LabelSets) -> None:
        super().__init__()
        count = len(label_sets.sources)
        self.channels = [label_sets.channels(k) for k in range(count)]
        self.tables = [torch.tensor(label_sets.code_to_channel(k)) for k in range(count)]
        self.pseudo_labels = label_sets.pseudo_labels
        # for each source and channel: the classes a voxel may be pseudo-labelled as (its background set's
        # foreground classes, the ones the source does not annotate)
        self.candidates = [
            torch.tensor(
                [
                    [channel == 0 and value > 0 and value in group for value in range(len(label_sets.classes))]
                    for channel, group in enumerate(channels)
                ]
            )
            for channels in self.channels
        ]

    def forward(self, logits: torch.Tensor, label: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        label = label[:, 0].long() if label.dim() == logits.dim() else label.long()
        log_probabilities = torch.log_softmax(logits.float(), 1)
        source = torch.as_tensor(source, device=logits.device).reshape(-1).long()
        cross_entropy, voxels, dice = log_probabilities.new_zeros(()), 0, []
        for k in source.unique().tolist():
            rows = source == k
            chosen = log_probabilities[rows]
            marginal = torch.stack(
                [torch.logsumexp(chosen[:, list(group)], 1) for group in self.channels[k]], 1
            )  # log of each set's probability
            target = self.tables[k].to(label.device)[label[rows]]
            annotated = target >= 0
            target = target.clamp_min(0)
            voxel_log_probability = marginal.gather(1, target[:, None])[:, 0]
            if self.pseudo_labels is not None:
                voxel_log_probability = self._pseudo_labelled(chosen, target, annotated, voxel_log_probability, k)
            cross_entropy = cross_entropy - (voxel_log_probability * annotated).sum()
            voxels += int(annotated.sum())
            mask = annotated.unsqueeze(1).to(marginal.dtype)
            probabilities = marginal.exp() * mask
            one_hot = F.one_hot(target, marginal.shape[1]).movedim(-1, 1).to(marginal.dtype) * mask
            axes = tuple(range(2, marginal.dim()))
            intersection = (probabilities * one_hot).sum(axes)
            denominator = probabilities.sum(axes) + one_hot.sum(axes)
            per_crop = (1 - (2 * intersection + self.SMOOTH) / (denominator + self.SMOOTH)).mean(1)
            dice.append(per_crop[annotated.flatten(1).any(1)])
        if not voxels:  # unannotated voxels only: nothing to learn from these labels
            return logits.sum() * 0
        return torch.cat(dice).mean() + cross_entropy / voxels

    def _pseudo_labelled(
        self,
        log_probabilities: torch.Tensor,
        target: torch.Tensor,
        annotated: torch.Tensor,
        voxel_log_probability: torch.Tensor,
        source: int,
    ) -> torch.Tensor:
        """``voxel_log_probability`` (of each voxel's set) with the log-probability of the class alone where a
        class the source does not annotate is predicted above the threshold in its background."""
        candidates = self.candidates[source].to(target.device)[target].movedim(-1, 1)
        probabilities = torch.where(candidates, log_probabilities.detach().exp(), 0)
        best, best_class = probabilities.max(1)
        confident = annotated & (best > self.pseudo_labels)
        return torch.where(confident, log_probabilities.gather(1, best_class[:, None])[:, 0], voxel_log_probability)


def segmentation_loss(label_manager: LabelManager) -> nn.Module:
    """The published loss, its annotated-voxels form for a dataset with an ignore label, the region loss, or
    the label-set loss of a union of datasets."""
    if label_manager.label_sets is not None:
        return LabelSetDiceCELoss(label_manager.label_sets)
    if label_manager.has_regions:
        return RegionDiceBCELoss(label_manager)
    if label_manager.ignore_label is None:
        return DiceCELoss(to_onehot_y=True, softmax=True)
    return AnnotatedDiceCELoss(label_manager.ignore_label)
