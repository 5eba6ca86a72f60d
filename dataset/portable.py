"""The image operations that must run identically inside and outside this repository.

Loading a case's channel files, per-channel normalisation, the foreground the crop keeps, the cases of an
image folder and the loop that segments them. This module imports MONAI, PyTorch, NumPy, SciPy and nibabel
only, never this repository: an exported MONAI bundle carries it, file for file, as ``scripts/portable.py``,
so that the bundle preprocesses exactly as training and ``test_seg.py`` do (``dataset/labels.py``,
``engine/stitching.py`` and ``engine/input_grid.py`` go with it, for the same inference).

A channel's normalisation is given as a mapping or an object with ``scheme`` (``ct``, ``ct_zscore``,
``zscore`` or ``none``), ``window`` (``ct`` and ``ct_zscore``: ``[a_min, a_max]``), ``mean`` and ``std``
(``ct_zscore``) and ``nonzero_mask`` (``zscore``: standardise over the non-zero region rather than every
voxel); see ``dataset.description.ChannelNorm``.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import nibabel
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, decollate_batch
from monai.transforms import LoadImage, MapTransform, ScaleIntensityRange
from scipy import ndimage

__all__ = [
    "CONNECTIVITY",
    "DIRECTION_TOLERANCE",
    "AnyChannelForeground",
    "KeepLargestd",
    "LoadCased",
    "NormalizeChannelsd",
    "case_images",
    "axis_aligned",
    "case_output_name",
    "checked_cases",
    "holds_channels",
    "keep_largest",
    "named_apart",
    "nonzero_region",
    "saved_name",
    "segment_all",
]


class Norm(NamedTuple):
    """One channel's normalisation (see the module docstring)."""

    scheme: str
    window: tuple[float, float] | None = None
    nonzero_mask: bool | None = None
    mean: float | None = None
    std: float | None = None


def _norm(entry: Any) -> Norm:
    if isinstance(entry, Mapping):
        window = entry.get("window")
        window = None if window is None else tuple(window)
        return Norm(entry["scheme"], window, entry.get("nonzero_mask"), entry.get("mean"), entry.get("std"))
    return Norm(entry.scheme, entry.window, entry.nonzero_mask, entry.mean, entry.std)


#: Where a CT (HU) is the body, for the foreground crop of ``ct_zscore``: air is -1000, fat about -100, and the
#: lungs (-900..-500) lie inside the body's box; independent of the window, which may start inside the organs.
BODY_HU = -500.0
#: nnU-Net's floor of a standard deviation it divides by.
STD_FLOOR = 1e-8


class NormalizeChannelsd(MapTransform):
    """Normalise each channel of the images under ``keys`` by its own scheme: ``ct`` clips to the window
    and scales it to [0, 1], ``ct_zscore`` clips to the window then subtracts ``mean`` and divides by ``std``
    (nnU-Net's ``CTNormalization``: the dataset's foreground statistics, the same for every case),
    ``zscore`` standardises the channel over every voxel or, with
    ``nonzero_mask``, over the region where any channel is non-zero, holes filled (nnU-Net's
    ``create_nonzero_mask``; the voxels outside stay 0), ``none`` leaves it."""

    def __init__(self, keys: KeysCollection, normalization: Sequence[Any]) -> None:
        super().__init__(keys)
        self.normalization = tuple(_norm(entry) for entry in normalization)
        if any(norm.scheme in ("ct", "ct_zscore") and norm.window is None for norm in self.normalization):
            raise ValueError("a ct or ct_zscore channel needs its window (derive it from the dataset first)")
        if any(norm.scheme == "ct_zscore" and None in (norm.mean, norm.std) for norm in self.normalization):
            raise ValueError("a ct_zscore channel needs its mean and std (derive them from the dataset first)")
        if any(norm.scheme == "zscore" and norm.nonzero_mask is None for norm in self.normalization):
            raise ValueError("a zscore channel needs its nonzero_mask (derive it from the dataset first)")
        self.transforms = [
            ScaleIntensityRange(*norm.window, b_min=0.0, b_max=1.0, clip=True) if norm.scheme == "ct" else None
            for norm in self.normalization
        ]

    def __call__(self, data: Mapping) -> dict:
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
                elif norm.scheme == "ct_zscore":
                    channel = (channel.float().clamp(*norm.window) - norm.mean) / max(norm.std, STD_FLOOR)
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
    mean, std = values.mean(), values.std(unbiased=False).clamp_min(STD_FLOOR)
    if region is None:
        return (channel - mean) / std
    result = channel.clone()
    result[0][region] = (values - mean) / std
    return result


