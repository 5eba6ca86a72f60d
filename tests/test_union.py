"""A union of datasets that annotate different classes: the label sets, the marginal loss against an
independent implementation, the one-line refusals of the union JSON, per-source validation and evaluation,
batches weighted by source, a union trained, segmented and exported end to end, and a union's
cross-validation study (its held-out cases scored on their sources' labels)."""

import filecmp
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_RUN, exit_message, flags
from monai.losses import DiceCELoss

import crossval
import export
import main_train
import phantom
import test_seg
from dataset.description import DatasetError, load_dataset_config
from dataset.labels import LabelManager, LabelSets, SourceLabels
from dataset.transforms import CropCentres, UnifyLabelsd, build_transforms
from engine.checkpoint import check_resumed_run
from engine.common import UsageError
from engine.crossval import HELD_OUT, Configuration, FoldRun, Scoring, _scoring
from engine.losses import AnnotatedDiceCELoss, LabelSetDiceCELoss
from engine.validation import dice_per_label_set, foreground_dice, summarise_scores

CLASSES = ("background", "spleen", "right kidney", "left kidney", "liver", "pancreas")
#: FLARE-like: spleen, kidney (both sides), liver; the pancreas not annotated. Its ignore label is 4.
ORGANS = SourceLabels("organs", ("spleen", "kidney", "liver"), ((1,), (2, 3), (4,)), ignore_label=4)
#: kidneys by side and pancreas; spleen and liver not annotated.
KIDNEYS = SourceLabels("kidneys", ("right kidney", "left kidney", "pancreas"), ((2,), (3,), (5,)))


def reference_loss(
    logits: np.ndarray, codes: np.ndarray, sources: np.ndarray, channels_of, code_to_channel, pseudo_labels=None
) -> float:
    """The label-set Dice + cross-entropy written out voxel by voxel: the softmax of the classes, each channel
    the sum of its classes' probabilities; -log of the voxel's channel, averaged over the annotated voxels;
    1 - (2 I + 1e-5) / (P + T + 1e-5) per crop and channel, averaged over a crop's channels, then over the
    crops with annotated voxels. With ``pseudo_labels``, a voxel of the source's background takes -log of its
    most probable class the source does not annotate instead, when that probability is above it."""
    logits = logits.astype(np.float64)
    total, voxels, dice = 0.0, 0, []
    for b in range(logits.shape[0]):
        channels, table = channels_of(sources[b]), code_to_channel(sources[b])
        exponent = np.exp(logits[b] - logits[b].max(axis=0))
        probabilities = exponent / exponent.sum(axis=0)
        sums = np.zeros((len(channels),))
        intersections, truths = np.zeros(len(channels)), np.zeros(len(channels))
        annotated_here = 0
        for index in np.ndindex(codes.shape[1:]):
            channel = table[codes[b][index]]
            if channel < 0:
                continue
            annotated_here += 1
            marginal = [sum(probabilities[(c, *index)] for c in group) for group in channels]
            unannotated = [c for c in channels[0] if c > 0] if channel == 0 else []
            best = max(unannotated, key=lambda c: probabilities[(c, *index)], default=None)
            if pseudo_labels is not None and best is not None and probabilities[(best, *index)] > pseudo_labels:
                total -= math.log(probabilities[(best, *index)])
            else:
                total -= math.log(marginal[channel])
            for j, value in enumerate(marginal):
                sums[j] += value
                intersections[j] += value * (j == channel)
                truths[j] += j == channel
        voxels += annotated_here
        if annotated_here:
            dice.append(np.mean(1 - (2 * intersections + 1e-5) / (sums + truths + 1e-5)))
    return float(np.mean(dice) + total / voxels)


def test_the_marginal_loss_equals_an_independent_implementation_with_sets_missing_classes_and_ignore():
    sets = LabelSets(CLASSES, [ORGANS, KIDNEYS])
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, 3, 4, 5, generator=generator, dtype=torch.float64) * 2
    raw = [torch.randint(0, 5, (3, 4, 5), generator=generator), torch.randint(0, 4, (3, 4, 5), generator=generator)]
    sources = torch.tensor([0, 1, 0, 1])
    codes = torch.stack([torch.tensor(sets.raw_to_code(int(k)))[raw[int(k)]] for k in sources])
    codes[2] = sets.ignore_code  # a crop of unannotated voxels only adds nothing
    assert (codes[0] == sets.ignore_code).any() and (codes[0] == sets.code_of((2, 3))).any()
    loss = LabelSetDiceCELoss(sets)(logits.float(), codes[:, None], sources)
    expected = reference_loss(logits.numpy(), codes.numpy(), sources.numpy(), sets.channels, sets.code_to_channel)
    assert abs(float(loss) - expected) / expected < 1e-5


