"""Resumable, fault-tolerant and distributed training on tiny phantom runs (CPU)."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN as TINY
from conftest import flags
from monai.losses import DiceCELoss

import engine.checkpoint
import engine.common
import engine.train
import main_train
import optimizers
from phantom import write_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    write_dataset(root, num_train=2, num_val=2, num_test=0, seed=11)
    return root


def train(root, output, *extra, **values):
    main_train.main(flags(root=root, output=output, **{"lr": 1e-3, **TINY, **values}) + list(extra))


def exit_of(function, *args, **kwargs) -> SystemExit:
    with pytest.raises(SystemExit) as raised:
        function(*args, **kwargs)
    return raised.value


def stopping_optimizer(monkeypatch, stop_after: int) -> None:
    """Send this process SIGTERM right after the optimizer's ``stop_after``-th update."""

    def build(model, name, lr):
        optimizer = optimizers.build_optimizer(model, name, lr=lr)
        count = [0]

        def after_step(optimizer, args, kwargs):
            count[0] += 1
            if count[0] == stop_after:
                signal.raise_signal(signal.SIGTERM)

        optimizer.register_step_post_hook(after_step)
        return optimizer

    monkeypatch.setattr(engine.train, "build_optimizer", build)


def load_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_stopped_and_resumed_run_ends_with_the_same_weights(phantom, tmp_path, monkeypatch, capsys):
    steps = dict(max_iter=7, eval_step=4)
    train(phantom, tmp_path / "straight", **steps)
    stopping_optimizer(monkeypatch, stop_after=3)  # step 3: in the middle of the second epoch
    stopped = exit_of(train, phantom, tmp_path / "stopped", **steps)
    assert stopped.code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM at step 3" in capsys.readouterr().err
    checkpoint = load_state(tmp_path / "stopped" / "checkpoint_last.pth")
    assert checkpoint["progress"]["step"] == 3
    monkeypatch.undo()
    train(phantom, tmp_path / "stopped", "--resume", "auto", **steps)
    assert "Resumed from" in capsys.readouterr().out
    straight = load_state(tmp_path / "straight" / "checkpoint_last.pth")
    resumed = load_state(tmp_path / "stopped" / "checkpoint_last.pth")
    assert straight["progress"] == resumed["progress"] and resumed["progress"]["step"] == 7
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for key, value in straight["bfr_raw_weights"].items():
        assert torch.equal(value, resumed["bfr_raw_weights"][key]), key
    best_straight = load_state(tmp_path / "straight" / "best_metric_model.pth")
    best_resumed = load_state(tmp_path / "stopped" / "best_metric_model.pth")
    assert all(torch.equal(v, best_resumed[k]) for k, v in best_straight.items())


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    optimizer = optimizers.build_optimizer(model)
    scheduler = optimizers.build_scheduler(optimizer)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    path = tmp_path / "checkpoint_last.pth"
    engine.checkpoint.save_checkpoint(path, model, optimizer, scheduler, scaler, {"step": 1}, {})
    before = path.read_bytes()
    real_save = torch.save

    def crash_midway(obj, target):
        real_save(obj, target)
        with open(target, "r+b") as file:  # a half-written file, then the crash
            file.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.common.torch, "save", crash_midway)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        engine.checkpoint.save_checkpoint(path, model, optimizer, scheduler, scaler, {"step": 2}, {})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert engine.checkpoint.load_checkpoint(path)["progress"] == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_last.pth"]  # no temporary file left


class NaNAfter:
    """DiceCELoss whose value is NaN for the calls in ``bad`` (1-based)."""

    def __init__(self, bad):
        self.bad, self.calls = set(bad), 0
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)

    def __call__(self, prediction, label):
        self.calls += 1
        loss = self.loss(prediction, label)
        return loss * float("nan") if self.calls in self.bad else loss


