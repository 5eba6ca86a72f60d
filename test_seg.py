"""Segment test images with trained weights; writes <case>_seg.nii.gz in each input's geometry."""

import argparse
import sys

from cli import add_common_arguments
from engine import UsageError, run_inference
from load_datasets_transforms import DatasetError


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_common_arguments(parser, mode="test")
    parser.set_defaults(roi_size=None)  # from the weights' model card, else 96
    parser.add_argument("--trained_weights", required=True, help="state_dict to segment with")
    parser.add_argument("--sw_batch_size", type=int, default=4, help="sliding-window batch (default 4)")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default 0.5)")
    args = parser.parse_args(argv)
    try:
        run_inference(args)
    except (DatasetError, UsageError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
