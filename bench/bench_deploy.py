"""Full-size RepUX-Net inference on the CPU, every route side by side: one sliding window and one volume.

Routes: ``published`` (the network as published: native conv3d over the whole 21^3 kernels, fp32),
``ours`` and ``ours_bf16`` (test_seg.py with a .pth: BFR folded, the fast depthwise convolution, fp32 or
bf16 autocast), ``torchscript`` (export.py's model.ts) and ``onnxruntime`` (export.py's model.onnx run by
ONNX Runtime); on request, ``openvino`` and ``openvino_default`` (OpenVINO running model.onnx in float32,
or with its CPU default precision). Window: one 1x1x96^3 forward. Volume: sliding-window inference (roi
96^3, sw_batch_size 4) over 1x1x192x192x128. Each route runs in its own process; peak memory is that
process's peak resident set above what it held before building the network. The exports are made once, by
export.py's own code, from a randomly initialised network with a model card.

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

ROUTES = ("published", "ours", "ours_bf16", "torchscript", "onnxruntime")
#: Routes measured only when asked for: OpenVINO (not a dependency of this repository) running model.onnx,
#: with float32 inference (``openvino``) or its CPU default, bf16 where the CPU has it (``openvino_default``).
OPTIONAL_ROUTES = ("openvino", "openvino_default")
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
    export.main(["--trained_weights", str(weights), "--output", str(folder), "--formats", "torchscript", "onnx"])
    return {name: (folder / name).stat().st_size / 2**20 for name in ("weights.pth", "model.ts", "model.onnx")}


def measure(route: str, folder: Path, overlap: float, repeats: int) -> dict:
    torch.manual_seed(0)
    window = torch.randn(1, 1, *ROI)
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
    elif route.startswith("openvino"):
        model = _openvino(folder / "model.onnx", float32=route == "openvino")
    else:
        model = ExportedNetwork(str(folder / ("model.ts" if route == "torchscript" else "model.onnx"))).build(
            torch.device("cpu")
        )
    device = torch.device("cpu")
    with settings, torch.no_grad(), autocast:
        window_seconds = common.time_call(lambda: model(window), device, warmup=1, repeats=repeats)
        volume_seconds = common.time_call(
            lambda: sliding_window_inference(volume, ROI, 4, model, overlap=overlap), device, warmup=0, repeats=1
        )
    return {"window_s": window_seconds, "volume_s": volume_seconds, "peak_mib": common.peak_memory_mib(device, rss)}


def _openvino(path: Path, float32: bool):
    import openvino

    compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"} if float32 else {})
    return lambda x: torch.from_numpy(compiled(x.numpy())[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--routes",
        default=",".join(ROUTES),
        help=f"comma-separated (default: {', '.join(ROUTES)}; with openvino installed: {', '.join(OPTIONAL_ROUTES)})",
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
                ]
            )
            print(f"done {rows[-1]}", flush=True)
    info = common.machine()
    print(f"\nRepUX-Net (full size) inference, {info['device']}, torch {info['torch']}; overlap {args.overlap}")
    print(common.markdown_table(["route", "s per window", "s per volume", "speed-up vs published", "peak MiB"], rows))
    print("file sizes (MiB): " + ", ".join(f"{name} {size:.1f}" for name, size in sizes.items()))
    common.write_json(args.json, {"machine": info, "overlap": args.overlap, "sizes_mib": sizes, "results": results})


if __name__ == "__main__":
    main()