def test_nonfinite_losses_are_skipped_then_stop_the_run(phantom, tmp_path, monkeypatch, capsys):
    output = tmp_path / "nan"
    loss = NaNAfter(bad=range(3, 100))
    monkeypatch.setattr(engine.train, "segmentation_loss", lambda ignore_label: loss)
    stopped = exit_of(train, phantom, output, max_iter=20, eval_step=2, max_bad_steps=3)
    assert stopped.code == 1
    message = capsys.readouterr().err
    assert "3 steps in a row had a non-finite loss or gradient (steps 3-5)" in message
    assert f"kept the last good checkpoint ({output / 'checkpoint_last.pth'})" in message
    checkpoint = load_state(output / "checkpoint_last.pth")
    assert checkpoint["progress"]["step"] == 2  # written before the bad steps, untouched since
    best = load_state(output / "best_metric_model.pth")
    assert all(torch.equal(v, checkpoint["model"][k]) for k, v in best.items())
    assert all(torch.isfinite(v).all() for v in best.values() if v.is_floating_point())


def test_a_single_nonfinite_loss_is_skipped_and_counted(phantom, tmp_path, monkeypatch, capsys):
    output = tmp_path / "one_nan"
    monkeypatch.setattr(engine.train, "segmentation_loss", lambda ignore_label: NaNAfter(bad=[2]))
    train(phantom, output, max_iter=4, eval_step=4)
    assert "warning: step 2: non-finite loss" in capsys.readouterr().out
    checkpoint = load_state(output / "checkpoint_last.pth")
    assert checkpoint["progress"]["nonfinite_steps"] == 1 and checkpoint["progress"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())


def test_fold_all_whose_last_step_is_nonfinite_writes_the_last_good_weights(phantom, tmp_path, monkeypatch, capsys):
    output = tmp_path / "last_nan"
    monkeypatch.setattr(engine.train, "segmentation_loss", lambda label_manager: NaNAfter(bad=[4]))
    train(phantom, output, max_iter=4, eval_step=2, fold="all")
    printed = capsys.readouterr().out
    final = output / "final_model.pth"
    assert f"final weights in {final} (of step 3: the last 1 step skipped as non-finite)" in printed
    weights = load_state(final)
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert json.loads((output / "final_model.pth.json").read_text())["final_step"] == 3
    checkpoint = load_state(output / "checkpoint_last.pth")
    assert checkpoint["progress"]["step"] == 2  # the last good checkpoint, kept


