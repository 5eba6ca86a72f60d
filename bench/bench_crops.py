"""Where the balanced crops may centre their background samples, under the published rule (a normalised
value above 0) and the body rule (any background voxel of the foreground-cropped volume): the share of
each training case's preprocessed volume eligible as a background centre, averaged over the cases.

For a CT channel under nnU-Net's CT normalisation (``ct_zscore``), also what the foreground crop keeps of
each resampled case (its volume, and its body: the voxels above -500 HU) with the body crop, and with a
crop above the clip's low end (the crop of the ``ct`` scheme, which an earlier version used with a derived
window).

Command: ``python bench/bench_crops.py --dataset data/mri_nnunet/dataset.json [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset.cases import find_cases  # noqa: E402
from dataset.description import BACKGROUND_CROPS, ChannelNorm, DatasetConfig, load_dataset_config  # noqa: E402
from dataset.fingerprint import compute_fingerprint, derive_settings  # noqa: E402
from dataset.portable import BODY_HU  # noqa: E402
from dataset.transforms import CropCentres, build_transforms  # noqa: E402


def derived_config(dataset: str) -> tuple[DatasetConfig, list[dict]]:
    """The dataset's configuration with its derived settings, and its training cases."""
    config = load_dataset_config(dataset)
    cases = find_cases(config, None, "training")
    if config.to_derive():
        config, _ = derive_settings(config, compute_fingerprint(cases, config.channels))
    return config, cases


def eligible_shares(config: DatasetConfig, cases: list[dict], roi: int) -> dict[str, float]:
    """Mean share of the preprocessed volume eligible as a background centre, per rule."""
    _, preprocess = build_transforms(config, "train", (roi,) * 3)
    shares: dict[str, list[float]] = {rule: [] for rule in BACKGROUND_CROPS}
    for case in cases:
        data = preprocess(case)
        for rule in BACKGROUND_CROPS:
            _, background = CropCentres(rule, config.ignore_label)(data["label"], data["image"])
            shares[rule].append(background.numel() / data["label"].numel())
    print(f"{config.source}: {len(cases)} cases, {config.describe_channels()}")
    return {rule: float(np.mean(values)) for rule, values in shares.items()}


def ct_crop_shares(config: DatasetConfig, cases: list[dict]) -> dict[str, dict[str, float]]:
    """Of a one-channel ct_zscore dataset: the mean share of each resampled case's volume and of its body
    (voxels above BODY_HU) that the foreground crop keeps, with the body crop and with a crop above the
    clip's low end."""
    window_crop = replace(config, normalization=(ChannelNorm("ct", config.normalization[0].window),))
    crops = {}
    for name, chosen in (("body crop", config), ("crop above the clip's low end", window_crop)):
        chain = build_transforms(chosen, "test").transforms
        crop_at = [type(t).__name__ for t in chain].index("CropForegroundd")
        crops[name] = chain[crop_at]
    loading = chain[:crop_at]  # load, reorient, resample: the same for both
    kept = {name: {"volume": [], "body": []} for name in crops}
    for case in cases:
        resampled = {"image": case["image"]}
        for transform in loading:
            resampled = transform(resampled)
        whole = resampled["image"][0]
        for name, crop in crops.items():
            cropped = crop(resampled)["image"][0]
            kept[name]["volume"].append(cropped.numel() / whole.numel())
            kept[name]["body"].append(float((cropped > BODY_HU).sum() / (whole > BODY_HU).sum()))
    return {
        name: {
            "volume": float(np.mean(v["volume"])),
            "body": float(np.mean(v["body"])),
            "body_min": float(np.min(v["body"])),
        }
        for name, v in kept.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="a dataset JSON file")
    parser.add_argument("--roi_size", type=int, default=48, help="crop edge of the training chain")
    parser.add_argument("--json", default=None, help="write the shares here")
    args = parser.parse_args()
    config, cases = derived_config(args.dataset)
    shares = eligible_shares(config, cases, args.roi_size)
    for rule, share in shares.items():
        print(f"  {rule:>9}: {share:.1%} of the preprocessed volume may centre a background crop")
    if [norm.scheme for norm in config.normalization] == ["ct_zscore"]:
        shares["ct_crops"] = ct_crop_shares(config, cases)
        for name, kept in shares["ct_crops"].items():
            print(
                f"  {name}: keeps {kept['volume']:.1%} of the volume, {kept['body']:.1%} of the body "
                f"(least: {kept['body_min']:.1%})"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"dataset": args.dataset, **shares}, indent=2) + "\n")


if __name__ == "__main__":
    main()
