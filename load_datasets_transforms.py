"""Datasets: presets and JSON descriptions, file lists paired by case, input checks, MONAI transforms.

``data_loader(args)`` and ``data_transforms(args)`` keep the published names and return values. A
dataset is a preset (``flare``, ``amos``, ``feta``: the published settings) or a JSON file describing
one; every file list is checked (:func:`check_cases`) before anything is cached or trained.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    Orientationd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)
from monai.utils import ensure_tuple_rep
from tqdm import tqdm

__all__ = [
    "PRESETS",
    "DatasetConfig",
    "DatasetError",
    "case_name",
    "check_cases",
    "data_loader",
    "data_transforms",
    "file_identity",
    "find_cases",
    "load_dataset_config",
    "read_through",
    "roi_of",
    "split_folds",
]

SPLIT_FOLDERS = {
    "training": ("imagesTr", "labelsTr"),
    "validation": ("imagesVal", "labelsVal"),
    "test": ("imagesTs", "labelsTs"),
}


class DatasetError(ValueError):
    """A dataset problem a user must fix; the message names the file or flag and what is wrong."""


@dataclass(frozen=True)
class DatasetConfig:
    """Everything the transforms and the engine need to know about a dataset.

    Args:
        name: preset name or the JSON file's ``name``.
        labels: class names, index = label value (background first).
        spacing: target voxel spacing in mm, or None to keep the native grid.
        a_min, a_max: intensity window mapped to [0, 1] (clipped).
        rotate_z: range (radians) of the random rotation about the last axis in training.
        lists: optional MSD-style ``training`` / ``validation`` / ``test`` lists, relative to ``--root``.
    """

    name: str
    labels: tuple[str, ...]
    spacing: tuple[float, float, float] | None
    a_min: float
    a_max: float
    rotate_z: float = math.pi / 30
    lists: dict[str, list] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.labels)


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
    "flare": DatasetConfig("flare", FLARE_LABELS, (1.0, 1.0, 1.2), -125.0, 275.0, math.pi / 30),
    "amos": DatasetConfig("amos", AMOS_LABELS, (1.5, 1.5, 2.0), -125.0, 275.0, math.pi / 30),
    "feta": DatasetConfig("feta", FETA_LABELS, None, 0.0, 1000.0, math.pi / 15),
}


def _read_json(path: Path, flag: str) -> dict:
    if not path.is_file():
        raise DatasetError(f"{flag} {path}: no such file")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DatasetError(
            f"{flag} {path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{flag} {path}: cannot read: {error}") from None
    if not isinstance(content, dict):
        raise DatasetError(f"{flag} {path}: expected a JSON object at the top level")
    return content


def _parse_labels(labels: object, where: str) -> tuple[str, ...]:
    if not isinstance(labels, dict) or not labels:
        raise DatasetError(f'{where}: \'labels\' must be an object such as {{"0": "background", "1": "liver"}}')
    try:
        by_value = {int(key): str(name) for key, name in labels.items()}
    except ValueError:
        raise DatasetError(f"{where}: 'labels' keys must be integers, got {sorted(labels)}") from None
    if sorted(by_value) != list(range(len(by_value))):
        raise DatasetError(f"{where}: 'labels' keys must be 0..{len(by_value) - 1}, got {sorted(by_value)}")
    if len(by_value) < 2:
        raise DatasetError(f"{where}: 'labels' needs background and at least one class")
    return tuple(by_value[i] for i in range(len(by_value)))


def _parse_lists(content: dict, where: str) -> dict[str, list]:
    lists = {}
    for split in SPLIT_FOLDERS:
        if split not in content:
            continue
        entries = content[split]
        if not isinstance(entries, list):
            raise DatasetError(f"{where}: '{split}' must be a list")
        for i, entry in enumerate(entries):
            labelled = split != "test"
            valid = isinstance(entry, dict) and isinstance(entry.get("image"), str)
            valid = valid and (not labelled or isinstance(entry.get("label"), str))
            if not (valid or (split == "test" and isinstance(entry, str))):
                needs = '{"image": ..., "label": ...}' if labelled else 'a path or {"image": ...}'
                raise DatasetError(f"{where}: '{split}' entry {i} must be {needs}, got {entry!r}")
        lists[split] = entries
    return lists


def load_dataset_config(dataset: str, datalist: str | None = None) -> DatasetConfig:
    """The configuration of ``--dataset`` (a preset name or a JSON file), with ``--datalist`` lists.

    A dataset JSON holds ``labels`` (MSD style), ``spacing`` (``[x, y, z]`` mm or null), ``intensity``
    (``{"a_min": .., "a_max": ..}``), optionally ``rotate_z`` (radians) and ``training`` /
    ``validation`` / ``test`` lists. A ``--datalist`` (MSD ``dataset.json``) supplies only the lists.
    """
    if dataset.lower() in PRESETS:
        config = PRESETS[dataset.lower()]
    elif dataset.lower().endswith(".json") or os.path.sep in dataset:
        path = Path(dataset)
        where = f"--dataset {path}"
        content = _read_json(path, "--dataset")
        for key in ("labels", "spacing", "intensity"):
            if key not in content:
                raise DatasetError(f"{where}: missing '{key}'")
        spacing = content["spacing"]
        if spacing is not None:
            if not (
                isinstance(spacing, list)
                and len(spacing) == 3
                and all(isinstance(s, int | float) and s > 0 for s in spacing)
            ):
                raise DatasetError(f"{where}: 'spacing' must be three positive numbers (mm) or null, got {spacing!r}")
            spacing = tuple(float(s) for s in spacing)
        intensity = content["intensity"]
        if not (
            isinstance(intensity, dict) and all(isinstance(intensity.get(k), int | float) for k in ("a_min", "a_max"))
        ):
            raise DatasetError(f'{where}: \'intensity\' must be {{"a_min": number, "a_max": number}}')
        if intensity["a_max"] <= intensity["a_min"]:
            raise DatasetError(f"{where}: 'intensity' a_max must be greater than a_min")
        config = DatasetConfig(
            name=str(content.get("name", path.stem)),
            labels=_parse_labels(content["labels"], where),
            spacing=spacing,
            a_min=float(intensity["a_min"]),
            a_max=float(intensity["a_max"]),
            rotate_z=float(content.get("rotate_z", math.pi / 30)),
            lists=_parse_lists(content, where),
        )
    else:
        raise DatasetError(f"--dataset {dataset!r}: not a preset ({', '.join(PRESETS)}) nor a .json file")
    if datalist is not None:
        path = Path(datalist)
        lists = _parse_lists(_read_json(path, "--datalist"), f"--datalist {path}")
        if not lists:
            raise DatasetError(f"--datalist {path}: no 'training', 'validation' or 'test' list")
        config = replace(config, lists={**config.lists, **lists})
    return config


def case_name(path: str | os.PathLike) -> str:
    """Case identifier of an image or label file: the name without ``.nii.gz`` and a ``_0000`` channel suffix."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if len(name) > 5 and name[-5] == "_" and name[-4:].isdigit():
        name = name[:-5]
    return name


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith((".nii.gz", ".nii")) and not p.name.startswith("."))


