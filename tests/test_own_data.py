"""A user's own dataset trained right (issue 18): crops that cover the body whatever the normalisation,
nnU-Net's ignore label, --fold all, test labels by their exact name, channel files kept per folder,
nnU-Net's fingerprint rules (checked against independent implementations), and the inputs that used to
end in a traceback."""

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_RUN as TINY
from conftest import exit_message, flags
from monai.losses import DiceCELoss
from scipy import ndimage

import main_train
import test_seg
from dataset.cases import cases_from_paths, find_cases
from dataset.checks import verify_cases
from dataset.description import ChannelNorm, DatasetConfig, DatasetError, load_dataset_config
from dataset.fingerprint import FOREGROUND_SAMPLES_TOTAL, compute_fingerprint, derive_settings, target_spacing
from dataset.labels import LabelManager
from dataset.transforms import CropCentres, LoadCased, NormalizeChannelsd, build_transforms
from engine.evaluate import evaluate_case
from engine.losses import AnnotatedDiceCELoss
from engine.validation import validation_scores
from phantom import write_dataset

AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])


def save(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return str(path)


def write_json(path: Path, content: dict) -> str:
    path.write_text(json.dumps(content))
    return str(path)


@pytest.fixture(scope="module")
def mri(tmp_path_factory):
    root = tmp_path_factory.mktemp("mri")
    write_dataset(root, num_train=4, num_test=1, seed=3, modality="mri", layout="nnunet")
    return root


# ---- 1. background crops cover the body whatever the normalisation ----


def centre_share(config, case, roi=(16, 16, 16)) -> float:
    """The share of the preprocessed (cropped, normalised) volume that may centre a background crop."""
    train, _ = build_transforms(config, "train", roi)
    cached = train.transforms[: [type(t).__name__ for t in train.transforms].index("BalancedCropd")]
    data = case
    for transform in cached:
        data = transform(data)
    crop = train.transforms[len(cached)]
    _, background = crop.centres(data["label"], data["image"])
    return background.numel() / data["label"].numel()


def test_background_centres_cover_the_body_with_zscore_and_derived_windows(mri, tmp_path):
    config = load_dataset_config(str(mri / "dataset.json"))
    cases = find_cases(config, None, "training")
    derived, _ = derive_settings(config, compute_fingerprint(cases, config.channels))
    # z-score of a body brighter than 0 and a zero outside: before, only voxels above the mean were eligible
    published = derived.__class__(**{**derived.__dict__, "background_crops": "published"})
    body, above_mean = centre_share(derived, cases[0]), centre_share(published, cases[0])
    assert body > 0.5 and above_mean < body * 0.6
    # a derived CT normalisation: background centres everywhere but the labelled organs
    ct_root = tmp_path / "ct"
    write_dataset(ct_root, num_train=3, num_test=1, seed=1, layout="nnunet")
    ct = load_dataset_config(str(ct_root / "dataset.json"))
    ct_cases = find_cases(ct, None, "training")
    ct, _ = derive_settings(ct, compute_fingerprint(ct_cases, ct.channels))
    assert ct.normalization[0].window[0] > -90  # the clip starts above fat: most of the body is below it
    label = torch.as_tensor(np.asarray(nib.load(ct_cases[0]["label"]).dataobj))
    assert centre_share(ct, ct_cases[0]) > 0.5 > float((label > 0).float().mean())


def test_presets_keep_the_published_background_centres():
    config = load_dataset_config("flare")
    assert config.background_crops == "published"
    label = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    label[0, 0] = 1
    image = torch.full((1, 4, 4, 4), -1.0)
    image[0, :2] = 0.5  # normalised value above 0: the body
    foreground, background = CropCentres("published")(label, image)
    assert foreground.numel() == 16 and background.numel() == 16  # x = 1 only: above 0 and labelled 0
    assert CropCentres("body")(label, image)[1].numel() == 48


# ---- 2. nnU-Net's ignore label ----


def test_loss_leaves_out_the_ignore_label_and_equals_monai_without_it():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 6, 6, 6)
    label = torch.randint(0, 3, (1, 1, 6, 6, 6))
    published = DiceCELoss(to_onehot_y=True, softmax=True)
    assert AnnotatedDiceCELoss(3)(logits, label) == pytest.approx(published(logits, label).item(), rel=1e-6)
    label[..., :2] = 3  # a third of the voxels unannotated
    annotated = label[0, 0] != 3
    # the same loss over the annotated voxels alone, laid out as a volume of their own
    alone = published(logits[0][:, annotated].reshape(1, 3, -1, 1, 1), label[0, 0][annotated].reshape(1, 1, -1, 1, 1))
    assert AnnotatedDiceCELoss(3)(logits, label) == pytest.approx(alone.item(), rel=1e-5)
    everything_ignored = torch.full_like(label, 3)
    assert AnnotatedDiceCELoss(3)(logits.requires_grad_(), everything_ignored).item() == 0
    # a crop of unannotated voxels only beside an annotated one: the loss of the annotated crop alone
    pair = AnnotatedDiceCELoss(3)(
        torch.cat([logits, torch.randn(1, 3, 6, 6, 6)]), torch.cat([label, everything_ignored])
    )
    assert pair.item() == pytest.approx(AnnotatedDiceCELoss(3)(logits, label).item(), rel=1e-6)


