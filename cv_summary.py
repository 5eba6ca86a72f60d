"""Collect the best validation Dice of cross-validation folds into mean and standard deviation.

    python cv_summary.py runs/flare_fold0 runs/flare_fold1 runs/flare_fold2 runs/flare_fold3 runs/flare_fold4
    python cv_summary.py runs/flare_fold*        # the shell expands the folders

Each folder is a training ``--output`` holding ``best_metric_model.pth.json`` (written with the best
weights). Prints a markdown table and, with ``--json``, writes the summary there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from engine import BEST_WEIGHTS, model_card_path


def collect(folders: list[str]) -> dict:
    """Best mean Dice (and its step) of each fold folder, with their mean and population std."""
    folds = []
    for folder in folders:
        card_path = model_card_path(Path(folder) / BEST_WEIGHTS)
        if not card_path.is_file():
            raise ValueError(f"{folder}: no {card_path.name} (is this a training --output?)")
        try:
            card = json.loads(card_path.read_text())
            folds.append({"folder": str(folder), "best_dice": float(card["best_metric"]), "step": card["best_step"]})
        except (ValueError, KeyError) as error:
            raise ValueError(f"{card_path}: not a model card with best_metric ({error})") from None
    scores = [fold["best_dice"] for fold in folds]
    return {"folds": folds, "mean": statistics.fmean(scores), "std": statistics.pstdev(scores), "n": len(scores)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="training output folders, one per fold")
    parser.add_argument("--json", default=None, help="also write the summary to this JSON file")
    args = parser.parse_args(argv)
    try:
        summary = collect(args.folders)
    except ValueError as error:
        sys.exit(f"error: {error}")
    print("| fold folder | best mean Dice | step |\n|---|---|---|")
    for fold in summary["folds"]:
        print(f"| {fold['folder']} | {fold['best_dice']:.4f} | {fold['step']} |")
    print(f"| **mean ± std ({summary['n']} folds)** | {summary['mean']:.4f} ± {summary['std']:.4f} | |")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
