"""Training on a union of datasets that annotate different classes, on the two-source phantom
(``phantom.py --union``): the per-class test Dice of (a) the union with the label-set loss, (b) naive
merging (the classes a source does not annotate trained as its background) and (c) one model trained on the
same cases with every class labelled, at equal steps, each scored by ``test_seg.py --evaluate`` on the same
fully labelled test cases (the union's runs without pseudo-labels: ``"pseudo_labels": false``; the foreground
crops of every run but (g) follow ``--foreground_crops``); and (d), the control of the pancreas, which only the
``kidneys`` source labels: one model trained on that source's training cases with every class labelled (the
pancreas annotations the union has); (e) the union with the ``kidneys`` source drawn twice as often (its
``weight`` 2); (f) the union with the loss's pseudo-labels (``"pseudo_labels": 0.9``, or the threshold
``--pseudo_labels`` gives); and, only when ``--only`` names it, (g) ``defaults``: ``union.json`` trained as a
user's command trains it, with the union's defaults (pseudo-labels above 0.9, class-drawn crops) and no
``--foreground_crops``.

    python bench/bench_union.py --json bench/results/union_cpu.json
    python bench/bench_union.py --max_iter 2000 --only union,full --json bench/results/union_2000_cpu.json
    python bench/bench_union.py --only full8 --json bench/results/union_full8_cpu.json
    python bench/bench_union.py --only union,full,full8 --seed 1 --json bench/results/union_seed1_cpu.json
    python bench/bench_union.py --only weighted --json bench/results/union_weighted_cpu.json
    python bench/bench_union.py --only pseudo --json bench/results/union_pseudo_cpu.json
    python bench/bench_union.py --only pseudo --seed 1 --json bench/results/union_pseudo_seed1_cpu.json
    python bench/bench_union.py --only union,pseudo,full --seed 2 --json bench/results/union_pseudo_seed2_cpu.json
    python bench/bench_union.py --only pseudo --pseudo_labels 0.5 --json bench/results/union_pseudo50_cpu.json
    python bench/bench_union.py --only pseudo --pseudo_labels 0.97 --json bench/results/union_pseudo97_cpu.json
    python bench/bench_union.py --only full8 --seed 2 --json bench/results/union_full8_seed2_cpu.json
    python bench/bench_union.py --only pseudo --max_iter 2000 --json bench/results/union_pseudo_2000_cpu.json
    python bench/bench_union.py --only full8 --max_iter 2000 --json bench/results/union_full8_2000_cpu.json
    python bench/bench_union.py --only full8,pseudo --max_iter 2000 --seed 1
        --json bench/results/union_2000_seed1_cpu.json
    python bench/bench_union.py --only pseudo,full8,full --max_iter 2000 --seed 2
        --json bench/results/union_2000_seed2_cpu.json

``--num_train N`` writes the phantom with N training cases per source (default 8) in ``data/union<N>`` and
trains in ``runs/union_bench<N>``:

    python bench/bench_union.py --num_train 24 --only union,pseudo,full --json bench/results/union24_cpu.json
    python bench/bench_union.py --num_train 24 --only naive --json bench/results/union24_naive_cpu.json
    python bench/bench_union.py --num_train 24 --only union,pseudo,full --seed 1
        --json bench/results/union24_seed1_cpu.json
    python bench/bench_union.py --num_train 24 --only pseudo,full --seed 2 --json bench/results/union24_seed2_cpu.json
    python bench/bench_union.py --num_train 24 --only pseudo,full --seed 3 --json bench/results/union24_seed3_cpu.json

``--foreground_crops classes`` trains every run with nnU-Net's class-drawn foreground crops (seeds 0-3 alike):

    python bench/bench_union.py --num_train 24 --only pseudo,full --seed 0 --foreground_crops classes
        --json bench/results/union24_classes_seed0_cpu.json

The union as a user trains it (``union.json``, its defaults) beside the fully labelled model with the same crops:

    python bench/bench_union.py --num_train 24 --only defaults,full --seed 0 --foreground_crops classes
        --json bench/results/union24_defaults_seed0_cpu.json

``--select last`` trains every run with ``main_train.py --select last``: each model is its final step's
weights (the default, ``best``, keeps the best validation's, which may be an earlier step's):

    python bench/bench_union.py --only pseudo,full,full8 --select last --json bench/results/union_last_cpu.json

``--training_cases`` also segments the training cases (``full/``, every class labelled) with each run's
model and reports, per source whose cases they are, each class's Dice and its predicted volume over the
labelled one: where a class one source lacks is learnt (or lost), case by case. ``--reuse`` scores a run
already trained in its folder instead of training it again:

    python bench/bench_union.py --only union,pseudo,full,full8 --seed 2 --reuse --training_cases
        --json bench/results/union_training_cases_seed2_cpu.json
    python bench/bench_union.py --only union,pseudo,full,full8 --max_iter 2000 --reuse --training_cases
        --json bench/results/union_training_cases_2000_cpu.json
    python bench/bench_union.py --only pseudo,full8 --max_iter 2000 --seed 1 --reuse --training_cases
        --json bench/results/union_training_cases_2000_seed1_cpu.json
    python bench/bench_union.py --only full --max_iter 2000 --seed 1 --training_cases
        --json bench/results/union_full_2000_seed1_cpu.json

(an indented line continues the command above it). Each run is the CPU demo configuration of ``demo.sh``
(RepUX-Net, 21^3 kernels with BFR, ROI 32); the commands are printed as they run.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (it puts the repository on the path)

from dataset.cases import case_name  # noqa: E402
from engine.common import model_card_path  # noqa: E402

#: name: (the --only key, the dataset the run trains on)
RUNS = {
    "union, label-set loss": ("union", "union_plain.json"),
    "naive merging": ("naive", "union_naive.json"),
    "fully labelled": ("full", "full/dataset.json"),
    "fully labelled, the kidneys source's cases": ("full8", "full/dataset_kidneys.json"),
    "union, the kidneys source drawn twice as often": ("weighted", "union_weighted.json"),
    "union, pseudo-labels above 0.9": ("pseudo", "union_pseudo.json"),
    "union, its defaults": ("defaults", "union.json"),
}
#: The run that trains the union JSON as a user's command would: no --foreground_crops, the union's own.
DEFAULTS_RUN = "defaults"
NETWORK = ["--network", "REPUXNET", "--roi_size", "32", "--feat_size", "16,32,64,128", "--kernel_size", "21"]
NETWORK += ["--hidden_size", "128", "--lr", "1e-3", "--cache_rate", "1", "--device", "cpu"]


def _write_union_variants(data: Path, pseudo_labels: float) -> None:
    """``union_plain.json``: ``union.json`` without pseudo-labels, the plain label-set loss (the run
    ``union``); ``union_weighted.json``: that with the ``kidneys`` source (the only one labelling the
    pancreas) at weight 2, so that two batches in three supervise the pancreas (the run ``weighted``);
    ``union_pseudo.json``: with pseudo-labels above ``pseudo_labels`` (the run ``pseudo``)."""
    union = json.loads((data / "union.json").read_text())
    plain = {**union, "pseudo_labels": False}
    (data / "union_plain.json").write_text(json.dumps(plain, indent=2) + "\n")
    weighted = {**plain, "name": union["name"] + ", kidneys source weighted 2"}
    weighted["sources"] = [{**s, "weight": 2 if s["name"] == "kidneys" else 1} for s in union["sources"]]
    (data / "union_weighted.json").write_text(json.dumps(weighted, indent=2) + "\n")
    pseudo = {**union, "name": union["name"] + f", pseudo-labels above {pseudo_labels:g}"}
    pseudo["pseudo_labels"] = pseudo_labels
    (data / "union_pseudo.json").write_text(json.dumps(pseudo, indent=2) + "\n")


def write_kidneys_cases(data: Path) -> Path:
    """``full/dataset_kidneys.json`` under the union phantom ``data``: the ``kidneys`` source's training and
    validation cases with every class labelled (the control run ``full8``; bench_finetune.py's fine-tuning
    target); returns its path."""
    full = json.loads((data / "full" / "dataset.json").read_text())
    kidneys = json.loads((data / "kidneys" / "dataset.json").read_text())
    subset = {**full, "training": kidneys["training"], "validation": kidneys["validation"]}
    subset["numTraining"] = len(kidneys["training"])
    path = data / "full" / "dataset_kidneys.json"
    path.write_text(json.dumps(subset, indent=2) + "\n")
    return path


def write_training_cases_union(data: Path) -> Path:
    """``union_training.json`` under ``data``: ``union.json`` whose ``test`` list is the training cases of
    ``full/`` (every class labelled), for scoring a model on the cases it trained on; returns its path."""
    union = json.loads((data / "union.json").read_text())
    full = json.loads((data / "full" / "dataset.json").read_text())
    union["test"] = [
        {key: f"./full/{case[key].removeprefix('./')}" for key in ("image", "label")} for case in full["training"]
    ]
    path = data / "union_training.json"
    path.write_text(json.dumps(union, indent=2) + "\n")
    return path


def training_cases_by_source(data: Path, predictions: Path) -> dict[str, dict[str, dict[str, float]]]:
    """For each source of ``data/union.json``, over its training cases as segmented into ``predictions``
    (``test_seg.py --evaluate`` on :func:`write_training_cases_union`'s list): each class's mean Dice and its
    predicted volume over the labelled one (the voxels summed over the source's cases)."""
    union = json.loads((data / "union.json").read_text())
    classes = union["classes"]
    source_of = {}
    for source in union["sources"]:
        listing = json.loads((data / source["dataset"]).read_text())
        source_of.update({case_name(case["image"]): source["name"] for case in listing["training"]})
    dice: dict[tuple[str, str], list[float]] = {}
    with open(predictions / "metrics.csv", newline="") as rows:
        for row in csv.DictReader(rows):
            dice.setdefault((source_of[row["case"]], row["name"]), []).append(float(row["dice"]))
    # per source: voxels of each class value, predicted (row 0) and labelled (row 1)
    voxels = {source["name"]: np.zeros((2, len(classes)), np.int64) for source in union["sources"]}
    for case, source in source_of.items():
        for row, path in enumerate((predictions / f"{case}_seg.nii.gz", data / "full" / "labelsTr" / f"{case}.nii.gz")):
            values = np.asarray(nib.load(path).dataobj).astype(np.int64).ravel()
            voxels[source][row] += np.bincount(values, minlength=len(classes))[: len(classes)]
    return {
        source: {
            name: {"dice": float(np.mean(dice[source, name])), "volume_ratio": counts[0, value] / counts[1, value]}
            for value, name in enumerate(classes[1:], start=1)
        }
        for source, counts in voxels.items()
    }


def training_cases_table(results: list[dict]) -> str:
    """A row per run and source: each class's Dice on the source's training cases, with the predicted volume
    over the labelled one."""
    classes = list(results[0]["dice"])
    rows = [
        [result["run"], source, *(f"{by_class[c]['dice']:.3f} ({by_class[c]['volume_ratio']:.2f})" for c in classes)]
        for result in results
        for source, by_class in result["training_cases"].items()
    ]
    return common.markdown_table(["run", "training cases of", *classes], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        default=None,
        help="where the two-source phantom is written (default data/union; data/union<N> for --num_train N)",
    )
    parser.add_argument(
        "--num_train",
        type=int,
        default=8,
        help="training cases per source of the phantom written in --data (default 8; the folder must match)",
    )
    parser.add_argument(
        "--runs",
        default=None,
        help="folder of the runs (default runs/union_bench; runs/union_bench<N> for --num_train N)",
    )
    parser.add_argument("--max_iter", type=int, default=1000)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument(
        "--only",
        default="union,naive,full,full8,weighted,pseudo",
        help="the runs, of union, naive, full, full8, weighted, pseudo, defaults (default all but defaults)",
    )
    parser.add_argument("--seed", type=int, default=0, help="main_train.py's --seed of every run (default 0)")
    parser.add_argument("--pseudo_labels", type=float, default=0.9, help="the run pseudo's threshold (default 0.9)")
    parser.add_argument(
        "--training_cases",
        action="store_true",
        help="also segment the training cases and report each source's Dice and predicted/labelled volume",
    )
    parser.add_argument(
        "--select",
        default="best",
        choices=["best", "last"],
        help="main_train.py's --select: best (the default, the best validation's weights) or last (the weights "
        "of the final step, every run compared at exactly --max_iter steps)",
    )
    parser.add_argument(
        "--foreground_crops",
        default="voxels",
        choices=["voxels", "classes"],
        help="main_train.py's --foreground_crops of every run but defaults (default voxels, as every earlier result)",
    )
    parser.add_argument("--reuse", action="store_true", help="score a run already trained in its folder")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cases = "" if args.num_train == 8 else str(args.num_train)
    data, runs = Path(args.data or f"data/union{cases}"), Path(args.runs or f"runs/union_bench{cases}")
    python = sys.executable
    if not (data / "union.json").is_file():
        common.run_script(
            [python, "phantom.py", "--output", str(data), "--union", "--num_train", str(args.num_train)]
            + ["--num_test", "6"]
        )
    per_source = len(json.loads((data / "kidneys" / "dataset.json").read_text())["training"])
    if per_source != args.num_train:
        parser.error(f"--data {data} holds {per_source} training cases per source, not --num_train {args.num_train}")
    write_kidneys_cases(data)
    _write_union_variants(data, args.pseudo_labels)
    training_cases = write_training_cases_union(data) if args.training_cases else None
    results = []
    chosen = args.only.split(",")
    for name, (key, dataset) in RUNS.items():
        if key not in chosen:
            continue
        if key == "pseudo" and args.pseudo_labels != 0.9:
            name, key = f"union, pseudo-labels above {args.pseudo_labels:g}", f"pseudo{args.pseudo_labels:g}"
        suffix = (f"_seed{args.seed}" if args.seed else "") + ("_last" if args.select == "last" else "")
        crops = [] if key == DEFAULTS_RUN else ["--foreground_crops", args.foreground_crops]
        suffix += "_classes" if crops and args.foreground_crops == "classes" else ""
        output = runs / f"{key}_{args.max_iter}{suffix}"
        weights = output / "best_metric_model.pth"
        seconds = None
        if not (args.reuse and weights.is_file()):
            started = time.perf_counter()
            common.run_script(
                [python, "main_train.py", "--dataset", str(data / dataset), "--output", str(output), *NETWORK]
                + ["--max_iter", str(args.max_iter), "--eval_step", str(args.max_iter // 4)]
                + ["--num_workers", str(args.num_workers), "--seed", str(args.seed), "--select", args.select]
                + crops
                + ["--overwrite"]
            )
            seconds = time.perf_counter() - started
        segment = [python, "test_seg.py", "--trained_weights", str(weights), "--evaluate", "--device", "cpu"]
        common.run_script([*segment, "--dataset", str(data / "union.json"), "--output", str(output / "test")])
        dice = common.evaluated_dice(output / "test")
        step = json.loads(model_card_path(weights).read_text())["best_step"]
        result = {"run": name, "dataset": dataset, "train_seconds": seconds, "step": step, "dice": dice}
        print(name, f"(the weights of step {step})", {cls: round(v, 3) for cls, v in dice.items()}, flush=True)
        if training_cases is not None:
            scored = output / "training_cases"
            common.run_script([*segment, "--dataset", str(training_cases), "--output", str(scored)])
            result["training_cases"] = training_cases_by_source(data, scored)
            for source, by_class in result["training_cases"].items():
                print(
                    f"  {source}'s training cases:",
                    {c: (round(v["dice"], 3), round(v["volume_ratio"], 2)) for c, v in by_class.items()},
                )
        results.append(result)
    print(common.dice_table(results))
    if args.training_cases:
        print(training_cases_table(results))
    record = {
        "machine": common.machine(),
        "max_iter": args.max_iter,
        "seed": args.seed,
        "select": args.select,
        "foreground_crops": args.foreground_crops,
        "training_cases_per_source": per_source,
        "results": results,
    }
    common.write_json(args.json, record)


if __name__ == "__main__":
    main()
