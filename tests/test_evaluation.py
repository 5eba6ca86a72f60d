"""Evaluation reports, label maps, cross-validation folds and validation images."""

import csv
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import TINY_RUN, flags

import cv_summary
import main_train
import test_seg
from dataset.cases import split_folds
from dataset.description import DatasetError
from engine.evaluate import apply_label_map, evaluate_case, parse_label_map, summarise
from engine.validation import overlay_slice
from phantom import write_dataset

TINY = flags(**TINY_RUN)


def cube(shape, start, size):
    mask = np.zeros(shape, dtype=np.int64)
    mask[tuple(slice(s, s + size) for s in start)] = 1
    return mask


def test_metrics_against_hand_computed_values():
    shape, spacing = (12, 12, 12), (1.0, 1.0, 2.0)
    label = cube(shape, (2, 2, 2), 4)
    same = evaluate_case(label, label, spacing, [1])[1]
    assert same == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}
    shifted = cube(shape, (2, 2, 3), 4)  # one voxel (2 mm) along the last axis
    result = evaluate_case(shifted, label, spacing, [1], nsd_tolerance=2.0)[1]
    assert result["dice"] == pytest.approx(2 * 48 / (64 + 64))  # 3 of 4 slices overlap
    # a quarter of the surface is 2 mm away, the rest 0: the 95th percentile is 2 mm
    assert result["hd95"] == pytest.approx(2.0)
    assert result["nsd"] == pytest.approx(1.0)  # every surface point is within the 2 mm tolerance
    strict = evaluate_case(shifted, label, spacing, [1], nsd_tolerance=0.5)[1]
    assert 0 < strict["nsd"] < 1


def test_empty_prediction_and_empty_label_handling():
    shape, spacing = (8, 8, 8), (1.0, 1.0, 2.0)
    diagonal = math.sqrt(8**2 + 8**2 + 16**2)
    label = cube(shape, (2, 2, 2), 3)
    empty = np.zeros(shape, dtype=np.int64)
    assert evaluate_case(empty, label, spacing, [1])[1] == {"dice": 0.0, "hd95": diagonal, "nsd": 0.0}  # a miss
    assert evaluate_case(label, empty, spacing, [1])[1] == {"dice": 0.0, "hd95": diagonal, "nsd": 0.0}  # false alarm
    absent = evaluate_case(empty, empty, spacing, [1])[1]
    assert all(math.isnan(v) for v in absent.values())
    rows = [{"case": "a", "class": 1, **absent}, {"case": "b", "class": 1, "dice": 0.5, "hd95": 3.0, "nsd": 0.25}]
    summary = summarise(rows, {1: "liver"})
    assert summary["classes"]["liver"]["dice"] == {"mean": 0.5, "std": 0.0, "n": 1}  # the absent case is left out


def test_label_map():
    assert parse_label_map("3:1, 1:2") == {3: 1, 1: 2}
    prediction = np.array([0, 1, 2, 3, 4, 3])
    assert apply_label_map(prediction, {3: 1}).tolist() == [0, 0, 0, 1, 0, 1]
    for bad in ("3-1", "x:1", "", "3:1,3:2"):
        with pytest.raises(ValueError, match="--label_map"):
            parse_label_map(bad)


def test_folds_are_disjoint_covering_and_stable():
    cases = [{"image": f"imagesTr/case_{i:03d}.nii.gz", "label": f"labelsTr/case_{i:03d}.nii.gz"} for i in range(23)]
    folds = [split_folds(cases, 5, k) for k in range(5)]
    validation = [[c["image"] for c in val] for _, val in folds]
    assert sorted(sum(validation, [])) == sorted(c["image"] for c in cases)  # covering, each case once
    assert [len(v) for v in validation] == [5, 5, 5, 4, 4]
    for train, val in folds:
        assert not {c["image"] for c in train} & {c["image"] for c in val} and len(train) + len(val) == 23
    reversed_input = split_folds(list(reversed(cases)), 5, 0)[1]
    assert [c["image"] for c in reversed_input] == validation[0]  # input order does not matter
    # The documented recipe: case names sorted, shuffled by Python's Mersenne Twister seeded 0, dealt
    # round-robin; it does not depend on hashing, so another interpreter gives the same folds.
    names = sorted(f"case_{i:03d}" for i in range(23))
    random.Random(0).shuffle(names)
    assert [[Path(p).name.removesuffix(".nii.gz") for p in v] for v in validation] == [names[k::5] for k in range(5)]
    script = (
        "import sys; sys.path.insert(0, '.'); from dataset.cases import split_folds; "
        "cases = [{'image': f'imagesTr/case_{i:03d}.nii.gz'} for i in range(23)]; "
        "print([c['image'] for c in split_folds(cases, 5, 0)[1]])"
    )
    root = Path(__file__).resolve().parents[1]
    environment = {**os.environ, "PYTHONHASHSEED": "123"}
    other = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=environment, capture_output=True, text=True, check=True
    )
    assert other.stdout.strip() == str(validation[0])
    with pytest.raises(DatasetError, match="--fold 5: must be in 0..4"):
        split_folds(cases, 5, 5)


