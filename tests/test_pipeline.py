"""End to end on phantom data with a tiny RepUX-Net on CPU: train, fine-tune, segment, bad inputs."""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SMALL_NETWORKS as SMALL
from conftest import TINY_RUN as TINY
from conftest import exit_message, flags

import main_finetune
import main_train
import test_seg
from dataset.description import DatasetError, load_dataset_config
from networks import build_network
from phantom import write_dataset

DATALISTS = Path(__file__).resolve().parents[1] / "datalists"


TRAIN_FLAGS = flags(max_iter=4, eval_step=2, lr=1e-3, **TINY)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    write_dataset(root, num_train=2, num_val=1, num_test=2, seed=3)
    return root


@pytest.fixture(scope="module")
def trained(phantom, tmp_path_factory):
    output = tmp_path_factory.mktemp("train")
    main_train.main(flags(root=phantom, output=output) + TRAIN_FLAGS)
    return output


def test_train_writes_weights_card_and_tensorboard(trained, phantom):
    weights = trained / "best_metric_model.pth"
    state = torch.load(weights, weights_only=True)
    model = build_network("REPUXNET", 1, 5, feat_size=(4, 8, 16, 32), ks=3, hidden_size=16)
    model.load_state_dict(state, strict=True)  # a plain state_dict with the published names
    card = json.loads((trained / "best_metric_model.pth.json").read_text())
    assert card["network"] == "REPUXNET" and card["out_channels"] == 5
    assert card["network_args"] == {"feat_size": [4, 8, 16, 32], "ks": 3, "hidden_size": 16}
    assert card["classes"] == ["background", "spleen", "kidney", "liver", "pancreas"]
    assert card["roi_size"] == [32, 32, 32] and card["best_step"] in (2, 4)
    assert 0 < card["best_metric"] <= 1
    events = list((trained / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0]))
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    assert {"train/loss", "train/lr", "val/mean_dice", "val/mean_dice_foreground", "val/dice_liver"} <= set(tags)
    assert [e.step for e in accumulator.Scalars("val/mean_dice")] == [2, 4]  # two validations
    assert len(accumulator.Scalars("train/loss")) == 4


def test_train_refuses_to_overwrite_best_weights(trained, phantom):
    before = (trained / "best_metric_model.pth").read_bytes()
    message = exit_message(main_train.main, flags(root=phantom, output=trained) + TRAIN_FLAGS)
    assert "already holds best_metric_model.pth" in message and "--overwrite" in message
    assert (trained / "best_metric_model.pth").read_bytes() == before


def six_class_dataset(phantom, tmp_path) -> Path:
    """A dataset JSON over the phantom folders with six classes (one more than FLARE)."""
    description = json.loads((phantom / "dataset.json").read_text())
    description["labels"] = {**description["labels"], "5": "extra"}
    path = tmp_path / "six.json"
    path.write_text(json.dumps(description))
    return path


def test_finetune_replaces_the_head_for_another_class_count(trained, phantom, tmp_path):
    output = tmp_path / "finetune"
    weights = trained / "best_metric_model.pth"
    main_finetune.main(
        flags(
            root=phantom,
            output=output,
            dataset=six_class_dataset(phantom, tmp_path),
            pretrain=True,
            pretrained_weights=weights,
            pretrain_classes=5,
            max_iter=2,
            eval_step=2,
            lr=1e-12,
            **TINY,
        )
    )
    pretrained = torch.load(weights, weights_only=True)
    tuned = torch.load(output / "best_metric_model.pth", weights_only=True)
    assert tuned["out.conv.conv.weight"].shape == (6, 4, 1, 1, 1)
    assert json.loads((output / "best_metric_model.pth.json").read_text())["out_channels"] == 6
    # with a negligible learning rate, every other weight is still the pretrained one
    for key, value in pretrained.items():
        if not key.startswith("out.") and value.is_floating_point() and "running" not in key:
            torch.testing.assert_close(tuned[key], value, rtol=1e-4, atol=1e-6)


