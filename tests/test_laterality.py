"""Mirroring that knows left from right: pairs from class names, the training flip, the chains that use it."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TINY_RUN, flags
from test_resume import load_state, stopping_optimizer

import cli
import main_train
from dataset.description import AMOS_LABELS, FETA_LABELS, FLARE_LABELS, DatasetError, load_dataset_config
from dataset.laterality import (
    check_lateral_pairs,
    find_lateral_pairs,
    lateral_order,
    mirrorings,
    swap_lateral_labels,
)
from dataset.transforms import RandMirrord, build_transforms
from phantom import LATERAL_LABELS, make_case, write_dataset

BTCV_LABELS = (
    "background",
    "spleen",
    "right kidney",
    "left kidney",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior vena cava",
    "portal vein and splenic vein",
    "pancreas",
    "right adrenal gland",
    "left adrenal gland",
)
#: BTCV as MONAI's tutorial dataset_0.json names its classes.
BTCV_ABBREVIATED = (
    "background",
    "spleen",
    "rkid",
    "lkid",
    "gall",
    "eso",
    "liver",
    "sto",
    "aorta",
    "IVC",
    "veins",
    "pancreas",
    "rad",
    "lad",
)
#: TotalSegmentator v2 class names (a selection with every naming pattern it uses, its unpaired
#: one-sided classes and its vertebrae, whose L and T are not sides).
TOTALSEGMENTATOR = (
    "background",
    "spleen",
    "kidney_right",
    "kidney_left",
    "liver",
    "adrenal_gland_right",
    "adrenal_gland_left",
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
    "lung_upper_lobe_right",
    "lung_middle_lobe_right",
    "lung_lower_lobe_right",
    "vertebrae_L1",
    "vertebrae_T12",
    "atrial_appendage_left",
    "iliac_artery_left",
    "iliac_artery_right",
    "femur_left",
    "femur_right",
    "rib_left_1",
    "rib_left_2",
    "rib_right_1",
    "rib_right_2",
    "heart",
    "kidney_cyst_left",
    "kidney_cyst_right",
)


def pairs_by_name(labels, *named):
    return tuple(sorted(tuple(sorted((labels.index(a), labels.index(b)))) for a, b in named))


def test_pairs_from_amos_btcv_and_totalsegmentator_names():
    assert find_lateral_pairs(AMOS_LABELS) == ((2, 3), (11, 12))
    assert find_lateral_pairs(BTCV_LABELS) == ((2, 3), (12, 13))
    assert find_lateral_pairs(BTCV_ABBREVIATED) == ((2, 3), (12, 13))
    assert find_lateral_pairs(TOTALSEGMENTATOR) == pairs_by_name(
        TOTALSEGMENTATOR,
        ("kidney_right", "kidney_left"),
        ("adrenal_gland_right", "adrenal_gland_left"),
        ("lung_upper_lobe_left", "lung_upper_lobe_right"),
        ("lung_lower_lobe_left", "lung_lower_lobe_right"),
        ("iliac_artery_left", "iliac_artery_right"),
        ("femur_left", "femur_right"),
        ("rib_left_1", "rib_right_1"),
        ("rib_left_2", "rib_right_2"),
        ("kidney_cyst_left", "kidney_cyst_right"),
    )


@pytest.mark.parametrize(
    "labels, expected",
    [
        (("background", "Kidney_L", "Kidney_R", "Liver"), ((1, 2),)),
        (("background", "lt kidney", "RT KIDNEY"), ((1, 2),)),
        (("background", "Left Femoral Head", "Right Femoral Head", "bladder"), ((1, 2),)),
        (("background", "L-hippocampus", "R-hippocampus"), ((1, 2),)),
        (("background", "left kidney", "kidney"), ()),  # no counterpart
        (("background", "left kidney", "left kidney upper pole", "right kidney"), ((1, 3),)),
        (("background", "left kidney", "Left_Kidney", "right kidney"), ()),  # two left kidneys: ambiguous
        (("left lung", "right lung", "tumour"), ()),  # value 0 is background, never in a pair
    ],
)
def test_pairs_from_name_patterns(labels, expected):
    assert find_lateral_pairs(labels) == expected


def test_no_pairs_in_flare_feta_or_the_phantom():
    for labels in (FLARE_LABELS, FETA_LABELS, ("background", "spleen", "kidney", "liver", "pancreas")):
        assert find_lateral_pairs(labels) == ()
    assert find_lateral_pairs(LATERAL_LABELS) == ((2, 3),)


def test_presets_and_dataset_jsons_say_what_mirrors(tmp_path):
    amos = load_dataset_config("amos")
    assert amos.pairs == ((2, 3), (11, 12)) and amos.mirror_axes == ()
    assert load_dataset_config("flare").mirror_axes == () and load_dataset_config("feta").pairs == ()
    description = {"labels": {str(i): name for i, name in enumerate(AMOS_LABELS)}, "training": []}
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(description))
    config = load_dataset_config(str(path))
    assert config.mirror_axes == (0, 1, 2) and config.pairs == ((2, 3), (11, 12))
    path.write_text(json.dumps({**description, "lateral_pairs": [[3, 2]], "mirror_axes": [2, 0]}))
    config = load_dataset_config(str(path))
    assert config.pairs == ((2, 3),) and config.mirror_axes == (0, 2)
    path.write_text(json.dumps({**description, "lateral_pairs": []}))
    assert load_dataset_config(str(path)).pairs == ()


@pytest.mark.parametrize(
    "pairs, message",
    [
        ([[0, 1]], "'lateral_pairs' [0, 1]: 0 is not a foreground class (1..15)"),
        ([[2, 16]], "'lateral_pairs' [2, 16]: 16 is not a foreground class (1..15)"),
        ([[2, 3], [3, 4]], "'lateral_pairs': class 3 is in more than one place"),
        ([[2, 2]], "'lateral_pairs': class 2 is in more than one place"),
        ([[2]], "'lateral_pairs' must be a list of [a, b] class values"),
        ("2,3", "'lateral_pairs' must be a list of [a, b] class values"),
    ],
)
def test_bad_lateral_pairs_are_named(tmp_path, pairs, message):
    path = tmp_path / "dataset.json"
    labels = {str(i): name for i, name in enumerate(AMOS_LABELS)}
    path.write_text(json.dumps({"labels": labels, "training": [], "lateral_pairs": pairs}))
    with pytest.raises(DatasetError) as raised:
        load_dataset_config(str(path))
    assert str(raised.value).startswith(f"--dataset {path}: ") and message in str(raised.value)
    with pytest.raises(ValueError, match="more than one place"):
        check_lateral_pairs([[1, 2], [2, 1]], 5, "card")


def label_volume() -> torch.Tensor:
    """A 1 x 6 x 5 x 4 label map holding every value 0..6 (6: an ignore label) at asymmetric places."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 7, (1, 6, 5, 4), generator=generator).float()


