"""One case's prediction: the probabilities (softmax of classes, or sigmoid of regions) averaged over models
and mirrorings (lateral pairs swapped back), its label map and the files written in the input image's
geometry."""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import nn

from dataset.cases import case_files
from dataset.laterality import LEFT_RIGHT_AXIS, lateral_order, mirrorings
from dataset.portable import case_output_name
from engine.stitching import ProbabilityVolume, softmax_of_classes, stitching_device

__all__ = [
    "ModelPasses",
    "ProbabilitiesFile",
    "mean_probabilities",
    "probabilities_path",
    "segmentation_path",
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
    output_device: torch.device | None = None,
    finish: Callable[[torch.Tensor], torch.Tensor] = softmax_of_classes,
) -> ProbabilityVolume:
    """The ``num_classes`` output probabilities (``K, X, Y, Z``) of a preprocessed ``image`` (``1, C, X, Y,
    Z``): for each model (with its sliding-window ROI), the mean of its passes' ``finish``-ed logits (the
    label manager's: softmax of classes, sigmoid of regions), each mirrored
    pass flipped back and, where it flipped the left-right axis, its lateral pairs' channels exchanged;
    then the mean over the models, each weighing the same.

    Windows are stitched in float32 a slab at a time (:meth:`ProbabilityVolume.add_pass`); the sum
    over passes and models is the one volume held, a :class:`ProbabilityVolume` (2 bytes per class and
    voxel), where ``output_device`` says (default: :func:`engine.stitching.stitching_device`).
    """
    shape = tuple(image.shape[2:])
    output_device = output_device or stitching_device(shape, num_classes, device)
    total = ProbabilityVolume(num_classes, shape, output_device)
    for model in models:
        weight = 1.0 / (len(models) * model.passes)
        for axes in mirrorings(model.mirror_axes):
            swapped = LEFT_RIGHT_AXIS in axes and model.lateral_pairs
            order = lateral_order(model.lateral_pairs, num_classes) if swapped else None
            total.add_pass(
                image, model.network, model.roi, sw_batch_size, overlap, autocast, device, weight, axes, order, finish
            )
    return total


def write_segmentation(labels: np.ndarray, image: str | Sequence[str], path: str | Path) -> None:
    """Write ``labels`` to ``path`` (a ``.nii.gz`` name) as uint8 with the input's shape and affine (of its
    first channel file, which every channel file shares)."""
    source = nib.load(case_files({"image": image})[0])
    shape = tuple(source.shape[:3])
    if labels.shape != shape:
        raise RuntimeError(f"{case_files({'image': image})[0]}: prediction shape {labels.shape} differs from {shape}")
    header = source.header.copy()
    header.set_data_dtype(np.uint8)
    nifti = nib.Nifti1Image(labels, source.affine, header)
    nifti.header.set_slope_inter(1.0, 0.0)
    nib.save(nifti, str(path))


def segmentation_path(image: str | Sequence[str], output: Path) -> Path:
    return output / f"{case_output_name(image)}_seg.nii.gz"


def probabilities_path(image: str | Sequence[str], output: Path) -> Path:
    return output / f"{case_output_name(image)}_probabilities.npz"


class ProbabilitiesFile:
    """``<case>_probabilities.npz`` written as it comes, slab by slab along the last axis: ``probabilities``
    (float16, ``K, X, Y, Z``: channel k is class k, or region k, on the input's voxel grid; stored in Fortran
    order so that slabs are written whole, read by ``np.load`` as any array), ``affine`` (the input's) and
    ``classes`` (the channels' names: classes, index = label value, or regions). A context manager; closing it
    checks that every plane came."""

    def __init__(self, path: str | Path, shape: Sequence[int], affine: np.ndarray, classes: Sequence[str]) -> None:
        self.archive = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED)
        for name, array in (("affine", np.asarray(affine)), ("classes", np.array(list(classes)))):
            with self.archive.open(f"{name}.npy", "w") as entry:
                np.lib.format.write_array(entry, array)
        self.stream = self.archive.open("probabilities.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f2")), "fortran_order": True, "shape": tuple(shape)}
        np.lib.format.write_array_header_1_0(self.stream, header)
        self.shape, self.planes = tuple(shape), 0

    def write(self, slab: np.ndarray) -> None:
        """The next planes: float16 ``K, X, Y, dz``."""
        self.stream.write(np.asarray(slab, dtype="<f2").tobytes(order="F"))
        self.planes += slab.shape[-1]

    def __enter__(self) -> ProbabilitiesFile:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.stream.close()
        self.archive.close()
        if kind is None and self.planes != self.shape[-1]:
            raise RuntimeError(f"{self.archive.filename}: {self.planes} of {self.shape[-1]} planes written")
