"""A dataset's fingerprint, and the settings derived from it where the dataset does not give them.

As nnU-Net does: the target spacing is the median voxel spacing of the training cases (along the RAS
axes), and the window of a CT channel spans the 0.5 and 99.5 percentiles of its foreground intensities
(the voxels labelled non-zero; up to :data:`FOREGROUND_SAMPLES` of them per case, drawn with a fixed
seed, so the fingerprint of the same files is the same on every run and machine).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import nibabel as nib
import numpy as np
from tqdm import tqdm

from dataset_config import MEDIAN, DatasetConfig
from load_datasets_transforms import CaseSummary, along_ras, case_files, case_name

__all__ = [
    "FINGERPRINT_FILE",
    "FINGERPRINT_VERSION",
    "FOREGROUND_SAMPLES",
    "case_fingerprint",
    "compute_fingerprint",
    "derive_settings",
    "preprocessed_bytes",
]

FINGERPRINT_FILE = "dataset_fingerprint.json"
FINGERPRINT_VERSION = 1
#: Foreground voxels sampled per case and channel for the intensity statistics.
FOREGROUND_SAMPLES = 10_000
#: The percentiles of the foreground intensities that make a derived CT window.
WINDOW_PERCENTILES = (0.5, 99.5)


def _channel_arrays(case: dict) -> list[np.ndarray]:
    """The image of a case as one 3D float32 array per channel."""
    files = case_files({"image": case["image"]})
    if len(files) > 1:
        images = [nib.load(path) for path in files]
        return [image.get_fdata(dtype=np.float32).reshape(image.shape[:3]) for image in images]
    data = nib.load(files[0]).get_fdata(dtype=np.float32)
    return [data] if data.ndim == 3 else [data[..., c] for c in range(data.shape[3])]


def case_fingerprint(case: dict, seed: int) -> dict:
    """One labelled case: its ``spacing`` (RAS), its ``foreground_voxels`` count and, per channel, a
    ``sample`` of up to :data:`FOREGROUND_SAMPLES` foreground intensities drawn with ``seed``."""
    label_image = nib.load(case["label"])
    foreground = np.flatnonzero(np.asanyarray(label_image.dataobj).reshape(label_image.shape[:3]) > 0)
    chosen = np.random.default_rng(seed).choice(foreground, min(FOREGROUND_SAMPLES, foreground.size), replace=False)
    chosen.sort()
    return {
        "spacing": list(along_ras(label_image.shape[:3], label_image.affine)[1]),  # the label has its image's geometry
        "foreground_voxels": int(foreground.size),
        "samples": [channel.reshape(-1)[chosen] for channel in _channel_arrays(case)],
    }


def compute_fingerprint(
    cases: Sequence[dict], channels: Sequence[str], workers: int = 1, progress: bool = False
) -> dict:
    """The fingerprint of labelled ``cases`` (read on ``workers`` threads, with a progress bar when
    ``progress``): their median spacing and, per channel, statistics of the foreground intensities.
    The result is JSON: ``cases``, ``median_spacing``, ``spacing_min``, ``spacing_max``, ``channels``
    (``name``, ``percentile_00_5``, ``percentile_99_5``, ``mean``, ``std``, ``median``, ``min``,
    ``max``), ``cases_without_foreground``."""
    ordered = sorted(cases, key=lambda case: (case_name(case["image"]), case_files(case)))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        jobs = pool.map(case_fingerprint, ordered, range(len(ordered)))
        results = list(tqdm(jobs, total=len(ordered), desc="Dataset fingerprint", disable=not progress))
    spacings = np.array([result["spacing"] for result in results])
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
        "median_spacing": np.median(spacings, axis=0).tolist(),
        "spacing_min": spacings.min(axis=0).tolist(),
        "spacing_max": spacings.max(axis=0).tolist(),
        "channels": statistics,
        "cases_without_foreground": [
            os.path.basename(case_files(case)[0])
            for case, result in zip(ordered, results, strict=True)
            if not result["foreground_voxels"]
        ],
    }


def derive_settings(config: DatasetConfig, fingerprint: dict) -> tuple[DatasetConfig, dict]:
    """``config`` with the settings it leaves to the data filled in from ``fingerprint``; and those
    settings (``{"spacing": [...], "window of CT": [a_min, a_max]}``, empty when none were derived)."""
    derived: dict = {}
    spacing = config.spacing
    if spacing == MEDIAN:
        spacing = tuple(round(float(s), 4) for s in fingerprint["median_spacing"])
        derived["spacing"] = list(spacing)
    normalization = []
    for name, norm, statistics in zip(config.channels, config.normalization, fingerprint["channels"], strict=True):
        if norm.scheme == "ct" and norm.window is None:
            low, high = statistics["percentile_00_5"], statistics["percentile_99_5"]
            if not high > low:
                raise ValueError(
                    f"channel {name}: its foreground intensities span {low:g}..{high:g}, no window can be "
                    "derived; give one in the dataset JSON (intensity or normalization)"
                )
            norm = replace(norm, window=(low, high))
            derived[f"window of {name}"] = [low, high]
        normalization.append(norm)
    return replace(config, spacing=spacing, normalization=tuple(normalization)), derived


def preprocessed_bytes(summary: CaseSummary, spacing: Sequence[float] | None) -> int:
    """Memory (bytes) of a case once preprocessed: float32 channels and label resampled to ``spacing``
    (None: the native grid), before the foreground crop (an upper bound)."""
    shape = np.array(summary.shape, dtype=float)
    if spacing is not None:
        shape = np.round(shape * np.array(summary.spacing) / np.array(spacing))
    return int(np.prod(shape)) * (summary.channels + 1) * 4
