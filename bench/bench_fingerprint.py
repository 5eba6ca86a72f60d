"""Time of a dataset's first check and fingerprint (derived spacing and CT normalisation).

Writes ``--cases`` two-channel cases in the nnU-Net layout (a CT-named first channel, so that its normalisation
is derived too) to a temporary folder: phantom cases (about 0.25 M voxels), or with ``--shape`` cases of
that size (noise around an ellipsoid label, int16, as large as clinical CT). Then times, with
``--num_workers`` threads and with one: the read-through check of every file (``check_cases``) and the
fingerprint (``compute_fingerprint``).

    python bench/bench_fingerprint.py --cases 100 --num_workers 2 --json bench/results/fingerprint_cpu.json
    python bench/bench_fingerprint.py --cases 100 --shape 256,256,96 --json bench/results/fingerprint_large_cpu.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import common
import nibabel as nib
import numpy as np

from dataset.cases import find_cases
from dataset.checks import check_cases
from dataset.description import load_dataset_config
from dataset.fingerprint import compute_fingerprint
from phantom import write_dataset


def write_large_cases(root: Path, count: int, shape: tuple[int, ...]) -> None:
    """Replace the phantom files under ``root`` by cases of ``shape``: an ellipsoid label, noisy channels."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    for case in range(count):
        name = f"phantom_{case:03d}"
        label = ((grid**2).sum(axis=0) < rng.uniform(0.2, 0.4)).astype(np.uint8)
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"{name}.nii.gz")
        for channel in range(2):
            image = rng.normal(100 * label, 20).astype(np.int16)
            nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"{name}_{channel:04d}.nii.gz")


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=100, help="training cases (default 100)")
    parser.add_argument("--num_workers", type=int, default=2, help="threads (default 2)")
    parser.add_argument("--shape", default=None, help="cases of this size, e.g. 256,256,96 (default: phantom cases)")
    parser.add_argument("--json", default=None, help="write the results here too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_dataset(root, num_train=args.cases, num_test=0, seed=0, modality="mri", layout="nnunet")
        if args.shape:
            write_large_cases(root, args.cases, tuple(int(n) for n in args.shape.split(",")))
        description = json.loads((root / "dataset.json").read_text())
        description["channel_names"] = {"0": "CT", "1": "T2"}
        (root / "dataset.json").write_text(json.dumps(description))
        config = load_dataset_config(str(root / "dataset.json"))
        cases = find_cases(config, None, "training")
        voxels = [int(np.prod(nib.load(case["label"]).shape)) for case in cases]
        rows = []
        for workers in sorted({1, args.num_workers}):
            check = timed(lambda w=workers: check_cases(cases, config.num_classes, w, {}, in_channels=2))
            fingerprint = timed(lambda w=workers: compute_fingerprint(cases, config.channels, w))
            rows.append({"workers": workers, "check_s": check, "fingerprint_s": fingerprint})
    print(f"{args.cases} cases, 2 channels, {np.mean(voxels) / 1e6:.2f} M voxels per case on average")
    print("| threads | read-through check (s) | fingerprint (s) | fingerprint per case (ms) |")
    print("|---|---|---|---|")
    for row in rows:
        per_case = 1000 * row["fingerprint_s"] / args.cases
        print(f"| {row['workers']} | {row['check_s']:.2f} | {row['fingerprint_s']:.2f} | {per_case:.1f} |")
    if args.json:
        result = {"machine": common.machine(), "cases": args.cases, "mean_voxels": float(np.mean(voxels)), "rows": rows}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
