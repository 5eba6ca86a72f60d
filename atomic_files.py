"""Files written whole or not at all: a crash or Ctrl-C mid-write leaves the previous file intact."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = ["replace_atomically", "save_json"]

T = TypeVar("T")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def replace_atomically(path: Path, write: Callable[[str], T]) -> T:
    """Write through ``write(tmp_path)`` to a temporary file beside ``path``, flush it to disk, then rename it
    over ``path``: a crash while writing leaves the previous file intact. The file gets the permissions of
    any new file (the user's umask), not the private ones of a temporary file. Returns what ``write``
    returned."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name keeps the suffixes: writers such as nibabel pick the format from them.
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix="".join(path.suffixes), dir=path.parent)
    os.close(handle)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        result = write(tmp)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
        return result
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_json(data: dict, path: Path) -> None:
    replace_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))
