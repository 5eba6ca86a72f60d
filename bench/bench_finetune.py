"""Fine-tuning at small budgets (issue 35), on the phantoms, each model scored by ``test_seg.py --evaluate`` on
fully labelled test cases after 50, 100 and 200 steps (a run resumed from its checkpoint at each stage; the
constant learning rate makes the stages one run):

1. Another label set: a model trained 1000 steps on the ``organs`` source of ``phantom.py --union`` (spleen,
   kidney as one label, liver; 8 cases) fine-tuned on the ``kidneys`` source's 8 other cases labelled with
   every class (spleen, right kidney, left kidney, liver, and the pancreas, new): a fresh head (published),
   the head mapped by name (``kidney`` -> both sides), and the mapped head with a frozen start of 50 steps.
2. Other input channels: the same CT model fine-tuned on the two-channel MRI phantom with ``--channel_init
   repeat``, against a model trained from scratch on it.

    python bench/bench_finetune.py --json bench/results/finetune_cpu.json

Each run is the CPU demo configuration of ``demo.sh`` (RepUX-Net, 21^3 kernels with BFR, ROI 32, lr 1e-3),
at the union phantom's 2 x 2 x 2.5 mm; the commands are printed as they run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_union import write_kidneys_cases  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from phantom import UNION_SPACING, write_dataset  # noqa: E402

NETWORK = ["--network", "REPUXNET", "--roi_size", "32", "--feat_size", "16,32,64,128", "--kernel_size", "21"]
NETWORK += ["--hidden_size", "128", "--lr", "1e-3", "--cache_rate", "1", "--device", "cpu"]
STAGES = (50, 100, 200)
PRETRAIN_STEPS = 1000
#: name: (script, the flags of its fine-tuning)
LABEL_SET_RUNS = {
    "fresh head (published)": ("main_finetune.py", ["--head", "fresh"]),
    "mapped head": ("main_finetune.py", ["--head", "mapped"]),
    "mapped head, frozen start (50 steps)": ("main_finetune.py", ["--head", "mapped", "--freeze_steps", "50"]),
}
CHANNEL_RUNS = {
    "from scratch": ("main_train.py", []),
    "CT model, --channel_init repeat": ("main_finetune.py", ["--channel_init", "repeat"]),
}


def _datasets(data: Path) -> tuple[Path, Path, Path]:
    """The pretraining dataset, the label-set target and the MRI target (written where missing)."""
    python = sys.executable
    if not (data / "union" / "union.json").is_file():
        common.run_script(
            [python, "phantom.py", "--output", str(data / "union"), "--union", "--num_train", "8", "--num_test", "6"]
        )
    target_path = write_kidneys_cases(data / "union")
    mri = data / "mri"
    if not (mri / "dataset.json").is_file():
        write_dataset(mri, num_train=8, num_val=2, num_test=6, seed=21, modality="mri")
        description = {**json.loads((mri / "dataset.json").read_text()), **UNION_SPACING}
        (mri / "dataset.json").write_text(json.dumps(description, indent=2) + "\n")
    return data / "union" / "organs" / "dataset.json", target_path, mri / "dataset.json"


def _staged(script: str, extra: list[str], dataset: Path, output: Path, pretrained: Path | None) -> dict:
    """Train in stages to each of :data:`STAGES` (resuming), scoring the checkpoint on the dataset's test
    list after each; returns the per-class test Dice of each stage and the training time."""
    python, scores, seconds = sys.executable, {}, 0.0
    weights = ["--pretrained_weights", str(pretrained)] if pretrained is not None else []
    for i, steps in enumerate(STAGES):
        started = time.perf_counter()
        common.run_script(
            [python, script, "--dataset", str(dataset), "--output", str(output), *NETWORK, *weights, *extra]
            + ["--max_iter", str(steps), "--eval_step", str(steps), "--num_workers", "2"]
            + (["--resume", "auto"] if i else ["--overwrite"])
        )
        seconds += time.perf_counter() - started
        predictions = output / f"test_{steps}"
        common.run_script(
            [python, "test_seg.py", "--dataset", str(dataset), "--output", str(predictions), "--evaluate"]
            + ["--trained_weights", str(output / "checkpoint_last.pth"), "--device", "cpu"]
        )
        scores[steps] = common.evaluated_dice(predictions)
    return {"dice": scores, "train_seconds": seconds}


def _table(results: list[dict]) -> str:
    classes = list(results[0]["dice"][STAGES[0]])
    rows = []
    for result in results:
        for steps in STAGES:
            dice = result["dice"][steps]
            rows.append([result["run"], str(steps), *(f"{dice[c]:.3f}" for c in classes)])
    return common.markdown_table(["run", "steps", *classes], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/finetune", help="where the phantoms are written")
    parser.add_argument("--runs", default="runs/finetune_bench", help="folder of the runs")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    data, runs = Path(args.data), Path(args.runs)
    source, target, mri = _datasets(data)
    python = sys.executable
    pretrained_run = runs / "pretrained"
    if not (pretrained_run / "best_metric_model.pth").is_file():
        common.run_script(
            [python, "main_train.py", "--dataset", str(source), "--output", str(pretrained_run), *NETWORK]
            + ["--max_iter", str(PRETRAIN_STEPS), "--eval_step", str(PRETRAIN_STEPS // 4), "--overwrite"]
        )
    pretrained = pretrained_run / "best_metric_model.pth"
    results = {"label sets": [], "input channels": []}
    for part, table, dataset in (("label sets", LABEL_SET_RUNS, target), ("input channels", CHANNEL_RUNS, mri)):
        for name, (script, extra) in table.items():
            output = runs / part.replace(" ", "_") / name.split(" (")[0].replace(" ", "_").replace(",", "")
            weights = pretrained if script == "main_finetune.py" else None
            result = {"run": name, **_staged(script, extra, dataset, output, weights)}
            results[part].append(result)
            print(name, {s: {c: round(v, 3) for c, v in d.items()} for s, d in result["dice"].items()}, flush=True)
        print(_table(results[part]))
    common.write_json(args.json, {"machine": common.machine(), "stages": list(STAGES), "results": results})


if __name__ == "__main__":
    main()