def test_overlay_slice_panels():
    image = np.random.default_rng(0).random((16, 12, 8))
    label, prediction = np.zeros((16, 12, 8), int), np.zeros((16, 12, 8), int)
    label[4:8, 4:8, :] = 1
    prediction[4:8, 4:8, :] = 2
    overlay = overlay_slice(image, label, prediction)
    assert overlay.shape == (12 * 22, 48 * 22, 3) and overlay.dtype == np.uint8  # 256 pixels high at least
    np.testing.assert_array_equal(overlay[::22, ::22], overlay_slice(image, label, prediction, min_height=0))
    overlay = overlay[::22, ::22]
    gray, with_label, with_prediction = overlay[:, :16], overlay[:, 16:32], overlay[:, 32:]
    assert (gray[..., 0] == gray[..., 1]).all()  # the plain image panel is gray
    assert not np.array_equal(with_label, gray) and not np.array_equal(with_label, with_prediction)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    write_dataset(root, num_train=5, num_val=1, num_test=2, seed=21)
    return root


def test_folds_training_writes_overlay_images_and_cv_summary(phantom, tmp_path, capsys):
    outputs = []
    for fold in (0, 1):
        output = tmp_path / f"fold{fold}"
        main_train.main(["--root", str(phantom), "--output", str(output), "--max_iter", "2", "--eval_step", "2",
                         "--fold", str(fold), "--num_folds", "5", "--held_out", "none", *TINY])  # fmt: skip
        outputs.append(output)
    assert "Fold 1 of 5: validating on 1 of the training cases" in capsys.readouterr().out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((outputs[0] / "tensorboard").glob("events.*"))))
    events.Reload()
    assert events.Tags()["images"] == ["val/overlay"]
    image = events.Images("val/overlay")[0]
    assert image.step == 2 and image.width > image.height >= 256  # three panels side by side, readable
    cv_summary.main([str(o) for o in outputs] + ["--json", str(tmp_path / "cv.json")])
    summary = json.loads((tmp_path / "cv.json").read_text())
    dice = [json.loads((o / "best_metric_model.pth.json").read_text())["best_metric"] for o in outputs]
    assert summary["mean"] == pytest.approx(np.mean(dice)) and summary["std"] == pytest.approx(np.std(dice))
    assert "mean ± std (2 folds)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no best_metric_model.pth.json"):
        cv_summary.main([str(tmp_path)])


