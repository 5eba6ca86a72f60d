"""Synthetic FLARE-like abdominal CT phantoms, written in the published dataset layout.

Each case is a small contrast-enhanced abdomen: an elliptic body (fat rim, soft tissue) with liver,
spleen, two kidneys and pancreas as jittered ellipsoids at plausible portal-venous HU values, Gaussian
noise, anisotropic voxels and a randomly chosen orientation in the affine (RAS, LPS, axes swapped, ...),
stored as int16 NIfTI. Labels follow FLARE 2021: 0 background, 1 spleen, 2 kidney, 3 liver, 4 pancreas.

Command: ``python phantom.py --output data/phantom`` writes imagesTr/labelsTr, imagesVal/labelsVal,
imagesTs/labelsTs and an MSD-style ``dataset.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["LABELS", "make_case", "write_dataset"]

LABELS = ("background", "spleen", "kidney", "liver", "pancreas")

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


def make_case(rng: np.random.Generator, orientation: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Make one phantom case.

    Args:
        rng: random generator (sizes, positions, spacing, orientation and noise come from it).
        orientation: axis code of the stored array (random from ``ORIENTATIONS`` when None).

    Returns:
        ``(image, label, affine)``: int16 HU image, uint8 label of the same shape, 4x4 affine to RAS mm.
    """
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
    image = np.full(shape, AIR_HU, dtype=np.float32)
    image[body <= 1.0] = FAT_HU
    image[body <= 0.78] = SOFT_TISSUE_HU
    label = np.zeros(shape, dtype=np.uint8)

    for value, hu, centre, axes in ORGANS.values():
        c = np.array(centre) * scale + rng.normal(0, 2.5, size=3)
        r = np.array(axes) * scale * rng.uniform(0.85, 1.15, size=3)
        angle = rng.uniform(-0.3, 0.3)  # in-plane rotation of the organ
        dx, dy = x - c[0], y - c[1]
        u, v = np.cos(angle) * dx + np.sin(angle) * dy, -np.sin(angle) * dx + np.cos(angle) * dy
        inside = (u / r[0]) ** 2 + (v / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1.0
        image[inside] = hu + rng.normal(0, 4)
        label[inside] = value

    image += rng.normal(0, 12.0, size=shape).astype(np.float32)
    image = np.clip(np.round(image), -1024, 3071).astype(np.int16)
    return image, label, affine


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    nifti = nib.Nifti1Image(array, affine)
    nifti.header.set_data_dtype(array.dtype)
    nifti.header.set_xyzt_units("mm")
    tmp = path.with_name(path.name + ".tmp.nii.gz")
    nib.save(nifti, tmp)
    os.replace(tmp, path)


def write_dataset(
    output: str | os.PathLike, num_train: int = 8, num_val: int = 2, num_test: int = 2, seed: int = 0
) -> dict:
    """Write a phantom dataset in the published layout under ``output`` and return its dataset.json.

    Folders: imagesTr/labelsTr (``num_train`` cases), imagesVal/labelsVal, imagesTs/labelsTs; images and
    labels share the file name ``phantom_NNN.nii.gz``. ``dataset.json`` (MSD style) lists the splits and
    the FLARE settings (labels, 1.0 x 1.0 x 1.2 mm spacing, -125..275 HU window).
    """
    for name, count, least in (("num_train", num_train, 1), ("num_val", num_val, 1), ("num_test", num_test, 0)):
        if count < least:
            raise ValueError(f"{name} must be at least {least}, got {count}")
    root = Path(output)
    rng = np.random.default_rng(seed)
    splits = {
        "training": ("imagesTr", "labelsTr", num_train),
        "validation": ("imagesVal", "labelsVal", num_val),
        "test": ("imagesTs", "labelsTs", num_test),
    }
    description: dict = {
        "name": "FLARE-like phantom",
        "description": "Synthetic abdominal CT phantoms (phantom.py)",
        "labels": {str(i): name for i, name in enumerate(LABELS)},
        "modality": {"0": "CT"},
        "spacing": [1.0, 1.0, 1.2],
        "intensity": {"a_min": -125.0, "a_max": 275.0},
    }
    case = 0
    for split, (image_dir, label_dir, count) in splits.items():
        (root / image_dir).mkdir(parents=True, exist_ok=True)
        (root / label_dir).mkdir(parents=True, exist_ok=True)
        entries = []
        for _ in range(count):
            image, label, affine = make_case(rng)
            file_name = f"phantom_{case:03d}.nii.gz"
            _save(image, affine, root / image_dir / file_name)
            _save(label, affine, root / label_dir / file_name)
            entries.append({"image": f"./{image_dir}/{file_name}", "label": f"./{label_dir}/{file_name}"})
            case += 1
        description[split] = entries
    description["numTraining"], description["numTest"] = num_train, num_test
    (root / "dataset.json").write_text(json.dumps(description, indent=2) + "\n")
    return description


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="data/phantom", help="dataset folder to write (default data/phantom)")
    parser.add_argument("--num_train", type=int, default=8, help="training cases (default 8)")
    parser.add_argument("--num_val", type=int, default=2, help="validation cases (default 2)")
    parser.add_argument("--num_test", type=int, default=2, help="test cases (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    try:
        write_dataset(args.output, args.num_train, args.num_val, args.num_test, args.seed)
    except ValueError as error:
        parser.error(str(error))
    total = args.num_train + args.num_val + args.num_test
    print(f"Wrote {total} phantom cases and dataset.json to {args.output}")


if __name__ == "__main__":
    main()
