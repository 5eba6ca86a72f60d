"""Synthetic FLARE-like abdominal phantoms (CT, or two-channel MRI) and BraTS-like brain tumours, in three
dataset layouts.

Each case is a small abdomen: an elliptic body (fat rim, soft tissue) with liver, spleen, two kidneys
and pancreas as jittered ellipsoids, Gaussian noise, anisotropic voxels and a randomly chosen orientation
in the affine (RAS, LPS, axes swapped, ...), stored as int16 NIfTI. CT cases carry plausible
portal-venous HU values; MRI cases two channels (T1- and T2-like contrasts, zero outside the body, an
arbitrary gain per case and channel, as MRI has no absolute unit). Labels follow FLARE 2021: 0
background, 1 spleen, 2 kidney, 3 liver, 4 pancreas; with ``--lateral`` the kidneys are two labels by
side, as AMOS labels them: 0 background, 1 spleen, 2 right kidney, 3 left kidney, 4 liver, 5 pancreas.

``--modality brats``: a head (brain, skull rim) in four MRI channels (T1, T1ce, T2, FLAIR; zero outside the
head, a gain per case and channel) with one nested tumour labelled as MSD Task01 BrainTumour: 1 edema, 2
non-enhancing tumour core, 3 enhancing tumour (a shell around the core). Its dataset.json declares BraTS's
regions, trained one sigmoid output each: whole tumour [1, 2, 3], tumour core [2, 3], enhancing tumour [3]
(``regions_class_order`` [1, 2, 3]): in nnU-Net's form (region labels) for ``--layout nnunet``, as
``regions`` beside the labels otherwise.

Layouts (``--layout``):

- ``published``: imagesTr/labelsTr, imagesVal/labelsVal, imagesTs/labelsTs and this repository's
  ``dataset.json`` (for CT with the FLARE spacing and window);
- ``decathlon``: a Medical Segmentation Decathlon task: imagesTr/labelsTr, imagesTs, ``dataset.json``
  with ``training`` and ``test`` lists; multi-channel images are 4D files, channels last;
- ``nnunet``: an nnU-Net v2 raw dataset: ``imagesTr/<case>_0000.nii.gz`` (one file per channel),
  labelsTr, imagesTs and ``dataset.json`` (``channel_names``, ``file_ending``).

The Decathlon and nnU-Net layouts have no validation split (``--num_val`` applies to ``published``); all
three also write ``labelsTs``, the test labels, for ``test_seg.py --evaluate``.

``--union``: two CT sources that annotate different organs of the same kind of case, for training on a
union of datasets (``dataset.union``): ``organs/`` (spleen, kidney as one label, liver; the pancreas left
unlabelled) and ``kidneys/`` (right kidney, left kidney, pancreas; spleen and liver unlabelled), each a
published-layout dataset of its own cases, with ``union.json`` (the unified classes of ``--lateral``, each
source's labels mapped into them, the test cases of ``full/``; a union's defaults: pseudo-labels above 0.9,
class-drawn foreground crops), ``union_naive.json`` (the same with
``"unannotated": "background"``: naive merging, the baseline) and ``full/``: the same training,
validation and test cases with every class labelled (``--lateral`` labels), the fully labelled reference;
all resampled to 2 x 2 x 2.5 mm (:data:`UNION_SPACING`).

Command: ``python phantom.py --output data/phantom`` (CT, published layout);
``python phantom.py --output data/mri_task --modality mri --layout nnunet``;
``python phantom.py --output data/brats --modality brats --layout nnunet``;
``python phantom.py --output data/union --union``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = [
    "BRATS_LABELS",
    "BRATS_REGIONS",
    "LABELS",
    "LATERAL_LABELS",
    "LAYOUTS",
    "MODALITIES",
    "MRI_CHANNELS",
    "make_brats_case",
    "make_case",
    "write_dataset",
    "write_union",
]

LABELS = ("background", "spleen", "kidney", "liver", "pancreas")
#: The labels of ``--lateral``: the kidneys by side, in AMOS's order (right kidney 2, left kidney 3).
LATERAL_LABELS = ("background", "spleen", "right kidney", "left kidney", "liver", "pancreas")
#: Each organ's label value in ``--lateral`` datasets (the FLARE values otherwise, see ORGANS).
LATERAL_VALUES = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 4, "pancreas": 5}

# HU of each tissue (portal-venous phase) and the FLARE label it carries.
AIR_HU, FAT_HU, SOFT_TISSUE_HU = -1000.0, -90.0, 40.0
# name: (label, HU, centre in RAS+ mm (+x patient's right, +y anterior, +z superior), semi-axes in mm)
ORGANS = {
    "liver": (3, 105.0, (20.0, 4.0, 8.0), (20.0, 18.0, 16.0)),
    "spleen": (1, 135.0, (-27.0, -10.0, 12.0), (8.0, 11.0, 12.0)),
    "kidney_right": (2, 180.0, (20.0, -19.0, -6.0), (6.5, 7.5, 12.0)),
    "kidney_left": (2, 180.0, (-20.0, -19.0, -4.0), (6.5, 7.5, 12.0)),
    "pancreas": (4, 75.0, (-4.0, 2.0, -2.0), (16.0, 4.5, 5.0)),
}
#: MRI channels: (name, intensity of fat, of soft tissue, and of each organ by name) in arbitrary units.
MRI_CHANNELS = (
    (
        "T1",
        800.0,
        400.0,
        {"liver": 520.0, "spleen": 330.0, "kidney_right": 270.0, "kidney_left": 270.0, "pancreas": 470.0},
    ),
    (
        "T2",
        550.0,
        300.0,
        {"liver": 180.0, "spleen": 520.0, "kidney_right": 680.0, "kidney_left": 680.0, "pancreas": 380.0},
    ),
)
#: The labels of ``--modality brats`` (MSD Task01 BrainTumour's) and BraTS's regions of them.
BRATS_LABELS = ("background", "edema", "non-enhancing tumor", "enhancing tumor")
BRATS_REGIONS = {"whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
#: ``--modality brats`` channels: (name, intensity of the skull rim, brain, edema, tumour core, enhancing).
BRATS_CHANNELS = (
    ("T1", 300.0, 500.0, 420.0, 300.0, 470.0),
    ("T1ce", 300.0, 500.0, 440.0, 320.0, 950.0),
    ("T2", 200.0, 400.0, 760.0, 880.0, 600.0),
    ("FLAIR", 150.0, 400.0, 820.0, 520.0, 660.0),
)
LAYOUTS = ("published", "decathlon", "nnunet")
MODALITIES = ("ct", "mri", "brats")
# Voxel-axis orientations of the stored array (nibabel axis codes); RAS is the canonical one.
ORIENTATIONS = ("RAS", "LPS", "LAS", "RPI", "PLS", "ASR")


def _orientation_matrix(code: str, spacing: Sequence[float]) -> np.ndarray:
    """3x3 matrix mapping voxel steps to RAS millimetres for a nibabel axis code such as 'LPS'."""
    axis_of = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}
    matrix = np.zeros((3, 3))
    for voxel_axis, letter in enumerate(code):
        world_axis, sign = axis_of[letter]
        matrix[world_axis, voxel_axis] = sign * spacing[voxel_axis]
    return matrix


def make_case(
    rng: np.random.Generator, orientation: str | None = None, modality: str = "ct", lateral: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Make one phantom case.

    Args:
        rng: random generator (sizes, positions, spacing, orientation and noise come from it).
        orientation: axis code of the stored array (random from ``ORIENTATIONS`` when None).
        modality: ``ct`` (one channel, HU) or ``mri`` (the channels of :data:`MRI_CHANNELS`, last axis).
        lateral: label the kidneys by side (:data:`LATERAL_LABELS`) instead of FLARE's one kidney label.

    Returns:
        ``(image, label, affine)``: int16 image (CT: HU; MRI: 4D, channels last), uint8 label of the
        spatial shape, 4x4 affine to RAS mm.
    """
    if modality not in ("ct", "mri"):
        raise ValueError(f"modality must be 'ct' or 'mri', got {modality!r}")
    orientation = orientation or str(rng.choice(ORIENTATIONS))
    in_plane = rng.uniform(1.3, 1.7)
    through_plane = rng.uniform(2.2, 3.0)
    # The RAS extent (mm) the array covers: about 120 x 100 x 110 mm.
    extent_ras = np.array([rng.uniform(115, 130), rng.uniform(95, 110), rng.uniform(100, 120)])
    spacing_ras = np.array([in_plane, in_plane, through_plane])
    shape_ras = np.round(extent_ras / spacing_ras).astype(int)
    matrix = _orientation_matrix(orientation, [1.0, 1.0, 1.0])
    voxel_to_ras_axis = np.abs(matrix).argmax(axis=0)  # which RAS axis each array axis runs along
    shape = tuple(int(shape_ras[a]) for a in voxel_to_ras_axis)
    spacing = [float(spacing_ras[a]) for a in voxel_to_ras_axis]
    linear = _orientation_matrix(orientation, spacing)
    centre_voxel = (np.array(shape) - 1) / 2
    offset = -linear @ centre_voxel + rng.uniform(-5, 5, size=3)
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = linear, offset

    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float32)
    world = grid @ linear.T.astype(np.float32) + offset.astype(np.float32)
    x, y, z = world[..., 0], world[..., 1], world[..., 2]

    scale = rng.uniform(0.9, 1.1)
    body_a, body_b = 52.0 * scale * rng.uniform(0.93, 1.07), 42.0 * scale * rng.uniform(0.93, 1.07)
    body = (x / body_a) ** 2 + (y / body_b) ** 2
    # One intensity per tissue and channel: CT in HU, MRI in the contrasts of MRI_CHANNELS.
    if modality == "ct":
        tissues = [(AIR_HU, FAT_HU, SOFT_TISSUE_HU, {name: hu for name, (_, hu, _, _) in ORGANS.items()})]
    else:
        tissues = [(0.0, fat, soft, organs) for _, fat, soft, organs in MRI_CHANNELS]
    channels = []
    for air, fat, soft, _ in tissues:
        channel = np.full(shape, air, dtype=np.float32)
        channel[body <= 1.0] = fat
        channel[body <= 0.78] = soft
        channels.append(channel)
    label = np.zeros(shape, dtype=np.uint8)

    for name, (value, _, centre, axes) in ORGANS.items():
        c = np.array(centre) * scale + rng.normal(0, 2.5, size=3)
        r = np.array(axes) * scale * rng.uniform(0.85, 1.15, size=3)
        angle = rng.uniform(-0.3, 0.3)  # in-plane rotation of the organ
        dx, dy = x - c[0], y - c[1]
        u, v = np.cos(angle) * dx + np.sin(angle) * dy, -np.sin(angle) * dx + np.cos(angle) * dy
        inside = (u / r[0]) ** 2 + (v / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1.0
        for channel, (_, _, _, organs) in zip(channels, tissues, strict=True):
            channel[inside] = organs[name] + rng.normal(0, 4)
        label[inside] = LATERAL_VALUES[name] if lateral else value

    if modality == "ct":
        image = channels[0] + rng.normal(0, 12.0, size=shape).astype(np.float32)
        return np.clip(np.round(image), -1024, 3071).astype(np.int16), label, affine
    inside_body = body <= 1.0
    for channel in channels:  # noise inside the body, zero outside; an arbitrary gain per case and channel
        channel += inside_body * rng.normal(0, 20.0, size=shape).astype(np.float32)
        channel *= rng.uniform(0.7, 1.4)
    image = np.stack(channels, axis=-1)
    return np.clip(np.round(image), 0, 32767).astype(np.int16), label, affine


def make_brats_case(
    rng: np.random.Generator, orientation: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One BraTS-like case: a head in the four channels of :data:`BRATS_CHANNELS` (4D, channels last, int16)
    with one tumour of nested labels (:data:`BRATS_LABELS`): edema around a core whose shell enhances, at a
    random place in the brain; ``(image, label, affine)`` as :func:`make_case` returns them."""
    orientation = orientation or str(rng.choice(ORIENTATIONS))
    spacing_ras = np.array([rng.uniform(1.8, 2.2), rng.uniform(1.8, 2.2), rng.uniform(2.0, 2.6)])
    extent_ras = np.array([rng.uniform(100, 110), rng.uniform(120, 130), rng.uniform(95, 105)])
    shape_ras = np.round(extent_ras / spacing_ras).astype(int)
    voxel_to_ras_axis = np.abs(_orientation_matrix(orientation, [1.0, 1.0, 1.0])).argmax(axis=0)
    shape = tuple(int(shape_ras[a]) for a in voxel_to_ras_axis)
    linear = _orientation_matrix(orientation, [float(spacing_ras[a]) for a in voxel_to_ras_axis])
    offset = -linear @ ((np.array(shape) - 1) / 2) + rng.uniform(-4, 4, size=3)
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = linear, offset
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float32)
    world = grid @ linear.T.astype(np.float32) + offset.astype(np.float32)
    head_axes = np.array([44.0, 54.0, 42.0]) * rng.uniform(0.92, 1.05, size=3)
    head = (((world / head_axes) ** 2).sum(-1)).astype(np.float32)
    centre = rng.uniform(-0.35, 0.35, size=3) * head_axes
    edema_axes = rng.uniform(16.0, 23.0, size=3)
    core_axes = edema_axes * rng.uniform(0.5, 0.65, size=3)

    def inside(axes: np.ndarray) -> np.ndarray:
        return (((world - centre) / axes) ** 2).sum(-1) <= 1.0

    edema, core, necrosis = inside(edema_axes), inside(core_axes), inside(core_axes * rng.uniform(0.55, 0.7))
    label = np.zeros(shape, dtype=np.uint8)
    label[edema & (head <= 0.85)] = 1
    label[core & (head <= 0.85)] = 3
    label[necrosis & (head <= 0.85)] = 2
    channels = []
    for _, skull, brain, edema_value, core_value, enhancing in BRATS_CHANNELS:
        channel = np.zeros(shape, dtype=np.float32)
        channel[head <= 1.0] = skull
        channel[head <= 0.85] = brain
        for value, intensity in ((1, edema_value), (2, core_value), (3, enhancing)):
            channel[label == value] = intensity + rng.normal(0, 10)
        channel += (head <= 1.0) * rng.normal(0, 25.0, size=shape).astype(np.float32)
        channels.append(channel * rng.uniform(0.7, 1.4))
    image = np.stack(channels, axis=-1)
    return np.clip(np.round(image), 0, 32767).astype(np.int16), label, affine


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    nifti = nib.Nifti1Image(array, affine)
    nifti.header.set_data_dtype(array.dtype)
    nifti.header.set_xyzt_units("mm")
    tmp = path.with_name(path.name + ".tmp.nii.gz")
    nib.save(nifti, tmp)
    os.replace(tmp, path)


def write_dataset(
    output: str | os.PathLike,
    num_train: int = 8,
    num_val: int = 2,
    num_test: int = 2,
    seed: int = 0,
    modality: str = "ct",
    layout: str = "published",
    lateral: bool = False,
) -> dict:
    """Write a phantom dataset under ``output`` in ``layout`` (see the module docstring) and return its
    dataset.json.

    Cases are named ``phantom_NNN``; ``num_val`` validation cases are written in the ``published`` layout
    only. In the published layout, a CT dataset.json carries the FLARE settings (labels, 1.0 x 1.0 x 1.2 mm
    spacing, -125..275 HU window); every other one leaves spacing and normalisation to be derived.
    ``lateral``: the kidneys labelled by side (:data:`LATERAL_LABELS`). ``modality="brats"``: brain tumours
    (:func:`make_brats_case`) with BraTS's regions.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    if lateral and modality == "brats":
        raise ValueError("lateral labels are of the abdominal phantoms (ct, mri), not brats")
    num_val = num_val if layout == "published" else 0
    least_val = 1 if layout == "published" else 0
    for name, count, least in (("num_train", num_train, 1), ("num_val", num_val, least_val), ("num_test", num_test, 0)):
        if count < least:
            raise ValueError(f"{name} must be at least {least}, got {count}")
    root = Path(output)
    rng = np.random.default_rng(seed)
    channels = [name for name, *_ in {"ct": [("CT",)], "mri": MRI_CHANNELS, "brats": BRATS_CHANNELS}[modality]]
    splits = {"training": num_train, "validation": num_val, "test": num_test}
    lists: dict[str, list] = {split: [] for split in splits}
    case = 0
    for split, count in splits.items():
        image_dir, label_dir = {"training": ("imagesTr", "labelsTr"), "validation": ("imagesVal", "labelsVal")}.get(
            split, ("imagesTs", "labelsTs")
        )
        for _ in range(count):
            if modality == "brats":
                image, label, affine = make_brats_case(rng)
            else:
                image, label, affine = make_case(rng, modality=modality, lateral=lateral)
            name = f"phantom_{case:03d}"
            (root / image_dir).mkdir(parents=True, exist_ok=True)
            (root / label_dir).mkdir(parents=True, exist_ok=True)
            if layout == "nnunet":
                for index in range(len(channels)):
                    channel = image if image.ndim == 3 else image[..., index]
                    _save(channel, affine, root / image_dir / f"{name}_{index:04d}.nii.gz")
            else:
                _save(image, affine, root / image_dir / f"{name}.nii.gz")
            _save(label, affine, root / label_dir / f"{name}.nii.gz")
            lists[split].append({"image": f"./{image_dir}/{name}.nii.gz", "label": f"./{label_dir}/{name}.nii.gz"})
            case += 1
    labels = BRATS_LABELS if modality == "brats" else LATERAL_LABELS if lateral else LABELS
    description = _description(layout, modality, channels, lists, labels)
    (root / "dataset.json").write_text(json.dumps(description, indent=2) + "\n")
    return description


#: The sources of ``--union``: each label's name and the ``--lateral`` values it holds (others: background).
UNION_SOURCES = {
    "organs": {"spleen": (1,), "kidney": (2, 3), "liver": (4,)},
    "kidneys": {"right kidney": (2,), "left kidney": (3,), "pancreas": (5,)},
}


#: The target spacing of the ``--union`` datasets: telling the right kidney from the left takes the liver or
#: the spleen in view, which a 32^3 crop (the CPU configuration) holds at 2 mm, not at FLARE's 1 mm.
UNION_SPACING = {"spacing": [2.0, 2.0, 2.5]}


def write_union(
    output: str | os.PathLike, num_train: int = 8, num_val: int = 2, num_test: int = 2, seed: int = 0
) -> dict:
    """Write the ``--union`` phantom (module docstring) under ``output``: ``num_train`` training,
    ``num_val`` validation and ``num_test // 2`` (at least one) test cases per source, all of them in
    ``full/`` with every class; returns the union JSON."""
    for name, count, least in (("num_train", num_train, 1), ("num_val", num_val, 1), ("num_test", num_test, 1)):
        if count < least:
            raise ValueError(f"{name} must be at least {least}, got {count}")
    root = Path(output)
    rng = np.random.default_rng(seed)
    full: dict[str, list] = {"training": [], "validation": [], "test": []}
    case = 0
    for source, labels in UNION_SOURCES.items():
        lookup = np.zeros(len(LATERAL_LABELS), dtype=np.uint8)
        for value, values in enumerate(labels.values(), start=1):
            lookup[list(values)] = value
        lists: dict[str, list] = {"training": [], "validation": [], "test": []}
        for split, count in (("training", num_train), ("validation", num_val), ("test", num_test // 2 or 1)):
            image_dir, label_dir = {"training": ("imagesTr", "labelsTr"), "validation": ("imagesVal", "labelsVal")}.get(
                split, ("imagesTs", "labelsTs")
            )
            for _ in range(count):
                image, label, affine = make_case(rng, lateral=True)
                name = f"phantom_{case:03d}"
                for folder, labelled in ((root / source, lookup[label]), (root / "full", label)):
                    (folder / image_dir).mkdir(parents=True, exist_ok=True)
                    (folder / label_dir).mkdir(parents=True, exist_ok=True)
                    _save(image, affine, folder / image_dir / f"{name}.nii.gz")
                    _save(labelled, affine, folder / label_dir / f"{name}.nii.gz")
                entry = {"image": f"./{image_dir}/{name}.nii.gz", "label": f"./{label_dir}/{name}.nii.gz"}
                lists[split].append(entry)
                full[split].append(entry)
                case += 1
        description = {**_description("published", "ct", ["CT"], lists, ("background", *labels)), **UNION_SPACING}
        (root / source / "dataset.json").write_text(json.dumps(description, indent=2) + "\n")
    description = {**_description("published", "ct", ["CT"], full, LATERAL_LABELS), **UNION_SPACING}
    (root / "full" / "dataset.json").write_text(json.dumps(description, indent=2) + "\n")
    union = {
        "name": "Two-source phantom",
        "classes": list(LATERAL_LABELS),
        "sources": [
            {
                "name": source,
                "dataset": f"{source}/dataset.json",
                "labels": {
                    name: [LATERAL_LABELS[v] for v in values] if len(values) > 1 else LATERAL_LABELS[values[0]]
                    for name, values in labels.items()
                },
            }
            for source, labels in UNION_SOURCES.items()
        ],
        "test": [{key: f"./full/{path[2:]}" for key, path in entry.items()} for entry in full["test"]],
    }
    (root / "union.json").write_text(json.dumps(union, indent=2) + "\n")
    naive = {**union, "name": "Two-source phantom, naive merging", "unannotated": "background"}
    (root / "union_naive.json").write_text(json.dumps(naive, indent=2) + "\n")
    return union


def _description(
    layout: str, modality: str, channels: list[str], lists: dict[str, list], labels: Sequence[str]
) -> dict:
    """The dataset.json of a phantom dataset in ``layout``."""
    name = {"ct": "FLARE-like phantom", "mri": "Two-channel MRI phantom", "brats": "BraTS-like phantom"}[modality]
    numbered = {str(i): channel for i, channel in enumerate(channels)}
    order = {"regions_class_order": [1, 2, 3]} if modality == "brats" else {}
    if layout == "nnunet":
        by_name = {"background": 0, **BRATS_REGIONS} if modality == "brats" else None
        return {
            "name": name,
            "channel_names": numbered,
            "labels": by_name or {label: value for value, label in enumerate(labels)},
            **order,
            "numTraining": len(lists["training"]),
            "file_ending": ".nii.gz",
        }
    what = "brain tumour MRI" if modality == "brats" else f"abdominal {modality.upper()}"
    description: dict = {
        "name": name,
        "description": f"Synthetic {what} phantoms (phantom.py)",
        "tensorImageSize": "3D" if len(channels) == 1 else "4D",
        "modality": numbered,
        "labels": {str(i): label for i, label in enumerate(labels)},
        "numTraining": len(lists["training"]),
        "numTest": len(lists["test"]),
    }
    if modality == "brats":
        description.update(regions=BRATS_REGIONS, **order)
    if layout == "published" and modality == "ct":
        description.update(spacing=[1.0, 1.0, 1.2], intensity={"a_min": -125.0, "a_max": 275.0})
    description["training"] = lists["training"]
    if layout == "published":
        description["validation"] = lists["validation"]
        description["test"] = lists["test"]
    else:  # the Decathlon lists test images by path, without labels
        description["test"] = [entry["image"] for entry in lists["test"]]
    return description


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="data/phantom", help="dataset folder to write (default data/phantom)")
    parser.add_argument("--num_train", type=int, default=8, help="training cases (default 8)")
    parser.add_argument("--num_val", type=int, default=2, help="validation cases, published layout (default 2)")
    parser.add_argument("--num_test", type=int, default=2, help="test cases (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--modality",
        default="ct",
        choices=MODALITIES,
        help="ct, two-channel mri, or brats (four MRI channels, nested tumour labels, BraTS regions; default ct)",
    )
    parser.add_argument("--layout", default="published", choices=LAYOUTS, help="dataset layout (default published)")
    parser.add_argument(
        "--lateral", action="store_true", help="label the kidneys by side: right kidney 2, left kidney 3 (as AMOS)"
    )
    parser.add_argument(
        "--union",
        action="store_true",
        help="two CT sources annotating different organs, union.json, and the fully labelled full/ (ignores --layout)",
    )
    args = parser.parse_args(argv)
    if args.union:
        try:
            write_union(args.output, args.num_train, args.num_val, args.num_test, args.seed)
        except ValueError as error:
            parser.error(str(error))
        print(f"Wrote the two-source phantom (organs/, kidneys/, full/, union.json) to {args.output}")
        return
    try:
        description = write_dataset(
            args.output,
            args.num_train,
            args.num_val,
            args.num_test,
            args.seed,
            args.modality,
            args.layout,
            args.lateral,
        )
    except ValueError as error:
        parser.error(str(error))
    total = args.num_train + (args.num_val if args.layout == "published" else 0) + args.num_test
    print(
        f"Wrote {total} phantom cases ({description['name']}, {args.layout} layout) and dataset.json to {args.output}"
    )


if __name__ == "__main__":
    main()