def test_metrics_leave_out_the_ignore_label():
    label = np.zeros((8, 8, 8), dtype=np.int64)
    label[2:6, 2:6, 2:6] = 1
    label[:, :, 7] = 2  # unannotated slice
    prediction = label.copy()
    prediction[:, :, 7] = 1  # whatever is predicted there does not count
    assert evaluate_case(prediction, label, (1, 1, 1), [1], ignore_label=2)[1]["dice"] == 1.0
    assert evaluate_case(prediction, label, (1, 1, 1), [1])[1]["dice"] < 1.0

    class Perfect(torch.nn.Module):
        def forward(self, x):
            truth = torch.as_tensor(label[None]).expand(x.shape[0], 8, 8, 8)
            return torch.nn.functional.one_hot(torch.where(truth == 2, 1, truth), 2).movedim(-1, 1).float()

    loader = [{"image": torch.zeros(1, 1, 8, 8, 8), "label": torch.as_tensor(label[None, None])}]
    manager = LabelManager(("background", "liver"), ignore_label=2)
    scores = validation_scores(Perfect(), loader, (8, 8, 8), 1, manager, torch.device("cpu"), progress=False)
    assert scores.tolist() == [[1.0, 1.0]]


def test_ignore_label_is_read_checked_and_trained(mri, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(mri, root)
    description = json.loads((root / "dataset.json").read_text())
    for path in sorted((root / "labelsTr").iterdir()):  # the top slabs unannotated
        image = nib.load(path)
        label = np.asarray(image.dataobj).copy()
        label[..., -3:] = 5
        nib.save(nib.Nifti1Image(label, image.affine), path)
    description["labels"]["ignore"] = 5
    write_json(root / "dataset.json", description)
    config = load_dataset_config(str(root / "dataset.json"))
    assert config.num_classes == 5 and config.ignore_label == 5
    cases = find_cases(config, None, "training")
    verify_cases(cases, 5, 0, progress=False, in_channels=2, ignore_label=5)
    with pytest.raises(DatasetError, match="label values 5 outside the 5 classes"):
        verify_cases(cases, 5, 0, progress=False, in_channels=2)
    description["labels"]["ignore"] = 7
    with pytest.raises(DatasetError, match="'ignore' label 7: must follow the classes 0..4 directly"):
        load_dataset_config(write_json(tmp_path / "bad.json", description))
    output = tmp_path / "run"
    main_train.main(
        flags(dataset=root / "dataset.json", output=output, max_iter=2, eval_step=2, fold=0, num_folds=2, **TINY)
        + ["--held_out", "none"]
    )
    card = json.loads((output / "best_metric_model.pth.json").read_text())
    assert card["ignore_label"] == 5 and card["out_channels"] == 5


def test_crops_never_centre_foreground_on_unannotated_voxels():
    label = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    label[0, 0] = 1
    label[0, 1] = 3  # ignore
    foreground, background = CropCentres("body", ignore_label=3)(label, None)
    assert foreground.numel() == 16 and background.numel() == 32


# ---- 3. test labels under their exact name ----


def test_test_labels_are_found_by_their_exact_name(tmp_path):
    image = np.zeros((8, 8, 8), dtype=np.int16)
    for name in ("amos_0001", "amos_0002"):
        save(tmp_path / "imagesTs" / f"{name}.nii.gz", image)
    save(tmp_path / "labelsTs" / "amos_0001.nii.gz", image.astype(np.uint8))
    dataset = write_json(
        tmp_path / "d.json",
        {"labels": {"0": "bg", "1": "a"}, "test": ["imagesTs/amos_0001.nii.gz", "imagesTs/amos_0002.nii.gz"]},
    )
    cases = find_cases(load_dataset_config(dataset), tmp_path, "test")
    assert cases[0]["label"] == str(tmp_path / "labelsTs" / "amos_0001.nii.gz")
    assert "label" not in cases[1]  # no label: segmented, not scored
    # the shipped AMOS list: labelsTs/amos_0381.nii.gz, never the stripped labelsTs/amos.nii.gz
    save(tmp_path / "labelsTs" / "amos_0381.nii.gz", image.astype(np.uint8))
    shipped = load_dataset_config("amos", str(Path(__file__).parents[1] / "datalists" / "dataset_AMOS.json"))
    first = find_cases(shipped, tmp_path, "test")[0]
    assert first["label"] == str(tmp_path / "labelsTs" / "amos_0381.nii.gz")


# ---- 4. channel files across --input folders, 4D files named like channels ----


def test_channel_files_are_not_merged_across_folders(tmp_path):
    config = load_dataset_config("flare").__class__(
        "two", ("bg", "a"), None, ("T1", "T2"), (ChannelNorm("zscore", nonzero_mask=True),) * 2
    )
    volume = np.ones((6, 6, 6), dtype=np.int16)
    save(tmp_path / "p1" / "a_0000.nii.gz", volume)
    save(tmp_path / "p1" / "a_0001.nii.gz", volume)
    save(tmp_path / "p2" / "a_0000.nii.gz", volume)
    with pytest.raises(DatasetError, match=r"p2/a_0000.nii.gz: channel file of case 'a' in another folder than .*p1"):
        cases_from_paths([tmp_path / "p1", tmp_path / "p2"], config)
    four_d = np.ones((6, 6, 6, 2), dtype=np.int16)
    save(tmp_path / "q" / "case_0001.nii.gz", four_d)
    save(tmp_path / "q" / "case_0002.nii.gz", four_d)
    cases = cases_from_paths([tmp_path / "q"], config)
    assert [c["image"] for c in cases] == [str(tmp_path / "q" / f"case_000{i}.nii.gz") for i in (1, 2)]


# ---- 5. nnU-Net's fingerprint rules, against independent implementations ----


def nnunet_ct_statistics(cases: list[dict]) -> dict:
    """nnU-Net v2's foreground statistics of a CT channel, written from its rule: each case cropped to its
    non-zero box, the same number of foreground samples drawn with replacement by RandomState(1234),
    pooled; their 0.5/99.5 percentiles, mean and standard deviation (np.mean, np.std)."""
    samples = FOREGROUND_SAMPLES_TOTAL // len(cases)
    pooled = []
    for case in sorted(cases, key=lambda c: c["image"]):
        image = nib.load(case["image"]).get_fdata(dtype=np.float32)
        label = np.asarray(nib.load(case["label"]).dataobj)
        box = ndimage.find_objects(ndimage.binary_fill_holes(image != 0).astype(int))[0]
        values = image[box][label[box] > 0]
        pooled.append(np.random.RandomState(1234).choice(values, samples, replace=True))
    pooled = np.concatenate(pooled).astype(np.float64)
    low, high = np.percentile(pooled, (0.5, 99.5))
    return {"window": (low, high), "mean": pooled.mean(), "std": pooled.std()}


def nnunet_ct_normalization(image: np.ndarray, statistics: dict) -> np.ndarray:
    """nnU-Net v2's CTNormalization, written from its rule: clip to the percentiles, subtract the mean,
    divide by the standard deviation (at least 1e-8)."""
    clipped = np.clip(image.astype(np.float32), *statistics["window"])
    return (clipped - statistics["mean"]) / max(statistics["std"], 1e-8)


def test_a_ct_channel_of_an_nnunet_dataset_is_normalised_as_nnunet_does_and_cropped_to_the_body(tmp_path):
    root = tmp_path / "ct"
    write_dataset(root, num_train=3, num_test=1, seed=4, layout="nnunet")
    description = json.loads((root / "dataset.json").read_text())
    write_json(root / "dataset.json", {**description, "spacing": None})  # no resampling: the crop and the intensities
    config = load_dataset_config(str(root / "dataset.json"))
    assert config.normalization == (ChannelNorm("ct_zscore"),)
    cases = find_cases(config, None, "training")
    derived, settings = derive_settings(config, compute_fingerprint(cases, config.channels, ct_channels=[True]))
    expected = nnunet_ct_statistics(cases)
    norm = derived.normalization[0]
    assert norm.window == pytest.approx(expected["window"], rel=1e-6)
    assert (norm.mean, norm.std) == pytest.approx((expected["mean"], expected["std"]), rel=1e-6)
    statistics = {"window": list(norm.window), "mean": norm.mean, "std": norm.std}
    assert settings["foreground statistics of CT"] == statistics
    assert derived.preprocessing()["normalization"] == [{"scheme": "ct_zscore", **statistics}]  # the model card's
    (case,) = find_cases(config, None, "test")
    preprocessed = build_transforms(derived, "test")({"image": case["image"]})["image"]
    raw = nib.as_closest_canonical(nib.load(case["image"])).get_fdata(dtype=np.float32)  # RAS, as the chain
    body = ndimage.find_objects((raw > -500).astype(int))[0]  # air is -1000 HU: the body's box
    window_crop = ndimage.find_objects((raw > norm.window[0]).astype(int))[0]  # a crop at the clip's low end
    assert preprocessed.shape[1:] == raw[body].shape
    outside = np.ones(raw.shape, dtype=bool)
    outside[window_crop] = False
    assert (raw[outside] > -500).sum() > 1000  # which would lose part of the body
    assert preprocessed[0].numpy() == pytest.approx(nnunet_ct_normalization(raw[body], expected), abs=1e-4)


def test_a_dataset_whose_ct_statistics_differ_from_the_cards_is_named_in_the_note():
    """test_seg.py's note of what the card overrides: settings left to the data agree with any card; given
    ones that differ (ct_zscore's mean, a z-score mask) are named."""
    from engine.infer import _preprocessing_differences

    ct = ChannelNorm("ct_zscore", (58.0, 203.0), None, 119.0, 31.5)
    card = DatasetConfig(
        "d", ("bg", "a"), (1.0, 1.0, 1.0), ("CT", "T1"), (ct, ChannelNorm("zscore", nonzero_mask=True))
    )
    left_to_data = replace(card, normalization=(ChannelNorm("ct_zscore"), ChannelNorm("zscore")))
    assert _preprocessing_differences(left_to_data, card) == []
    given = replace(card, normalization=(replace(ct, mean=100.0), ChannelNorm("zscore", nonzero_mask=False)))
    assert _preprocessing_differences(given, card) == [
        "normalization of CT ct_zscore 58..203, mean 100, std 31.5 (card: ct_zscore 58..203, mean 119, std 31.5)",
        "normalization of T1 zscore (all voxels) (card: zscore (non-zero region))",
    ]


def test_ct_window_pools_the_same_number_of_samples_from_every_case(tmp_path):
    rng = np.random.default_rng(0)
    cases = []
    for index, lesion in enumerate((3, 12, 30)):  # foregrounds of 27 to 27,000 voxels, each its own intensity
        image = np.zeros((40, 40, 40), dtype=np.float32)
        image[2:38, 2:38, 2:38] = -100 + rng.normal(0, 5, (36, 36, 36))
        label = np.zeros(image.shape, dtype=np.uint8)
        label[5 : 5 + lesion, 5 : 5 + lesion, 5 : 5 + lesion] = 1
        image[label > 0] = 100 * (index + 1) + rng.normal(0, 10, int(label.sum()))
        cases.append(
            {
                "image": save(tmp_path / f"c{index}.nii.gz", image),
                "label": save(tmp_path / f"c{index}_label.nii.gz", label),
            }
        )
    fingerprint = compute_fingerprint(cases, ["CT"], ct_channels=[True])
    ct = fingerprint["channels"][0]
    expected = nnunet_ct_statistics(cases)
    assert (ct["percentile_00_5"], ct["percentile_99_5"]) == pytest.approx(expected["window"], rel=1e-6)
    assert (ct["mean"], ct["std"]) == pytest.approx((expected["mean"], expected["std"]), rel=1e-6)
    # each case weighs the same: the smallest lesion (intensity ~100) still sets the low end
    assert 60 < ct["percentile_00_5"] < 100


def test_target_spacing_follows_nnunets_anisotropy_rule():
    shapes = np.array([[512, 512, 30]] * 5)
    spacings = np.array([[0.8, 0.8, z] for z in (5.0, 5.0, 6.0, 10.0, 2.5)])
    # median z 5 > 3 x 0.8 and 30 x 3 < 512 voxels: the 10th percentile of z, 2.5 + 0.4 x (5 - 2.5)
    assert target_spacing(spacings, shapes) == pytest.approx([0.8, 0.8, 3.5])
    # never below the other axes: 10th percentile 0.55 < 1.0 -> 1.0 + 1e-5
    spacings = np.array([[1.0, 1.0, z] for z in (0.5, 0.5, 4.0, 4.0, 4.0)])
    assert target_spacing(spacings, shapes) == pytest.approx([1.0, 1.0, 1.00001])
    # anisotropic spacing but not fewer voxels: the median
    assert target_spacing(spacings, np.array([[100, 100, 90]] * 5)) == pytest.approx([1.0, 1.0, 4.0])


def test_zscore_is_over_the_filled_nonzero_region_only_where_cropping_shrinks_cases(tmp_path):
    image = np.zeros((1, 10, 10, 10), dtype=np.float32)
    image[0, 2:8, 2:8, 2:8] = np.arange(216, dtype=np.float32).reshape(6, 6, 6) + 10
    image[0, 4, 4, 4] = 0  # a hole inside the body
    masked = NormalizeChannelsd(["image"], [ChannelNorm("zscore", nonzero_mask=True)])({"image": torch.tensor(image)})
    region = ndimage.binary_fill_holes(image[0] != 0)
    values = image[0][region]
    expected = np.where(region, (image[0] - values.mean()) / values.std(), 0)
    assert masked["image"][0].numpy() == pytest.approx(expected, abs=1e-5)
    everywhere = NormalizeChannelsd(["image"], [ChannelNorm("zscore", nonzero_mask=False)])(
        {"image": torch.tensor(image)}
    )
    assert everywhere["image"][0].numpy() == pytest.approx((image[0] - image.mean()) / image.std(), abs=1e-5)
    config = load_dataset_config(write_json(tmp_path / "d.json", {"labels": {"0": "bg", "1": "a"}, "channels": ["T1"]}))
    small = {"median_relative_size_after_crop": 0.2, "target_spacing": [1, 1, 1], "median_spacing": [1, 1, 1]}
    stats = {"channels": [{"percentile_00_5": 0, "percentile_99_5": 1}]}
    assert derive_settings(config, {**small, **stats})[0].normalization[0].nonzero_mask is True
    large = {**small, "median_relative_size_after_crop": 0.9}
    assert derive_settings(config, {**large, **stats})[0].normalization[0].nonzero_mask is False


def test_implausible_ct_intensities_are_named_before_any_work(tmp_path):
    root = tmp_path / "ct"
    write_dataset(root, num_train=3, num_test=1, seed=2, layout="nnunet")
    first = sorted((root / "imagesTr").iterdir())[0]
    image = nib.load(first)
    data = np.asarray(image.dataobj).astype(np.float32)
    data[0, 0, 0] = 1e30
    nib.save(nib.Nifti1Image(data, image.affine), first)
    message = exit_message(
        main_train.main, flags(dataset=root / "dataset.json", output=tmp_path / "run", fold=0, num_folds=3, **TINY)
    )
    assert message.startswith(f"error: {first}: CT intensities") and "not plausible Hounsfield units" in message
    assert not (tmp_path / "run").exists()


# ---- 6. --fold all ----


def test_fold_all_trains_on_every_case_and_segments(mri, tmp_path, capsys):
    output = tmp_path / "run"
    main_train.main(flags(dataset=mri / "dataset.json", output=output, max_iter=2, eval_step=1, fold="all", **TINY))
    assert "training on all 4 training cases, without validation" in capsys.readouterr().out
    card = json.loads((output / "final_model.pth.json").read_text())
    assert card["fold"] == "all" and card["final_step"] == 2 and not (output / "best_metric_model.pth").exists()
    test_seg.main(flags(root=mri, trained_weights=output / "final_model.pth", output=tmp_path / "seg", **TINY))
    assert len(list((tmp_path / "seg").glob("*_seg.nii.gz"))) == 1
    resumed = flags(dataset=mri / "dataset.json", output=output, max_iter=3, eval_step=1, fold="all", resume="auto")
    main_train.main(resumed + flags(**TINY))
    assert json.loads((output / "final_model.pth.json").read_text())["final_step"] == 3
    assert not (output / "best_metric_model.pth").exists()


def test_one_case_dataset_advises_fold_all(tmp_path):
    root = tmp_path / "one"
    write_dataset(root, num_train=1, num_test=1, seed=2, layout="nnunet")
    message = exit_message(
        main_train.main, flags(dataset=root / "dataset.json", output=tmp_path / "run", fold=0, **TINY)
    )
    assert message == (
        "error: --num_folds 5: only 1 training case to split; --fold all trains on every case without validation"
    )


# ---- 8. channel files whose affines differ by float noise ----


def test_channel_files_with_float_noise_in_their_affines_load_on_channel_0(tmp_path):
    volume = np.arange(216, dtype=np.float32).reshape(6, 6, 6)
    noisy = AFFINE.copy()
    noisy[:3, 3] += 1e-6
    files = [save(tmp_path / "a_0000.nii.gz", volume), save(tmp_path / "a_0001.nii.gz", volume * 2, noisy)]
    loaded = LoadCased(["image"])({"image": files})["image"]
    assert loaded.shape == (2, 6, 6, 6) and np.allclose(loaded.affine.numpy(), AFFINE)


# ---- 9-11. tracebacks left ----


def test_unwritable_output_is_refused_before_any_work(mri, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    message = exit_message(main_train.main, flags(dataset=mri / "dataset.json", output=locked / "run", fold=0, **TINY))
    expected = f"error: --output {locked / 'run'}: the folder ({locked}, where it would be created) is not writable"
    assert message == f"{expected}; choose another folder"
    message = exit_message(test_seg.main, flags(root=mri, trained_weights=tmp_path / "w.pth", output=locked, **TINY))
    assert message == f"error: --output {locked}: the folder is not writable; choose another folder"


def test_roi_too_small_for_the_network_is_refused_at_the_flags(mri, tmp_path):
    message = exit_message(
        main_train.main,
        flags(dataset=mri / "dataset.json", output=tmp_path / "run", fold=0, **{**TINY, "roi_size": 16}),
    )
    assert message.startswith("error: --roi_size 16,16,16: too small for REPUXNET") and "at least 32" in message


# ---- 7. a long first read-through keeps what it has read; the wait for it is sized ----


def test_read_through_record_grows_while_reading(mri, tmp_path, monkeypatch):
    import dataset.checks
    from dataset.checks import read_through_record
    from engine.loading import data_preparation_seconds

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(dataset.checks, "KEEP_EVERY", 0.0)  # keep after every file
    config = load_dataset_config(str(mri / "dataset.json"))
    cases = find_cases(config, None, "training")
    real = dataset.checks.read_through
    calls = []

    def interrupted(path, kind, stop=None):
        calls.append(path)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(path, kind, stop)

    monkeypatch.setattr(dataset.checks, "read_through", interrupted)
    with pytest.raises(KeyboardInterrupt):
        verify_cases(cases, 5, 1, progress=False, in_channels=2)
    kept = json.loads(read_through_record().read_text())
    assert len(kept) == 5  # the files read before Ctrl-C
    assert data_preparation_seconds(cases) == 600 + 5 * 12 > data_preparation_seconds(cases[:1])


# ---- 11. Ctrl-C in test_seg.py, and the smaller ones ----


def test_ctrl_c_in_test_seg_leaves_no_half_written_case(mri, tmp_path, monkeypatch, capsys):
    import engine.infer

    weights = tmp_path / "run"
    main_train.main(flags(dataset=mri / "dataset.json", output=weights, max_iter=1, eval_step=1, fold="all", **TINY))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.infer, "write_segmentation", interrupted)  # after the probabilities file
    output = tmp_path / "seg"
    argv = flags(root=mri, trained_weights=weights / "final_model.pth", output=output, **TINY) + [
        "--save_probabilities"
    ]
    with pytest.raises(SystemExit) as stopped:
        test_seg.main(argv)
    assert stopped.value.code == 130
    assert "stopped by SIGINT after 0 cases of 1; every segmentation in" in capsys.readouterr().err
    assert not list(output.glob("*_seg.nii.gz")) and not list(output.glob("*_probabilities.npz"))  # neither stays


def test_constant_channels_warn_and_skipped_files_are_named(mri, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(mri, root)
    second = sorted((root / "imagesTr").glob("*_0001.nii.gz"))[0]
    image = nib.load(second)
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.int16), image.affine), second)
    output = tmp_path / "run"
    main_train.main(
        flags(dataset=root / "dataset.json", output=output, max_iter=1, eval_step=1, fold=0, num_folds=2, **TINY)
        + ["--held_out", "none"]
    )
    printed = capsys.readouterr().out
    first = str(second).replace("_0001.nii.gz", "_0000.nii.gz")
    assert f"warning: {first}: channel 1 (T2) has one value in every voxel" in printed
    assert "2 training and 2 validation cases" in printed
    (root / "imagesTs" / "notes.txt").write_text("not an image")
    config = load_dataset_config(str(root / "dataset.json"))
    assert len(cases_from_paths([root / "imagesTs"], config)) == 1
    assert "note: --input " in capsys.readouterr().out


