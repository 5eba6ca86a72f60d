"""Finding a dataset's cases and pairing their files: images with labels by case name (never by
position), channel files grouped by case, test labels by name; cross-validation folds.

A case is ``{"image": path, "label": path}``; a multi-channel image is one 4D file (channels last, as
in the Medical Segmentation Decathlon) or a list of files, one per channel (nnU-Net's
``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``...).
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence
from pathlib import Path

from dataset.description import SPLITS, DatasetConfig, DatasetError, counted
from dataset.portable import holds_channels

__all__ = [
    "NIFTI_ENDINGS",
    "case_files",
    "case_name",
    "cases_from_paths",
    "find_cases",
    "label_for",
    "resolve_root",
    "split_folds",
    "summarise_problems",
]

NIFTI_ENDINGS = (".nii.gz", ".nii")
CHANNEL_SUFFIX = re.compile(r"^(.+)_(\d{4})$")


def _stem(path: str | os.PathLike) -> str:
    name = Path(path).name
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending):
            return name[: -len(ending)]
    return name


def case_name(path: str | os.PathLike | Sequence) -> str:
    """Case identifier of an image (its first channel file) or label file: the name without ``.nii.gz``
    and a ``_0000`` channel suffix."""
    if not isinstance(path, str | os.PathLike):
        path = path[0]
    name = _stem(path)
    match = CHANNEL_SUFFIX.match(name)
    return match.group(1) if match else name


def case_files(case: dict) -> list[str]:
    """Every file of a case: its image file(s), then its label if it has one."""
    image = case["image"]
    return [*([image] if isinstance(image, str) else image), *([case["label"]] if "label" in case else [])]


def resolve_root(config: DatasetConfig, root: str | os.PathLike | None) -> Path:
    """``--root``, else the folder of the dataset JSON; a DatasetError for a preset without ``--root``."""
    if root is None:
        if config.root is None:
            raise DatasetError(f"--root is needed with {config.source or config.name} (the folder of imagesTr, ...)")
        return config.root
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"--root {root}: no such folder")
    return root


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(NIFTI_ENDINGS) and not p.name.startswith("."))


def _group_channels(images: list[Path], labelled: set[str] | None, config: DatasetConfig) -> tuple[dict, list]:
    """Image files by case: a file named as a label, or ``<case>_NNNN`` of a labelled case, is the image of
    that case; with several channels, ``<case>_0000``, ``<case>_0001``... files of one folder are the
    channel files of one case and any other file (one of several channels whatever its name,
    ``dataset.portable.holds_channels``) an image of its own. Returns
    ``{case: path or [channel paths]}`` and the problems found."""
    channels: dict[str, dict[int, Path]] = {}
    singles: dict[str, Path] = {}
    problems = []
    for path in images:
        stem, match = _stem(path), CHANNEL_SUFFIX.match(_stem(path))
        if labelled is not None and stem in labelled:
            case = stem
        elif match and (
            (config.in_channels > 1 and not holds_channels(path))
            or (labelled is not None and match.group(1) in labelled)
        ):
            case, index = match.group(1), int(match.group(2))
            if config.in_channels > 1:
                if index >= config.in_channels:
                    problems.append(
                        f"{path}: channel {index}, but the dataset has {config.in_channels} "
                        f"({', '.join(config.channels)})"
                    )
                found = channels.setdefault(case, {})
                elsewhere = next((other for other in found.values() if other.parent != path.parent), None)
                if elsewhere is not None:
                    problems.append(
                        f"{path}: channel file of case {case!r} in another folder than {elsewhere}; the channel "
                        "files of a case must lie side by side, and case names be unique across folders"
                    )
                found[index] = path
                continue
        else:
            case = stem
        if case in singles:
            problems.append(f"{path}: second image for case {case!r} (also {singles[case]})")
        singles[case] = path
    grouped: dict[str, Path | list[Path]] = dict(singles)
    for case, files in channels.items():
        if case in singles:
            problems.append(
                f"{singles[case]}: case {case!r} has both this image and channel files ({files[min(files)]})"
            )
            continue
        folder = files[min(files)].parent
        for index, channel in enumerate(config.channels):
            if index not in files:
                expected = folder / f"{case}_{index:04d}{config.file_ending}"
                apart = " (it holds several channels: a case of its own)" if expected in images else ""
                problems.append(f"{expected}: missing (channel {index}, {channel}, of case {case!r}){apart}")
        grouped[case] = [files[i] for i in sorted(files)]
    return grouped, problems


def _pair_folders(
    root: Path, image_dir: str, label_dir: str | None, config: DatasetConfig, labels_required: bool = True
) -> list[dict]:
    """The cases of ``root/image_dir`` paired with ``root/label_dir`` by case name; without
    ``labels_required`` (test cases) an image without a label is a case without one, a label without an
    image is left aside."""
    images_path = root / image_dir
    if not images_path.is_dir():
        raise DatasetError(f"{images_path}: missing folder (expected the published layout under --root)")
    images = _nifti_files(images_path)
    if not images:
        raise DatasetError(f"{images_path}: no .nii.gz images")
    labels: dict[str, Path] = {}
    if label_dir is not None:
        labels_path = root / label_dir
        if not labels_path.is_dir():
            raise DatasetError(f"{labels_path}: missing folder (labels for {images_path})")
        for path in _nifti_files(labels_path):
            labels[_stem(path)] = path
    grouped, problems = _group_channels(images, set(labels) if label_dir is not None else None, config)
    cases = []
    for case in sorted(grouped.keys() | labels.keys()):
        image = grouped.get(case)
        if image is None:
            if labels_required:
                problems.append(f"{labels[case]}: no image for this label in {images_path}")
            continue
        entry = {"image": str(image) if isinstance(image, Path) else [str(p) for p in image]}
        if case in labels:
            entry["label"] = str(labels[case])
        elif label_dir is not None and labels_required:
            problems.append(f"{case_files(entry)[0]}: no label for this image in {root / label_dir}")
            continue
        cases.append(entry)
    if problems:
        raise DatasetError(summarise_problems(problems))
    return cases


def label_for(image: str | os.PathLike | Sequence, folder: Path, file_ending: str = ".nii.gz") -> Path | None:
    """The label of an image in ``folder``: named as the image (its first channel file) is, else as its case
    (without the ``_0000`` channel suffix); with ``file_ending``, else the other NIfTI ending. None when
    neither exists."""
    first = image if isinstance(image, str | os.PathLike) else image[0]
    endings = [file_ending, *(e for e in NIFTI_ENDINGS if e != file_ending)]
    for name in dict.fromkeys((_stem(first), case_name(first))):
        for ending in endings:
            if (folder / f"{name}{ending}").is_file():
                return folder / f"{name}{ending}"
    return None


def _from_list(root: Path, entries: list, test_labels: Path | None, file_ending: str) -> list[dict]:
    """Cases of a JSON list; unlabelled test entries take their label from ``test_labels`` (labelsTs) where
    it holds one (see :func:`label_for`)."""
    cases = []
    for entry in entries:
        entry = {"image": entry} if isinstance(entry, str) else entry
        image = entry["image"]
        case = {"image": str(root / image) if isinstance(image, str) else [str(root / p) for p in image]}
        if "label" in entry:
            case["label"] = str(root / entry["label"])
        elif test_labels is not None:
            label = label_for(case["image"], test_labels, file_ending)
            if label is not None:
                case["label"] = str(label)
        cases.append(case)
    return cases


def cases_from_paths(paths: Sequence[str | os.PathLike], config: DatasetConfig) -> list[dict]:
    """The cases of NIfTI files and folders of them given by path (``test_seg.py --input``), without any
    dataset layout: for several channels, ``<case>_0000``, ``<case>_0001``... files are grouped by case
    (and any other file is a 4D image), as in the dataset folders."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = _nifti_files(path)
            if not found:
                raise DatasetError(f"--input {path}: no .nii.gz images in this folder")
            skipped = sorted(p.name for p in path.iterdir() if p.is_file() and p not in found)
            if skipped:
                print(
                    f"note: --input {path}: skipped {counted(len(skipped), 'file')} that are not NIfTI: "
                    f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}"
                )
            files += found
        elif path.is_file() and path.name.endswith(NIFTI_ENDINGS):
            files.append(path)
        else:
            what = "not a NIfTI file (.nii.gz, .nii)" if path.exists() else "no such file or folder"
            raise DatasetError(f"--input {path}: {what}")
    grouped, problems = _group_channels(sorted(set(files)), None, config)
    if problems:
        raise DatasetError(summarise_problems(problems))
    return [
        {"image": str(image) if isinstance(image, Path) else [str(p) for p in image]}
        for _, image in sorted(grouped.items())
    ]


