"""Command-line flags shared by main_train.py, main_finetune.py and test_seg.py."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from engine import RunStopped, UsageError
from load_datasets_transforms import DatasetError
from networks import available_networks

__all__ = ["add_common_arguments", "add_training_arguments", "run_or_exit", "str2bool"]


def run_or_exit(command: Callable, args: argparse.Namespace) -> None:
    """Run a script's command; a problem the user must fix ends it with one ``error:`` line and exit 1,
    a run stopped on purpose with its message and exit code (130 for Ctrl-C)."""
    try:
        command(args)
    except (DatasetError, UsageError) as error:
        sys.exit(f"error: {error}")
    except RunStopped as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(stopped.exit_code)


def str2bool(value: str) -> bool:
    """A real boolean flag value: true/false, yes/no, 1/0 (case-insensitive)."""
    lowered = str(value).strip().lower()
    if lowered in ("true", "t", "yes", "y", "1"):
        return True
    if lowered in ("false", "f", "no", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def int_list(count: int | None = None, allowed: tuple[int, ...] = ()):
    """Parser of comma-separated positive integers, ``count`` of them (or any count in ``allowed``)."""

    def parse(value: str) -> tuple[int, ...]:
        try:
            numbers = tuple(int(v) for v in str(value).replace(" ", "").split(",") if v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
        counts = allowed or ((count,) if count else ())
        if (counts and len(numbers) not in counts) or any(n < 1 for n in numbers):
            wanted = " or ".join(str(c) for c in counts)
            raise argparse.ArgumentTypeError(f"expected {wanted} positive integers, got {value!r}")
        return numbers

    return parse


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def unit_interval(upper_open: bool = False) -> Callable[[str], float]:
    """Parser of a number in [0, 1] (or [0, 1) with ``upper_open``)."""

    def parse(value: str) -> float:
        number = float(value)
        if not (0 <= number < 1 if upper_open else 0 <= number <= 1):
            raise argparse.ArgumentTypeError(f"expected a number in [0, {'1)' if upper_open else '1]'}, got {value!r}")
        return number

    return parse


def add_common_arguments(parser: argparse.ArgumentParser, mode: str) -> None:
    """Flags of all three scripts (published names and defaults, plus device, seed and network shape)."""
    parser.add_argument("--root", required=True, help="dataset folder (imagesTr, labelsTr, imagesVal, ...)")
    parser.add_argument("--output", required=True, help="folder for weights, logs or predictions")
    parser.add_argument(
        "--dataset",
        default="flare",
        help="flare, amos, feta, or a dataset JSON file (labels, spacing, intensity, lists)",
    )
    parser.add_argument("--datalist", default=None, help="MSD-style JSON whose training/validation/test lists to use")
    parser.add_argument("--network", default="REPUXNET", help=f"one of: {', '.join(available_networks())}")
    parser.add_argument("--mode", default=mode, choices=[mode], help=f"kept for the published scripts ({mode})")
    parser.add_argument("--gpu", type=int, default=0, help="CUDA device index (default 0)")
    parser.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when available, else CPU"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--roi_size",
        type=int_list(allowed=(1, 3)),
        default=(96,),
        help="patch / sliding-window size: one or three integers (default 96)",
    )
    parser.add_argument(
        "--feat_size",
        type=int_list(4),
        default=None,
        help="encoder channels, e.g. 48,96,192,384 (default: the network's published value)",
    )
    parser.add_argument(
        "--kernel_size",
        type=positive_int,
        default=None,
        help="depthwise kernel size of the UX-Net family (default: published, 21 for RepUX-Net)",
    )
    parser.add_argument(
        "--hidden_size",
        type=positive_int,
        default=None,
        help="bottleneck / transformer width (default: the network's published value)",
    )
    parser.add_argument(
        "--amp",
        nargs="?",
        const="bf16",
        default=None,
        choices=["bf16", "fp16"],
        help="mixed precision: --amp (bf16, CPU or CUDA) or --amp fp16 (CUDA, with a gradient scaler)",
    )
    parser.add_argument(
        "--dwconv",
        default="auto",
        choices=["auto", "native", "fft"],
        help="depthwise large-kernel convolution algorithm (default auto: per device and kernel)",
    )
    parser.add_argument("--cache_rate", type=unit_interval(), default=0.1, help="fraction of cases cached in memory")
    parser.add_argument("--num_workers", type=int, default=2, help="data-loading worker processes")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of main_train.py and main_finetune.py."""
    parser.add_argument("--pretrain", type=str2bool, default=False, help="load --pretrained_weights (true/false)")
    parser.add_argument("--pretrained_weights", default="", help="state_dict to start from when --pretrain true")
    parser.add_argument("--batch_size", type=positive_int, default=1, help="subjects per step (default 1)")
    parser.add_argument("--crop_sample", type=positive_int, default=2, help="random crops per subject (default 2)")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    parser.add_argument("--optim", default="AdamW", help="AdamW, Adam or SGD (default AdamW)")
    parser.add_argument(
        "--lr_schedule",
        default="constant",
        choices=["constant", "warmup_cosine"],
        help="constant (published) or linear warm-up then cosine decay",
    )
    parser.add_argument("--warmup_iter", type=int, default=0, help="warm-up iterations of warmup_cosine")
    parser.add_argument("--max_iter", type=positive_int, default=60000, help="training iterations (default 60000)")
    parser.add_argument("--eval_step", type=positive_int, default=500, help="validate every N iterations")
    parser.add_argument("--sw_batch_size", type=positive_int, default=2, help="sliding-window batch in validation")
    parser.add_argument(
        "--fold",
        type=int,
        default=None,
        help="cross-validation: validate on fold K of the training cases (for datasets without a validation list)",
    )
    parser.add_argument("--num_folds", type=int, default=5, help="folds for --fold (default 5)")
    parser.add_argument(
        "--resume",
        default=None,
        help="continue a run: a checkpoint_last.pth, or auto for <output>/checkpoint_last.pth (fresh start if none)",
    )
    parser.add_argument(
        "--max_bad_steps",
        type=positive_int,
        default=10,
        help="stop after this many non-finite losses in a row (each one skips its update; default 10)",
    )
    parser.add_argument(
        "--cache_dir",
        default=None,
        help="cache the deterministic part of each case on disk here (MONAI PersistentDataset), reused across runs",
    )
    parser.add_argument(
        "--gpu_transforms",
        action="store_true",
        help="run the random crops, intensity shift and affine on the GPU (CUDA only)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="train into an --output that already holds best_metric_model.pth"
    )
