"""A union of datasets that annotate different classes, trained as one dataset (``--dataset union.json``).

The JSON lists the unified classes and the source datasets, each with how its labels map into those classes::

    {"name": "FLARE+AMOS",
     "classes": ["background", "spleen", "right kidney", "left kidney", ...],
     "sources": [
        {"name": "flare", "dataset": "flare", "root": "/data/FLARE",
         "labels": {"spleen": "spleen", "kidney": ["right kidney", "left kidney"], "liver": "liver",
                    "pancreas": "pancreas"}},
        {"name": "amos", "dataset": "amos", "root": "/data/AMOS", "labels": {...}, "weight": 1}],
     "test": [{"image": "...", "label": "..."}]}

``dataset`` takes what ``--dataset`` takes (a preset, which needs ``root``; a Decathlon or nnU-Net
``dataset.json``; this repository's JSON), relative paths from the union JSON's folder; ``root`` defaults
to the source JSON's folder. A source label maps to one class or to a set of them (the voxel is one of
them); every label of a source is mapped. ``weight`` (default 1) is the source's share of the training
batches. Optional keys of the union: ``unannotated`` (``marginal``, the label-set loss, or ``background``:
naive merging, for comparison), ``pseudo_labels`` (under ``marginal``, a probability in [0.5, 1): a voxel of a
source's background whose predicted probability of a class the source does not annotate, e.g. the pancreas, is
above it is trained as that class by the cross-entropy; default 0.9, ``false`` for none), ``test`` (a test list
with the unified classes, relative to the union's folder), and the dataset settings of this repository's JSON
(``spacing``, ``intensity``, ``normalization``, ``rotate_z``, ``mirror_axes``, ``lateral_pairs``,
``foreground_crops``), which win over the sources'. Without them: a setting all sources share is the union's;
spacings that differ become the median of the union's training cases (derived); normalisations or rotations
that differ are refused (give the union's own); the mirrored axes are those every source mirrors. The
foreground crops are the union's own (default ``classes``: among the source's labels present in the case, each
alike, FLARE's kidney one of them; a source's ``foreground_crops`` is not used).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from dataset.description import (
    MEDIAN,
    PRESETS,
    DatasetConfig,
    DatasetError,
    _foreground_crops,
    _is_number,
    _normalization,
    _spacing,
    load_dataset_config,
    parse_lists,
    read_json,
)
from dataset.labels import UNANNOTATED, LabelSets, SourceLabels
from dataset.laterality import (
    LEFT_RIGHT_AXIS,
    check_lateral_pairs,
    check_mirror_axes,
)

__all__ = ["UnionSource", "check_mirror_images", "load_union"]

#: The keys of a union JSON.
UNION_KEYS = (
    "name",
    "description",
    "classes",
    "sources",
    "unannotated",
    "pseudo_labels",
    "test",
    "spacing",
    "intensity",
    "normalization",
    "rotate_z",
    "mirror_axes",
    "lateral_pairs",
    "foreground_crops",
)
SOURCE_KEYS = ("name", "dataset", "root", "labels", "weight")
#: A union's defaults where its JSON is silent: the configuration that met the issue's criterion on the
#: two-source phantom on each of four seeds (BENCHMARKS.md, "Several datasets, different labels"); without
#: pseudo-labels one seed never learnt the class only one source labels.
DEFAULT_PSEUDO_LABELS = 0.9
DEFAULT_FOREGROUND_CROPS = "classes"


@dataclass(frozen=True)
class UnionSource:
    """One source of a union: its name, its dataset (``root`` set to its folder) and batch weight."""

    name: str
    config: DatasetConfig
    weight: float


def load_union(path: Path) -> DatasetConfig:
    """The dataset of a union JSON: the unified classes, the sources' label sets and cases, the settings."""
    where = f"--dataset {path}"
    content = read_json(path, "--dataset")
    unknown = [key for key in content if key not in UNION_KEYS]
    if unknown:
        raise DatasetError(f"{where}: unknown key {unknown[0]!r} (a union takes {', '.join(UNION_KEYS)})")
    classes = _classes(content.get("classes"), where)
    entries = content["sources"]
    if not isinstance(entries, list) or not entries:
        raise DatasetError(f"{where}: 'sources' must be a list of source datasets")
    folder = path.resolve().parent
    sources = [_source(entry, i, folder, where) for i, entry in enumerate(entries)]
    names = [source.name for source in sources]
    repeated = next((name for name in names if names.count(name) > 1), None)
    if repeated is not None:
        raise DatasetError(f"{where}: two sources are named {repeated!r}; each needs a name of its own")
    sets = [
        _label_sets(entry["labels"], source, classes, where) for entry, source in zip(entries, sources, strict=True)
    ]
    unannotated = content.get("unannotated", "marginal")
    if unannotated not in UNANNOTATED:
        raise DatasetError(f"{where}: 'unannotated' {unannotated!r}: expected one of {', '.join(UNANNOTATED)}")
    pseudo_labels = _pseudo_labels(content, unannotated, where)
    annotated = {value for source_sets in sets for group in source_sets for value in group}
    missing = [value for value in range(1, len(classes)) if value not in annotated]
    if missing:
        raise DatasetError(
            f"{where}: class {classes[missing[0]]!r} is annotated by no source; every class needs one that labels it"
        )
    channels = _channels(sources, where)
    settings = _settings(content, sources, channels, classes, where)
    label_sets = LabelSets(
        classes,
        [
            SourceLabels(s.name, s.config.labels[1:], tuple(groups), s.config.ignore_label, s.weight)
            for s, groups in zip(sources, sets, strict=True)
        ],
        unannotated,
        pseudo_labels,
    )
    lists = {}
    if "test" in content:
        lists = parse_lists({"test": content["test"]}, where)
    first = sources[0].config
    config = DatasetConfig(
        name=str(content.get("name", path.stem)),
        labels=classes,
        channels=channels,
        lists=lists,
        root=folder,
        source=where,
        background_crops=_shared([s.config.background_crops for s in sources], "body"),
        sources=tuple(sources),
        label_sets=label_sets,
        file_ending=first.file_ending,
        **settings,
    )
    check_mirror_images(config, where)
    return config