def test_finetune_with_pretrain_false_trains_from_scratch(phantom, tmp_path, capsys):
    output = tmp_path / "scratch"
    main_finetune.main(
        flags(
            root=phantom,
            output=output,
            dataset="flare",
            pretrain=False,
            pretrained_weights=tmp_path / "missing.pth",
            max_iter=1,
            **TINY,
        )
    )
    assert (output / "best_metric_model.pth").exists()  # the missing weights file was never opened
    assert "note: --pretrain false: training from scratch (no pretrained weights)" in capsys.readouterr().out


def test_finetune_reports_weights_that_do_not_fit(trained, phantom, tmp_path):
    message = exit_message(
        main_finetune.main,
        flags(
            root=phantom,
            output=tmp_path / "x",
            pretrain=True,
            pretrained_weights=trained / "best_metric_model.pth",
            pretrain_classes=5,
            **{**TINY, "kernel_size": 5},
        ),
    )
    assert "--pretrained_weights" in message and "does not fit REPUXNET" in message


def check_predictions(prediction_dir: Path, phantom: Path, num_classes: int = 5) -> None:
    """One uint8 segmentation per test image, of its shape and affine, with values among the classes."""
    inputs = sorted((phantom / "imagesTs").glob("*.nii.gz"))
    expected = {p.name.replace(".nii.gz", "_seg.nii.gz") for p in inputs}
    assert {p.name for p in prediction_dir.glob("*_seg.nii.gz")} == expected
    for image_path in inputs:
        image = nib.load(image_path)
        prediction = nib.load(prediction_dir / image_path.name.replace(".nii.gz", "_seg.nii.gz"))
        assert prediction.shape == image.shape
        np.testing.assert_allclose(prediction.affine, image.affine, rtol=0, atol=1e-5)
        assert prediction.get_data_dtype() == np.uint8
        values = np.unique(np.asarray(prediction.dataobj))
        assert values.min() >= 0 and values.max() < num_classes


def test_phantom_cases_are_anisotropic_in_many_orientations(phantom):
    """What the geometry checks of the predictions rely on: test inputs that are not RAS and not 1 mm."""
    images = [nib.load(p) for p in sorted(phantom.glob("images*/*.nii.gz"))]
    assert len({nib.aff2axcodes(image.affine) for image in images}) >= 3
    for image in images:
        zooms = np.array(image.header.get_zooms())
        assert zooms.max() / zooms.min() > 1.2 and image.header.get_xyzt_units()[0] == "mm"


@pytest.mark.parametrize("name", SMALL)
def test_comparison_networks_train_finetune_and_segment(name, phantom, tmp_path, monkeypatch):
    """Each comparison network through the three scripts with its registry entry (input size from
    --roi_size, head replacement, model card); only its layer widths are narrowed."""
    from networks import registry

    widths, roi = SMALL[name]
    spec = registry.get_spec(name)
    monkeypatch.setitem(registry._REGISTRY, name, dataclasses.replace(spec, defaults={**spec.defaults, **widths}))
    run = dict(network=name, roi_size=roi, cache_rate=1, num_workers=0, device="cpu")
    main_train.main(flags(root=phantom, output=tmp_path / "train", max_iter=1, **run))
    main_finetune.main(
        flags(
            root=phantom,
            output=tmp_path / "tune",
            dataset=six_class_dataset(phantom, tmp_path),
            pretrain=True,
            pretrained_weights=tmp_path / "train" / "best_metric_model.pth",
            pretrain_classes=5,
            max_iter=1,
            **run,
        )
    )
    tuned = tmp_path / "tune" / "best_metric_model.pth"
    card = json.loads((tmp_path / "tune" / "best_metric_model.pth.json").read_text())
    assert (card["network"], card["out_channels"]) == (name, 6)
    model = build_network(name, 1, 6, **card["network_args"])
    model.load_state_dict(torch.load(tuned, weights_only=True), strict=True)
    # windows side by side (--overlap 0): what is checked is the network's registry entry, not the stitching
    test_seg.main(
        flags(root=phantom, output=tmp_path / "pred", trained_weights=tuned, cache_rate=0, num_workers=0, overlap=0)
    )
    check_predictions(tmp_path / "pred", phantom, num_classes=6)


