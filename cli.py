"""Command-line flags shared by main_train.py, main_finetune.py and test_seg.py.

The scripts parse their flags before PyTorch and MONAI are loaded (``--help`` in well under a second):
this module imports the registry's names only, and the checks that need the dataset or engine modules
import them when they run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from networks import available_networks

__all__ = [
    "add_common_arguments",
    "add_training_arguments",
    "inference_parser",
    "parser_for",
    "run_or_exit",
    "str2bool",
]


def run_or_exit(command: Callable, args: argparse.Namespace) -> None:
    """Run a script's command; a problem the user must fix ends it with one ``error:`` line and exit 1,
    a run stopped on purpose with its message and exit code (130 for Ctrl-C, also where no step of the
    command says what it stopped: one line, never a traceback)."""
    from dataset.description import DatasetError
    from engine.common import RunStopped, UsageError

    try:
        command(args)
    except (DatasetError, UsageError) as error:
        sys.exit(f"error: {error}")
    except RunStopped as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(stopped.exit_code)
    except KeyboardInterrupt as stopped:
        print(str(stopped) or "stopped by SIGINT", file=sys.stderr)
        sys.exit(130)


def str2bool(value: str) -> bool:
    """A real boolean flag value: true/false, yes/no, 1/0 (case-insensitive)."""
    lowered = str(value).strip().lower()
    if lowered in ("true", "t", "yes", "y", "1"):
        return True
    if lowered in ("false", "f", "no", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def int_list(count: int):
    """Parser of ``count`` comma-separated positive integers."""

    def parse(value: str) -> tuple[int, ...]:
        try:
            numbers = tuple(int(v) for v in str(value).replace(" ", "").split(",") if v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
        if len(numbers) != count or any(n < 1 for n in numbers):
            raise argparse.ArgumentTypeError(f"expected {count} positive integers, got {value!r}")
        return numbers

    return parse


def mirror_axes(value: str) -> tuple[int, ...]:
    """``--mirror_axes`` / ``--tta_axes``: comma-separated spatial axes (0, 1, 2; after reorientation to RAS),
    or ``none``."""
    from dataset.laterality import check_mirror_axes

    if value.strip().lower() == "none":
        return ()
    try:
        return check_mirror_axes((int(v) for v in value.replace(" ", "").split(",") if v), value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected spatial axes such as 0,1,2 (0 left-right, 1 posterior-anterior, 2 inferior-superior) or "
            f"none, got {value!r}"
        ) from None


def roi_size(value: str) -> tuple[int, int, int]:
    """``--roi_size``: one or three positive integers (see :func:`engine.common.roi_of`)."""
    from engine.common import roi_of

    try:
        return roi_of(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


class HelpWithDefaults(argparse.HelpFormatter):
    """Help that ends each option with its default, unless the text already says where it comes from."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return text
        return f"{text} (default: %(default)s)"


def parser_for(description: str) -> argparse.ArgumentParser:
    """The argument parser of a script, with every default shown in ``--help``."""
    return argparse.ArgumentParser(description=description, formatter_class=HelpWithDefaults)


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value!r}")
    return number


def positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return number


def fold(value: str) -> int | str:
    """``--fold``: a fold number (0, 1, ...) or ``all``."""
    if value.strip().lower() == "all":
        return "all"
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a fold number (0, 1, ...) or all, got {value!r}")
    return number


def unit_interval(upper_open: bool = False) -> Callable[[str], float]:
    """Parser of a number in [0, 1] (or [0, 1) with ``upper_open``)."""

    def parse(value: str) -> float:
        number = float(value)
        if not (0 <= number < 1 if upper_open else 0 <= number <= 1):
            raise argparse.ArgumentTypeError(f"expected a number in [0, {'1)' if upper_open else '1]'}, got {value!r}")
        return number

    return parse


#: test_seg.py: what the model card beside the weights decides, when there is one.
CARD_DECIDES = {
    "dataset": "flare, amos, feta, or a dataset JSON file (Decathlon, nnU-Net v2 or this repository's): where the "
    "test files are; its preprocessing only for weights without a model card (default: --root's dataset.json, "
    "else flare)",
    "network": "network of weights without a model card (default: the card's, else REPUXNET)",
    "network_args": "constructor arguments (JSON) of weights without a model card (default: the card's)",
    "roi_size": "sliding-window size, one or three integers (default: the model card's, else 96)",
    "feat_size": "encoder channels of weights without a model card (default: the card's, else published)",
    "kernel_size": "depthwise kernel size of weights without a model card (default: the card's, else published)",
    "hidden_size": "bottleneck width of weights without a model card (default: the card's, else published)",
}


