"""Train a segmentation network from scratch (FLARE 2021 by default), as the published main_train.py."""

from cli import add_common_arguments, add_training_arguments, parser_for, run_or_exit
from engine import run_training


def main(argv=None) -> None:
    parser = parser_for(__doc__)
    add_common_arguments(parser, mode="train")
    add_training_arguments(parser)
    args = parser.parse_args(argv)
    run_or_exit(run_training, args)


if __name__ == "__main__":
    main()