def test_segment_with_model_card(trained, phantom, tmp_path, capsys):
    output = tmp_path / "pred"
    test_seg.main(
        flags(
            root=phantom, output=output, trained_weights=trained / "best_metric_model.pth", cache_rate=0, num_workers=0
        )
    )
    check_predictions(output, phantom)
    assert f"Wrote 2 segmentations to {output}" in capsys.readouterr().out  # the 2 test images


def test_segment_published_state_dict_with_model_flags(trained, phantom, tmp_path):
    published = tmp_path / "published.pth"  # no model card beside it: the flags describe the network
    shutil.copy(trained / "best_metric_model.pth", published)
    output = tmp_path / "pred"
    test_seg.main(flags(root=phantom, output=output, trained_weights=published, network="REPUXNET", **TINY))
    check_predictions(output, phantom)
    message = exit_message(
        test_seg.main, flags(root=phantom, output=output, trained_weights=published, network="REPUXNET", roi_size=32)
    )
    assert "does not fit REPUXNET" in message


class ThresholdOracle(torch.nn.Module):
    """Classifies each voxel by its windowed intensity: air, body (0 HU) or insert (200 HU); ``centres``
    are the three classes' windowed values (those of the -125..275 HU window by default)."""

    def __init__(self, in_channels: int = 1, out_channels: int = 3, centres=(0.0, 125 / 400, 325 / 400)) -> None:
        super().__init__()
        self.sharpness = torch.nn.Parameter(torch.tensor(100.0))
        self.register_buffer("centres", torch.tensor(centres).view(1, 3, 1, 1, 1))

    def forward(self, x):
        return -self.sharpness * (x - self.centres) ** 2


ORACLE_AFFINE = np.array([[0.0, -1.6, 0.0, 20.0], [-1.3, 0.0, 0.0, 30.0], [0.0, 0.0, 2.5, -10.0], [0, 0, 0, 1]])


def oracle_case(root: Path) -> np.ndarray:
    """An anisotropic, axes-permuted, flipped volume with a body and an off-centre insert, in imagesTs."""
    from networks import NetworkSpec, available_networks, register_network

    if "ThresholdOracle" not in available_networks():
        register_network("ThresholdOracle", NetworkSpec(ThresholdOracle, input_multiple=1))
    (root / "imagesTs").mkdir(parents=True)
    image = np.full((36, 30, 20), -1000, np.int16)
    image[4:32, 3:27, 2:18] = 0  # body
    image[6:14, 5:12, 3:9] = 200  # insert near one corner
    nib.save(nib.Nifti1Image(image, ORACLE_AFFINE), root / "imagesTs" / "case.nii.gz")
    return image


def oracle_dice(prediction_path: Path, image: np.ndarray) -> list[float]:
    """Dice of body and insert of a saved prediction of :func:`oracle_case`."""
    prediction = nib.load(prediction_path)
    assert prediction.shape == image.shape and np.allclose(prediction.affine, ORACLE_AFFINE)
    predicted = np.asarray(prediction.dataobj)
    expected = np.digitize(image, [-500, 100])
    scores = []
    for value in (1, 2):
        overlap = np.logical_and(predicted == value, expected == value).sum()
        scores.append(2 * overlap / ((predicted == value).sum() + (expected == value).sum()))
    return scores


def test_predictions_land_in_the_input_geometry(tmp_path):
    """An intensity oracle's segmentation of an anisotropic, axes-permuted, flipped volume with an
    off-centre insert must overlay the insert in the original voxel grid (a flip or swap would miss it)."""
    root = tmp_path / "data"
    image = oracle_case(root)
    dataset = tmp_path / "oracle.json"
    dataset.write_text(
        json.dumps(
            {
                "labels": {"0": "air", "1": "body", "2": "insert"},
                "spacing": [1.0, 1.0, 1.2],
                "intensity": {"a_min": -125, "a_max": 275},
            }
        )
    )
    weights = tmp_path / "oracle.pth"
    torch.save(ThresholdOracle().state_dict(), weights)
    output = tmp_path / "pred"
    test_seg.main(
        flags(
            root=root,
            output=output,
            dataset=dataset,
            network="ThresholdOracle",
            trained_weights=weights,
            roi_size=32,
            cache_rate=0,
            num_workers=0,
            device="cpu",
        )
    )
    assert min(oracle_dice(output / "case_seg.nii.gz", image)) > 0.9


