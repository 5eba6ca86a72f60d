"""Files written whole or not at all: a crash or Ctrl-C mid-write leaves the previous files intact, and files
written together (a segmentation and its probabilities) are replaced together."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

__all__ = ["FileGroup", "replace_atomically", "save_json"]

T = TypeVar("T")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the block (in the main thread, where Python handles signals) and
    deliver them when it ends: the few renames of a commit are not cut in two by Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {}
    for number in (signal.SIGINT, signal.SIGTERM):
        previous[number] = signal.getsignal(number)
        signal.signal(number, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        for number in received:
            signal.raise_signal(number)


class FileGroup:
    """Files replaced together: each is written to a temporary file beside it (:meth:`temporary`), then
    :meth:`commit` flushes them to disk and renames them all into place, SIGINT and SIGTERM held back
    meanwhile. Whatever stops the work first (an error, Ctrl-C) leaves every previous file as it was and no
    temporary file behind; an error during the renames puts the previous files back. A new file gets the
    permissions of any new file (the user's umask), not the private ones of a temporary file.

    Use as a context manager: leaving the block without :meth:`commit` removes the temporary files.
    """

    def __init__(self) -> None:
        self._temporaries: dict[Path, str] = {}

    def temporary(self, path: str | os.PathLike) -> str:
        """A new temporary file beside ``path`` to write ``path``'s content to; its name keeps ``path``'s
        suffixes (writers such as nibabel pick the format from them)."""
        path = Path(path)
        if path in self._temporaries:
            raise ValueError(f"{path}: already in this group")
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix="".join(path.suffixes), dir=path.parent)
        os.close(handle)
        self._temporaries[path] = tmp
        os.chmod(tmp, 0o666 & ~_umask())
        return tmp

    def commit(self) -> None:
        """Replace every file of the group by what was written to its temporary file, all or none."""
        for tmp in self._temporaries.values():
            with open(tmp, "rb") as written:
                os.fsync(written.fileno())
        backups: dict[Path, str] = {}
        installed: list[Path] = []
        with _signals_deferred():
            try:
                for path, tmp in self._temporaries.items():
                    if os.path.lexists(path):
                        os.replace(path, f"{tmp}.previous")
                        backups[path] = f"{tmp}.previous"
                for path, tmp in self._temporaries.items():
                    os.replace(tmp, path)
                    installed.append(path)
            except BaseException:
                for path in installed:
                    os.remove(path)
                for path, backup in backups.items():
                    os.replace(backup, path)
                raise
            self._temporaries.clear()
            for backup in backups.values():
                os.remove(backup)

    def discard(self) -> None:
        """Remove the temporary files not committed."""
        for tmp in self._temporaries.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        self._temporaries.clear()

    def __enter__(self) -> FileGroup:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.discard()


def replace_atomically(path: Path, write: Callable[[str], T]) -> T:
    """Write through ``write(tmp_path)`` to a temporary file beside ``path``, flush it to disk, then rename it
    over ``path`` (a :class:`FileGroup` of one file): a crash while writing leaves the previous file intact.
    Returns what ``write`` returned."""
    with FileGroup() as group:
        result = write(group.temporary(path))
        group.commit()
    return result


def save_json(data: dict, path: Path) -> None:
    replace_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))