def test_a_skipped_step_leaves_batchnorm_statistics_untouched(phantom, tmp_path, monkeypatch):
    output = tmp_path / "first_nan"
    monkeypatch.setattr(engine.train, "segmentation_loss", lambda ignore_label: NaNAfter(bad=[1]))
    train(phantom, output, max_iter=1, eval_step=1)
    best = load_state(output / "best_metric_model.pth")  # saved after the only, skipped, step
    statistics = [k for k in best if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert statistics  # RepUX-Net's blocks hold BatchNorm statistics
    for key in statistics:
        expected = 1 if key.endswith("running_var") else 0  # as initialised
        assert torch.equal(best[key], torch.full_like(best[key], expected)), key


def test_resume_auto_without_checkpoint_starts_fresh(phantom, tmp_path, capsys):
    output = tmp_path / "fresh"
    train(phantom, output, "--resume", "auto", max_iter=1)
    assert f"note: --resume auto: no checkpoint_last.pth in {output}; starting a new run" in capsys.readouterr().out
    assert (output / "checkpoint_last.pth").exists()


def test_corrupt_or_mismatched_checkpoints_give_clear_errors(phantom, tmp_path):
    output = tmp_path / "corrupt"
    output.mkdir()
    (output / "checkpoint_last.pth").write_bytes(b"\x00garbage")
    error = exit_of(train, phantom, output, "--resume", "auto", max_iter=1)
    assert str(error.code).startswith(f"error: --resume {output / 'checkpoint_last.pth'}: cannot read the checkpoint")
    missing = tmp_path / "none.pth"
    assert (
        str(exit_of(train, phantom, output, "--resume", str(missing)).code)
        == f"error: --resume {missing}: no such file"
    )
    good = tmp_path / "good"
    train(phantom, good, max_iter=1)
    error = exit_of(train, phantom, good, "--resume", "auto", max_iter=2, kernel_size=5)
    assert "the checkpoint is of another model or data: network_args" in str(error.code)
    assert "'ks': 3" in str(error.code) and "'ks': 5" in str(error.code)


def test_checkpoint_of_a_single_channel_card_format_resumes(phantom, tmp_path, capsys):
    """Checkpoints written before multi-channel datasets hold one CT window as ``intensity``: they resume
    when it is the dataset's, and are refused (naming the normalisation) when it is not."""
    output = tmp_path / "old"
    train(phantom, output, max_iter=1)
    path = output / "checkpoint_last.pth"
    checkpoint = torch.load(path, weights_only=True)
    for key in ("channels", "normalization", "derived", "in_channels"):
        checkpoint["card"].pop(key, None)
    checkpoint["card"]["intensity"] = {"a_min": -125.0, "a_max": 275.0}
    torch.save(checkpoint, path)
    train(phantom, output, "--resume", "auto", max_iter=2)
    assert "Resumed from" in capsys.readouterr().out
    checkpoint = torch.load(path, weights_only=True)
    for key in ("channels", "normalization", "derived", "in_channels"):
        checkpoint["card"].pop(key, None)
    checkpoint["card"]["intensity"] = {"a_min": -1000.0, "a_max": 1000.0}
    torch.save(checkpoint, path)
    error = exit_of(train, phantom, output, "--resume", "auto", max_iter=3)
    assert (
        "the checkpoint is of another model or data: normalization [{'scheme': 'ct', 'window': [-1000.0, 1000.0]}]"
        in str(error.code)
    )


def test_persistent_cache_dir_is_written_and_reused(phantom, tmp_path):
    cache = tmp_path / "cache"
    train(phantom, tmp_path / "first", cache_dir=cache, max_iter=2)  # one epoch: every case visited
    cached = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert len(cached) == 4  # 2 training + 2 validation cases
    train(phantom, tmp_path / "second", cache_dir=cache, max_iter=2)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == cached


def test_cache_dir_entries_are_keyed_by_the_preprocessing(phantom, tmp_path):
    cache = tmp_path / "cache"
    train(phantom, tmp_path / "flare", cache_dir=cache, max_iter=2)
    first = set(p.name for p in cache.iterdir())
    description = json.loads((phantom / "dataset.json").read_text())
    description["spacing"] = [2.0, 2.0, 2.0]  # another spacing: other volumes, other entries
    coarse = tmp_path / "coarse.json"
    coarse.write_text(json.dumps(description))
    train(phantom, tmp_path / "coarse", cache_dir=cache, dataset=coarse, max_iter=2)
    assert len(set(p.name for p in cache.iterdir()) - first) == 4  # none of the first run's entries served
    train(phantom, tmp_path / "flare_again", cache_dir=cache, max_iter=2)
    assert len(list(cache.iterdir())) == 8  # the first settings find their entries again


def test_cached_case_is_that_of_its_own_chain_and_files(phantom, tmp_path):
    from dataset.cases import find_cases
    from dataset.description import load_dataset_config
    from dataset.transforms import build_transforms
    from engine.loading import cached_dataset

    config = load_dataset_config("flare")
    case = find_cases(config, phantom, "validation")[0]
    train_transforms, val_transforms = build_transforms(config, "train", (96, 96, 96))  # training pads to 96
    cache = tmp_path / "cache"
    cached_dataset([case], train_transforms, 0, 0, cache)[0]  # the training chain's entry first
    served = cached_dataset([case], val_transforms, 0, 0, cache)[0]  # then the validation chain's
    expected = val_transforms(case)
    assert served["image"].shape == expected["image"].shape  # not the padded training volume
    assert torch.equal(torch.as_tensor(served["image"]), torch.as_tensor(expected["image"]))
    assert len(list(cache.iterdir())) == 2
    label = Path(case["label"])
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))  # the file is rewritten
    cached_dataset([case], val_transforms, 0, 0, cache)[0]
    assert len(list(cache.iterdir())) == 3