class AnyChannelForeground:
    """``select_fn`` of the foreground crop, on raw intensities: a voxel is foreground where any channel
    shows it, above the window's low end for a ``ct`` channel (the published crop of the windowed image),
    above :data:`BODY_HU` for a ``ct_zscore`` one (the body, where nnU-Net keeps a CT whole: its crop to
    the non-zero region), non-zero for the others (MRI background)."""

    def __init__(self, normalization: Sequence[Any]) -> None:
        self.normalization = tuple(_norm(entry) for entry in normalization)

    def __repr__(self) -> str:
        return f"AnyChannelForeground({list(self.normalization)})"

    def __call__(self, image) -> torch.Tensor:
        channels = torch.as_tensor(image)
        return torch.stack([_shows(channel, norm) for channel, norm in zip(channels, self.normalization, strict=True)])


def _shows(channel: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Where one channel shows the foreground (see :class:`AnyChannelForeground`)."""
    if norm.scheme == "ct":
        return channel > norm.window[0]
    if norm.scheme == "ct_zscore":
        return channel > BODY_HU
    return channel != 0


#: Direction cosines within this of an axis are that axis (:func:`axis_aligned`): about 0.006 degrees, a
#: shift of 0.05 mm across a 500 mm scan. Float noise is far below (NIfTI's float32 quaternion alone gives
#: about 1e-7); a scan tilted on purpose (an oblique MRI) is far above.
DIRECTION_TOLERANCE = 1e-4


def axis_aligned(affine: np.ndarray) -> np.ndarray:
    """``affine`` (4x4, voxel to world) with each voxel axis's direction cosines set to exactly those of the
    world axis it is within :data:`DIRECTION_TOLERANCE` of, its spacing and the origin kept; unchanged where
    an axis is further from every world axis (an oblique image). Without it, noise of 1e-6 in a file's
    directions sends MONAI's resampling down its oblique path, whose grid moves by a third of a millimetre."""
    affine = np.array(affine, dtype=np.float64)
    linear = affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if not (spacing > 0).all():
        return affine
    directions = linear / spacing
    aligned = np.zeros_like(directions)
    for column in range(3):
        axis = int(np.abs(directions[:, column]).argmax())
        aligned[axis, column] = np.sign(directions[axis, column])
    if sorted(np.abs(aligned).argmax(axis=0)) != [0, 1, 2] or np.abs(directions - aligned).max() > DIRECTION_TOLERANCE:
        return affine
    affine[:3, :3] = aligned * spacing
    return affine


class LoadCased(MapTransform):
    """Load the files under ``keys``, channels first: a path, or a list of one 3D file per channel stacked
    on the geometry of channel 0 (files whose affines differ by float noise are one image, where MONAI's
    ``LoadImaged`` refuses them; a real difference, beyond 1e-4, raises ValueError naming both files).
    Direction cosines within :data:`DIRECTION_TOLERANCE` of the axes are made exactly the axes'
    (:func:`axis_aligned`), in the image's affine and the file's one it records (``original_affine``, which
    the inversion to the input's voxels reads): training, ``test_seg.py`` and the bundle load through here.

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
                data[key] = _aligned(self._load(paths))
                continue
            channels = [self._load(path) for path in paths]
            for path, channel in zip(paths[1:], channels[1:], strict=True):
                affine, reference = np.asarray(channel.affine), np.asarray(channels[0].affine)
                if channel.shape[1:] != channels[0].shape[1:] or not np.allclose(affine, reference, atol=1e-4):
                    raise ValueError(f"{path}: another geometry than {paths[0]} (shape or affine)")
            data[key] = _aligned(MetaTensor(torch.cat([c.as_tensor() for c in channels]), meta=channels[0].meta))
        return data


def _aligned(image: MetaTensor) -> MetaTensor:
    """``image`` with :func:`axis_aligned` applied to its affine and the file's affine it records."""
    aligned = axis_aligned(np.asarray(image.affine))
    if not np.array_equal(aligned, np.asarray(image.affine, dtype=np.float64)):
        image.affine = torch.as_tensor(aligned, dtype=torch.float64)
        image.meta["original_affine"] = axis_aligned(np.asarray(image.meta["original_affine"]))
    return image


#: A file of one channel of a case, nnU-Net's naming: ``<case>_0000.nii.gz`` is channel 0.
CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})\.nii(\.gz)?$")