def test_a_left_right_flip_swaps_each_pair_and_only_the_pairs():
    image, label = torch.arange(120.0).reshape(1, 6, 5, 4), label_volume()
    flip = RandMirrord(["image", "label"], axes=(0,), lateral_pairs=((2, 3), (4, 5)), prob=1.0)
    out = flip({"image": image, "label": label})
    torch.testing.assert_close(out["image"], image.flip(1))
    mirrored = label.flip(1)
    expected = mirrored.clone()
    for a, b in ((2, 3), (4, 5)):
        expected[mirrored == a], expected[mirrored == b] = b, a
    torch.testing.assert_close(out["label"], expected)
    for value in (0, 1, 6):  # classes outside the pairs (and the ignore label) keep their value
        assert torch.equal(out["label"] == value, mirrored == value)
    assert torch.equal(out["label"] == 3, mirrored == 2) and torch.equal(out["label"] == 2, mirrored == 3)


@pytest.mark.parametrize("axis", [1, 2])
def test_flips_along_other_axes_swap_nothing(axis):
    image, label = torch.arange(120.0).reshape(1, 6, 5, 4), label_volume()
    flip = RandMirrord(["image", "label"], axes=(axis,), lateral_pairs=((2, 3),), prob=1.0)
    out = flip({"image": image, "label": label})
    torch.testing.assert_close(out["image"], image.flip(axis + 1))
    torch.testing.assert_close(out["label"], label.flip(axis + 1))


def flips_drawn(seed: int, count: int) -> list[tuple[int, ...]]:
    """The axes a seeded RandMirrord over all three axes flips in ``count`` calls."""
    flip = RandMirrord(["image"], axes=(0, 1, 2))
    flip.set_random_state(seed=seed)
    draws = []
    for _ in range(count):
        flip({"image": torch.zeros(1, 2, 2, 2)})
        draws.append(flip.flipped)
    return draws