def test_phantom_evaluation_writes_consistent_csv_and_json(phantom, tmp_path, capsys):
    run = tmp_path / "run"
    main_train.main(["--root", str(phantom), "--output", str(run), "--max_iter", "2", "--eval_step", "2", *TINY])
    output = tmp_path / "pred"
    test_seg.main(["--root", str(phantom), "--output", str(output), "--evaluate", "--trained_weights",
                   str(run / "best_metric_model.pth"), "--num_workers", "0", "--cache_rate", "0"])  # fmt: skip
    with open(output / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 2 * 4 and {r["name"] for r in rows} == {"spleen", "kidney", "liver", "pancreas"}
    for row in rows:  # the Dice of the written segmentation against the label, computed here
        prediction = np.asarray(nib.load(output / f"{row['case']}_seg.nii.gz").dataobj) == int(row["class"])
        label = np.asarray(nib.load(phantom / "labelsTs" / f"{row['case']}.nii.gz").dataobj) == int(row["class"])
        overlap = 2 * (prediction & label).sum() / (prediction.sum() + label.sum())
        assert float(row["dice"]) == pytest.approx(overlap, abs=1e-6)
    summary = json.loads((output / "summary.json").read_text())
    for name in ("spleen", "kidney", "liver", "pancreas"):
        values = [float(r["dice"]) for r in rows if r["name"] == name and r["dice"] != "nan"]
        assert summary["classes"][name]["dice"]["mean"] == pytest.approx(np.mean(values))
        assert summary["classes"][name]["dice"]["std"] == pytest.approx(np.std(values))
    assert (output / "dice_per_class.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| class | Dice | HD95 (mm) | NSD |" in printed and "| **foreground mean** |" in printed


def test_label_map_evaluates_a_model_on_a_single_organ_dataset(phantom, tmp_path):
    run = tmp_path / "run"
    main_train.main(["--root", str(phantom), "--output", str(run), "--max_iter", "1", "--eval_step", "1", *TINY])
    # a LiTS-like test set: liver only, label 1
    root = tmp_path / "lits"
    (root / "imagesTs").mkdir(parents=True)
    (root / "labelsTs").mkdir()
    import nibabel as nib

    for path in sorted((phantom / "imagesTs").iterdir()):
        (root / "imagesTs" / path.name).write_bytes(path.read_bytes())
        label = nib.load(phantom / "labelsTs" / path.name)
        liver = (np.asarray(label.dataobj) == 3).astype(np.uint8)
        nib.save(nib.Nifti1Image(liver, label.affine), root / "labelsTs" / path.name)
    dataset = tmp_path / "lits.json"
    dataset.write_text(json.dumps({"labels": {"0": "background", "1": "liver"}, "spacing": [1.0, 1.0, 1.2],
                                   "intensity": {"a_min": -125, "a_max": 275}}))  # fmt: skip
    output = tmp_path / "pred"
    argv = ["--root", str(root), "--output", str(output), "--dataset", str(dataset), "--evaluate",
            "--trained_weights", str(run / "best_metric_model.pth"), "--num_workers", "0"]  # fmt: skip
    test_seg.main([*argv, "--label_map", "3:1"])
    with open(output / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    assert [r["name"] for r in rows] == ["liver", "liver"]
    # the mapped score equals the liver score computed by hand from the saved (unmapped) predictions
    for row, path in zip(rows, sorted((root / "imagesTs").iterdir()), strict=True):
        saved = np.asarray(nib.load(output / path.name.replace(".nii.gz", "_seg.nii.gz")).dataobj) == 3
        truth = np.asarray(nib.load(root / "labelsTs" / path.name).dataobj) == 1
        expected = 2 * (saved & truth).sum() / (saved.sum() + truth.sum()) if saved.sum() + truth.sum() else 0.0
        assert float(row["dice"]) == pytest.approx(expected)
    with pytest.raises(SystemExit, match="the model has no class 7"):
        test_seg.main([*argv, "--label_map", "7:1"])
    with pytest.raises(SystemExit, match="the dataset has no label 2"):
        test_seg.main([*argv, "--label_map", "3:2"])


def test_surface_metrics_equal_monais_without_its_deprecation_warning():
    import warnings

    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    rng = np.random.default_rng(0)
    shape, spacing = (20, 18, 14), (0.8, 1.1, 2.5)
    label = np.zeros(shape, dtype=np.int64)
    label[3:15, 4:14, 2:10] = 1
    prediction = label.copy()
    prediction[rng.random(shape) < 0.08] = 1  # scattered false positives
    prediction[5:9, 6:10, 3:6] = 0  # a hole
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MONAI 1.5+ deprecates get_mask_edges(always_return_as_numpy=...)
        ours = evaluate_case(prediction, label, spacing, [1], nsd_tolerance=1.5)[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y_pred = torch.from_numpy(np.stack([prediction == 0, prediction == 1])[None])
        y = torch.from_numpy(np.stack([label == 0, label == 1])[None])
        hd95 = compute_hausdorff_distance(y_pred, y, percentile=95, spacing=list(spacing))[0, 0].item()
        nsd = compute_surface_dice(y_pred, y, class_thresholds=[1.5], spacing=list(spacing))[0, 0].item()
    assert ours["hd95"] == pytest.approx(hd95, rel=1e-5)
    assert ours["nsd"] == pytest.approx(nsd, rel=1e-5)
    assert 0 < ours["nsd"] < 1 and ours["hd95"] > 0
