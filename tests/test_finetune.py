"""Fine-tuning as users need it (main_finetune.py): the head mapped by class name, other input channels,
a frozen start honoured by --resume, and the choice of the best weights (--select, --patience)."""

import json

import pytest
import torch
from conftest import TINY_RUN, exit_message, flags

import main_finetune
import main_train
from engine import train as engine_train
from engine.train import EMA_MOMENTUM, select_weights
from phantom import write_dataset


@pytest.fixture(scope="module")
def flare_like(tmp_path_factory):
    root = tmp_path_factory.mktemp("flare_like")
    write_dataset(root, num_train=2, num_val=1, num_test=1, seed=5)
    return root


@pytest.fixture(scope="module")
def lateral(tmp_path_factory):
    """A dataset whose kidneys are labelled by side (right kidney, left kidney), as AMOS's are."""
    root = tmp_path_factory.mktemp("lateral")
    write_dataset(root, num_train=2, num_val=1, num_test=1, seed=6, lateral=True)
    return root


@pytest.fixture(scope="module")
def pretrained(flare_like, tmp_path_factory):
    output = tmp_path_factory.mktemp("pretrained")
    main_train.main(flags(root=flare_like, output=output, max_iter=2, eval_step=2, lr=1e-3, **TINY_RUN))
    return output / "best_metric_model.pth"


def _finetune(lateral, output, pretrained, *extra, **values):
    main_finetune.main(
        flags(root=lateral, output=output, dataset=lateral / "dataset.json", pretrained_weights=pretrained)
        + flags(**{"max_iter": 2, "eval_step": 2, "lr": 1e-3, **TINY_RUN, **values})
        + list(extra)
    )


def test_mapped_head_starts_each_class_from_its_name_and_the_loader_reports(
    lateral, pretrained, tmp_path, capsys, monkeypatch
):
    seen = {}
    real = engine_train._initial_model

    def keep(*args, **kwargs):
        model, report = real(*args, **kwargs)
        seen["state"] = {k: v.clone() for k, v in model.state_dict().items()}
        return model, report

    monkeypatch.setattr(engine_train, "_initial_model", keep)
    _finetune(lateral, tmp_path / "tuned", pretrained, max_iter=1, eval_step=1)
    printed = capsys.readouterr().out
    assert f"Loaded {pretrained}:" in printed and "  unused: 0" in printed
    mapped = "mapped by name: background<-background, spleen<-spleen, right kidney<-kidney, left kidney<-kidney"
    assert mapped in printed
    old = torch.load(pretrained, weights_only=True)
    new = seen["state"]
    # lateral classes: background, spleen, right kidney, left kidney, liver, pancreas; FLARE's: background,
    # spleen, kidney, liver, pancreas
    for i, j in enumerate([0, 1, 2, 2, 3, 4]):
        torch.testing.assert_close(new["out.conv.conv.weight"][i], old["out.conv.conv.weight"][j])
        torch.testing.assert_close(new["out.conv.conv.bias"][i], old["out.conv.conv.bias"][j])
    card = json.loads((tmp_path / "tuned" / "best_metric_model.pth.json").read_text())
    assert card["pretrained"]["new_keys"] == ["out.conv.conv.weight", "out.conv.conv.bias"]
    assert "right kidney<-kidney" in card["pretrained"]["head"] and card["pretrained"]["weights"] == str(pretrained)
    # --head fresh: the published behaviour
    _finetune(lateral, tmp_path / "fresh", pretrained, max_iter=1, eval_step=1, head="fresh")
    assert "output head: fresh (--head fresh)" in capsys.readouterr().out


def test_pretrain_classes_is_checked_against_the_weights(lateral, pretrained, tmp_path):
    message = exit_message(
        main_finetune.main,
        flags(root=lateral, output=tmp_path / "x", dataset=lateral / "dataset.json", pretrained_weights=pretrained)
        + flags(pretrain_classes=14, **TINY_RUN),
    )
    assert message == f"error: --pretrain_classes 14: --pretrained_weights {pretrained} has 5 outputs"


def _encoder_and_head(path):
    """The pretrained parameters (BatchNorm statistics aside: they follow the data in training mode, frozen or
    not) and the head's, of weights or a checkpoint."""
    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint.get("model", checkpoint)
    head = {k: v for k, v in state.items() if k.startswith("out.")}
    encoder = {k: v for k, v in state.items() if not k.startswith("out.") and "running_" not in k}
    return {k: v for k, v in encoder.items() if v.is_floating_point()}, head


