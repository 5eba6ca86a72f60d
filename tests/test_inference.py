"""Inference as it is used: files given by path, ensembles, mirroring, probabilities, post-processing."""

import itertools
import json
import re
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
from dataset.description import PRESETS, load_dataset_config
from dataset.portable import keep_largest
from dataset.transforms import build_transforms
from engine.predict import ModelPasses, mean_probabilities
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
    # held in steps of 1/65534, rounded once per pass
    torch.testing.assert_close(mirrored.float(), reference[0], rtol=0, atol=8 * 7.7e-6)
    torch.testing.assert_close(plain.float(), passes[0][0], rtol=0, atol=7.7e-6)
    assert not torch.allclose(mirrored.float(), plain.float(), atol=1e-4)


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
        (["--keep_largest", "7"], "--keep_largest 7: class 7: classes are 1..4 (0 is background)"),
        (
            ["--keep_largest", "x"],
            "--keep_largest x: expected class values such as 1,3, label values kept as one such as 1+2, foreground, "
            "or all",
        ),
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
    torch.testing.assert_close(mirrored.float(), reference[0], rtol=0, atol=4 * 7.7e-6)
    assert not torch.allclose(unswapped.float(), reference[0], atol=1e-3)
    torch.testing.assert_close(ensemble.float(), (reference + passes[()])[0] / 2, rtol=0, atol=5 * 7.7e-6)


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

    def recording(image, models, *rest, **options):
        seen.append([(m.mirror_axes, m.lateral_pairs) for m in models])
        return mean_probabilities(image, models, *rest, **options)

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


# ---- at real scan size: slab-wise stitching and resampling, the memory estimate ----


def whole_volume_probabilities(batch, transforms, models, overlap):
    """The former path, MONAI's whole-volume way: each model's float32 softmax of sliding_window_inference
    over every pass (flipped back), averaged, then Invertd back to the input (float64 resampling) and the
    background completed."""
    from monai.data import decollate_batch
    from monai.transforms import Invertd

    image, total = batch["image"], 0
    for network, roi, axes in models:
        for mirrored in axes:
            dims = [a + 2 for a in mirrored]
            logits = sliding_window_inference(image.flip(dims), roi, 4, network, overlap=overlap)
            total = total + torch.softmax(logits, dim=1).flip(dims) / (len(models) * len(axes))
    batch = {**batch, "pred": total}
    invert = Invertd(keys="pred", transform=transforms, orig_keys="image", nearest_interp=False, to_tensor=True)
    probabilities = torch.as_tensor(invert(decollate_batch(batch)[0])["pred"])
    probabilities[0] += (1 - probabilities.sum(dim=0)).clamp_min(0)  # outside the crop: background
    return probabilities


