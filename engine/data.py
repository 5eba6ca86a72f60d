"""The data of a run: cases checked and remembered, settings derived from the data, cached datasets."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections.abc import Sequence
from pathlib import Path

from monai.data import CacheDataset, PersistentDataset
from monai.data.utils import pickle_hashing
from monai.data.utils import worker_init_fn as monai_worker_init

from dataset_config import DatasetConfig, DatasetError
from dataset_fingerprint import (
    FINGERPRINT_VERSION,
    FOREGROUND_SAMPLES_TOTAL,
    compute_fingerprint,
    derive_settings,
    preprocessed_bytes,
)
from engine.common import save_json
from load_datasets_transforms import CaseSummary, case_files, check_cases, file_identity

__all__ = [
    "available_memory",
    "data_preparation_seconds",
    "cached_dataset",
    "data_worker_init",
    "derive_from_data",
    "fit_cache_rate",
    "read_through_record",
    "user_cache",
    "verify_cases",
]


def user_cache() -> Path:
    """Where this repository remembers what it learnt of dataset files between runs:
    ``$XDG_CACHE_HOME/repuxnet`` (``~/.cache/repuxnet`` without it)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "repuxnet"


def read_through_record() -> Path:
    """The read-throughs of dataset files (see :func:`verify_cases`)."""
    return user_cache() / "read_through.json"


def _load_record(path: Path) -> dict:
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
    :func:`load_datasets_transforms.check_cases`); files already read in their current state (path, size,
    modification time), in this run or an earlier one, are not read again. Returns the case summaries."""
    record = read_through_record()
    known = _load_record(record)
    before = {path: (entry.get("identity"), entry.get("version")) for path, entry in known.items()}

    def keep() -> None:
        added = {
            path: entry
            for path, entry in known.items()
            if before.get(path) != (entry.get("identity"), entry.get("version"))
        }
        if added:
            try:  # merged with what other runs have added meanwhile
                save_json({**_load_record(record), **added}, record)
            except OSError:  # a read-only home: the files are read again next time
                pass

    try:
        return check_cases(cases, num_classes, workers, known, progress, in_channels, ignore_label, keep)
    finally:
        keep()


def data_preparation_seconds(cases: Sequence[dict]) -> float:
    """How long the other processes of a run may wait for rank 0 to read ``cases`` through and fingerprint
    them: 10 minutes, and 5 s more per file (decompressing a clinical volume takes about a second)."""
    return 600.0 + 5.0 * sum(len(case_files(case)) for case in cases)


def _fingerprint_path(cases: Sequence[dict]) -> Path:
    """The remembered fingerprint of exactly these files in their current state."""
    files = sorted(file_identity(path) for case in cases for path in case_files(case))
    key = json.dumps([FINGERPRINT_VERSION, FOREGROUND_SAMPLES_TOTAL, files])
    return user_cache() / "fingerprints" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def derive_from_data(
    config: DatasetConfig, cases: Sequence[dict], workers: int, main: bool = True
) -> tuple[DatasetConfig, dict | None]:
    """``config`` with what it leaves to the data (spacing, CT windows, z-score masks) derived from the
    labelled training ``cases`` (see :mod:`dataset_fingerprint`), and ``{"fingerprint": ..., "derived":
    ...}`` to record (None when nothing was to derive). A fingerprint is computed once for a set of
    files (progress bar on ``main``) and reused by later runs over the same files."""
    if not config.to_derive():
        return config, None
    path = _fingerprint_path(cases)
    fingerprint = _load_record(path)
    if fingerprint.get("version") != FINGERPRINT_VERSION:
        ct_channels = [norm.scheme == "ct" for norm in config.normalization]
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
        print(f"Derived from the {fingerprint['cases']} training cases: {'; '.join(explained)}")
    return config, {"fingerprint": fingerprint, "derived": derived}


def _explained(name: str, value, fingerprint: dict) -> str:
    """A derived setting and the rule that gave it, for the run's log."""
    if name.startswith("z-score mask"):
        share = fingerprint["median_relative_size_after_crop"]
        return f"{name}: {value} (cropping to the non-zero region keeps {share:.0%} of the median case)"
    numbers = ",".join(f"{v:g}" for v in value)
    if name == "spacing":
        rule = (
            "the median"
            if value == [round(s, 4) for s in fingerprint["median_spacing"]]
            else "nnU-Net's anisotropy rule"
        )
        return f"spacing {numbers} mm ({rule})"
    return f"{name} {numbers} (0.5 and 99.5 percentiles of the foreground)"


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


#: The share of the available memory the in-memory cache may take (the rest: network, workers, batches).
CACHE_MEMORY_SHARE = 0.75


def fit_cache_rate(
    cache_rate: float,
    summaries: Sequence[CaseSummary],
    spacing: Sequence[float] | None,
    processes: int = 1,
    available: int | None = None,
) -> tuple[float, str | None]:
    """``--cache_rate`` lowered to what fits in memory, and the note that says so (None when it fits):
    ``processes`` processes each cache ``cache_rate`` of the cases, preprocessed (see
    :func:`dataset_fingerprint.preprocessed_bytes`), in :data:`CACHE_MEMORY_SHARE` of the ``available``
    memory (default: what the system reports)."""
    available = available_memory() if available is None else available
    if available is None or cache_rate == 0 or not summaries:
        return cache_rate, None
    needed = cache_rate * processes * sum(preprocessed_bytes(summary, spacing) for summary in summaries)
    budget = CACHE_MEMORY_SHARE * available
    if needed <= budget:
        return cache_rate, None
    fitted = int(cache_rate * budget / needed * 100) / 100
    return fitted, (
        f"note: --cache_rate {cache_rate:g} would hold {_size(needed)} of preprocessed cases in memory "
        f"({len(summaries)} cases{f', {processes} processes' if processes > 1 else ''}); "
        f"{_size(available)} is available: caching {fitted:g} of them instead (--cache_dir caches them on disk)"
    )


def _size(size: float) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def data_worker_init(worker_id: int) -> None:
    """Data-loading workers leave Ctrl-C and SIGTERM (sent to the whole process group by a terminal or a
    job scheduler) to the main process, which stops the run cleanly and then ends them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    monai_worker_init(worker_id)


def _case_key(case: dict) -> bytes:
    """Disk-cache key of a case: its files with their size and modification time (a rewritten file is
    another entry)."""
    return pickle_hashing(
        {key: [file_identity(path) for path in case_files({"image": value})] for key, value in case.items()}
    )


def cached_dataset(cases: list[dict], transforms, cache_rate: float, workers: int, cache_dir: Path | None):
    """The dataset of ``cases``: the deterministic part of ``transforms`` cached in memory (``cache_rate``)
    or, with ``cache_dir``, on disk. A disk entry is keyed by the case's files (path, size, modification
    time) and by the deterministic transforms with all their settings (spacing, window, padding...), so a
    reused folder never serves a volume made from other files or with other settings."""
    if cache_dir is not None:
        return PersistentDataset(
            cases, transforms, cache_dir=cache_dir, hash_func=_case_key, hash_transform=pickle_hashing
        )
    return CacheDataset(cases, transforms, cache_rate=cache_rate, num_workers=workers, progress=False)
