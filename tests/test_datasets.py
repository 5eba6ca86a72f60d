"""Datasets as the field publishes them: Decathlon and nnU-Net v2 folders, several channels, derived
settings, per-case errors, memory-aware caching."""

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_RUN as TINY
from conftest import exit_message, flags

import main_finetune
import main_train
import test_seg
from dataset.cases import find_cases
from dataset.checks import CaseSummary, check_cases, user_cache
from dataset.description import MEDIAN, ChannelNorm, DatasetError, load_dataset_config
from dataset.fingerprint import compute_fingerprint, derive_settings
from dataset.transforms import build_transforms
from engine.loading import fit_cache_rate, preprocessed_bytes
from phantom import write_dataset


@pytest.fixture(scope="module")
def decathlon(tmp_path_factory):
    """A two-channel MRI task as the Medical Segmentation Decathlon gives it (4D images, channels last)."""
    root = tmp_path_factory.mktemp("decathlon")
    write_dataset(root, num_train=4, num_test=1, seed=5, modality="mri", layout="decathlon")
    return root


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory):
    """The same task as an nnU-Net v2 raw dataset (one file per channel), its first channel named CT."""
    root = tmp_path_factory.mktemp("nnunet")
    write_dataset(root, num_train=4, num_test=1, seed=5, modality="mri", layout="nnunet")
    description = json.loads((root / "dataset.json").read_text())
    description["channel_names"] = {"0": "CT", "1": "T2"}  # a CT channel: its window is derived
    (root / "dataset.json").write_text(json.dumps(description))
    return root


