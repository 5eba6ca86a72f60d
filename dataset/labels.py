"""What a network's outputs mean, in one place (nnU-Net v2's ``LabelManager``): the classes of a label map, or
nnU-Net's overlapping regions, the ignore label, and how outputs become probabilities and a label map.

- Classes: one output per label value (background first); softmax; the label map is the argmax.
- Regions (nnU-Net's region-based training, e.g. BraTS's whole tumour ``[1, 2, 3]``, tumour core ``[2, 3]``,
  enhancing tumour ``[3]``): one output per region, each a sigmoid; a voxel is in a region where its
  probability is above 0.5, and the label map paints, region after region in order, the region's value of
  ``regions_class_order`` (later regions overwrite earlier ones), background elsewhere.

- Label sets (a union of datasets that annotate different classes, ``dataset.union``): the outputs are the
  unified classes; each source's label values stand for sets of them (:class:`LabelSets`), which the loss,
  the training crops and validation read.

The loss, validation, inference (every route and the MONAI bundle, which carries this file as
``scripts/labels.py``), evaluation and export ask a :class:`LabelManager`. This module imports torch only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = ["UNANNOTATED", "LabelManager", "LabelSets", "SourceLabels", "argmax_of_classes"]

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
        label_sets: for a union of datasets, what each source's labels say about the classes (the training
            label maps then hold :class:`LabelSets` codes); None otherwise.
    """

    def __init__(
        self,
        classes: Sequence[str],
        regions: Mapping[str, Sequence[int]] | None = None,
        regions_class_order: Sequence[int] | None = None,
        ignore_label: int | None = None,
        label_sets: LabelSets | None = None,
    ) -> None:
        self.classes = tuple(str(name) for name in classes)
        self.label_sets = label_sets
        if label_sets is not None and (regions or tuple(label_sets.classes) != self.classes):
            raise ValueError("label sets need the classes they are sets of, and no regions")
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
        the constructor's arguments (the bundle's config builds its manager from them). A union's model also
        records its sources (:meth:`LabelSets.to_card`), which :meth:`from_card` leaves aside: its outputs are
        plain classes."""
        card = {"classes": list(self.classes)}
        if self.label_sets is not None:
            card.update(self.label_sets.to_card())
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


#: What a union's loss does with the classes a source does not annotate: ``marginal`` (their probabilities
#: count as the source's background: the label-set loss) or ``background`` (they are trained towards 0
#: there, as if the source had annotated them absent: naive merging, the baseline it is measured against).
UNANNOTATED = ("marginal", "background")


@dataclass(frozen=True)
class SourceLabels:
    """One source of a union of datasets: what its label values say about the unified classes.

    Args:
        name: the source's name.
        label_names: the names of its label values 1, 2, ... (background 0 aside).
        sets: for each of those values, the unified class values it stands for (several: the voxel is one of
            them, e.g. FLARE's kidney is the right or the left kidney).
        ignore_label: the value of unannotated voxels in its label files (nnU-Net's ``ignore``), or None.
        weight: the share of the training batches drawn from this source (relative to the others').
    """

    name: str
    label_names: tuple[str, ...]
    sets: tuple[tuple[int, ...], ...]
    ignore_label: int | None = None
    weight: float = 1.0

    @property
    def annotated(self) -> tuple[int, ...]:
        """The unified classes this source's labels say something about (background aside)."""
        return tuple(sorted(value for group in self.sets for value in group))


class LabelSets:
    """The label sets of a union of datasets that annotate different classes: a source's label value stands
    for a set of unified classes; where a source says background, each class it does not annotate may be
    there (the label-set, or marginal, loss of Fidon et al. 2021 and Shi et al. 2021).

    Training label maps hold *codes*, one value space for every source: a class of one source label is its
    class value, a set of several classes a value after the classes (:attr:`codes`), unannotated voxels
    :attr:`ignore_code`. Each source's background 0 stays 0 and means that source's background set.

    For a case of source ``k``, the loss and validation look at the source's *channels*
    (:meth:`channels`): its background set (background and, under ``marginal``, every class the source does
    not annotate), then one per source label value; under ``background`` (naive merging), each unannotated
    class a channel of its own, never present.

    Args:
        classes: the unified classes (background first).
        sources: the sources, each with its label values' sets.
        unannotated: one of :data:`UNANNOTATED`.
        pseudo_labels: under ``marginal``, the probability above which a voxel of a source's background is
            trained as the class the source does not annotate that it is predicted to be (the loss's
            pseudo-labels), or None.
    """

    def __init__(
        self,
        classes: Sequence[str],
        sources: Sequence[SourceLabels],
        unannotated: str = "marginal",
        pseudo_labels: float | None = None,
    ) -> None:
        self.classes = tuple(classes)
        self.sources = tuple(sources)
        self.unannotated = unannotated
        self.pseudo_labels = pseudo_labels
        if unannotated not in UNANNOTATED:
            raise ValueError(f"unannotated {unannotated!r}: expected one of {', '.join(UNANNOTATED)}")
        if pseudo_labels is not None and not (unannotated == "marginal" and 0.5 <= pseudo_labels < 1):
            raise ValueError(f"pseudo_labels {pseudo_labels!r}: a probability in [0.5, 1) under 'marginal'")
        if not self.sources:
            raise ValueError("a union needs at least one source")
        codes = [(value,) for value in range(len(self.classes))]
        for source in self.sources:
            if len(source.sets) != len(source.label_names):
                raise ValueError(f"source {source.name!r}: one set per label value expected")
            if source.ignore_label not in (None, len(source.sets) + 1):
                raise ValueError(
                    f"source {source.name!r}: the ignore label must follow its labels ({len(source.sets) + 1})"
                )
            seen: set[int] = set()
            for name, group in zip(source.label_names, source.sets, strict=True):
                if not group or any(not 0 < value < len(self.classes) for value in group):
                    raise ValueError(f"source {source.name!r}: label {name!r} maps to class values {list(group)}")
                if seen & set(group):
                    raise ValueError(f"source {source.name!r}: label {name!r} overlaps another label's classes")
                seen |= set(group)
                if tuple(sorted(group)) not in codes:
                    codes.append(tuple(sorted(group)))
        self.codes = tuple(codes)
        #: The code of unannotated voxels (every source's ignore label).
        self.ignore_code = len(self.codes)
        if self.ignore_code > 255:
            raise ValueError(f"{self.ignore_code} label codes: at most 255 fit a uint8 label map")

    def code_of(self, group: Sequence[int]) -> int:
        return self.codes.index(tuple(sorted(group)))

    def channels(self, source: int) -> list[tuple[int, ...]]:
        """The class values of each of source ``source``'s channels: its background set, its label values' sets,
        then (``background``) each unannotated class alone."""
        annotated = set(self.sources[source].annotated)
        missing = tuple(value for value in range(1, len(self.classes)) if value not in annotated)
        sets = [tuple(sorted(group)) for group in self.sources[source].sets]
        if self.unannotated == "marginal":
            return [(0, *missing), *sets]
        return [(0,), *sets, *((value,) for value in missing)]

    def channel_names(self, source: int) -> list[str]:
        """What each of :meth:`channels` is called: background, the source's label names, the classes."""
        names = ["background", *self.sources[source].label_names]
        if self.unannotated == "background":
            names += [self.classes[group[0]] for group in self.channels(source)[len(names) :]]
        return names

    def raw_to_code(self, source: int) -> list[int]:
        """Lookup table: the code of each value of the source's label files (0..N, then its ignore label)."""
        labels = self.sources[source]
        table = [0, *(self.code_of(group) for group in labels.sets)]
        return table + [self.ignore_code] * (labels.ignore_label is not None)

    def code_to_channel(self, source: int) -> list[int]:
        """Lookup table over codes (0..:attr:`ignore_code`): the channel of the source each stands for; -1 for
        the ignore code and codes of other sources."""
        table = [-1] * (self.ignore_code + 1)
        table[0] = 0
        for channel, group in enumerate(self.sources[source].sets, start=1):
            table[self.code_of(group)] = channel
        return table

    def class_to_channel(self, source: int) -> list[int]:
        """Lookup table over the unified classes: the source's channel a predicted class falls in."""
        table = [0] * len(self.classes)
        for channel, group in enumerate(self.channels(source)):
            for value in group:
                table[value] = channel
        return table

    @staticmethod
    def mirror_image(group: Sequence[int], class_pairs: Sequence[tuple[int, int]]) -> tuple[int, ...]:
        """The classes of ``group`` once a left-right flip has exchanged each pair's values, sorted."""
        swap = {a: b for a, b in class_pairs} | {b: a for a, b in class_pairs}
        return tuple(sorted(swap.get(value, value) for value in group))

    def code_pairs(self, class_pairs: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
        """The codes a left-right flip exchanges: the class pairs, and each set of several classes with its
        mirror image (``dataset.union.check_mirror_images`` has checked it is a set of the same source)."""
        pairs = list(class_pairs)
        for code, group in enumerate(self.codes[len(self.classes) :], start=len(self.classes)):
            mirrored = self.mirror_image(group, class_pairs)
            if mirrored != group and mirrored in self.codes:
                pair = tuple(sorted((code, self.code_of(mirrored))))
                if pair not in pairs:
                    pairs.append(pair)
        return tuple(pairs)

    @property
    def columns(self) -> list[tuple[int, str]]:
        """The validation table's columns: (source, channel name) of every source's channels in turn."""
        return [(k, name) for k in range(len(self.sources)) for name in self.channel_names(k)]

    def columns_of(self, source: int) -> list[int]:
        """The indices of source ``source``'s columns in :attr:`columns`, its background's first."""
        return [i for i, (k, _) in enumerate(self.columns) if k == source]

    def source_label_map(self, source: int) -> dict[int, int]:
        """Each unified class to the label value of source ``source`` whose set holds it, to score a prediction
        on that source's labels (a set's prediction is the union of its classes'); a class the source does not
        annotate is its background."""
        return {value: label for label, group in enumerate(self.sources[source].sets, 1) for value in group}

    def scored_labels(self) -> dict[int, tuple[int, int, str]]:
        """What scoring cases of several sources together looks at (cross-validation of a union): key (1, 2,
        ... over every source's labels in turn) -> (source, the source's label value, ``"source label"``)."""
        keys = [
            (k, value, f"{source.name} {name}")
            for k, source in enumerate(self.sources)
            for value, name in enumerate(source.label_names, 1)
        ]
        return dict(enumerate(keys, 1))

    def to_card(self) -> dict:
        """The model card's ``sources`` (each source's labels, by name: the classes each stands for; its
        ignore label, if any), ``unannotated`` and ``pseudo_labels``: what :meth:`from_card` reads back."""
        sources = [
            {
                "name": source.name,
                "labels": {
                    name: [self.classes[value] for value in group]
                    for name, group in zip(source.label_names, source.sets, strict=True)
                },
                "weight": source.weight,
                **({"ignore_label": source.ignore_label} if source.ignore_label is not None else {}),
            }
            for source in self.sources
        ]
        return {"sources": sources, "unannotated": self.unannotated, "pseudo_labels": self.pseudo_labels}

    @classmethod
    def from_card(cls, card: Mapping) -> LabelSets | None:
        """The label sets a union's model card records (:meth:`to_card`, with its ``classes``), or None for a
        model of one dataset (no ``sources``). ValueError naming what is not understood."""
        if not card.get("sources"):
            return None
        classes = list(card.get("classes") or ())
        sources = []
        try:
            for source in card["sources"]:
                labels = source["labels"]
                sets = tuple(
                    tuple(classes.index(name) for name in ([group] if isinstance(group, str) else group))
                    for group in labels.values()
                )
                ignore, weight = source.get("ignore_label"), float(source.get("weight", 1))
                sources.append(SourceLabels(source["name"], tuple(labels), sets, ignore, weight))
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise ValueError(f"sources {card['sources']!r}: not a union's sources ({error})") from None
        return cls(classes, sources, card.get("unannotated", "marginal"), card.get("pseudo_labels"))