def _pseudo_labels(content: dict, unannotated: str, where: str) -> float | None:
    """The union's pseudo-label threshold: its ``pseudo_labels``, :data:`DEFAULT_PSEUDO_LABELS` under
    ``marginal`` when it gives none, None for ``false`` (or ``null``) and for naive merging."""
    if "pseudo_labels" not in content:
        return DEFAULT_PSEUDO_LABELS if unannotated == "marginal" else None
    pseudo_labels = content["pseudo_labels"]
    if pseudo_labels is None or pseudo_labels is False:
        return None
    if not (_is_number(pseudo_labels) and 0.5 <= pseudo_labels < 1):
        raise DatasetError(
            f"{where}: 'pseudo_labels' {pseudo_labels!r}: expected a probability in [0.5, 1), or false for none"
        )
    if unannotated != "marginal":
        raise DatasetError(f"{where}: 'pseudo_labels' needs 'unannotated' marginal (naive merging has no sets)")
    return float(pseudo_labels)


def _classes(classes: object, where: str) -> tuple[str, ...]:
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)):
        raise DatasetError(f"{where}: 'classes' must list the unified classes, background first (at least two names)")
    keys = [_key(name) for name in classes]
    repeated = next((name for name, key in zip(classes, keys, strict=True) if keys.count(key) > 1), None)
    if repeated is not None:
        raise DatasetError(f"{where}: class {repeated!r} is listed twice in 'classes'")
    return tuple(classes)


def _key(name: str) -> str:
    """Class names compare without case and with ``_`` as a space."""
    return " ".join(name.replace("_", " ").lower().split())


