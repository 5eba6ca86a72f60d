"""Cross-validation studies: out-of-fold predictions of every fold run, nnU-Net's rules for scoring,
ensembling and choosing keep-largest postprocessing (against independent implementations of them), the
one-line refusals, and a two-configuration study from fold runs to test_seg.py --plan and the bundle."""

import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_RUN, exit_message, flags
from scipy import ndimage

import crossval
import cv_summary
import export
import main_train
import test_seg
from dataset.labels import LabelManager
from dataset.portable import keep_largest
from engine.crossval import (
    HELD_OUT,
    Configuration,
    FoldRun,
    Scoring,
    _ensemble,
    _postprocessing,
    choose,
    class_means,
    foreground_mean,
    paired_test,
)
from phantom import write_dataset

CLASSES = ("background", "a", "b", "c")
SCORING = Scoring(LabelManager(CLASSES))
PREDICT = dict(num_workers=0, device="cpu", cache_rate=0, overlap=0.5)


# ---- nnU-Net's rules, written out independently ----


def nnunet_keep_largest(segmentation: np.ndarray, labels_or_regions) -> np.ndarray:
    """nnU-Net's remove_all_but_largest_component_from_segmentation: the union of the labels (or regions) as
    one mask, every component of the largest size kept (skimage's full connectivity)."""
    items = labels_or_regions if isinstance(labels_or_regions, list) else [labels_or_regions]
    mask = np.zeros(segmentation.shape, dtype=bool)
    for item in items:
        mask |= np.isin(segmentation, item) if isinstance(item, tuple) else segmentation == item
    components, _ = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    sizes = {i + 1: size for i, size in enumerate(np.bincount(components.ravel())[1:])}
    keep = [i for i, size in sizes.items() if size == max(sizes.values())] if sizes else []
    result = segmentation.copy()
    result[mask & ~np.isin(components, keep)] = 0
    return result


def nnunet_summary(predictions: list, references: list, labels: list[int]) -> dict:
    """nnU-Net's compute_metrics_on_folder, Dice only: per case and label 2TP / (2TP + FP + FN), NaN where
    TP + FP + FN is 0; the mean of each label over the cases (nanmean); the foreground mean of the means."""
    per_label = {label: [] for label in labels}
    for prediction, reference in zip(predictions, references, strict=True):
        for label in labels:
            p, r = prediction == label, reference == label
            tp, fp, fn = (p & r).sum(), (p & ~r).sum(), (~p & r).sum()
            per_label[label].append(math.nan if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    means = {label: float(np.nanmean(values)) for label, values in per_label.items()}
    return {"mean": means, "foreground_mean": float(np.mean(list(means.values())))}


def nnunet_determine_postprocessing(predictions: list, references: list, labels: list[int]) -> tuple[list, dict]:
    """nnU-Net's determine_postprocessing: the foreground as a whole kept if its mean rises and no label's
    falls; then each label in order, on that, kept if its own mean rises."""
    baseline = nnunet_summary(predictions, references, labels)
    whole = [nnunet_keep_largest(p, labels) for p in predictions]
    after = nnunet_summary(whole, references, labels)
    kept = after["foreground_mean"] > baseline["foreground_mean"] and not any(
        after["mean"][label] < baseline["mean"][label] for label in labels
    )
    source, functions = (whole, [list(labels)]) if kept else (predictions, [])
    for label in labels if len(labels) > 1 else []:
        trial = [nnunet_keep_largest(s, label) for s in source]
        before, now = nnunet_summary(source, references, labels), nnunet_summary(trial, references, labels)
        if now["mean"][label] > before["mean"][label]:
            source, functions = trial, [*functions, label]
    return functions, nnunet_summary(source, references, labels)


# ---- the rules against them ----


def test_class_means_and_the_foreground_mean_are_nnuneets_with_absent_classes():
    nan = math.nan
    scores = {"x": {1: 0.5, 2: nan, 3: 1.0}, "y": {1: 0.7, 2: 0.2, 3: nan}, "z": {1: nan, 2: 0.4, 3: 0.0}}
    means = class_means(scores, [1, 2, 3])
    assert means == pytest.approx({1: 0.6, 2: 0.3, 3: 0.5})
    assert foreground_mean(means) == pytest.approx(np.mean([0.6, 0.3, 0.5]))  # the mean of the class means
    assert math.isnan(class_means({"x": {1: nan}}, [1])[1])


def test_the_best_candidate_wins_and_a_tie_goes_to_fewer_models():
    means = {("a",): {1: 0.8}, ("b",): {1: 0.9}, ("a", "b"): {1: 0.9}, ("c",): {1: 0.9}}
    assert choose(means) == ("b",)  # a tie with the ensemble goes to the single model, then to the first given
    assert choose({**means, ("a", "c"): {1: 0.95}}) == ("a", "c")


def test_the_paired_test_is_wilcoxons_on_the_cases_both_score():
    from scipy.stats import wilcoxon

    nan = math.nan
    mine = {f"c{i}": {1: 0.5 + 0.04 * i, 2: 0.3} for i in range(8)}
    theirs = {f"c{i}": {1: 0.55, 2: nan if i == 0 else 0.3} for i in range(8)}
    theirs["extra"] = {1: 0.9, 2: 0.9}
    p, n = paired_test(mine, theirs)
    mine_means = [np.mean([0.5 + 0.04 * i, 0.3]) for i in range(8)]
    their_means = [0.55] + [np.mean([0.55, 0.3])] * 7
    assert n == 8 and p == pytest.approx(wilcoxon(mine_means, their_means).pvalue)
    assert paired_test(mine, mine) == (1.0, 8)


def test_keep_largest_keeps_every_component_of_the_largest_size_as_nnunet():
    labels = np.zeros((12, 12, 12), dtype=np.uint8)
    labels[0:2, 0:2, 0:2] = 1  # two components of 8 voxels, and one of 1
    labels[6:8, 6:8, 6:8] = 1
    labels[11, 0, 11] = 1
    labels[3:5, 9:11, 0:2] = 2
    np.testing.assert_array_equal(keep_largest(labels, [1]), nnunet_keep_largest(labels, 1))
    assert (keep_largest(labels, [1]) == 1).sum() == 16
    np.testing.assert_array_equal(keep_largest(labels, [(1, 2)]), nnunet_keep_largest(labels, [1, 2]))


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.uint8), np.eye(4)), path)
    return path