def test_pseudo_labels_equal_an_independent_implementation_and_leave_the_rest_as_the_sets_say():
    sets = LabelSets(CLASSES, [ORGANS, KIDNEYS], pseudo_labels=0.6)
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 6, 3, 4, 5, generator=generator, dtype=torch.float64) * 3
    raw = [torch.randint(0, 5, (3, 4, 5), generator=generator), torch.randint(0, 4, (3, 4, 5), generator=generator)]
    sources = torch.tensor([0, 1, 0, 1])
    codes = torch.stack([torch.tensor(sets.raw_to_code(int(k)))[raw[int(k)]] for k in sources])
    probabilities = torch.softmax(logits, 1)
    background_of_kidneys = (codes == 0) & (sources[:, None, None, None] == 1)
    # the cases this test is about occur: confident spleen or liver where the kidneys source says background,
    # and a confident side inside the organs source's kidney (a label of the source: left a set)
    assert ((probabilities[:, [1, 4]].amax(1) > 0.6) & background_of_kidneys).any()
    kidney = (codes == sets.code_of((2, 3))) & (sources[:, None, None, None] == 0)
    assert ((probabilities[:, [2, 3]].amax(1) > 0.6) & kidney).any()
    assert sets.channels(0)[0] == (0, 5) and sets.channels(1)[0] == (0, 1, 4)
    loss = LabelSetDiceCELoss(sets)(logits.float(), codes[:, None], sources)
    expected = reference_loss(logits.numpy(), codes.numpy(), sources.numpy(), sets.channels, sets.code_to_channel, 0.6)
    assert abs(float(loss) - expected) / expected < 1e-5
    without = reference_loss(logits.numpy(), codes.numpy(), sources.numpy(), sets.channels, sets.code_to_channel)
    assert abs(expected - without) > 1e-3


def test_pseudo_labels_pull_a_confident_unannotated_class_up_and_leave_a_confident_background_alone():
    codes = torch.zeros(1, 1, 1, 2, dtype=torch.long)  # the kidneys source's background: {0, spleen, liver}
    logits = torch.zeros(1, 6, 1, 1, 2)
    logits[0, [2, 3, 5]] = -5.0  # the classes the source annotates: absent
    logits[0, 1, 0, 0, 0] = 3.0  # spleen, confident (0.91)
    logits[0, 0, 0, 0, 1] = 3.0  # background, confident
    steps = []
    for pseudo_labels in (None, 0.8):
        leaf = logits.clone().requires_grad_(True)
        LabelSetDiceCELoss(LabelSets(CLASSES, [ORGANS, KIDNEYS], pseudo_labels=pseudo_labels))(
            leaf, codes, [1]
        ).backward()
        steps.append(-leaf.grad[0, :, 0, 0])  # a descent step on each voxel's logits
    without, pseudo = steps
    # the sets alone hardly tell spleen from background; the pseudo-label raises the spleen over background
    assert float(pseudo[1, 0] - pseudo[0, 0]) > 10 * abs(float(without[1, 0] - without[0, 0]))
    # a confident background trains exactly as without pseudo-labels: never pulled away from the spleen
    assert torch.allclose(pseudo[:, 1], without[:, 1], atol=1e-7)


def test_a_sources_own_label_of_several_classes_stays_a_set_under_pseudo_labels():
    sets = LabelSets(CLASSES, [ORGANS, KIDNEYS])
    codes = torch.full((1, 1, 2, 2), sets.code_of((2, 3)))  # the organs source's kidney: right or left
    logits = torch.zeros(1, 6, 1, 2, 2)
    logits[0, 2] = 4.0  # confidently the right kidney
    plain = LabelSetDiceCELoss(sets)(logits, codes, [0])
    pseudo = LabelSetDiceCELoss(LabelSets(CLASSES, [ORGANS, KIDNEYS], pseudo_labels=0.6))(logits, codes, [0])
    assert float(torch.softmax(logits, 1)[0, 2].min()) > 0.9 and float(plain) == float(pseudo)


def test_naive_merging_trains_the_unannotated_classes_as_background():
    naive = LabelSets(CLASSES, [ORGANS, KIDNEYS], "background")
    assert naive.channels(1) == [(0,), (2,), (3,), (5,), (1,), (4,)]
    assert LabelSets(CLASSES, [ORGANS, KIDNEYS]).channels(1) == [(0, 1, 4), (2,), (3,), (5,)]
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 4, 4, 4, generator=generator, dtype=torch.float64)
    codes = torch.randint(0, 4, (2, 4, 4, 4), generator=generator)
    codes = torch.tensor(naive.raw_to_code(1))[codes]
    sources = torch.tensor([1, 1])
    loss = LabelSetDiceCELoss(naive)(logits.float(), codes, sources)
    expected = reference_loss(logits.numpy(), codes.numpy(), sources.numpy(), naive.channels, naive.code_to_channel)
    assert abs(float(loss) - expected) / expected < 1e-5