def test_inference_takes_the_preprocessing_from_the_model_card(tmp_path, capsys):
    """A model whose card says window -1000..3000 HU: under the FLARE window (the --dataset default) its
    body class would be read as insert. Without --dataset, and against a contradicting one, the card wins."""
    root = tmp_path / "data"
    image = oracle_case(root)
    centres = [0.0, 1000 / 4000, 1200 / 4000]  # air, body, insert in the -1000..3000 window
    weights = tmp_path / "oracle.pth"
    torch.save(ThresholdOracle(centres=centres).state_dict(), weights)
    card = {
        "network": "ThresholdOracle",
        "network_args": {"centres": centres},
        "in_channels": 1,
        "out_channels": 3,
        "classes": ["air", "body", "insert"],
        "dataset": "wide-window",
        "spacing": [1.0, 1.0, 1.2],
        "intensity": {"a_min": -1000.0, "a_max": 3000.0},
        "roi_size": [32, 32, 32],
    }
    Path(f"{weights}.json").write_text(json.dumps(card))
    run = dict(root=root, trained_weights=weights, cache_rate=0, num_workers=0, device="cpu")
    test_seg.main(flags(output=tmp_path / "card", **run))
    printed = capsys.readouterr().out
    assert "(CT ct -1000..3000)" in printed and "note: the model card" not in printed
    assert min(oracle_dice(tmp_path / "card" / "case_seg.nii.gz", image)) > 0.9
    test_seg.main(flags(output=tmp_path / "flags", dataset="flare", roi_size=64, **run))
    note = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: the model card")]
    assert note == [
        f"note: the model card {weights}.json decides; ignored: --roi_size 64,64,64 (card: 32,32,32); "
        "--dataset flare: normalization of CT ct -125..275 (card: ct -1000..3000), 5 classes (card: 3)"
    ]
    assert min(oracle_dice(tmp_path / "flags" / "case_seg.nii.gz", image)) > 0.9


# ---- bad inputs: one clear message, non-zero exit, before any training ----


def copy_phantom(phantom: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(phantom, root)
    return root


def train_error(root, tmp_path, *extra) -> str:
    return exit_message(main_train.main, flags(root=root, output=tmp_path / "out") + TRAIN_FLAGS + list(extra))


def test_missing_folder(phantom, tmp_path):
    root = copy_phantom(phantom, tmp_path)
    shutil.rmtree(root / "labelsVal")
    assert (
        train_error(root, tmp_path) == f"error: {root / 'labelsVal'}: missing folder (labels for {root / 'imagesVal'})"
    )


def test_no_images(phantom, tmp_path):
    root = copy_phantom(phantom, tmp_path)
    for path in (root / "imagesTr").iterdir():
        path.unlink()
    assert train_error(root, tmp_path) == f"error: {root / 'imagesTr'}: no .nii.gz images"


def test_image_without_label_and_label_without_image(phantom, tmp_path):
    root = copy_phantom(phantom, tmp_path)
    (root / "labelsTr" / "phantom_000.nii.gz").unlink()
    shutil.copy(root / "labelsTr" / "phantom_001.nii.gz", root / "labelsTr" / "phantom_099.nii.gz")
    message = train_error(root, tmp_path)
    assert f"{root / 'imagesTr' / 'phantom_000.nii.gz'}: no label for this image" in message
    assert f"{root / 'labelsTr' / 'phantom_099.nii.gz'}: no image for this label" in message


def test_unreadable_file(phantom, tmp_path):
    root = copy_phantom(phantom, tmp_path)
    (root / "imagesVal" / "phantom_002.nii.gz").write_bytes(b"not a nifti file")
    message = train_error(root, tmp_path)
    assert message.startswith(f"error: {root / 'imagesVal' / 'phantom_002.nii.gz'}: cannot read as NIfTI")


def test_non_3d_file(phantom, tmp_path):
    root = copy_phantom(phantom, tmp_path)
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), root / "imagesTr" / "phantom_001.nii.gz")
    message = train_error(root, tmp_path)
    path = root / "imagesTr" / "phantom_001.nii.gz"
    assert message == f"error: {path}: not a 3D volume or a 4D one with the channels last (shape (8, 8))"