def test_each_axis_flips_with_probability_one_half_independently():
    draws = flips_drawn(seed=3, count=4000)
    for axis in (0, 1, 2):
        assert 0.46 < np.mean([axis in drawn for drawn in draws]) < 0.54
    for combination in mirrorings((0, 1, 2)):
        assert 0.10 < np.mean([drawn == combination for drawn in draws]) < 0.15  # 1/8 each
    assert flips_drawn(seed=3, count=50) == draws[:50]  # a function of the seed: --resume replays it


def test_probability_channels_swap_back():
    probabilities = torch.rand(2, 4, 3, 3, 3)
    order = lateral_order(((1, 3),), 4)
    assert order == [0, 3, 2, 1] and lateral_order((), 4) == [0, 1, 2, 3]
    swapped = probabilities[:, order]
    assert torch.equal(swapped[:, 1], probabilities[:, 3]) and torch.equal(swapped[:, 3], probabilities[:, 1])
    torch.testing.assert_close(swapped[:, order], probabilities)  # its own inverse
    assert torch.equal(swap_lateral_labels(torch.tensor([0, 1, 2, 3]), ((1, 3),)), torch.tensor([0, 3, 2, 1]))


def chain_types(chain) -> list[str]:
    return [type(t).__name__ for t in chain.transforms]


@pytest.fixture(scope="module")
def lateral(tmp_path_factory):
    root = tmp_path_factory.mktemp("lateral")
    write_dataset(root, num_train=2, num_val=1, num_test=0, seed=5, lateral=True)
    return root


def test_chains_mirror_only_where_asked(lateral):
    flare = load_dataset_config("flare")
    train, val = build_transforms(flare, "train", (32, 32, 32))
    assert "RandMirrord" not in chain_types(train) + chain_types(val)  # presets train as published
    config = load_dataset_config(str(lateral / "dataset.json"))
    for device in (None, torch.device("cpu")):  # the --gpu_transforms chain, on the CPU here
        train, val = build_transforms(config, "train", (32, 32, 32), device=device)
        mirror = [t for t in train.transforms if isinstance(t, RandMirrord)]
        assert len(mirror) == 1 and mirror[0].axes == (0, 1, 2) and mirror[0].lateral_pairs == ((2, 3),)
        assert chain_types(train)[-2:] == ["RandMirrord", "EnsureTyped"] and "RandMirrord" not in chain_types(val)
    assert "RandMirrord" not in chain_types(build_transforms(config, "test"))
    unmirrored, _ = build_transforms(replace(config, mirror_axes=()), "train", (32, 32, 32))
    assert "RandMirrord" not in chain_types(unmirrored)


def centroid_x(label: torch.Tensor, value: int) -> float:
    return float(torch.nonzero(label[0] == value)[:, 0].float().mean())


def test_training_crops_keep_each_kidney_on_its_side(lateral):
    """What the model sees: crops large enough to hold both kidneys, mirrored along every axis; the liver
    (not a pair) moves to the left with a left-right flip, and the kidneys' labels follow their side."""
    config = load_dataset_config(str(lateral / "dataset.json"))
    assert not config.to_derive()  # the phantom's dataset.json gives spacing and window
    train, _ = build_transforms(config, "train", (96, 96, 80), crop_sample=2)
    case = {"image": str(lateral / "imagesTr" / "phantom_000.nii.gz")}
    case["label"] = case["image"].replace("imagesTr", "labelsTr")
    flipped_seen = unflipped_seen = 0
    for seed in range(6):
        train.set_random_state(seed=seed)
        for crop in train(case):
            label = crop["label"]
            if not all((label == v).any() for v in (1, 2, 3, 4)):
                continue
            liver_left_of_spleen = centroid_x(label, 4) < centroid_x(label, 1)
            flipped_seen += liver_left_of_spleen
            unflipped_seen += not liver_left_of_spleen
            assert centroid_x(label, 2) > centroid_x(label, 3)  # right kidney towards +x (R), always
    assert flipped_seen and unflipped_seen


def train_lateral(root, output, *extra, **values):
    steps = {"lr": 1e-3, "max_iter": 7, "eval_step": 4, **TINY_RUN, **values}
    main_train.main(flags(root=root, dataset=root / "dataset.json", output=output, **steps) + list(extra))


