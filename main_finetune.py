"""Fine-tune a pretrained network on another dataset (AMOS 2022 from FLARE by default), as published."""

import argparse
import functools

from cli import add_common_arguments, add_training_arguments, positive_int, run_or_exit
from engine import run_training


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_common_arguments(parser, mode="train")
    add_training_arguments(parser)
    parser.set_defaults(dataset="amos")
    parser.add_argument(
        "--pretrain_classes",
        type=positive_int,
        default=5,
        help="classes of the pretrained model's output head (default 5, FLARE)",
    )
    args = parser.parse_args(argv)
    run_or_exit(functools.partial(run_training, finetune=True), args)


if __name__ == "__main__":
    main()