def find_cases(config: DatasetConfig, root: str | os.PathLike | None, split: str) -> list[dict]:
    """The cases of ``split`` (training, validation or test) under ``root`` (None: the dataset JSON's folder).

    Lists from the dataset JSON or ``--datalist`` win; otherwise the published folders (imagesTr,
    labelsTr, ...) are read and images paired with labels by case name (never by position), channel files
    grouped by case. Test cases carry a label where ``labelsTs`` holds one (see :func:`label_for`). A
    dataset without validation cases raises a DatasetError that says to pass ``--fold``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if config.sources:
        return _union_cases(config, root, split)
    root = resolve_root(config, root)
    image_dir, label_dir = SPLITS[split]
    if split == "test" and not (root / label_dir).is_dir():
        label_dir = None
    if split in config.lists:
        entries = config.lists[split]
        if not entries:
            raise DatasetError(f"the {split} list of {config.name} is empty")
        cases = _from_list(root, entries, root / label_dir if label_dir else None, config.file_ending)
        where = f"its {split} list"
    elif split == "validation" and (config.lists or config.layout == "nnunet" or not (root / image_dir).is_dir()):
        raise DatasetError(
            f"{config.source or config.name}: the dataset has no validation cases; pass --fold 0 (of --num_folds 5) "
            "to validate on a fifth of the training cases (--fold 1..4 for the other folds), or --fold all to "
            "train on every case without validation"
        )
    else:
        cases = _pair_folders(root, image_dir, label_dir, config, labels_required=split != "test")
        where = f"{root / image_dir}" + (f" and {root / label_dir}" if label_dir else "")
    if split == "training" and config.num_training is not None and config.num_training != len(cases):
        raise DatasetError(
            f"{config.source}: numTraining is {config.num_training}, but {where} hold{'s' * where.startswith('its')} "
            f"{counted(len(cases), 'case')}"
        )
    return cases


def _union_cases(config: DatasetConfig, root: str | os.PathLike | None, split: str) -> list[dict]:
    """The cases of a union (``dataset.union``): each source's cases of ``split``, marked with the source's
    index (``"source"``), or the union's own test list."""
    if root is not None and Path(root).resolve() != config.root:
        raise DatasetError(f"--root {root}: the sources of {config.source} name their own roots; leave --root out")
    if split == "test":
        if "test" not in config.lists:
            raise DatasetError(
                f"{config.source}: no 'test' list of its own (cases labelled with every class); to segment and "
                "score one source's test cases, add --source NAME"
            )
        return _from_list(config.root, config.lists["test"], None, config.file_ending)
    cases = []
    for index, source in enumerate(config.sources):
        try:
            found = find_cases(source.config, source.config.root, split)
        except DatasetError as error:
            raise DatasetError(f"{config.source}: source {source.name!r}: {error}") from None
        cases += [{**case, "source": index} for case in found]
    return cases