def test_a_source_that_annotates_every_class_trains_exactly_as_today():
    full = SourceLabels("full", CLASSES[1:], tuple((v,) for v in range(1, 6)))
    sets = LabelSets(CLASSES, [full])
    logits, label = torch.randn(3, 6, 8, 8, 8), torch.randint(0, 6, (3, 1, 8, 8, 8))
    loss = LabelSetDiceCELoss(sets)(logits, label, torch.zeros(3, dtype=torch.long))
    assert abs(float(loss) - float(DiceCELoss(to_onehot_y=True, softmax=True)(logits, label))) < 1e-6
    with_ignore = LabelSets(CLASSES, [SourceLabels("full", CLASSES[1:], full.sets, ignore_label=6)])
    label[0, 0, :4] = 6
    codes = torch.tensor(with_ignore.raw_to_code(0))[label]
    loss = LabelSetDiceCELoss(with_ignore)(logits, codes, torch.zeros(3, dtype=torch.long))
    assert abs(float(loss) - float(AnnotatedDiceCELoss(6)(logits, label))) < 1e-6


def test_the_unannotated_classes_share_the_background_and_the_loss_does_not_tell_them_apart():
    """Moving probability between background and a class the source does not annotate changes nothing."""
    sets = LabelSets(CLASSES, [ORGANS, KIDNEYS])
    logits = torch.randn(1, 6, 4, 4, 4)
    codes = torch.tensor(sets.raw_to_code(1))[torch.randint(0, 4, (1, 4, 4, 4))]
    moved = logits.clone()
    moved[:, [0, 1, 4]] = torch.log(torch.softmax(logits[:, [0, 1, 4]], 1)[:, [2, 0, 1]]) + torch.logsumexp(
        logits[:, [0, 1, 4]], 1, keepdim=True
    )  # the same background-set sum, distributed otherwise
    loss = LabelSetDiceCELoss(sets)
    assert abs(float(loss(logits, codes, [1])) - float(loss(moved, codes, [1]))) < 1e-5


def test_codes_one_value_space_and_left_right_flips():
    sets = LabelSets(CLASSES, [ORGANS, KIDNEYS])
    assert sets.codes[6] == (2, 3) and sets.ignore_code == 7
    assert sets.raw_to_code(0) == [0, 1, 6, 4, 7] and sets.raw_to_code(1) == [0, 2, 3, 5]
    assert sets.code_to_channel(0) == [0, 1, -1, -1, 3, -1, 2, -1]
    assert sets.code_pairs(((2, 3),)) == ((2, 3),)  # kidney (both sides) is its own mirror image
    sided = SourceLabels("sided", ("right organs", "left organs"), ((1, 2), (3, 4)))
    rest = SourceLabels("rest", ("pancreas",), ((5,),))
    assert LabelSets(CLASSES, [sided, rest]).code_pairs(((2, 3), (1, 4))) == ((2, 3), (1, 4), (6, 7))


def test_a_union_case_becomes_codes_and_its_crops_centre_on_its_own_labels():
    sets = LabelSets(CLASSES, [ORGANS, KIDNEYS])
    label = torch.tensor([[0, 1, 2, 3, 4]], dtype=torch.float32).reshape(1, 5, 1, 1)
    unified = UnifyLabelsd(sets)({"label": label.clone(), "source": 0})["label"]
    assert unified.flatten().tolist() == [0, 1, 6, 4, 7]
    foreground, background = CropCentres("body", sets.ignore_code)(unified, None)
    assert foreground.tolist() == [1, 2, 3] and background.tolist() == [0]
    message = str(pytest.raises(ValueError, UnifyLabelsd(sets), {"label": label + 4, "source": 1}).value)
    assert message == "a label of source 'kidneys' holds value 8: its labels are 0..3"


