"""Train a segmentation network from scratch (FLARE 2021 by default), as the published main_train.py."""

import argparse
import sys

from cli import add_common_arguments, add_training_arguments
from engine import UsageError, run_training
from load_datasets_transforms import DatasetError


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_common_arguments(parser, mode="train")
    add_training_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run_training(args)
    except (DatasetError, UsageError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
