"""How much memory test_seg.py's inference takes, how much the machine has, and the peak a process reached.

The estimate (:func:`tree_bytes`) counts what test_seg.py's processes hold at once: the main process (Python and
the libraries, every model's weights, the cases ``--cache_rate`` caches, the case being segmented with the
slab-wise path of ``engine.stitching`` and ``engine.input_grid``, and the network's activations, traced by
:func:`activation_bytes`) and its ``--num_workers`` data-loading workers, each preprocessing a case of its
own meanwhile. Every case is taken from its header, at its size before the foreground crop (an upper bound).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from engine.input_grid import SLAB_BYTES
from engine.stitching import WindowPlan

__all__ = [
    "CaseGrid",
    "InferenceMemory",
    "ModelMemory",
    "TreeMemory",
    "TreePeak",
    "activation_bytes",
    "available_bytes",
    "case_grid",
    "device_bytes",
    "gigabytes",
    "inference_bytes",
    "network_grid_shape",
    "peak_resident_bytes",
    "peak_text",
    "process_tree",
    "resident_bytes",
    "reset_peak_resident",
    "start_peak",
    "tree_bytes",
    "tree_pss_bytes",
    "windows_per_batch",
]

#: What test_seg.py's process holds before any case: Python, PyTorch, MONAI and nibabel loaded (measured as
#: proportional set size: 0.76 GB; BENCHMARKS.md, "test_seg.py's memory as a process tree").
BASELINE_BYTES = 800 * 2**20
#: What a forked data-loading worker holds of its own before its case (the rest it shares with the main
#: process; measured: 25 MB each).
WORKER_BYTES = 64 * 2**20
#: The network's activations as traced (:func:`activation_bytes`, the tensors it allocates) are multiplied by
#: this, and :data:`ACTIVATION_EXTRA` added: the CPU's convolution and FFT workspaces and its allocator, which no
#: tensor shows (measured on six registry networks: the estimate is 1.03-1.3 times what a real forward adds;
#: BENCHMARKS.md, "test_seg.py's memory as a process tree").
ACTIVATION_FACTOR = 1.25
ACTIVATION_EXTRA = 200 * 2**20


def gigabytes(count: float) -> str:
    """``3.7 GB`` (GiB), or ``12 MB`` (MiB) below a tenth of a GB."""
    return f"{count / 2**30:.1f} GB" if count >= 2**30 / 10 else f"{count / 2**20:.0f} MB"


@dataclass(frozen=True)
class CaseGrid:
    """A case as its header gives it: ``name``, its input's spatial shape (``input_shape``, file order) and its
    resampled RAS grid before the foreground crop (``network_shape``: the network grid at most)."""

    name: str
    input_shape: tuple[int, int, int]
    network_shape: tuple[int, int, int]


def case_grid(name: str, path: str, spacing: Sequence[float] | None) -> CaseGrid:
    """The :class:`CaseGrid` of a case whose (first) image file is ``path``, from its header alone."""
    header = nib.load(path)
    input_shape = tuple(int(s) for s in header.shape[:3])
    return CaseGrid(name, input_shape, network_grid_shape(input_shape, header.affine, spacing))


@dataclass(frozen=True)
class InferenceMemory:
    """The bytes of one case in each of its three phases, beside what a process holds anyway.

    Args:
        preprocessing: the input read as float32, its float64 copy and the resampling's coordinate grid
            and output (MONAI's ``Spacingd`` computes in float64): in a data-loading worker, or in the main
            process without one.
        stitching: the preprocessed image (and a flipped copy), the 2-byte probabilities of every output on
            the network grid, the float32 buffer of one row of windows and the network's activations for a
            batch of windows (or, where they are unknown, the batch's logits).
        output: the probabilities, the label map on the input grid, a slab of every output and its
            coordinates, and the connected components of ``--keep_largest``.
    """

    preprocessing: int
    stitching: int
    output: int

    @property
    def segmenting(self) -> int:
        """The case in the main process, once preprocessed."""
        return max(self.stitching, self.output)


def inference_bytes(
    input_shape: Sequence[int],
    in_channels: int,
    network_shape: Sequence[int],
    num_classes: int,
    roi: Sequence[int],
    batch: int,
    activations: int | None = None,
) -> InferenceMemory:
    """The memory of a case whose input has ``input_shape`` voxels (and ``in_channels`` channels) and whose
    preprocessed image has ``network_shape`` (before the crop, an upper bound), for ``num_classes`` outputs
    and ``batch`` windows of ``roi`` at a time, whose network's ``activations`` (bytes, on this host; 0 where
    the network runs on a GPU, None where unknown: the batch's logits stand for them) come on top."""
    voxels, grid = math.prod(input_shape), math.prod(network_shape)
    resampling = grid * (3 + 4) * 8 + in_channels * grid * (8 + 4)  # float64 coordinates and output
    preprocessing = in_channels * voxels * (4 + 8) + resampling
    image = 2 * in_channels * grid * 4
    probabilities = 2 * num_classes * grid
    stitching = image + probabilities + _row_bytes(network_shape, roi, num_classes)
    stitching += _logits_bytes(roi, num_classes, batch) if activations is None else activations
    plane = input_shape[0] * input_shape[1]
    planes = max(1, min(input_shape[2], SLAB_BYTES // (num_classes * plane * 4)))
    slab = planes * plane * (3 * num_classes * 4 + 3 * 8 * 2)  # sampled values, argmax, float16 copy, points
    labels = voxels * (1 + 4 + 1)  # uint8 labels, int32 components and a mask of --keep_largest
    output = image // 2 + probabilities + slab + labels
    return InferenceMemory(preprocessing, stitching, output)


def windows_per_batch(network_shape: Sequence[int], roi: Sequence[int], overlap: float, sw_batch_size: int) -> int:
    """The windows the network sees at once: ``--sw_batch_size``, or fewer where a row of windows (those
    that share a start along the last axis, which ``engine.stitching`` batches together) has fewer."""
    plan = WindowPlan(tuple(int(s) for s in network_shape), tuple(int(r) for r in roi), overlap)
    return max(1, min(sw_batch_size, len(plan.starts(0)) * len(plan.starts(1))))


@dataclass(frozen=True)
class ModelMemory:
    """One model of an ensemble, for the estimate.

    Args:
        roi: its sliding-window size.
        weight_bytes: its weights as this host holds them (loaded and in the network).
        activations: the bytes of its activations on this host for a batch of so many windows (0 for a
            network on a GPU; None where unknown).
    """

    roi: tuple[int, int, int]
    weight_bytes: int
    activations: Callable[[int], int | None]


@dataclass(frozen=True)
class TreeMemory:
    """test_seg.py's estimated peak: ``main`` (the main process), ``workers`` (its data-loading workers,
    together), set by the case named ``largest``; ``activations_known`` False where a network's activations
    could not be traced (its batch's logits stand for them)."""

    main: int
    workers: int
    largest: str
    activations_known: bool = True

    @property
    def total(self) -> int:
        return self.main + self.workers


def tree_bytes(
    cases: Sequence[CaseGrid],
    in_channels: int,
    num_outputs: int,
    models: Sequence[ModelMemory],
    sw_batch_size: int,
    overlap: float,
    num_workers: int,
    cache_rate: float,
) -> TreeMemory:
    """The peak memory of test_seg.py's process tree for ``cases`` (in order), an upper bound.

    The main process holds :data:`BASELINE_BYTES`, every model's weights, the first ``int(cache_rate *
    cases)`` cases preprocessed (MONAI's ``CacheDataset`` caches them first, ``max(num_workers, 1)`` at a
    time) and one case being segmented with one model at a time (:func:`inference_bytes`; with
    ``num_workers`` 0 it preprocesses that case too). Meanwhile each worker (:data:`WORKER_BYTES`) may
    preprocess a case of its own, and up to two batches per worker wait in shared memory. Every case is
    taken at its largest, the largest case for each term."""
    if not cases:
        return TreeMemory(BASELINE_BYTES, 0, "")
    known = True
    per_case = []
    for case in cases:
        worst = None
        for model in models:
            batch = windows_per_batch(case.network_shape, model.roi, overlap, sw_batch_size)
            activations = model.activations(batch)
            known &= activations is not None
            need = inference_bytes(
                case.input_shape, in_channels, case.network_shape, num_outputs, model.roi, batch, activations
            )
            worst = need if worst is None or need.segmenting > worst.segmenting else worst
        per_case.append(worst)
    image = [in_channels * math.prod(case.network_shape) * 4 for case in cases]
    cached = int(len(cases) * cache_rate)
    cache = sum(image[:cached])
    largest = max(range(len(cases)), key=lambda i: per_case[i].segmenting)
    segmenting = per_case[largest].segmenting
    preprocessing = max(need.preprocessing for need in per_case[cached:]) if cached < len(cases) else 0
    weights = sum(model.weight_bytes for model in models)
    main = BASELINE_BYTES + weights + cache
    caching = min(max(num_workers, 1), cached) * max((need.preprocessing for need in per_case[:cached]), default=0)
    if num_workers == 0:
        return TreeMemory(main + max(segmenting, preprocessing, caching), 0, cases[largest].name, known)
    uncached = len(cases) - cached
    # While the main process segments a case, the workers preprocess the next ones (none after the last).
    busy = min(num_workers, uncached - (1 if cached == 0 else 0))
    waiting = min(2 * num_workers, len(cases) - 1) * max(image)
    during = segmenting + waiting, busy * preprocessing
    before = 0, min(num_workers, uncached) * preprocessing  # the first case being preprocessed
    main_part, worker_part = max((during, before, (caching, 0)), key=sum)
    return TreeMemory(main + main_part, num_workers * WORKER_BYTES + worker_part, cases[largest].name, known)


def activation_bytes(
    build: Callable[[], nn.Module],
    in_channels: int,
    roi: Sequence[int],
    batch: int,
    device_type: str = "cpu",
    autocast: torch.autocast | None = None,
) -> int:
    """The memory of the network ``build`` makes (its deploy form, in evaluation mode) for a batch of ``batch``
    windows of ``roi`` on a ``device_type`` device, under ``autocast`` (``--amp``: activations in half the
    bytes), without computing it: the network runs on fake tensors (PyTorch's ``FakeTensorMode``: shapes and
    types, no data), and every tensor it allocates is counted while it lives; the peak of the live bytes,
    times :data:`ACTIVATION_FACTOR` plus :data:`ACTIVATION_EXTRA` for the workspaces no tensor shows. Raises
    what the network raises on fake tensors (such as ``.item()``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake = FakeTensorMode(allow_non_fake_inputs=True)  # real weights are faked as they are used
    try:
        with fake, torch.device(device_type):
            network = build()
    except Exception:  # a constructor that needs real values (SwinUNETR and nnFormer read their drop rates)
        network = build()
    with fake:
        windows = torch.zeros((batch, in_channels, *roi), device=device_type)
    with torch.no_grad(), fake, autocast or contextlib.nullcontext(), _LiveBytes() as live:
        network(windows)
    return int(live.peak * ACTIVATION_FACTOR) + ACTIVATION_EXTRA


class _LiveBytes(TorchDispatchMode):
    """The bytes of the tensors an operation allocates (not its views or in-place results), counted from
    their creation until they are freed; ``peak``: the most at once."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if not any(returned.alias_info is not None for returned in func._schema.returns):
            for tensor in tree_flatten(result)[0]:
                if isinstance(tensor, torch.Tensor):
                    size = tensor.untyped_storage().nbytes()
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(tensor, self._freed, size)
        return result

    def _freed(self, size: int) -> None:
        self.live -= size


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


def resident_bytes(pid: int | None = None) -> int | None:
    """The resident memory now (VmRSS) of this process, or of process ``pid``."""
    return _proc_bytes(f"/proc/{pid or 'self'}/status", "VmRSS")


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


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process under it (its data-loading workers, theirs...), from /proc; empty where
    the process has ended."""
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            pending += [int(child) for child in (_read(str(children)) or "").split()]
    return [p for p in tree if Path(f"/proc/{p}").exists()]


def tree_pss_bytes(pid: int) -> int | None:
    """The memory of ``pid`` and its descendants as the machine bears it: their proportional set sizes
    (PSS) summed, each page shared between them (a forked worker's, shared memory) counted once. The largest
    single process's resident size (GNU time's maximum RSS) misses the workers; resident sizes summed count
    shared pages several times. None where /proc has no ``smaps_rollup`` (not Linux)."""
    sizes = [_proc_bytes(f"/proc/{p}/smaps_rollup", "Pss") for p in process_tree(pid)]
    known = [size for size in sizes if size is not None]
    return sum(known) if known else None


class TreePeak:
    """The peak of :func:`tree_pss_bytes` of process ``pid`` while it runs, sampled on a thread of this
    process: the tree every ``interval`` seconds, and the process's own resident size every ``fast_interval``
    in between (a network's activations come and go within one forward pass, faster than the tree can be
    read, for /proc walks every page of every process; they are the process's own pages, so the tree at any
    moment is its last reading plus what the process gained since). Start it with :meth:`start`;
    :meth:`stop` waits for the process's end and returns the peak in bytes (0 where /proc cannot tell)."""

    def __init__(self, pid: int, interval: float = 0.05, fast_interval: float = 0.002) -> None:
        self.pid, self.interval, self.fast_interval = pid, interval, fast_interval
        self.peak = self.processes = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> TreePeak:
        self._thread.start()
        return self

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self.peak

    def _sample(self) -> None:
        tree = main = 0
        last = None
        while not self._done.is_set() and Path(f"/proc/{self.pid}").exists():
            if last is None or time.monotonic() - last >= self.interval:
                size, resident = tree_pss_bytes(self.pid), resident_bytes(self.pid)
                if size is None or resident is None:
                    return
                tree, main, last = size, resident, time.monotonic()
                self.processes = max(self.processes, len(process_tree(self.pid)))
            resident = resident_bytes(self.pid)
            if resident is not None:
                self.peak = max(self.peak, tree + resident - main)
            time.sleep(self.fast_interval)


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