def copy_of(root: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    return copy


TRAIN = dict(max_iter=2, eval_step=2, lr=1e-3, fold=0, num_folds=2, held_out="none", **TINY)


# ---- formats ----


def test_decathlon_dataset_json_is_read_as_published(decathlon):
    config = load_dataset_config(str(decathlon / "dataset.json"))
    assert config.channels == ("T1", "T2") and config.in_channels == 2
    assert config.normalization == (ChannelNorm("zscore"), ChannelNorm("zscore"))
    assert config.labels == ("background", "spleen", "kidney", "liver", "pancreas")
    assert config.spacing == MEDIAN and config.to_derive() == ["spacing", "z-score mask of T1", "z-score mask of T2"]
    assert config.root == decathlon.resolve()
    cases = find_cases(config, None, "training")  # --root defaults to the file's folder
    assert [Path(c["image"]).name for c in cases] == [f"phantom_00{i}.nii.gz" for i in range(4)]
    test = find_cases(config, None, "test")
    assert test == [
        {
            "image": str(decathlon.resolve() / "imagesTs/phantom_004.nii.gz"),
            "label": str(decathlon.resolve() / "labelsTs/phantom_004.nii.gz"),
        }
    ]
    with pytest.raises(DatasetError, match=r"no validation cases; pass --fold 0 \(of --num_folds 5\)"):
        find_cases(config, None, "validation")


def test_nnunet_dataset_json_groups_channel_files_by_case(nnunet):
    config = load_dataset_config(str(nnunet / "dataset.json"))
    assert config.layout == "nnunet" and config.channels == ("CT", "T2")
    assert config.normalization == (ChannelNorm("ct_zscore"), ChannelNorm("zscore"))  # nnU-Net's CT rule: to derive
    assert config.to_derive() == ["spacing", "foreground statistics of CT", "z-score mask of T2"]
    cases = find_cases(config, nnunet, "training")
    assert len(cases) == 4
    assert [Path(p).name for p in cases[1]["image"]] == ["phantom_001_0000.nii.gz", "phantom_001_0001.nii.gz"]
    assert Path(cases[1]["label"]).name == "phantom_001.nii.gz"
    (test,) = find_cases(config, nnunet, "test")
    assert [Path(p).name for p in test["image"]] == ["phantom_004_0000.nii.gz", "phantom_004_0001.nii.gz"]


def write_json(path: Path, content: dict) -> str:
    path.write_text(json.dumps(content))
    return str(path)


@pytest.mark.parametrize(
    "content, message",
    [
        (
            {"channel_names": {"0": "T1"}, "labels": {"background": 0, "tumour": [1, 2]}, "file_ending": ".nii.gz"},
            r"region-based labels need 'regions_class_order' \(the label value each region paints, 1 value, as",
        ),
        (
            {"channel_names": {"0": "T1"}, "labels": {"background": 0, "a": 1}, "file_ending": ".mha"},
            r"file_ending '.mha': only NIfTI \(.nii.gz, .nii\) is read",
        ),
        (
            {"channel_names": {"0": "rescale_to_0_1"}, "labels": {"background": 0, "a": 1}},
            r"channel 'rescale_to_0_1': nnU-Net's rescale_to_0_1 normalisation is not supported",
        ),
        (
            {"channel_names": {"0": "T1"}, "labels": {"background": 0, "a": 2}},
            r"'labels' values must be 0..1, got \[0, 2\]",
        ),
        (
            {"modality": {"0": "T1", "1": "T2"}, "labels": {"0": "bg", "1": "a"}, "normalization": ["zscore"]},
            r"'normalization' must be one scheme or a list of 2 \(one per channel: T1, T2\)",
        ),
        (
            {"labels": {"0": "bg", "1": "a"}, "normalization": [{"scheme": "zscore", "window": [0, 1]}]},
            r"'normalization': normalization 'zscore': only 'ct' and 'ct_zscore' take a window",
        ),
        (
            {"labels": {"0": "bg", "1": "a"}, "normalization": "ct"},
            r"'normalization': normalization 'ct' needs its window \[a_min, a_max\] \(or the dataset's intensity\); to "
            r"derive the normalisation of a CT from the data, use 'ct_zscore' \(nnU-Net's\)",
        ),
        (
            {"labels": {"0": "bg", "1": "a"}, "normalization": [{"scheme": "ct_zscore", "window": [0, 1]}]},
            r"'normalization': normalization 'ct_zscore': give window, mean and std together, or none \(derived\)",
        ),
        (
            {"labels": {"0": "bg", "1": "a"}, "spacing": [1, 0, 1]},
            r"'spacing' must be three positive numbers \(mm\), null \(native grid\) or \"median\"",
        ),
    ],
)
def test_dataset_json_errors_name_the_file_and_the_key(tmp_path, content, message):
    path = write_json(tmp_path / "dataset.json", content)
    with pytest.raises(DatasetError, match=rf"^--dataset {path}: {message}"):
        load_dataset_config(path)


def test_own_json_keys_set_channels_normalisation_and_spacing(tmp_path):
    path = write_json(
        tmp_path / "mine.json",
        {
            "labels": {"0": "bg", "1": "lesion"},
            "channels": ["CT", "PET", "mask"],
            "normalization": [
                {"scheme": "ct", "window": [-100, 200]},
                {"scheme": "zscore", "nonzero_mask": False},
                "none",
            ],
            "spacing": None,
        },
    )
    config = load_dataset_config(path)
    assert config.channels == ("CT", "PET", "mask") and config.spacing is None and not config.to_derive()
    assert config.normalization == (
        ChannelNorm("ct", (-100.0, 200.0)),
        ChannelNorm("zscore", nonzero_mask=False),
        ChannelNorm("none"),
    )
    assert config.preprocessing() == {
        "channels": ["CT", "PET", "mask"],
        "normalization": [
            {"scheme": "ct", "window": [-100.0, 200.0]},
            {"scheme": "zscore", "nonzero_mask": False},
            {"scheme": "none"},
        ],
        "spacing": None,
    }


def test_a_preset_needs_root():
    with pytest.raises(DatasetError, match=r"--root is needed with --dataset flare"):
        find_cases(load_dataset_config("flare"), None, "training")


# ---- preprocessing and derived settings ----


def test_two_channel_preprocessing_normalises_each_channel_on_its_own(decathlon):
    config = load_dataset_config(str(decathlon / "dataset.json"))
    config = derive_settings(config, compute_fingerprint(find_cases(config, None, "training"), config.channels))[0]
    case = find_cases(config, None, "training")[0]
    _, val = build_transforms(config, "train", (32, 32, 32))
    image = val(case)["image"]
    assert image.shape[0] == 2
    for channel in image:
        inside = channel[channel != 0]  # zero (background) voxels stay zero
        assert abs(float(inside.mean())) < 1e-4 and float(inside.std(unbiased=False)) == pytest.approx(1, rel=1e-4)
    raw = nib.load(case["image"]).get_fdata()
    assert image.shape[1:] != raw.shape[:3]  # resampled to the median spacing and cropped
    train, _ = build_transforms(config, "train", (32, 32, 32), crop_sample=2)
    crops = train(case)
    assert [c["image"].shape for c in crops] == [(2, 32, 32, 32)] * 2 and crops[0]["label"].shape == (1, 32, 32, 32)


def test_spacing_is_along_the_ras_axes_whatever_the_stored_order(tmp_path):
    """A volume stored with its axes in A, S, R order is resampled to 1 x 1 x 2 mm along R, A, S (not along
    its stored axes, which would put the 2 mm on A)."""
    affine = np.zeros((4, 4))
    affine[0, 2] = affine[1, 0] = affine[2, 1] = affine[3, 3] = 1.0  # array axes run along A, S, R
    assert nib.aff2axcodes(affine) == ("A", "S", "R")
    nib.save(nib.Nifti1Image(np.ones((20, 30, 40), dtype=np.float32), affine), tmp_path / "image.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((20, 30, 40), dtype=np.uint8), affine), tmp_path / "label.nii.gz")
    path = write_json(
        tmp_path / "d.json", {"labels": {"0": "bg", "1": "a"}, "spacing": [1, 1, 2], "normalization": "none"}
    )
    _, val = build_transforms(load_dataset_config(path), "train", (16, 16, 16))
    image = val({"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "label.nii.gz")})["image"]
    assert image.shape == (1, 40, 20, 16)  # R 40 voxels of 1 mm, A 20 of 1 mm, S 30 of 1 mm at 2 mm


def ras_spacing(path) -> list[float]:
    image = nib.load(path)
    spacing = [0.0] * 3
    for axis, code in enumerate(nib.aff2axcodes(image.affine)):
        spacing["RLAPSI".index(code) // 2] = float(image.header.get_zooms()[axis])
    return spacing


def test_fingerprint_is_the_median_spacing_and_foreground_percentiles(nnunet):
    config = load_dataset_config(str(nnunet / "dataset.json"))
    cases = find_cases(config, None, "training")
    fingerprint = compute_fingerprint(cases, config.channels, workers=2)
    assert fingerprint["median_spacing"] == pytest.approx(np.median([ras_spacing(c["label"]) for c in cases], axis=0))
    foreground = np.concatenate(
        [
            nib.load(c["image"][0]).get_fdata()[np.asarray(nib.load(c["label"]).dataobj) > 0]
            for c in cases  # channel 0 (CT) only
        ]
    )
    expected = np.percentile(foreground, (0.5, 99.5))  # every voxel: the samples move it by noise only
    ct = fingerprint["channels"][0]
    assert [ct["percentile_00_5"], ct["percentile_99_5"]] == pytest.approx(expected, rel=0.02)
    derived_config, derived = derive_settings(config, fingerprint)
    assert derived["spacing"] == [round(s, 4) for s in fingerprint["target_spacing"]]
    statistics = derived["foreground statistics of CT"]
    assert statistics == {
        "window": [ct["percentile_00_5"], ct["percentile_99_5"]],
        "mean": ct["mean"],
        "std": ct["std"],
    }
    assert derived_config.normalization[0] == ChannelNorm(
        "ct_zscore", tuple(statistics["window"]), None, ct["mean"], ct["std"]
    )
    assert not derived_config.to_derive()


def test_fingerprint_samples_are_the_same_on_every_run(nnunet):
    config = load_dataset_config(str(nnunet / "dataset.json"))
    cases = find_cases(config, None, "training")
    assert compute_fingerprint(cases, config.channels, workers=2) == compute_fingerprint(
        cases[::-1], config.channels, workers=1
    )


# ---- bad cases: one line naming the case, before any work ----


def save_like(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> None:
    reference = nib.load(path)
    nib.save(nib.Nifti1Image(array, reference.affine if affine is None else affine), path)


def train_error(root: Path, tmp_path: Path) -> str:
    output = tmp_path / "out"
    message = exit_message(main_train.main, flags(dataset=root / "dataset.json", output=output, **TRAIN))
    assert not output.exists()  # nothing written
    return message


def test_a_case_with_another_channel_count(decathlon, tmp_path):
    root = copy_of(decathlon, tmp_path)
    path = root / "imagesTr" / "phantom_002.nii.gz"
    save_like(path, np.asarray(nib.load(path).dataobj)[..., 0])  # one channel of two
    assert train_error(root, tmp_path) == f"error: {path}: 1 channel, but the dataset has 2 (case 'phantom_002')"


def test_a_missing_channel_file(nnunet, tmp_path):
    root = copy_of(nnunet, tmp_path)
    (root / "imagesTr" / "phantom_001_0001.nii.gz").unlink()
    expected = f"{root / 'imagesTr' / 'phantom_001_0001.nii.gz'}: missing (channel 1, T2, of case 'phantom_001')"
    assert train_error(root, tmp_path) == f"error: {expected}"


def test_a_label_of_another_geometry(nnunet, tmp_path):
    root = copy_of(nnunet, tmp_path)
    path = root / "labelsTr" / "phantom_003.nii.gz"
    affine = nib.load(path).affine.copy()
    affine[:3, 3] += 5.0
    save_like(path, np.asarray(nib.load(path).dataobj), affine)
    message = train_error(root, tmp_path)
    assert message.startswith(f"error: {path}: label geometry differs from its image's (origin ")


def test_a_label_of_another_shape(decathlon, tmp_path):
    root = copy_of(decathlon, tmp_path)
    path = root / "labelsTr" / "phantom_000.nii.gz"
    label = np.asarray(nib.load(path).dataobj)
    save_like(path, label[:-1])
    image_shape = nib.load(root / "imagesTr" / "phantom_000.nii.gz").shape[:3]
    expected = f"label shape {(label.shape[0] - 1, *label.shape[1:])} differs from image shape {image_shape}"
    assert train_error(root, tmp_path) == f"error: {path}: {expected}"


def test_label_values_outside_the_labels(nnunet, tmp_path):
    root = copy_of(nnunet, tmp_path)
    path = root / "labelsTr" / "phantom_002.nii.gz"
    label = np.asarray(nib.load(path).dataobj).copy()
    label[0, 0, 0] = 7
    save_like(path, label)
    assert train_error(root, tmp_path) == f"error: {path}: label values 7 outside the 5 classes 0..4"


def test_a_channel_file_of_another_geometry(nnunet, tmp_path):
    root = copy_of(nnunet, tmp_path)
    path = root / "imagesTr" / "phantom_000_0001.nii.gz"
    affine = nib.load(path).affine.copy()
    affine[:3, :3] *= 1.5
    save_like(path, np.asarray(nib.load(path).dataobj), affine)
    message = train_error(root, tmp_path)
    assert message.startswith(f"error: {path}: geometry differs from {root / 'imagesTr' / 'phantom_000_0000.nii.gz'}")
    assert "(spacing " in message


def test_no_validation_cases_and_no_fold(decathlon, tmp_path):
    output = tmp_path / "out"
    argv = flags(dataset=decathlon / "dataset.json", output=output, max_iter=2, **TINY)
    message = exit_message(main_train.main, argv)
    assert message == (
        f"error: --dataset {decathlon / 'dataset.json'}: the dataset has no validation cases; pass --fold 0 "
        "(of --num_folds 5) to validate on a fifth of the training cases (--fold 1..4 for the other folds), or "
        "--fold all to train on every case without validation"
    )
    assert not output.exists()


# ---- memory ----


def test_cache_rate_is_lowered_to_what_fits():
    case = CaseSummary(shape=(100, 100, 50), spacing=(2.0, 2.0, 2.0), channels=2, foreground=True)
    per_case = 200 * 200 * 100 * 3 * 4  # resampled to 1 mm: two channels and the label, float32
    assert preprocessed_bytes(case, (1.0, 1.0, 1.0)) == per_case
    assert fit_cache_rate(1.0, [case] * 10, (1.0, 1.0, 1.0), available=100 * per_case) == (1.0, None)
    rate, note = fit_cache_rate(1.0, [case] * 10, (1.0, 1.0, 1.0), available=4 * per_case)
    assert rate == 0.3  # 0.75 of the available memory holds 3 of the 10 cases
    assert note == (
        "note: --cache_rate 1 would hold 457.8 MiB of preprocessed cases in memory (10 cases); 183.1 MiB is "
        "available: caching 0.3 of them instead (--cache_dir caches them on disk)"
    )
    assert fit_cache_rate(0.5, [case] * 10, None, processes=2, available=10**6)[0] == 0.0


# ---- end to end ----


@pytest.fixture(scope="module")
def trained_decathlon(decathlon, tmp_path_factory):
    output = tmp_path_factory.mktemp("train_decathlon")
    main_train.main(flags(dataset=decathlon / "dataset.json", output=output, **TRAIN))
    return output


def test_decathlon_two_channel_task_trains_and_records_its_preprocessing(trained_decathlon, decathlon):
    card = json.loads((trained_decathlon / "best_metric_model.pth.json").read_text())
    fingerprint = json.loads((trained_decathlon / "dataset_fingerprint.json").read_text())
    assert card["in_channels"] == 2 and card["channels"] == ["T1", "T2"]
    masked = fingerprint["fingerprint"]["median_relative_size_after_crop"] < 0.75  # nnU-Net's rule
    assert card["normalization"] == [{"scheme": "zscore", "nonzero_mask": masked}] * 2
    assert card["derived"]["z-score mask of T1"] == ("non-zero region" if masked else "all voxels")
    assert card["spacing"] == card["derived"]["spacing"] == fingerprint["derived"]["spacing"]
    assert fingerprint["fingerprint"]["cases"] == 4  # all training cases, both folds
    state = torch.load(trained_decathlon / "best_metric_model.pth", weights_only=True)
    assert state["encoder1.layer.conv1.conv.weight"].shape[1] == 2


@pytest.mark.parametrize("layout", ["decathlon", "nnunet"])
def test_two_channel_task_trains_and_segments_without_dataset_flags(
    layout, decathlon, nnunet, tmp_path, monkeypatch, capsys
):
    """Train, then segment with nothing but --root and the weights: every setting comes from the model
    card (checked on the transforms inference builds), the segmentations land in each test image's
    geometry. The nnU-Net variant derives nnU-Net's CT normalisation and lowers a cache rate that would not fit."""
    import engine.infer
    import engine.loading

    root = copy_of(decathlon if layout == "decathlon" else nnunet, tmp_path)
    monkeypatch.setattr(engine.loading, "available_bytes", lambda: 2**20 if layout == "nnunet" else None)
    output = tmp_path / "train"
    main_train.main(flags(root=root, dataset=root / "dataset.json", output=output, **TRAIN))
    printed = capsys.readouterr().out
    card = json.loads((output / "best_metric_model.pth.json").read_text())
    if layout == "nnunet":
        assert card["channels"] == ["CT", "T2"] and card["normalization"][1]["scheme"] == "zscore"
        assert card["normalization"][0] == {"scheme": "ct_zscore", **card["derived"]["foreground statistics of CT"]}
        assert re.search(r"note: --cache_rate 1 would hold .* MiB .* 1.0 MiB is available: caching 0.0\d of", printed)
    (root / "dataset.json").unlink()  # nothing but the card can say how to preprocess
    shutil.rmtree(Path(user_cache()) / "fingerprints")
    built = []
    real_build = engine.infer.build_transforms
    monkeypatch.setattr(
        engine.infer, "build_transforms", lambda config, *a: built.append(config) or real_build(config, *a)
    )
    prediction_folder = tmp_path / "pred"
    weights = output / "best_metric_model.pth"
    test_seg.main(flags(root=root, trained_weights=weights, output=prediction_folder, num_workers=0, device="cpu"))
    (config,) = built
    assert config.preprocessing() == {key: card[key] for key in ("channels", "normalization", "spacing")}
    (written,) = sorted(prediction_folder.glob("*_seg.nii.gz"))
    assert written.name == "phantom_004_seg.nii.gz"
    source = nib.load(next((root / "imagesTs").glob("phantom_004*")))
    prediction = nib.load(written)
    assert prediction.shape == source.shape[:3] and np.allclose(prediction.affine, source.affine)
    assert set(np.unique(np.asarray(prediction.dataobj))) <= set(range(5))


def test_fine_tuning_onto_other_channels_names_channel_init(trained_decathlon, tmp_path):
    ct = tmp_path / "ct"
    write_dataset(ct, num_train=2, num_val=1, num_test=0, seed=1)
    weights = trained_decathlon / "best_metric_model.pth"
    argv = flags(root=ct, output=tmp_path / "out", pretrained_weights=weights, max_iter=2, **TINY)
    message = exit_message(main_finetune.main, argv)
    assert message == (
        f"error: --pretrained_weights {weights}: a model of 2 input channels (T1, T2); the dataset has 1 (CT): "
        "pass --channel_init repeat or copy:NEW=OLD,... to adapt the layers that read the input"
    )


def test_training_labels_without_foreground_are_named(decathlon, tmp_path, capsys):
    root = copy_of(decathlon, tmp_path)
    path = root / "labelsTr" / "phantom_001.nii.gz"
    save_like(path, np.zeros(nib.load(path).shape, dtype=np.uint8))
    with pytest.raises(SystemExit):  # stopped after the checks by a bad flag that is only read later
        main_train.main(flags(dataset=root / "dataset.json", output=tmp_path / "out", optim="nope", **TRAIN))
    printed = capsys.readouterr().out
    assert f"warning: {path}: no foreground (only background)" in printed


def test_check_cases_summarises_each_case(decathlon):
    config = load_dataset_config(str(decathlon / "dataset.json"))
    cases = find_cases(config, None, "training")
    summaries = check_cases(cases, 5, workers=2, in_channels=2)
    image = nib.load(cases[0]["image"])
    assert summaries[0].channels == 2 and summaries[0].foreground is True
    assert sorted(summaries[0].shape) == sorted(image.shape[:3])
    assert summaries[0].spacing == pytest.approx(ras_spacing(cases[0]["image"]))


def test_the_fingerprint_is_computed_once_per_set_of_files(nnunet, tmp_path, monkeypatch):
    import dataset.fingerprint

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    computed = []
    real = dataset.fingerprint.compute_fingerprint
    monkeypatch.setattr(dataset.fingerprint, "compute_fingerprint", lambda *a, **k: computed.append(1) or real(*a, **k))
    root = copy_of(nnunet, tmp_path)
    config = load_dataset_config(str(root / "dataset.json"))
    cases = find_cases(config, None, "training")
    first, record = dataset.fingerprint.derive_from_data(config, cases, workers=1, main=False)
    again, _ = dataset.fingerprint.derive_from_data(config, cases, workers=1, main=False)  # the next run
    assert computed == [1] and again == first and not first.to_derive()
    assert record["derived"]["foreground statistics of CT"]["window"] == list(first.normalization[0].window)
    label = Path(cases[0]["label"])
    save_like(label, np.asarray(nib.load(label).dataobj))  # a rewritten file: another set of files
    dataset.fingerprint.derive_from_data(config, cases, workers=1, main=False)
    assert computed == [1, 1]