def test_validation_scores_each_case_on_its_sources_sets_and_averages_the_sources():
    sets = LabelSets(CLASSES, [ORGANS, KIDNEYS])
    assert [name for _, name in sets.columns] == [
        "background",
        "spleen",
        "kidney",
        "liver",
        "background",
        "right kidney",
        "left kidney",
        "pancreas",
    ]
    prediction = torch.tensor([0, 2, 3, 3, 5, 4, 1, 0])  # classes
    codes = torch.tensor([0, 6, 6, 0, 0, 4, 7, 7])  # organs: kidney, kidney, liver; two unannotated
    row = dice_per_label_set(prediction, codes, 0, sets)
    # organs' channels: background {0, 5}, spleen, kidney {2, 3}, liver; voxels 6 and 7 unannotated. Background:
    # expected at 0, 3, 4, predicted at 0, 4 -> 2*2/(3+2); kidney: predicted 1, 2, 3, expected 1, 2 -> 2*2/(3+2);
    # liver 1; spleen absent from the label (its prediction at 6 is unannotated)
    expected = [4 / 5, math.nan, 4 / 5, 1.0, *[math.nan] * 4]
    np.testing.assert_allclose(row.numpy(), expected, rtol=1e-6)
    second = dice_per_label_set(torch.tensor([0, 2, 3, 5]), torch.tensor([0, 2, 2, 5]), 1, sets)
    np.testing.assert_allclose(second[4:].numpy(), [1.0, 2 / 3, math.nan, 1.0], rtol=1e-6)
    scores = torch.stack([row, second])
    mean, per_column = summarise_scores(scores, sets_manager(sets))
    organs, kidneys = np.nanmean(expected[:4]), np.nanmean([1.0, 2 / 3, 1.0])
    assert mean == pytest.approx((organs + kidneys) / 2)
    assert foreground_dice(scores, sets_manager(sets)) == pytest.approx((0.9 + (2 / 3 + 1) / 2) / 2)
    assert len(per_column) == 8


def sets_manager(sets: LabelSets):
    from dataset.labels import LabelManager

    return LabelManager(CLASSES, label_sets=sets)


def write_source(folder: Path, labels: list[str], channels=("CT",), **more) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    content = {
        "name": folder.name,
        "labels": {str(i): name for i, name in enumerate(["background", *labels])},
        "modality": {str(i): name for i, name in enumerate(channels)},
        "spacing": [1.0, 1.0, 1.2],
        "intensity": {"a_min": -125, "a_max": 275},
        "training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}],
        **more,
    }
    (folder / "dataset.json").write_text(json.dumps(content))
    return f"{folder.name}/dataset.json"


def union_file(tmp_path: Path, **changes) -> Path:
    organs = write_source(tmp_path / "organs", ["spleen", "kidney", "liver"])
    kidneys = write_source(tmp_path / "kidneys", ["right kidney", "left kidney", "pancreas"])
    content = {
        "name": "union",
        "classes": list(CLASSES),
        "sources": [
            {
                "name": "organs",
                "dataset": organs,
                "labels": {"spleen": "spleen", "kidney": ["right kidney", "left kidney"], "liver": "liver"},
            },
            {
                "name": "kidneys",
                "dataset": kidneys,
                "labels": {"right kidney": "right kidney", "left kidney": "left kidney", "pancreas": "pancreas"},
            },
        ],
    }
    for key, value in changes.items():
        if key.startswith("source_"):
            content["sources"][int(key[-1])].update(value)
        else:
            content[key] = value
    path = tmp_path / "union.json"
    path.write_text(json.dumps(content))
    return path


