"""Fine-tune a pretrained network on another dataset (AMOS 2022 from FLARE by default), as published.

The weights to start from are needed (--pretrained_weights); --pretrain false trains from scratch instead.
"""

import functools

import engine
from cli import add_common_arguments, add_training_arguments, parser_for, run_or_exit


def main(argv=None) -> None:
    parser = parser_for(__doc__)
    add_common_arguments(parser, mode="train")
    add_training_arguments(parser, finetune=True)
    parser.set_defaults(dataset="amos")
    args = parser.parse_args(argv)
    run_or_exit(functools.partial(engine.run_training, finetune=True), args)  # the engine loads only now


if __name__ == "__main__":
    main()