def scenario(seed: int, cases: int = 4) -> tuple[list, list]:
    """Label maps of three classes with the predictions' typical faults: stray specks of class a far from the
    organ (keep-largest helps a), class b in two real parts (keep-largest hurts b), class c as it is."""
    rng = np.random.default_rng(seed)
    predictions, references = [], []
    for _ in range(cases):
        reference = np.zeros((20, 20, 20), dtype=np.uint8)
        reference[2:9, 2:9, 2:9] = 1
        reference[12:16, 2:6, 2:6] = 2
        reference[12:15, 12:15, 2:5] = 2  # a second part of b
        reference[12:17, 12:17, 12:17] = 3
        prediction = reference.copy()
        for _ in range(3):
            x, y, z = rng.integers(10, 19, 3)
            prediction[x, y, 9 + z % 2] = 1  # a speck of a
        prediction[13:17, 13:17, 13:18] = 3
        predictions.append(prediction)
        references.append(reference)
    return predictions, references


@pytest.mark.parametrize("seed", [0, 1])
def test_postprocessing_is_chosen_as_nnunet_chooses_it(tmp_path, seed):
    predictions, references = scenario(seed)
    source = {f"case{i}": save(tmp_path / "pred" / f"case{i}_seg.nii.gz", p) for i, p in enumerate(predictions)}
    labels = {f"case{i}": str(save(tmp_path / "ref" / f"case{i}.nii.gz", r)) for i, r in enumerate(references)}
    baseline = nnunet_summary(predictions, references, [1, 2, 3])["mean"]
    stages, entries = _postprocessing(source, baseline, SCORING, labels, 0.0, tmp_path / "study")
    expected_entries, expected = nnunet_determine_postprocessing(predictions, references, [1, 2, 3])
    assert entries == expected_entries
    assert stages[-1]["means"] == pytest.approx(expected["mean"])
    assert foreground_mean(stages[-1]["means"]) == pytest.approx(expected["foreground_mean"])
    assert 1 in entries and 2 not in entries  # the specks go, b's second part stays
    written = np.asarray(nib.load(tmp_path / "study" / "predictions" / "case0_seg.nii.gz").dataobj)
    np.testing.assert_array_equal(written, keep_largest(predictions[0], [e for e in entries if isinstance(e, int)]))
    _, none = _postprocessing(source, baseline, SCORING, labels, 1.0, tmp_path / "strict")
    assert none == []  # nothing rises by more than 1