def test_a_union_json_loads_with_the_sources_settings(tmp_path):
    config = load_dataset_config(str(union_file(tmp_path)))
    assert config.labels == CLASSES and config.num_outputs == 6 and config.spacing == (1.0, 1.0, 1.2)
    assert [s.name for s in config.sources] == ["organs", "kidneys"] and config.pairs == ((2, 3),)
    assert config.label_sets.sources[0].sets == ((1,), (2, 3), (4,)) and config.mirror_axes == (0, 1, 2)
    card = config.label_manager.to_card()
    assert card["sources"][0]["labels"]["kidney"] == ["right kidney", "left kidney"]
    assert card["unannotated"] == "marginal" and card["pseudo_labels"] == 0.9  # the union's default
    assert config.foreground_crops == "classes"  # the union's default
    pseudo = load_dataset_config(str(union_file(tmp_path / "pseudo", pseudo_labels=0.8)))
    assert pseudo.label_sets.pseudo_labels == 0.8 and pseudo.label_manager.to_card()["pseudo_labels"] == 0.8
    for off in (False, None):
        plain = load_dataset_config(str(union_file(tmp_path / "plain", pseudo_labels=off)))
        assert plain.label_sets.pseudo_labels is None and plain.label_manager.to_card()["pseudo_labels"] is None
    naive = load_dataset_config(str(union_file(tmp_path / "naive", unannotated="background")))
    assert naive.label_sets.pseudo_labels is None  # naive merging has no sets to pseudo-label
    write_source(tmp_path / "kidneys", ["right kidney", "left kidney", "pancreas"], spacing=[1.5, 1.5, 2.0])
    assert load_dataset_config(str(tmp_path / "union.json")).spacing == "median"  # derived over the union


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"source_0": {"labels": {"spleen": "spleen", "kidney": ["right kidney", "left kidney"]}}},
            "source 'organs': label 'liver' (value 3) is mapped to no class; map it to a class or a list of classes",
        ),
        (
            {"source_0": {"labels": {"spleen": "spleen", "kidney": "kidneys", "liver": "liver"}}},
            "source 'organs': label 'kidney' maps to 'kidneys', which is not in 'classes'",
        ),
        (
            {"source_0": {"labels": {"spleen": "spleen", "kidney": ["right kidney", "liver"], "liver": "liver"}}},
            "source 'organs': labels 'kidney' and 'liver' both hold class 'liver'; a class may be in one label of a "
            "source only",
        ),
        (
            {"source_0": {"labels": {"spleen": "spleen", "kidney": ["right kidney"] * 2, "liver": "liver"}}},
            "source 'organs': label 'kidney' lists class 'right kidney' twice",
        ),
        (
            {"classes": CLASSES[1:]},  # background left out: the first class is taken as the background
            "source 'organs': label 'spleen' maps to 'spleen', the background (the first of 'classes'); leave "
            "background out of 'labels'",
        ),
        (
            {"source_0": {"labels": {"spleen": "spleen", "kidney": "right kidney", "liver": "liver", "lung": "liver"}}},
            "source 'organs': it has no label 'lung' (its labels: spleen, kidney, liver)",
        ),
        (
            {"classes": [*CLASSES, "stomach"]},
            "class 'stomach' is annotated by no source; every class needs one that labels it",
        ),
        (
            {"source_1": {"labels": {"right kidney": "right kidney", "left kidney": "spleen", "pancreas": "pancreas"}}},
            "source 'kidneys': label 'right kidney' has no mirror image among the source's labels (a left-right flip "
            "turns it into left kidney, which no label of the source is): add that label or leave axis 0 out of the "
            "mirrored axes ('mirror_axes')",
        ),
        ({"source_1": {"weight": 0}}, "source 'kidneys': 'weight' 0 must be a positive number"),
        ({"source_1": {"name": "organs"}}, "two sources are named 'organs'; each needs a name of its own"),
        ({"unannotated": "drop"}, "'unannotated' 'drop': expected one of marginal, background"),
        ({"pseudo_labels": 0.3}, "'pseudo_labels' 0.3: expected a probability in [0.5, 1), or false for none"),
        ({"pseudo_labels": True}, "'pseudo_labels' True: expected a probability in [0.5, 1), or false for none"),
        (
            {"pseudo_labels": 0.9, "unannotated": "background"},
            "'pseudo_labels' needs 'unannotated' marginal (naive merging has no sets)",
        ),
    ],
)
def test_a_wrong_union_is_refused_in_one_line(tmp_path, changes, message):
    path = union_file(tmp_path, **changes)
    with pytest.raises(DatasetError) as raised:
        load_dataset_config(str(path))
    assert str(raised.value) == f"--dataset {path}: {message}"


def test_sources_with_other_channels_or_normalisations_are_refused(tmp_path):
    path = union_file(tmp_path)
    write_source(tmp_path / "kidneys", ["right kidney", "left kidney", "pancreas"], channels=("T1", "T2"))
    message = str(pytest.raises(DatasetError, load_dataset_config, str(path)).value)
    assert message == (
        f"--dataset {path}: source 'kidneys' has 2 input channels (T1, T2), source 'organs' 1 (CT); the sources "
        "of a union must have the same channels"
    )
    write_source(tmp_path / "kidneys", ["right kidney", "left kidney", "pancreas"], intensity={"a_min": 0, "a_max": 1})
    message = str(pytest.raises(DatasetError, load_dataset_config, str(path)).value)
    assert (
        "the sources normalise their channels differently" in message and "give the union's 'normalization'" in message
    )
    assert load_dataset_config(str(union_file(tmp_path, intensity={"a_min": -100, "a_max": 200}))).normalization[
        0
    ].window == (-100.0, 200.0)


@pytest.fixture(scope="module")
def union(tmp_path_factory):
    """The two-source phantom, and a tiny model trained on its union for a few steps."""
    root = tmp_path_factory.mktemp("union")
    phantom.write_union(root / "data", num_train=2, num_val=1, num_test=2, seed=4)
    run = root / "run"
    main_train.main(
        flags(dataset=root / "data" / "union.json", output=run, network="3DUXNET", max_iter=4, eval_step=2, lr=1e-2)
        + flags(batch_size=2, **TINY_RUN)
    )
    return root / "data", run