def _pair_folders(root: Path, image_dir: str, label_dir: str | None) -> list[dict]:
    images_path = root / image_dir
    if not images_path.is_dir():
        raise DatasetError(f"{images_path}: missing folder (expected the published layout under --root)")
    images = _nifti_files(images_path)
    if not images:
        raise DatasetError(f"{images_path}: no .nii.gz images")
    if label_dir is None:
        return [{"image": str(p)} for p in images]
    labels_path = root / label_dir
    if not labels_path.is_dir():
        raise DatasetError(f"{labels_path}: missing folder (labels for {images_path})")
    by_case: dict[str, dict] = {}
    problems = []
    for kind, files in (("image", images), ("label", _nifti_files(labels_path))):
        for path in files:
            entry = by_case.setdefault(case_name(path), {})
            if kind in entry:
                problems.append(f"{path}: second {kind} for case {case_name(path)!r} (also {entry[kind]})")
            entry[kind] = str(path)
    for _, entry in sorted(by_case.items()):
        if "label" not in entry:
            problems.append(f"{entry['image']}: no label for this image in {labels_path}")
        elif "image" not in entry:
            problems.append(f"{entry['label']}: no image for this label in {images_path}")
    if problems:
        raise DatasetError(_summarise(problems))
    return [by_case[case] for case in sorted(by_case)]


def _from_list(root: Path, entries: list, labelled: bool) -> list[dict]:
    cases = []
    for entry in entries:
        entry = {"image": entry} if isinstance(entry, str) else entry
        case = {"image": str(root / entry["image"])}
        if labelled:
            case["label"] = str(root / entry["label"])
        cases.append(case)
    return cases


