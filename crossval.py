"""A cross-validation study in one command: configurations compared on their out-of-fold predictions, an
ensemble and keep-largest postprocessing chosen on them as nnU-Net v2 chooses, written as a plan.

    python crossval.py --output runs/study --configuration repuxnet runs/rep_fold0 runs/rep_fold1 runs/rep_fold2 \\
        --configuration uxnet runs/ux_fold0 runs/ux_fold1 runs/ux_fold2
    python test_seg.py --plan runs/study/plan.json --root path_to_data --output predictions

Each configuration is a name and its --fold run folders (main_train.py --fold K): their held-out cases,
segmented by each run when it ended (<run>/validation/), or now for a run trained before that. Writes
report.md (the tables), dice_per_configuration.png, scores.csv (every candidate's Dice per case), the
chosen candidate's postprocessed out-of-fold label maps (predictions/) and plan.json (the weights, the
mirroring and the postprocessing that test_seg.py --plan and export.py --plan apply).
"""

from cli import parser_for, positive_int, run_or_exit


def main(argv=None) -> None:
    parser = parser_for(__doc__)
    parser.add_argument("--output", required=True, help="folder for the study: report.md, plan.json, ...")
    parser.add_argument(
        "--configuration",
        nargs="+",
        action="append",
        required=True,
        metavar="NAME RUN",
        help="a configuration's name and its fold run folders; give one --configuration per configuration",
    )
    parser.add_argument(
        "--checkpoint",
        default="final",
        choices=["final", "best"],
        help="the weights each fold is scored with: its final weights (nnU-Net's choice), or its best checkpoint "
        "(selected on the very cases it is scored on: optimistic, and marked so)",
    )
    parser.add_argument(
        "--max_ensemble", type=positive_int, default=2, help="ensembles of up to this many configurations are tried"
    )
    parser.add_argument(
        "--min_gain",
        type=float,
        default=0.0,
        help="keep a postprocessing step only where the Dice it raises rises by more than this (0: nnU-Net's rule)",
    )
    parser.add_argument(
        "--held_out_only",
        action="store_true",
        help="only segment the held-out cases of the runs given (those not segmented yet, such as runs trained "
        "before the held-out step), without a study; any number of folds",
    )
    parser.add_argument(
        "--root", default=None, help="for runs trained before fold.json: the dataset folder they trained on"
    )
    parser.add_argument("--dataset", default=None, help="for runs trained before fold.json: their --dataset")
    parser.add_argument("--datalist", default=None, help="for runs trained before fold.json: their --datalist")
    parser.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="where held-out cases are segmented"
    )
    parser.add_argument("--num_workers", type=int, default=2, help="data-loading workers of that segmentation")
    args = parser.parse_args(argv)
    args.inference_flags = ["--device", args.device, "--num_workers", str(args.num_workers)]
    from engine.crossval import run_study  # PyTorch loads only now

    run_or_exit(run_study, args)


if __name__ == "__main__":
    main()