def test_an_ensemble_averages_the_saved_probabilities(tmp_path):
    rng = np.random.default_rng(3)
    shape = (6, 5, 4)
    reference = rng.integers(0, 4, shape)
    labels = {"case": str(save(tmp_path / "case.nii.gz", reference))}
    members, saved = [], []
    for name in ("m1", "m2"):
        folder = tmp_path / name
        probabilities = rng.dirichlet(np.ones(4), shape).transpose(3, 0, 1, 2).astype(np.float16)
        (folder / HELD_OUT).mkdir(parents=True)
        np.savez(folder / HELD_OUT / "case_probabilities.npz", probabilities=probabilities)
        save(folder / HELD_OUT / "case_seg.nii.gz", probabilities.argmax(0))
        run = FoldRun(folder, 0, 2, ({"image": "case.nii.gz", "label": labels["case"]},), ("case",))
        members.append(Configuration(name, [run], [{"cases": ["case"]}], {}))
        saved.append(probabilities.astype(np.float32))
    scores = _ensemble(members, SCORING, labels, tmp_path / "ensemble")
    mean = (saved[0] + saved[1]) / 2
    expected = nnunet_summary([mean.argmax(0)], [reference], [1, 2, 3])["mean"]
    assert scores["case"] == pytest.approx(expected)
    written = np.asarray(nib.load(tmp_path / "ensemble" / "case_seg.nii.gz").dataobj)
    np.testing.assert_array_equal(written, mean.argmax(0))


