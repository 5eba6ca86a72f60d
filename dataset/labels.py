"""What a network's outputs mean, in one place (nnU-Net v2's ``LabelManager``): the classes of a label map, or
nnU-Net's overlapping regions, the ignore label, and how outputs become probabilities and a label map.

- Classes: one output per label value (background first); softmax; the label map is the argmax.
- Regions (nnU-Net's region-based training, e.g. BraTS's whole tumour ``[1, 2, 3]``, tumour core ``[2, 3]``,
  enhancing tumour ``[3]``): one output per region, each a sigmoid; a voxel is in a region where its
  probability is above 0.5, and the label map paints, region after region in order, the region's value of
  ``regions_class_order`` (later regions overwrite earlier ones), background elsewhere.

The loss, validation, inference (every route and the MONAI bundle, which carries this file as
``scripts/labels.py``), evaluation and export ask a :class:`LabelManager`. This module imports torch only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["LabelManager", "argmax_of_classes"]

#: The probability above which a voxel is in a region (nnU-Net's rule).
REGION_THRESHOLD = 0.5


def argmax_of_classes(values: torch.Tensor) -> torch.Tensor:
    """``values.argmax(dim=0)`` as uint8 (the first class on ties), class by class: a reduction over the
    outermost axis is 6-9x slower on the CPU than these whole-volume comparisons (BENCHMARKS.md)."""
    best, labels = values[0].clone(), torch.zeros(values.shape[1:], dtype=torch.uint8, device=values.device)
    for value in range(1, values.shape[0]):
        higher = values[value] > best
        labels.masked_fill_(higher, value)
        best = torch.where(higher, values[value], best)
    return labels


class LabelManager:
    """The meaning of a network's output channels.

    Args:
        classes: the names of the label values 0, 1, ... (background first).
        regions: region name -> the label values it unites, in output order; empty for class outputs.
        regions_class_order: the label value each region paints in the label map (one per region).
        ignore_label: the label value of unannotated voxels (after the classes), or None.
    """

    def __init__(
        self,
        classes: Sequence[str],
        regions: Mapping[str, Sequence[int]] | None = None,
        regions_class_order: Sequence[int] | None = None,
        ignore_label: int | None = None,
    ) -> None:
        self.classes = tuple(str(name) for name in classes)
        self.regions = {str(name): tuple(int(v) for v in values) for name, values in (regions or {}).items()}
        self.regions_class_order = tuple(int(v) for v in regions_class_order or ())
        self.ignore_label = ignore_label
        if len(self.classes) < 2:
            raise ValueError(f"classes {list(self.classes)}: background and at least one class are needed")
        if self.regions and len(self.regions_class_order) != len(self.regions):
            raise ValueError(
                f"regions_class_order {list(self.regions_class_order)}: one label value per region expected "
                f"({len(self.regions)} regions: {', '.join(self.regions)})"
            )
        if not self.regions and self.regions_class_order:
            raise ValueError("regions_class_order without regions")
        for name, values in self.regions.items():
            outside = [v for v in values if not 0 < v < len(self.classes)]
            if not values or outside:
                raise ValueError(f"region {name!r} {list(values)}: label values must be 1..{len(self.classes) - 1}")
        outside = [v for v in self.regions_class_order if not 0 < v < len(self.classes)]
        if outside:
            raise ValueError(
                f"regions_class_order {list(self.regions_class_order)}: values must be 1..{len(self.classes) - 1}"
            )

    @property
    def has_regions(self) -> bool:
        return bool(self.regions)

    @property
    def num_outputs(self) -> int:
        """The network's output channels: one per region, else one per class."""
        return len(self.regions) if self.regions else len(self.classes)

    @property
    def output_names(self) -> list[str]:
        """What each output channel is: a region's name, else a class's."""
        return list(self.regions) if self.regions else list(self.classes)

    def describe(self) -> str:
        """``3 regions (whole tumor [1, 2, 3], ...; painted 1, 2, 3)`` or ``5 classes (background, ...)``."""
        if not self.regions:
            return f"{len(self.classes)} classes ({', '.join(self.classes)})"
        regions = ", ".join(f"{name} {list(values)}" for name, values in self.regions.items())
        order = ", ".join(map(str, self.regions_class_order))
        return f"{len(self.regions)} regions ({regions}; label map painted {order} in that order)"

    def label_map_names(self) -> dict[int, str]:
        """What each value of the label map (:meth:`label_map`) means: background, then each class, or for
        regions each painted value named after the region that paints it (the last one to paint it wins)."""
        if not self.regions:
            return dict(enumerate(self.classes))
        names = {0: self.classes[0]}
        for name, value in zip(self.regions, self.regions_class_order, strict=True):
            names[value] = name
        return dict(sorted(names.items()))

    def same_outputs(self, other: LabelManager) -> bool:
        """Whether two models' outputs mean the same (an ensemble averages them)."""
        mine = (self.classes, tuple(self.regions.items()), self.regions_class_order)
        return mine == (other.classes, tuple(other.regions.items()), other.regions_class_order)

    def to_card(self) -> dict:
        """The model card's entries (``classes``; with regions, ``regions`` and ``regions_class_order``): also
        the constructor's arguments (the bundle's config builds its manager from them)."""
        card = {"classes": list(self.classes)}
        if self.regions:
            card["regions"] = {name: list(values) for name, values in self.regions.items()}
            card["regions_class_order"] = list(self.regions_class_order)
        return card

    @classmethod
    def from_card(cls, card: Mapping, classes: Sequence[str] | None = None) -> LabelManager:
        """The manager a model card records (``classes``, else the given ones, else ``class i`` for each
        output; ``regions``, ``regions_class_order``, ``ignore_label``)."""
        regions = card.get("regions") or None
        names = card.get("classes") or classes
        if not names:
            count = int(card["out_channels"]) if not regions else 1 + max(max(v) for v in regions.values())
            names = [f"class {i}" for i in range(count)]
        return cls(names, regions, card.get("regions_class_order"), card.get("ignore_label"))

    def finish(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities of outputs ``K, ...`` (channels first): a softmax over the classes, or a sigmoid per
        region."""
        return torch.sigmoid(logits) if self.regions else torch.softmax(logits, dim=0)

    def label_map(self, probabilities: torch.Tensor) -> torch.Tensor:
        """The uint8 label map of probabilities ``K, ...``: the argmax of the classes, or each region above
        0.5 painted with its value of ``regions_class_order``, in order, over background."""
        if not self.regions:
            return argmax_of_classes(probabilities)
        labels = torch.zeros(probabilities.shape[1:], dtype=torch.uint8, device=probabilities.device)
        for channel, value in enumerate(self.regions_class_order):
            labels.masked_fill_(probabilities[channel] > REGION_THRESHOLD, value)
        return labels

    def outside_probabilities(self) -> list[float]:
        """The probability of each output where the network did not look (outside the foreground crop):
        certain background, which no region contains."""
        return [0.0] * len(self.regions) if self.regions else [1.0] + [0.0] * (len(self.classes) - 1)

    def scored(self) -> dict[int, tuple[str, tuple[int, ...]]]:
        """What evaluation scores: key -> (name, label values): each foreground class (key: its value), or
        each region (key: its output index + 1), as nnU-Net scores ``foreground_labels`` or ``foreground_regions``."""
        if self.regions:
            return {i + 1: (name, values) for i, (name, values) in enumerate(self.regions.items())}
        return {value: (name, (value,)) for value, name in enumerate(self.classes) if value}

    @property
    def foreground_values(self) -> tuple[int, ...]:
        """Every label value but background: nnU-Net's foreground as a whole (its first keep-largest stage)."""
        return tuple(range(1, len(self.classes)))

    def keep_largest_values(self, entries: Sequence[int | Sequence[int]]) -> list[int | tuple[int, ...]]:
        """Keep-largest entries (``test_seg.py --keep_largest``, a study plan's ``keep_largest``) as the label
        values each keeps as one, in order: a number is a class value, or for a region model a region number
        (1 the first, its region's values); a group of label values (nnU-Net's foreground as a whole, ``[1, 2,
        3]``) stays a group. ValueError naming what is not one."""
        values = []
        regions = self.scored() if self.regions else None
        for entry in entries:
            if isinstance(entry, int) and not isinstance(entry, bool):
                if regions is not None:
                    if entry not in regions:
                        names = ", ".join(f"{key} {name}" for key, (name, _) in regions.items())
                        raise ValueError(f"region {entry}: the model's regions are {names}")
                    values.append(regions[entry][1])
                elif not 0 < entry < len(self.classes):
                    raise ValueError(f"class {entry}: classes are 1..{len(self.classes) - 1} (0 is background)")
                else:
                    values.append(entry)
                continue
            group = tuple(entry) if isinstance(entry, Sequence) and not isinstance(entry, str) else ()
            if not group or any(not isinstance(v, int) or not 0 < v < len(self.classes) for v in group):
                raise ValueError(f"{entry!r}: a group of label values 1..{len(self.classes) - 1} expected")
            values.append(group)
        return values

    def region_masks(self, label: torch.Tensor) -> torch.Tensor:
        """Region membership of a label map (``B, 1, ...`` or ``B, ...``) as ``B, R, ...`` booleans: nnU-Net's
        ``ConvertSegmentationToRegionsTransform``."""
        label = label[:, 0] if label.dim() >= 5 else label
        label = label.long()
        masks = [torch.isin(label, torch.tensor(values, device=label.device)) for values in self.regions.values()]
        return torch.stack(masks, dim=1)

    def annotated(self, label: torch.Tensor) -> torch.Tensor | None:
        """Where a label map is annotated (not the ignore label), or None without an ignore label."""
        return None if self.ignore_label is None else label != self.ignore_label