def test_label_values_outside_the_classes(phantom, tmp_path):
    root = copy_phantom(phantom, tmp_path)
    path = root / "labelsTr" / "phantom_001.nii.gz"
    label = nib.load(path)
    values = np.asarray(label.dataobj).copy()
    values[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(values, label.affine), path)
    message = train_error(root, tmp_path)
    assert message == f"error: {path}: label values 7 outside the 5 classes 0..4"


def test_invalid_json_dataset_and_datalist(phantom, tmp_path):
    lines = (DATALISTS / "dataset_FeTA.json").read_text().splitlines()
    assert lines[286] == "        }"
    lines[286] = "        },"  # the trailing comma of the published file, which datalists/ leaves out
    feta = tmp_path / "dataset_FeTA.json"
    feta.write_text("\n".join(lines) + "\n")
    message = train_error(phantom, tmp_path, "--datalist", str(feta))
    assert message.startswith(f"error: --datalist {feta}: invalid JSON at line 288 column 5")
    message = train_error(phantom, tmp_path, "--dataset", str(feta))
    assert message.startswith(f"error: --dataset {feta}: invalid JSON at line 288")


@pytest.mark.parametrize("name, training, test", [("FLARE", 341, 20), ("AMOS", 180, 20), ("FeTA", 61, 18)])
def test_published_datalists_ship_with_the_repository(name, training, test):
    lists = load_dataset_config(name.lower(), str(DATALISTS / f"dataset_{name}.json")).lists
    assert len(lists["training"]) == training and len(lists.get("test", [])) == test


def test_bad_flags(phantom, tmp_path):
    assert "unknown network 'NOPE'" in train_error(phantom, tmp_path, "--network", "NOPE")
    assert "--feat_size does not apply to UNETR" in train_error(phantom, tmp_path, "--network", "UNETR")
    assert "needs multiples of 16" in train_error(phantom, tmp_path, "--roi_size", "40")
    assert "--pretrain true needs --pretrained_weights" in train_error(phantom, tmp_path, "--pretrain", "true")
    missing = tmp_path / "missing.pth"
    message = train_error(phantom, tmp_path, "--pretrain", "yes", "--pretrained_weights", str(missing))
    assert message == f"error: --pretrained_weights {missing}: no such file"
    assert not (tmp_path / "out").exists()  # nothing was written


def test_flare_datalist_pairs_listed_files(tmp_path):
    from dataset.cases import find_cases
    from dataset.checks import check_cases
    from dataset.description import DatasetError, load_dataset_config

    config = load_dataset_config("flare", str(DATALISTS / "dataset_FLARE.json"))
    cases = find_cases(config, tmp_path, "training")
    assert len(cases) == 341
    assert cases[0] == {
        "image": str(tmp_path / "imagesTr/train_000.nii.gz"),
        "label": str(tmp_path / "labelsTr/train_000.nii.gz"),
    }
    assert find_cases(config, tmp_path, "test")[0] == {"image": str(tmp_path / "imagesTs/train_036_0000.nii.gz")}
    with pytest.raises(DatasetError, match=r"341 problems in the dataset:\n  .*train_000.nii.gz: no such file"):
        check_cases(cases, config.num_classes)


def test_published_data_entry_points(phantom):
    from argparse import Namespace

    from monai.transforms import Compose

    from load_datasets_transforms import data_loader, data_transforms

    args = Namespace(root=str(phantom), dataset="flare", mode="train", roi_size=(32,), crop_sample=2, datalist=None)
    train_samples, valid_samples, out_classes = data_loader(args)
    assert out_classes == 5
    assert [Path(p).name for p in train_samples["images"]] == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    assert [Path(p).parent.name for p in train_samples["labels"]] == ["labelsTr", "labelsTr"]
    assert len(valid_samples["images"]) == len(valid_samples["labels"]) == 1
    train_transforms, val_transforms = data_transforms(args)
    crops = train_transforms({"image": train_samples["images"][0], "label": train_samples["labels"][0]})
    assert len(crops) == 2 and crops[0]["image"].shape == (1, 32, 32, 32)
    assert 0 <= float(crops[0]["image"].min()) and float(crops[0]["image"].max()) <= 1.1
    test_args = Namespace(root=str(phantom), dataset="flare", mode="test", datalist=None)
    test_samples, out_classes = data_loader(test_args)
    assert len(test_samples["images"]) == 2 and len(test_samples["labels"]) == 2  # labelsTs exists
    assert isinstance(data_transforms(test_args), Compose)