def test_a_union_trains_records_its_sources_and_segments_every_class_through_pth_and_torchscript(union, tmp_path):
    data, run = union
    card = json.loads((run / "best_metric_model.pth.json").read_text())
    assert card["classes"] == list(CLASSES) and card["out_channels"] == 6
    assert [s["name"] for s in card["sources"]] == ["organs", "kidneys"] and card["lateral_pairs"] == [[2, 3]]
    weights = run / "best_metric_model.pth"
    export.main(flags(trained_weights=weights, output=tmp_path / "exported") + ["--formats", "torchscript"])
    labels = {}
    for name, model in (("pth", weights), ("ts", tmp_path / "exported" / "model.ts")):
        test_seg.main(
            flags(dataset=data / "union.json", output=tmp_path / name, trained_weights=model, device="cpu")
            + ["--evaluate"]
        )
        labels[name] = {p.name: np.asarray(nib.load(p).dataobj) for p in sorted((tmp_path / name).glob("*_seg.nii.gz"))}
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert list(summary["classes"]) == list(CLASSES[1:])  # the union's test cases score every class
    assert len(labels["pth"]) == 2
    for case, image in labels["pth"].items():
        assert image.max() < 6
        np.testing.assert_array_equal(image, labels["ts"][case])


def test_a_union_run_resumes_only_under_its_pseudo_labels_and_crops(union, tmp_path):
    data, run = union
    card = json.loads((run / "best_metric_model.pth.json").read_text())
    assert (card["pseudo_labels"], card["foreground_crops"]) == (0.9, "classes")  # trained with the defaults
    plain = json.loads((data / "union.json").read_text()) | {"pseudo_labels": False, "foreground_crops": "voxels"}
    (data / "union_plain_voxels.json").write_text(json.dumps(plain))
    shutil.copytree(run, tmp_path / "run")
    steps = flags(output=tmp_path / "run", network="3DUXNET", max_iter=6, eval_step=2, lr=1e-2)
    steps += flags(batch_size=2, **TINY_RUN) + ["--resume", "auto"]
    with pytest.raises(SystemExit) as refused:
        main_train.main(flags(dataset=data / "union_plain_voxels.json") + steps)
    message = str(refused.value.code)
    assert "foreground_crops classes (flags: voxels); pseudo_labels 0.9 (flags: None)" in message
    assert message.endswith(
        '; pass --foreground_crops classes and give the union JSON "pseudo_labels": 0.9 to continue it as it was '
        "trained"
    )
    assert filecmp.cmp(run / "best_metric_model.pth", tmp_path / "run" / "best_metric_model.pth", shallow=False)
    # A checkpoint from before the default trained without pseudo-labels: its card has none.
    checkpoint = torch.load(tmp_path / "run" / "checkpoint_last.pth", map_location="cpu", weights_only=False)
    checkpoint["card"] = {k: v for k, v in checkpoint["card"].items() if k != "pseudo_labels"}
    with pytest.raises(UsageError) as old:
        check_resumed_run(checkpoint, card, None, tmp_path / "old.pth")
    assert str(old.value).endswith('; give the union JSON "pseudo_labels": false to continue it as it was trained')


def test_test_seg_scores_one_sources_test_cases_on_its_label_sets(union, tmp_path):
    data, run = union
    weights = run / "best_metric_model.pth"
    output = tmp_path / "organs"
    test_seg.main(
        flags(dataset=data / "union.json", source="organs", output=output, trained_weights=weights, device="cpu")
        + ["--evaluate"]
    )
    summary = json.loads((output / "summary.json").read_text())
    assert list(summary["classes"]) == ["spleen", "kidney", "liver"]
    rows = [line.split(",") for line in (output / "metrics.csv").read_text().splitlines()]
    case = next(r for r in rows[1:])[0]
    prediction = np.asarray(nib.load(output / f"{case}_seg.nii.gz").dataobj)
    label = np.asarray(nib.load(data / "organs" / "labelsTs" / f"{case}.nii.gz").dataobj)
    kidney = np.isin(prediction, [2, 3])  # the kidney label is scored on the union of both sides' predictions
    expected = 2 * (kidney & (label == 2)).sum() / (kidney.sum() + (label == 2).sum())
    header = rows[0]
    kidney_row = next(r for r in rows[1:] if r[header.index("class")] in ("2", "kidney"))
    assert float(kidney_row[header.index("dice")]) == pytest.approx(expected, abs=1e-6)
    message = exit_message(
        test_seg.main,
        flags(dataset=data / "union.json", source="lungs", output=tmp_path / "x", trained_weights=weights),
    )
    assert message.endswith("has the sources organs, kidneys")


def test_batches_draw_the_sources_by_their_weights_whatever_their_case_counts(union):
    from types import SimpleNamespace

    from engine.train import _source_sampler

    data, _ = union
    config = load_dataset_config(str(data / "union.json"))
    cases = [{"source": 0}] * 9 + [{"source": 1}] * 3
    run = SimpleNamespace(
        train_ds=SimpleNamespace(data=cases), config=config, distributed=SimpleNamespace(world_size=1)
    )
    drawn = Counter()
    for epoch in range(400):
        for index in _source_sampler(run, torch.Generator().manual_seed(epoch)):
            drawn[cases[index]["source"]] += 1
    assert abs(drawn[0] / drawn.total() - 0.5) < 0.02  # equal weights: half the batches from each source


