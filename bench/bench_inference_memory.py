"""Peak memory and time of one case's inference at real scan size, today's path against the published one.

A synthetic CT (an elliptic body of soft tissue, organs and noise in air, int16 HU) of AMOS size (512x512x300
at 0.8x0.8x2.5 mm, 16 classes, resampled to AMOS's 1.5x1.5x2 mm) or FLARE size (512x512x120 at 0.78x0.78x2.5
mm, 5 classes, resampled to 1x1x1.2 mm), preprocessed by the test chain and segmented by a small RepUX-Net
(features 16-128, kernel 7, random weights, deploy form) in two ways, each in its own process:

- ``published``: MONAI's ``sliding_window_inference`` (float32 logits of every class over the whole volume),
  softmax, ``Invertd`` back to the input geometry (float64 resampling of every class at once), the background
  completed, argmax: what test_seg.py did before slab-wise inference, as the published test_seg.py does it.
- ``slabs``: ``engine.predict.mean_probabilities`` (windows stitched a slab at a time, 2-byte probabilities)
  and ``engine.input_grid.labels_on_input_grid`` (the input grid a slab at a time): test_seg.py's path.

Each prints the process's peak resident memory (VmHWM, the whole process: Python, PyTorch, the image, the
network and its activations), the estimate of ``engine.memory`` for the case (as test_seg.py makes it for
``--num_workers 0``, where one process preprocesses and segments), the seconds of the case and, for
the slab path, how many of its labels differ from the published path's and, there, the largest gap between
the published path's two most probable classes. ``network`` is a process that only runs the
network on one batch of windows: its peak above what it held before is the network's own share;
``preprocessing`` only reads and preprocesses the case.

    python bench/bench_inference_memory.py --case amos --json bench/results/inference_memory_amos_cpu.json
    python bench/bench_inference_memory.py --case flare --json bench/results/inference_memory_flare_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import common
import nibabel as nib
import numpy as np
import torch
from monai.data import list_data_collate

from dataset.description import load_dataset_config
from dataset.transforms import build_transforms
from engine.input_grid import InputGrid, labels_on_input_grid
from engine.memory import (
    ModelMemory,
    activation_bytes,
    case_grid,
    peak_resident_bytes,
    resident_bytes,
    tree_bytes,
)
from engine.predict import ModelPasses, mean_probabilities
from networks import build_network, switch_to_deploy

CASES = {
    "amos": {"shape": (512, 512, 300), "zooms": (0.8, 0.8, 2.5), "preset": "amos"},
    "flare": {"shape": (512, 512, 120), "zooms": (0.78, 0.78, 2.5), "preset": "flare"},
    "tiny": {"shape": (64, 48, 30), "zooms": (1.5, 1.5, 2.5), "preset": "amos"},  # the tests' smoke run
}
ROI = (96, 96, 96)
NETWORK = {"feat_size": (16, 32, 64, 128), "ks": 7, "hidden_size": 256}


def synthetic_ct(path: Path, shape, zooms, seed: int = 0) -> None:
    """An int16 CT: air, an elliptic body (fat, soft tissue), brighter organs, Gaussian noise; LPS-stored
    like most DICOM conversions (x and y flipped)."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.6) ** 2 < 1
    organs = ((x - 0.3) / 0.25) ** 2 + (y / 0.2) ** 2 < 1
    volume = np.full(shape, -1000, dtype=np.int16)
    for z in range(shape[2]):
        plane = np.where(body, 40, -1000) + np.where(organs, 60, 0) + rng.normal(0, 20, shape[:2])
        volume[..., z] = plane.astype(np.int16)
    affine = np.diag([-zooms[0], -zooms[1], zooms[2], 1.0])
    nib.save(nib.Nifti1Image(volume, affine), path)


