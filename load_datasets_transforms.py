"""Datasets: file lists paired by case, input checks, MONAI transforms (dataset descriptions: dataset_config).

``data_loader(args)`` and ``data_transforms(args)`` keep the published names and return values. A
dataset is a preset (``flare``, ``amos``, ``feta``) or a JSON file describing one
(:func:`dataset_config.load_dataset_config`); every file list is checked (:func:`check_cases`) before
anything is cached or trained.

A case is ``{"image": path, "label": path}``; a multi-channel image is one 4D file (channels last, as
in the Medical Segmentation Decathlon) or a list of files, one per channel (nnU-Net's
``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``...).
"""

from __future__ import annotations

import numbers
import os
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    LoadImage,
    MapTransform,
    Orientationd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandShiftIntensityd,
    ScaleIntensityRange,
    Spacingd,
    SpatialPadd,
)
from monai.utils import ensure_tuple_rep
from scipy import ndimage
from tqdm import tqdm

from dataset_config import (
    MEDIAN,
    PRESETS,
    SPLITS,
    ChannelNorm,
    DatasetConfig,
    DatasetError,
    counted,
    load_dataset_config,
)

__all__ = [
    "MEDIAN",
    "along_ras",
    "PRESETS",
    "AnyChannelForeground",
    "BalancedCropd",
    "CaseSummary",
    "CropCentres",
    "DatasetConfig",
    "DatasetError",
    "NormalizeChannelsd",
    "case_files",
    "case_name",
    "cases_from_paths",
    "check_cases",
    "data_loader",
    "data_transforms",
    "file_identity",
    "find_cases",
    "label_for",
    "LoadCased",
    "load_dataset_config",
    "read_through",
    "resolve_root",
    "roi_of",
    "split_folds",
]

NIFTI_ENDINGS = (".nii.gz", ".nii")
CHANNEL_SUFFIX = re.compile(r"^(.+)_(\d{4})$")
#: Version of the read-through summaries (entries of older versions are read again).
SUMMARY_VERSION = 2


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


def _is_4d(path: Path) -> bool:
    """Whether a NIfTI file's header says 4D (several channels in one file); False when unreadable (the
    read-through names it later)."""
    try:
        return len(nib.load(path).shape) == 4
    except Exception:  # nibabel raises many types for corrupt files
        return False