def test_the_training_chain_gives_codes_and_mirrors_them_with_the_side(union):
    data, _ = union
    config = load_dataset_config(str(data / "union.json"))
    train, val = build_transforms(config, "train", (32, 32, 32), 2)
    cases = [{**case, "source": 0} for case in config.sources[0].config.lists["training"]]
    root = config.sources[0].config.root
    case = {"image": str(root / cases[0]["image"]), "label": str(root / cases[0]["label"]), "source": 0}
    values = set(torch.unique(val(case)["label"]).tolist())
    assert values == {0, 1, 4, 6}  # spleen 1, kidney (both sides) code 6, liver 4


def test_mirroring_left_right_by_flag_is_checked_against_the_sources_labels(tmp_path):
    from dataclasses import replace

    from dataset.union import check_mirror_images

    one_sided = {"right kidney": "right kidney", "left kidney": "spleen", "pancreas": "pancreas"}
    path = union_file(tmp_path, source_1={"labels": one_sided}, mirror_axes=[1, 2])
    config = load_dataset_config(str(path))  # no left-right flips: nothing to check
    with pytest.raises(DatasetError, match="source 'kidneys': label 'right kidney' has no mirror image"):
        check_mirror_images(replace(config, mirror_axes=(0, 1, 2)), "--mirror_axes with union")


# ---- cross-validation of a union ----


def test_a_unions_label_sets_are_read_back_from_its_model_card():
    sets = LabelSets(CLASSES, [ORGANS, replace_weight(KIDNEYS, 2.0)], pseudo_labels=0.9)
    again = LabelSets.from_card({"classes": list(CLASSES), **sets.to_card()})
    assert again.sources == sets.sources and again.classes == CLASSES
    assert (again.unannotated, again.pseudo_labels) == ("marginal", 0.9)
    assert LabelSets.from_card({"classes": list(CLASSES)}) is None  # a model of one dataset
    with pytest.raises(ValueError, match="not a union's sources"):
        LabelSets.from_card({"classes": list(CLASSES), "sources": [{"name": "x", "labels": {"a": "lungs"}}]})


def replace_weight(source: SourceLabels, weight: float) -> SourceLabels:
    from dataclasses import replace

    return replace(source, weight=weight)


def hand_dice(predicted: np.ndarray, expected: np.ndarray) -> float:
    total = predicted.sum() + expected.sum()
    return math.nan if total == 0 else 2 * (predicted & expected).sum() / total


def test_a_study_scores_each_case_on_its_sources_labels_and_averages_the_sources(tmp_path):
    rng = np.random.default_rng(5)
    prediction = {name: rng.integers(0, 6, (7, 6, 5)) for name in ("o", "k")}
    organs_label, kidneys_label = rng.integers(0, 5, (7, 6, 5)), rng.integers(0, 4, (7, 6, 5))
    paths = {}
    for name, label in (("o", organs_label), ("k", kidneys_label)):
        paths[name] = str(tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(label.astype(np.uint8), np.eye(4)), paths[name])
    scoring = Scoring(LabelManager(CLASSES), LabelSets(CLASSES, [ORGANS, KIDNEYS]), {"o": 0, "k": 1})
    assert scoring.names == {
        1: "organs spleen",
        2: "organs kidney",
        3: "organs liver",
        4: "kidneys right kidney",
        5: "kidneys left kidney",
        6: "kidneys pancreas",
    }
    annotated = organs_label != 4  # the organs source's ignore label
    p, q = prediction["o"], prediction["k"]
    expected = {
        "o": {
            1: hand_dice((p == 1) & annotated, organs_label == 1),
            2: hand_dice(((p == 2) | (p == 3)) & annotated, organs_label == 2),  # the kidney: either side
            3: hand_dice((p == 4) & annotated, organs_label == 3),
        },
        "k": {4: hand_dice(q == 2, kidneys_label == 1), 5: hand_dice(q == 3, kidneys_label == 2)},
    }
    expected["k"][6] = hand_dice(q == 5, kidneys_label == 3)
    scores = {name: scoring.dice(prediction[name], name, paths[name]) for name in ("o", "k")}
    for name, values in expected.items():
        others = [key for key in scoring.keys if key not in values]
        assert [scores[name][key] for key in values] == pytest.approx(list(values.values()))
        assert all(math.isnan(scores[name][key]) for key in others)  # another source's labels
    means = {key: next(v for case in scores.values() if not math.isnan(v := case[key])) for key in scoring.keys}
    organs, kidneys = np.mean(list(expected["o"].values())), np.mean(list(expected["k"].values()))
    assert scoring.mean(means) == pytest.approx((organs + kidneys) / 2)  # each source counts once
    assert scoring.judged_on(2) == [2, 4] and scoring.judged_on(5) == [6] and scoring.judged_on(1) == [1]
    assert scoring.entries == [1, 2, 3, 4, 5] and scoring.entry_name(5) == "pancreas"


