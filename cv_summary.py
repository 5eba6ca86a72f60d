"""Collect the best validation Dice of cross-validation folds into mean and standard deviation.

    python cv_summary.py runs/flare_fold0 runs/flare_fold1 runs/flare_fold2 runs/flare_fold3 runs/flare_fold4
    python cv_summary.py runs/flare_fold*        # the shell expands the folders

Each folder is a training ``--output`` holding ``best_metric_model.pth.json`` (written with the best
weights). Prints a markdown table and, with ``--json``, writes the summary there. This is the published
number: each fold's best checkpoint, chosen on the very cases it is scored on (optimistic by construction);
``crossval.py`` scores the folds' held-out predictions instead, and compares configurations on them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="training output folders, one per fold")
    parser.add_argument("--json", default=None, help="also write the summary to this JSON file")
    args = parser.parse_args(argv)
    from engine.crossval import best_checkpoint_summary

    try:
        summary = best_checkpoint_summary(args.folders)
    except ValueError as error:
        sys.exit(f"error: {error}")
    print("| fold folder | best mean Dice | step |\n|---|---|---|")
    for fold in summary["folds"]:
        print(f"| {fold['folder']} | {fold['best_dice']:.4f} | {fold['step']} |")
    print(f"| **mean ± std ({summary['n']} folds)** | {summary['mean']:.4f} ± {summary['std']:.4f} | |")
    print(
        "note: each fold's best checkpoint, chosen on the cases it is scored on; crossval.py --output STUDY "
        "--configuration NAME FOLDERS scores their held-out predictions (and compares configurations)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