def run_single(args) -> dict:
    torch.set_grad_enabled(False)
    setting = CASES[args.case]
    config = load_dataset_config(setting["preset"])
    torch.manual_seed(0)
    network = build_network("REPUXNET", 1, config.num_classes, **NETWORK).eval()
    switch_to_deploy(network)
    cpu, autocast = torch.device("cpu"), torch.autocast("cpu", enabled=False)
    if args.path == "network":  # the network's activations: its peak above what the process held before
        before = resident_bytes()
        network(torch.zeros(args.sw_batch_size, 1, *ROI))
        return {"peak_gib": peak_resident_bytes() / 2**30, "activations_gib": (peak_resident_bytes() - before) / 2**30}
    transforms = build_transforms(config, "test")
    start = time.perf_counter()
    image = list_data_collate([transforms({"image": args.image})])["image"]  # a batch of one, as test_seg.py's
    if args.path == "preprocessing":  # the test chain alone: reading, reorienting, resampling, cropping
        return {"peak_gib": peak_resident_bytes() / 2**30, "seconds": time.perf_counter() - start}
    if args.path == "published":
        from monai.data import decollate_batch
        from monai.inferers import sliding_window_inference
        from monai.transforms import Invertd

        logits = sliding_window_inference(image, ROI, args.sw_batch_size, network, overlap=args.overlap)
        batch = {"image": image, "pred": torch.softmax(logits, dim=1)}
        del logits
        invert = Invertd(keys="pred", transform=transforms, orig_keys="image", nearest_interp=False, to_tensor=True)
        probabilities = torch.as_tensor(invert(decollate_batch(batch)[0])["pred"])
        probabilities[0] += (1 - probabilities.sum(dim=0)).clamp_min(0)  # outside the crop: background
        del batch
        labels = probabilities.argmax(dim=0).numpy().astype(np.uint8)
    else:
        probabilities = mean_probabilities(
            image, [ModelPasses(network, ROI)], config.num_classes, args.sw_batch_size, args.overlap, autocast, cpu
        )
        labels = labels_on_input_grid(probabilities, InputGrid.of(image), config.label_manager)
    seconds, peak = time.perf_counter() - start, peak_resident_bytes()
    np.save(args.labels, labels)
    if args.path == "published":  # after the peak: how far apart the two most probable classes are
        top_two = probabilities.topk(2, dim=0).values
        np.save(args.labels.replace(".npy", "_gap.npy"), (top_two[0] - top_two[1]).numpy())
    weights = sum(tensor.nbytes for tensor in network.state_dict().values())
    activations = ModelMemory(ROI, weights, lambda batch: activation_bytes(lambda: network, 1, ROI, batch))
    case = case_grid("ct", args.image, config.spacing)
    estimate = tree_bytes([case], 1, config.num_classes, [activations], args.sw_batch_size, args.overlap, 0, 0.0)
    return {
        "peak_gib": peak / 2**30,
        "seconds": seconds,
        "estimate_gib": estimate.total / 2**30,
        "network_grid": list(image.shape[2:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), default="amos")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--sw_batch_size", type=int, default=4)
    parser.add_argument("--paths", default="network,preprocessing,slabs,published", help="the paths to run")
    parser.add_argument("--json", default=None)
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--image", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--labels", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        print(json.dumps(run_single(args)))
        return
    setting, results = CASES[args.case], {}
    with tempfile.TemporaryDirectory() as folder:
        image = Path(folder) / "ct.nii.gz"
        synthetic_ct(image, setting["shape"], setting["zooms"])
        for path in args.paths.split(","):
            labels = Path(folder) / f"{path}.npy"
            flags = ["--case", args.case, "--path", path, "--image", str(image), "--labels", str(labels)]
            flags += ["--overlap", str(args.overlap), "--sw_batch_size", str(args.sw_batch_size)]
            results[path] = common.run_isolated(Path(__file__), flags)
            print(path, results[path], flush=True)
        if {"slabs", "published"} <= set(results):
            slabs, published = np.load(Path(folder) / "slabs.npy"), np.load(Path(folder) / "published.npy")
            differing = slabs != published
            results["slabs"]["labels_differing"] = int(differing.sum())
            results["slabs"]["labels"] = int(slabs.size)
            gaps = np.load(Path(folder) / "published_gap.npy")[differing]
            results["slabs"]["largest_top_two_gap_where_differing"] = float(gaps.max()) if gaps.size else 0.0
    activations = results.get("network", {}).get("activations_gib", 0.0)
    rows = [
        [
            path,
            f"{r['peak_gib']:.2f}",
            f"{r['peak_gib'] - activations:.2f}" if path in ("slabs", "published") else "",
            f"{r.get('seconds', 0):.0f}",
            f"{r.get('estimate_gib', 0):.2f}",
        ]
        for path, r in results.items()
    ]
    header = ["path", "peak resident GiB", "without the network's activations", "seconds", "estimate GiB"]
    print(common.markdown_table(header, rows))
    common.write_json(args.json, {"machine": common.machine(), "case": args.case, **vars(args), "results": results})


if __name__ == "__main__":
    sys.exit(main())