@pytest.fixture(scope="module")
def union_folds(tmp_path_factory):
    """The two-source phantom (two training cases per source) and a tiny model trained a few steps on each of
    two folds of its union; each run ends with its held-out cases segmented."""
    root = tmp_path_factory.mktemp("union_folds")
    phantom.write_union(root / "data", num_train=2, num_val=1, num_test=2, seed=7)
    runs = []
    for fold in (0, 1):
        runs.append(root / f"fold{fold}")
        main_train.main(
            flags(dataset=root / "data" / "union.json", output=runs[-1], network="3DUXNET", fold=fold, num_folds=2)
            + flags(max_iter=2, eval_step=2, lr=1e-2, batch_size=2, **TINY_RUN)
        )
    return root / "data", runs


def test_a_unions_fold_runs_score_their_held_out_cases_on_their_sources_labels(union_folds):
    data, runs = union_folds
    for run in runs:
        record = json.loads((run / HELD_OUT / "held_out.json").read_text())
        rows = [line.split(",") for line in (run / HELD_OUT / "metrics.csv").read_text().splitlines()]
        header = rows[0]
        for case, source in record["sources"].items():
            prediction = np.asarray(nib.load(run / HELD_OUT / f"{case}_seg.nii.gz").dataobj)
            label = np.asarray(nib.load(record["labels"][case]).dataobj)
            assert Path(record["labels"][case]).parts[-3] == ("organs", "kidneys")[source]
            sets = (ORGANS, KIDNEYS)[source].sets
            first_key = 1 + 3 * source  # each source has three labels
            for value, group in enumerate(sets, 1):
                row = next(r for r in rows[1:] if r[0] == case and int(r[1]) == first_key + value - 1)
                name = row[header.index("name")]
                assert name.startswith(("organs ", "kidneys ")[source])
                expected = hand_dice(np.isin(prediction, group), label == value)
                dice = float(row[header.index("dice")]) if row[header.index("dice")] != "nan" else math.nan
                assert dice == pytest.approx(expected, nan_ok=True)
            assert len([r for r in rows[1:] if r[0] == case]) == 3  # its own source's labels only


def test_a_unions_study_chooses_on_the_mean_over_sources_and_writes_a_plan(union_folds, tmp_path):
    data, runs = union_folds
    output = tmp_path / "study"
    argv = ["--output", str(output), "--device", "cpu", "--num_workers", "0"]
    crossval.main([*argv, "--configuration", "union", *map(str, runs), "--configuration", "again", *map(str, runs)])
    report = (output / "report.md").read_text()
    assert "organs kidney" in report and "kidneys pancreas" in report and "| union + again |" in report
    assert "the mean over the sources of each one's mean over its labels" in report
    plan = json.loads((output / "plan.json").read_text())
    scores = [line.split(",") for line in (output / "scores.csv").read_text().splitlines()]
    assert scores[0] == ["candidate", "case", "1", "2", "3", "4", "5", "6"]
    chosen = [[float(v) for v in row[2:]] for row in scores[1:] if row[0] == "+".join(plan["chosen"])]
    assert len(chosen) == 4  # every training case held out once
    means = np.nanmean(np.array(chosen), axis=0)
    expected = np.nanmean([np.nanmean(means[:3]), np.nanmean(means[3:])])  # the organs' labels, the kidneys'
    assert plan["scores"]["before"]["foreground_mean"] == pytest.approx(expected, abs=1e-6)
    assert all(entry == [1, 2, 3, 4, 5] or 0 < entry < 6 for entry in plan["keep_largest"])
    assert plan["outputs"]["classes"] == list(CLASSES)


def test_configurations_of_other_sources_are_refused_in_one_line(tmp_path):
    card = {"classes": list(CLASSES), **LabelSets(CLASSES, [ORGANS, KIDNEYS]).to_card()}
    other = {"classes": list(CLASSES), **LabelSets(CLASSES, [KIDNEYS, ORGANS]).to_card()}
    run = FoldRun(tmp_path, 0, 2, (), ("a",))
    union = Configuration("union", [run], [{"cases": ["a"], "sources": {"a": 1}}], card)
    assert _scoring([union]).sources == {"a": 1}
    with pytest.raises(
        UsageError, match="--configuration swapped: its sources .kidneys, organs. are not those of union"
    ):
        _scoring([union, Configuration("swapped", [run], union.records, other)])
    with pytest.raises(UsageError, match="one: its sources .none: one dataset. are not those of union"):
        _scoring([union, Configuration("one", [run], union.records, {"classes": list(CLASSES)})])
