"""Full-size RepUX-Net: one training step and one sliding-window inference pass, published way vs ours.

Training step: 2 crops of 96^3, DiceCE, AdamW, BFR on. Inference: sliding window (roi 96^3) over a
192x192x128 volume. Variants: ``published`` (native conv3d for the 21^3 kernels, fp32), ``ours``
(automatic fast convolution, fp32), ``ours_bf16`` (plus bf16 autocast) and, on CUDA, ``ours_fp16``
(fp16 autocast and a gradient scaler). Each variant runs in its own process (peak memory is its own).
``--size demo`` measures the CPU demo's network instead (features 16-128, hidden 128; crops and windows of
32^3 over a 64^3 volume): minutes where the full size takes hours, e.g. bf16 on a CPU without bf16 kernels.

    python bench/bench_train_step.py --json bench/results/train_step_cpu.json
    python bench/bench_train_step.py --size demo --variants ours,ours_bf16 --repeats 1 --overlap 0
        --json bench/results/train_step_demo_avx2_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import common
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss

import networks.dwconv as dwconv
from engine.common import native_bf16_cpu
from networks import build_network

VARIANTS = {
    "published": ("native", None),
    "ours": ("auto", None),
    "ours_bf16": ("auto", torch.bfloat16),
    "ours_fp16": ("auto", torch.float16),
}

#: Per ``--size``: the network's arguments, the training crop and window edge, the inference volume.
SIZES = {
    "full": ({}, 96, (192, 192, 128)),
    "demo": ({"feat_size": (16, 32, 64, 128), "hidden_size": 128}, 32, (64, 64, 64)),
}


def measure(task: str, variant: str, device: torch.device, repeats: int, overlap: float, size: str) -> dict:
    algorithm = VARIANTS[variant][0]
    # The published way: plain conv3d over the whole kernel, as the published block runs it.
    kernels = dwconv.full_kernels() if variant == "published" else contextlib.nullcontext()
    with dwconv.use_algorithm(algorithm), kernels:
        return _measure(task, variant, device, repeats, overlap, size)


def _measure(task: str, variant: str, device: torch.device, repeats: int, overlap: float, size: str) -> dict:
    amp_dtype = VARIANTS[variant][1]
    network_args, edge, volume_shape = SIZES[size]
    torch.manual_seed(0)
    model = build_network("REPUXNET", 1, 5, **network_args).to(device)
    autocast = torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None)
    rss = common.current_rss_kib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    slow = variant == "published" and device.type == "cpu"  # minutes per step: no warm-up, one repeat
    if task == "train":
        loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        image = torch.randn(2, 1, edge, edge, edge, device=device)
        label = torch.randint(0, 5, (2, 1, edge, edge, edge), device=device)

        def step():
            with autocast:
                loss = loss_function(model(image), label)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    else:
        model.switch_to_deploy()
        model.eval()
        volume = torch.randn(1, 1, *volume_shape, device=device)

        def step():
            with torch.no_grad(), autocast:
                sliding_window_inference(volume, (edge, edge, edge), 4, model, overlap=overlap)

    seconds = common.time_call(step, device, warmup=0 if slow else 1, repeats=1 if slow else repeats)
    return {"seconds": seconds, "peak_mib": common.peak_memory_mib(device, rss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tasks", default="train,infer")
    parser.add_argument("--variants", default=None, help="comma-separated (default: all for the device)")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default 0.5)")
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="the network and volumes measured")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--single", nargs=2, metavar=("TASK", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.single:
        task, variant = args.single
        print(json.dumps(measure(task, variant, device, args.repeats, args.overlap, args.size)))
        return
    default = ["published", "ours", "ours_bf16"] + (["ours_fp16"] if device.type == "cuda" else [])
    variants = args.variants.split(",") if args.variants else default
    results, rows = {}, []
    for task in args.tasks.split(","):
        results[task] = {}
        for variant in variants:
            results[task][variant] = common.run_isolated(
                Path(__file__),
                [
                    task,
                    variant,
                    "--device",
                    args.device,
                    "--repeats",
                    str(args.repeats),
                    "--overlap",
                    str(args.overlap),
                    "--size",
                    args.size,
                ],
            )
            measured = results[task][variant]
            ratio = results[task]["published"]["seconds"] / measured["seconds"] if "published" in results[task] else ""
            rows.append(
                [
                    task,
                    variant,
                    f"{measured['seconds']:.2f}",
                    f"{ratio:.1f}x" if ratio else "",
                    f"{measured['peak_mib']:.0f}",
                ]
            )
            print(f"done {rows[-1]}", flush=True)
    info = common.machine()
    print(f"\nRepUX-Net ({args.size} size), {info['device']}, torch {info['torch']}; inference overlap {args.overlap}")
    print(common.markdown_table(["task", "variant", "seconds", "speed-up vs published", "peak MiB"], rows))
    info["native_bf16_cpu"] = native_bf16_cpu()
    common.write_json(args.json, {"machine": info, "size": args.size, "overlap": args.overlap, "results": results})


if __name__ == "__main__":
    main()