@pytest.mark.parametrize("orientation", ["stored", "RPI", "LAS"])
def test_slab_inference_gives_the_whole_volume_labels_in_any_geometry(phantom, weights, tmp_path, orientation):
    from monai.data import DataLoader, Dataset

    from dataset.laterality import mirrorings
    from engine.input_grid import InputGrid, labels_on_input_grid
    from engine.predict import ProbabilitiesFile

    source = sorted((phantom / "imagesTs").glob("*.nii.gz"))[0]
    path = source
    if orientation != "stored":  # the same scan stored in another voxel order
        image = nib.load(source)
        transform = nib.orientations.ornt_transform(
            nib.io_orientation(image.affine), nib.orientations.axcodes2ornt(tuple(orientation))
        )
        path = tmp_path / "case.nii.gz"
        nib.save(image.as_reoriented(transform), path)
        assert nib.aff2axcodes(nib.load(path).affine) == tuple(orientation)
    networks = []
    for trained in weights:
        card = json.loads(Path(f"{trained}.json").read_text())
        network = build_network(card["network"], 1, 5, **card["network_args"]).eval()
        network.load_state_dict(torch.load(trained, weights_only=True))
        networks.append((network, tuple(card["roi_size"])))
    config = load_dataset_config("flare").with_preprocessing(card)
    transforms = build_transforms(config, "test")
    batch = next(iter(DataLoader(Dataset([{"image": str(path)}], transforms), batch_size=1)))
    cpu, autocast = torch.device("cpu"), torch.autocast("cpu", enabled=False)
    runs = {"one model": ([networks[0]], ())}
    if orientation == "RPI":  # the costly one once: an ensemble with mirroring, in an odd geometry
        runs["ensemble, mirrored"] = (networks, (0,))
    for name, (chosen, axes) in runs.items():
        with torch.no_grad():
            expected = whole_volume_probabilities(batch, transforms, [(*m, mirrorings(axes)) for m in chosen], 0.5)
            models = [ModelPasses(network, roi, axes) for network, roi in chosen]
            held = mean_probabilities(batch["image"], models, 5, 4, 0.5, autocast, cpu)
            grid = InputGrid.of(batch["image"])
            with ProbabilitiesFile(tmp_path / "p.npz", (5, *grid.shape), np.eye(4), ["c"] * 5) as file:
                labels = labels_on_input_grid(held, grid, config.label_manager, file)
        saved = np.load(tmp_path / "p.npz")["probabilities"]
        assert labels.shape == saved.shape[1:] == nib.load(path).shape, name
        np.testing.assert_allclose(saved, expected.numpy(), rtol=0, atol=1e-3, err_msg=name)
        assert len(np.unique(labels)) > 1
        # Each pass is added in steps of 1/65534 (half a step of rounding for each class): only two classes
        # within that many steps of each other can swap; with one pass, none do here.
        differing = labels != expected.argmax(dim=0).numpy()
        top_two = expected.numpy()[:, differing]
        top_two.sort(axis=0)
        passes = len(chosen) * len(mirrorings(axes))
        assert (top_two[-1] - top_two[-2] < passes / 65534).all() and differing.mean() < 1e-4, name
        assert passes > 1 or not differing.any(), name


@pytest.mark.parametrize(
    ("shape", "roi", "overlap"),
    [((40, 36, 50), (16, 16, 16), 0.5), ((20, 33, 19), (16, 16, 24), 0.25), ((12, 40, 33), (16, 8, 16), 0)],
)
def test_stitched_slabs_are_monai_sliding_window_mean(shape, roi, overlap):
    """The windows, their padding where the volume is smaller than the ROI, and their mean: MONAI's."""
    from engine.stitching import stitched_slabs

    network = torch.nn.Conv3d(2, 3, 3, padding=1)
    image = torch.randn(1, 2, *shape)
    with torch.no_grad():
        expected = sliding_window_inference(image, roi, 3, network, overlap=overlap)[0]
        plain = torch.autocast("cpu", enabled=False)
        slabs = list(stitched_slabs(image, network, roi, 2, overlap, plain, torch.device("cpu"), lambda x: x))
    assert [s.start for s in slabs] == sorted(s.start for s in slabs) and slabs[0].start == 0
    assert all(a.stop == b.start for a, b in itertools.pairwise(slabs)) and slabs[-1].stop == shape[2]
    torch.testing.assert_close(torch.cat([s.values for s in slabs], dim=-1), expected, rtol=1e-5, atol=1e-5)


def test_dice_from_label_maps_is_monai_compute_dice():
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot

    from engine.validation import dice_per_class

    generator = torch.Generator().manual_seed(0)
    label = torch.randint(0, 4, (10, 12, 9), generator=generator)
    label[label == 3] = 2  # class 3 absent: NaN
    prediction = torch.randint(0, 4, (10, 12, 9), generator=generator)
    expected = compute_dice(one_hot(prediction[None, None], 4), one_hot(label[None, None], 4))[0]
    torch.testing.assert_close(dice_per_class(prediction, label, 4), expected.float(), equal_nan=True)
    ignored = dice_per_class(prediction, label, 4, ignore_label=2)  # class 2's voxels: counted nowhere
    kept = label != 2
    by_hand = 2 * ((prediction == 1) & (label == 1)).sum() / (((prediction == 1) & kept).sum() + (label == 1).sum())
    assert torch.isclose(ignored[1], by_hand.float()) and ignored[2:].isnan().all()


