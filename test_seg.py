"""Segment images with trained weights; writes <case>_seg.nii.gz in each input's geometry.

The images: --input (NIfTI files and folders, no dataset layout needed) or the test cases of a dataset
(--root, --dataset). With a model card beside the weights (written by training), the card decides the
network, its classes, the ROI and the preprocessing (channels, normalisation, spacing). Several
--trained_weights make an ensemble (probabilities averaged), exports (model.ts, model.onnx) among them; --tta
adds the mirrorings each model was trained with (left/right class pairs swapped back).
"""

import engine
from cli import inference_parser, run_or_exit


def main(argv=None) -> None:
    parser = inference_parser(__doc__)
    args = parser.parse_args(argv)
    if not args.trained_weights and not args.plan:
        parser.error("the following arguments are required: --trained_weights (or --plan)")
    run_or_exit(engine.run_inference, args)  # the engine, PyTorch with it, loads only now


if __name__ == "__main__":
    main()
