"""Where the foreground crops centre: on any labelled voxel alike (``voxels``, as published) or, as nnU-Net
draws them, on a class present in the case, each alike, then on a voxel of it (``classes``)."""

import json
from collections import Counter

import pytest
import torch
from conftest import TINY_RUN, flags
from test_union import union_file, write_source

import main_train
from dataset.description import DatasetError, load_dataset_config
from dataset.labels import LabelSets, SourceLabels
from dataset.transforms import BalancedCropd, CropCentres, UnifyLabelsd
from phantom import write_dataset

SIZE, ROI = 24, 4
IGNORE = 4


def sparse_label() -> torch.Tensor:
    """A large class (2560 voxels), a small one (8), a single voxel and an unannotated block, all inside the
    centres a crop may have (a centre drawn nearer the border is moved inwards, onto the background)."""
    label = torch.zeros(1, SIZE, SIZE, SIZE)
    label[0, 4:20, 4:20, 4:14] = 1
    label[0, 15:17, 15:17, 16:18] = 2
    label[0, 6, 6, 17] = 3
    label[0, 4:8, 14:19, 15:20] = IGNORE
    return label


def centres(rule: CropCentres, label: torch.Tensor, calls: int = 1500) -> list[tuple[int, int, int]]:
    """The crop centres a BalancedCropd draws on ``label``, ``calls`` times two crops."""
    crop = BalancedCropd(rule, keys=["label"], label_key="label", spatial_size=(ROI,) * 3, pos=1, neg=1, num_samples=2)
    crop.set_random_state(0)
    drawn = []
    for _ in range(calls):
        crop({"label": label})
        drawn += [tuple(int(v) for v in centre) for centre in crop.cropper.centers]
    return drawn


def shares(label: torch.Tensor, drawn: list[tuple[int, int, int]]) -> dict[int, float]:
    counts = Counter(int(label[0, x, y, z]) for x, y, z in drawn)
    return {value: count / len(drawn) for value, count in counts.items()}


def test_class_crops_centre_each_present_class_alike_then_any_of_its_voxels():
    label = sparse_label()
    drawn = centres(CropCentres("body", IGNORE, "classes"), label)
    share = shares(label, drawn)
    assert IGNORE not in share  # never on an unannotated voxel
    # nnU-Net's rule: half the crops on the background; the other half split evenly between the three classes
    # present, whatever their volumes
    assert share[0] == pytest.approx(0.5, abs=0.04)
    for value in (1, 2, 3):
        assert share[value] == pytest.approx(0.5 / 3, abs=0.03), value
    # within a class, each voxel alike: the large block's centres average its middle (z 4..13 -> 8.5)
    large = [z for x, y, z in drawn if label[0, x, y, z] == 1]
    assert sum(large) / len(large) == pytest.approx(8.5, abs=0.3)
    assert len({c for c in drawn if label[0][c] == 2}) == 8  # every voxel of the small class is drawn


def test_voxel_crops_centre_each_class_in_proportion_to_its_volume():
    label = sparse_label()
    share = shares(label, centres(CropCentres("body", IGNORE, "voxels"), label))
    assert IGNORE not in share and share[0] == pytest.approx(0.5, abs=0.04)
    assert share[1] == pytest.approx(0.5 * 2560 / 2569, abs=0.04)
    assert share.get(2, 0) + share.get(3, 0) < 0.01  # 9 voxels of 2569: almost never centred


def test_region_crops_draw_each_region_alike_as_nnunet_does():
    # BraTS's nested regions: whole tumour {1, 2, 3}, tumour core {2, 3}, enhancing tumour {3}
    label = torch.zeros(1, SIZE, SIZE, SIZE)
    label[0, 4:20, 4:20, 4:14] = 1
    label[0, 4:10, 4:10, 14:20] = 2
    label[0, 15:17, 15:17, 16:18] = 3
    counts = {value: int((label == value).sum()) for value in (1, 2, 3)}
    groups = ((1, 2, 3), (2, 3), (3,))
    share = shares(label, centres(CropCentres("body", None, "classes", groups), label))
    # a region drawn with probability 1/3, then a voxel of it: P(value v) = sum over regions holding v
    expected = {
        v: sum(counts[v] / sum(counts[m] for m in group) for group in groups if v in group) / 3 for v in (1, 2, 3)
    }
    for value in (1, 2, 3):
        assert share[value] == pytest.approx(0.5 * expected[value], abs=0.03), value