def test_validation_scores_are_those_of_the_whole_volume_argmax(phantom, weights):
    """Validation stitches slab by slab and keeps labels only: the Dice of the whole-volume argmax."""
    from monai.data import DataLoader, Dataset
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot

    from dataset.cases import find_cases
    from engine.validation import validation_scores

    card = json.loads(Path(f"{weights[0]}.json").read_text())
    model = build_network(card["network"], 1, 5, **card["network_args"]).eval()
    model.load_state_dict(torch.load(weights[0], weights_only=True))
    config = load_dataset_config("flare").with_preprocessing(card)
    _, val_transforms = build_transforms(config, "train", (32, 32, 32))
    cases = find_cases(config, phantom, "validation") + find_cases(config, phantom, "test")
    loader = DataLoader(Dataset(cases, val_transforms), batch_size=1)
    scores = validation_scores(
        model, loader, (32, 32, 32), 2, PRESETS["flare"].label_manager, torch.device("cpu"), progress=False
    )
    expected = []
    with torch.no_grad():
        for batch in loader:
            prediction = sliding_window_inference(batch["image"], (32, 32, 32), 2, model).argmax(1, keepdim=True)
            expected.append(compute_dice(one_hot(prediction, 5), one_hot(batch["label"].long(), 5))[0])
    assert scores.shape == (3, 5)
    torch.testing.assert_close(scores, torch.stack(expected).float(), equal_nan=True)


def test_a_case_over_the_memory_limit_is_refused_before_any_is_segmented(phantom, weights, tmp_path, monkeypatch):
    import engine.infer

    def network_ran(*args, **kwargs):
        raise AssertionError("the network ran")

    monkeypatch.setattr(engine.infer, "mean_probabilities", network_ran)
    output = tmp_path / "pred"
    argv = flags(root=phantom, output=output, trained_weights=weights[0], memory_limit=0.5, **PREDICT)
    message = exit_message(test_seg.main, argv)
    assert "\n" not in message.strip() and message.startswith("error: phantom_00")
    assert re.search(
        r"segmenting needs about \d\.\d GB \(this process \d\.\d GB; 5 outputs x \d+x\d+x\d+ voxels on the network "
        r"grid",
        message,
    )
    assert message.strip().endswith(
        "voxels on the network grid; TRAINING.md, Memory), more than --memory_limit 0.5 (GB) allows: raise it where "
        "the machine has more"
    )
    assert not output.exists() or not any(output.iterdir())


def test_argmax_of_classes_is_torch_argmax_with_ties_to_the_first():
    from dataset.labels import argmax_of_classes

    values = torch.randint(0, 3, (5, 7, 6, 4)).float()  # many ties
    np.testing.assert_array_equal(argmax_of_classes(values).numpy(), values.argmax(dim=0).numpy())
    assert argmax_of_classes(values).dtype == torch.uint8


def test_on_a_gpu_the_probabilities_move_to_the_cpu_or_the_case_is_refused_before_it_runs(phantom, monkeypatch, capsys):
    """_check_memory on a CUDA device, its free memory set for the test (no GPU needed): the probabilities
    stay on the GPU when they fit half of it, go to the CPU when not, and a GPU that cannot hold one row of
    windows refuses the case in one line naming what to change."""
    import argparse
    import math
    import types

    import engine.infer
    from engine.common import NetworkChoice
    from engine.memory import network_grid_shape

    image = str(sorted((phantom / "imagesTs").glob("*.nii.gz"))[0])
    config = load_dataset_config("flare")
    choice = NetworkChoice("REPUXNET", {"feat_size": [4, 8, 16, 32], "ks": 3, "hidden_size": 16})
    model = types.SimpleNamespace(
        config=config, in_channels=1, out_channels=5, roi=(32, 32, 32), state={}, weights="w.pth", choice=choice
    )
    args = argparse.Namespace(memory_limit=100.0, sw_batch_size=4, overlap=0.5, num_workers=0, cache_rate=0.0, amp=None)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(engine.infer, "activation_bytes", lambda *args: 2**20)  # a network of 1 MB activations
    header = nib.load(image)
    probabilities = 2 * 5 * math.prod(network_grid_shape(header.shape, header.affine, config.spacing))
    for free, where in ((2**30, "held on cuda:0\n"), (2 * probabilities - 2, "held on the CPU (too large for")):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, 80 * 2**30))
        engine.infer._check_memory(args, [{"image": image}], [model], cuda)
        assert where in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**20, 80 * 2**30))
    with pytest.raises(engine.infer.UsageError) as refused:
        engine.infer._check_memory(args, [{"image": image}], [model], cuda)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("phantom_00")
    assert message.endswith("which has 1 MB free: use --sw_batch_size 1, or --device cpu")
    assert re.search(r"on cuda:0 \(the network's activations for \d windows, a row of 32x32x32 windows across", message)