def find_cases(config: DatasetConfig, root: str | os.PathLike, split: str) -> list[dict]:
    """The ``{"image": path, "label": path}`` cases of ``split`` (training, validation or test).

    Lists from the dataset JSON or ``--datalist`` win; otherwise the published folders under ``root``
    are read and images paired with labels by case name (never by position). Test cases carry labels
    only when ``labelsTs`` exists.
    """
    if split not in SPLIT_FOLDERS:
        raise ValueError(f"split must be one of {', '.join(SPLIT_FOLDERS)}, got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"--root {root}: no such folder")
    if split in config.lists:
        entries = config.lists[split]
        if not entries:
            raise DatasetError(f"the {split} list of {config.name} is empty")
        labelled = split != "test" or all(isinstance(e, dict) and "label" in e for e in entries)
        return _from_list(root, entries, labelled)
    image_dir, label_dir = SPLIT_FOLDERS[split]
    if split == "test" and not (root / label_dir).is_dir():
        label_dir = None
    return _pair_folders(root, image_dir, label_dir)


def _summarise(problems: Sequence[str], limit: int = 20) -> str:
    if len(problems) == 1:
        return problems[0]
    shown = "\n  ".join(problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{len(problems)} problems in the dataset:\n  {shown}{more}"


def _spatial_shape(shape: Sequence[int], path: str) -> tuple[int, ...]:
    spatial = tuple(shape)
    if len(spatial) == 4 and spatial[3] == 1:
        spatial = spatial[:3]
    if len(spatial) != 3:
        raise DatasetError(f"{path}: not a 3D volume (shape {tuple(shape)})")
    return spatial


def file_identity(path: str | os.PathLike) -> tuple[str, list[int]]:
    """A file's absolute path and what changes when it is rewritten: ``[size, modification time in ns]``."""
    stat = os.stat(path)
    return os.path.abspath(path), [stat.st_size, stat.st_mtime_ns]


def read_through(path: str, kind: str) -> dict:
    """Read every voxel of a NIfTI file once; a summary of what the checks need, or a DatasetError naming
    the file (unreadable header, or voxel data cut short, as in a truncated ``.nii.gz``).

    The summary holds the ``shape``; for an image whether every voxel is ``finite``; for a label (``kind``
    ``"label"``) its distinct ``values``.
    """
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises many types for corrupt files
        raise DatasetError(f"{path}: cannot read as NIfTI ({error})") from None
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # a truncated or corrupt compressed stream: EOFError, zlib.error, OSError...
        raise DatasetError(f"{path}: cannot read its voxel data ({type(error).__name__}: {error})") from None
    summary: dict = {"shape": list(image.shape)}
    if kind == "label":
        summary["values"] = np.unique(data).tolist()
    else:
        summary["finite"] = bool(np.issubdtype(data.dtype, np.integer) or np.isfinite(data).all())
    return summary


def _read_all(files: dict[str, str], known: dict, workers: int, progress: bool) -> dict[str, dict | str]:
    """``read_through`` of every file (path -> kind) that ``known`` does not hold in its current state, on
    ``workers`` threads (decompression releases the GIL); returns path -> summary or error message, and
    records each new summary in ``known``."""
    results: dict[str, dict | str] = {}
    pending = {}
    for path, kind in files.items():
        absolute, identity = file_identity(path)
        entry = known.get(absolute)
        if entry is not None and entry.get("identity") == identity and entry.get("kind") == kind:
            results[path] = entry["summary"]
        else:
            pending[path] = (kind, absolute, identity)
    if not pending:
        return results
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(read_through, path, kind): path for path, (kind, _, _) in pending.items()}
        for future in tqdm(as_completed(futures), total=len(futures), desc="Reading cases", disable=not progress):
            path = futures[future]
            try:
                results[path] = future.result()
            except DatasetError as error:
                results[path] = str(error)
                continue
            kind, absolute, identity = pending[path]
            known[absolute] = {"kind": kind, "identity": identity, "summary": results[path]}
    return results


def check_cases(
    cases: Sequence[dict], num_classes: int, workers: int = 0, known: dict | None = None, progress: bool = False
) -> None:
    """Check every case before any caching or training; raise one DatasetError naming each bad file.

    Every image and label is read through once (:func:`read_through`, on ``workers`` threads, with a
    progress bar when ``progress``): files exist and are readable NIfTI to their last voxel, volumes are
    3D, images hold no NaN or infinite voxels, a label has its image's shape, and label values are
    integers in ``[0, num_classes)``. ``known`` (absolute path -> ``{"kind", "identity", "summary"}``, see
    :func:`file_identity`) remembers earlier read-throughs: a file it holds unchanged is not read again,
    and the files read now are added to it.
    """
    problems, files = [], {}
    for case in cases:
        if not os.path.isfile(case["image"]):
            problems.append(f"{case['image']}: no such file")
            continue
        files[case["image"]] = "image"
        if "label" in case:
            if not os.path.isfile(case["label"]):
                problems.append(f"{case['label']}: no such file (label of {case['image']})")
                continue
            files[case["label"]] = "label"
    summaries = _read_all(files, {} if known is None else known, workers, progress)
    for case in cases:
        if case["image"] not in summaries or case.get("label", case["image"]) not in summaries:
            continue  # a missing file, reported above
        try:
            _check_case(case, summaries, num_classes)
        except DatasetError as error:
            problems.append(str(error))
    if problems:
        raise DatasetError(_summarise(problems))


def _check_case(case: dict, summaries: dict[str, dict | str], num_classes: int) -> None:
    image_path = case["image"]
    image = summaries[image_path]
    if isinstance(image, str):
        raise DatasetError(image)
    shape = _spatial_shape(image["shape"], image_path)
    if not image["finite"]:
        raise DatasetError(f"{image_path}: NaN or infinite voxel values")
    label_path = case.get("label")
    if label_path is None:
        return
    label = summaries[label_path]
    if isinstance(label, str):
        raise DatasetError(label)
    label_shape = _spatial_shape(label["shape"], label_path)
    if label_shape != shape:
        raise DatasetError(f"{label_path}: label shape {label_shape} differs from image shape {shape}")
    values = np.array(label["values"], dtype=np.float64)
    bad = values[~np.isfinite(values) | (values < 0) | (values >= num_classes) | (values != np.round(values))]
    if bad.size:
        shown = ", ".join(f"{v:g}" for v in bad[:5])
        raise DatasetError(f"{label_path}: label values {shown} outside the {num_classes} classes 0..{num_classes - 1}")


def data_loader(args) -> tuple:
    """The published entry point: checked file lists of ``args.dataset`` under ``args.root``.

    Returns ``(train_samples, valid_samples, out_classes)`` for ``args.mode == "train"`` and
    ``(test_samples, out_classes)`` for ``"test"``; samples are ``{"images": [...], "labels": [...]}``.
    """
    config = load_dataset_config(args.dataset, getattr(args, "datalist", None))
    print(f"Start to load data from directory: {args.root}")
    splits = ("training", "validation") if args.mode == "train" else ("test",)
    samples = []
    for split in splits:
        cases = find_cases(config, args.root, split)
        check_cases(cases, config.num_classes)
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


def build_transforms(
    config: DatasetConfig,
    mode: str,
    roi_size: Sequence[int] = (96, 96, 96),
    crop_sample: int = 2,
    device: torch.device | None = None,
):
    """Transform chains built from a dataset configuration.

    ``mode="train"`` returns ``(train_transforms, val_transforms)``; ``mode="test"`` returns the test
    chain (image only, invertible, for :class:`monai.transforms.Invertd`). With ``device``, the training
    chain moves each cached case there before the random crops, intensity shift and affine, which then
    run on that device (``--gpu_transforms``).
    """
    keys = ["image", "label"] if mode == "train" else ["image"]
    interpolation = ("bilinear", "nearest") if mode == "train" else ("bilinear",)

    def preprocessing() -> list:
        chain = [LoadImaged(keys=keys), EnsureChannelFirstd(keys=keys)]
        if config.spacing is not None:
            chain.append(Spacingd(keys=keys, pixdim=config.spacing, mode=interpolation))
        chain += [
            Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            ScaleIntensityRanged(
                keys=["image"], a_min=config.a_min, a_max=config.a_max, b_min=0.0, b_max=1.0, clip=True
            ),
            CropForegroundd(keys=keys, source_key="image", allow_smaller=True),
        ]
        return chain

    if mode == "test":
        return Compose(preprocessing() + [EnsureTyped(keys=keys, dtype=np.float32, track_meta=True)])
    if mode != "train":
        raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
    roi_size = tuple(roi_size)
    to_device = [EnsureTyped(keys=keys, device=device, track_meta=False)] if device is not None else []
    train = Compose(
        preprocessing()
        + to_device
        + [
            SpatialPadd(keys=keys, spatial_size=roi_size),  # crops need volumes at least as large as the ROI
            RandCropByPosNegLabeld(
                keys=keys,
                label_key="label",
                spatial_size=roi_size,
                pos=1,
                neg=1,
                num_samples=crop_sample,
                image_key="image",
                image_threshold=0,
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
    val = Compose(preprocessing() + [EnsureTyped(keys=keys, track_meta=False)])
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
        raise DatasetError(f"--num_folds {num_folds}: only {len(cases)} training cases to split")
    ordered = sorted(cases, key=lambda case: (case_name(case["image"]), case["image"]))
    random.Random(FOLD_SEED).shuffle(ordered)
    validation = ordered[fold::num_folds]
    chosen = {id(case) for case in validation}
    return [case for case in ordered if id(case) not in chosen], validation