def test_a_mirrored_run_records_its_mirroring_and_resumes_exactly(lateral, tmp_path, monkeypatch, capsys):
    train_lateral(lateral, tmp_path / "straight")
    printed = capsys.readouterr().out
    assert (
        "Mirroring: each crop along axes 0 (left-right), 1 (posterior-anterior), 2 (inferior-superior), each with "
        "probability 1/2; left/right pairs (swapped on left-right flips): right kidney (2) <-> left kidney (3)"
    ) in printed
    card = json.loads((tmp_path / "straight" / "best_metric_model.pth.json").read_text())
    assert card["mirror_axes"] == [0, 1, 2] and card["lateral_pairs"] == [[2, 3]]
    stopping_optimizer(monkeypatch, stop_after=3)
    with pytest.raises(SystemExit):
        train_lateral(lateral, tmp_path / "stopped")
    monkeypatch.undo()
    checkpoint = tmp_path / "stopped" / "checkpoint_last.pth"
    for changed in ("none", "0"):
        with pytest.raises(SystemExit) as refused:
            train_lateral(lateral, tmp_path / "stopped", "--resume", "auto", "--mirror_axes", changed)
        assert str(refused.value.code).startswith(f"error: --resume {checkpoint}: the checkpoint is of another")
        assert "mirror_axes [0, 1, 2] (flags: [" in str(refused.value.code)
        assert str(refused.value.code).endswith("; pass --mirror_axes 0,1,2 to continue it as it was trained")
    saved = load_state(checkpoint)
    before = {**saved, "card": {k: v for k, v in saved["card"].items() if k not in ("mirror_axes", "lateral_pairs")}}
    torch.save(before, tmp_path / "before.pth")  # a checkpoint from before mirroring was recorded
    with pytest.raises(SystemExit) as refused:
        train_lateral(lateral, tmp_path / "stopped", "--resume", str(tmp_path / "before.pth"))
    assert "mirror_axes [] (flags: [0, 1, 2]); pass --mirror_axes none to continue it" in str(refused.value.code)
    train_lateral(lateral, tmp_path / "stopped", "--resume", "auto")
    straight, resumed = (load_state(tmp_path / run / "checkpoint_last.pth") for run in ("straight", "stopped"))
    assert resumed["progress"] == straight["progress"] and resumed["progress"]["step"] == 7
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


def test_presets_record_no_mirroring_unless_asked(tmp_path, capsys):
    root = tmp_path / "flare"
    write_dataset(root, num_train=2, num_val=1, num_test=0, seed=5)
    main_train.main(flags(root=root, output=tmp_path / "run", max_iter=1, eval_step=1, **TINY_RUN))
    assert "Mirroring: none (--mirror_axes to mirror); left/right pairs: none" in capsys.readouterr().out
    card = json.loads((tmp_path / "run" / "best_metric_model.pth.json").read_text())
    assert card["mirror_axes"] == [] and card["lateral_pairs"] == []
    main_train.main(
        flags(root=root, output=tmp_path / "mirrored", max_iter=1, eval_step=1, mirror_axes="2,1", **TINY_RUN)
    )
    assert json.loads((tmp_path / "mirrored" / "best_metric_model.pth.json").read_text())["mirror_axes"] == [1, 2]


@pytest.mark.parametrize("value, expected", [("0,1,2", (0, 1, 2)), ("2, 0", (0, 2)), ("none", ()), ("NONE", ())])
def test_mirror_axes_flag_takes_axes_or_none(value, expected):
    assert cli.mirror_axes(value) == expected


@pytest.mark.parametrize("value", ["3", "0,x", "-1", "all"])
def test_mirror_axes_flag_names_what_it_takes(value, capsys):
    with pytest.raises(SystemExit):
        main_train.main(["--output", "o", "--mirror_axes", value])
    assert (
        f"argument --mirror_axes: expected spatial axes such as 0,1,2 (0 left-right, 1 posterior-anterior, 2 "
        f"inferior-superior) or none, got {value!r}"
    ) in capsys.readouterr().err


def test_the_lateral_phantom_puts_each_kidney_on_its_side():
    image, label, affine = make_case(np.random.default_rng(2), orientation="LPS", lateral=True)
    same_image, flare_label, _ = make_case(np.random.default_rng(2), orientation="LPS")
    world = np.stack(np.nonzero(np.ones(label.shape)), axis=-1) @ affine[:3, :3].T + affine[:3, 3]
    x = world[:, 0].reshape(label.shape)  # RAS x: towards the patient's right
    assert x[label == 2].mean() > 10 > -10 > x[label == 3].mean()  # right kidney 2, left kidney 3
    assert x[label == 4].mean() > 0 > x[label == 1].mean()  # liver right, spleen left
    np.testing.assert_array_equal(same_image, image)  # the same case, labelled by side
    np.testing.assert_array_equal(np.isin(label, (2, 3)), flare_label == 2)
