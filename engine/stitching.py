"""Sliding-window inference that holds slabs, not volumes: windows are run row by row along the last
spatial axis, and each slab of that axis is handed on (softmax, label map) as soon as no later window
touches it. The windows and their mean are MONAI's ``sliding_window_inference`` (constant weights);
what it keeps at full size in float32, logits and count map, here never exceeds one row of windows.

An exported MONAI bundle carries this module as it is (``scripts/``): it imports PyTorch and NumPy only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ProbabilityVolume", "Slab", "WindowPlan", "softmax_of_classes", "stitched_slabs", "stitching_device"]


@dataclass(frozen=True)
class WindowPlan:
    """Where the windows of a ``roi`` lie in a volume of ``spatial_shape`` at ``overlap``: MONAI's rule
    (the volume padded to the ROI where smaller, half before; windows every ``int(roi * (1 - overlap))``
    voxels, the last one flush with the end)."""

    spatial_shape: tuple[int, int, int]
    roi: tuple[int, int, int]
    overlap: float

    @property
    def padding(self) -> tuple[tuple[int, int], ...]:
        """Voxels added before and after each axis, where the volume is smaller than the ROI."""
        return tuple(((r - s) // 2, r - s - (r - s) // 2) if r > s else (0, 0) for s, r in self._sizes())

    @property
    def padded_shape(self) -> tuple[int, ...]:
        return tuple(max(s, r) for s, r in self._sizes())

    def _sizes(self):
        return zip(self.spatial_shape, self.roi, strict=True)

    def starts(self, axis: int) -> list[int]:
        """The window starts along ``axis`` (in the padded volume), ascending."""
        size, roi = self.padded_shape[axis], self.roi[axis]
        interval = roi if roi == size else max(int(roi * (1 - self.overlap)), 1)
        count = next((d + 1 for d in range(math.ceil(size / interval)) if d * interval + roi >= size), 1)
        return [min(d * interval, size - roi) for d in range(count)]


@dataclass(frozen=True)
class Slab:
    """Voxels ``start:stop`` of the last spatial axis, finished: ``values`` (``K, X, Y, stop - start``)."""

    start: int
    stop: int
    values: torch.Tensor


def softmax_of_classes(logits: torch.Tensor) -> torch.Tensor:
    """The class probabilities of logits ``K, ...`` (channels first): what a pass adds unless told otherwise."""
    return torch.softmax(logits, dim=0)


def stitched_slabs(
    image: torch.Tensor,
    network: Callable[[torch.Tensor], torch.Tensor],
    roi: Sequence[int],
    sw_batch_size: int,
    overlap: float,
    autocast: torch.autocast,
    device: torch.device,
    finish: Callable[[torch.Tensor], torch.Tensor] = softmax_of_classes,
) -> Iterator[Slab]:
    """The mean logits of the windows over ``image`` (``1, C, X, Y, Z``), ``finish``-ed (default: softmax
    over the classes) slab by slab along Z, in order, on ``device``; padding to the ROI removed.

    Windows run ``sw_batch_size`` at a time on ``device`` under ``autocast``; their logits are summed in
    float32, as MONAI sums them, in a buffer one window deep along Z.
    """
    roi = tuple(int(r) for r in roi)
    plan = WindowPlan(tuple(image.shape[2:]), roi, overlap)
    pads = [amount for pair in reversed(plan.padding) for amount in pair]
    padded = F.pad(image, pads) if any(pads) else image
    (x0, _), (y0, _), (z0, _) = plan.padding
    width, height, depth = plan.spatial_shape
    xy_windows = [(x, y) for x in plan.starts(0) for y in plan.starts(1)]
    total = count = None
    base = 0  # the padded Z of the buffer's first plane
    for z in plan.starts(2):
        if total is not None and z > base:  # planes base:z are finished: no later window starts before z
            yield _finished(total, count, base, z, (x0, y0, z0), (width, height, depth), finish)
            kept = roi[2] - (z - base)  # planes z:base + roi shared with this row's windows, moved to the front
            for buffer in (total, count):
                buffer[..., :kept] = buffer[..., z - base :].clone()
                buffer[..., kept:] = 0
        base = z
        for first in range(0, len(xy_windows), sw_batch_size):
            corners = xy_windows[first : first + sw_batch_size]
            windows = torch.cat([padded[:, :, x : x + roi[0], y : y + roi[1], z : z + roi[2]] for x, y in corners])
            with autocast:
                logits = network(windows.to(device))
            if total is None:
                total = torch.zeros((logits.shape[1], *plan.padded_shape[:2], roi[2]), device=device)
                count = torch.zeros((*plan.padded_shape[:2], roi[2]), device=device)
            for (x, y), window in zip(corners, logits.float(), strict=True):
                total[:, x : x + roi[0], y : y + roi[1]] += window
                count[x : x + roi[0], y : y + roi[1]] += 1
    yield _finished(total, count, base, base + roi[2], (x0, y0, z0), (width, height, depth), finish)


def _finished(total, count, base, stop, offset, shape, finish) -> Slab:
    """Planes ``base:stop`` (padded Z) of the buffer, the padding cut away, as a :class:`Slab` in the
    volume's own Z."""
    (x0, y0, z0), (width, height, depth) = offset, shape
    first = max(base, z0)
    last = max(min(stop, z0 + depth), first)
    planes = slice(first - base, last - base)
    mean = total[:, x0 : x0 + width, y0 : y0 + height, planes] / count[x0 : x0 + width, y0 : y0 + height, planes]
    return Slab(first - z0, last - z0, finish(mean))