def add_common_arguments(parser: argparse.ArgumentParser, mode: str) -> None:
    """Flags of all three scripts (published names and defaults, plus device, seed and network shape);
    ``mode="test"`` (test_seg.py) says which of them a model card decides."""
    card = CARD_DECIDES if mode == "test" else {}
    parser.add_argument(
        "--root",
        default=None,
        help="dataset folder (imagesTr, labelsTr, imagesVal, ...; default: the folder of a dataset JSON given as "
        "--dataset)",
    )
    parser.add_argument(
        "--output",
        required=True,
        help="folder for the segmentations (with --evaluate, the reports too)"
        if card
        else "folder for the run: weights and their model card, checkpoint_last.pth, TensorBoard logs",
    )
    parser.add_argument(
        "--dataset",
        default=None if card else "flare",
        help=card.get(
            "dataset",
            "flare, amos, feta, or a dataset JSON file: a Decathlon or nnU-Net v2 dataset.json, or this repository's "
            "(see TRAINING.md, 'Your own dataset')",
        ),
    )
    parser.add_argument(
        "--datalist",
        default=None,
        help="MSD-style JSON whose training/validation/test lists to use (default: none, the folders)",
    )
    parser.add_argument(
        "--network",
        default=None if card else "REPUXNET",
        help=card.get(
            "network",
            f"one of: {', '.join(available_networks())}; or a network of your own, path/to/file.py:ClassName or "
            "package.module:ClassName (TRAINING.md, 'Your own network')",
        ),
    )
    parser.add_argument(
        "--network_args",
        default=None,
        help=card.get(
            "network_args",
            "constructor arguments as a JSON object, e.g. '{\"width\": 16}' (for a network of your own also "
            '"in_channels_arg" / "out_channels_arg": its names of the channel counts); default: none',
        ),
    )
    parser.add_argument("--mode", default=mode, choices=[mode], help=argparse.SUPPRESS)  # the published flag
    parser.add_argument("--gpu", type=int, default=0, help="CUDA device index")
    parser.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when available, else CPU"
    )
    # Inference draws nothing at random: test_seg.py accepts the published --seed without showing it.
    seed_help = argparse.SUPPRESS if card else "random seed (initialisation, data order, augmentation)"
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument(
        "--roi_size",
        type=roi_size,
        default=None if card else "96",
        help=card.get("roi_size", "patch / sliding-window size: one or three integers"),
    )
    parser.add_argument(
        "--feat_size",
        type=int_list(4),
        default=None,
        help=card.get("feat_size", "encoder channels, e.g. 48,96,192,384 (default: the network's published value)"),
    )
    parser.add_argument(
        "--kernel_size",
        type=positive_int,
        default=None,
        help=card.get(
            "kernel_size",
            "depthwise kernel size of the UX-Net family (default: published, 21 for RepUX-Net, 7 for 3D UX-Net)",
        ),
    )
    parser.add_argument(
        "--hidden_size",
        type=positive_int,
        default=None,
        help=card.get("hidden_size", "bottleneck / transformer width (default: the network's published value)"),
    )
    parser.add_argument(
        "--amp",
        nargs="?",
        const="bf16",
        default=None,
        choices=["bf16", "fp16"],
        help="mixed precision of the network: --amp (bf16, CPU or CUDA) or --amp fp16 (CUDA); default: fp32"
        if card
        else "mixed precision: --amp (bf16, CPU or CUDA) or --amp fp16 (CUDA, with a gradient scaler); default: fp32",
    )
    parser.add_argument(
        "--dwconv",
        default="auto",
        choices=["auto", "native", "fft"],
        help="depthwise large-kernel convolution algorithm (auto: per device and kernel)",
    )
    parser.add_argument(
        "--cache_rate",
        type=unit_interval(),
        default=0.1,
        help="fraction of the cases to segment held in memory once preprocessed"
        if card
        else "fraction of the training cases cached in memory, preprocessed",
    )
    parser.add_argument("--num_workers", type=int, default=2, help="data-loading worker processes")


