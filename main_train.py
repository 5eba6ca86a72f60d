"""Train a segmentation network from scratch (FLARE 2021 by default), as the published main_train.py."""

import engine
from cli import add_common_arguments, add_training_arguments, parser_for, run_or_exit


def main(argv=None) -> None:
    parser = parser_for(__doc__)
    add_common_arguments(parser, mode="train")
    add_training_arguments(parser)
    args = parser.parse_args(argv)
    run_or_exit(engine.run_training, args)  # the engine, PyTorch with it, loads only now


if __name__ == "__main__":
    main()
