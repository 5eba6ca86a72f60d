"""Region-based training (nnU-Net's overlapping regions, BraTS): the rules against independent
implementations of nnU-Net's, and a BraTS-like phantom from its dataset.json to evaluated segmentations
through every route."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_RUN, exit_message, flags
from scipy import ndimage
from test_export import Segmentations, run_bundle

import export
import main_finetune
import main_train
import test_seg
from dataset.description import DatasetError, load_dataset_config
from dataset.labels import LabelManager
from dataset.portable import keep_largest
from dataset.transforms import CropCentres
from engine.crossval import best_checkpoint_summary
from engine.evaluate import evaluate_case
from engine.losses import RegionDiceBCELoss
from engine.validation import dice_per_region
from phantom import BRATS_REGIONS, write_dataset

BRATS = LabelManager(
    ("background", "edema", "non-enhancing tumor", "enhancing tumor"), BRATS_REGIONS, (1, 2, 3), ignore_label=None
)
PREDICT = dict(num_workers=0, device="cpu", cache_rate=0, overlap=0, sw_batch_size=4)


def write_json(path: Path, content: dict) -> Path:
    path.write_text(json.dumps(content))
    return path


def nnunet_json(labels: dict, **extra) -> dict:
    return {"channel_names": {"0": "T1"}, "labels": labels, "file_ending": ".nii.gz", **extra}


# ---- datasets ----


def test_nnunet_msd_and_our_json_give_the_same_regions(tmp_path):
    nnunet = write_json(
        tmp_path / "nnunet.json",
        nnunet_json({"background": 0, **BRATS_REGIONS, "ignore": 4}, regions_class_order=[1, 2, 3]),
    )
    config = load_dataset_config(str(nnunet))
    assert config.regions == (("whole tumor", (1, 2, 3)), ("tumor core", (2, 3)), ("enhancing tumor", (3,)))
    assert config.regions_class_order == (1, 2, 3) and config.num_outputs == 3 and config.num_classes == 4
    assert config.labels == ("background", "label 1", "label 2", "enhancing tumor")  # only label 3 is named alone
    assert config.ignore_label == 4 and config.label_manager.has_regions
    msd_labels = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
    msd = write_json(
        tmp_path / "msd.json",
        {"modality": {"0": "FLAIR"}, "labels": msd_labels, "regions": BRATS_REGIONS, "regions_class_order": [1, 2, 3]},
    )
    decathlon = load_dataset_config(str(msd))
    assert decathlon.regions == config.regions and decathlon.labels[1] == "edema" and decathlon.num_outputs == 3
    plain = dict(json.loads(msd.read_text()))
    del plain["regions"], plain["regions_class_order"]
    assert load_dataset_config(str(write_json(tmp_path / "plain.json", plain))).num_outputs == 4


@pytest.mark.parametrize(
    "content, message",
    [
        (nnunet_json({"background": 0, **BRATS_REGIONS}), "need 'regions_class_order' .*3 values"),
        (
            nnunet_json({"background": 0, **BRATS_REGIONS}, regions_class_order=[1, 2]),
            "'regions_class_order' has 2 values for 3 regions",
        ),
        (nnunet_json({"background": 0, "a": [1, 3], "b": [3]}, regions_class_order=[1, 3]), "consecutive 0..3"),
        (nnunet_json({"background": 0, "a": [0, 1], "b": [1]}, regions_class_order=[1, 1]), "holds background 0"),
        (nnunet_json({"background": 0, "a": 1}, regions_class_order=[1]), "'regions_class_order' without regions"),
        (
            {"labels": {"0": "background", "1": "a", "2": "b"}, "regions": {"a": [1]}, "regions_class_order": [1]},
            r"label 2 \(b\) is in no region",
        ),
        (
            nnunet_json({"background": 0, **BRATS_REGIONS}, regions_class_order=[1, 2, 5]),
            "values must be 1..3",
        ),
        (
            nnunet_json({"background": 0, **BRATS_REGIONS}, regions_class_order=[1, 2, 3], lateral_pairs=[[1, 2]]),
            "'lateral_pairs' with regions",
        ),
        (
            nnunet_json({"background": 0, **BRATS_REGIONS, "all": [1, 2, 3]}, regions_class_order=[1, 2, 3, 1]),
            r"regions 'whole tumor' and 'all' hold the same labels \[1, 2, 3\]: each region must be a set of its own",
        ),
        (
            nnunet_json({"background": 0, **BRATS_REGIONS}, regions_class_order=[1, 3, 3]),
            r"regions 'tumor core' and 'enhancing tumor' both paint label 3",
        ),
        (
            nnunet_json({"background": 0, **BRATS_REGIONS, "ignore": 3}, regions_class_order=[1, 2, 3]),
            r"'ignore' label 3 is also in region 'whole tumor' \[1, 2, 3\]: the ignore label must be a value",
        ),
    ],
)
def test_what_nnunet_rejects_is_refused_in_one_line(tmp_path, content, message):
    path = write_json(tmp_path / "dataset.json", content)
    with pytest.raises(DatasetError, match=message) as raised:
        load_dataset_config(str(path))
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_a_key_given_twice_in_a_dataset_json_is_refused(tmp_path):
    """JSON keeps the last of two equal keys: a region (or the labels) given twice would vanish silently."""
    path = tmp_path / "dataset.json"
    path.write_text(
        '{"channel_names": {"0": "T1"}, "file_ending": ".nii.gz", "regions_class_order": [1, 2],\n'
        ' "labels": {"background": 0, "whole tumor": [1, 2], "core": [2], "whole tumor": [1, 2]}}'
    )
    with pytest.raises(DatasetError) as raised:
        load_dataset_config(str(path))
    assert str(raised.value) == (
        f"--dataset {path}: key 'whole tumor' appears twice in one object (JSON would keep the last one silently); "
        "keep one"
    )


def test_label_files_with_values_the_regions_do_not_declare_are_refused(tmp_path):
    root = tmp_path / "brats"
    write_dataset(root, num_train=2, num_test=0, seed=1, modality="brats", layout="nnunet")
    label_path = sorted((root / "labelsTr").glob("*.nii.gz"))[0]
    image = nib.load(label_path)
    label = np.asarray(image.dataobj).copy()
    label[0, 0, 0] = 4
    nib.save(nib.Nifti1Image(label, image.affine), label_path)
    argv = flags(dataset=root / "dataset.json", output=tmp_path / "run", fold="all", **TINY_RUN)
    message = exit_message(main_train.main, argv)
    assert label_path.name in message and "4" in message


# ---- the rules, against independent implementations of nnU-Net's ----


def nnunet_region_masks(label: np.ndarray, regions) -> np.ndarray:
    """nnU-Net's region_or_label_to_mask, region by region."""
    masks = np.zeros((len(regions), *label.shape), dtype=bool)
    for i, values in enumerate(regions):
        for value in values:
            masks[i][label == value] = True
    return masks


