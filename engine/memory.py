"""How much memory a case's inference takes, how much the machine has, and the peak a process reached.

The estimate (:func:`inference_bytes`) counts what the slab-wise path (``engine.stitching``,
``engine.input_grid``) holds at once, apart from the network's own activations, which depend on the
network and ``--sw_batch_size`` and come on top (on the GPU, where the network runs there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from engine.input_grid import SLAB_BYTES

__all__ = [
    "InferenceMemory",
    "available_bytes",
    "device_bytes",
    "gigabytes",
    "inference_bytes",
    "network_grid_shape",
    "peak_resident_bytes",
    "peak_text",
    "resident_bytes",
    "reset_peak_resident",
    "start_peak",
]

#: What the process holds before any case: Python, PyTorch and MONAI loaded (measured: ~0.6 GB).
BASELINE_BYTES = 700 * 2**20


def gigabytes(count: float) -> str:
    """``3.7 GB`` (GiB), or ``12 MB`` (MiB) below a tenth of a GB."""
    return f"{count / 2**30:.1f} GB" if count >= 2**30 / 10 else f"{count / 2**20:.0f} MB"


@dataclass(frozen=True)
class InferenceMemory:
    """The bytes of one case's inference, in its three phases (the largest is the case's need).

    Args:
        preprocessing: the input read as float32, its float64 copy and the resampling's coordinate grid
            and output (MONAI's ``Spacingd`` computes in float64).
        stitching: the preprocessed image (and a flipped copy), the 2-byte probabilities of every class on
            the network grid, the float32 buffer of one row of windows and a batch of windows' logits.
        output: the probabilities, the label map on the input grid, a slab of every class and its
            coordinates, and the connected components of ``--keep_largest``.
    """

    preprocessing: int
    stitching: int
    output: int

    @property
    def total(self) -> int:
        return BASELINE_BYTES + max(self.preprocessing, self.stitching, self.output)


def inference_bytes(
    input_shape: Sequence[int],
    in_channels: int,
    network_shape: Sequence[int],
    num_classes: int,
    roi: Sequence[int],
    sw_batch_size: int,
) -> InferenceMemory:
    """The memory of a case whose input has ``input_shape`` voxels (and ``in_channels`` channels) and whose
    preprocessed image has ``network_shape`` (before the crop, an upper bound), for ``num_classes`` and
    ``sw_batch_size`` windows of ``roi`` at a time."""
    voxels, grid = math.prod(input_shape), math.prod(network_shape)
    resampling = grid * (3 + 4) * 8 + in_channels * grid * (8 + 4)  # float64 coordinates and output
    preprocessing = in_channels * voxels * (4 + 8) + resampling
    image = 2 * in_channels * grid * 4
    probabilities = 2 * num_classes * grid
    stitching = image + probabilities + _row_bytes(network_shape, roi, num_classes)
    stitching += _logits_bytes(roi, num_classes, sw_batch_size)
    plane = input_shape[0] * input_shape[1]
    planes = max(1, min(input_shape[2], SLAB_BYTES // (num_classes * plane * 4)))
    slab = planes * plane * (3 * num_classes * 4 + 3 * 8 * 2)  # sampled values, argmax, float16 copy, points
    labels = voxels * (1 + 4 + 1)  # uint8 labels, int32 components and a mask of --keep_largest
    output = image // 2 + probabilities + slab + labels
    return InferenceMemory(preprocessing, stitching, output)


def device_bytes(
    network_shape: Sequence[int],
    in_channels: int,
    num_classes: int,
    roi: Sequence[int],
    sw_batch_size: int,
    input_voxels: int,
    holds_probabilities: bool,
) -> int:
    """What inference puts on the GPU it runs on, apart from the network's activations: one row of windows
    (float32 sum and count, half again while it moves on), a batch of windows and their logits, and, when
    they are held there, the 2-byte probabilities and a slab of the input grid (``input_voxels`` in all)."""
    windows = sw_batch_size * math.prod(roi) * in_channels * 4
    slab = 3 * min(SLAB_BYTES, num_classes * input_voxels * 4)
    held = 2 * num_classes * math.prod(network_shape) + slab if holds_probabilities else 0
    return _row_bytes(network_shape, roi, num_classes) + windows + _logits_bytes(roi, num_classes, sw_batch_size) + held


def _row_bytes(network_shape: Sequence[int], roi: Sequence[int], num_classes: int) -> int:
    """One row of windows: its float32 sum of every class and its count, half again while it moves on."""
    width, height = max(network_shape[0], roi[0]), max(network_shape[1], roi[1])
    return 6 * (num_classes + 1) * width * height * roi[2]


def _logits_bytes(roi: Sequence[int], num_classes: int, sw_batch_size: int) -> int:
    """The logits of a batch of windows, as the network gives them and in float32."""
    return 2 * sw_batch_size * num_classes * math.prod(roi) * 4


def available_bytes() -> int | None:
    """The memory this process may still take: the system's available memory, or the container's (cgroup)
    limit less its use where that is lower. None where neither can be read (not Linux)."""
    available = _proc_bytes("/proc/meminfo", "MemAvailable")
    candidates = [] if available is None else [available]
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit, usage = _read(limit_file), _read(usage_file)
        if limit and usage and limit.strip().isdigit() and int(limit) < 2**60:
            candidates.append(int(limit) - int(usage))
    return min(candidates) if candidates else None


def peak_resident_bytes() -> int | None:
    """The process's peak resident memory (VmHWM) since it started or :func:`reset_peak_resident`."""
    return _proc_bytes("/proc/self/status", "VmHWM")


def resident_bytes() -> int | None:
    """The process's resident memory now (VmRSS)."""
    return _proc_bytes("/proc/self/status", "VmRSS")


def start_peak(device) -> None:
    """Measure the next peak from now: resident memory and, on CUDA, the device's allocations."""
    reset_peak_resident()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_text(device) -> str:
    """The peaks since :func:`start_peak`: ``peak memory 2.1 GB resident, 5.3 GB on cuda:0``."""
    resident = peak_resident_bytes()
    parts = [f"{gigabytes(resident)} resident"] if resident is not None else []
    if device.type == "cuda":
        parts.append(f"{gigabytes(torch.cuda.max_memory_allocated(device))} on {device}")
    return f"peak memory {', '.join(parts)}" if parts else ""


def reset_peak_resident() -> bool:
    """Start the peak resident memory anew from the current use (Linux ``clear_refs``); False where the
    system does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _proc_bytes(path: str, field: str) -> int | None:
    """A ``field: N kB`` line of a /proc file in bytes; None where the file or the field is missing."""
    for line in (_read(path) or "").splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return None


def network_grid_shape(
    shape: Sequence[int], affine: np.ndarray, spacing: Sequence[float] | None
) -> tuple[int, int, int]:
    """The RAS shape of an image of ``shape`` and ``affine`` (its file's header) resampled to ``spacing``
    (None: as it is), before the foreground crop: what the network grid of its case is at most."""
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    sizes, extents = [0, 0, 0], [0.0, 0.0, 0.0]
    for file_axis, (axis, _) in enumerate(nib.io_orientation(affine)):
        sizes[int(axis)], extents[int(axis)] = shape[file_axis], shape[file_axis] * zooms[file_axis]
    if spacing is None:
        return tuple(sizes)
    return tuple(int(math.ceil(extent / step)) for extent, step in zip(extents, spacing, strict=True))
