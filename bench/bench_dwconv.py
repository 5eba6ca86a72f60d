"""Depthwise large-kernel convolution: forward + backward time and peak memory, published vs ours.

Published: ``F.conv3d(groups=C)`` as the published blocks run it. Ours: ``depthwise_conv3d`` with the
automatic algorithm choice (FFT for large kernels; taps that only meet padding skipped).

At each RepUX-Net stage shape for a 96^3 input (1x48x48^3, 1x96x24^3, 1x192x12^3, 1x384x6^3), kernel 21.
Each measurement runs in a fresh process so that peak memory is its own.

    python bench/bench_dwconv.py --json bench/results/dwconv_cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import common
import torch
import torch.nn.functional as F

from networks.dwconv import choose_algorithm, depthwise_conv3d

STAGES = [(48, 48), (96, 24), (192, 12), (384, 6)]


def measure(channels: int, size: int, kernel: int, algorithm: str, device: torch.device, repeats: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(1, channels, size, size, size, device=device, requires_grad=True)
    weight = torch.randn(channels, 1, kernel, kernel, kernel, device=device, requires_grad=True)
    bias = torch.randn(channels, device=device, requires_grad=True)
    rss = common.current_rss_kib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        x.grad = weight.grad = bias.grad = None
        if algorithm == "published":  # the published block: nn.Conv3d(groups=C)
            y = F.conv3d(x, weight, bias, padding=kernel // 2, groups=channels)
        else:
            y = depthwise_conv3d(x, weight, bias, kernel // 2, algorithm)
        y.sum().backward()

    warmup = 0 if algorithm == "published" and device.type == "cpu" and size >= 24 else 1  # minutes per call
    seconds = common.time_call(step, device, warmup=warmup, repeats=repeats)
    return {"seconds": seconds, "peak_mib": common.peak_memory_mib(device, rss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--kernel", type=int, default=21)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (the native CPU runs use 1)")
    parser.add_argument("--stages", default="0,1,2,3", help="which stage shapes to run (default all)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--single", nargs=4, metavar=("C", "N", "ALGORITHM", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.single:
        channels, size, algorithm, repeats = args.single
        print(json.dumps(measure(int(channels), int(size), args.kernel, algorithm, device, int(repeats))))
        return
    rows, results = [], []
    for index in (int(i) for i in args.stages.split(",")):
        channels, size = STAGES[index]
        entry = {"shape": [1, channels, size, size, size], "kernel": args.kernel}
        probe = torch.empty(1, channels, 1, 1, 1, device=device)
        entry["auto_choice"] = choose_algorithm(probe, (min(args.kernel, 2 * size - 1),) * 3)
        for algorithm in ("published", "auto"):
            repeats = 1 if algorithm == "published" and device.type == "cpu" and size >= 24 else args.repeats
            entry[algorithm] = common.run_isolated(
                Path(__file__),
                [
                    str(channels),
                    str(size),
                    algorithm,
                    str(repeats),
                    "--device",
                    args.device,
                    "--kernel",
                    str(args.kernel),
                ],
            )
        speedup = entry["published"]["seconds"] / entry["auto"]["seconds"]
        entry["speedup"] = speedup
        results.append(entry)
        published, ours = entry["published"], entry["auto"]
        rows.append(
            [
                f"1x{channels}x{size}^3",
                f"{published['seconds']:.3f}",
                f"{ours['seconds']:.3f} ({entry['auto_choice']})",
                f"{speedup:.1f}x",
                f"{published['peak_mib']:.0f}",
                f"{ours['peak_mib']:.0f}",
            ]
        )
        print(f"done {rows[-1]}", flush=True)
    info = common.machine()
    print(f"\nDepthwise {args.kernel}^3 convolution, forward + backward, {info['device']}, torch {info['torch']}")
    header = ["shape", "published conv3d s", "ours s (algorithm)", "speed-up", "published peak MiB", "ours peak MiB"]
    print(common.markdown_table(header, rows))
    common.write_json(args.json, {"machine": info, "kernel": args.kernel, "results": results})


if __name__ == "__main__":
    main()