def test_frozen_start_trains_only_the_head_until_its_step_also_across_resume(lateral, pretrained, tmp_path, capsys):
    encoder, _ = _encoder_and_head(pretrained)
    output = tmp_path / "frozen"
    _finetune(lateral, output, pretrained, "--freeze_steps", "3", max_iter=2, eval_step=1)
    assert "Frozen start: steps 1-3 train only the newly initialised or adapted weights" in capsys.readouterr().out
    tuned, head = _encoder_and_head(output / "checkpoint_last.pth")
    for key, value in encoder.items():  # step 2: frozen, bit for bit
        assert torch.equal(tuned[key], value), key
    head_at_2 = head
    card = json.loads((output / "best_metric_model.pth.json").read_text())
    assert card["pretrained"]["freeze_steps"] == 3 and card["pretrained"]["encoder_lr_scale"] == 1.0
    _finetune(lateral, output, pretrained, "--resume", "auto", max_iter=3, eval_step=1)  # step 3: still frozen
    tuned, head = _encoder_and_head(output / "checkpoint_last.pth")
    assert all(torch.equal(tuned[key], value) for key, value in encoder.items())
    assert not torch.equal(head["out.conv.conv.weight"], head_at_2["out.conv.conv.weight"])
    _finetune(lateral, output, pretrained, "--resume", "auto", max_iter=4, eval_step=1)  # step 4: everything trains
    tuned, _ = _encoder_and_head(output / "checkpoint_last.pth")
    changed = [key for key, value in encoder.items() if not torch.equal(tuned[key], value)]
    assert len(changed) > len(encoder) // 2
    message = exit_message(
        main_finetune.main,
        flags(root=lateral, output=output, dataset=lateral / "dataset.json", pretrained_weights=pretrained)
        + flags(max_iter=5, eval_step=1, lr=1e-3, resume="auto", freeze_steps=1, **TINY_RUN),
    )
    assert "--freeze_steps 1 (checkpoint: 3): a resumed run keeps it" in message


def test_encoder_lr_scale_gives_the_pretrained_weights_their_own_rate(lateral, pretrained, tmp_path, monkeypatch):
    seen = {}
    real = engine_train._optimisation

    def keep(*args, **kwargs):
        optimizer, scheduler, scaler = real(*args, **kwargs)
        seen["rates"] = [group["lr"] for group in optimizer.param_groups]
        seen["sizes"] = [len(group["params"]) for group in optimizer.param_groups]
        return optimizer, scheduler, scaler

    monkeypatch.setattr(engine_train, "_optimisation", keep)
    _finetune(lateral, tmp_path / "scaled", pretrained, "--encoder_lr_scale", "0.1", max_iter=1, eval_step=1)
    assert seen["rates"] == pytest.approx([1e-3, 1e-4]) and seen["sizes"][0] == 2  # the head's weight and bias


def test_select_rules_against_a_hand_computation():
    dice = [0.8, 0.2, 0.9, 0.9, 0.95]
    ema, averages = None, []
    for value in dice:
        ema = value if ema is None else EMA_MOMENTUM * ema + (1 - EMA_MOMENTUM) * value
        averages.append(ema)
    assert averages == pytest.approx([0.8, 0.74, 0.756, 0.7704, 0.78836])
    expected = {"best": [True, False, True, False, True], "ema": [True, False, False, False, False], "last": [True] * 5}
    for rule, improved in expected.items():
        progress = {"best_dice": 0.0, "best_step": 0}
        assert [select_weights(progress, value, step, rule) for step, value in enumerate(dice, 1)] == improved
    assert progress["best_step"] == 5 and progress["best_dice"] == 0.95
    progress = {"best_dice": 0.0, "best_step": 0}
    for step, value in enumerate(dice, 1):
        select_weights(progress, value, step, "ema")
    assert progress["ema_dice"] == pytest.approx(0.78836) and progress["validations_without_better"] == 4