def test_decathlon_num_training_is_checked(tmp_path):
    root = tmp_path / "msd"
    description = write_dataset(root, num_train=3, num_test=1, seed=2, layout="decathlon")
    write_json(root / "dataset.json", {**description, "numTraining": 4})
    config = load_dataset_config(str(root / "dataset.json"))
    with pytest.raises(DatasetError, match="numTraining is 4, but its training list holds 3 cases"):
        find_cases(config, None, "training")


def test_channel_files_keep_every_channel_when_cached_on_threads(mri):
    """MONAI's LoadImaged shares its reader's file names between threads: a list of channel files read
    while another thread read a label came out with one channel (CacheDataset, --num_workers 2)."""
    from monai.data import CacheDataset

    config = load_dataset_config(str(mri / "dataset.json"))
    cases = find_cases(config, None, "training")
    for _ in range(20):
        cached = CacheDataset(cases, LoadCased(["image", "label"]), cache_rate=1, num_workers=2, progress=False)
        assert [tuple(item["image"].shape[:1]) for item in cached] == [(2,)] * len(cases)


def test_the_published_data_transforms_derive_what_a_dataset_json_leaves_to_the_data(mri):
    from argparse import Namespace

    from monai.transforms import Spacingd

    from dataset.fingerprint import derive_from_data
    from load_datasets_transforms import data_transforms

    dataset = str(mri / "dataset.json")
    config = load_dataset_config(dataset)
    assert config.to_derive()  # spacing and z-score masks
    derived, _ = derive_from_data(config, find_cases(config, None, "training"), 1)
    chain = data_transforms(Namespace(dataset=dataset, root=None, mode="test", datalist=None))
    spacing = next(t for t in chain.transforms if isinstance(t, Spacingd)).spacing_transform.pixdim
    np.testing.assert_allclose(spacing, derived.spacing)