def summarise_problems(problems: Sequence[str], limit: int = 20) -> str:
    if len(problems) == 1:
        return problems[0]
    shown = "\n  ".join(problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{len(problems)} problems in the dataset:\n  {shown}{more}"


#: Fold assignment does not follow --seed: the same cases form the same folds on every machine and run.
FOLD_SEED = 0


def split_folds(cases: Sequence[dict], num_folds: int, fold: int) -> tuple[list[dict], list[dict]]:
    """Cross-validation split of ``cases``: ``(training, validation)`` for fold ``fold`` of ``num_folds``.

    Cases are sorted by case name and shuffled with a fixed seed (Python's Mersenne Twister, the same on
    every platform), then dealt round-robin into folds: disjoint validation folds that cover every case.
    """
    if num_folds < 2:
        raise DatasetError(f"--num_folds {num_folds}: needs at least 2 folds")
    if not 0 <= fold < num_folds:
        raise DatasetError(f"--fold {fold}: must be in 0..{num_folds - 1} for --num_folds {num_folds}")
    if len(cases) < num_folds:
        raise DatasetError(
            f"--num_folds {num_folds}: only {counted(len(cases), 'training case')} to split; --fold all trains on "
            "every case without validation"
        )
    ordered = sorted(cases, key=lambda case: (case_name(case["image"]), case["image"]))
    random.Random(FOLD_SEED).shuffle(ordered)
    validation = ordered[fold::num_folds]
    chosen = {id(case) for case in validation}
    return [case for case in ordered if id(case) not in chosen], validation
