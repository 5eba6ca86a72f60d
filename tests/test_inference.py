"""Inference as it is used: files given by path, ensembles, mirroring, probabilities, post-processing."""

import itertools
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_RUN, exit_message, flags
from monai.inferers import sliding_window_inference

import main_train
import test_seg
from dataset.description import load_dataset_config
from dataset.transforms import build_transforms
from engine.predict import ModelPasses, keep_largest, mean_probabilities
from networks import build_network
from phantom import write_dataset

#: Inference flags for the tests: windows without overlap, to keep the many passes short on a CPU.
PREDICT = dict(num_workers=0, device="cpu", cache_rate=0, overlap=0, sw_batch_size=8)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    write_dataset(root, num_train=2, num_val=1, num_test=2, seed=8)
    return root


@pytest.fixture(scope="module")
def weights(phantom, tmp_path_factory):
    """Two models of the same task trained from different seeds (an ensemble)."""
    trained = []
    for seed in (0, 1):
        output = tmp_path_factory.mktemp(f"model{seed}")
        main_train.main(flags(root=phantom, output=output, max_iter=2, eval_step=2, lr=1e-2, seed=seed, **TINY_RUN))
        trained.append(output / "best_metric_model.pth")
    return trained


def probabilities_of(folder: Path, case: str) -> tuple[np.ndarray, dict]:
    saved = np.load(folder / f"{case}_probabilities.npz")
    return saved["probabilities"].astype(np.float64), {key: saved[key] for key in saved.files}


def test_files_and_folders_given_by_path_are_segmented_in_their_geometry(phantom, weights, tmp_path, capsys):
    first, second = sorted((phantom / "imagesTs").glob("*.nii.gz"))
    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(second, folder / "scan.nii.gz")
    output = tmp_path / "pred"
    test_seg.main(flags(output=output, trained_weights=weights[0], **PREDICT) + ["--input", str(first), str(folder)])
    for source, name in ((first, first.name.removesuffix(".nii.gz")), (folder / "scan.nii.gz", "scan")):
        prediction, image = nib.load(output / f"{name}_seg.nii.gz"), nib.load(source)
        assert prediction.shape == image.shape and np.allclose(prediction.affine, image.affine)
    printed = capsys.readouterr().out
    assert f"Wrote 2 segmentations to {output} in " in printed and "s per case; 1 model)" in printed


def test_ensemble_is_the_mean_of_the_models_softmax(phantom, weights, tmp_path):
    runs = {}
    for name, chosen in (("a", weights[:1]), ("b", weights[1:]), ("ab", weights)):
        runs[name] = tmp_path / name
        argv = flags(root=phantom, output=runs[name], **PREDICT) + ["--save_probabilities", "--trained_weights"]
        test_seg.main(argv + [str(w) for w in chosen])
    for image in sorted((phantom / "imagesTs").glob("*.nii.gz")):
        case = image.name.removesuffix(".nii.gz")
        (a, _), (b, _), (ensemble, saved) = (probabilities_of(runs[n], case) for n in ("a", "b", "ab"))
        assert not np.allclose(a, b, atol=1e-2)  # two different models
        np.testing.assert_allclose(ensemble, (a + b) / 2, atol=2e-3)  # float16 storage
        source = nib.load(image)
        assert ensemble.shape == (5, *source.shape) and np.allclose(saved["affine"], source.affine)
        np.testing.assert_allclose(ensemble.sum(axis=0), 1.0, atol=5e-3)
        assert saved["classes"].tolist() == ["background", "spleen", "kidney", "liver", "pancreas"]
        labels = np.asarray(nib.load(runs["ab"] / f"{case}_seg.nii.gz").dataobj)
        agree = labels == ensemble.argmax(axis=0)
        assert agree.mean() > 0.999  # float16 ties aside