def test_pairing_is_by_case_name_with_channel_suffix(phantom, tmp_path):
    from dataset.cases import case_name, find_cases
    from dataset.description import DatasetError, load_dataset_config

    assert case_name("imagesTs/train_036_0000.nii.gz") == "train_036"
    assert case_name("labelsTr/train_036.nii.gz") == "train_036"
    root = copy_phantom(phantom, tmp_path)
    for path in (root / "imagesTr").iterdir():  # nnU-Net style image names
        path.rename(path.with_name(path.name.replace(".nii.gz", "_0000.nii.gz")))
    (root / "labelsTr" / "phantom_000.nii.gz").unlink()
    config = load_dataset_config("flare")
    with pytest.raises(DatasetError, match=r"phantom_000_0000.nii.gz: no label for this image"):
        find_cases(config, root, "training")
    shutil.copy(root / "labelsTr" / "phantom_001.nii.gz", root / "labelsTr" / "phantom_000.nii.gz")
    cases = find_cases(config, root, "training")
    assert [(Path(c["image"]).name, Path(c["label"]).name) for c in cases] == [
        ("phantom_000_0000.nii.gz", "phantom_000.nii.gz"),
        ("phantom_001_0000.nii.gz", "phantom_001.nii.gz"),
    ]


def test_booleans_are_real_booleans():
    import argparse

    from cli import str2bool

    assert [str2bool(v) for v in ("True", "false", "1", "0", "yes", "No")] == [True, False, True, False, True, False]
    with pytest.raises(argparse.ArgumentTypeError, match="expected a boolean"):
        str2bool("maybe")


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("REPUXNET", dict(feat_size=(4, 8, 16, 32), ks=3, hidden_size=16, depths=(1, 1, 1, 1))),
        ("3DUXNET", dict(feat_size=(4, 8, 16, 32), ks=3, hidden_size=16, depths=(1, 1, 1, 1))),
        ("UNETR", dict(img_size=(32, 32, 32), feature_size=4, hidden_size=48, mlp_dim=96, num_heads=4)),
        ("SwinUNETR", dict(feature_size=12)),
    ],
)
def test_replace_head_for_every_network(name, overrides):
    from networks import replace_head

    model = build_network(name, 1, 5, **overrides)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    replace_head(model, name, 16)
    after = model.state_dict()
    assert after["out.conv.conv.weight"].shape[:2] == (16, before["out.conv.conv.weight"].shape[1])
    assert after["out.conv.conv.bias"].shape == (16,)
    assert set(after) == set(before)
    for key in before:
        if not key.startswith("out."):
            assert torch.equal(after[key], before[key])


def test_phantom_cases_are_plausible():
    from phantom import ORGANS, make_case

    rng = np.random.default_rng(0)
    image, label, affine = make_case(rng, orientation="LPS")
    assert image.dtype == np.int16 and label.dtype == np.uint8 and image.shape == label.shape
    assert nib.aff2axcodes(affine) == ("L", "P", "S")
    assert set(np.unique(label)) == {0, 1, 2, 3, 4}
    for value, hu, _, _ in ORGANS.values():
        assert abs(np.median(image[label == value]) - hu) < 15
    assert (image == -1000).mean() > 0.05 or image.min() < -900  # air around the body
    zooms = np.abs(np.diag(affine[:3, :3]))
    assert zooms.max() / zooms.min() > 1.25  # anisotropic voxels
    other, _, _ = make_case(np.random.default_rng(1))
    assert other.shape != image.shape or not np.array_equal(other, image)


