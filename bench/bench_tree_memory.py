"""test_seg.py's memory as a user runs it: the whole process tree, against the estimate it prints.

Synthetic CTs (``bench_inference_memory.synthetic_ct``: an elliptic body with organs and noise, int16, stored
LPS) of one size are segmented by ``python test_seg.py --input FOLDER --output OUT --trained_weights W``
with every other flag at its default (``--num_workers 2``, ``--cache_rate 0.1``, ``--sw_batch_size 4``,
``--overlap 0.5``, the CPU), W being a small RepUX-Net (features 16-128, kernel 7, hidden 256, random
weights) with a model card of the AMOS preset (16 classes, 1.5x1.5x2 mm) or of FLARE (5 classes, 1x1x1.2 mm).
While it runs, the proportional set size (PSS) of test_seg.py and its data-loading workers is summed
(``engine.memory.tree_pss_bytes``: each page shared between them counted once; ``engine.memory.TreePeak``
samples it every 0.05 s and test_seg.py's own resident size every 2 ms in between); the peak of that sum is
what the machine must have. The estimate is the one test_seg.py prints before it segments (its ``Memory:``
line), for the process tree.

    python bench/bench_tree_memory.py --size amos --cases 2 --json bench/results/tree_memory_amos.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import torch
from bench_inference_memory import NETWORK, synthetic_ct

from dataset.description import PRESETS
from engine.memory import TreePeak, gigabytes
from networks import build_network

SIZES = {
    "small": {"shape": (256, 256, 80), "zooms": (0.8, 0.8, 2.5), "preset": "amos"},
    "flare": {"shape": (512, 512, 120), "zooms": (0.78, 0.78, 2.5), "preset": "flare"},
    "amos": {"shape": (512, 512, 300), "zooms": (0.8, 0.8, 2.5), "preset": "amos"},
}


def write_model(folder: Path, preset: str) -> Path:
    """A small RepUX-Net's random weights with the model card of ``preset``'s settings."""
    config = PRESETS[preset]
    torch.manual_seed(0)
    network = build_network("REPUXNET", 1, config.num_classes, **NETWORK)
    weights = folder / "model.pth"
    torch.save(network.state_dict(), weights)
    card = {
        "network": "REPUXNET",
        "network_args": {"feat_size": list(NETWORK["feat_size"]), "ks": NETWORK["ks"], "hidden_size": 256},
        "in_channels": 1,
        "out_channels": config.num_classes,
        "classes": list(config.labels),
        "dataset": preset,
        **config.preprocessing(),
        "roi_size": [96, 96, 96],
        "mirror_axes": [],
    }
    Path(f"{weights}.json").write_text(json.dumps(card))
    return weights


def run(size: str, cases: int, extra: list[str]) -> dict:
    setting = SIZES[size]
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        images = folder / "images"
        images.mkdir()
        for index in range(cases):
            synthetic_ct(images / f"case_{index}.nii.gz", setting["shape"], setting["zooms"], seed=index)
        weights = write_model(folder, setting["preset"])
        command = [sys.executable, str(common.ROOT / "test_seg.py"), "--input", str(images)]
        command += ["--output", str(folder / "out"), "--trained_weights", str(weights), *extra]
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sampler = TreePeak(process.pid).start()
        output, _ = process.communicate()
        peak = sampler.stop()
        seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"test_seg.py failed:\n{output[-3000:]}")
    memory = re.search(r"^Memory: .*$", output, re.MULTILINE)
    estimate = re.search(r"needs about ([0-9.]+) (GB|MB)", memory.group(0)) if memory else None
    estimate_gib = None if estimate is None else float(estimate[1]) / (1 if estimate[2] == "GB" else 1024)
    return {
        "size": size,
        "shape": list(setting["shape"]),
        "cases": cases,
        "flags": extra,
        "peak_tree_pss_gib": peak / 2**30,
        "processes": sampler.processes,
        "estimate_gib": estimate_gib,
        "memory_line": memory.group(0) if memory else None,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--cases", type=int, default=2, help="synthetic CTs to segment")
    parser.add_argument("--flags", default="", help="extra test_seg.py flags, e.g. '--num_workers 0'")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = run(args.size, args.cases, args.flags.split())
    print(result["memory_line"])
    row = [
        args.size,
        "x".join(map(str, result["shape"])),
        result["cases"],
        " ".join(result["flags"]) or "defaults",
        gigabytes(result["peak_tree_pss_gib"] * 2**30),
        "" if result["estimate_gib"] is None else f"{result['estimate_gib']:.1f} GB",
        result["processes"],
        f"{result['seconds']:.0f} s",
    ]
    header = ["size", "input", "cases", "flags", "peak (process tree PSS)", "estimate", "processes", "time"]
    print(common.markdown_table(header, [row]))
    common.write_json(args.json, {"machine": common.machine(), **result})


if __name__ == "__main__":
    sys.exit(main())
