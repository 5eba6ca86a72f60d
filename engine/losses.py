"""The training loss: MONAI's Dice + cross-entropy as published, over the annotated voxels only when the
dataset has nnU-Net's ignore label."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss
from torch import nn

__all__ = ["AnnotatedDiceCELoss", "segmentation_loss"]


class AnnotatedDiceCELoss(nn.Module):
    """MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)`` (Dice and cross-entropy, each of weight 1) over
    the voxels whose label is not ``ignore_label``: they add nothing to either term, as in nnU-Net.

    Args:
        ignore_label: the label value of unannotated voxels (the value after the classes).
    """

    def __init__(self, ignore_label: int) -> None:
        super().__init__()
        self.ignore_label = ignore_label
        self.dice = DiceLoss(include_background=True)  # MONAI's DiceCELoss defaults, on the masked inputs

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        label = label[:, 0].long() if label.dim() == logits.dim() else label.long()
        annotated = label != self.ignore_label
        target = torch.where(annotated, label, 0)
        mask = annotated.unsqueeze(1).to(logits.dtype)
        probabilities = torch.softmax(logits, 1) * mask
        one_hot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(logits.dtype) * mask
        dice = self.dice(probabilities, one_hot)
        if not annotated.any():  # a crop of unannotated voxels only: nothing to learn from its labels
            return dice * 0 + logits.sum() * 0
        cross_entropy = F.cross_entropy(logits, label, ignore_index=self.ignore_label)
        return dice + cross_entropy


def segmentation_loss(ignore_label: int | None) -> nn.Module:
    """The published loss, or its annotated-voxels form for a dataset with an ignore label."""
    if ignore_label is None:
        return DiceCELoss(to_onehot_y=True, softmax=True)
    return AnnotatedDiceCELoss(ignore_label)
