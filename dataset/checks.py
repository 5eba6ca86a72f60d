"""Checking a dataset's files before any work: every file read through once (remembered between runs),
images and labels checked against each other and the dataset; one line per problem, naming the file."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from atomic_files import save_json
from dataset.cases import case_files, case_name, summarise_problems
from dataset.description import DatasetError

__all__ = [
    "CaseSummary",
    "ReadThroughStopped",
    "along_ras",
    "check_cases",
    "file_identity",
    "load_record",
    "read_through",
    "read_through_record",
    "user_cache",
    "verify_cases",
]


class ReadThroughStopped(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) while the files are read through; its message says how far the reading came."""


#: Version of the read-through summaries (entries of older versions are read again).
SUMMARY_VERSION = 3


def file_identity(path: str | os.PathLike) -> tuple[str, list[int]]:
    """A file's absolute path and what changes when it is rewritten: ``[size, modification time in ns]``."""
    stat = os.stat(path)
    return os.path.abspath(path), [stat.st_size, stat.st_mtime_ns]


#: The voxel bytes (as float64) a read-through holds at once: a large file is read a slab of planes at a time.
READ_SLAB_BYTES = 64 * 2**20


def read_through(path: str, kind: str, stop: threading.Event | None = None) -> dict:
    """Read every voxel of a NIfTI file once, a slab of planes at a time (never the whole file in memory);
    a summary of what the checks need, or a DatasetError naming the file (unreadable header, or voxel data
    cut short, as in a truncated ``.nii.gz``). A set ``stop`` ends the reading between two slabs
    (:class:`ReadThroughStopped`).

    The summary holds the ``shape`` and ``affine``; for an image whether every voxel is ``finite`` and
    which of its channels is ``constant`` (all voxels one value, such as an empty channel); for a
    label (``kind`` ``"label"``) its distinct ``values``.
    """
    try:
        image = nib.load(path, keep_file_open=True)
    except Exception as error:  # nibabel raises many types for corrupt files
        raise DatasetError(f"{path}: cannot read as NIfTI ({error})") from None
    shape = tuple(image.shape)
    summary: dict = {"shape": list(shape), "affine": np.asarray(image.affine, dtype=float).tolist()}
    channels = shape[3] if len(shape) == 4 else 1
    values, finite = set(), True
    lowest, highest = [np.inf] * channels, [-np.inf] * channels
    try:
        for channel, slab in _slabs(image, stop):
            if kind == "label":
                values.update(np.unique(slab).tolist())
                continue
            if not np.issubdtype(slab.dtype, np.integer) and not np.isfinite(slab).all():
                finite = False
            if slab.size:
                lowest[channel] = min(lowest[channel], slab.min())
                highest[channel] = max(highest[channel], slab.max())
    except ReadThroughStopped:
        raise
    except MemoryError:  # the machine's, not the file's fault
        raise DatasetError(
            f"{path}: not enough memory to read it through ({READ_SLAB_BYTES // 2**20} MB of voxels at a time); "
            "free memory"
        ) from None
    except Exception as error:  # a truncated or corrupt compressed stream: EOFError, zlib.error, OSError...
        raise DatasetError(f"{path}: cannot read its voxel data ({type(error).__name__}: {error})") from None
    if kind == "label":
        summary["values"] = sorted(values)
    else:
        summary["finite"] = finite
        summary["constant"] = [bool(finite and low == high) for low, high in zip(lowest, highest, strict=True)]
    return summary


