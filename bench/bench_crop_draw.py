"""The foreground crop centres of one case, ``voxels`` (any labelled voxel alike, as published) against
``classes`` (a class present, each alike, then a voxel of it, as nnU-Net): each class's share of the
foreground centres, and the time one case's draw takes (``BalancedCropd.randomize``, two crops) at the size
of an AMOS CT once resampled to its 1.5 x 1.5 x 2.0 mm (a 512 x 512 x 300 scan at 0.8 x 0.8 x 2.5 mm:
273 x 273 x 375 voxels) with AMOS's 15 organs as boxes of typical adult volumes.

    python bench/bench_crop_draw.py --json bench/results/crop_draw_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import common
import torch

from dataset.description import AMOS_LABELS
from dataset.transforms import BalancedCropd, CropCentres

SHAPE = (273, 273, 375)
VOXEL_ML = 1.5 * 1.5 * 2.0 / 1000
#: Typical adult organ volumes (mL), in AMOS's class order: what matters is their spread (the liver is
#: 300 times an adrenal gland), not their exact values.
VOLUMES_ML = (200, 170, 170, 40, 20, 1600, 400, 100, 80, 80, 5, 5, 90, 150, 30)


def amos_like_label() -> torch.Tensor:
    """Each organ a box of its volume, side by side along the first axis, in one (1, *SHAPE) label map; all
    at least half a crop from the border, where a drawn centre stays where it was drawn."""
    label = torch.zeros(1, *SHAPE)
    start = 50
    for value, volume in enumerate(VOLUMES_ML, start=1):
        voxels = volume / VOXEL_ML
        depth = max(1, round(voxels / (120 * 120)))
        side = max(1, round((voxels / depth) ** 0.5))
        label[0, start : start + depth, 60 : 60 + side, 100 : 100 + side] = value
        start += depth + 2
    return label


def draw(mode: str, label: torch.Tensor, calls: int, timed: int) -> dict:
    crop = BalancedCropd(
        CropCentres("body", None, mode), keys=["label"], label_key="label", spatial_size=(96,) * 3, num_samples=2
    )
    crop.set_random_state(0)
    seconds, centres = [], Counter()
    for call in range(calls):
        started = time.perf_counter()
        crop.randomize(label)
        if call < timed:
            seconds.append(time.perf_counter() - started)
        centres.update(int(label[0][tuple(centre)]) for centre in crop.cropper.centers)
    foreground = sum(count for value, count in centres.items() if value)
    share = {AMOS_LABELS[v]: centres[v] / foreground for v in range(1, len(VOLUMES_ML) + 1)}
    return {"median_seconds": statistics.median(seconds), "foreground_share": share}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400, help="draws of two crops per rule (default 400)")
    parser.add_argument("--timed", type=int, default=15, help="of which timed (default 15)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one loader worker's share
    label = amos_like_label()
    results = {mode: draw(mode, label, args.calls, args.timed) for mode in ("voxels", "classes")}
    print(f"{'class':<24} {'volume':>8} {'voxels':>8} {'classes':>8}")
    for value, name in enumerate(AMOS_LABELS[1:], start=1):
        shares = [results[mode]["foreground_share"][name] for mode in ("voxels", "classes")]
        print(f"{name:<24} {VOLUMES_ML[value - 1]:>6} mL {shares[0]:>8.3f} {shares[1]:>8.3f}")
    ratio = results["classes"]["median_seconds"] / results["voxels"]["median_seconds"]
    for mode in ("voxels", "classes"):
        print(f"{mode}: {results[mode]['median_seconds']:.3f} s per case (two crops)")
    print(f"classes / voxels: {ratio:.2f}")
    record = {"machine": common.machine(), "shape": SHAPE, "volumes_ml": VOLUMES_ML, "ratio": ratio, **results}
    common.write_json(args.json, record)


if __name__ == "__main__":
    main()
