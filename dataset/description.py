"""What a dataset is: its classes, input channels, their normalisation and the target spacing.

Four ways to say it, each a :class:`DatasetConfig`:

- a preset: ``flare``, ``amos``, ``feta`` (the published settings);
- this repository's JSON: Medical Segmentation Decathlon keys plus the optional ``spacing``,
  ``intensity``, ``normalization``, ``channels``, ``rotate_z``, ``mirror_axes``, ``lateral_pairs``,
  ``foreground_crops`` (which any of the JSON forms may give) and ``regions`` with ``regions_class_order``
  (region-based training);
- a Medical Segmentation Decathlon ``dataset.json`` (``modality``, ``labels`` ``{"0": "background"}``,
  ``training`` / ``test`` lists; multi-channel images are 4D with the channels last);
- an nnU-Net v2 raw ``dataset.json`` (``channel_names``, ``labels`` ``{"background": 0}``,
  ``file_ending``; one file per channel, ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``...); region labels
  (``"whole tumor": [1, 2, 3]``) with ``regions_class_order`` train one sigmoid output per region.

What a dataset does not give is derived from its training cases (``dataset.fingerprint``): the
target spacing (``"median"``), the foreground statistics of CT channels (nnU-Net's CT normalisation, where
no window is given) and the z-score region of the others.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from dataset.labels import LabelManager, LabelSets
from dataset.laterality import check_lateral_pairs, check_mirror_axes, find_lateral_pairs

__all__ = [
    "MEDIAN",
    "PRESETS",
    "SCHEMES",
    "SPLITS",
    "ChannelNorm",
    "DatasetConfig",
    "DatasetError",
    "card_preprocessing",
    "counted",
    "load_dataset_config",
    "parse_lists",
    "read_json",
]

#: ``spacing`` of a dataset whose target spacing is the median spacing of its training cases.
MEDIAN = "median"
#: Normalisation schemes of an input channel (see :class:`ChannelNorm`).
SCHEMES = ("ct", "ct_zscore", "zscore", "none")
#: The splits a dataset may list, each with its published image and label folders.
SPLITS = {
    "training": ("imagesTr", "labelsTr"),
    "validation": ("imagesVal", "labelsVal"),
    "test": ("imagesTs", "labelsTs"),
}
#: Where the balanced crops centre background samples (see :class:`DatasetConfig`).
BACKGROUND_CROPS = ("body", "published")
#: Where the balanced crops centre foreground samples: any labelled voxel alike (MONAI's, as published) or
#: a class present in the case, each alike, then a voxel of it (nnU-Net's) (see :class:`DatasetConfig`).
FOREGROUND_CROPS = ("voxels", "classes")
#: The keys of a dataset JSON that set how it trains (beyond the Decathlon's): a ``--datalist`` may not hold
#: them, as it would change nothing.
DATASET_SETTINGS = (
    "spacing",
    "intensity",
    "normalization",
    "channels",
    "rotate_z",
    "mirror_axes",
    "lateral_pairs",
    "foreground_crops",
    "regions",
    "regions_class_order",
)
#: The published window of abdominal CT (HU).
ABDOMEN_WINDOW = (-125.0, 275.0)


def counted(number: int, noun: str) -> str:
    """``1 case``, ``2 cases``: a count with its noun, for messages."""
    return f"{number} {noun}{'s' * (number != 1)}"


class DatasetError(ValueError):
    """A dataset problem a user must fix; the message names the file or flag and what is wrong."""


@dataclass(frozen=True)
class ChannelNorm:
    """How one input channel is normalised, in each case on its own.

    Args:
        scheme: ``ct``: clip to ``window`` and scale it to [0, 1] (the published preprocessing, also used
            with FeTA's 0..1000 window; the window is always given); ``ct_zscore``: nnU-Net's
            ``CTNormalization``, clip to ``window`` (the 0.5 and 99.5 percentiles of the training cases'
            foreground) then subtract ``mean`` and divide by ``std`` (the foreground's); ``zscore``:
            subtract the channel's mean and divide by its standard deviation (nnU-Net's default for every
            channel but CT); ``none``.
        window: ``(a_min, a_max)`` of ``ct`` and ``ct_zscore``; of ``ct_zscore`` None until derived.
        nonzero_mask: of ``zscore``: standardise over the region where any channel is non-zero (holes
            filled; the voxels outside stay 0) rather than every voxel; None until derived (nnU-Net's rule,
            see ``dataset.fingerprint``).
        mean, std: of ``ct_zscore``: the training cases' foreground mean and standard deviation; None until
            derived (with the window).
    """

    scheme: str
    window: tuple[float, float] | None = None
    nonzero_mask: bool | None = None
    mean: float | None = None
    std: float | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"normalization {self.scheme!r}: expected one of {', '.join(SCHEMES)}")
        if self.scheme == "ct" and self.window is None:
            raise ValueError(
                "normalization 'ct' needs its window [a_min, a_max] (or the dataset's intensity); to derive the "
                "normalisation of a CT from the data, use 'ct_zscore' (nnU-Net's)"
            )
        if self.window is not None:
            if self.scheme not in ("ct", "ct_zscore"):
                raise ValueError(f"normalization {self.scheme!r}: only 'ct' and 'ct_zscore' take a window")
            if not self.window[1] > self.window[0]:
                raise ValueError(f"window {list(self.window)}: a_max must be greater than a_min")
        if self.nonzero_mask is not None and self.scheme != "zscore":
            raise ValueError(f"normalization {self.scheme!r}: only 'zscore' takes nonzero_mask")
        statistics = (self.window, self.mean, self.std)
        if (self.mean is not None or self.std is not None) and self.scheme != "ct_zscore":
            raise ValueError(f"normalization {self.scheme!r}: only 'ct_zscore' takes mean and std")
        if self.scheme == "ct_zscore" and any(v is None for v in statistics) and any(v is not None for v in statistics):
            raise ValueError("normalization 'ct_zscore': give window, mean and std together, or none (derived)")
        if self.std is not None and not self.std >= 0:
            raise ValueError(f"normalization 'ct_zscore': std {self.std!r} must not be negative")

    @property
    def left_to_data(self) -> bool:
        """Whether the training cases must still give this channel's settings (see ``dataset.fingerprint``)."""
        return (self.scheme == "ct_zscore" and self.window is None) or (
            self.scheme == "zscore" and self.nonzero_mask is None
        )

    def to_json(self) -> dict:
        if self.scheme == "ct":
            return {"scheme": self.scheme, "window": list(self.window)}
        if self.scheme == "ct_zscore":
            return {"scheme": self.scheme, "window": list(self.window), "mean": self.mean, "std": self.std}
        if self.scheme == "zscore":
            return {"scheme": self.scheme, "nonzero_mask": self.nonzero_mask}
        return {"scheme": self.scheme}

    @classmethod
    def from_json(cls, value: object) -> ChannelNorm:
        """``"zscore"``, ``{"scheme": "zscore", "nonzero_mask": true}``, ``{"scheme": "ct", "window": [a_min,
        a_max]}``, ``"ct_zscore"``, ``{"scheme": "ct_zscore", "window": [a_min, a_max], "mean": m, "std": s}``
        (nonzero_mask and the statistics of ct_zscore optional: derived)."""
        if isinstance(value, str):
            return cls(value)
        if not isinstance(value, dict) or not isinstance(value.get("scheme"), str):
            raise ValueError(f'expected a scheme name or {{"scheme": ..., "window": [a_min, a_max]}}, got {value!r}')
        window = value.get("window")
        if window is not None:
            if not (isinstance(window, list) and len(window) == 2 and all(_is_number(v) for v in window)):
                raise ValueError(f"window {window!r}: expected [a_min, a_max]")
            window = (float(window[0]), float(window[1]))
        nonzero_mask = value.get("nonzero_mask")
        if nonzero_mask is not None and not isinstance(nonzero_mask, bool):
            raise ValueError(f"nonzero_mask {nonzero_mask!r}: expected true or false")
        mean, std = value.get("mean"), value.get("std")
        for name, number in (("mean", mean), ("std", std)):
            if number is not None and not _is_number(number):
                raise ValueError(f"{name} {number!r}: expected a number")
        return cls(value["scheme"], window, nonzero_mask, *(None if v is None else float(v) for v in (mean, std)))

    def describe(self) -> str:
        if self.scheme == "zscore" and self.nonzero_mask is not None:
            return f"zscore ({'non-zero region' if self.nonzero_mask else 'all voxels'})"
        if self.scheme == "ct_zscore":
            if self.window is None:
                return "ct_zscore (to derive)"
            return f"ct_zscore {self.window[0]:g}..{self.window[1]:g}, mean {self.mean:g}, std {self.std:g}"
        if self.scheme != "ct":
            return self.scheme
        return f"ct {self.window[0]:g}..{self.window[1]:g}"


@dataclass(frozen=True)
class DatasetConfig:
    """Everything the transforms and the engine need to know about a dataset.

    Args:
        name: preset name or the JSON file's ``name``.
        labels: class names, index = label value (background first).
        spacing: target voxel spacing in mm (RAS axes), None to keep the native grid, or :data:`MEDIAN`.
        channels: input channel names (``CT``, ``T1``, ``FLAIR``...), in the order of the image data.
        normalization: one :class:`ChannelNorm` per channel.
        rotate_z: range (radians) of the random rotation about the last axis in training.
        lists: optional ``training`` / ``validation`` / ``test`` lists, relative to the root.
        layout: ``folders`` (imagesTr/labelsTr/imagesVal/...; channel files ``_0000``, ``_0001``... grouped
            by case) or ``nnunet`` (the same, with nnU-Net's ``file_ending`` and case count).
        root: the folder the lists and folders are relative to when ``--root`` is not given (the folder
            of a dataset JSON).
        file_ending: image file ending (nnU-Net's ``file_ending``).
        num_training: the training case count the dataset declares (``numTraining``), checked.
        source: where the description comes from, for messages (``--dataset path``).
        ignore_label: nnU-Net's ``ignore`` label value (the highest): voxels left unannotated, out of the loss
            and of every metric, never predicted (None: every voxel is annotated).
        background_crops: where the balanced crops centre their background samples: ``body`` (any
            background voxel of the foreground-cropped volume, whatever the normalisation) or ``published``
            (background voxels whose normalised value is above 0: the body under the published CT window).
        foreground_crops: where they centre their foreground samples: ``voxels`` (any labelled voxel alike,
            so each class in proportion to its volume: MONAI's ``RandCropByPosNegLabeld``, as published) or
            ``classes`` (a class present in the case, each alike, then a voxel of it; a region's voxels
            with regions; a union's source labels: nnU-Net's rule, so a small organ is centred as often as
            the liver).
        mirror_axes: spatial axes (after reorientation to RAS; 0 is left-right) each training crop is
            flipped along, each with probability 1/2 (``dataset.laterality``): none in the published
            chains, all three for a dataset JSON (nnU-Net's default).
        lateral_pairs: the class values that swap under a left-right flip, ``((2, 3), ...)``; None: found
            from the class names (:attr:`pairs`).
        regions: nnU-Net's region-based training: ``((name, label values), ...)``, one sigmoid output per
            region (empty: one softmax output per class); see ``dataset.labels``.
        regions_class_order: the label value each region paints in the label map, in order.
        sources: of a union of datasets (``dataset.union``): its sources (``UnionSource``), whose cases it
            trains on; empty otherwise.
        label_sets: of a union: what each source's labels say about the classes (``dataset.labels``).
    """

    name: str
    labels: tuple[str, ...]
    spacing: tuple[float, float, float] | None | str
    channels: tuple[str, ...] = ("CT",)
    normalization: tuple[ChannelNorm, ...] = (ChannelNorm("ct", ABDOMEN_WINDOW),)
    rotate_z: float = math.pi / 30
    lists: dict[str, list] = field(default_factory=dict)
    layout: str = "folders"
    root: Path | None = None
    file_ending: str = ".nii.gz"
    num_training: int | None = None
    source: str = ""
    ignore_label: int | None = None
    background_crops: str = "body"
    foreground_crops: str = "voxels"
    mirror_axes: tuple[int, ...] = ()
    lateral_pairs: tuple[tuple[int, int], ...] | None = None
    regions: tuple[tuple[str, tuple[int, ...]], ...] = ()
    regions_class_order: tuple[int, ...] = ()
    sources: tuple = ()
    label_sets: LabelSets | None = None

    def __post_init__(self) -> None:
        if len(self.normalization) != len(self.channels):
            raise ValueError(f"{len(self.normalization)} normalisations for {len(self.channels)} channels")
        if self.background_crops not in BACKGROUND_CROPS:
            expected = ", ".join(BACKGROUND_CROPS)
            raise ValueError(f"background_crops {self.background_crops!r}: expected one of {expected}")
        if self.foreground_crops not in FOREGROUND_CROPS:
            expected = ", ".join(FOREGROUND_CROPS)
            raise ValueError(f"foreground_crops {self.foreground_crops!r}: expected one of {expected}")
        if self.ignore_label is not None and self.ignore_label != len(self.labels):
            classes = len(self.labels)
            raise ValueError(f"ignore label {self.ignore_label}: must be the value after the classes ({classes})")
        if self.regions or self.regions_class_order:  # regions that do not fit the labels raise ValueError
            LabelManager(self.labels, dict(self.regions), self.regions_class_order, self.ignore_label)

    @property
    def crop_groups(self) -> tuple[tuple[int, ...], ...]:
        """The label values a ``classes`` foreground crop draws as one class: each region's, with regions;
        empty (each value of the label map alone) otherwise."""
        return tuple(values for _, values in self.regions)

    @property
    def num_classes(self) -> int:
        """The label values of the label files (background and the classes; the ignore label aside)."""
        return len(self.labels)

    @property
    def label_manager(self) -> LabelManager:
        """What the network's outputs mean: the classes, or the regions (``dataset.labels``)."""
        return LabelManager(
            self.labels, dict(self.regions), self.regions_class_order, self.ignore_label, self.label_sets
        )

    @property
    def num_outputs(self) -> int:
        """The network's output channels: one per region, else one per class."""
        return len(self.regions) or len(self.labels)

    @property
    def pairs(self) -> tuple[tuple[int, int], ...]:
        """The left/right pairs of class values: given, else found from the class names (none with regions:
        a region holds labels of either side)."""
        if self.lateral_pairs is not None:
            return self.lateral_pairs
        return () if self.regions else find_lateral_pairs(self.labels)

    @property
    def in_channels(self) -> int:
        return len(self.channels)

    def describe_channels(self) -> str:
        """``T1 zscore, T2 zscore``: each channel with its normalisation."""
        return ", ".join(f"{c} {n.describe()}" for c, n in zip(self.channels, self.normalization, strict=True))

    def to_derive(self) -> list[str]:
        """The settings the training cases must give: ``spacing``, ``foreground statistics of <channel>``
        (of ``ct_zscore``), ``z-score mask of <channel>``."""
        derived = ["spacing"] if self.spacing == MEDIAN else []
        for name, norm in zip(self.channels, self.normalization, strict=True):
            if norm.left_to_data:
                derived.append(f"{'foreground statistics' if norm.scheme == 'ct_zscore' else 'z-score mask'} of {name}")
        return derived

    def preprocessing(self) -> dict:
        """The model card's preprocessing entries: ``channels``, ``normalization`` and ``spacing``."""
        if self.to_derive():
            raise ValueError(f"{self.name}: {', '.join(self.to_derive())} not derived yet")
        return {
            "channels": list(self.channels),
            "normalization": [norm.to_json() for norm in self.normalization],
            "spacing": None if self.spacing is None else list(self.spacing),
        }

    def with_preprocessing(self, card: dict) -> DatasetConfig:
        """This dataset with the preprocessing of a model card (see :func:`card_preprocessing`)."""
        entries = card_preprocessing(card)
        spacing = entries["spacing"]
        return replace(
            self,
            channels=tuple(entries["channels"]),
            normalization=tuple(ChannelNorm.from_json(entry) for entry in entries["normalization"]),
            spacing=None if spacing is None else tuple(float(v) for v in spacing),
        )


def card_preprocessing(card: dict) -> dict:
    """The preprocessing entries of a model card (``channels``, ``normalization``, ``spacing``; see
    :meth:`DatasetConfig.preprocessing`). A card from before multi-channel support holds one CT channel's
    ``intensity`` window instead, and one from before nnU-Net's z-score rule a ``zscore`` without its
    ``nonzero_mask`` (it standardised the non-zero voxels): this translates both."""
    if "normalization" in card:
        normalization = [
            {"scheme": "zscore", "nonzero_mask": True} if entry in ("zscore", {"scheme": "zscore"}) else entry
            for entry in card["normalization"]
        ]
        channels = card.get("channels") or [f"channel {i}" for i in range(len(normalization))]
    else:
        window = [float(card["intensity"]["a_min"]), float(card["intensity"]["a_max"])]
        normalization, channels = [{"scheme": "ct", "window": window}], ["CT"]
    return {"channels": [str(name) for name in channels], "normalization": normalization, "spacing": card["spacing"]}


FLARE_LABELS = ("background", "spleen", "kidney", "liver", "pancreas")
AMOS_LABELS = (
    "background",
    "spleen",
    "right kidney",
    "left kidney",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior vena cava",
    "pancreas",
    "right adrenal gland",
    "left adrenal gland",
    "duodenum",
    "bladder",
    "prostate/uterus",
)
FETA_LABELS = (
    "background",
    "external cerebrospinal fluid",
    "grey matter",
    "white matter",
    "ventricles",
    "cerebellum",
    "deep grey matter",
    "brainstem",
)

#: The published dataset settings.
PRESETS: dict[str, DatasetConfig] = {
    "flare": DatasetConfig("flare", FLARE_LABELS, (1.0, 1.0, 1.2), background_crops="published"),
    "amos": DatasetConfig("amos", AMOS_LABELS, (1.5, 1.5, 2.0), background_crops="published"),
    "feta": DatasetConfig(
        "feta",
        FETA_LABELS,
        None,
        ("T2w",),
        (ChannelNorm("ct", (0.0, 1000.0)),),
        rotate_z=math.pi / 15,
        background_crops="published",
    ),
}


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def read_json(path: Path, flag: str) -> dict:
    """A JSON object from ``path``; a DatasetError naming ``flag`` and the file otherwise."""
    if not path.is_file():
        raise DatasetError(f"{flag} {path}: no such file")
    try:
        content = json.loads(path.read_text(), object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as error:
        raise DatasetError(
            f"{flag} {path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from None
    except _DuplicateKey as duplicate:
        raise DatasetError(
            f"{flag} {path}: key {duplicate.key!r} appears twice in one object (JSON would keep the last one "
            "silently); keep one"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{flag} {path}: cannot read: {error}") from None
    if not isinstance(content, dict):
        raise DatasetError(f"{flag} {path}: expected a JSON object at the top level")
    return content


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """``json.loads``'s ``object_pairs_hook``: an object, refusing a key given twice (which ``json`` would
    drop but for its last value: a region or label given twice would vanish without a word)."""
    content = {}
    for key, value in pairs:
        if key in content:
            raise _DuplicateKey(key)
        content[key] = value
    return content


def _labels_by_value(by_value: dict[int, str], where: str) -> tuple[str, ...]:
    if sorted(by_value) != list(range(len(by_value))):
        raise DatasetError(f"{where}: 'labels' values must be 0..{len(by_value) - 1}, got {sorted(by_value)}")
    if len(by_value) < 2:
        raise DatasetError(f"{where}: 'labels' needs background and at least one class")
    return tuple(by_value[i] for i in range(len(by_value)))


def _msd_labels(labels: object, where: str) -> tuple[str, ...]:
    """Decathlon labels: ``{"0": "background", "1": "liver"}``."""
    if not isinstance(labels, dict) or not labels:
        raise DatasetError(f'{where}: \'labels\' must be an object such as {{"0": "background", "1": "liver"}}')
    try:
        by_value = {int(key): str(name) for key, name in labels.items()}
    except ValueError:
        raise DatasetError(f"{where}: 'labels' keys must be integers, got {sorted(labels)}") from None
    return _labels_by_value(by_value, where)


def _nnunet_labels(labels: object, where: str) -> tuple[tuple[str, ...], int | None, dict[str, tuple[int, ...]]]:
    """nnU-Net v2 labels: ``{"background": 0, "liver": 1}``, with an optional ``"ignore": N`` (the highest
    value: unannotated voxels), or regions (``"whole tumor": [1, 2, 3]``: any value a list of more than one
    label, nnU-Net's rule; then every other entry but background and ignore is a region too). Returns the
    names of the label values 0..N (a value no entry names alone is ``label N``), the ignore value (None
    without one) and the regions (empty without)."""
    if not isinstance(labels, dict) or not labels:
        raise DatasetError(f'{where}: \'labels\' must be an object such as {{"background": 0, "liver": 1}}')
    labels = dict(labels)
    ignore = labels.pop("ignore", None)
    if isinstance(ignore, list | tuple):
        raise DatasetError(f"{where}: 'ignore' label {ignore!r}: must be an integer, not a region (nnU-Net's rule)")
    entries = {}
    for name, value in labels.items():
        values = value if isinstance(value, list | tuple) else [value]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise DatasetError(f"{where}: label {name!r}: expected an integer or a list of integers, got {value!r}")
        entries[str(name)] = tuple(sorted(set(values)))
    if entries.get("background") != (0,):
        raise DatasetError(f"{where}: 'labels' needs \"background\": 0 (nnU-Net's rule)")
    has_regions = any(isinstance(value, list | tuple) and len(value) > 1 for value in labels.values())
    values = sorted({v for group in entries.values() for v in group})
    holding = next((name for name, group in entries.items() if ignore is not None and ignore in group), None)
    if holding is not None:
        what = "region" if len(entries[holding]) > 1 else "label"
        raise DatasetError(
            f"{where}: 'ignore' label {ignore} is also in {what} {holding!r} {list(entries[holding])}: the ignore "
            "label must be a value of its own, above every class value (as nnU-Net requires)"
        )
    if ignore is not None and (not isinstance(ignore, int) or isinstance(ignore, bool) or ignore <= max(values)):
        raise DatasetError(
            f"{where}: 'ignore' label {ignore!r}: must be an integer above every class value (as nnU-Net requires)"
        )
    if not has_regions:
        by_value = {}
        for name, (value, *more) in entries.items():
            if more or value in by_value:
                raise DatasetError(f"{where}: two labels share one value")
            by_value[value] = name
        names = _labels_by_value(by_value, where)
        regions = {}
    else:
        if values != list(range(len(values))):
            raise DatasetError(
                f"{where}: the regions' label values {values} must be consecutive 0..{values[-1]} (nnU-Net's rule)"
            )
        regions = {name: group for name, group in entries.items() if name != "background"}
        zero = [name for name, group in regions.items() if 0 in group]
        if zero:
            raise DatasetError(f"{where}: region {zero[0]!r} {list(regions[zero[0]])} holds background 0")
        alone = {group[0]: name for name, group in regions.items() if len(group) == 1}
        names = tuple(["background"] + [alone.get(v, f"label {v}") for v in values[1:]])
        if len(names) < 2:
            raise DatasetError(f"{where}: 'labels' needs background and at least one class")
    if ignore is not None and ignore != len(names):
        raise DatasetError(
            f"{where}: 'ignore' label {ignore}: must follow the classes 0..{len(names) - 1} directly (use {len(names)})"
        )
    return names, ignore, regions


def _regions_of(content: dict, labels: tuple[str, ...], regions: dict, where: str) -> tuple[tuple, tuple[int, ...]]:
    """The regions (nnU-Net's, or our JSON's and a Decathlon file's ``"regions": {"whole tumor": [1, 2, 3]}``)
    and ``regions_class_order``, checked: one label value per region, each a class value."""
    given = content.get("regions")
    if given is not None:
        if regions:
            raise DatasetError(f"{where}: regions given twice ('regions' and region labels): keep one")
        if not isinstance(given, dict) or not given:
            raise DatasetError(f"{where}: 'regions' must be an object such as {{\"whole tumor\": [1, 2, 3]}}")
        regions = {}
        for name, values in given.items():
            values = values if isinstance(values, list) else [values]
            if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise DatasetError(f"{where}: region {name!r}: expected a list of label values, got {given[name]!r}")
            regions[str(name)] = tuple(sorted(set(values)))
    order = content.get("regions_class_order")
    if not regions:
        if order is not None:
            raise DatasetError(f"{where}: 'regions_class_order' without regions")
        return (), ()
    if order is None:
        raise DatasetError(
            f"{where}: region-based labels need 'regions_class_order' (the label value each region paints, "
            f"{counted(len(regions), 'value')}, as nnU-Net requires)"
        )
    if not (isinstance(order, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in order)):
        raise DatasetError(f"{where}: 'regions_class_order' must be a list of label values, got {order!r}")
    if len(order) != len(regions):
        raise DatasetError(
            f"{where}: 'regions_class_order' has {len(order)} values for {len(regions)} regions "
            f"({', '.join(regions)}): one per region, as nnU-Net requires"
        )
    try:
        LabelManager(labels, regions, order)
    except ValueError as error:
        raise DatasetError(f"{where}: {error}") from None
    same = _first_repeat(list(regions.values()))
    if same is not None:
        names = [name for name, values in regions.items() if values == same]
        raise DatasetError(
            f"{where}: regions {names[0]!r} and {names[1]!r} hold the same labels {list(same)}: each region must "
            "be a set of its own"
        )
    painted = _first_repeat(order)
    if painted is not None:
        names = [name for name, value in zip(regions, order, strict=True) if value == painted]
        raise DatasetError(
            f"{where}: 'regions_class_order' {order}: regions {names[0]!r} and {names[1]!r} both paint label "
            f"{painted}; each region paints a label value of its own"
        )
    covered = {value for values in regions.values() for value in values}
    uncovered = [value for value in range(1, len(labels)) if value not in covered]
    if uncovered:  # nnU-Net's labels are those of its regions: a label in none would be neither trained nor scored
        raise DatasetError(
            f"{where}: label {uncovered[0]} ({labels[uncovered[0]]}) is in no region; every label must be in one"
        )
    return tuple(regions.items()), tuple(order)


def _first_repeat(items: list) -> object | None:
    """The first item of ``items`` that an earlier one equals, or None."""
    seen = []
    for item in items:
        if item in seen:
            return item
        seen.append(item)
    return None


def parse_lists(content: dict, where: str) -> dict[str, list]:
    """The ``training`` / ``validation`` / ``test`` lists of a dataset JSON, checked entry by entry. An
    image is a path or, for one file per channel, a list of paths."""
    lists = {}
    for split in SPLITS:
        if split not in content:
            continue
        entries = content[split]
        if not isinstance(entries, list):
            raise DatasetError(f"{where}: '{split}' must be a list")
        for i, entry in enumerate(entries):
            labelled = split != "test"
            image = entry.get("image") if isinstance(entry, dict) else None
            valid = isinstance(image, str) or (
                isinstance(image, list) and image and all(isinstance(p, str) for p in image)
            )
            valid = valid and (not labelled or isinstance(entry.get("label"), str))
            if not (valid or (split == "test" and isinstance(entry, str))):
                needs = '{"image": ..., "label": ...}' if labelled else 'a path or {"image": ...}'
                raise DatasetError(f"{where}: '{split}' entry {i} must be {needs}, got {entry!r}")
        lists[split] = entries
    return lists


def _channel_names(content: dict, key: str, where: str) -> tuple[str, ...] | None:
    """Channel names from ``{"0": "T1", "1": "T2"}`` (``modality``, ``channel_names``) or a list."""
    names = content.get(key)
    if names is None:
        return None
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        return tuple(names)
    try:
        by_index = {int(index): str(name) for index, name in names.items()}
    except (AttributeError, ValueError):
        raise DatasetError(f'{where}: \'{key}\' must be an object such as {{"0": "T1", "1": "T2"}}') from None
    if sorted(by_index) != list(range(len(by_index))) or not by_index:
        raise DatasetError(f"{where}: '{key}' keys must be 0..{len(by_index) - 1}, got {sorted(by_index)}")
    return tuple(by_index[i] for i in range(len(by_index)))


def _foreground_crops(content: dict, where: str, default: str = "voxels") -> str:
    crops = content.get("foreground_crops", default)
    if crops not in FOREGROUND_CROPS:
        expected = " or ".join(FOREGROUND_CROPS)
        raise DatasetError(f"{where}: 'foreground_crops' {crops!r}: expected {expected}")
    return crops


def _spacing(content: dict, where: str) -> tuple[float, float, float] | None | str:
    if "spacing" not in content or content["spacing"] == MEDIAN:
        return MEDIAN
    spacing = content["spacing"]
    if spacing is None:
        return None
    if not (isinstance(spacing, list) and len(spacing) == 3 and all(_is_number(s) and s > 0 for s in spacing)):
        raise DatasetError(
            f"{where}: 'spacing' must be three positive numbers (mm), null (native grid) or \"median\", got {spacing!r}"
        )
    return tuple(float(s) for s in spacing)


def _default_norm(channel: str, window: tuple[float, float] | None) -> ChannelNorm:
    """A channel named CT gets ``intensity``'s window scaled to [0, 1] (``ct``, the published way) when the
    dataset gives one, else nnU-Net's CT normalisation (``ct_zscore``, derived); every other one z-scores."""
    if channel.strip().lower() != "ct":
        return ChannelNorm("zscore")
    return ChannelNorm("ct", window) if window is not None else ChannelNorm("ct_zscore")


def _normalization(content: dict, channels: tuple[str, ...], where: str, nnunet: bool) -> tuple[ChannelNorm, ...]:
    """Each channel's normalisation: ``normalization`` as given (``ct`` entries without a window take
    ``intensity``'s), else by the channel's name (:func:`_default_norm`; an nnU-Net dataset's ``noNorm``
    is ``none``, as nnU-Net reads it)."""
    window = None
    if "intensity" in content:
        intensity = content["intensity"]
        if not (isinstance(intensity, dict) and all(_is_number(intensity.get(k)) for k in ("a_min", "a_max"))):
            raise DatasetError(f'{where}: \'intensity\' must be {{"a_min": number, "a_max": number}}')
        if intensity["a_max"] <= intensity["a_min"]:
            raise DatasetError(f"{where}: 'intensity' a_max must be greater than a_min")
        window = (float(intensity["a_min"]), float(intensity["a_max"]))
    given = content.get("normalization")
    if given is None:
        return tuple(
            _named_norm(channel, window, where) if nnunet else _default_norm(channel, window) for channel in channels
        )
    entries = [given] * len(channels) if isinstance(given, str) else given
    if not isinstance(entries, list) or len(entries) != len(channels):
        raise DatasetError(
            f"{where}: 'normalization' must be one scheme or a list of {len(channels)} (one per channel: "
            f"{', '.join(channels)}), got {given!r}"
        )
    if window is not None:
        entries = [
            {"scheme": "ct", "window": list(window)}
            if entry == "ct" or (isinstance(entry, dict) and entry.get("scheme") == "ct" and "window" not in entry)
            else entry
            for entry in entries
        ]
    try:
        return tuple(ChannelNorm.from_json(entry) for entry in entries)
    except ValueError as error:
        raise DatasetError(f"{where}: 'normalization': {error}") from None


def _named_norm(channel: str, window: tuple[float, float] | None, where: str) -> ChannelNorm:
    """nnU-Net reads the normalisation from the channel name: CT (its CTNormalization), noNorm, anything else
    z-score."""
    lowered = channel.strip().lower()
    if lowered in ("rescale_to_0_1", "rgb_to_0_1"):
        raise DatasetError(
            f"{where}: channel {channel!r}: nnU-Net's {channel} normalisation is not supported; add "
            '"normalization": ["ct" with a window, "ct_zscore", "zscore" or "none" per channel] to the file'
        )
    return ChannelNorm("none") if lowered == "nonorm" else _default_norm(channel, window)


def _from_json(path: Path) -> DatasetConfig:
    where = f"--dataset {path}"
    content = read_json(path, "--dataset")
    if "sources" in content:
        from dataset.union import load_union  # a union loads its sources through this module

        return load_union(path)
    if "labels" not in content:
        raise DatasetError(f"{where}: missing 'labels'")
    nnunet = "channel_names" in content
    ignore_label, regions = None, {}
    if nnunet:
        labels, ignore_label, regions = _nnunet_labels(content["labels"], where)
        channels = _channel_names(content, "channel_names", where)
        file_ending = content.get("file_ending", ".nii.gz")
        if file_ending not in (".nii.gz", ".nii"):
            raise DatasetError(f"{where}: file_ending {file_ending!r}: only NIfTI (.nii.gz, .nii) is read")
        normalization = _normalization(content, channels, where, nnunet=True)
    else:
        labels = _msd_labels(content["labels"], where)
        channels = _channel_names(content, "channels", where) or _channel_names(content, "modality", where) or ("CT",)
        file_ending = ".nii.gz"
        normalization = _normalization(content, channels, where, nnunet=False)
    regions, regions_class_order = _regions_of(content, labels, regions, where)
    num_training = content.get("numTraining")
    if num_training is not None and not (
        isinstance(num_training, int) and not isinstance(num_training, bool) and num_training > 0
    ):
        raise DatasetError(f"{where}: 'numTraining' must be a positive integer")
    rotate_z = content.get("rotate_z", math.pi / 30)
    if not _is_number(rotate_z):
        raise DatasetError(f"{where}: 'rotate_z' must be a number (radians)")
    try:
        pairs = content.get("lateral_pairs")
        pairs = None if pairs is None else check_lateral_pairs(pairs, len(labels), where)
        if regions and pairs:
            raise ValueError(
                f"{where}: 'lateral_pairs' with regions: swapping left/right labels inside regions is not "
                "supported; leave the pairs out (mirroring then keeps every region as it is)"
            )
        axes = content.get("mirror_axes", [0, 1, 2])
        axes = check_mirror_axes(axes if isinstance(axes, list) else [axes], where)
    except ValueError as error:
        raise DatasetError(str(error)) from None
    return DatasetConfig(
        name=str(content.get("name", path.stem)),
        labels=labels,
        spacing=_spacing(content, where),
        channels=channels,
        normalization=normalization,
        rotate_z=float(rotate_z),
        lists=parse_lists(content, where) if not nnunet else {},
        layout="nnunet" if nnunet else "folders",
        root=path.resolve().parent,
        file_ending=file_ending,
        num_training=num_training,
        source=where,
        ignore_label=ignore_label,
        foreground_crops=_foreground_crops(content, where),
        mirror_axes=axes,
        lateral_pairs=pairs,
        regions=regions,
        regions_class_order=regions_class_order,
    )


def load_dataset_config(dataset: str, datalist: str | None = None) -> DatasetConfig:
    """The configuration of ``--dataset`` (a preset name or a dataset JSON of any of the formats the
    module docstring names, detected from its keys), with ``--datalist``'s lists (any MSD-style JSON)."""
    if dataset.lower() in PRESETS:
        config = replace(PRESETS[dataset.lower()], source=f"--dataset {dataset.lower()}")
    elif dataset.lower().endswith(".json") or "/" in dataset or Path(dataset).is_file():
        config = _from_json(Path(dataset))
    else:
        raise DatasetError(f"--dataset {dataset!r}: not a preset ({', '.join(PRESETS)}) nor a .json file")
    if datalist is not None:
        if config.sources:
            raise DatasetError(f"--datalist {datalist}: a union's cases are its sources'; list them in their datasets")
        path = Path(datalist)
        content = read_json(path, "--datalist")
        settings = [key for key in DATASET_SETTINGS if key in content]
        if settings:
            raise DatasetError(
                f"--datalist {path}: {', '.join(repr(key) for key in settings)} "
                f"{'is a dataset setting' if len(settings) == 1 else 'are dataset settings'}, which a datalist does "
                "not change (it gives the training/validation/test lists only): put "
                f"{'it' if len(settings) == 1 else 'them'} in a dataset JSON given as --dataset"
            )
        lists = parse_lists(content, f"--datalist {path}")
        if not lists:
            raise DatasetError(f"--datalist {path}: no 'training', 'validation' or 'test' list")
        config = replace(config, lists={**config.lists, **lists}, layout="folders")
    return config
