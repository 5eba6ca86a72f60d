"""The network activations test_seg.py's memory estimate counts, against a real forward pass on the CPU.

For each network and batch, one fresh process builds the network (deploy form, evaluation mode, random
weights, 16 outputs), runs one forward pass of zeros without gradients and reports the peak resident memory
it added (the kernel's VmHWM, after resetting it, less what the process held before). The estimate is
``engine.memory.activation_bytes``: the same network run on fake tensors (shapes only), the peak of the
bytes of the tensors alive at once, times ``ACTIVATION_FACTOR`` plus ``ACTIVATION_EXTRA``; the seconds the
tracing takes (the network built and run on fake tensors) beside those of the forward pass it stands for.

    python bench/bench_activations.py --json bench/results/activations_cpu.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import common
import torch

from engine.memory import (
    ACTIVATION_EXTRA,
    ACTIVATION_FACTOR,
    activation_bytes,
    peak_resident_bytes,
    reset_peak_resident,
    resident_bytes,
)
from networks import build_network, switch_to_deploy

SMALL = {"feat_size": [16, 32, 64, 128], "ks": 7, "hidden_size": 256}
#: (network, constructor overrides, ROI edge, windows per batch)
RUNS = [
    ("REPUXNET", SMALL, 96, 2),
    ("REPUXNET", SMALL, 96, 4),
    ("REPUXNET", {}, 96, 1),
    ("REPUXNET", {}, 96, 4),
    ("3DUXNET", {}, 64, 2),
    ("UNETR", {}, 96, 4),
    ("SwinUNETR", {}, 96, 2),
    ("nnUNet", {}, 96, 4),
]


def network_of(name: str, overrides: dict, roi: int) -> torch.nn.Module:
    if name == "UNETR":
        overrides = {**overrides, "img_size": [roi] * 3}
    network = build_network(name, 1, 16, **overrides).eval()
    switch_to_deploy(network)
    return network


def measure(args) -> dict:
    torch.set_grad_enabled(False)
    overrides = json.loads(args.overrides)
    network = network_of(args.network, overrides, args.roi)
    windows = torch.zeros(args.batch, 1, args.roi, args.roi, args.roi)
    reset_peak_resident()
    before = resident_bytes()
    started = time.perf_counter()
    network(windows)
    return {"measured": peak_resident_bytes() - before, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--network", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--roi", type=int, default=96, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        print(json.dumps(measure(args)))
        return
    rows, results = [], []
    for name, overrides, roi, batch in RUNS:
        flags = ["--network", name, "--overrides", json.dumps(overrides), "--roi", str(roi), "--batch", str(batch)]
        measured = common.run_isolated(Path(__file__), flags)
        build = functools.partial(network_of, name, overrides, roi)
        started = time.perf_counter()
        estimate = activation_bytes(build, 1, (roi,) * 3, batch)
        tracing = time.perf_counter() - started
        traced = (estimate - ACTIVATION_EXTRA) / ACTIVATION_FACTOR
        result = {"network": name, "overrides": overrides, "roi": roi, "batch": batch, **measured}
        result.update(traced=traced, estimate=estimate, trace_seconds=tracing)
        results.append(result)
        shape = "small" if overrides else "published"
        rows.append(
            [
                f"{name} ({shape})",
                f"{batch} x {roi}^3",
                f"{measured['measured'] / 2**30:.2f}",
                f"{traced / 2**30:.2f}",
                f"{estimate / 2**30:.2f}",
                f"{estimate / measured['measured']:.2f}",
                f"{tracing:.1f} s",
                f"{measured['seconds']:.0f} s",
            ]
        )
        print(rows[-1], flush=True)
    header = ["network", "windows", "measured GiB", "traced GiB", "estimate GiB", "estimate / measured", "tracing"]
    header.append("forward pass")
    print(common.markdown_table(header, rows))
    common.write_json(args.json, {"machine": common.machine(), "results": results})


if __name__ == "__main__":
    sys.exit(main())