# ---- 12. geometry at the edges: float noise in the directions, 4D channel files, settings in a datalist ----


def test_float_noise_in_the_directions_does_not_move_the_grid(tmp_path):
    """A scan whose affine carries 1e-6 of noise off the diagonal (a DICOM conversion's float32) is
    preprocessed as the same scan with a clean affine, for training and inference, where MONAI's oblique
    path moved the grid by a third of a millimetre; a scan tilted on purpose stays tilted."""
    rng = np.random.default_rng(0)
    volume = rng.normal(0, 200, (48, 40, 20)).astype(np.int16)
    label = (np.abs(volume) > 150).astype(np.uint8)
    clean = np.diag([-0.8, -0.8, 2.5, 1.0])
    clean[:3, 3] = [100.0, 80.0, -50.0]
    noisy = clean.copy()
    noisy[0, 1], noisy[1, 0], noisy[2, 0] = 1e-6, -1e-6, 1e-6
    config = replace(load_dataset_config("amos"), mirror_axes=())
    prepared = {}
    for name, affine in (("clean", clean), ("noisy", noisy)):
        case = {"image": save(tmp_path / f"{name}.nii.gz", volume, affine)}
        case["label"] = save(tmp_path / f"{name}_label.nii.gz", label, affine)
        test = build_transforms(config, "test")({"image": case["image"]})["image"]
        _, validation = build_transforms(config, "train", (16, 16, 16))
        prepared[name] = test, validation(case)
    (test, validation), (noisy_test, noisy_validation) = prepared["clean"], prepared["noisy"]
    assert noisy_test.shape == test.shape and np.allclose(noisy_test.affine, test.affine, atol=1e-9)
    assert (noisy_test - test).abs().max() < 1e-5
    assert torch.equal(torch.as_tensor(noisy_validation["label"]), torch.as_tensor(validation["label"]))
    tilted = clean.copy()
    tilted[:3, :3] = clean[:3, :3] @ np.array([[1, 0, 0], [0, 0.99, -0.141], [0, 0.141, 0.99]])  # about 8 degrees
    loaded = LoadCased(keys="image")({"image": save(tmp_path / "tilted.nii.gz", volume, tilted)})["image"]
    assert np.allclose(loaded.affine, nib.load(tmp_path / "tilted.nii.gz").affine)


