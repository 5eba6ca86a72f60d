"""Helpers shared by the benchmarks: timing, peak memory in a fresh process, tables and JSON."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.memory import peak_resident_bytes, resident_bytes  # noqa: E402  (after the repository joins the path)


def machine() -> dict:
    """Where a benchmark ran: date, device, torch version, CPU threads."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86_64'})"
    return {
        "date": date.today().isoformat(),
        "device": device,
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_memory_mib(device: torch.device, rss_before_kib: int) -> float:
    """Peak memory of the measured work: CUDA's peak allocation, or the process's peak resident set size
    above what it held before (each measurement runs in its own process, see :func:`run_isolated`).

    The peak is the kernel's VmHWM, which a new process starts afresh, not ``getrusage``'s ``ru_maxrss``,
    which Linux carries over from the parent across fork and exec (a parent that held a large model would
    set every child's peak)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return ((peak_resident_bytes() or 0) // 1024 - rss_before_kib) / 1024


def current_rss_kib() -> int:
    return (resident_bytes() or 0) // 1024


def run_isolated(script: Path, args: list[str]) -> dict:
    """Run ``script --single ...`` in a fresh Python process and return the JSON it prints last."""
    completed = subprocess.run(
        [sys.executable, str(script), "--single", *args], capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run_script(command: list[str]) -> None:
    """Run a command of the repository's scripts from its root, printed first, its output hidden; a failure
    stops the benchmark."""
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def evaluated_dice(predictions: Path) -> dict[str, float]:
    """Each class's mean Dice in the ``summary.json`` that ``test_seg.py --evaluate`` wrote in ``predictions``."""
    summary = json.loads((Path(predictions) / "summary.json").read_text())
    return {cls: values["dice"]["mean"] for cls, values in summary["classes"].items()}


def dice_table(results: list[dict]) -> str:
    """A row per run (``run``, ``dice`` by class, ``train_seconds``): its test Dice of each class and its
    training time (None: a run trained before, scored again)."""
    classes = list(results[0]["dice"])
    rows = [[r["run"], *(f"{r['dice'][c]:.3f}" for c in classes), _minutes(r["train_seconds"])] for r in results]
    return markdown_table(["run", *classes, "training"], rows)


def _minutes(seconds: float | None) -> str:
    return "trained before" if seconds is None else f"{seconds / 60:.0f} min"


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2) + "\n")
        print(f"Wrote {path}")