def test_region_masks_are_nnunets(tmp_path):
    label = torch.randint(0, 5, (2, 1, 6, 7, 5))  # 4: the ignore label, in no region
    masks = LabelManager(BRATS.classes, BRATS_REGIONS, (1, 2, 3), ignore_label=4).region_masks(label)
    for b in range(2):
        expected = nnunet_region_masks(label[b, 0].numpy(), BRATS_REGIONS.values())
        np.testing.assert_array_equal(masks[b].numpy(), expected)


def hand_written_loss(logits: torch.Tensor, label: np.ndarray, ignore: int | None) -> float:
    """nnU-Net's DC_and_BCE_loss written out in float64, plus 1 (see RegionDiceBCELoss)."""
    x = logits.double().numpy()
    p = 1 / (1 + np.exp(-x))
    target = np.stack([nnunet_region_masks(label[b, 0], BRATS_REGIONS.values()) for b in range(x.shape[0])])
    target = target.astype(np.float64)
    mask = np.ones_like(label, dtype=np.float64) if ignore is None else (label != ignore).astype(np.float64)
    bce = np.maximum(x, 0) - x * target + np.log1p(np.exp(-np.abs(x)))
    bce = bce.mean() if ignore is None else (bce * mask).sum() / mask.sum()
    dice = []
    for b in range(x.shape[0]):
        for r in range(x.shape[1]):
            m = mask[b, 0]
            tp, sp, st = (p[b, r] * target[b, r] * m).sum(), (p[b, r] * m).sum(), (target[b, r] * m).sum()
            dice.append((2 * tp + 1e-5) / max(st + sp + 1e-5, 1e-8))
    return bce + 1 - float(np.mean(dice))


