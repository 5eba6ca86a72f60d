"""Where the balanced crops may centre their background samples, under the published rule (a normalised
value above 0) and the body rule (any background voxel of the foreground-cropped volume): the share of
each training case's preprocessed volume eligible as a background centre, averaged over the cases.

Command: ``python bench/bench_crops.py --dataset data/mri_nnunet/dataset.json [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset.cases import find_cases  # noqa: E402
from dataset.description import BACKGROUND_CROPS, load_dataset_config  # noqa: E402
from dataset.fingerprint import compute_fingerprint, derive_settings  # noqa: E402
from dataset.transforms import CropCentres, build_transforms  # noqa: E402


def eligible_shares(dataset: str, roi: int) -> dict[str, float]:
    """Mean share of the preprocessed volume eligible as a background centre, per rule."""
    config = load_dataset_config(dataset)
    cases = find_cases(config, None, "training")
    if config.to_derive():
        config, _ = derive_settings(config, compute_fingerprint(cases, config.channels))
    _, preprocess = build_transforms(config, "train", (roi,) * 3)
    shares: dict[str, list[float]] = {rule: [] for rule in BACKGROUND_CROPS}
    for case in cases:
        data = preprocess(case)
        for rule in BACKGROUND_CROPS:
            _, background = CropCentres(rule, config.ignore_label)(data["label"], data["image"])
            shares[rule].append(background.numel() / data["label"].numel())
    print(f"{dataset}: {len(cases)} cases, {config.describe_channels()}")
    return {rule: float(np.mean(values)) for rule, values in shares.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="a dataset JSON file")
    parser.add_argument("--roi_size", type=int, default=48, help="crop edge of the training chain")
    parser.add_argument("--json", default=None, help="write the shares here")
    args = parser.parse_args()
    shares = eligible_shares(args.dataset, args.roi_size)
    for rule, share in shares.items():
        print(f"  {rule:>9}: {share:.1%} of the preprocessed volume may centre a background crop")
    if args.json:
        Path(args.json).write_text(json.dumps({"dataset": args.dataset, **shares}, indent=2) + "\n")


if __name__ == "__main__":
    main()
