"""The fingerprint of a dataset's training cases, and the settings derived from it where the dataset does
not give them, by nnU-Net v2's rules (``DatasetFingerprintExtractor``, ``ExperimentPlanner``):

- each case is cropped to the bounding box of its non-zero voxels (any channel); the fingerprint keeps
  its spacing (RAS), shape after cropping and the share of its volume the crop keeps;
- target spacing: the median spacing; but where one axis is anisotropic (its median spacing above 3
  times the largest other one, and its median size after cropping below a third of the smallest other
  one), that axis takes the 10th percentile of its spacings (never below the other axes' largest);
- CT normalisation (``ct_zscore``, nnU-Net's ``CTNormalization``): the 0.5 and 99.5 percentiles, the mean
  and the standard deviation of the foreground intensities (label > 0), pooled from the same number of
  samples of every case, drawn with replacement (``numpy.random.RandomState(1234)`` per case, as
  nnU-Net): :data:`FOREGROUND_SAMPLES_TOTAL` over the dataset, divided evenly between its cases;
- z-score: over the non-zero region (holes filled) when the crop keeps, in the median case, less than
  three quarters of the volume; else over every voxel.

Deliberate difference: nnU-Net pools 10^8 samples; :data:`FOREGROUND_SAMPLES_TOTAL` is 10^6, which moves
the percentiles by sampling noise only (checked against all the voxels in the tests) and keeps the
fingerprint of a large dataset under a second of sampling and a few MB of memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from atomic_files import save_json
from dataset.cases import case_files, case_name
from dataset.checks import along_ras, file_identity, load_record, user_cache
from dataset.description import MEDIAN, DatasetConfig, DatasetError, counted

__all__ = [
    "ANISOTROPY_THRESHOLD",
    "FINGERPRINT_FILE",
    "FINGERPRINT_VERSION",
    "FOREGROUND_SAMPLES_TOTAL",
    "NONZERO_MASK_SHARE",
    "case_fingerprint",
    "compute_fingerprint",
    "derive_from_data",
    "derive_settings",
    "target_spacing",
]

FINGERPRINT_FILE = "dataset_fingerprint.json"
FINGERPRINT_VERSION = 2
#: Foreground intensities sampled over the whole dataset (the same number from each case).
FOREGROUND_SAMPLES_TOTAL = 10**6
#: nnU-Net's seed of every case's foreground sample.
SAMPLE_SEED = 1234
#: The percentiles of the foreground intensities that a derived CT normalisation clips to.
WINDOW_PERCENTILES = (0.5, 99.5)
#: nnU-Net's ANISO_THRESHOLD: an axis this many times coarser (and shorter) than the others is anisotropic.
ANISOTROPY_THRESHOLD = 3
#: z-score over the non-zero region when the median case keeps less than this share of its volume after cropping.
NONZERO_MASK_SHARE = 0.75
#: CT intensities (HU) outside this range are not plausible: a wrong scale or corrupt voxels.
PLAUSIBLE_HU = (-10_000.0, 100_000.0)


def _channel_arrays(case: dict) -> list[np.ndarray]:
    """The image of a case as one 3D float32 array per channel."""
    files = case_files({"image": case["image"]})
    if len(files) > 1:
        images = [nib.load(path) for path in files]
        return [image.get_fdata(dtype=np.float32).reshape(image.shape[:3]) for image in images]
    data = nib.load(files[0]).get_fdata(dtype=np.float32)
    return [data] if data.ndim == 3 else [data[..., c] for c in range(data.shape[3])]


def _nonzero_box(channels: list[np.ndarray]) -> tuple[slice, ...]:
    """The bounding box of the voxels that are non-zero in any channel (nnU-Net's crop_to_nonzero; filling
    holes, as it does, leaves the box as it is); the whole volume when every voxel is zero."""
    nonzero = np.zeros(channels[0].shape, dtype=bool)
    for channel in channels:
        nonzero |= channel != 0
    if not nonzero.any():
        return tuple(slice(0, size) for size in nonzero.shape)
    box = []
    for axis in range(nonzero.ndim):
        present = np.flatnonzero(nonzero.any(axis=tuple(a for a in range(nonzero.ndim) if a != axis)))
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


def case_fingerprint(case: dict, samples: int, ct_channels: Sequence[bool] = ()) -> dict:
    """One labelled case: its ``spacing`` and ``shape_after_crop`` (RAS), the ``relative_size_after_crop``
    (cropped to its non-zero voxels), its ``foreground_voxels`` count and, per channel, ``samples``
    foreground intensities drawn with replacement. A channel flagged in ``ct_channels`` with intensities
    outside :data:`PLAUSIBLE_HU` is refused with a DatasetError naming the file."""
    label_image = nib.load(case["label"])
    channels = _channel_arrays(case)
    files = case_files({"image": case["image"]})
    for index, (channel, is_ct) in enumerate(zip(channels, ct_channels, strict=False)):
        low, high = float(channel.min()), float(channel.max())
        if is_ct and not (PLAUSIBLE_HU[0] <= low and high <= PLAUSIBLE_HU[1]):
            raise DatasetError(
                f"{files[min(index, len(files) - 1)]}: CT intensities {low:g}..{high:g} are not plausible Hounsfield "
                f"units (expected within {PLAUSIBLE_HU[0]:g}..{PLAUSIBLE_HU[1]:g}); check the file's scaling"
            )
    box = _nonzero_box(channels)
    label = np.asanyarray(label_image.dataobj).reshape(label_image.shape[:3])[box]
    foreground = label > 0
    random = np.random.RandomState(SAMPLE_SEED)
    drawn = []
    for channel in channels:
        values = channel[box][foreground]
        drawn.append(random.choice(values, samples, replace=True) if values.size else np.empty(0, np.float32))
    shape = [s.stop - s.start for s in box]
    return {
        "spacing": list(along_ras(label_image.shape[:3], label_image.affine)[1]),  # the label has its image's geometry
        "shape_after_crop": list(along_ras(shape, label_image.affine)[0]),
        "relative_size_after_crop": float(np.prod(shape) / np.prod(label_image.shape[:3])),
        "foreground_voxels": int(foreground.sum()),
        "samples": drawn,
    }


def target_spacing(spacings: np.ndarray, shapes_after_crop: np.ndarray) -> list[float]:
    """nnU-Net's full-resolution target spacing of cases with these spacings and cropped shapes (cases x 3)."""
    target = np.percentile(spacings, 50, axis=0)
    target_size = np.percentile(shapes_after_crop, 50, axis=0)
    worst = int(np.argmax(target))
    others = [axis for axis in range(3) if axis != worst]
    anisotropic_spacing = target[worst] > ANISOTROPY_THRESHOLD * max(target[others])
    anisotropic_voxels = target_size[worst] * ANISOTROPY_THRESHOLD < min(target_size[others])
    if anisotropic_spacing and anisotropic_voxels:
        spacing = np.percentile(spacings[:, worst], 10)
        if spacing < max(target[others]):  # never finer than the other axes
            spacing = max(max(target[others]), spacing) + 1e-5
        target[worst] = spacing
    return [float(s) for s in target]