def _source(entry: object, index: int, folder: Path, where: str) -> UnionSource:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
        raise DatasetError(f"{where}: source {index} must be an object with a 'name', 'dataset' and 'labels'")
    name = entry["name"]
    here = f"{where}: source {name!r}"
    unknown = [key for key in entry if key not in SOURCE_KEYS]
    if unknown:
        raise DatasetError(f"{here}: unknown key {unknown[0]!r} (a source takes {', '.join(SOURCE_KEYS)})")
    for key in ("dataset", "labels"):
        if key not in entry:
            raise DatasetError(f"{here}: missing {key!r}")
    if not isinstance(entry["dataset"], str):
        raise DatasetError(f"{here}: 'dataset' must be a preset name or the path of a dataset JSON")
    weight = entry.get("weight", 1)
    if not (_is_number(weight) and weight > 0):
        raise DatasetError(f"{here}: 'weight' {weight!r} must be a positive number")
    dataset = entry["dataset"]
    try:
        config = load_dataset_config(dataset if dataset.lower() in PRESETS else str(folder / dataset))
    except DatasetError as error:
        raise DatasetError(f"{here}: {error}") from None
    if config.sources:
        raise DatasetError(f"{here}: a union inside a union; list its sources here instead")
    if config.regions:
        raise DatasetError(f"{here}: a region dataset; label sets are of class labels")
    root = entry.get("root")
    if root is not None:
        if not isinstance(root, str):
            raise DatasetError(f"{here}: 'root' must be a folder path")
        root_path = folder / root
        if not root_path.is_dir():
            raise DatasetError(f"{here}: root {root_path}: no such folder")
        config = replace(config, root=root_path)
    elif config.root is None:
        raise DatasetError(f"{here}: the preset {dataset!r} needs 'root' (the folder of imagesTr, ...)")
    return UnionSource(name, config, float(weight))


def _label_sets(labels: object, source: UnionSource, classes: tuple[str, ...], where: str) -> list[tuple[int, ...]]:
    """The unified class values of each of the source's label values 1, 2, ... (checked)."""
    here = f"{where}: source {source.name!r}"
    own = source.config.labels[1:]
    if not isinstance(labels, dict) or not labels:
        raise DatasetError(f'{here}: \'labels\' must map each of its labels to classes, e.g. {{"{own[0]}": "..."}}')
    class_of = {_key(name): value for value, name in enumerate(classes)}
    own_keys = {_key(name): name for name in own}
    unknown = [name for name in labels if _key(name) not in own_keys]
    if unknown:
        raise DatasetError(f"{here}: it has no label {unknown[0]!r} (its labels: {', '.join(own)})")
    given = {_key(name): value for name, value in labels.items()}
    sets, taken = [], {}
    for value, name in enumerate(own, start=1):
        target = given.get(_key(name))
        targets = target if isinstance(target, list) else [] if target is None else [target]
        if not targets or not all(isinstance(t, str) for t in targets):
            raise DatasetError(
                f"{here}: label {name!r} (value {value}) is mapped to no class; map it to a class or a list of classes"
            )
        group = []
        for target_name in targets:
            if _key(target_name) not in class_of:
                raise DatasetError(f"{here}: label {name!r} maps to {target_name!r}, which is not in 'classes'")
            class_value = class_of[_key(target_name)]
            if class_value == 0:
                raise DatasetError(
                    f"{here}: label {name!r} maps to {target_name!r}, the background (the first of 'classes'); "
                    "leave background out of 'labels'"
                )
            if class_value in group:
                raise DatasetError(f"{here}: label {name!r} lists class {target_name!r} twice")
            if class_value in taken:
                other = taken[class_value]
                raise DatasetError(
                    f"{here}: labels {other!r} and {name!r} both hold class {target_name!r}; a class may be in one "
                    "label of a source only"
                )
            group.append(class_value)
        for class_value in group:
            taken[class_value] = name
        sets.append(tuple(sorted(group)))
    return sets


