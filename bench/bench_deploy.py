"""Full-size RepUX-Net inference on the CPU, every route side by side: one sliding window and one volume.

Routes: ``published`` (the network as published: native conv3d over the whole 21^3 kernels, fp32),
``ours`` and ``ours_bf16`` (test_seg.py with a .pth: BFR folded, the fast depthwise convolution, fp32 or
bf16 autocast), ``torchscript`` (export.py's model.ts), ``onnxruntime`` (export.py's model.onnx run by
ONNX Runtime), ``openvino`` and ``openvino_default`` (test_seg.py's ``--runtime openvino``: OpenVINO running
model.onnx in float32, or with ``--amp`` in its CPU default precision). Window: one 1x1x96^3 forward.
Volume: sliding-window inference (roi 96^3, sw_batch_size 4) over 1x1x192x192x128. Each route runs in its
own process; peak memory is that process's peak resident set above what it held before building the
network. Relative difference: the largest absolute difference of the route's window output to the
training-form network's (fp32), over the largest absolute value of the latter. The exports are made once,
by export.py's own code, from a randomly initialised network with a model card.

    python bench/bench_deploy.py --overlap 0 --json bench/results/deploy_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from pathlib import Path

import common
import torch
from monai.inferers import sliding_window_inference

import export
import networks.dwconv as dwconv
from engine.export import ExportedNetwork
from networks import build_network, switch_to_deploy

ROUTES = ("published", "ours", "ours_bf16", "torchscript", "onnxruntime", "openvino", "openvino_default")
ROI = (96, 96, 96)


def make_exports(folder: Path) -> dict:
    """A full-size RepUX-Net's weights, card and exports in ``folder``; their sizes in MiB."""
    torch.manual_seed(0)
    model = build_network("REPUXNET", 1, 5)
    weights = folder / "weights.pth"
    torch.save(model.state_dict(), weights)
    card = {
        "network": "REPUXNET",
        "network_args": {},
        "in_channels": 1,
        "out_channels": 5,
        "classes": ["background", "spleen", "kidney", "liver", "pancreas"],
        "channels": ["CT"],
        "normalization": [{"scheme": "ct", "window": [-125.0, 275.0]}],
        "spacing": [1.5, 1.5, 2.0],
        "roi_size": list(ROI),
    }
    Path(f"{weights}.json").write_text(json.dumps(card))
    with torch.no_grad():  # the training-form network's output on the timed window, to compare each route's to
        torch.save(model.eval()(_window()), folder / "reference.pt")
    export.main(["--trained_weights", str(weights), "--output", str(folder), "--formats", "torchscript", "onnx"])
    return {name: (folder / name).stat().st_size / 2**20 for name in ("weights.pth", "model.ts", "model.onnx")}


def _window() -> torch.Tensor:
    return torch.randn(1, 1, *ROI, generator=torch.Generator().manual_seed(0))


def measure(route: str, folder: Path, overlap: float, repeats: int) -> dict:
    torch.manual_seed(0)
    window = _window()
    volume = torch.randn(1, 1, 192, 192, 128)
    rss = common.current_rss_kib()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=route == "ours_bf16")
    settings = contextlib.ExitStack()
    if route in ("published", "ours", "ours_bf16"):
        model = build_network("REPUXNET", 1, 5)
        model.load_state_dict(torch.load(folder / "weights.pth", weights_only=True))
        model.eval()
        if route == "published":  # plain conv3d over every tap, as the published block runs it
            settings.enter_context(dwconv.use_algorithm("native"))
            settings.enter_context(dwconv.full_kernels())
        else:
            switch_to_deploy(model)
    else:
        file = str(folder / ("model.ts" if route == "torchscript" else "model.onnx"))
        runtime = "openvino" if route.startswith("openvino") else "onnxruntime"
        model = ExportedNetwork(file, runtime, float32=route != "openvino_default").build(torch.device("cpu"))
    device = torch.device("cpu")
    outputs = []
    with settings, torch.no_grad(), autocast:
        window_seconds = common.time_call(lambda: outputs.append(model(window)), device, warmup=1, repeats=repeats)
        volume_seconds = common.time_call(
            lambda: sliding_window_inference(volume, ROI, 4, model, overlap=overlap), device, warmup=0, repeats=1
        )
    peak = common.peak_memory_mib(device, rss)
    reference = torch.load(folder / "reference.pt")
    relative = float((outputs[-1].float() - reference).abs().max() / reference.abs().max())
    return {"window_s": window_seconds, "volume_s": volume_seconds, "peak_mib": peak, "max_rel_diff": relative}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--routes",
        default=",".join(ROUTES),
        help=f"comma-separated (default: {', '.join(ROUTES)})",
    )
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default 0.5)")
    parser.add_argument("--repeats", type=int, default=2, help="timed windows per route (median)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--single", nargs=2, metavar=("ROUTE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        route, folder = args.single
        print(json.dumps(measure(route, Path(folder), args.overlap, args.repeats)))
        return
    with tempfile.TemporaryDirectory() as folder:
        sizes = make_exports(Path(folder))
        results, rows = {}, []
        for route in args.routes.split(","):
            flags = [route, folder, "--overlap", str(args.overlap), "--repeats", str(args.repeats)]
            results[route] = measured = common.run_isolated(Path(__file__), flags)
            published = results.get("published")
            ratio = f"{published['volume_s'] / measured['volume_s']:.2f}x" if published else ""
            rows.append(
                [
                    route,
                    f"{measured['window_s']:.2f}",
                    f"{measured['volume_s']:.1f}",
                    ratio,
                    f"{measured['peak_mib']:.0f}",
                    f"{measured['max_rel_diff']:.1e}",
                ]
            )
            print(f"done {rows[-1]}", flush=True)
    info = common.machine()
    print(f"\nRepUX-Net (full size) inference, {info['device']}, torch {info['torch']}; overlap {args.overlap}")
    header = ["route", "s per window", "s per volume", "speed-up vs published", "peak MiB", "relative difference"]
    print(common.markdown_table(header, rows))
    print("file sizes (MiB): " + ", ".join(f"{name} {size:.1f}" for name, size in sizes.items()))
    common.write_json(args.json, {"machine": info, "overlap": args.overlap, "sizes_mib": sizes, "results": results})


if __name__ == "__main__":
    main()
