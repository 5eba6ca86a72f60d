"""The fixed prior against the learned one on the CT phantom, at equal steps: RepUX-Net (BFR, the fixed
prior), Rep3D (the learned prior) and 3D UX-Net (no prior), each trained with the CPU demo configuration
(ROI 32, 16..128 channels, 21^3 kernels for all three) and scored per class by ``test_seg.py --evaluate`` on
the same test cases; and how far each Rep3D block's mask ``M`` moved from its prior ``P``.

    python bench/bench_rep3d.py --json bench/results/rep3d_cpu.json

The commands are printed as they run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (it puts the repository on the path)

from engine.common import load_with_card, parse_card  # noqa: E402
from networks.Rep3D.rep3d_encoder import LearnedPriorConv3d  # noqa: E402

RUNS = {"RepUX-Net (fixed prior)": "REPUXNET", "Rep3D (learned prior)": "REP3D", "3D UX-Net (no prior)": "3DUXNET"}
SHAPE = ["--roi_size", "32", "--feat_size", "16,32,64,128", "--kernel_size", "21", "--hidden_size", "128"]
SHAPE += ["--lr", "1e-3", "--cache_rate", "1", "--device", "cpu"]


def mask_movement(weights: Path) -> list[dict]:
    """Per Rep3D block of the trained weights: mean and largest ``|M - P|``, and the mean of ``P``."""
    state, card, source = load_with_card(weights, "weights")
    choice, in_channels, out_channels, _, _ = parse_card(card, source)
    model = choice.build(in_channels, out_channels)
    model.load_state_dict(state)
    blocks = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LearnedPriorConv3d):
                moved = (module.mask() - module.prior).abs()
                blocks.append(
                    {
                        "block": name,
                        "mean_abs_m_minus_p": float(moved.mean()),
                        "max_abs_m_minus_p": float(moved.max()),
                        "mean_p": float(module.prior.mean()),
                    }
                )
    return blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/phantom_rep3d", help="where the CT phantom is written")
    parser.add_argument("--runs", default="runs/rep3d_bench")
    parser.add_argument("--max_iter", type=int, default=1000)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    data, runs, python = Path(args.data), Path(args.runs), sys.executable
    if not (data / "dataset.json").is_file():
        common.run_script([python, "phantom.py", "--output", str(data), "--num_train", "8", "--num_test", "6"])
    results = []
    for label, network in RUNS.items():
        output = runs / f"{network}_{args.max_iter}_seed{args.seed}"
        started = time.perf_counter()
        common.run_script(
            [python, "main_train.py", "--root", str(data), "--dataset", "flare", "--network", network]
            + ["--output", str(output), *SHAPE, "--max_iter", str(args.max_iter)]
            + ["--eval_step", str(args.max_iter // 4), "--num_workers", str(args.num_workers)]
            + ["--seed", str(args.seed), "--overwrite"]
        )
        seconds = time.perf_counter() - started
        weights = output / "best_metric_model.pth"
        common.run_script(
            [python, "test_seg.py", "--root", str(data), "--dataset", "flare", "--output", str(output / "test")]
            + ["--trained_weights", str(weights), "--evaluate", "--device", "cpu"]
        )
        dice = common.evaluated_dice(output / "test")
        result = {"run": label, "network": network, "train_seconds": seconds, "dice": dice}
        if network == "REP3D":
            result["mask"] = mask_movement(weights)
        results.append(result)
        print(label, {cls: round(value, 3) for cls, value in dice.items()}, flush=True)
    print(common.dice_table(results))
    blocks = next(r["mask"] for r in results if "mask" in r)
    print(
        common.markdown_table(
            ["Rep3D block", "mean |M - P|", "max |M - P|", "mean P"],
            [
                [b["block"], f"{b['mean_abs_m_minus_p']:.4f}", f"{b['max_abs_m_minus_p']:.4f}", f"{b['mean_p']:.4f}"]
                for b in blocks
            ],
        )
    )
    common.write_json(
        args.json, {"machine": common.machine(), "max_iter": args.max_iter, "seed": args.seed, "results": results}
    )


if __name__ == "__main__":
    main()