@pytest.mark.parametrize("ignore", [None, 4])
def test_the_region_loss_is_nnunets_dice_and_bce(ignore):
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 8, 8, 8, generator=generator) * 3
    label = torch.randint(0, 4 if ignore is None else 5, (2, 1, 8, 8, 8), generator=generator)
    manager = LabelManager(BRATS.classes, BRATS_REGIONS, (1, 2, 3), ignore_label=ignore)
    loss = RegionDiceBCELoss(manager)(logits, label)
    assert loss.item() == pytest.approx(hand_written_loss(logits, label.numpy(), ignore), rel=1e-5)
    if ignore is not None:  # what ignored voxels hold changes nothing
        changed = logits.clone()
        changed[(label == ignore).expand_as(logits)] = 50.0
        assert RegionDiceBCELoss(manager)(changed, label).item() == pytest.approx(loss.item(), rel=1e-6)


def test_a_fully_unannotated_crop_adds_nothing_to_the_region_loss():
    """A second crop of ignore voxels only: the loss is the first crop's alone (the class loss's rule), where
    nnU-Net's masked Dice would score that crop smooth / smooth = 1 and lower the loss."""
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 8, 8, 8, generator=generator) * 3
    label = torch.randint(0, 5, (2, 1, 8, 8, 8), generator=generator)
    label[1] = 4
    manager = LabelManager(BRATS.classes, BRATS_REGIONS, (1, 2, 3), ignore_label=4)
    both, first = RegionDiceBCELoss(manager)(logits, label), RegionDiceBCELoss(manager)(logits[:1], label[:1])
    assert both.item() == pytest.approx(first.item(), rel=1e-6)
    assert first.item() == pytest.approx(hand_written_loss(logits[:1], label[:1].numpy(), 4), rel=1e-5)
    assert hand_written_loss(logits, label.numpy(), 4) < both.item()  # nnU-Net's rule counts the empty crop
    assert RegionDiceBCELoss(manager)(logits[1:], label[1:]).item() == 0.0  # nothing to learn from it alone


def test_validation_counts_a_region_predicted_where_the_label_has_none():
    """A region absent from the label but predicted scores 0, absent from both is left out (NaN): as
    test_seg.py --evaluate (engine.evaluate) scores the case, so false alarms count when weights are chosen."""
    label = np.zeros((10, 9, 8), dtype=np.int64)
    label[2:6, 2:6, 2:6] = 1  # edema only: no core, no enhancing tumour
    prediction = label.copy()
    prediction[7:9, 7:9, 6:8] = 3  # a false enhancing tumour, which is also core and whole tumour
    masks = torch.from_numpy(nnunet_region_masks(prediction, BRATS_REGIONS.values()))
    expected = torch.from_numpy(nnunet_region_masks(label, BRATS_REGIONS.values()))
    scores = dice_per_region(masks, expected)
    groups = {1: (1, 2, 3), 2: (2, 3), 3: (3,)}
    results = evaluate_case(prediction, label, (1.0, 1.0, 1.0), groups)
    assert scores[1].item() == 0.0 and scores[2].item() == 0.0 and results[3]["dice"] == 0.0
    assert scores.tolist() == pytest.approx([results[k]["dice"] for k in (1, 2, 3)], rel=1e-6)
    nothing = dice_per_region(torch.from_numpy(nnunet_region_masks(label, BRATS_REGIONS.values())), expected)
    assert nothing[0].item() == 1.0 and torch.isnan(nothing[1:]).all()  # absent from both: no score


def test_region_loss_learns_nested_regions():
    """A few steps of gradient descent on free logits reach the nested target."""
    label = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    label[..., 1:7, 1:7, 1:7], label[..., 2:6, 2:6, 2:6], label[..., 3:5, 3:5, 3:5] = 1, 2, 3
    logits = torch.zeros(1, 3, 8, 8, 8, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.3)
    for _ in range(60):
        optimizer.zero_grad()
        RegionDiceBCELoss(BRATS)(logits, label).backward()
        optimizer.step()
    predicted = BRATS.label_map(torch.sigmoid(logits[0].detach()))
    np.testing.assert_array_equal(predicted.numpy(), label[0, 0].numpy())


