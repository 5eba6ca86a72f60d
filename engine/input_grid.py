"""Probabilities on the network's grid brought to the input image's voxels a slab at a time.

The test chain (``dataset.transforms.build_transforms(..., "test")``) reorients to RAS, resamples
(trilinear, border padding, ``align_corners=False``) and crops to the foreground; MONAI's ``Invertd``
undoes it on the whole probability volume at once, in float64. Here the same mapping is one affine map
from an input voxel to a point of the resampled grid, sampled trilinearly (the border clamped, as
``padding_mode="border"``) from the part of the grid a slab of input voxels needs: memory holds one slab
of every output, whatever the volume. Outside the crop the outputs are certain background (the label
manager's ``outside_probabilities``): for classes every class 0 and background 1, so the background keeps
the mass the crop removed (as the whole-volume way restores it after ``Invertd``: the background gains
what the classes' resampled probabilities lack of 1); for regions every region 0.

An exported MONAI bundle carries this module as it is (``scripts/``): it imports PyTorch, NumPy, MONAI and
``stitching.py`` beside it only; the label manager (``dataset/labels.py``, the bundle's ``scripts/labels.py``)
is handed in.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor

# Relative: an exported bundle carries this module and stitching.py side by side, as scripts/.
from .stitching import ProbabilityVolume, stitching_device

__all__ = ["InputGrid", "SLAB_BYTES", "SlabInferer", "labels_on_input_grid"]

#: The float32 size of one slab of every class on the input grid (it sets the slab thickness).
SLAB_BYTES = 64 * 2**20

#: The transforms of the test chain this mapping inverts (MONAI's names for them in applied_operations).
INVERTED = {"Orientation", "SpatialResample", "CropForeground"}


@dataclass(frozen=True)
class InputGrid:
    """How an input image's voxels lie on the network's grid.

    Args:
        shape: the input's spatial shape (its file's voxel order).
        to_resampled: 4x4 map from an input voxel index to a (fractional) index of the resampled grid.
        resampled_shape: the resampled grid's shape, before the foreground crop.
        crop_start: the resampled index of the network grid's first voxel.
    """

    shape: tuple[int, int, int]
    to_resampled: np.ndarray
    resampled_shape: tuple[int, int, int]
    crop_start: tuple[int, int, int]

    @classmethod
    def of(cls, image) -> InputGrid:
        """The grid of a preprocessed ``image`` (a MetaTensor of the test chain, channels first, or batched
        with one case), from its affine, the file's and the transforms it records."""
        operations = image.applied_operations
        if operations and isinstance(operations[0], list):  # collated: one case's list
            (operations,) = operations
        unknown = sorted({op["class"] for op in operations} - INVERTED)
        if unknown:
            raise ValueError(f"cannot bring predictions back through {', '.join(unknown)}")
        resampling = [op.get("extra_info", {}) for op in operations if op["class"] == "SpatialResample"]
        settings = {(info.get("mode"), info.get("padding_mode"), info.get("align_corners")) for info in resampling}
        if settings - {("bilinear", "border", False)}:
            raise ValueError(f"cannot bring predictions back through resampling with {sorted(settings)}")
        network_shape = tuple(int(s) for s in image.shape[-3:])
        crop_start, resampled_shape = (0, 0, 0), network_shape
        crops = [op for op in operations if op["class"] == "CropForeground"]
        if crops:
            cropped, padded = crops[-1]["extra_info"]["cropped"], crops[-1]["extra_info"]["pad_info"]["extra_info"]
            crop_start = tuple(int(cropped[2 * a]) - int(padded["padded"][a + 1][0]) for a in range(3))
            resampled_shape = tuple(int(s) for s in crops[-1]["orig_size"])
        meta = image.meta
        file_affine = np.asarray(_first(meta["original_affine"]), dtype=np.float64)
        network_affine = np.asarray(_first(image.affine), dtype=np.float64)
        resampled_affine = network_affine @ _translation(-np.asarray(crop_start, dtype=np.float64))
        shape = tuple(int(s) for s in np.asarray(_first(meta["spatial_shape"])).reshape(-1)[:3])
        return cls(shape, np.linalg.solve(resampled_affine, file_affine), resampled_shape, crop_start)

    def thickness(self, num_classes: int) -> int:
        """Input planes (last axis) per slab: about :data:`SLAB_BYTES` of float32 for every class."""
        plane = num_classes * self.shape[0] * self.shape[1] * 4
        return int(max(1, min(self.shape[2], SLAB_BYTES // plane)))

    def slabs(self, probabilities: torch.Tensor, outside: Sequence[float]) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(start, stop, values)``: float32 probabilities (``K, X, Y, stop - start``) of the input's planes
        ``start:stop`` along its last axis, in order, from ``probabilities`` (``K`` and the network grid, any
        float type), on their device; ``outside``: each output's value outside the foreground crop."""
        step = self.thickness(probabilities.shape[0])
        for start in range(0, self.shape[2], step):
            stop = min(start + step, self.shape[2])
            yield start, stop, self._sample(probabilities, start, stop, outside)

    @property
    def voxel_for_voxel(self) -> tuple[tuple[int, int, int], ...] | None:
        """Where each input voxel is a voxel of the resampled grid (no resampling: a native-spacing model, an
        input already at its spacing), for each input axis ``(resampled axis, step +1 or -1, offset)``;
        None where the grids differ."""
        matrix = np.asarray(self.to_resampled, dtype=np.float64)
        axes = []
        for column in range(3):
            steps = matrix[:3, column]
            axis = int(np.abs(steps).argmax())
            offset = matrix[axis, 3]
            others = np.delete(steps, axis)
            if abs(abs(steps[axis]) - 1) > 1e-9 or np.abs(others).max() > 1e-9 or abs(offset - round(offset)) > 1e-6:
                return None
            axes.append((axis, int(np.sign(steps[axis])), int(round(offset))))
        return tuple(axes) if sorted(axis for axis, _, _ in axes) == [0, 1, 2] else None

    def _sample(self, probabilities: torch.Tensor, start: int, stop: int, outside: Sequence[float]) -> torch.Tensor:
        copied = self.voxel_for_voxel
        if copied is not None:
            return self._copy(probabilities, start, stop, outside, copied)
        device, float64 = probabilities.device, torch.float64
        matrix = torch.as_tensor(self.to_resampled, dtype=float64, device=device)
        upper = torch.tensor(self.resampled_shape, dtype=float64, device=device) - 1
        # The slab's extreme points are among its corners (an affine map), clamped as the border pads.
        corners = torch.tensor(
            [[x, y, z, 1] for x in (0, self.shape[0] - 1) for y in (0, self.shape[1] - 1) for z in (start, stop - 1)],
            dtype=float64,
            device=device,
        )
        reached = torch.minimum((corners @ matrix.T)[:, :3].clamp_min(0), upper)
        low = reached.amin(0).floor().long()
        high = torch.minimum(reached.amax(0).floor().long() + 2, upper.long() + 1)
        block = self._block(probabilities, low.tolist(), high.tolist(), outside)
        # grid_sample's align_corners=True: -1 and 1 are the centres of the block's first and last voxels;
        # an axis of one voxel has every point at 0. Its grid lists (z, y, x) for a volume of (x, y, z).
        extent = (high - low - 1).to(float64)
        scale = torch.where(extent > 0, 2 / extent.clamp_min(1), 0)
        shift = torch.where(extent > 0, -1.0, 0.0).to(float64)
        rows = (matrix[:3] * scale[:, None]).flip(0)  # input index -> normalised (z, y, x)
        offset = rows[:, 3] - (low.to(float64) * scale).flip(0) + shift.flip(0)
        x = torch.arange(self.shape[0], dtype=float64, device=device)[:, None, None, None] * rows[:, 0]
        y = torch.arange(self.shape[1], dtype=float64, device=device)[None, :, None, None] * rows[:, 1]
        z = torch.arange(start, stop, dtype=float64, device=device)[None, None, :, None] * rows[:, 2]
        lowest = (0 - low.to(float64)) * scale + shift
        highest = (upper - low.to(float64)) * scale + shift
        grid = torch.clamp(x + y + z + offset, min=lowest.flip(0), max=highest.flip(0)).to(torch.float32)
        sampled = F.grid_sample(block[None], grid[None], mode="bilinear", padding_mode="border", align_corners=True)
        return sampled[0]

    def _copy(
        self,
        probabilities: torch.Tensor,
        start: int,
        stop: int,
        outside: Sequence[float],
        axes: tuple[tuple[int, int, int], ...],
    ) -> torch.Tensor:
        """The slab's voxels copied from the voxels they are on (:attr:`voxel_for_voxel`), the border clamped as
        the sampling's: exactly the held values, where trilinear sampling in float32 would move them by a few
        1e-7 (and a region's 0.5 above its threshold)."""
        device = probabilities.device
        ranges = [range(self.shape[0]), range(self.shape[1]), range(start, stop)]
        indices = [None, None, None]
        for (axis, step, offset), along in zip(axes, ranges, strict=True):
            positions = torch.arange(along.start, along.stop, device=device) * step + offset
            indices[axis] = positions.clamp(0, self.resampled_shape[axis] - 1)
        low = [int(index.min()) for index in indices]
        high = [int(index.max()) + 1 for index in indices]
        block = self._block(probabilities, low, high, outside)
        order = [axis for axis, _, _ in axes]
        gathered = [(indices[axis] - low[axis]) for axis in order]
        block = block.permute(0, *(1 + axis for axis in order))
        return block[:, gathered[0][:, None, None], gathered[1][None, :, None], gathered[2][None, None, :]]

    def _block(
        self, probabilities: torch.Tensor, low: list[int], high: list[int], outside: Sequence[float]
    ) -> torch.Tensor:
        """The resampled grid's voxels ``low:high`` of every output in float32: the network grid's where the
        crop kept them, else ``outside`` (certain background)."""
        shape = [h - lo for lo, h in zip(low, high, strict=True)]
        fill = torch.tensor(list(outside), dtype=torch.float32, device=probabilities.device)
        block = fill.reshape(-1, 1, 1, 1).expand(-1, *shape).clone()
        source, target = [], []
        for axis in range(3):
            first = max(low[axis], self.crop_start[axis])
            last = min(high[axis], self.crop_start[axis] + probabilities.shape[axis + 1])
            if last <= first:
                return block
            source.append(slice(first - self.crop_start[axis], last - self.crop_start[axis]))
            target.append(slice(first - low[axis], last - low[axis]))
        block[(slice(None), *target)] = probabilities[(slice(None), *source)]
        return block


def _first(value):
    """One case's entry of a metadata value (a batch holds one per case)."""
    value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    return value[0] if value.ndim == 3 or (value.ndim == 2 and value.shape[0] == 1) else value


def _translation(offset: np.ndarray) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = offset
    return matrix


def labels_on_input_grid(
    probabilities: ProbabilityVolume | torch.Tensor,
    grid: InputGrid,
    label_manager,
    file=None,
) -> np.ndarray:
    """The uint8 label map (``label_manager.label_map``: the argmax of classes, or regions painted in order)
    of ``probabilities`` (network grid) brought to the input's voxels a slab at a time (:class:`InputGrid`);
    each slab's probabilities also go to ``file.write`` (float16 ``K, X, Y, dz``) when given."""
    labels = np.empty(grid.shape, dtype=np.uint8)
    for start, stop, values in grid.slabs(probabilities, label_manager.outside_probabilities()):
        labels[..., start:stop] = label_manager.label_map(values).cpu().numpy()
        if file is not None:
            file.write(values.half().cpu().numpy())
    return labels


class SlabInferer:
    """The MONAI bundle's inferer, test_seg.py's path for one model and one pass: the windows stitched a slab
    at a time into a :class:`ProbabilityVolume`, its labels brought to the input's voxels slab by slab
    (:func:`labels_on_input_grid`), returned as a uint8 MetaTensor ``1, X, Y, Z`` with the input file's
    affine, for ``SaveImaged``.

    Args:
        roi_size: the sliding-window size.
        label_manager: what the network's outputs mean (the bundle's ``scripts.labels.LabelManager``).
        sw_batch_size: windows run at a time.
        overlap: the windows' overlap, as test_seg.py's ``--overlap``.
    """

    def __init__(self, roi_size: Sequence[int], label_manager, sw_batch_size: int = 4, overlap: float = 0.5) -> None:
        self.roi_size, self.label_manager = tuple(roi_size), label_manager
        self.sw_batch_size, self.overlap = sw_batch_size, overlap

    def __call__(self, image: MetaTensor, network) -> MetaTensor:
        """The labels of one preprocessed case (channels first, on the device the network runs on)."""
        device, outputs = image.device, self.label_manager.num_outputs
        holder = stitching_device(image.shape[1:], outputs, device)
        probabilities = ProbabilityVolume(outputs, image.shape[1:], holder)
        plain = torch.autocast(device.type, enabled=False)
        probabilities.add_pass(
            image[None],
            network,
            self.roi_size,
            self.sw_batch_size,
            self.overlap,
            plain,
            device,
            finish=self.label_manager.finish,
        )
        labels = torch.from_numpy(labels_on_input_grid(probabilities, InputGrid.of(image), self.label_manager))
        affine = torch.as_tensor(np.asarray(image.meta["original_affine"]), dtype=torch.float64)
        meta = {key: value for key, value in image.meta.items() if key != "affine"}  # the file's, for SaveImaged
        return MetaTensor(labels[None], affine=affine, meta=meta)