def case_images(folder: str | Path, in_channels: int) -> list[dict]:
    """The cases of an image folder, as ``{"image": ...}`` items for :class:`LoadCased`: each NIfTI file
    one case (3D, or 4D with ``in_channels`` channels, whatever its name); with several input channels,
    files named ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ... are one case, a file per channel in
    channel order (:func:`holds_channels` says which files are channels).

    Raises ValueError for a folder without NIfTI files, a case whose channel files are not ``_0000`` to
    ``_{in_channels - 1}``, or two cases whose outputs would take one name (:func:`named_apart`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith((".nii", ".nii.gz")))
    if not files:
        raise ValueError(f"{folder}: no .nii or .nii.gz images")
    if in_channels == 1:
        return named_apart([{"image": str(path)} for path in files])
    cases: dict[str, list[Path] | Path] = {}
    for path in files:
        match = CHANNEL_FILE.match(path.name)
        if match is None or holds_channels(path):
            cases[path.name] = path
        else:
            cases.setdefault(match["case"], []).append(path)
    items = []
    for case, paths in cases.items():
        if isinstance(paths, Path):
            items.append({"image": str(paths)})
            continue
        found = [CHANNEL_FILE.match(path.name)["channel"] for path in paths]
        expected = [f"{c:04d}" for c in range(in_channels)]
        if found != expected:
            names = (f"{case}_{c}{paths[0].name[len(case) + 5 :]}" for c in expected)
            apart = [cases[name] for name in names if isinstance(cases.get(name), Path)]
            raise ValueError(
                f"{folder}: case {case} has channel files {', '.join(found)}; expected {', '.join(expected)}"
                + "".join(f" ({path.name} holds several channels: a case of its own)" for path in apart[:1])
            )
        items.append({"image": [str(path) for path in paths]})
    return named_apart(items)


def checked_cases(folder: str | Path, in_channels: int) -> list[dict]:
    """The bundle's cases (:func:`case_images`), each file's header checked before any is segmented: a
    readable NIfTI file, a case of ``in_channels`` channels, channel files of one channel and one shape.
    A problem ends the run with one ``error:`` line naming the file (as ``test_seg.py`` reports it), not a
    traceback through MONAI's config parser."""
    try:
        cases = case_images(folder, in_channels)
        for case in cases:
            _check_headers(case["image"], in_channels)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    return cases


def _check_headers(image: str | list[str], in_channels: int) -> None:
    """A case's files as their headers describe them: ValueError naming the file that does not fit."""
    paths = [image] if isinstance(image, str) else image
    shapes = []
    for path in paths:
        try:
            shapes.append(tuple(nibabel.load(path).shape))
        except Exception as error:  # nibabel raises several types for empty, truncated or foreign files
            raise ValueError(f"{path}: cannot read as NIfTI ({error})") from None
        if len(shapes[-1]) not in (3, 4):
            raise ValueError(f"{path}: not a 3D volume or a 4D one with the channels last (shape {shapes[-1]})")
    channels = sum(1 if len(shape) == 3 else shape[3] for shape in shapes)
    for path, shape in zip(paths[1:], shapes[1:], strict=True):
        if shape[:3] != shapes[0][:3] or (len(shape) == 4 and shape[3] != 1):
            raise ValueError(f"{path}: channel file of shape {list(shape)}, expected {list(shapes[0][:3])}")
    if channels != in_channels:
        raise ValueError(
            f"{paths[0]}: {channels} channel{'s' * (channels != 1)}, but the model takes {in_channels} (a 4D file "
            "with the channels last, or <case>_0000.nii.gz, <case>_0001.nii.gz, ... one file per channel)"
        )


def holds_channels(path: str | os.PathLike) -> bool:
    """Whether a NIfTI file holds several channels (4D, more than one volume along the fourth axis): a case
    of its own, whatever its name. Any other file named ``<case>_NNNN`` is channel NNNN of ``<case>``, a 4D
    file of one volume (``X, Y, Z, 1``) included: ``test_seg.py`` (``dataset.cases``) and the bundle read
    folders by this one rule. An unreadable file holds none (its loading says what is wrong)."""
    try:
        shape = nibabel.load(path).shape
    except Exception:  # nibabel raises several types for truncated or foreign files
        return False
    return len(shape) == 4 and shape[3] > 1


def named_apart(items: list[dict]) -> list[dict]:
    """``items`` (cases, ``{"image": path or channel paths, ...}``), refused (ValueError naming both files)
    where two would write one output (:func:`case_output_name`): test_seg.py's check and the bundle's."""
    named: dict[str, str] = {}
    for item in items:
        first = item["image"] if isinstance(item["image"], str) else item["image"][0]
        other = named.setdefault(case_output_name(first), first)
        if other != first:
            raise ValueError(f"{other} and {first} would both be written as {case_output_name(first)}_seg.nii.gz")
    return items