def test_cache_key_of_the_transforms_is_the_same_in_every_process(tmp_path):
    """The key of the deterministic transforms must not depend on the process (hash randomisation, object
    addresses), or a cache would never be reused across runs."""
    script = (
        "from monai.data import PersistentDataset; from monai.data.utils import pickle_hashing; "
        "from dataset.transforms import build_transforms; from dataset.description import load_dataset_config; "
        "t, v = build_transforms(load_dataset_config('flare'), 'train', (32, 32, 32)); "
        "print(PersistentDataset([], t, cache_dir='x', hash_transform=pickle_hashing).transform_hash)"
    )
    keys = set()
    for seed in ("1", "2"):
        environment = {**os.environ, "PYTHONHASHSEED": seed}
        completed = subprocess.run(
            [sys.executable, "-c", script], cwd=REPO, env=environment, capture_output=True, text=True, timeout=120
        )
        assert completed.returncode == 0, completed.stderr[-2000:]
        keys.add(completed.stdout.strip())
    assert len(keys) == 1


def test_device_transforms_chain_runs(phantom):
    from dataset.cases import find_cases
    from dataset.description import load_dataset_config
    from dataset.transforms import build_transforms

    config = load_dataset_config("flare")
    train_transforms, _ = build_transforms(config, "train", (32, 32, 32), 2, device=torch.device("cpu"))
    names = [type(t).__name__ for t in train_transforms.transforms]
    assert names.index("EnsureTyped") < names.index("BalancedCropd")
    crops = train_transforms(find_cases(config, phantom, "training")[0])
    assert len(crops) == 2 and crops[0]["image"].shape == (1, 32, 32, 32)


