"""Region-based training against plain labels on the BraTS-like phantom, at equal iterations: the Dice of
whole tumour, tumour core and enhancing tumour (the regions rebuilt from each model's label maps on the
test cases, as BraTS scores them), for each seed.

Both runs train the same network on the same cases and crops (same seed): one with the dataset's
regions (one sigmoid output per region, Dice + BCE), one with its labels (one softmax output per label,
Dice + cross-entropy; the same dataset.json less ``regions``).

Command: ``python bench/bench_regions.py --steps 600 --seeds 0 1 --json bench/results/regions_cpu.json``
(about 25 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import main_train  # noqa: E402
import test_seg  # noqa: E402
from engine.evaluate import evaluate_case  # noqa: E402
from phantom import BRATS_REGIONS, write_dataset  # noqa: E402

NETWORK = dict(roi_size=48, feat_size="8,16,32,64", kernel_size=7, hidden_size=64, batch_size=1, crop_sample=2)
COMMON = dict(num_workers=0, device="cpu", cache_rate=1, lr=2e-3, fold="all", mirror_axes="none")


def _flags(**values) -> list[str]:
    return [item for name, value in values.items() for item in (f"--{name}", str(value))]


def region_dice(predictions: Path, labels: Path) -> dict[str, float]:
    """Mean Dice of each BraTS region over the test cases, rebuilt from the label maps."""
    groups = {i + 1: tuple(values) for i, values in enumerate(BRATS_REGIONS.values())}
    scores = {name: [] for name in BRATS_REGIONS}
    for path in sorted(predictions.glob("*_seg.nii.gz")):
        prediction = np.asarray(nib.load(path).dataobj)
        label = np.asarray(nib.load(labels / path.name.replace("_seg", "")).dataobj).astype(np.int64)
        results = evaluate_case(prediction, label, (1.0, 1.0, 1.0), groups)
        for key, name in enumerate(BRATS_REGIONS, start=1):
            scores[name].append(results[key]["dice"])
    return {name: float(np.nanmean(values)) for name, values in scores.items()}


def run(root: Path, work: Path, steps: int, seed: int) -> dict[str, dict[str, float]]:
    plain = json.loads((root / "dataset.json").read_text())
    del plain["regions"], plain["regions_class_order"]
    (root / "labels.json").write_text(json.dumps(plain))
    images = sorted(str(p) for p in (root / "imagesTs").glob("*.nii.gz"))
    results = {}
    for kind, dataset in (("regions", root / "dataset.json"), ("labels", root / "labels.json")):
        output = work / f"{kind}_{seed}"
        main_train.main(
            _flags(dataset=dataset, output=output, max_iter=steps, eval_step=steps, seed=seed, **NETWORK, **COMMON)
        )
        predictions = work / f"{kind}_{seed}_test"
        test_seg.main(
            _flags(output=predictions, num_workers=0, device="cpu", cache_rate=0)
            + ["--trained_weights", str(output / "final_model.pth"), "--input", *images]
        )
        results[kind] = region_dice(predictions, root / "labelsTs")
        print(f"seed {seed}, {kind}: {results[kind]}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="training iterations of each run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    parser.add_argument("--train", type=int, default=12, help="training cases of the phantom")
    parser.add_argument("--test", type=int, default=8, help="test cases of the phantom")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root, work = Path(folder) / "brats", Path(folder) / "runs"
        write_dataset(root, num_train=args.train, num_test=args.test, seed=11, modality="brats", layout="decathlon")
        results = {seed: run(root, work, args.steps, seed) for seed in args.seeds}
    summary = {
        kind: {name: float(np.mean([results[s][kind][name] for s in args.seeds])) for name in BRATS_REGIONS}
        for kind in ("regions", "labels")
    }
    print("| training | " + " | ".join(BRATS_REGIONS) + " |")
    for kind, scores in summary.items():
        print(f"| {kind} | " + " | ".join(f"{scores[name]:.3f}" for name in BRATS_REGIONS) + " |")
    if args.json:
        content = {"steps": args.steps, "network": NETWORK, "per_seed": results, "mean": summary}
        Path(args.json).write_text(json.dumps(content, indent=2) + "\n")


if __name__ == "__main__":
    main()