def case_output_name(image: str | os.PathLike | Sequence[str | os.PathLike]) -> str:
    """The name a case's outputs take (``<name>_seg.nii.gz``), in ``test_seg.py`` and the bundle alike: its
    image file's (of a list of channel files, the first one's) less ``.nii.gz`` or ``.nii`` and nnU-Net's
    ``_0000`` channel suffix, as nnU-Net names a case's prediction."""
    path = image if isinstance(image, str | os.PathLike) else image[0]
    name = Path(str(path)).name
    match = CHANNEL_FILE.match(name)
    return match["case"] if match and match["channel"] == "0000" else name.removesuffix(".gz").removesuffix(".nii")


def saved_name(metadata: dict, saver: object = None) -> dict:
    """MONAI ``SaveImage``'s ``output_name_formatter``: :func:`case_output_name` of the case's file."""
    return {"subject": case_output_name(metadata.get("filename_or_obj", "case")), "idx": None}


#: The neighbourhood of keep-largest-component postprocessing: 26-connectivity (faces, edges and corners), the
#: full connectivity nnU-Net's ``remove_all_but_largest_component`` (scikit-image's ``label``) uses.
CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


def keep_largest(labels: np.ndarray, entries: Sequence[int | Sequence[int]]) -> np.ndarray:
    """``labels`` with, for each entry in order, only the largest connected component (:data:`CONNECTIVITY`)
    of its voxels kept and the rest of them background. An entry is a label value, or a group of values kept
    as one (a region, or nnU-Net's foreground as a whole): nnU-Net's
    ``remove_all_but_largest_component_from_segmentation``, which also keeps every component of the largest
    size where several tie. Entries are applied one after another to what the previous ones left."""
    kept = labels.copy()
    for entry in entries:
        inside = np.isin(kept, list(entry)) if isinstance(entry, Sequence) else kept == entry
        components, count = ndimage.label(inside, structure=CONNECTIVITY)
        if count > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            kept[inside & (sizes[components] != sizes.max())] = 0
    return kept


class KeepLargestd(MapTransform):
    """:func:`keep_largest` on the label maps under ``keys`` (channels first, one channel): the bundle's
    keep-largest-component postprocessing, as ``test_seg.py --keep_largest`` and a study's plan apply it."""

    def __init__(self, keys: KeysCollection, entries: Sequence[int | Sequence[int]]) -> None:
        super().__init__(keys)
        self.entries = [entry if isinstance(entry, int) else list(entry) for entry in entries]

    def __call__(self, data: Mapping) -> dict:
        data = dict(data)
        for key in self.key_iterator(data):
            labels = data[key]
            kept = keep_largest(np.asarray(torch.as_tensor(labels).cpu())[0], self.entries)
            data[key] = labels.new_tensor(kept[None]) if isinstance(labels, torch.Tensor) else kept[None]
            if isinstance(labels, MetaTensor):
                data[key] = MetaTensor(data[key], meta=labels.meta)
        return data


def segment_all(dataloader, network, inferer, postprocessing, device: torch.device | str) -> int:
    """The inference loop of an exported bundle: each case's ``image`` (preprocessed, channels first) on
    ``device`` through ``inferer(image, network)`` into ``pred``, then the case's ``postprocessing`` (which
    writes its file). What MONAI's SupervisedEvaluator does, without its pytorch-ignite dependency, one
    case at a time. Returns the number of cases."""
    network.eval()
    count = 0
    batches = iter(dataloader)
    with torch.no_grad():
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return count
            except Exception as error:  # a file its header did not give away (truncated data): one line
                files = _case_files(dataloader, count)
                raise SystemExit(f"error: {files}: cannot be loaded ({_cause(error)})") from None
            for case in decollate_batch(batch):
                case["pred"] = inferer(case["image"].to(device), network)
                postprocessing(case)
                count += 1


def _case_files(dataloader, index: int) -> str:
    """The files of the ``index``-th case of an unshuffled loader of one case per batch."""
    try:
        image = dataloader.dataset.data[index]["image"]
    except (AttributeError, IndexError, KeyError, TypeError):
        return f"case {index + 1}"
    return image if isinstance(image, str) else ", ".join(map(str, image))


def _cause(error: BaseException) -> str:
    """The innermost cause of ``error`` (MONAI wraps a transform's error in its own), as ``Type: message``."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"