def torchrun(root, output, **values) -> subprocess.CompletedProcess:
    """main_train.py in two CPU processes (gloo), one thread each."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # torchrun picks a free loopback port itself: no race for a port chosen here
        "--nproc_per_node",
        "2",
        str(REPO / "main_train.py"),
        *flags(root=root, output=output, **{"lr": 1e-3, **TINY, **values}),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def test_two_process_run_with_fewer_validation_cases_than_processes(tmp_path):
    root = tmp_path / "one_val"
    write_dataset(root, num_train=2, num_val=1, num_test=0, seed=4)
    completed = torchrun(root, tmp_path / "ddp", max_iter=1, eval_step=1)
    assert completed.stdout.count("step 1: mean Dice") == 1  # process 0 reports the one case
    assert re.search(r"step 1: mean Dice .*; validation peak memory \d+\.\d GB resident\n", completed.stdout)
    assert (tmp_path / "ddp" / "best_metric_model.pth").exists()


def test_two_process_run_reports_the_dice_of_the_saved_weights(tmp_path):
    """Three validation cases (2 and 1 per process): the reported mean Dice is that of the saved weights,
    buffers included, over all cases, as one process computes it."""
    root = tmp_path / "three_val"
    write_dataset(root, num_train=2, num_val=3, num_test=0, seed=12)
    output = tmp_path / "ddp"
    completed = torchrun(root, output, max_iter=3, eval_step=3, lr=3e-2)
    assert completed.stdout.count("Training finished") == 1  # rank 0 alone reports
    card = json.loads((output / "best_metric_model.pth.json").read_text())

    from monai.data import DataLoader, Dataset

    from dataset.cases import find_cases
    from dataset.description import PRESETS, load_dataset_config
    from dataset.transforms import build_transforms
    from engine.validation import foreground_dice, summarise_scores, validation_scores
    from networks import build_network

    config = load_dataset_config("flare")
    model = build_network("REPUXNET", 1, 5, **card["network_args"])
    model.load_state_dict(load_state(output / "best_metric_model.pth"))
    _, val_transforms = build_transforms(config, "train", (32, 32, 32))
    loader = DataLoader(Dataset(find_cases(config, root, "validation"), val_transforms), batch_size=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran (OMP_NUM_THREADS=1): same summation order
    try:
        manager = PRESETS["flare"].label_manager
        scores = validation_scores(model, loader, (32, 32, 32), 2, manager, torch.device("cpu"), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert scores.shape == (3, 5)
    assert summarise_scores(scores)[0] == pytest.approx(card["best_metric"], abs=1e-6)
    assert foreground_dice(scores, manager) == pytest.approx(card["best_metric_foreground"], abs=1e-6)


def test_resume_with_a_longer_run_stretches_the_schedule(phantom, tmp_path, capsys):
    output = tmp_path / "longer"
    schedule = ["--lr_schedule", "warmup_cosine", "--warmup_iter", "1"]
    train(phantom, output, *schedule, max_iter=2, eval_step=2)
    train(phantom, output, *schedule, "--resume", "auto", max_iter=4, eval_step=2)
    printed = capsys.readouterr().out
    assert "note: --max_iter 4 (checkpoint: 2): applied: the run and its learning-rate schedule end there" in printed
    checkpoint = load_state(output / "checkpoint_last.pth")
    assert checkpoint["progress"]["step"] == 4 and checkpoint["scheduler"]["max_iter"] == 4


def test_resume_applies_or_refuses_changed_flags(phantom, tmp_path, capsys):
    output = tmp_path / "flags"
    train(phantom, output, max_iter=2, eval_step=2)
    checkpoint = output / "checkpoint_last.pth"
    before = checkpoint.read_bytes()
    for changed, shown in (({"seed": 1}, "--seed 1 (checkpoint: 0)"), ({"batch_size": 2}, "--batch_size 2"),
                           ({"crop_sample": 1}, "--crop_sample 1"), ({"optim": "SGD"}, "--optim SGD")):  # fmt: skip
        error = exit_of(train, phantom, output, "--resume", "auto", max_iter=4, **changed)
        assert str(error.code).startswith(f"error: --resume {checkpoint}: {shown}"), error.code
        assert "a resumed run keeps these flags" in str(error.code)
    assert checkpoint.read_bytes() == before  # refused before any work
    capsys.readouterr()
    train(phantom, output, "--resume", "auto", max_iter=3, eval_step=3, lr=5e-4)
    printed = capsys.readouterr().out
    assert "note: --lr 0.0005 (checkpoint: 0.001): applied" in printed
    assert "note: --eval_step 3 (checkpoint: 2): applied" in printed
    resumed = load_state(checkpoint)
    assert resumed["progress"]["step"] == 3 and resumed["flags"]["lr"] == 5e-4
    assert [group["lr"] for group in resumed["optimizer"]["param_groups"]] == [5e-4]
    assert resumed["scheduler"]["base_lrs"] == [5e-4]


def test_resumed_run_logs_every_point_exactly_once(phantom, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output = tmp_path / "events"
    steps = dict(max_iter=6, eval_step=2)
    stopping_optimizer(monkeypatch, stop_after=4)  # a validation step: checkpoint written at step 4
    assert exit_of(train, phantom, output, **steps).code == 128 + signal.SIGTERM
    monkeypatch.undo()
    train(phantom, output, "--resume", "auto", **steps)
    events = EventAccumulator(str(output / "tensorboard"))  # every event file of the folder, in order
    events.Reload()
    assert [e.step for e in events.Scalars("val/mean_dice")] == [2, 4, 6]
    assert [e.step for e in events.Scalars("val/mean_dice_foreground")] == [2, 4, 6]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


class NaNThenSignal(NaNAfter):
    """Non-finite losses from call ``first_bad`` on, and SIGTERM during call ``signal_at``."""

    def __init__(self, first_bad: int, signal_at: int):
        super().__init__(bad=range(first_bad, 1000))
        self.signal_at = signal_at

    def __call__(self, prediction, label):
        if self.calls + 1 == self.signal_at:
            signal.raise_signal(signal.SIGTERM)
        return super().__call__(prediction, label)


def test_a_signal_during_nonfinite_steps_keeps_the_last_good_checkpoint(phantom, tmp_path, monkeypatch, capsys):
    output = tmp_path / "nan_then_term"
    loss = NaNThenSignal(first_bad=3, signal_at=5)
    monkeypatch.setattr(engine.train, "segmentation_loss", lambda ignore_label: loss)
    stopped = exit_of(train, phantom, output, max_iter=20, eval_step=2, max_bad_steps=10)
    assert stopped.code == 128 + signal.SIGTERM
    message = capsys.readouterr().err
    assert "stopped by SIGTERM at step 5; during 3 non-finite steps in a row; kept the last good checkpoint" in message
    checkpoint = load_state(output / "checkpoint_last.pth")
    assert checkpoint["progress"]["step"] == 2  # not the step-4 validation, nor the signal at step 5
    assert checkpoint["progress"]["nonfinite_in_a_row"] == 0
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())


def nan_gradient_at(monkeypatch, backward: int) -> None:
    """Make the gradient of the first parameter NaN at the ``backward``-th backward pass (the loss stays
    finite)."""

    def build(model, name, lr):
        optimizer = optimizers.build_optimizer(model, name, lr=lr)
        count = [0]

        def poison(gradient):
            count[0] += 1
            return gradient * float("nan") if count[0] == backward else gradient

        optimizer.param_groups[0]["params"][0].register_hook(poison)
        return optimizer

    monkeypatch.setattr(engine.train, "build_optimizer", build)


def test_a_nonfinite_gradient_skips_its_step(phantom, tmp_path, monkeypatch, capsys):
    output = tmp_path / "nan_gradient"
    nan_gradient_at(monkeypatch, backward=2)
    train(phantom, output, max_iter=4, eval_step=4)
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: step 2: non-finite gradient (norm nan); update skipped"]
    checkpoint = load_state(output / "checkpoint_last.pth")
    assert checkpoint["progress"]["nonfinite_steps"] == 1 and checkpoint["progress"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in checkpoint["bfr_raw_weights"].values())
    # AdamW took 3 of the 4 steps: its state holds no trace of the skipped one
    states = checkpoint["optimizer"]["state"].values()
    assert {float(state["step"]) for state in states} == {3.0}
    assert all(torch.isfinite(state["exp_avg_sq"]).all() for state in states)


def test_a_bf16_step_with_a_nonfinite_gradient_leaves_no_trace():
    """Under bf16 autocast (where no gradient scaler checks the gradients) a finite loss with a non-finite
    gradient changes neither the weights, nor the BatchNorm statistics, nor the optimizer state. (Checked
    on one step: on CPUs, bf16 training of the tiny network itself now and then yields a gradient whose
    norm overflows, which the guard skips as well, so a whole run's count of skipped steps varies.)"""
    from engine.distributed import Distributed
    from engine.train import _training_step

    model = torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.BatchNorm3d(4), torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 1)
    )
    optimizer = optimizers.build_optimizer(model, "AdamW", lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    cpu = torch.device("cpu")
    batch = {"image": torch.randn(2, 1, 8, 8, 8), "label": torch.randint(0, 2, (2, 1, 8, 8, 8)).float()}
    step = (DiceCELoss(to_onehot_y=True, softmax=True), optimizer, scaler, torch.autocast("cpu", torch.bfloat16))
    buffers = list(model.buffers())
    assert _training_step(model, batch, *step, buffers, Distributed(), cpu)[1] is None
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    adam = {k: v.clone() for k, v in optimizer.state[model[0].weight].items()}
    model[0].weight.register_hook(lambda gradient: gradient * float("nan"))
    loss, problem = _training_step(model, batch, *step, buffers, Distributed(), cpu)
    assert problem == "non-finite gradient (norm nan)" and math.isfinite(loss)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in weights.items())
    assert all(torch.equal(value, optimizer.state[model[0].weight][key]) for key, value in adam.items())
    assert all(p.grad is None for p in model.parameters())