def test_sigmoids_become_the_label_map_by_regions_class_order():
    generator = torch.Generator().manual_seed(5)
    probabilities = torch.rand(3, 9, 8, 7, generator=generator)
    for order in ((1, 2, 3), (3, 1, 2)):
        manager = LabelManager(BRATS.classes, BRATS_REGIONS, order)
        expected = np.zeros((9, 8, 7), dtype=np.uint8)  # nnU-Net's convert_probabilities_to_segmentation
        for i, value in enumerate(order):
            expected[probabilities[i].numpy() > 0.5] = value
        np.testing.assert_array_equal(manager.label_map(probabilities).numpy(), expected)
    assert BRATS.outside_probabilities() == [0.0, 0.0, 0.0]


def test_per_region_metrics_on_label_maps_are_nnunets():
    rng = np.random.default_rng(0)
    label, prediction = rng.integers(0, 4, (12, 10, 9)), rng.integers(0, 4, (12, 10, 9))
    label[0] = 4  # unannotated
    results = evaluate_case(prediction, label, (1.0, 1.0, 2.0), {1: (1, 2, 3), 2: (2, 3), 3: (3,)}, ignore_label=4)
    annotated = label != 4
    for key, values in {1: (1, 2, 3), 2: (2, 3), 3: (3,)}.items():
        reference, predicted = nnunet_region_masks(label, [values])[0], nnunet_region_masks(prediction, [values])[0]
        tp = (reference & predicted & annotated).sum()
        fp, fn = (~reference & predicted & annotated).sum(), (reference & ~predicted & annotated).sum()
        assert results[key]["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    masks = torch.from_numpy(nnunet_region_masks(prediction, BRATS_REGIONS.values()))
    expected = torch.from_numpy(nnunet_region_masks(label, BRATS_REGIONS.values()))
    dice = dice_per_region(masks, expected, torch.from_numpy(annotated))
    assert dice.tolist() == pytest.approx([results[k]["dice"] for k in (1, 2, 3)], rel=1e-6)


def test_the_balanced_crops_centre_foreground_on_any_region_voxel(tmp_path):
    path = write_json(
        tmp_path / "d.json", nnunet_json({"background": 0, **BRATS_REGIONS}, regions_class_order=[1, 2, 3])
    )
    config = load_dataset_config(str(path))
    label = torch.randint(0, 4, (1, 6, 5, 4))
    foreground, _ = CropCentres(config.background_crops, config.ignore_label)(label, None)
    union = config.label_manager.region_masks(label[None])[0].any(0).reshape(-1)
    np.testing.assert_array_equal(foreground.numpy(), torch.nonzero(union).reshape(-1).numpy())


def test_keep_largest_of_a_region_keeps_its_largest_component():
    labels = np.zeros((12, 12, 12), dtype=np.uint8)
    labels[1:5, 1:5, 1:5] = 1
    labels[2:4, 2:4, 2:4] = 3  # inside the larger lesion
    labels[8:10, 8:10, 8:10] = 2  # a second, smaller lesion
    kept = keep_largest(labels, [(1, 2, 3)])
    assert (kept[8:10, 8:10, 8:10] == 0).all()
    np.testing.assert_array_equal(kept[:6, :6, :6], labels[:6, :6, :6])


# ---- a BraTS-like phantom from its dataset.json to evaluated segmentations ----


@pytest.fixture(scope="module")
def brats(tmp_path_factory):
    """A BraTS-like phantom (nnU-Net layout), a region model trained on it with --fold all, and its exports."""
    root = tmp_path_factory.mktemp("brats")
    write_dataset(root, num_train=3, num_test=2, seed=2, modality="brats", layout="nnunet")
    run = tmp_path_factory.mktemp("brats_run")
    training = flags(dataset=root / "dataset.json", output=run, max_iter=4, eval_step=4, lr=1e-2, fold="all")
    main_train.main(training + flags(**{**TINY_RUN, "kernel_size": 5}))
    weights = run / "final_model.pth"
    exported = tmp_path_factory.mktemp("brats_export")
    export.main(flags(trained_weights=weights, output=exported))
    return root, weights, exported


def segment(weights: list, root: Path, output: Path, extra: tuple = ()) -> Segmentations:
    images = sorted(str(p) for p in (root / "imagesTs").glob("*.nii.gz"))
    argv = flags(output=output, labels=root / "labelsTs", **PREDICT) + ["--save_probabilities", "--input", *images]
    test_seg.main(argv + ["--trained_weights", *map(str, weights), *extra])
    return Segmentations(output)


def one_case(root: Path) -> list[str]:
    """The four channel files of the first test case."""
    return sorted(str(p) for p in (root / "imagesTs").glob("*.nii.gz"))[:4]


def test_the_card_records_the_regions(brats):
    _, weights, _ = brats
    card = json.loads(Path(f"{weights}.json").read_text())
    assert card["out_channels"] == 3 and card["regions"] == BRATS_REGIONS and card["regions_class_order"] == [1, 2, 3]


def test_a_region_model_segments_and_scores_per_region(brats, tmp_path, capsys):
    root, weights, _ = brats
    output = tmp_path / "pth"
    segmented = segment([weights], root, output, ("--evaluate",))
    assert len(segmented) == 2
    printed = capsys.readouterr().out
    assert "regions rebuilt from the label maps" in printed and "| region | Dice |" in printed
    assert "| whole tumor |" in printed
    summary = json.loads((output / "summary.json").read_text())
    assert list(summary["classes"]) == list(BRATS_REGIONS)
    rows = (output / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("case,class,name") and len(rows) == 1 + 2 * 3
    for name, image in segmented.items():
        saved = np.load(output / name.replace("_seg.nii.gz", "_probabilities.npz"))
        probabilities = saved["probabilities"].astype(np.float32)
        assert list(saved["classes"]) == list(BRATS_REGIONS) and probabilities.shape[0] == 3
        assert probabilities.min() >= 0 and probabilities.max() <= 1
        labels = np.asarray(image.dataobj)
        # the label map is the saved sigmoids painted by regions_class_order (but at float16's rounding of 0.5)
        expected = BRATS.label_map(torch.from_numpy(probabilities)).numpy()
        near = (np.abs(probabilities - 0.5) < 1e-3).any(0)
        np.testing.assert_array_equal(labels[~near], expected[~near])


def test_a_label_map_is_refused_for_a_region_model(brats, tmp_path):
    root, weights, _ = brats
    argv = flags(root=root, output=tmp_path / "out", trained_weights=weights, label_map="1:1", **PREDICT)
    message = exit_message(test_seg.main, argv)
    assert message == (
        "error: --label_map 1:1: the model predicts regions (whole tumor, tumor core, enhancing tumor), and a label "
        "map renames classes; a region model is evaluated on labels of its own regions' values"
    )


def test_the_region_bundle_names_its_labels_by_their_regions(brats):
    _, _, exported = brats
    readme = (exported / "bundle" / "docs" / "README.md").read_text()
    assert "the label map's values: 0 background, 1 whole tumor, 2 tumor core, 3 enhancing tumor" in readme
    assert "label 1" not in readme


def test_every_route_gives_the_region_labels(brats, tmp_path):
    """.pth, TorchScript, ONNX on ONNX Runtime and OpenVINO, and the MONAI bundle: the same label maps, but
    where a sigmoid is at 0.5 within what the routes' float32 and the held resolution differ by."""
    root, weights, exported = brats
    expected = segment([weights], root, tmp_path / "pth")
    labels = np.concatenate([np.asarray(image.dataobj).ravel() for image in expected.values()])
    assert len(np.unique(labels)) > 1
    routes = {name: segment([exported / name], root, tmp_path / name) for name in ("model.ts", "model.onnx")}
    routes["openvino"] = segment([exported / "model.onnx"], root, tmp_path / "openvino", ("--runtime", "openvino"))
    run_bundle(exported / "bundle", root / "imagesTs", tmp_path / "bundle", cwd=tmp_path)
    routes["bundle"] = Segmentations(tmp_path / "bundle")
    for route, segmented in routes.items():
        assert len(segmented) == 2, route
        for (name, image), other in zip(expected.items(), segmented.values(), strict=True):
            differing = np.asarray(other.dataobj) != np.asarray(image.dataobj)
            if differing.any():  # only where a sigmoid is at 0.5 within the held resolution
                saved = np.load(expected.folder / name.replace("_seg.nii.gz", "_probabilities.npz"))["probabilities"]
                assert (np.abs(saved[:, differing].astype(np.float32) - 0.5).min(0) < 1e-3).all(), route
    config = json.loads((exported / "bundle" / "configs" / "inference.json").read_text())
    assert config["label_manager"]["regions"] == BRATS_REGIONS
    metadata = json.loads((exported / "bundle" / "configs" / "metadata.json").read_text())
    assert list(metadata["network_data_format"]["outputs"]["pred"]["channel_def"].values()) == list(BRATS_REGIONS)


def test_an_ensemble_with_tta_and_keep_largest_runs_on_regions(brats, tmp_path):
    root, weights, exported = brats
    extra = ("--tta", "--keep_largest", "all")
    segmented = segment([weights, exported / "model.ts"], root, tmp_path / "ensemble", extra)
    for image in segmented.values():
        labels = np.asarray(image.dataobj)
        _, count = ndimage.label(labels > 0, structure=np.ones((3, 3, 3)))
        assert count <= 1  # the whole tumour is one component
    message = exit_message(
        test_seg.main,
        flags(output=tmp_path / "bad", **PREDICT)
        + ["--input", *one_case(root), "--trained_weights", str(weights), "--keep_largest", "4"],
    )
    assert "the model's regions are 1 whole tumor, 2 tumor core, 3 enhancing tumor" in message


def test_a_region_model_and_a_class_model_are_not_ensembled(brats, tmp_path):
    root, weights, _ = brats
    plain = json.loads((root / "dataset.json").read_text())
    plain["labels"] = {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumor": 3}
    del plain["regions_class_order"]
    dataset = write_json(root / "plain_dataset.json", plain)
    run = tmp_path / "classes"
    main_train.main(flags(dataset=dataset, output=run, max_iter=2, eval_step=2, fold="all", **TINY_RUN))
    message = exit_message(
        test_seg.main,
        flags(output=tmp_path / "out", **PREDICT)
        + ["--input", *one_case(root), "--trained_weights", str(weights), str(run / "final_model.pth")],
    )
    assert "cannot be ensembled" in message and "3 regions" in message and "4 classes" in message
    # fine-tuning between the two: the class model's weights under a region head, and back
    tuned = tmp_path / "tuned"
    finetune = dict(max_iter=2, eval_step=2, fold="all", pretrain=True, **TINY_RUN)
    main_finetune.main(
        flags(dataset=root / "dataset.json", output=tuned, pretrained_weights=run / "final_model.pth")
        + flags(pretrain_classes=4, **finetune)
    )
    assert json.loads((tuned / "final_model.pth.json").read_text())["regions"] == BRATS_REGIONS
    back = tmp_path / "back"
    main_finetune.main(
        flags(dataset=dataset, output=back, pretrained_weights=tuned / "final_model.pth")
        + flags(pretrain_classes=3, **finetune)
    )
    card = json.loads((back / "final_model.pth.json").read_text())
    assert card["out_channels"] == 4 and "regions" not in card


def test_the_decathlon_layout_with_regions_trains_validates_per_region_and_cv_summary_reads_it(tmp_path, capsys):
    root = tmp_path / "msd"
    write_dataset(root, num_train=4, num_test=1, seed=4, modality="brats", layout="decathlon")
    run = tmp_path / "fold0"
    training = flags(dataset=root / "dataset.json", output=run, max_iter=2, eval_step=2, fold=0, num_folds=2)
    main_train.main(training + flags(**TINY_RUN))
    printed = capsys.readouterr().out
    assert "3 regions (whole tumor [1, 2, 3]" in printed and "over the regions" in printed
    assert "per region: whole tumor" in printed
    card = json.loads((run / "best_metric_model.pth.json").read_text())
    assert card["regions"] == BRATS_REGIONS and 0 <= card["best_metric"] <= 1
    held_out = (run / "validation" / "metrics.csv").read_text().splitlines()  # the fold's held-out cases, by region
    assert len(held_out) == 1 + 2 * 3 and {row.split(",")[2] for row in held_out[1:]} == set(BRATS_REGIONS)
    summary = best_checkpoint_summary([str(run)])
    assert summary["folds"][0]["best_dice"] == pytest.approx(card["best_metric"])


def test_region_masks_follow_left_right_flips_of_the_label_map():
    """Mirroring acts on the label map before the regions are built: flipped masks are the masks of the
    flipped map."""
    label = torch.randint(0, 4, (1, 1, 6, 5, 4))
    flipped = BRATS.region_masks(label.flip(2))
    torch.testing.assert_close(flipped, BRATS.region_masks(label).flip(2))
