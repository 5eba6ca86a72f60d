"""Resumable, fault-tolerant and distributed training on tiny phantom runs (CPU)."""

import json
import os
import signal
import subprocess
import sys
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
    main_train.main(flags(root=root, output=output, lr=1e-3, **{**TINY, **values}) + list(extra))


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
    monkeypatch.setattr(engine.train, "DiceCELoss", lambda **kwargs: loss)
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
    monkeypatch.setattr(engine.train, "DiceCELoss", lambda **kwargs: NaNAfter(bad=[2]))
    train(phantom, output, max_iter=4, eval_step=4)
    assert "warning: step 2: non-finite loss" in capsys.readouterr().out
    checkpoint = load_state(output / "checkpoint_last.pth")
    assert checkpoint["progress"]["nonfinite_steps"] == 1 and checkpoint["progress"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())


def test_a_skipped_step_leaves_batchnorm_statistics_untouched(phantom, tmp_path, monkeypatch):
    output = tmp_path / "first_nan"
    monkeypatch.setattr(engine.train, "DiceCELoss", lambda **kwargs: NaNAfter(bad=[1]))
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
    assert "the checkpoint is of" in str(error.code) and "'ks': 3" in str(error.code)


def test_persistent_cache_dir_is_written_and_reused(phantom, tmp_path):
    cache = tmp_path / "cache"
    train(phantom, tmp_path / "first", cache_dir=cache, max_iter=2)  # one epoch: every case visited
    cached = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert len(cached) == 4  # 2 training + 2 validation cases
    train(phantom, tmp_path / "second", cache_dir=cache, max_iter=2)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == cached


def test_device_transforms_chain_runs(phantom):
    from load_datasets_transforms import build_transforms, find_cases, load_dataset_config

    config = load_dataset_config("flare")
    train_transforms, _ = build_transforms(config, "train", (32, 32, 32), 2, device=torch.device("cpu"))
    names = [type(t).__name__ for t in train_transforms.transforms]
    assert names.index("EnsureTyped") < names.index("RandCropByPosNegLabeld")
    crops = train_transforms(find_cases(config, phantom, "training")[0])
    assert len(crops) == 2 and crops[0]["image"].shape == (1, 32, 32, 32)


def test_two_process_gloo_run_agrees_with_single_process_validation(phantom, tmp_path):
    output = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # torchrun picks a free loopback port itself: no race for a port chosen here
        "--nproc_per_node",
        "2",
        str(REPO / "main_train.py"),
        *flags(root=phantom, output=output, lr=1e-3, max_iter=2, eval_step=2, **TINY),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("Training finished") == 1  # rank 0 alone reports
    card = json.loads((output / "best_metric_model.pth.json").read_text())

    from monai.data import DataLoader, Dataset

    from engine.common import checked_cases
    from engine.validation import summarise_scores, validation_scores
    from load_datasets_transforms import build_transforms, load_dataset_config
    from networks import build_network

    config = load_dataset_config("flare")
    model = build_network("REPUXNET", 1, 5, **card["network_args"])
    model.load_state_dict(load_state(output / "best_metric_model.pth"))
    _, val_transforms = build_transforms(config, "train", (32, 32, 32))
    loader = DataLoader(Dataset(checked_cases(config, str(phantom), "validation"), val_transforms), batch_size=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran (OMP_NUM_THREADS=1): same summation order
    try:
        scores = validation_scores(model, loader, (32, 32, 32), 2, 5, torch.device("cpu"), progress=False)
        dice, _ = summarise_scores(scores)
    finally:
        torch.set_num_threads(threads)
    assert dice == pytest.approx(card["best_metric"], abs=1e-5)


def test_resume_with_a_longer_run_stretches_the_schedule(phantom, tmp_path, capsys):
    output = tmp_path / "longer"
    schedule = ["--lr_schedule", "warmup_cosine", "--warmup_iter", "1"]
    train(phantom, output, *schedule, max_iter=2, eval_step=2)
    train(phantom, output, *schedule, "--resume", "auto", max_iter=4, eval_step=2)
    printed = capsys.readouterr().out
    assert "note: --max_iter 4 (checkpoint: 2): applied: the run and its learning-rate schedule end there" in printed
    checkpoint = load_state(output / "checkpoint_last.pth")
    assert checkpoint["progress"]["step"] == 4 and checkpoint["scheduler"]["max_iter"] == 4