def test_a_one_volume_4d_channel_file_is_a_channel_for_test_seg_and_the_bundle(tmp_path):
    """``case_0001.nii.gz`` of shape (X, Y, Z, 1) is channel 1 of ``case`` in test_seg.py's folders and the
    bundle's alike, and loads as one; a 4D file of two volumes is a case of its own in both."""
    from dataset.portable import case_images

    config = DatasetConfig("two", ("bg", "a"), None, ("T1", "T2"), (ChannelNorm("zscore", nonzero_mask=True),) * 2)
    volume = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)
    folder = tmp_path / "images"
    save(folder / "case_0000.nii.gz", volume)
    save(folder / "case_0001.nii.gz", volume[..., None] * 2)
    save(folder / "both_0000.nii.gz", np.stack([volume, volume], axis=-1))
    mine, bundles = cases_from_paths([folder], config), case_images(folder, 2)
    expected = [str(folder / "both_0000.nii.gz"), [str(folder / "case_0000.nii.gz"), str(folder / "case_0001.nii.gz")]]
    assert sorted([case["image"] for case in mine], key=str) == sorted(expected, key=str)
    assert sorted([case["image"] for case in bundles], key=str) == sorted(expected, key=str)
    loaded = LoadCased(keys="image")({"image": expected[1]})["image"]
    assert tuple(loaded.shape) == (2, 6, 5, 4) and torch.equal(loaded[1], loaded[0] * 2)
    save(folder / "lone_0000.nii.gz", volume)
    save(folder / "lone_0001.nii.gz", np.stack([volume, volume], axis=-1))
    with pytest.raises(DatasetError, match=r"lone_0001.nii.gz: missing .*\(it holds several channels: a case of"):
        cases_from_paths([folder], config)


def test_dataset_settings_in_a_datalist_are_refused(tmp_path):
    """A datalist gives lists; a setting in it (left/right pairs for a preset, say) used to be dropped."""
    datalist = write_json(tmp_path / "list.json", {"training": [], "lateral_pairs": [[2, 3]], "spacing": [1, 1, 1]})
    with pytest.raises(DatasetError) as raised:
        load_dataset_config("amos", datalist)
    assert str(raised.value) == (
        f"--datalist {datalist}: 'spacing', 'lateral_pairs' are dataset settings, which a datalist does not change "
        "(it gives the training/validation/test lists only): put them in a dataset JSON given as --dataset"
    )
    published = write_json(
        tmp_path / "published.json",
        {"labels": {"0": "background"}, "modality": {"0": "CT"}, "training": [{"image": "a", "label": "b"}]},
    )
    assert load_dataset_config("amos", published).lists["training"] == [{"image": "a", "label": "b"}]