def _group_channels(images: list[Path], labelled: set[str] | None, config: DatasetConfig) -> tuple[dict, list]:
    """Image files by case: a file named as a label, or ``<case>_NNNN`` of a labelled case, is the image of
    that case; with several channels, ``<case>_0000``, ``<case>_0001``... 3D files of one folder are the
    channel files of one case and any other file (a 4D one whatever its name) an image of its own. Returns
    ``{case: path or [channel paths]}`` and the problems found."""
    channels: dict[str, dict[int, Path]] = {}
    singles: dict[str, Path] = {}
    problems = []
    for path in images:
        stem, match = _stem(path), CHANNEL_SUFFIX.match(_stem(path))
        if labelled is not None and stem in labelled:
            case = stem
        elif match and (
            (config.in_channels > 1 and not _is_4d(path)) or (labelled is not None and match.group(1) in labelled)
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
                problems.append(
                    f"{folder / f'{case}_{index:04d}{config.file_ending}'}: missing (channel {index}, {channel}, "
                    f"of case {case!r})"
                )
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
        raise DatasetError(_summarise(problems))
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
            files += found
        elif path.is_file() and path.name.endswith(NIFTI_ENDINGS):
            files.append(path)
        else:
            what = "not a NIfTI file (.nii.gz, .nii)" if path.exists() else "no such file or folder"
            raise DatasetError(f"--input {path}: {what}")
    grouped, problems = _group_channels(sorted(set(files)), None, config)
    if problems:
        raise DatasetError(_summarise(problems))
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
        where = f"{root / image_dir} and {root / label_dir}"
    if split == "training" and config.num_training is not None and config.num_training != len(cases):
        raise DatasetError(
            f"{config.source}: numTraining is {config.num_training}, but {where} hold{'s' * where.startswith('its')} "
            f"{counted(len(cases), 'case')}"
        )
    return cases


def _summarise(problems: Sequence[str], limit: int = 20) -> str:
    if len(problems) == 1:
        return problems[0]
    shown = "\n  ".join(problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{len(problems)} problems in the dataset:\n  {shown}{more}"


def file_identity(path: str | os.PathLike) -> tuple[str, list[int]]:
    """A file's absolute path and what changes when it is rewritten: ``[size, modification time in ns]``."""
    stat = os.stat(path)
    return os.path.abspath(path), [stat.st_size, stat.st_mtime_ns]


def read_through(path: str, kind: str) -> dict:
    """Read every voxel of a NIfTI file once; a summary of what the checks need, or a DatasetError naming
    the file (unreadable header, or voxel data cut short, as in a truncated ``.nii.gz``).

    The summary holds the ``shape`` and ``affine``; for an image whether every voxel is ``finite``; for a
    label (``kind`` ``"label"``) its distinct ``values``.
    """
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises many types for corrupt files
        raise DatasetError(f"{path}: cannot read as NIfTI ({error})") from None
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # a truncated or corrupt compressed stream: EOFError, zlib.error, OSError...
        raise DatasetError(f"{path}: cannot read its voxel data ({type(error).__name__}: {error})") from None
    summary: dict = {"shape": list(image.shape), "affine": np.asarray(image.affine, dtype=float).tolist()}
    if kind == "label":
        summary["values"] = np.unique(data).tolist()
    else:
        summary["finite"] = bool(np.issubdtype(data.dtype, np.integer) or np.isfinite(data).all())
    return summary


#: Seconds between two calls of ``keep`` while files are read through: a long first read that is
#: interrupted does not start over.
KEEP_EVERY = 30.0


def _read_all(
    files: dict[str, str], known: dict, workers: int, progress: bool, keep: Callable[[], None] | None = None
) -> dict[str, dict | str]:
    """``read_through`` of every file (path -> kind) that ``known`` does not hold in its current state, on
    ``workers`` threads (decompression releases the GIL); returns path -> summary or error message, and
    records each new summary in ``known``, calling ``keep`` every :data:`KEEP_EVERY` seconds meanwhile (to
    save what ``known`` holds so far)."""
    results: dict[str, dict | str] = {}
    pending = {}
    for path, kind in files.items():
        absolute, identity = file_identity(path)
        entry = known.get(absolute)
        if (
            entry is not None
            and entry.get("identity") == identity
            and entry.get("kind") == kind
            and entry.get("version") == SUMMARY_VERSION
        ):
            results[path] = entry["summary"]
        else:
            pending[path] = (kind, absolute, identity)
    if not pending:
        return results
    kept = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(read_through, path, kind): path for path, (kind, _, _) in pending.items()}
        for future in tqdm(as_completed(futures), total=len(futures), desc="Reading cases", disable=not progress):
            if keep is not None and time.monotonic() - kept >= KEEP_EVERY:
                keep()
                kept = time.monotonic()
            path = futures[future]
            try:
                results[path] = future.result()
            except DatasetError as error:
                results[path] = str(error)
                continue
            kind, absolute, identity = pending[path]
            known[absolute] = {"kind": kind, "identity": identity, "version": SUMMARY_VERSION, "summary": results[path]}
    return results


@dataclass(frozen=True)
class CaseSummary:
    """What the checks learnt of a case: spatial ``shape`` and voxel ``spacing`` (mm), both along the RAS
    axes; ``channels``; and whether its label has any ``foreground`` (None without a label)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    channels: int
    foreground: bool | None


def check_cases(
    cases: Sequence[dict],
    num_classes: int,
    workers: int = 0,
    known: dict | None = None,
    progress: bool = False,
    in_channels: int = 1,
    ignore_label: int | None = None,
    keep: Callable[[], None] | None = None,
) -> list[CaseSummary]:
    """Check every case before any caching or training; raise one DatasetError naming each bad file.

    Every image and label is read through once (:func:`read_through`, on ``workers`` threads, with a
    progress bar when ``progress``): files exist and are readable NIfTI to their last voxel; an image has
    ``in_channels`` channels (a 4D file, channels last, or one 3D file per channel, all of one geometry);
    images hold no NaN or infinite voxels; a label has its image's shape and geometry (affine) and integer
    values in ``[0, num_classes)`` (or ``ignore_label``). ``known`` (absolute path -> ``{"kind", "identity", "version",
    "summary"}``, see :func:`file_identity`) remembers earlier read-throughs: a file it holds unchanged is
    not read again, and the files read now are added to it (``keep`` is called now and then meanwhile, to save
    it). Returns a :class:`CaseSummary` per case.
    """
    problems, files = [], {}
    for case in cases:
        missing = [path for path in case_files(case) if not os.path.isfile(path)]
        if missing:  # the first missing file of a case is enough to name it
            owner = f" (label of {case_files(case)[0]})" if missing[0] == case.get("label") else ""
            problems.append(f"{missing[0]}: no such file{owner}")
        else:
            files.update({path: "image" for path in case_files({"image": case["image"]})})
            if "label" in case:
                files[case["label"]] = "label"
    summaries = _read_all(files, {} if known is None else known, workers, progress, keep)
    checked = []
    for case in cases:
        if not all(path in summaries for path in case_files(case)):
            continue  # a missing file, reported above
        try:
            checked.append(_check_case(case, summaries, num_classes, in_channels, ignore_label))
        except DatasetError as error:
            problems.append(str(error))
    if problems:
        raise DatasetError(_summarise(problems))
    return checked


def _volume(summary: dict | str, path: str) -> tuple[tuple[int, ...], int]:
    """A file's spatial shape and channel count (3D, or 4D with the channels last)."""
    if isinstance(summary, str):
        raise DatasetError(summary)
    shape = tuple(summary["shape"])
    if len(shape) == 3:
        return shape, 1
    if len(shape) == 4:
        return shape[:3], shape[3]
    raise DatasetError(f"{path}: not a 3D volume or a 4D one with the channels last (shape {shape})")


def _geometry_difference(affine: np.ndarray, reference: np.ndarray) -> str | None:
    """How two voxel-to-world affines differ (spacing, direction, origin), or None when they agree."""
    if np.allclose(affine, reference, rtol=1e-4, atol=1e-4):
        return None
    zooms, reference_zooms = np.linalg.norm(affine[:3, :3], axis=0), np.linalg.norm(reference[:3, :3], axis=0)
    if not np.allclose(zooms, reference_zooms, rtol=1e-4, atol=1e-4):
        return f"spacing {_numbers(zooms)} mm vs {_numbers(reference_zooms)}"
    if not np.allclose(affine[:3, :3] / zooms, reference[:3, :3] / reference_zooms, atol=1e-4):
        return f"direction {nib.aff2axcodes(affine)} vs {nib.aff2axcodes(reference)}"
    return f"origin {_numbers(affine[:3, 3])} mm vs {_numbers(reference[:3, 3])}"


def along_ras(shape: Sequence[int], affine: np.ndarray) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """A volume's spatial shape and voxel spacing (mm) reordered along the R, A and S axes."""
    ras_shape, ras_spacing = [0, 0, 0], [0.0, 0.0, 0.0]
    for axis, ras_axis in enumerate(nib.io_orientation(affine)[:, 0].astype(int)):  # the RAS axis of each array axis
        ras_shape[ras_axis], ras_spacing[ras_axis] = shape[axis], float(np.linalg.norm(affine[:3, axis]))
    return tuple(ras_shape), tuple(ras_spacing)


def _numbers(values) -> str:
    return ",".join(f"{v:.4g}" for v in values)


def _check_case(
    case: dict, summaries: dict[str, dict | str], num_classes: int, in_channels: int, ignore_label: int | None
) -> CaseSummary:
    images = case_files({"image": case["image"]})
    shape, channels = _volume(summaries[images[0]], images[0])
    affine = np.array(summaries[images[0]]["affine"])
    for path in images[1:]:  # one file per channel: each 3D, all of one geometry
        other_shape, other_channels = _volume(summaries[path], path)
        if other_channels != 1 or other_shape != shape:
            raise DatasetError(f"{path}: channel file of shape {summaries[path]['shape']}, expected {list(shape)}")
        difference = _geometry_difference(np.array(summaries[path]["affine"]), affine)
        if difference:
            raise DatasetError(f"{path}: geometry differs from {images[0]} ({difference})")
        channels += 1
    if channels != in_channels:
        raise DatasetError(
            f"{images[0]}: {channels} channel{'s' * (channels > 1)}, but the dataset has {in_channels} "
            f"(case {case_name(images[0])!r})"
        )
    for path in images:
        if not summaries[path]["finite"]:
            raise DatasetError(f"{path}: NaN or infinite voxel values")
    ras_shape, ras_spacing = along_ras(shape, affine)
    foreground = None
    label_path = case.get("label")
    if label_path is not None:
        foreground = _check_label(label_path, summaries[label_path], shape, affine, num_classes, ignore_label)
    return CaseSummary(ras_shape, ras_spacing, channels, foreground)


def _check_label(
    path: str, label: dict | str, shape: tuple, affine: np.ndarray, num_classes: int, ignore_label: int | None
) -> bool:
    """Check a label against its image; whether it has any foreground (an annotated class above 0)."""
    label_shape, label_channels = _volume(label, path)
    if label_channels != 1 or label_shape != shape:
        raise DatasetError(f"{path}: label shape {tuple(label['shape'])} differs from image shape {shape}")
    difference = _geometry_difference(np.array(label["affine"]), affine)
    if difference:
        raise DatasetError(f"{path}: label geometry differs from its image's ({difference})")
    values = np.array(label["values"], dtype=np.float64)
    values = values[values != ignore_label] if ignore_label is not None else values
    bad = values[~np.isfinite(values) | (values < 0) | (values >= num_classes) | (values != np.round(values))]
    if bad.size:
        shown = ", ".join(f"{v:g}" for v in bad[:5])
        ignored = f" (and the ignore label {ignore_label})" if ignore_label is not None else ""
        raise DatasetError(
            f"{path}: label values {shown} outside the {num_classes} classes 0..{num_classes - 1}{ignored}"
        )
    return bool((values > 0).any())


def data_loader(args) -> tuple:
    """The published entry point: checked file lists of ``args.dataset`` under ``args.root``.

    Returns ``(train_samples, valid_samples, out_classes)`` for ``args.mode == "train"`` and
    ``(test_samples, out_classes)`` for ``"test"``; samples are ``{"images": [...], "labels": [...]}``.
    """
    config = load_dataset_config(args.dataset, getattr(args, "datalist", None))
    root = resolve_root(config, getattr(args, "root", None))
    print(f"Start to load data from directory: {root}")
    splits = ("training", "validation") if args.mode == "train" else ("test",)
    samples = []
    for split in splits:
        cases = find_cases(config, root, split)
        check_cases(cases, config.num_classes, in_channels=config.in_channels)
        samples.append({"images": [c["image"] for c in cases], "labels": [c["label"] for c in cases if "label" in c]})
    print(f"Finished loading all {args.mode} samples from dataset: {config.name}!")
    print(f"Number of classes for segmentation: {config.num_classes}")
    return (*samples, config.num_classes)


def roi_of(roi_size: int | str | Sequence[int]) -> tuple[int, int, int]:
    """A patch size from one edge or three: ``96``, ``"96"``, ``[96]``, ``"96,96,64"``, ``(96, 96, 64)``.

    Raises ValueError for any other count or a value that is not a positive integer.
    """
    if isinstance(roi_size, str):
        values: list = [part for part in roi_size.replace(" ", "").split(",") if part]
    elif isinstance(roi_size, Sequence):
        values = list(roi_size)
    else:
        values = [roi_size]
    try:
        edges = [int(v) for v in values if isinstance(v, str | numbers.Integral) and not isinstance(v, bool)]
    except ValueError:  # a string that is not an integer
        edges = []
    if len(values) not in (1, 3) or len(edges) != len(values) or any(e < 1 for e in edges):
        raise ValueError(f"ROI size {roi_size!r}: expected one or three positive integers, such as 96 or 96,96,64")
    return ensure_tuple_rep(edges[0] if len(edges) == 1 else tuple(edges), 3)


class NormalizeChannelsd(MapTransform):
    """Normalise each channel of the images under ``keys`` by its own scheme (see
    :class:`dataset_config.ChannelNorm`): ``ct`` clips to the window and scales it to [0, 1], ``zscore``
    standardises the channel over every voxel or, with ``nonzero_mask``, over the region where any channel
    is non-zero, holes filled (nnU-Net's ``create_nonzero_mask``; the voxels outside stay 0), ``none``
    leaves it."""

    def __init__(self, keys: KeysCollection, normalization: Sequence[ChannelNorm]) -> None:
        super().__init__(keys)
        if any(norm.scheme == "ct" and norm.window is None for norm in normalization):
            raise ValueError("a ct channel needs its window (derive it from the dataset first)")
        if any(norm.scheme == "zscore" and norm.nonzero_mask is None for norm in normalization):
            raise ValueError("a zscore channel needs its nonzero_mask (derive it from the dataset first)")
        self.normalization = tuple(normalization)
        self.transforms = [
            ScaleIntensityRange(*norm.window, b_min=0.0, b_max=1.0, clip=True) if norm.scheme == "ct" else None
            for norm in self.normalization
        ]

    def __call__(self, data: dict) -> dict:
        data = dict(data)
        for key in self.key_iterator(data):
            image = data[key]
            if image.shape[0] != len(self.normalization):
                raise ValueError(f"{key}: {image.shape[0]} channels, normalisation for {len(self.normalization)}")
            masked = any(norm.nonzero_mask for norm in self.normalization)
            region = nonzero_region(image) if masked else None
            channels = []
            for c, (norm, transform) in enumerate(zip(self.normalization, self.transforms, strict=True)):
                channel = image[c : c + 1]
                if transform is not None:
                    channel = transform(channel)
                elif norm.scheme == "zscore":
                    channel = _zscore(channel, region if norm.nonzero_mask else None)
                channels.append(channel)
            data[key] = torch.cat(channels) if len(channels) > 1 else channels[0]
        return data


def nonzero_region(image: torch.Tensor) -> torch.Tensor:
    """Where any channel of ``image`` (channels first) is non-zero, holes filled: nnU-Net's non-zero mask."""
    nonzero = (torch.as_tensor(image) != 0).any(0).cpu().numpy()
    return torch.as_tensor(ndimage.binary_fill_holes(nonzero), device=torch.as_tensor(image).device)


def _zscore(channel: torch.Tensor, region: torch.Tensor | None) -> torch.Tensor:
    """A channel (1 x spatial) standardised over ``region`` (the rest left as it is) or, without one, over
    every voxel; a constant one only centred (nnU-Net's 1e-8 floor of the standard deviation)."""
    channel = channel.float()
    values = channel[0][region] if region is not None else channel
    if values.numel() == 0:
        return channel
    mean, std = values.mean(), values.std(unbiased=False).clamp_min(1e-8)
    if region is None:
        return (channel - mean) / std
    result = channel.clone()
    result[0][region] = (values - mean) / std
    return result


class LoadCased(MapTransform):
    """Load the files under ``keys``, channels first: a path, or a list of one 3D file per channel stacked
    on the geometry of channel 0 (files whose affines differ by float noise are one image; the
    read-through refuses a real difference before this runs).

    Each thread has its own reader: MONAI's readers keep the names of the files they last read, and a
    list of channel files read while another thread reads a label came out with one channel.
    """

    def __init__(self, keys: KeysCollection) -> None:
        super().__init__(keys)
        self._local = threading.local()

    def __getstate__(self) -> dict:  # the per-thread readers stay behind (worker processes, cache hashing)
        return {key: value for key, value in self.__dict__.items() if key != "_local"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _load(self, path: str) -> MetaTensor:
        if not hasattr(self._local, "loader"):
            self._local.loader = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True)
        return self._local.loader(path)

    def __call__(self, data: dict) -> dict:
        data = dict(data)
        for key in self.key_iterator(data):
            paths = data[key]
            if isinstance(paths, str | os.PathLike):
                data[key] = self._load(paths)
                continue
            channels = [self._load(path) for path in paths]
            data[key] = MetaTensor(torch.cat([c.as_tensor() for c in channels]), meta=channels[0].meta)
        return data


@dataclass(frozen=True)
class CropCentres:
    """Where the balanced crops may centre (see :class:`DatasetConfig` ``background_crops``): foreground on
    the annotated classes (not nnU-Net's ``ignore_label``); background on voxels labelled 0, anywhere in
    the volume (``body``) or where a channel's normalised value is above 0 (``published``)."""

    background_crops: str = "body"
    ignore_label: int | None = None

    def __call__(self, label: torch.Tensor, image: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        label = torch.as_tensor(label).reshape(-1)
        annotated = label != self.ignore_label if self.ignore_label is not None else torch.ones_like(label, dtype=bool)
        background = label == 0
        if self.background_crops == "published" and image is not None:
            background &= (torch.as_tensor(image) > 0).any(0).reshape(-1)
        foreground = (label > 0) & annotated
        return torch.nonzero(foreground).reshape(-1).cpu(), torch.nonzero(background).reshape(-1).cpu()


class BalancedCropd(RandCropByPosNegLabeld):
    """MONAI's crops balanced between foreground and background centres, the centres chosen by a
    :class:`CropCentres` rule."""

    def __init__(self, centres: CropCentres, **kwargs) -> None:
        super().__init__(**kwargs)
        self.centres = centres

    def randomize(self, label=None, fg_indices=None, bg_indices=None, image=None) -> None:
        if fg_indices is None and label is not None:
            fg_indices, bg_indices = self.centres(label, image)
        super().randomize(label, fg_indices, bg_indices, image)


@dataclass(frozen=True)
class AnyChannelForeground:
    """``select_fn`` of the foreground crop, on raw intensities: a voxel is foreground where any channel
    shows it, above the window's low end for a ``ct`` channel (the published crop of the windowed image),
    non-zero for the others (MRI background)."""

    normalization: tuple[ChannelNorm, ...]

    def __call__(self, image) -> torch.Tensor:
        image = torch.as_tensor(image)
        return torch.stack(
            [
                image[c] > norm.window[0] if norm.scheme == "ct" else image[c] != 0
                for c, norm in enumerate(self.normalization)
            ]
        )


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
    chain (image only, invertible, for :class:`monai.transforms.Invertd`). With ``device``, the training
    chain moves each cached case there before the random crops, intensity shift and affine, which then
    run on that device (``--gpu_transforms``).
    """
    if config.to_derive():
        raise ValueError(f"{config.name}: derive {', '.join(config.to_derive())} first (dataset_fingerprint)")
    keys = ["image", "label"] if mode == "train" else ["image"]
    interpolation = ("bilinear", "nearest") if mode == "train" else ("bilinear",)
    # Reoriented before resampling, so that the spacing is along the RAS axes whatever the stored order.
    preprocessing = [
        LoadCased(keys=keys),
        Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
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
    train = Compose(
        preprocessing
        + to_device
        + [
            SpatialPadd(keys=keys, spatial_size=roi_size),  # crops need volumes at least as large as the ROI
            BalancedCropd(
                CropCentres(config.background_crops, config.ignore_label),
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
            EnsureTyped(keys=keys, track_meta=False),
        ]
    )
    val = Compose(preprocessing + [EnsureTyped(keys=keys, track_meta=False)])
    return train, val


def data_transforms(args):
    """The published entry point: ``(train_transforms, val_transforms)`` or the test transforms."""
    config = load_dataset_config(args.dataset, getattr(args, "datalist", None))
    roi = roi_of(getattr(args, "roi_size", 96))
    return build_transforms(config, args.mode, roi, getattr(args, "crop_sample", 2))


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