def test_mirroring_is_the_mean_over_the_8_flipped_passes(phantom, weights):
    card = json.loads(Path(f"{weights[0]}.json").read_text())
    model = build_network(card["network"], 1, 5, **card["network_args"]).eval()
    model.load_state_dict(torch.load(weights[0], weights_only=True))
    config = load_dataset_config("flare").with_preprocessing(card)
    image = build_transforms(config, "test")({"image": str(sorted((phantom / "imagesTs").glob("*"))[0])})["image"]
    image = torch.as_tensor(image)[None, :, :48, :48, :48]  # 8 windows a pass
    assert image.shape[2:] == (48, 48, 48)
    roi = tuple(card["roi_size"])
    passes = []
    with torch.no_grad():
        for flips in itertools.product((False, True), repeat=3):
            axes = [axis for axis, flipped in zip((2, 3, 4), flips, strict=True) if flipped]
            logits = sliding_window_inference(image.flip(axes), roi, 4, model, overlap=0.25)
            passes.append(torch.softmax(logits, dim=1).flip(axes))
        reference = torch.stack(passes).mean(dim=0)
        cpu, autocast = torch.device("cpu"), torch.autocast("cpu", enabled=False)
        mirrored = mean_probabilities(image, [ModelPasses(model, roi, (0, 1, 2))], 5, 2, 0.25, autocast, cpu)
        plain = mean_probabilities(image, [ModelPasses(model, roi)], 5, 4, 0.25, autocast, cpu)
    torch.testing.assert_close(mirrored, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain, passes[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(mirrored, plain, atol=1e-4)


def test_tta_with_an_ensemble_and_evaluation_from_files(phantom, weights, tmp_path, capsys):
    output = tmp_path / "pred"
    argv = flags(output=output, labels=phantom / "labelsTs", keep_largest="all", **PREDICT)
    first_case = sorted((phantom / "imagesTs").glob("*.nii.gz"))[0]
    argv += ["--evaluate", "--save_probabilities", "--input", str(first_case)]
    test_seg.main(argv + ["--trained_weights", *map(str, weights), "--tta_axes", "0,1,2"])
    printed = capsys.readouterr().out
    assert "s per case; 2 models, 8 mirrorings each)" in printed and "| **foreground mean** |" in printed
    assert (output / "metrics.csv").is_file() and len(list(output.glob("*_probabilities.npz"))) == 1
    for path in output.glob("*_seg.nii.gz"):  # one connected component per class at most
        labels = np.asarray(nib.load(path).dataobj)
        np.testing.assert_array_equal(keep_largest(labels, range(1, 5)), labels)


def test_keep_largest_keeps_one_component_of_the_given_classes():
    labels = np.zeros((12, 12, 12), dtype=np.uint8)
    labels[1:5, 1:5, 1:5] = 1  # the larger component of class 1
    labels[8:10, 8:10, 8:10] = 1
    labels[1:3, 8:10, 1:3] = 2
    labels[8:11, 1:3, 8:11] = 2
    kept = keep_largest(labels, [1])
    assert (kept[1:5, 1:5, 1:5] == 1).all() and (kept[8:10, 8:10, 8:10] == 0).all()
    np.testing.assert_array_equal(kept == 2, labels == 2)  # class 2 untouched


def test_mismatched_ensembles_are_refused(phantom, weights, tmp_path):
    other = tmp_path / "other.pth"
    shutil.copy(weights[1], other)
    card = json.loads(Path(f"{weights[1]}.json").read_text())
    Path(f"{other}.json").write_text(json.dumps({**card, "spacing": [1.5, 1.5, 2.0]}))
    output = tmp_path / "pred"
    argv = flags(root=phantom, output=output, **PREDICT) + ["--trained_weights", str(weights[0]), str(other)]
    assert exit_message(test_seg.main, argv) == (
        f"error: --trained_weights {weights[0]} and {other} cannot be ensembled: spacing 1,1,1.2 mm vs 1.5,1.5,2 mm "
        "(an ensemble needs one set of classes, input channels and preprocessing)"
    )
    classes = ["background", "spleen", "kidney", "liver", "pancreas", "extra"]
    Path(f"{other}.json").write_text(json.dumps({**card, "classes": classes, "out_channels": 6}))
    assert "classes background, spleen, kidney, liver, pancreas vs background, spleen" in exit_message(
        test_seg.main, argv
    )
    assert not output.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--keep_largest", "7"], "--keep_largest 7: classes are 1..4 (0 is background)"),
        (["--keep_largest", "x"], "--keep_largest x: expected class values such as 1,3, or all"),
        (["--evaluate", "--input", "nowhere.nii.gz"], "--input nowhere.nii.gz: no such file or folder"),
    ],
)
def test_bad_inference_flags(phantom, weights, tmp_path, extra, message):
    argv = flags(output=tmp_path / "pred", trained_weights=weights[0], **PREDICT) + extra
    if "--input" not in extra:
        argv += ["--root", str(phantom)]
    assert exit_message(test_seg.main, argv) == f"error: {message}"