def compute_fingerprint(
    cases: Sequence[dict],
    channels: Sequence[str],
    workers: int = 1,
    progress: bool = False,
    ct_channels: Sequence[bool] = (),
) -> dict:
    """The fingerprint of labelled ``cases`` (read on ``workers`` threads, with a progress bar when
    ``progress``); ``ct_channels`` flags the channels whose intensities must be plausible CT. The result is
    JSON: ``cases``, ``target_spacing`` (nnU-Net's rule), ``median_spacing``, ``spacing_min``, ``spacing_max``,
    ``median_shape_after_crop``, ``median_relative_size_after_crop``, ``channels`` (``name``,
    ``percentile_00_5``, ``percentile_99_5``, ``mean``, ``std``, ``median``, ``min``, ``max`` of the pooled
    foreground samples), ``cases_without_foreground``."""
    ordered = sorted(cases, key=lambda case: (case_name(case["image"]), case_files(case)))
    samples = int(FOREGROUND_SAMPLES_TOTAL // max(1, len(ordered)))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        jobs = pool.map(lambda case: case_fingerprint(case, samples, ct_channels), ordered)
        results = list(tqdm(jobs, total=len(ordered), desc="Dataset fingerprint", disable=not progress))
    spacings = np.array([result["spacing"] for result in results])
    shapes = np.array([result["shape_after_crop"] for result in results])
    statistics = []
    for index, name in enumerate(channels):
        values = np.concatenate([result["samples"][index] for result in results]).astype(np.float64)
        low, high = np.percentile(values, WINDOW_PERCENTILES) if values.size else (0.0, 0.0)
        statistics.append(
            {
                "name": name,
                "percentile_00_5": float(low),
                "percentile_99_5": float(high),
                "mean": float(values.mean()) if values.size else 0.0,
                "std": float(values.std()) if values.size else 0.0,
                "median": float(np.median(values)) if values.size else 0.0,
                "min": float(values.min()) if values.size else 0.0,
                "max": float(values.max()) if values.size else 0.0,
            }
        )
    return {
        "version": FINGERPRINT_VERSION,
        "cases": len(results),
        "target_spacing": target_spacing(spacings, shapes),
        "median_spacing": np.median(spacings, axis=0).tolist(),
        "spacing_min": spacings.min(axis=0).tolist(),
        "spacing_max": spacings.max(axis=0).tolist(),
        "median_shape_after_crop": np.median(shapes, axis=0).tolist(),
        "median_relative_size_after_crop": float(np.median([result["relative_size_after_crop"] for result in results])),
        "channels": statistics,
        "cases_without_foreground": [
            os.path.basename(case_files(case)[0])
            for case, result in zip(ordered, results, strict=True)
            if not result["foreground_voxels"]
        ],
    }


def derive_settings(config: DatasetConfig, fingerprint: dict) -> tuple[DatasetConfig, dict]:
    """``config`` with the settings it leaves to the data filled in from ``fingerprint``; and those
    settings (``{"spacing": [...], "foreground statistics of CT": {"window": [a_min, a_max], "mean": m, "std":
    s}, "z-score mask of T1": "non-zero region"}``, empty when none were derived)."""
    derived: dict = {}
    spacing = config.spacing
    if spacing == MEDIAN:
        spacing = tuple(round(float(s), 4) for s in fingerprint["target_spacing"])
        derived["spacing"] = list(spacing)
    use_mask = fingerprint["median_relative_size_after_crop"] < NONZERO_MASK_SHARE
    normalization = []
    for name, norm, statistics in zip(config.channels, config.normalization, fingerprint["channels"], strict=True):
        if norm.scheme == "ct_zscore" and norm.window is None:
            low, high = statistics["percentile_00_5"], statistics["percentile_99_5"]
            if not high > low:
                raise ValueError(
                    f"channel {name}: its foreground intensities are all {low:g}, no normalisation can be derived; "
                    "give a window in the dataset JSON (intensity or normalization)"
                )
            norm = replace(norm, window=(low, high), mean=statistics["mean"], std=statistics["std"])
            derived[f"foreground statistics of {name}"] = {"window": [low, high], "mean": norm.mean, "std": norm.std}
        elif norm.scheme == "zscore" and norm.nonzero_mask is None:
            norm = replace(norm, nonzero_mask=bool(use_mask))
            derived[f"z-score mask of {name}"] = "non-zero region" if use_mask else "all voxels"
        normalization.append(norm)
    return replace(config, spacing=spacing, normalization=tuple(normalization)), derived


def _fingerprint_path(cases: Sequence[dict]) -> Path:
    """The remembered fingerprint of exactly these files in their current state."""
    files = sorted(file_identity(path) for case in cases for path in case_files(case))
    key = json.dumps([FINGERPRINT_VERSION, FOREGROUND_SAMPLES_TOTAL, files])
    return user_cache() / "fingerprints" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def derive_from_data(
    config: DatasetConfig, cases: Sequence[dict], workers: int, main: bool = True
) -> tuple[DatasetConfig, dict | None]:
    """``config`` with what it leaves to the data (spacing, CT normalisations, z-score masks) derived from the
    labelled training ``cases`` (see the module docstring), and ``{"fingerprint": ..., "derived":
    ...}`` to record (None when nothing was to derive). A fingerprint is computed once for a set of
    files (progress bar on ``main``) and reused by later runs over the same files."""
    if not config.to_derive():
        return config, None
    path = _fingerprint_path(cases)
    fingerprint = load_record(path)
    if fingerprint.get("version") != FINGERPRINT_VERSION:
        ct_channels = [norm.scheme in ("ct", "ct_zscore") for norm in config.normalization]
        fingerprint = compute_fingerprint(cases, config.channels, workers, main, ct_channels)
        try:
            save_json(fingerprint, path)
        except OSError:  # a read-only home: computed again next time
            pass
    try:
        config, derived = derive_settings(config, fingerprint)
    except ValueError as error:
        raise DatasetError(f"{config.source or config.name}: {error}") from None
    if main:
        explained = [_explained(name, value, fingerprint) for name, value in derived.items()]
        print(f"Derived from the {counted(fingerprint['cases'], 'training case')}: {'; '.join(explained)}")
    return config, {"fingerprint": fingerprint, "derived": derived}


def _explained(name: str, value, fingerprint: dict) -> str:
    """A derived setting and the rule that gave it, for the run's log."""
    if name.startswith("z-score mask"):
        share = fingerprint["median_relative_size_after_crop"]
        return f"{name}: {value} (cropping to the non-zero region keeps {share:.0%} of the median case)"
    if name.startswith("foreground statistics"):
        low, high = value["window"]
        return (
            f"{name}: clip {low:g}..{high:g}, mean {value['mean']:g}, std {value['std']:g} (0.5 and 99.5 "
            "percentiles, mean and standard deviation of the foreground)"
        )
    numbers = ",".join(f"{v:g}" for v in value)  # the spacing
    rule = (
        "the median" if value == [round(s, 4) for s in fingerprint["median_spacing"]] else "nnU-Net's anisotropy rule"
    )
    return f"spacing {numbers} mm ({rule})"