# ---- a two-configuration study from fold runs to test_seg.py --plan ----


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A phantom (4 training cases, 2 folds), RepUX-Net mirrored along the left-right axis and 3D UX-Net
    unmirrored, each trained a few steps per fold; every run ends with its held-out predictions."""
    root = tmp_path_factory.mktemp("data")
    write_dataset(root, num_train=4, num_test=2, seed=6, layout="nnunet")
    runs = tmp_path_factory.mktemp("runs")
    folders = {}
    for name, network, axes in (("rep", "REPUXNET", "0"), ("ux", "3DUXNET", "none")):
        for fold in (0, 1):
            output = runs / f"{name}{fold}"
            training = flags(dataset=root / "dataset.json", output=output, network=network, fold=fold, num_folds=2)
            main_train.main(training + flags(max_iter=2, eval_step=2, lr=1e-2, mirror_axes=axes, **TINY_RUN))
            folders.setdefault(name, []).append(output)
    return root, folders


def test_a_fold_run_ends_with_its_held_out_predictions(study):
    _, folders = study
    run = folders["rep"][0]
    record = json.loads((run / HELD_OUT / "held_out.json").read_text())
    assert record["checkpoint"] == "final" and not record["selected_on_these_cases"]
    assert record["weights"] == str((run / "final_model.pth").resolve()) and record["mirror_axes"] == [0]
    fold = json.loads((run / "fold.json").read_text())
    assert len(fold["held_out"]) == 2 and len(fold["cases"]) == 4 and record["cases"] == sorted(record["labels"])
    rows = (run / HELD_OUT / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 4  # two cases, four classes
    for case in record["cases"]:
        probabilities = np.load(run / HELD_OUT / f"{case}_probabilities.npz")["probabilities"]
        image = nib.load(next(c["image"] for c in fold["held_out"] if case in c["image"]))
        assert probabilities.shape == (5, *image.shape)  # in the case's original geometry


def run_study(study, output: Path, *extra: str) -> dict:
    _, folders = study
    argv = ["--output", str(output), "--device", "cpu", "--num_workers", "0", *extra]
    for name, runs in folders.items():
        argv += ["--configuration", name, *map(str, runs)]
    crossval.main(argv)
    return json.loads((output / "plan.json").read_text())


def test_the_study_chooses_and_its_plan_segments_as_the_same_flags_by_hand(study, tmp_path, capsys):
    root, folders = study
    plan = run_study(study, tmp_path / "study")
    report = (tmp_path / "study" / "report.md").read_text()
    assert "| rep | REPUXNET | 2 | axes 0 |" in report and "| ux | 3DUXNET | 2 | none |" in report
    assert "| rep + ux |" in report and (tmp_path / "study" / "dice_per_configuration.png").stat().st_size > 0
    assert "best checkpoint's training-time foreground Dice (selected on these cases)" in report
    scores = (tmp_path / "study" / "scores.csv").read_text().splitlines()
    assert scores[0] == "candidate,case,1,2,3,4" and len(scores) == 1 + 3 * 4
    chosen = plan["chosen"]
    assert plan["weights"] == [str((run / "final_model.pth").resolve()) for name in chosen for run in folders[name]]
    assert plan["tta"] is True and plan["connectivity"] == 26
    assert all(isinstance(entry, int | list) for entry in plan["keep_largest"])
    before, after = plan["scores"]["before"]["foreground_mean"], plan["scores"]["after"]["foreground_mean"]
    assert after >= before
    images = ["--input", str(root / "imagesTs")]
    test_seg.main(flags(plan=tmp_path / "study" / "plan.json", output=tmp_path / "by_plan", **PREDICT) + images)
    keep = ",".join(
        "+".join(map(str, entry)) if isinstance(entry, list) else str(entry) for entry in plan["keep_largest"]
    )
    by_hand = flags(output=tmp_path / "by_hand", **PREDICT) + images + ["--tta", "--trained_weights", *plan["weights"]]
    test_seg.main(by_hand + (["--keep_largest", keep] if keep else []))
    written = sorted((tmp_path / "by_plan").glob("*_seg.nii.gz"))
    assert len(written) == 2
    for path in written:
        np.testing.assert_array_equal(
            np.asarray(nib.load(path).dataobj), np.asarray(nib.load(tmp_path / "by_hand" / path.name).dataobj)
        )
    message = exit_message(
        test_seg.main,
        flags(plan=tmp_path / "study" / "plan.json", output=tmp_path / "x", keep_largest="1", **PREDICT) + images,
    )
    assert message == (
        f"error: --plan {tmp_path / 'study' / 'plan.json'} sets the weights, the mirroring and the postprocessing; "
        "drop --keep_largest"
    )


def test_the_bundle_of_a_plan_applies_its_postprocessing(study, tmp_path):
    _, folders = study
    plan_path = tmp_path / "study" / "plan.json"
    plan = run_study(study, tmp_path / "study")
    plan["keep_largest"] = [[1, 2, 3, 4], 3]  # both stages, whatever the phantom chose
    plan_path.write_text(json.dumps(plan))
    weights = folders["ux"][0] / "final_model.pth"
    export.main(flags(trained_weights=weights, output=tmp_path / "export", plan=plan_path) + ["--formats", "bundle"])
    config = json.loads((tmp_path / "export" / "bundle" / "configs" / "inference.json").read_text())
    kept = config["postprocessing"]["transforms"][0]
    assert kept == {"_target_": "scripts.portable.KeepLargestd", "keys": "pred", "entries": [[1, 2, 3, 4], 3]}
    readme = (tmp_path / "export" / "bundle" / "docs" / "README.md").read_text()
    assert "the largest component kept of spleen+kidney+liver+pancreas, then liver" in readme


def test_a_run_trained_before_the_study_is_predicted_on_demand(study, tmp_path):
    """A fold run as this repository wrote it before: no fold.json, no final_model.pth, no validation/; its
    finished checkpoint holds the final weights, and --root/--dataset split its cases again."""
    root, folders = study
    old = {}
    for name, runs in folders.items():
        for run in runs:
            copy = tmp_path / "old" / run.name
            shutil.copytree(run, copy)
            for leftover in ("fold.json", "final_model.pth", "final_model.pth.json"):
                (copy / leftover).unlink()
            shutil.rmtree(copy / HELD_OUT)
            old.setdefault(name, []).append(copy)
    argv = ["--output", str(tmp_path / "study"), "--device", "cpu", "--num_workers", "0"]
    for name, runs in old.items():
        argv += ["--configuration", name, *map(str, runs)]
    message = exit_message(crossval.main, argv)
    assert "trained before its held-out cases were recorded (fold.json): give --root and --dataset" in message
    dataset = ["--root", str(root), "--dataset", str(root / "dataset.json")]
    one = ["--output", str(tmp_path / "none"), "--device", "cpu", "--num_workers", "0", "--held_out_only"]
    crossval.main([*one, "--configuration", "ux", str(old["ux"][0]), *dataset])  # one run, one command
    assert (old["ux"][0] / HELD_OUT / "held_out.json").is_file() and not (tmp_path / "none").exists()
    crossval.main([*argv, *dataset])
    record = json.loads((old["rep"][0] / HELD_OUT / "held_out.json").read_text())
    assert record["weights"].endswith("checkpoint_last.pth")
    fresh = json.loads((folders["rep"][0] / HELD_OUT / "held_out.json").read_text())
    assert record["cases"] == fresh["cases"]  # the same split
    np.testing.assert_allclose(  # the same weights: the final ones
        np.load(old["rep"][0] / HELD_OUT / f"{record['cases'][0]}_probabilities.npz")["probabilities"],
        np.load(folders["rep"][0] / HELD_OUT / f"{record['cases'][0]}_probabilities.npz")["probabilities"],
    )


def test_what_cannot_be_pooled_is_refused_in_one_line(study, tmp_path):
    _, folders = study
    base = ["--output", str(tmp_path / "study"), "--device", "cpu", "--num_workers", "0"]
    rep, ux = folders["rep"], folders["ux"]
    cases = json.loads((rep[1] / HELD_OUT / "held_out.json").read_text())["cases"]
    refusals = {
        "one fold": (["--configuration", "rep", str(rep[0])], "held out by no run given: "),
        "twice": (["--configuration", "rep", str(rep[0]), str(rep[0])], "--configuration rep: fold 0 given twice"),
        "same name": (
            ["--configuration", "rep", *map(str, rep), "--configuration", "rep", *map(str, ux)],
            "--configuration rep: given twice",
        ),
    }
    for name, (argv, expected) in refusals.items():
        message = exit_message(crossval.main, base + argv)
        assert "\n" not in message and expected in message, name
    copy = tmp_path / "rep1"
    shutil.copytree(rep[1], copy)
    (copy / HELD_OUT / f"{cases[0]}_probabilities.npz").unlink()
    message = exit_message(crossval.main, base + ["--configuration", "rep", str(rep[0]), str(copy)])
    assert message == f"error: {copy}: no probabilities of case {cases[0]} in {copy / HELD_OUT}"
    others, dropped = [], None
    for run in rep:  # runs of a split without one of the cases
        other = tmp_path / f"other_{run.name}"
        shutil.copytree(run, other)
        fold = json.loads((other / "fold.json").read_text())
        dropped = fold["cases"][-1]
        (other / "fold.json").write_text(json.dumps({**fold, "cases": fold["cases"][:-1]}))
        others.append(other)
    argv = ["--configuration", "odd", str(ux[0]), str(others[1])]
    message = exit_message(crossval.main, base + argv)
    assert f"--configuration odd: {ux[0]} and {others[1]} split different cases: {dropped} in one only" in message
    argv = ["--configuration", "ux", *map(str, ux), "--configuration", "odd", *map(str, others)]
    message = exit_message(crossval.main, base + argv)
    assert message == (f"error: --configuration odd and ux were trained on different cases: {dropped} in one only")


def test_cv_summary_still_gives_the_published_number_and_names_its_successor(study, capsys):
    _, folders = study
    cv_summary.main([str(run) for run in folders["rep"]])
    printed = capsys.readouterr().out
    assert "mean ± std (2 folds)" in printed and "crossval.py --output STUDY --configuration NAME FOLDERS" in printed


def test_the_held_out_step_can_use_the_best_checkpoint_marked_as_selected(study, tmp_path):
    _, folders = study
    runs = []
    for run in folders["ux"]:
        copy = tmp_path / run.name
        shutil.copytree(run, copy)
        runs.append(copy)
    crossval.main(
        ["--output", str(tmp_path / "study"), "--checkpoint", "best", "--device", "cpu", "--num_workers", "0"]
        + ["--configuration", "ux", *map(str, runs)]
    )
    record = json.loads((runs[0] / HELD_OUT / "held_out.json").read_text())
    assert record["selected_on_these_cases"] and record["weights"].endswith("best_metric_model.pth")
    assert "best checkpoints (selected on these cases)" in (tmp_path / "study" / "report.md").read_text()


def test_training_without_the_held_out_step(tmp_path):
    root = tmp_path / "data"
    write_dataset(root, num_train=4, num_test=1, seed=2, layout="nnunet")
    training = flags(dataset=root / "dataset.json", output=tmp_path / "run", fold=1, num_folds=2, held_out="none")
    main_train.main(training + flags(max_iter=1, eval_step=1, mirror_axes="none", **TINY_RUN))
    assert (tmp_path / "run" / "final_model.pth").is_file() and not (tmp_path / "run" / HELD_OUT).exists()
    assert torch.load(tmp_path / "run" / "final_model.pth", weights_only=True)