def _slabs(image, stop: threading.Event | None) -> Iterator[tuple[int, np.ndarray]]:
    """``(channel, voxels)`` of a NIfTI image a slab of planes (its third axis) at a time, each channel
    of a 4D file in turn: in the order of the file's bytes, so that a compressed file is decompressed once."""
    shape = tuple(image.shape)
    if len(shape) not in (3, 4):
        yield 0, np.asanyarray(image.dataobj)
        return
    plane = max(1, shape[0] * shape[1] * 8)  # float64 once scaled, whatever the stored type
    step = max(1, READ_SLAB_BYTES // plane)
    for channel in range(shape[3] if len(shape) == 4 else 1):
        for start in range(0, shape[2], step):
            if stop is not None and stop.is_set():
                raise ReadThroughStopped("stopped")
            index = (slice(None), slice(None), slice(start, start + step))
            yield channel, np.asanyarray(image.dataobj[index + ((channel,) if len(shape) == 4 else ())])


#: Seconds between two calls of ``keep`` while files are read through: a long first read that is
#: interrupted does not start over.
KEEP_EVERY = 30.0


def _read_all(
    files: dict[str, str], known: dict, workers: int, progress: bool, keep: Callable[[], None] | None = None
) -> dict[str, dict | str]:
    """``read_through`` of every file (path -> kind) that ``known`` does not hold in its current state, on
    ``workers`` threads (decompression releases the GIL); returns path -> summary or error message, and
    records each new summary in ``known``, calling ``keep`` every :data:`KEEP_EVERY` seconds meanwhile (to
    save what ``known`` holds so far)."""
    results: dict[str, dict | str] = {}
    pending = {}
    for path, kind in files.items():
        absolute, identity = file_identity(path)
        entry = known.get(absolute)
        if (
            entry is not None
            and entry.get("identity") == identity
            and entry.get("kind") == kind
            and entry.get("version") == SUMMARY_VERSION
        ):
            results[path] = entry["summary"]
        else:
            pending[path] = (kind, absolute, identity)
    if not pending:
        return results
    kept, stop = time.monotonic(), threading.Event()
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        futures = {pool.submit(read_through, path, kind, stop): path for path, (kind, _, _) in pending.items()}
        for future in tqdm(as_completed(futures), total=len(futures), desc="Reading cases", disable=not progress):
            if keep is not None and time.monotonic() - kept >= KEEP_EVERY:
                keep()
                kept = time.monotonic()
            path = futures[future]
            try:
                results[path] = future.result()
            except DatasetError as error:
                results[path] = str(error)
                continue
            kind, absolute, identity = pending[path]
            known[absolute] = {"kind": kind, "identity": identity, "version": SUMMARY_VERSION, "summary": results[path]}
    except KeyboardInterrupt:  # Ctrl-C: the reading threads stop at their next slab
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise ReadThroughStopped(
            f"stopped by SIGINT while reading the cases through ({len(results)} of {len(files)} files read; "
            "those are remembered, and the next run does not read them again)"
        ) from None
    finally:
        pool.shutdown(wait=True)
    return results


@dataclass(frozen=True)
class CaseSummary:
    """What the checks learnt of a case: spatial ``shape`` and voxel ``spacing`` (mm), both along the RAS
    axes; ``channels``; whether its label has any ``foreground`` (None without a label); and the channels
    whose every voxel has one value (``constant_channels``)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    channels: int
    foreground: bool | None
    constant_channels: tuple[int, ...] = ()


def check_cases(
    cases: Sequence[dict],
    num_classes: int,
    workers: int = 0,
    known: dict | None = None,
    progress: bool = False,
    in_channels: int = 1,
    ignore_label: int | None = None,
    keep: Callable[[], None] | None = None,
) -> list[CaseSummary]:
    """Check every case before any caching or training; raise one DatasetError naming each bad file.

    Every image and label is read through once (:func:`read_through`, on ``workers`` threads, with a
    progress bar when ``progress``): files exist and are readable NIfTI to their last voxel; an image has
    ``in_channels`` channels (a 4D file, channels last, or one 3D file per channel, all of one geometry);
    images hold no NaN or infinite voxels; a label has its image's shape and geometry (affine) and integer
    values in ``[0, num_classes)`` (or ``ignore_label``). ``known`` (absolute path -> ``{"kind", "identity", "version",
    "summary"}``, see :func:`file_identity`) remembers earlier read-throughs: a file it holds unchanged is
    not read again, and the files read now are added to it (``keep`` is called now and then meanwhile, to save
    it). Returns a :class:`CaseSummary` per case.
    """
    problems, files = [], {}
    for case in cases:
        missing = [path for path in case_files(case) if not os.path.isfile(path)]
        if missing:  # the first missing file of a case is enough to name it
            owner = f" (label of {case_files(case)[0]})" if missing[0] == case.get("label") else ""
            problems.append(f"{missing[0]}: no such file{owner}")
        else:
            files.update({path: "image" for path in case_files({"image": case["image"]})})
            if "label" in case:
                files[case["label"]] = "label"
    summaries = _read_all(files, {} if known is None else known, workers, progress, keep)
    checked = []
    for case in cases:
        if not all(path in summaries for path in case_files(case)):
            continue  # a missing file, reported above
        try:
            checked.append(_check_case(case, summaries, num_classes, in_channels, ignore_label))
        except DatasetError as error:
            problems.append(str(error))
    if problems:
        raise DatasetError(summarise_problems(problems))
    return checked


def _volume(summary: dict | str, path: str) -> tuple[tuple[int, ...], int]:
    """A file's spatial shape and channel count (3D, or 4D with the channels last)."""
    if isinstance(summary, str):
        raise DatasetError(summary)
    shape = tuple(summary["shape"])
    if len(shape) == 3:
        return shape, 1
    if len(shape) == 4:
        return shape[:3], shape[3]
    raise DatasetError(f"{path}: not a 3D volume or a 4D one with the channels last (shape {shape})")


def _geometry_difference(affine: np.ndarray, reference: np.ndarray) -> str | None:
    """How two voxel-to-world affines differ (spacing, direction, origin), or None when they agree."""
    if np.allclose(affine, reference, rtol=1e-4, atol=1e-4):
        return None
    zooms, reference_zooms = np.linalg.norm(affine[:3, :3], axis=0), np.linalg.norm(reference[:3, :3], axis=0)
    if not np.allclose(zooms, reference_zooms, rtol=1e-4, atol=1e-4):
        return f"spacing {_numbers(zooms)} mm vs {_numbers(reference_zooms)}"
    if not np.allclose(affine[:3, :3] / zooms, reference[:3, :3] / reference_zooms, atol=1e-4):
        return f"direction {nib.aff2axcodes(affine)} vs {nib.aff2axcodes(reference)}"
    return f"origin {_numbers(affine[:3, 3])} mm vs {_numbers(reference[:3, 3])}"


def along_ras(shape: Sequence[int], affine: np.ndarray) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """A volume's spatial shape and voxel spacing (mm) reordered along the R, A and S axes."""
    ras_shape, ras_spacing = [0, 0, 0], [0.0, 0.0, 0.0]
    for axis, ras_axis in enumerate(nib.io_orientation(affine)[:, 0].astype(int)):  # the RAS axis of each array axis
        ras_shape[ras_axis], ras_spacing[ras_axis] = shape[axis], float(np.linalg.norm(affine[:3, axis]))
    return tuple(ras_shape), tuple(ras_spacing)


def _numbers(values) -> str:
    return ",".join(f"{v:.4g}" for v in values)


def _check_case(
    case: dict, summaries: dict[str, dict | str], num_classes: int, in_channels: int, ignore_label: int | None
) -> CaseSummary:
    images = case_files({"image": case["image"]})
    shape, channels = _volume(summaries[images[0]], images[0])
    affine = np.array(summaries[images[0]]["affine"])
    for path in images[1:]:  # one file per channel: each 3D, all of one geometry
        other_shape, other_channels = _volume(summaries[path], path)
        if other_channels != 1 or other_shape != shape:
            raise DatasetError(f"{path}: channel file of shape {summaries[path]['shape']}, expected {list(shape)}")
        difference = _geometry_difference(np.array(summaries[path]["affine"]), affine)
        if difference:
            raise DatasetError(f"{path}: geometry differs from {images[0]} ({difference})")
        channels += 1
    if channels != in_channels:
        raise DatasetError(
            f"{images[0]}: {channels} channel{'s' * (channels > 1)}, but the dataset has {in_channels} "
            f"(case {case_name(images[0])!r})"
        )
    for path in images:
        if not summaries[path]["finite"]:
            raise DatasetError(f"{path}: NaN or infinite voxel values")
    ras_shape, ras_spacing = along_ras(shape, affine)
    foreground = None
    label_path = case.get("label")
    if label_path is not None:
        foreground = _check_label(label_path, summaries[label_path], shape, affine, num_classes, ignore_label)
    constant = tuple(
        index for index, flag in enumerate(flag for path in images for flag in summaries[path]["constant"]) if flag
    )
    return CaseSummary(ras_shape, ras_spacing, channels, foreground, constant)


def _check_label(
    path: str, label: dict | str, shape: tuple, affine: np.ndarray, num_classes: int, ignore_label: int | None
) -> bool:
    """Check a label against its image; whether it has any foreground (an annotated class above 0)."""
    label_shape, label_channels = _volume(label, path)
    if label_channels != 1 or label_shape != shape:
        raise DatasetError(f"{path}: label shape {tuple(label['shape'])} differs from image shape {shape}")
    difference = _geometry_difference(np.array(label["affine"]), affine)
    if difference:
        raise DatasetError(f"{path}: label geometry differs from its image's ({difference})")
    values = np.array(label["values"], dtype=np.float64)
    values = values[values != ignore_label] if ignore_label is not None else values
    bad = values[~np.isfinite(values) | (values < 0) | (values >= num_classes) | (values != np.round(values))]
    if bad.size:
        shown = ", ".join(f"{v:g}" for v in bad[:5])
        ignored = f" (and the ignore label {ignore_label})" if ignore_label is not None else ""
        raise DatasetError(
            f"{path}: label values {shown} outside the {num_classes} classes 0..{num_classes - 1}{ignored}"
        )
    return bool((values > 0).any())


def user_cache() -> Path:
    """Where this repository remembers what it learnt of dataset files between runs:
    ``$XDG_CACHE_HOME/repuxnet`` (``~/.cache/repuxnet`` without it)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "repuxnet"


def read_through_record() -> Path:
    """The read-throughs of dataset files (see :func:`verify_cases`)."""
    return user_cache() / "read_through.json"


def load_record(path: Path) -> dict:
    """A remembered JSON object (a record, a fingerprint); empty when there is none yet or it is unreadable."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: read the files again
        return {}
    return record if isinstance(record, dict) else {}


def verify_cases(
    cases: Sequence[dict],
    num_classes: int,
    workers: int,
    progress: bool = True,
    in_channels: int = 1,
    ignore_label: int | None = None,
) -> list[CaseSummary]:
    """Read every file of ``cases`` through before any work (see
    :func:`check_cases`); files already read in their current state (path, size,
    modification time), in this run or an earlier one, are not read again; the record of what was read is
    saved as it grows (every :data:`KEEP_EVERY` seconds), so an interrupted first read does not start over.
    Returns the case summaries."""
    record = read_through_record()
    known = load_record(record)
    before = {path: (entry.get("identity"), entry.get("version")) for path, entry in known.items()}

    def keep() -> None:
        added = {
            path: entry
            for path, entry in known.items()
            if before.get(path) != (entry.get("identity"), entry.get("version"))
        }
        if added:
            try:  # merged with what other runs have added meanwhile
                save_json({**load_record(record), **added}, record)
            except OSError:  # a read-only home: the files are read again next time
                pass

    try:
        return check_cases(cases, num_classes, workers, known, progress, in_channels, ignore_label, keep)
    finally:
        keep()