class ProbabilityVolume:
    """Probabilities ``K, X, Y, Z`` (of classes or regions) held in 2 bytes per output and voxel: fixed point
    in steps of 1/65534 (int16 codes ``c``, the probability ``(c + 32767) / 65534``). The size of float16 (half
    of float32's), and finer than float16 where labels are decided: float16 rounds 0.4 by up to 1.2e-4, these
    codes any value by 7.6e-6. 65534 steps rather than 65535, so that 0.5 has a code of its own (32767 /
    65534): the float32 read from a code is above 0.5 exactly where the code is above 0.5's, so a region's
    ``> 0.5`` (nnU-Net's threshold) on what is read is the same comparison on the codes.

    Passes are added as a running weighted mean (each plane of the last axis counts the weight it has
    received): a pass equal to the mean leaves it as it is, so a probability of exactly 0.5 from every pass
    stays exactly 0.5, which the threshold does not paint. Each pass rounds the mean by at most half a step
    (7.6e-6). Indexing reads float32."""

    STEPS = 65534
    OFFSET = 32767

    def __init__(self, num_classes: int, shape: Sequence[int], device: torch.device) -> None:
        self.codes = torch.full((num_classes, *shape), -self.OFFSET, dtype=torch.int16, device=device)
        self.received = torch.zeros(shape[-1], dtype=torch.float64, device=device)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def __getitem__(self, index) -> torch.Tensor:
        return (self.codes[index].float() + self.OFFSET) / self.STEPS

    def float(self) -> torch.Tensor:
        return self[...]

    def add(self, start: int, stop: int, values: torch.Tensor, weight: float) -> None:
        """Add ``values`` (``K, X, Y, stop - start``) of ``weight`` to the weighted mean of planes
        ``start:stop`` of the last axis."""
        received = self.received[start:stop]
        share = (weight / (received + weight)).float()  # 1 for a plane's first pass: the mean is that pass
        region = self[..., start:stop].lerp_(values.to(self.device, torch.float32), share)
        self.codes[..., start:stop] = (region.clamp_(0, 1).mul_(self.STEPS).round_() - self.OFFSET).to(torch.int16)
        self.received[start:stop] += weight

    def add_pass(
        self,
        image: torch.Tensor,
        network: Callable[[torch.Tensor], torch.Tensor],
        roi: Sequence[int],
        sw_batch_size: int,
        overlap: float,
        autocast: torch.autocast,
        device: torch.device,
        weight: float = 1.0,
        mirror_axes: Sequence[int] = (),
        channel_order: Sequence[int] | None = None,
        finish: Callable[[torch.Tensor], torch.Tensor] = softmax_of_classes,
    ) -> None:
        """Add the probabilities (``finish`` of the mean logits: a softmax, or a region's sigmoid) of one
        sliding-window pass over ``image`` (``1, C, X, Y, Z``), of ``weight`` in the mean, slab by slab
        (:func:`stitched_slabs`): the image flipped along the spatial ``mirror_axes`` and each
        slab flipped back; with ``channel_order``, the pass's class c added to class ``channel_order[c]``
        (a permutation that is its own inverse, such as the swap of left/right pairs)."""
        depth = image.shape[-1]
        flipped = image.flip([axis + 2 for axis in mirror_axes]) if mirror_axes else image
        order = None if channel_order is None else torch.tensor(list(channel_order), device=device)
        for slab in stitched_slabs(flipped, network, roi, sw_batch_size, overlap, autocast, device, finish):
            values = slab.values.flip([axis + 1 for axis in mirror_axes]) if mirror_axes else slab.values
            if order is not None:
                values = values[order]
            start, stop = (depth - slab.stop, depth - slab.start) if 2 in mirror_axes else (slab.start, slab.stop)
            self.add(start, stop, values, weight)


def stitching_device(
    spatial_shape: Sequence[int], num_classes: int, device: torch.device, free_bytes: int | None = None
) -> torch.device:
    """Where inference holds a case's class probabilities (2 bytes per class and voxel,
    :class:`ProbabilityVolume`): the device, or the CPU when they would take more than half of
    the device's free memory."""
    if device.type != "cuda":
        return device
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    needed = 2 * num_classes * int(np.prod(spatial_shape))
    return device if needed <= free_bytes // 2 else torch.device("cpu")