def test_union_crops_draw_among_the_sources_own_labels():
    classes = ("background", "spleen", "right kidney", "left kidney", "liver", "pancreas")
    organs = SourceLabels("organs", ("spleen", "kidney", "liver"), ((1,), (2, 3), (4,)))
    kidneys = SourceLabels("kidneys", ("right kidney", "left kidney", "pancreas"), ((2,), (3,), (5,)))
    sets = LabelSets(classes, [organs, kidneys])
    label = torch.zeros(1, SIZE, SIZE, SIZE)
    label[0, 4:20, 4:20, 4:14] = 3  # liver: large
    label[0, 15:17, 15:17, 16:18] = 2  # kidney, both sides as one label: small
    unified = UnifyLabelsd(sets)({"label": label, "source": 0})["label"]
    share = shares(unified, centres(CropCentres("body", sets.ignore_code, "classes"), unified))
    kidney, liver = sets.raw_to_code(0)[2], sets.raw_to_code(0)[3]
    assert share[kidney] == pytest.approx(0.25, abs=0.03) and share[liver] == pytest.approx(0.25, abs=0.03)


def test_a_case_without_foreground_falls_back_to_background_crops():
    label = torch.zeros(1, SIZE, SIZE, SIZE)
    with pytest.warns(UserWarning, match="Num foregrounds 0"):
        drawn = centres(CropCentres("body", None, "classes"), label, calls=3)
    assert len(drawn) == 6


def test_a_case_without_background_centres_every_crop_on_a_class_each_alike():
    label = torch.ones(1, SIZE, SIZE, SIZE)
    label[0, 10:12, 10:12, 10:12] = 2  # 8 voxels of 13824
    with pytest.warns(UserWarning, match="Num backgrounds 0"):
        share = shares(label, centres(CropCentres("body", None, "classes"), label, calls=500))
    assert share[1] == pytest.approx(0.5, abs=0.05) and share[2] == pytest.approx(0.5, abs=0.05)


def test_the_json_key_and_its_one_line_refusals(tmp_path):
    assert load_dataset_config("flare").foreground_crops == "voxels"  # the presets draw as published
    source = tmp_path / write_source(tmp_path / "organs", ["spleen"], foreground_crops="classes")
    assert load_dataset_config(str(source)).foreground_crops == "classes"
    write_source(tmp_path / "organs", ["spleen"], foreground_crops="class")
    message = str(pytest.raises(DatasetError, load_dataset_config, str(source)).value)
    assert message == f"--dataset {source}: 'foreground_crops' 'class': expected voxels or classes"
    union = union_file(tmp_path / "union")
    assert load_dataset_config(str(union)).foreground_crops == "classes"  # a union's default
    given = union_file(tmp_path / "given", foreground_crops="voxels")
    assert load_dataset_config(str(given)).foreground_crops == "voxels"  # the union's own key
    sided = ["right kidney", "left kidney", "pancreas"]
    write_source(tmp_path / "given" / "kidneys", sided, foreground_crops="classes")
    assert load_dataset_config(str(given)).foreground_crops == "voxels"  # a source's key is not the union's
    wrong = union_file(tmp_path / "wrong", foreground_crops="class")
    message = str(pytest.raises(DatasetError, load_dataset_config, str(wrong)).value)
    assert message == f"--dataset {wrong}: 'foreground_crops' 'class': expected voxels or classes"


def test_a_run_records_its_foreground_crops_and_resumes_only_with_them(tmp_path, capsys):
    root = tmp_path / "data"
    write_dataset(root, num_train=2, num_val=1, num_test=0, seed=5)
    output = tmp_path / "run"
    steps = flags(dataset=root / "dataset.json", output=output, max_iter=2, eval_step=2, **TINY_RUN)
    main_train.main(steps + ["--foreground_crops", "classes"])
    assert "Foreground crops: centred on a class present in the case, each alike" in capsys.readouterr().out
    card = json.loads((output / "best_metric_model.pth.json").read_text())
    assert card["foreground_crops"] == "classes"
    with pytest.raises(SystemExit) as refused:
        main_train.main(steps + ["--resume", "auto"])  # the dataset's own: voxels
    message = str(refused.value.code)
    assert "foreground_crops classes (flags: voxels)" in message
    assert message.endswith("; pass --foreground_crops classes to continue it as it was trained")
