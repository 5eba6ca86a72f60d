"""One case's prediction: the softmax averaged over models and mirrorings (lateral pairs swapped back), its
label map and the files written in the input image's geometry."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from scipy import ndimage
from torch import nn

from atomic_files import replace_atomically
from dataset.cases import case_files, case_name
from dataset.laterality import LEFT_RIGHT_AXIS, lateral_order, mirrorings
from dataset.portable import complete_background
from engine.common import stitching_device

__all__ = [
    "ModelPasses",
    "complete_background",
    "keep_largest",
    "labels_of",
    "mean_probabilities",
    "output_name",
    "write_probabilities",
    "write_segmentation",
]


@dataclass(frozen=True)
class ModelPasses:
    """One model of an ensemble and its passes over a case.

    Args:
        network: the network (logits ``N, K, X, Y, Z`` on the RAS grid of its input).
        roi: its sliding-window size.
        mirror_axes: spatial axes (0 left-right, 1 posterior-anterior, 2 inferior-superior) whose every
            combination is a mirrored pass (``dataset.laterality.mirrorings``); none: one pass.
        lateral_pairs: class values whose probabilities a pass flipped along the left-right axis exchanges
            back, as training swapped their labels.
    """

    network: nn.Module
    roi: tuple[int, int, int]
    mirror_axes: tuple[int, ...] = ()
    lateral_pairs: tuple[tuple[int, int], ...] = ()

    @property
    def passes(self) -> int:
        return len(mirrorings(self.mirror_axes))


def mean_probabilities(
    image: torch.Tensor,
    models: Sequence[ModelPasses],
    num_classes: int,
    sw_batch_size: int,
    overlap: float,
    autocast: torch.autocast,
    device: torch.device,
) -> torch.Tensor:
    """The ``num_classes`` class probabilities of a preprocessed ``image`` (``1, C, D, H, W``): for each
    model (with its sliding-window ROI), the mean softmax over its passes, each mirrored pass flipped back
    and, where it flipped the left-right axis, its lateral pairs' channels exchanged; then the mean over
    the models, each weighing the same. Summed in place as they come: memory holds two outputs, whatever the
    number of passes. The sum lives where :func:`engine.common.stitching_device` says (the CPU for large
    volumes)."""
    total = None
    output_device = stitching_device(image.shape[2:], num_classes, device)
    for model in models:
        weight = 1.0 / (len(models) * model.passes)
        for axes in mirrorings(model.mirror_axes):
            dims = [axis + 2 for axis in axes]  # spatial axis a of ``N, C, X, Y, Z``
            flipped = image.flip(dims) if axes else image
            with autocast:
                logits = sliding_window_inference(
                    flipped.to(device),
                    model.roi,
                    sw_batch_size,
                    model.network,
                    overlap=overlap,
                    sw_device=device,
                    device=output_device,
                )
            probabilities = torch.softmax(logits.float(), dim=1)
            if axes:
                probabilities = probabilities.flip(dims)
            probabilities = probabilities.to(output_device)
            if total is None:  # the first model's unmirrored pass (mirrorings() puts it first)
                total = probabilities.mul_(weight)
            elif LEFT_RIGHT_AXIS in axes and model.lateral_pairs:
                # channel c added to channel order[c]: the pairs swapped back without a copy of the volume
                order = torch.tensor(lateral_order(model.lateral_pairs, num_classes), device=total.device)
                total.index_add_(1, order, probabilities, alpha=weight)
            else:
                total.add_(probabilities, alpha=weight)
    return total


def labels_of(probabilities: torch.Tensor) -> np.ndarray:
    """The label map (argmax) of probabilities ``K, X, Y, Z`` in the input geometry, as uint8."""
    return probabilities.argmax(dim=0).numpy().astype(np.uint8)


def keep_largest(labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """``labels`` with only the largest connected component (26-connectivity) of each of ``classes`` kept,
    the rest of that class background: MONAI's KeepLargestConnectedComponent, which needs scikit-image on
    the CPU; scipy.ndimage here."""
    kept = labels.copy()
    for value in classes:
        components, count = ndimage.label(labels == value, structure=np.ones((3, 3, 3)))
        if count > 1:
            sizes = np.bincount(components.ravel())[1:]
            kept[(components > 0) & (components != 1 + int(sizes.argmax()))] = 0
    return kept


def output_name(image: str | Sequence[str]) -> str:
    """The name a case's outputs take: its image file's without ``.nii.gz`` or ``.nii``, or for one file
    per channel the case name (without ``_0000``)."""
    if not isinstance(image, str):
        return case_name(image)
    return Path(image).name.removesuffix(".gz").removesuffix(".nii")


def write_segmentation(labels: np.ndarray, image: str | Sequence[str], output: Path) -> Path:
    """``<case>_seg.nii.gz``: uint8 labels with the input's shape and affine (of its first channel file,
    which every channel file shares)."""
    source = nib.load(case_files({"image": image})[0])
    shape = tuple(source.shape[:3])
    if labels.shape != shape:
        raise RuntimeError(f"{case_files({'image': image})[0]}: prediction shape {labels.shape} differs from {shape}")
    header = source.header.copy()
    header.set_data_dtype(np.uint8)
    nifti = nib.Nifti1Image(labels, source.affine, header)
    nifti.header.set_slope_inter(1.0, 0.0)
    path = output / f"{output_name(image)}_seg.nii.gz"
    replace_atomically(path, lambda tmp: nib.save(nifti, tmp))
    return path


def write_probabilities(
    probabilities: torch.Tensor, image: str | Sequence[str], classes: Sequence[str], output: Path
) -> Path:
    """``<case>_probabilities.npz``: ``probabilities`` (float16, ``K, X, Y, Z``: channel k is class k, on
    the input's voxel grid), ``affine`` (the input's) and ``classes`` (names, index = label value)."""
    affine = nib.load(case_files({"image": image})[0]).affine
    path = output / f"{output_name(image)}_probabilities.npz"

    def write(tmp: str) -> None:
        with open(tmp, "wb") as file:
            np.savez_compressed(
                file,
                probabilities=probabilities.numpy().astype(np.float16),
                affine=affine,
                classes=np.array(list(classes)),
            )

    replace_atomically(path, write)
    return path