def test_sigterm_to_the_process_group_with_workers_stops_cleanly(tmp_path):
    """A job scheduler (or Ctrl-C in a terminal) signals every process of the job: the data-loading
    workers must leave the stop to the main process."""
    root = tmp_path / "data"
    write_dataset(root, num_train=6, num_val=1, num_test=0, seed=8)
    output = tmp_path / "workers"
    command = [sys.executable, str(REPO / "main_train.py")]
    command += flags(root=root, output=output, max_iter=1000, eval_step=1000, **{**TINY, "num_workers": 2})
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    errors: list[bytes] = []
    reader = threading.Thread(target=lambda: errors.extend(iter(lambda: process.stderr.read(64), b"")))
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while b"(2 / 1000 Steps)" not in b"".join(errors):  # in the first epoch of 6 steps: workers alive
            assert process.poll() is None and time.monotonic() < deadline, b"".join(errors)[-2000:]
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        reader.join(timeout=10)
    stderr = b"".join(errors).decode(errors="replace")
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "stopped by SIGTERM at step" in stderr and "Traceback" not in stderr
    assert load_state(output / "checkpoint_last.pth")["progress"]["step"] >= 2


def test_resume_auto_gives_one_answer_for_best_weights_without_checkpoint(phantom, tmp_path, capsys):
    output = tmp_path / "killed"
    train(phantom, output, max_iter=2, eval_step=2)
    (output / "checkpoint_last.pth").unlink()  # as a run killed before its first checkpoint left it
    error = exit_of(train, phantom, output, "--resume", "auto", max_iter=2)
    assert str(error.code) == (
        f"error: --resume auto: {output} holds best_metric_model.pth but no checkpoint_last.pth, so its run cannot "
        "be continued; pass --overwrite to start over there, or choose another --output"
    )
    assert "starting a new run" not in capsys.readouterr().out
    train(phantom, output, "--resume", "auto", "--overwrite", max_iter=2, eval_step=2)
    assert "starting a new run" in capsys.readouterr().out


