"""The benchmarks that a GPU session runs, exercised on the CPU at tiny sizes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_every_part_on_the_cpu(tmp_path):
    """bench/gpu_check.py --smoke: the convolution paths agree, and every timing row is there."""
    result = tmp_path / "gpu_check.json"
    completed = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--smoke", "--json", str(result)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "| part | shape | variant | seconds | vs published | peak MiB |" in completed.stdout
    rows = json.loads(result.read_text())["rows"]
    correctness = [row for row in rows if row[0] == "correctness"]
    assert len(correctness) == 2 and all(float(row[3]) < 1e-4 for row in correctness)
    sweep = [row for row in rows if row[0] == "depthwise fwd+bwd"]
    assert [row[1].split("k=")[1] for row in sweep] == ["7", "7", "3", "5"]  # stage shapes, then the sweep
    training = [row for row in rows if row[0] == "RepUX-Net training step"]
    assert [row[2] for row in training] == [
        "published (native, fp32)",
        "ours (fp32)",
        "ours (bf16 autocast)",
        "ours (fp32), engine step with guard",
    ]
    inference = [row for row in rows if row[0] == "RepUX-Net inference"]
    assert len(inference) == 3 and all(float(row[3]) > 0 for row in training + inference)
    assert training[0][4] == inference[0][4] == "1.00x"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the command runs the whole check")
def test_gpu_check_without_a_gpu_says_what_to_do():
    completed = subprocess.run([sys.executable, "bench/gpu_check.py"], cwd=ROOT, capture_output=True, text=True)
    assert completed.returncode == 2
    assert "no CUDA device: run it on a GPU machine, or pass --smoke" in completed.stderr


def test_inference_memory_benchmark_runs_both_paths_with_equal_labels(tmp_path):
    """bench/bench_inference_memory.py on a tiny CT: every path reports its peak, and the slab path's labels
    are the published path's but at near ties (a random network has many)."""
    result = tmp_path / "memory.json"
    completed = subprocess.run(
        [
            sys.executable,
            "bench/bench_inference_memory.py",
            "--case",
            "tiny",
            "--sw_batch_size",
            "1",
            "--json",
            str(result),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    header = "| path | peak resident GiB | without the network's activations | seconds | estimate GiB |"
    assert header in completed.stdout
    results = json.loads(result.read_text())["results"]
    assert sorted(results) == ["network", "preprocessing", "published", "slabs"]
    assert results["slabs"]["labels"] == 64 * 48 * 30 and results["slabs"]["labels_differing"] < 64 * 48 * 30 * 1e-4
    assert results["slabs"]["largest_top_two_gap_where_differing"] < 2 / 65534  # near ties only, if any
    assert results["network"]["activations_gib"] > 0 and results["slabs"]["estimate_gib"] > 0


def test_union_benchmark_scores_the_training_cases_by_source(tmp_path, monkeypatch):
    """bench_union.py --training_cases: each source's mean Dice (from test_seg's metrics.csv) and predicted
    over labelled volume (voxels summed over the source's cases), on two sources of two cases each."""
    import nibabel as nib
    import numpy as np

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import bench_union

    data, predictions = tmp_path / "union", tmp_path / "predictions"
    (data / "full" / "labelsTr").mkdir(parents=True)
    predictions.mkdir()
    sources = {"first": ["c1", "c2"], "second": ["c3", "c4"]}
    union = {"name": "u", "classes": ["background", "a", "b"], "sources": []}
    for source, cases in sources.items():
        (data / source).mkdir()
        listing = {"training": [{"image": f"./imagesTr/{case}.nii.gz"} for case in cases]}
        (data / source / "dataset.json").write_text(json.dumps(listing))
        union["sources"].append({"name": source, "dataset": f"{source}/dataset.json", "labels": {}})
    (data / "union.json").write_text(json.dumps(union))
    # labelled and predicted voxels of class a, b per case
    labelled = {"c1": (4, 2), "c2": (6, 2), "c3": (5, 1), "c4": (5, 3)}
    predicted = {"c1": (2, 2), "c2": (3, 4), "c3": (5, 0), "c4": (10, 3)}
    rows = ["case,class,name,dice,hd95,nsd"]
    for case in labelled:
        for counts, folder in ((labelled[case], data / "full" / "labelsTr"), (predicted[case], predictions)):
            volume = np.zeros(20, np.uint8)
            volume[: counts[0]] = 1
            volume[10 : 10 + counts[1]] = 2
            name = f"{case}.nii.gz" if folder != predictions else f"{case}_seg.nii.gz"
            nib.save(nib.Nifti1Image(volume.reshape(4, 5, 1), np.eye(4)), folder / name)
        rows += [f"{case},1,a,{0.1 * int(case[1])},0,0", f"{case},2,b,{0.2 * int(case[1])},0,0"]
    (predictions / "metrics.csv").write_text("\n".join(rows) + "\n")

    scores = bench_union.training_cases_by_source(data, predictions)
    assert list(scores) == ["first", "second"] and list(scores["first"]) == ["a", "b"]
    assert scores["first"]["a"]["dice"] == pytest.approx(0.15) and scores["second"]["b"]["dice"] == pytest.approx(0.7)
    assert scores["first"]["a"]["volume_ratio"] == pytest.approx(5 / 10)
    assert scores["first"]["b"]["volume_ratio"] == pytest.approx(6 / 4)
    assert scores["second"]["a"]["volume_ratio"] == pytest.approx(15 / 10)
    assert scores["second"]["b"]["volume_ratio"] == pytest.approx(3 / 4)