# ---- what is written, where: the output folder apart from the inputs, a case's files replaced together ----


def test_an_output_folder_that_holds_the_images_is_refused(phantom, weights, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(phantom / "imagesTs", images)
    for given in (images, sorted(images.glob("*.nii.gz"))[0]):  # a folder, or a file of it (a shell glob)
        argv = flags(input=given, output=images, trained_weights=weights[0], **PREDICT)
        message = exit_message(test_seg.main, argv)
        assert "\n" not in message.strip()
        assert message.startswith(f"error: --output {images}: the folder of the images to segment (")
        assert message.endswith("would be read as images by the next run over it: write them to another folder")
    assert not list(images.glob("*_seg.nii.gz"))


def written_case(folder: Path) -> dict:
    """The case files in ``folder``: name -> bytes (temporary files, named with a leading dot, included)."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    "step", ["probabilities", "segmentation", "fsync", "replace 1", "replace 2", "replace 3", "replace 4"]
)
def test_an_interrupt_at_any_point_leaves_the_previous_pair_or_the_new_one(phantom, tmp_path, monkeypatch, step):
    """A case's segmentation and probabilities rewritten over an earlier pair, an interrupt injected at one
    step (each write, the flush, each rename): afterwards the folder holds the earlier pair, whole, and no
    temporary file; the same write without an interrupt replaces both."""
    import os
    import types

    from monai.data import list_data_collate

    import engine.infer
    import engine.predict

    config = load_dataset_config("flare")
    case = {"image": str(sorted((phantom / "imagesTs").glob("*.nii.gz"))[0])}
    image = list_data_collate([build_transforms(config, "test")(case)])["image"]
    model = types.SimpleNamespace(outputs=config.label_manager, out_channels=5)
    generator = torch.Generator().manual_seed(0)

    def write() -> dict:
        probabilities = torch.softmax(torch.randn(5, *image.shape[2:], generator=generator), dim=0)
        engine.infer._write_case(probabilities, image, case, [], True, model, tmp_path)
        return written_case(tmp_path)

    old = write()
    calls = {"replace": 0}
    real_replace, real_fsync = os.replace, os.fsync
    real_file_write, real_segmentation = engine.predict.ProbabilitiesFile.write, engine.infer.write_segmentation

    def replace(source, target):
        calls["replace"] += 1
        if step == f"replace {calls['replace']}":
            raise KeyboardInterrupt
        return real_replace(source, target)

    def fsync(descriptor):
        if step == "fsync":
            raise KeyboardInterrupt
        return real_fsync(descriptor)

    def file_write(self, slab):
        real_file_write(self, slab)
        if step == "probabilities":
            raise KeyboardInterrupt

    def segmentation(*args):
        real_segmentation(*args)
        if step == "segmentation":
            raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(os, "replace", replace)
        patched.setattr(os, "fsync", fsync)
        patched.setattr(engine.predict.ProbabilitiesFile, "write", file_write)
        patched.setattr(engine.infer, "write_segmentation", segmentation)
        with pytest.raises(KeyboardInterrupt):
            write()
    assert written_case(tmp_path) == old  # the earlier pair, whole, and nothing else
    if step.startswith("replace"):
        assert calls["replace"] >= int(step[-1])  # the step was reached (and the earlier pair put back)
    new = write()
    assert sorted(new) == sorted(old) and all(new[name] != old[name] for name in old)


def test_a_region_probability_of_exactly_one_half_is_not_painted_after_any_number_of_passes():
    """nnU-Net paints a region where its probability is above 0.5. A network whose region logit is 0 (sigmoid
    exactly 0.5) in every pass, two models with four mirrorings each: the held value stays exactly 0.5 and is
    not painted; one step above it is."""
    from dataset.labels import LabelManager
    from engine.input_grid import InputGrid, labels_on_input_grid
    from engine.stitching import ProbabilityVolume

    manager = LabelManager(["background", "a", "b"], {"a or b": [1, 2], "b": [2]}, [1, 2])
    shape = (12, 10, 9)
    step_above = float(torch.logit(torch.tensor(0.5 + 1.2 / ProbabilityVolume.STEPS, dtype=torch.float64)))

    def network(windows: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(windows.shape[0], 2, *windows.shape[2:])
        logits[:, 1] = step_above
        return logits

    image = torch.zeros(1, 1, *shape)
    models = [ModelPasses(network, (8, 8, 8), (0, 1)), ModelPasses(network, (6, 6, 6), (1, 2))]
    autocast = torch.autocast("cpu", enabled=False)
    probabilities = mean_probabilities(image, models, 2, 4, 0.5, autocast, torch.device("cpu"), finish=manager.finish)
    assert (probabilities.codes[0] == 0).all()  # the code of exactly 0.5
    grid = InputGrid(shape, np.eye(4), shape, (0, 0, 0))
    labels = labels_on_input_grid(probabilities, grid, manager)
    assert (labels == 2).all()  # region 1 (0.5) not painted, region 2 (one step above) painted over background


def test_input_voxels_on_network_voxels_are_copied_as_held():
    """A native-spacing grid (the input's voxels on the network's, axes permuted and flipped, the crop offset)
    gives the held probabilities exactly; a grid a hair off samples trilinearly and agrees within the hair."""
    from engine.input_grid import InputGrid
    from engine.stitching import ProbabilityVolume

    network_shape = (9, 7, 5)
    volume = ProbabilityVolume(3, network_shape, torch.device("cpu"))
    volume.add(0, 5, torch.rand(3, *network_shape, generator=torch.Generator().manual_seed(1)), 1.0)
    # input voxel (x, y, z) is resampled voxel (y + 2, x + 1, 7 - z); the crop starts at (1, 1, 0)
    to_resampled = np.array([[0, 1, 0, 2], [1, 0, 0, 1], [0, 0, -1, 7], [0, 0, 0, 1]], dtype=float)
    grid = InputGrid((8, 9, 8), to_resampled, (12, 10, 8), (1, 1, 0))
    assert grid.voxel_for_voxel == ((1, 1, 1), (0, 1, 2), (2, -1, 7))
    outside = [1.0, 0.0, 0.0]
    copied = torch.cat([values for _, _, values in grid.slabs(volume, outside)], dim=-1)
    held = volume.float()
    for x, y, z in itertools.product(range(8), range(9), range(8)):
        r = np.clip([y + 2, x + 1, 7 - z], 0, [11, 9, 7]) - np.array([1, 1, 0])
        inside = all(0 <= r[a] < network_shape[a] for a in range(3))
        expected = held[:, r[0], r[1], r[2]] if inside else torch.tensor(outside)
        assert torch.equal(copied[:, x, y, z], expected), (x, y, z)
    nudged = to_resampled.copy()
    nudged[0, 3] += 1e-4  # no longer on the voxels: sampled
    sampled = InputGrid((8, 9, 8), nudged, (12, 10, 8), (1, 1, 0))
    assert sampled.voxel_for_voxel is None
    values = torch.cat([v for _, _, v in sampled.slabs(volume, outside)], dim=-1)
    assert (values - copied).abs().max() < 2e-4
