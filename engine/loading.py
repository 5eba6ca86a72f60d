"""The datasets a run trains and validates on: cached in memory (as much as fits) or on disk, their
data-loading workers, and how long a run's other processes may wait for their preparation."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.data import CacheDataset, PersistentDataset
from monai.data.utils import pickle_hashing
from monai.data.utils import worker_init_fn as monai_worker_init

from dataset.cases import case_files
from dataset.checks import CaseSummary, file_identity
from engine.memory import available_bytes

__all__ = [
    "cached_dataset",
    "data_preparation_seconds",
    "data_worker_init",
    "fit_cache_rate",
    "preprocessed_bytes",
]


def data_preparation_seconds(cases: Sequence[dict]) -> float:
    """How long the other processes of a run may wait for rank 0 to read ``cases`` through and fingerprint
    them: 10 minutes, and 5 s more per file (decompressing a clinical volume takes about a second)."""
    return 600.0 + 5.0 * sum(len(case_files(case)) for case in cases)


def preprocessed_bytes(summary: CaseSummary, spacing: Sequence[float] | None) -> int:
    """Memory (bytes) of a case once preprocessed: float32 channels and label resampled to ``spacing``
    (None: the native grid), before the foreground crop (an upper bound)."""
    shape = np.array(summary.shape, dtype=float)
    if spacing is not None:
        shape = np.round(shape * np.array(summary.spacing) / np.array(spacing))
    return int(np.prod(shape)) * (summary.channels + 1) * 4


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
    :func:`preprocessed_bytes`), in :data:`CACHE_MEMORY_SHARE` of the ``available``
    memory (default: :func:`engine.memory.available_bytes`, a container's limit included)."""
    available = available_bytes() if available is None else available
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