def test_mirrored_passes_swap_the_lateral_pairs_back(phantom, weights):
    """The mean over a model's passes computed by hand: each flipped back, and those flipped along the
    left-right axis with the pair's channels exchanged; an ensemble weighs each model the same."""
    card = json.loads(Path(f"{weights[0]}.json").read_text())
    model = build_network(card["network"], 1, 5, **card["network_args"]).eval()
    model.load_state_dict(torch.load(weights[0], weights_only=True))
    image = torch.rand(1, 1, 32, 32, 32) * 2 - 0.5
    roi, pairs = tuple(card["roi_size"]), ((1, 3),)
    with torch.no_grad():
        passes = {}
        for axes in ((), (0,), (2,), (0, 2)):
            dims = [a + 2 for a in axes]
            probabilities = torch.softmax(sliding_window_inference(image.flip(dims), roi, 1, model), dim=1).flip(dims)
            if 0 in axes:
                probabilities = probabilities[:, [0, 3, 2, 1, 4]]
            passes[axes] = probabilities
        reference = torch.stack(list(passes.values())).mean(dim=0)
        cpu, autocast = torch.device("cpu"), torch.autocast("cpu", enabled=False)
        mirrored = mean_probabilities(image, [ModelPasses(model, roi, (0, 2), pairs)], 5, 2, 0, autocast, cpu)
        unswapped = mean_probabilities(image, [ModelPasses(model, roi, (0, 2))], 5, 2, 0, autocast, cpu)
        ensemble = mean_probabilities(
            image, [ModelPasses(model, roi, (0, 2), pairs), ModelPasses(model, roi)], 5, 2, 0, autocast, cpu
        )
    torch.testing.assert_close(mirrored, reference, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(unswapped, reference, atol=1e-3)
    torch.testing.assert_close(ensemble, (reference + passes[()]) / 2, rtol=1e-5, atol=1e-6)


def with_card(weights: Path, folder: Path, **entries) -> Path:
    """A copy of ``weights`` whose model card has ``entries`` changed (None: removed)."""
    copy = folder / "model.pth"
    shutil.copy(weights, copy)
    card = json.loads(Path(f"{weights}.json").read_text())
    card = {key: value for key, value in {**card, **entries}.items() if value is not None}
    Path(f"{copy}.json").write_text(json.dumps(card))
    return copy


def test_tta_of_a_model_trained_without_mirroring_is_one_pass(phantom, weights, tmp_path, capsys):
    assert json.loads(Path(f"{weights[0]}.json").read_text())["mirror_axes"] == []  # the flare preset
    case = sorted((phantom / "imagesTs").glob("*.nii.gz"))[0]
    name = case.name.removesuffix(".nii.gz")
    runs = {}
    for run, extra in (("plain", []), ("tta", ["--tta"])):
        runs[run] = tmp_path / run
        argv = flags(output=runs[run], trained_weights=weights[0], **PREDICT)
        test_seg.main(argv + ["--save_probabilities", "--input", str(case), *extra])
        printed = capsys.readouterr().out
    assert (
        f"note: --tta: {weights[0]} was trained without mirroring (the model card {weights[0]}.json records no "
        "mirror axes), and mirrored passes would put left on right: one pass; --tta_axes overrides"
    ) in printed
    assert "s per case; 1 model)" in printed
    np.testing.assert_array_equal(probabilities_of(runs["tta"], name)[0], probabilities_of(runs["plain"], name)[0])
    old = with_card(weights[0], tmp_path, mirror_axes=None, lateral_pairs=None)
    test_seg.main(flags(output=tmp_path / "old", trained_weights=old, **PREDICT) + ["--tta", "--input", str(case)])
    printed = capsys.readouterr().out
    assert (
        f"note: --tta: the model card {old}.json does not record the axes mirrored in training (written before "
        f"they were): {old} runs unmirrored; --tta_axes 0,1,2 mirrors it anyway"
    ) in printed
    assert "s per case; 1 model)" in printed
    Path(f"{old}.json").unlink()  # published weights: a state dict and the flags
    shape = {key: TINY_RUN[key] for key in ("roi_size", "feat_size", "kernel_size", "hidden_size")}
    argv = flags(output=tmp_path / "bare", trained_weights=old, dataset="flare", **shape, **PREDICT)
    test_seg.main(argv + ["--tta", "--input", str(case)])
    assert (
        f"note: --tta: {old} has no model card to say which axes it was trained to mirror: it runs unmirrored; "
        "--tta_axes 0,1,2 mirrors it anyway"
    ) in capsys.readouterr().out


def test_tta_mirrors_along_the_axes_of_training_with_the_card_pairs(phantom, weights, tmp_path, capsys, monkeypatch):
    import engine.infer

    trained = with_card(weights[0], tmp_path, mirror_axes=[0, 2], lateral_pairs=[[1, 3]])
    seen = []

    def recording(image, models, *rest):
        seen.append([(m.mirror_axes, m.lateral_pairs) for m in models])
        return mean_probabilities(image, models, *rest)

    monkeypatch.setattr(engine.infer, "mean_probabilities", recording)
    case = sorted((phantom / "imagesTs").glob("*.nii.gz"))[0]
    argv = flags(output=tmp_path / "pred", **PREDICT) + ["--input", str(case), "--trained_weights"]
    test_seg.main(argv + [str(trained), str(weights[1]), "--tta"])
    printed = capsys.readouterr().out
    assert seen == [[((0, 2), ((1, 3),)), ((), ())]]
    assert (
        f"--tta: {trained} mirrors along axes 0 (left-right), 2 (inferior-superior) as in training (4 passes); "
        "left/right pairs swapped back: spleen (1) <-> liver (3)"
    ) in printed
    assert "s per case; 2 models, 4/1 mirrorings)" in printed
    test_seg.main(argv + [str(trained), "--tta_axes", "1"])
    assert seen[-1] == [((1,), ((1, 3),))] and "s per case; 1 model, 2 mirrorings)" in capsys.readouterr().out
