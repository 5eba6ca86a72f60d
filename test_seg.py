"""Segment images with trained weights; writes <case>_seg.nii.gz in each input's geometry.

The images: --input (NIfTI files and folders, no dataset layout needed) or the test cases of a dataset
(--root, --dataset). With a model card beside the weights (written by training), the card decides the
network, its classes, the ROI and the preprocessing (channels, normalisation, spacing). Several
--trained_weights make an ensemble (probabilities averaged), exports (model.ts, model.onnx) among them; --tta
adds the mirrorings each model was trained with (left/right class pairs swapped back).
"""

import engine
from cli import (
    add_common_arguments,
    mirror_axes,
    parser_for,
    positive_float,
    positive_int,
    run_or_exit,
    unit_interval,
)
from engine.formats import ONNX_RUNTIMES


def main(argv=None) -> None:
    parser = parser_for(__doc__)
    add_common_arguments(parser, mode="test")
    parser.add_argument(
        "--trained_weights",
        required=True,
        nargs="+",
        help="weights to segment with (best_metric_model.pth, or export.py's model.ts or model.onnx with their card); "
        "several: an ensemble, their probabilities averaged",
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
        help="keep the largest connected component of these classes, e.g. 1,3 (of a region model: region numbers, "
        "1 the first), or all (default: none)",
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
    parser.add_argument("--nsd_tolerance", type=float, default=1.0, help="NSD tolerance in mm")
    parser.add_argument(
        "--memory_limit",
        type=positive_float,
        default=None,
        help="GB of memory the run may take, this process and its data-loading workers together; a run whose "
        "estimate (from the images' headers) exceeds it is refused before any image is read (default: the memory "
        "available to this process, the container's limit included)",
    )
    args = parser.parse_args(argv)
    run_or_exit(engine.run_inference, args)  # the engine, PyTorch with it, loads only now


if __name__ == "__main__":
    main()