def test_checkpoint_is_written_before_the_best_weights_and_restores_them(phantom, tmp_path, monkeypatch, capsys):
    output = tmp_path / "order"
    written = []
    real_save = engine.common.torch.save
    monkeypatch.setattr(engine.common.torch, "save", lambda obj, path: written.append(obj) or real_save(obj, path))
    train(phantom, output, max_iter=2, eval_step=2)
    monkeypatch.undo()
    assert [("progress" in obj) for obj in written] == [True, False]  # checkpoint, then best weights
    (output / "best_metric_model.pth").unlink()  # killed between the two writes
    (output / "best_metric_model.pth.json").unlink()
    train(phantom, output, "--resume", "auto", max_iter=2, eval_step=2)
    assert f"note: rewrote {output / 'best_metric_model.pth'} (step 2) from the checkpoint" in capsys.readouterr().out
    checkpoint = load_state(output / "checkpoint_last.pth")
    best = load_state(output / "best_metric_model.pth")
    assert all(torch.equal(value, checkpoint["model"][key]) for key, value in best.items())
    card = json.loads((output / "best_metric_model.pth.json").read_text())
    assert card["best_step"] == 2 and card["best_metric"] == checkpoint["progress"]["best_dice"]


def test_progress_bar_shows_the_current_step_and_best(phantom, tmp_path, capsys):
    train(phantom, tmp_path / "bar", max_iter=4, eval_step=2)
    captured = capsys.readouterr()
    descriptions = re.findall(r"Training \(\d+ / 4 Steps\)[^:]*", captured.err + captured.out)
    assert descriptions and "(4 / 4 Steps)" in descriptions[-1]
    best = json.loads((tmp_path / "bar" / "best_metric_model.pth.json").read_text())["best_metric"]
    assert descriptions[-1].endswith(f"best dice={best:.4f})")
    assert not any("best dice=0.0000" in d for d in descriptions)  # no best shown before a validation
    first = [d for d in descriptions if "(1 / 4 Steps)" in d]
    assert first and all("best dice" not in d for d in first)