def add_training_arguments(parser: argparse.ArgumentParser, finetune: bool = False) -> None:
    """Flags of main_train.py and, with ``finetune``, of main_finetune.py (which needs weights to start from,
    and takes ``--pretrain false`` to mean training from scratch)."""
    if finetune:
        parser.add_argument(
            "--pretrain",
            type=str2bool,
            default=None,
            help="false: train from scratch instead of fine-tuning (default: true)",
        )
        parser.add_argument(
            "--pretrained_weights",
            default=None,
            help="weights to fine-tune (no default: required unless --pretrain false)",
        )
        parser.add_argument(
            "--pretrain_classes",
            type=positive_int,
            default=None,
            help="outputs of the pretrained model's head, its classes or regions (default: as its weights have "
            "them); checked against the weights",
        )
        parser.add_argument(
            "--head",
            default=None,
            choices=["mapped", "fresh"],
            help="the new output head: mapped (each output starts from the old output of its name, or of its name "
            "without its side; the default where the pretrained model's card names its outputs) or fresh "
            "(all new, as published)",
        )
        parser.add_argument(
            "--freeze_steps",
            type=non_negative_int,
            default=0,
            help="a frozen start: the first N steps train only what the pretrained weights did not give (the head, "
            "a new stem); then everything, the learning-rate schedule starting there (default 0)",
        )
        parser.add_argument(
            "--encoder_lr_scale",
            type=positive_float,
            default=1.0,
            help="the pretrained weights train at this times --lr, the new head (and stem) at --lr (default 1)",
        )
    else:
        parser.add_argument("--pretrain", type=str2bool, default=False, help="load --pretrained_weights (true/false)")
        parser.add_argument(
            "--pretrained_weights", default=None, help="state_dict to start from when --pretrain true (default: none)"
        )
    parser.add_argument(
        "--channel_init",
        default=None,
        help="pretrained weights of other input channels: repeat (each new channel takes the old kernels' sum "
        "divided by the new count) or copy:NEW=OLD,... (each dataset channel the kernel of a pretrained one, by "
        "name or number); default: the channels must match",
    )
    parser.add_argument("--batch_size", type=positive_int, default=1, help="subjects per step")
    parser.add_argument("--crop_sample", type=positive_int, default=2, help="random crops per subject")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate")
    parser.add_argument("--optim", default="AdamW", help="AdamW, Adam or SGD")
    parser.add_argument(
        "--lr_schedule",
        default="constant",
        choices=["constant", "warmup_cosine"],
        help="constant (published) or linear warm-up then cosine decay",
    )
    parser.add_argument("--warmup_iter", type=int, default=0, help="warm-up iterations of warmup_cosine")
    parser.add_argument("--max_iter", type=positive_int, default=60000, help="training iterations")
    parser.add_argument("--eval_step", type=positive_int, default=500, help="validate every N iterations")
    parser.add_argument(
        "--select",
        default="best",
        choices=["best", "ema", "last"],
        help="which validation's weights are best_metric_model.pth: best, the best mean Dice (the default, as "
        "published); ema, the best exponential moving average of it (0.9 old + 0.1 new, as nnU-Net); or last",
    )
    parser.add_argument(
        "--patience",
        type=positive_int,
        default=None,
        help="stop after this many validations without a better selection score (default: never)",
    )
    parser.add_argument("--sw_batch_size", type=positive_int, default=2, help="sliding-window batch in validation")
    parser.add_argument(
        "--fold",
        type=fold,
        default=None,
        help="cross-validation: validate on fold K of the training cases, or all: train on every training case "
        "without validation, the final weights being the model (default: none; for datasets without a validation "
        "list)",
    )
    parser.add_argument("--num_folds", type=int, default=5, help="folds for --fold")
    parser.add_argument(
        "--held_out",
        default="final",
        choices=["final", "best", "none"],
        help="a --fold K run ends by segmenting its held-out cases into <output>/validation/ (probabilities and "
        "scores, for crossval.py) with its final weights, or its best checkpoint (selected on those very cases), "
        "or not at all",
    )
    parser.add_argument(
        "--resume",
        default=None,
        help="continue a run: a checkpoint_last.pth, or auto for <output>/checkpoint_last.pth (default: a new run)",
    )
    parser.add_argument(
        "--max_bad_steps",
        type=positive_int,
        default=10,
        help="stop after this many non-finite losses or gradients in a row (each one skips its update)",
    )
    parser.add_argument(
        "--cache_dir",
        default=None,
        help="cache the deterministic part of each case on disk here, reused across runs (default: none)",
    )
    parser.add_argument(
        "--mirror_axes",
        type=mirror_axes,
        default=None,
        help="mirror each training crop along these spatial axes after reorientation to RAS (0 left-right, 1 "
        "posterior-anterior, 2 inferior-superior), each with probability 1/2, left/right class pairs swapped on "
        "left-right flips; or none (default: the dataset's: 0,1,2 for a dataset JSON, none for the presets, as "
        "published)",
    )
    parser.add_argument(
        "--foreground_crops",
        choices=["voxels", "classes"],
        default=None,
        help="centre the foreground crops on any labelled voxel alike (voxels, as published: each class in "
        "proportion to its volume) or on a class present in the case, each alike, then a voxel of it (classes, "
        "as nnU-Net; default: the dataset's, voxels unless its JSON says 'foreground_crops')",
    )
    parser.add_argument(
        "--gpu_transforms",
        action="store_true",
        help="run the random crops, intensity shift and affine on the GPU (CUDA only)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="train into an --output that already holds best_metric_model.pth"
    )