def _channels(sources: list[UnionSource], where: str) -> tuple[str, ...]:
    first = sources[0]
    for source in sources[1:]:
        if source.config.in_channels != first.config.in_channels:
            raise DatasetError(
                f"{where}: source {source.name!r} has {source.config.in_channels} input channels "
                f"({', '.join(source.config.channels)}), source {first.name!r} {first.config.in_channels} "
                f"({', '.join(first.config.channels)}); the sources of a union must have the same channels"
            )
    return first.config.channels


def _shared(values: list, default):
    """The value every source has, else ``default``."""
    return values[0] if all(value == values[0] for value in values) else default


def _settings(content: dict, sources: list[UnionSource], channels: tuple[str, ...], classes, where: str) -> dict:
    """The union's spacing, normalisation, rotation, foreground crops, mirrored axes and left/right pairs (module
    docstring)."""
    configs = [source.config for source in sources]
    names = ", ".join(source.name for source in sources)
    if "spacing" in content:
        spacing = _spacing(content, where)
    else:
        spacing = _shared([config.spacing for config in configs], MEDIAN)
    if "normalization" in content or "intensity" in content:
        normalization = _normalization(content, channels, where, nnunet=False)
    else:
        normalization = _shared([config.normalization for config in configs], None)
        if normalization is None:
            described = "; ".join(f"{s.name}: {s.config.describe_channels()}" for s in sources)
            raise DatasetError(
                f"{where}: the sources normalise their channels differently ({described}); give the union's "
                "'normalization' (or 'intensity')"
            )
    if "rotate_z" in content:
        rotate_z = content["rotate_z"]
        if not _is_number(rotate_z):
            raise DatasetError(f"{where}: 'rotate_z' must be a number (radians)")
    else:
        rotate_z = _shared([config.rotate_z for config in configs], None)
        if rotate_z is None:
            raise DatasetError(
                f"{where}: the sources ({names}) rotate by different ranges; give the union's 'rotate_z'"
            )
    # The draw runs on the union's label sets, so it is the union's setting, not the sources'.
    foreground_crops = _foreground_crops(content, where, default=DEFAULT_FOREGROUND_CROPS)
    try:
        if "mirror_axes" in content:
            axes = content["mirror_axes"]
            mirror_axes = check_mirror_axes(axes if isinstance(axes, list) else [axes], where)
        else:
            mirror_axes = tuple(a for a in configs[0].mirror_axes if all(a in c.mirror_axes for c in configs))
        pairs = content.get("lateral_pairs")
        pairs = None if pairs is None else check_lateral_pairs(pairs, len(classes), where)
    except ValueError as error:
        raise DatasetError(str(error)) from None
    return {
        "spacing": spacing,
        "normalization": normalization,
        "rotate_z": float(rotate_z),
        "foreground_crops": foreground_crops,
        "mirror_axes": mirror_axes,
        "lateral_pairs": pairs,
    }


def check_mirror_images(config: DatasetConfig, where: str) -> None:
    """Where a union's crops are flipped left-right, each source label must have its mirror image among the
    same source's labels (itself, for a label holding both sides): the flipped crop's labels then still say
    what the source knows. A DatasetError naming the label otherwise."""
    if not config.sources or LEFT_RIGHT_AXIS not in config.mirror_axes:
        return
    label_sets = config.label_sets
    classes = label_sets.classes
    for source in label_sets.sources:
        groups = {tuple(sorted(group)) for group in source.sets}
        for name, group in zip(source.label_names, source.sets, strict=True):
            mirrored = label_sets.mirror_image(group, config.pairs)
            if mirrored not in groups:
                missing = ", ".join(classes[v] for v in mirrored)
                raise DatasetError(
                    f"{where}: source {source.name!r}: label {name!r} has no mirror image among the source's labels "
                    f"(a left-right flip turns it into {missing}, which no label of the source is): add that label "
                    "or leave axis 0 out of the mirrored axes ('mirror_axes')"
                )