def truncate(path: Path) -> None:
    """Cut a .nii.gz short, as an interrupted copy leaves it: the header still reads, the voxels do not."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    nib.load(path)  # the header is intact


def test_truncated_image_stops_the_run_before_it_starts(phantom, tmp_path):
    root = copy_phantom(phantom, tmp_path)
    path = root / "imagesTr" / "phantom_001.nii.gz"
    truncate(path)
    message = train_error(root, tmp_path, "--cache_rate", "0")  # not cached up front: found by the read-through
    assert message.startswith(f"error: {path}: cannot read its voxel data (")
    assert "\n" not in message
    assert not (tmp_path / "out").exists()  # nothing was written


def test_image_with_nonfinite_voxels_is_refused(phantom, tmp_path):
    root = copy_phantom(phantom, tmp_path)
    path = root / "imagesVal" / "phantom_002.nii.gz"
    image = nib.load(path)
    values = np.asarray(image.dataobj).astype(np.float32)
    values[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(values, image.affine), path)
    assert train_error(root, tmp_path) == f"error: {path}: NaN or infinite voxel values"


def test_read_through_is_remembered_by_path_size_and_time(phantom, tmp_path, monkeypatch):
    import dataset.checks
    from dataset.cases import find_cases
    from dataset.checks import read_through_record, verify_cases

    root = copy_phantom(phantom, tmp_path)
    cases = find_cases(load_dataset_config("flare"), root, "training")
    reads = []
    real = dataset.checks.read_through

    monkeypatch.setattr(dataset.checks, "read_through", lambda path, kind, stop: reads.append(path) or real(path, kind))
    verify_cases(cases, 5, workers=2, progress=False)
    assert sorted(reads) == sorted(str(p) for case in cases for p in case.values())
    assert str(Path(cases[0]["image"]).resolve()) in json.loads(read_through_record().read_text())
    reads.clear()
    verify_cases(cases, 5, workers=2, progress=False)  # another run over the same files
    assert reads == []
    label = Path(cases[1]["label"])
    label.write_bytes(label.read_bytes())  # rewritten: another modification time
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
    verify_cases(cases, 5, workers=2, progress=False)
    assert reads == [str(label)]
    with pytest.raises(DatasetError, match="label values 4 outside the 4 classes"):  # values remembered, checked anew
        verify_cases(cases, 4, workers=2, progress=False)
    assert reads == [str(label)]


def test_output_that_is_a_file_gives_one_line(trained, phantom, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    assert train_error(phantom, tmp_path, "--output", str(taken)) == (
        f"error: --output {taken}: is a file, not a folder; choose a folder"
    )
    weights = trained / "best_metric_model.pth"
    message = exit_message(test_seg.main, flags(root=phantom, output=taken / "pred", trained_weights=weights))
    assert message == f"error: --output {taken / 'pred'}: lies under the file {taken}, not a folder; choose a folder"


def test_segment_with_a_training_checkpoint(trained, phantom, tmp_path, capsys):
    checkpoint = trained / "checkpoint_last.pth"
    output = tmp_path / "pred"
    test_seg.main(flags(root=phantom, output=output, trained_weights=checkpoint, cache_rate=0, num_workers=0))
    assert f"Model card {checkpoint} (a training checkpoint: its model weights and card)" in capsys.readouterr().out
    check_predictions(output, phantom)


def test_truncated_test_image_stops_inference_before_it_starts(trained, phantom, tmp_path):
    root = copy_phantom(phantom, tmp_path)
    path = root / "imagesTs" / "phantom_004.nii.gz"
    truncate(path)
    weights = trained / "best_metric_model.pth"
    message = exit_message(test_seg.main, flags(root=root, output=tmp_path / "pred", trained_weights=weights))
    assert message.startswith(f"error: {path}: cannot read its voxel data (")
    assert not (tmp_path / "pred").exists()


def test_finetune_without_weights_is_refused(phantom, tmp_path):
    message = exit_message(main_finetune.main, flags(root=phantom, output=tmp_path / "ft", dataset="flare", **TINY))
    assert message == (
        "error: main_finetune.py needs --pretrained_weights (the trained weights to fine-tune); "
        "pass --pretrain false to train from scratch instead"
    )
    assert not (tmp_path / "ft").exists()