def test_patience_stops_with_ema_selection_and_resume_continues_the_counters(flare_like, tmp_path, capsys, monkeypatch):
    scripted = iter([0.8, 0.2, 0.9, 0.9, 0.95, 0.95])
    real = engine_train.summarise_scores

    def scores(*args, **kwargs):
        return next(scripted), real(*args, **kwargs)[1]

    monkeypatch.setattr(engine_train, "summarise_scores", scores)
    output = tmp_path / "patience"
    run = flags(root=flare_like, output=output, max_iter=10, eval_step=1, lr=1e-3, select="ema", **TINY_RUN)
    main_train.main(run + flags(patience=2))
    printed = capsys.readouterr().out
    assert "Stopped early at step 3: 2 validations without a better moving average of the mean Dice" in printed
    checkpoint = torch.load(output / "checkpoint_last.pth", weights_only=False)
    assert checkpoint["progress"]["step"] == 3 and checkpoint["progress"]["validations_without_better"] == 2
    card = json.loads((output / "best_metric_model.pth.json").read_text())
    assert card["best_step"] == 1 and card["selection"] == {
        "rule": "ema",
        "compared": "moving average of the mean Dice (0.9 old + 0.1 new)",
        "score": pytest.approx(0.8),
    }
    # resumed with more patience, the counters go on: validations 4 and 5 are not better either
    main_train.main(run + flags(patience=4, resume="auto"))
    printed = capsys.readouterr().out
    assert "applied: the early stop counts validations" in printed and "Stopped early at step 5" in printed
    progress = torch.load(output / "checkpoint_last.pth", weights_only=False)["progress"]
    assert progress["ema_dice"] == pytest.approx(0.78836) and progress["step"] == 5
    other_rule = flags(root=flare_like, output=output, max_iter=10, eval_step=1, lr=1e-3, resume="auto", **TINY_RUN)
    assert "--select best (checkpoint: ema)" in exit_message(main_train.main, other_rule)
    assert "--select last keeps every validation" in exit_message(
        main_train.main, flags(root=flare_like, output=tmp_path / "y", select="last", patience=2, **TINY_RUN)
    )


def test_a_ct_model_onto_two_channel_mri_with_channel_init(pretrained, tmp_path, capsys):
    root = tmp_path / "mri"
    write_dataset(root, num_train=2, num_val=1, num_test=1, seed=7, modality="mri")
    base = flags(root=root, output=tmp_path / "mri_run", dataset=root / "dataset.json", pretrained_weights=pretrained)
    base += flags(max_iter=1, eval_step=1, lr=1e-3, **TINY_RUN)
    message = exit_message(main_finetune.main, base)
    assert "a model of 1 input channel (CT); the dataset has 2 (T1, T2): pass --channel_init repeat" in message
    main_finetune.main(base + ["--channel_init", "repeat"])
    printed = capsys.readouterr().out
    assert "repuxnet_3d.downsample_layers.0.0.weight, encoder1.layer.conv1.conv.weight" in printed
    assert "input channels 1 -> 2: each the old kernels' sum / 2" in printed
    card = json.loads((tmp_path / "mri_run" / "best_metric_model.pth.json").read_text())
    assert card["in_channels"] == 2 and card["pretrained"]["channel_init"] == "repeat"
    assert len(card["pretrained"]["new_keys"]) == 5  # three kernels reading the input, the head's weight and bias


def test_published_weights_without_a_card_copy_channels_by_number_and_start_a_fresh_head(pretrained, tmp_path, capsys):
    plain = tmp_path / "published.pth"
    torch.save(torch.load(pretrained, weights_only=True), plain)  # no model card beside it
    root = tmp_path / "mri"
    write_dataset(root, num_train=2, num_val=1, num_test=1, seed=8, modality="mri")
    main_finetune.main(
        flags(root=root, output=tmp_path / "run", dataset=root / "dataset.json", pretrained_weights=plain)
        + flags(max_iter=1, eval_step=1, lr=1e-3, channel_init="copy:T1=0,T2=0", pretrain_classes=5, **TINY_RUN)
    )
    printed = capsys.readouterr().out
    assert "input channels 1 -> 2: copied (T1<-0, T2<-0)" in printed
    assert "output head: fresh (the weights name no outputs)" in printed


def test_a_training_checkpoint_is_pretrained_weights_with_its_card(lateral, pretrained, tmp_path, capsys):
    checkpoint = pretrained.parent / "checkpoint_last.pth"
    _finetune(lateral, tmp_path / "from_checkpoint", checkpoint, max_iter=1, eval_step=1)
    printed = capsys.readouterr().out
    assert f"Loaded {checkpoint}:" in printed and "right kidney<-kidney, left kidney<-kidney" in printed