def inference_parser(description: str) -> argparse.ArgumentParser:
    """test_seg.py's flags (also what a fold run and crossval.py pass to segment a fold's held-out cases)."""
    from engine.formats import ONNX_RUNTIMES

    parser = parser_for(description)
    add_common_arguments(parser, mode="test")
    parser.add_argument(
        "--trained_weights",
        nargs="+",
        default=None,
        help="weights to segment with (best_metric_model.pth, or export.py's model.ts or model.onnx with their card); "
        "several: an ensemble, their probabilities averaged (required without --plan)",
    )
    parser.add_argument(
        "--plan",
        default=None,
        help="a study's plan.json (crossval.py): its weights, mirroring and keep-largest postprocessing, as chosen on "
        "the out-of-fold predictions (default: none)",
    )
    parser.add_argument(
        "--input",
        nargs="+",
        default=None,
        help="NIfTI files and folders of them to segment, instead of --root's test cases (default: none)",
    )
    parser.add_argument(
        "--labels", default=None, help="with --input and --evaluate: folder of <case>.nii.gz labels (default: none)"
    )
    parser.add_argument(
        "--tta",
        action="store_true",
        help="test-time mirroring along the axes each model was mirrored along in training (its model card's; "
        "every combination a pass, probabilities averaged, left/right class pairs swapped back); none for a model "
        "trained without mirroring",
    )
    parser.add_argument(
        "--tta_axes",
        type=mirror_axes,
        default=None,
        help="test-time mirroring along these spatial axes for every model, whatever it was trained with (0 "
        "left-right, 1 posterior-anterior, 2 inferior-superior; implies --tta), or none (default: the model "
        "cards')",
    )
    parser.add_argument(
        "--save_probabilities",
        action="store_true",
        help="also write <case>_probabilities.npz: float16 class (or region) probabilities in the input's geometry",
    )
    parser.add_argument(
        "--keep_largest",
        default=None,
        help="keep the largest connected component of these classes, in this order, e.g. 1,3 (of a region model: "
        "region numbers, 1 the first); 1+2+3 keeps those label values as one, foreground every foreground value as "
        "one; or all (every class on its own; default: none)",
    )
    parser.add_argument(
        "--runtime",
        default="onnxruntime",
        choices=ONNX_RUNTIMES,
        help="what runs a model.onnx: ONNX Runtime (CPU or CUDA), or OpenVINO (CPU; float32, or its bf16 default "
        "with --amp: the fastest CPU route measured, see BENCHMARKS.md)",
    )
    parser.add_argument("--sw_batch_size", type=positive_int, default=4, help="sliding-window batch")
    parser.add_argument("--overlap", type=unit_interval(upper_open=True), default=0.5, help="sliding-window overlap")
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="with labels (labelsTs or a labelled test list): Dice, HD95 and NSD per case and class (or region), in mm",
    )
    parser.add_argument(
        "--label_map",
        default=None,
        help="evaluate model classes as test labels, e.g. 3:1 (FLARE liver as label 1; others background; "
        "default: none)",
    )
    parser.add_argument(
        "--source",
        default=None,
        help="with a union --dataset: segment that source's test cases and score them on its labels (a label "
        "holding several classes scores their union; default: the union's own test list)",
    )
    parser.add_argument("--nsd_tolerance", type=float, default=1.0, help="NSD tolerance in mm")
    parser.add_argument(
        "--memory_limit",
        type=positive_float,
        default=None,
        help="GB of memory the run may take, this process and its data-loading workers together; a run whose "
        "estimate (from the images' headers) exceeds it is refused before any image is read (default: the memory "
        "available to this process, the container's limit included)",
    )
    return parser
