"""Export trained weights for use outside this repository: TorchScript (model.ts), ONNX (model.onnx) and a
MONAI bundle (bundle/), each the network's deploy form (BFR kernels folded, every depthwise convolution a
native conv3d) with its model card beside it. Every export is checked against the training-form network
on random inputs before anything is written."""

import engine
from cli import parser_for, positive_int, run_or_exit, unit_interval
from engine.formats import FORMATS, OPSET, TOLERANCE


def main(argv=None) -> None:
    parser = parser_for(__doc__)
    parser.add_argument(
        "--trained_weights",
        required=True,
        help="weights with their model card beside them (best_metric_model.pth), or a training checkpoint",
    )
    parser.add_argument("--output", required=True, help="folder for model.ts, model.onnx, bundle/ and their cards")
    parser.add_argument(
        "--formats",
        nargs="+",
        choices=FORMATS,
        default=list(FORMATS),
        help=f"what to write (onnx: opset {OPSET}, needs pip install -r requirements-deploy.txt)",
    )
    parser.add_argument("--sw_batch_size", type=positive_int, default=4, help="the bundle's sliding-window batch")
    parser.add_argument(
        "--overlap", type=unit_interval(upper_open=True), default=0.5, help="the bundle's sliding-window overlap"
    )
    parser.add_argument(
        "--plan",
        default=None,
        help="a study's plan.json (crossval.py): the bundle applies its keep-largest postprocessing (default: none)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace exports already in --output")
    parser.epilog = (
        f"An export whose output differs from the training form's by more than {TOLERANCE:g} relative is not written."
    )
    args = parser.parse_args(argv)
    run_or_exit(engine.run_export, args)  # the engine, PyTorch with it, loads only now


if __name__ == "__main__":
    main()
