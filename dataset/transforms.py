"""The MONAI transform chains of a dataset: loading (channels first), reorientation, resampling, the
foreground crop, per-channel normalisation, then for training the balanced crops and augmentation."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    MapTransform,
    Orientationd,
    RandAffined,
    RandCropByPosNegLabeld,
    Randomizable,
    RandShiftIntensityd,
    Spacingd,
    SpatialPadd,
)
from monai.transforms.utils import correct_crop_centers, unravel_index

from dataset.description import DatasetConfig
from dataset.labels import LabelSets
from dataset.laterality import LEFT_RIGHT_AXIS, check_mirror_axes, swap_lateral_labels
from dataset.portable import AnyChannelForeground, LoadCased, NormalizeChannelsd, nonzero_region

#: The orientation every image is brought to before resampling, and the axis labels that name it.
ORIENTATION = "RAS"
AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))

__all__ = [
    "AXIS_LABELS",
    "AnyChannelForeground",
    "BalancedCropd",
    "CropCentres",
    "LoadCased",
    "NormalizeChannelsd",
    "ORIENTATION",
    "RandMirrord",
    "UnifyLabelsd",
    "build_transforms",
    "nonzero_region",
]


@dataclass(frozen=True)
class CropCentres:
    """Where the balanced crops may centre (see :class:`DatasetConfig` ``foreground_crops`` and
    ``background_crops``): foreground on the annotated classes (not nnU-Net's ``ignore_label``), on any
    labelled voxel alike (``voxels``) or on a class present in the case, each alike, then on a voxel of it
    (``classes``; a region of ``groups``, a value of the label map otherwise); background on voxels labelled
    0, anywhere in the volume (``body``) or where a channel's normalised value is above 0 (``published``)."""

    background_crops: str = "body"
    ignore_label: int | None = None
    foreground_crops: str = "voxels"
    groups: tuple[tuple[int, ...], ...] = ()

    def __call__(self, label: torch.Tensor, image: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        label = torch.as_tensor(label).reshape(-1)
        foreground, background = label > 0, label == 0
        if self.ignore_label is not None:
            foreground &= label != self.ignore_label
        if self.background_crops == "published" and image is not None:
            background &= (torch.as_tensor(image) > 0).any(0).reshape(-1)
        return torch.nonzero(foreground).reshape(-1).cpu(), torch.nonzero(background).reshape(-1).cpu()

    def classes_present(self, label: torch.Tensor, foreground: torch.Tensor) -> tuple[torch.Tensor, list]:
        """The labels of the ``foreground`` indices (of the flattened ``label``), and the classes present among
        them: the regions of ``groups`` where given, else the label values."""
        label = torch.as_tensor(label).reshape(-1)
        values = label[foreground.to(label.device)].cpu().long()  # only the foreground leaves a GPU
        if self.groups:
            return values, [group for group in self.groups if self._members(values, group).any()]
        return values, torch.nonzero(torch.bincount(values)).reshape(-1).tolist()  # bincount: no sort

    def voxels_of(self, values: torch.Tensor, foreground: torch.Tensor, chosen) -> torch.Tensor:
        """The ``foreground`` indices whose label is of the class ``chosen`` (a value, or a region)."""
        return foreground[self._members(values, chosen)]

    def _members(self, values: torch.Tensor, chosen) -> torch.Tensor:
        return torch.isin(values, torch.tensor(chosen)) if self.groups else values == chosen


class BalancedCropd(RandCropByPosNegLabeld):
    """MONAI's crops balanced between foreground and background centres, the centres chosen by a
    :class:`CropCentres` rule: with ``foreground_crops`` ``classes``, a foreground centre is drawn as
    nnU-Net draws it, a class present in the case (each alike), then a voxel of it, so that a small class is
    centred as often as a large one."""

    def __init__(self, centres: CropCentres, **kwargs) -> None:
        super().__init__(**kwargs)
        self.centres = centres

    def randomize(self, label=None, fg_indices=None, bg_indices=None, image=None) -> None:
        if fg_indices is not None or label is None:
            super().randomize(label, fg_indices, bg_indices, image)
            return
        fg_indices, bg_indices = self.centres(label, image)
        if self.centres.foreground_crops == "voxels" or not len(fg_indices):
            super().randomize(label, fg_indices, bg_indices, image)  # MONAI's draw, and its one-sided warning
            return
        cropper, shape = self.cropper, label.shape[1:]
        pos_ratio = cropper.pos_ratio
        if not len(bg_indices):  # every crop on foreground, still drawn per class, as MONAI warns
            found = f"Num foregrounds {len(fg_indices)}, Num backgrounds 0"
            warnings.warn(f"{found}, setting `pos_ratio` to 1.", stacklevel=2)
            pos_ratio = 1.0
        values, classes = self.centres.classes_present(label, fg_indices)
        centres, voxels = [], {}
        for _ in range(cropper.num_samples):
            # one draw for the side, as MONAI's pos/neg draw, then one for the class (its voxels found once)
            if cropper.R.rand() < pos_ratio:
                index = cropper.R.randint(len(classes))
                if index not in voxels:
                    voxels[index] = self.centres.voxels_of(values, fg_indices, classes[index])
                chosen = voxels[index]
            else:
                chosen = bg_indices
            centre = unravel_index(chosen[cropper.R.randint(len(chosen))], shape).tolist()
            centres.append(correct_crop_centers(centre, cropper.spatial_size, shape, cropper.allow_smaller))
        cropper.centers = tuple(centres)


class RandMirrord(Randomizable, MapTransform):
    """Flip the (channels-first) arrays under ``keys`` along each of the spatial ``axes`` with probability
    ``prob``, drawn per axis and per call (per crop); where the left-right axis is flipped, the labels of
    each of ``lateral_pairs`` are exchanged in ``label_key``, so that a class keeps naming its side.

    Args:
        keys: the image and label keys, flipped together.
        axes: spatial axes after reorientation to RAS (0 left-right, 1 posterior-anterior, 2 inferior-superior).
        lateral_pairs: class values that a left-right flip exchanges (``dataset.laterality``).
        label_key: the key of the label map.
        prob: the probability of a flip along each axis.
    """

    def __init__(
        self,
        keys: KeysCollection,
        axes: Sequence[int],
        lateral_pairs: Sequence[tuple[int, int]] = (),
        label_key: str = "label",
        prob: float = 0.5,
    ) -> None:
        super().__init__(keys)
        self.axes, self.lateral_pairs = check_mirror_axes(axes, "RandMirrord"), tuple(lateral_pairs)
        self.label_key, self.prob = label_key, prob
        self.flipped: tuple[int, ...] = ()

    def randomize(self, data=None) -> None:
        self.flipped = tuple(a for a in self.axes if self.R.random() < self.prob)

    def __call__(self, data: dict) -> dict:
        self.randomize()
        data = dict(data)
        if not self.flipped:
            return data
        for key in self.key_iterator(data):
            data[key] = torch.flip(data[key], [a + 1 for a in self.flipped])
        if LEFT_RIGHT_AXIS in self.flipped and self.label_key in data:
            data[self.label_key] = swap_lateral_labels(data[self.label_key], self.lateral_pairs)
        return data


class UnifyLabelsd(MapTransform):
    """A union's label map in one value space: each value of a source's label file becomes its code
    (``LabelSets.raw_to_code``), the source read from the case's ``source_key``.

    Args:
        label_sets: the union's label sets.
        keys: the label key.
        source_key: the key of the source index (``dataset.cases`` marks each case of a union).
    """

    def __init__(self, label_sets: LabelSets, keys: KeysCollection = "label", source_key: str = "source") -> None:
        super().__init__(keys)
        self.source_key = source_key
        self.tables = [torch.tensor(label_sets.raw_to_code(k)) for k in range(len(label_sets.sources))]
        self.names = [source.name for source in label_sets.sources]

    def __call__(self, data: dict) -> dict:
        data = dict(data)
        table = self.tables[int(data[self.source_key])]
        for key in self.key_iterator(data):
            label = data[key]
            values = torch.as_tensor(label).long()
            if values.numel() and (values.min() < 0 or values.max() >= len(table)):
                name = self.names[int(data[self.source_key])]
                raise ValueError(
                    f"a label of source {name!r} holds value {int(values.max())}: its labels are 0..{len(table) - 1}"
                )
            label.copy_(table.to(values.device)[values].to(label.dtype))
        return data


def build_transforms(
    config: DatasetConfig,
    mode: str,
    roi_size: Sequence[int] = (96, 96, 96),
    crop_sample: int = 2,
    device: torch.device | None = None,
):
    """Transform chains built from a dataset configuration (with its derived settings filled in).

    Preprocessing: load (channels first), reorient to RAS, resample to ``config.spacing``, crop to the
    foreground (:class:`AnyChannelForeground`), normalise each channel (:class:`NormalizeChannelsd`).
    ``mode="train"`` returns ``(train_transforms, val_transforms)``; ``mode="test"`` returns the test
    chain (image only, invertible, for :class:`monai.transforms.Invertd`). Training crops are mirrored
    along ``config.mirror_axes`` (:class:`RandMirrord`, the lateral pairs swapped on left-right flips) after
    the affine; the published chains mirror nothing. With ``device``, the training chain moves each cached
    case there before the random crops, intensity shift, affine and mirroring, which then run on that device
    (``--gpu_transforms``).
    """
    if config.to_derive():
        raise ValueError(f"{config.name}: derive {', '.join(config.to_derive())} first (dataset.fingerprint)")
    keys = ["image", "label"] if mode == "train" else ["image"]
    interpolation = ("bilinear", "nearest") if mode == "train" else ("bilinear",)
    # Reoriented before resampling, so that the spacing is along the RAS axes whatever the stored order.
    union = config.label_sets is not None and mode == "train"
    preprocessing = [
        LoadCased(keys=keys),
        *([UnifyLabelsd(config.label_sets)] if union else []),
        Orientationd(keys=keys, axcodes=ORIENTATION, labels=AXIS_LABELS),
    ]
    if config.spacing is not None:
        preprocessing.append(Spacingd(keys=keys, pixdim=config.spacing, mode=interpolation))
    preprocessing += [
        CropForegroundd(
            keys=keys, source_key="image", select_fn=AnyChannelForeground(config.normalization), allow_smaller=True
        ),
        NormalizeChannelsd(keys=["image"], normalization=config.normalization),
    ]
    if mode == "test":
        return Compose(preprocessing + [EnsureTyped(keys=keys, dtype=np.float32, track_meta=True)])
    if mode != "train":
        raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
    roi_size = tuple(roi_size)
    to_device = [EnsureTyped(keys=keys, device=device, track_meta=False)] if device is not None else []
    pairs = config.label_sets.code_pairs(config.pairs) if union else config.pairs
    ignore = config.label_sets.ignore_code if union else config.ignore_label
    mirror = [RandMirrord(keys, config.mirror_axes, pairs)] if config.mirror_axes else []
    train = Compose(
        preprocessing
        + to_device
        + [
            SpatialPadd(keys=keys, spatial_size=roi_size),  # crops need volumes at least as large as the ROI
            BalancedCropd(
                CropCentres(config.background_crops, ignore, config.foreground_crops, config.crop_groups),
                keys=keys,
                label_key="label",
                spatial_size=roi_size,
                pos=1,
                neg=1,
                num_samples=crop_sample,
                image_key="image",
            ),
            RandShiftIntensityd(keys=["image"], offsets=0.10, prob=0.50),
            RandAffined(
                keys=keys,
                mode=interpolation,
                prob=1.0,
                spatial_size=roi_size,
                rotate_range=(0, 0, config.rotate_z),
                scale_range=(0.1, 0.1, 0.1),
            ),
            *mirror,
            EnsureTyped(keys=keys, track_meta=False),
        ]
    )
    val = Compose(preprocessing + [EnsureTyped(keys=keys, track_meta=False)])
    return train, val
