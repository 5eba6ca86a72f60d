"""Flags and files: ROI parsing, --help defaults, atomic writes, the documented commands."""

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli
import engine.common
import main_finetune
import main_train
import test_seg
from atomic_files import replace_atomically
from engine.common import roi_of, save_torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "value, expected",
    [(96, (96,) * 3), ("96", (96,) * 3), ([64], (64,) * 3), ("96,96,64", (96, 96, 64)), ((32, 16, 8), (32, 16, 8))],
)
def test_roi_of_takes_one_or_three_positive_integers(value, expected):
    assert roi_of(value) == expected


@pytest.mark.parametrize("value", ["96,96", (96, 96), "0", "-32", "9.5", "a", [96.0], "96,96,96,96", ""])
def test_roi_of_refuses_anything_else(value):
    with pytest.raises(ValueError, match="expected one or three positive integers"):
        roi_of(value)


def test_roi_size_flag_is_parsed_by_roi_of(capsys):
    with pytest.raises(SystemExit):
        main_train.main(["--root", "r", "--output", "o", "--roi_size", "96,96"])
    assert "argument --roi_size: ROI size '96,96': expected one or three positive integers" in capsys.readouterr().err


def option_help(main, capsys) -> dict[str, str]:
    """Each option's help text from ``--help`` (flag -> its block, whitespace collapsed)."""
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out.split("options:", 1)[1]
    blocks = re.split(r"\n(?=  -)", text)
    return {re.match(r"\s+(-[-\w]+)", block).group(1): " ".join(block.split()) for block in blocks if block.strip()}


#: Options without a default to show: the help switch, on/off switches and required flags.
NO_DEFAULT = {
    "-h",
    "--overwrite",
    "--gpu_transforms",
    "--evaluate",
    "--tta",
    "--save_probabilities",
    "--root",
    "--output",
    "--trained_weights",
}


@pytest.mark.parametrize("script", [main_train, main_finetune, test_seg])
def test_help_shows_every_default(script, capsys):
    blocks = option_help(script.main, capsys)
    assert {"--dataset", "--network", "--cache_rate", "--num_workers", "--sw_batch_size"} <= set(blocks)
    for flag, text in blocks.items():
        if flag not in NO_DEFAULT:
            assert "default" in text, (flag, text)


def test_help_says_what_the_model_card_and_the_weights_decide(capsys):
    inference = option_help(test_seg.main, capsys)
    assert "the model card's, else 96" in inference["--roi_size"]
    assert "the card's, else REPUXNET" in inference["--network"]
    finetune = option_help(main_finetune.main, capsys)
    assert "required unless --pretrain false" in finetune["--pretrained_weights"]


def test_each_script_describes_the_flags_it_uses_in_its_own_words(capsys, tmp_path):
    inference, training = option_help(test_seg.main, capsys), option_help(main_train.main, capsys)
    finetune = option_help(main_finetune.main, capsys)
    assert "segmentations" in inference["--output"] and "weights" not in inference["--output"]
    assert "checkpoint_last.pth" in training["--output"]
    assert "scaler" not in inference["--amp"] and "gradient scaler" in training["--amp"]
    assert "training" not in inference["--cache_rate"] and "training" in training["--cache_rate"]
    assert "--seed" not in inference and "--seed" in training
    assert "--mode" not in finetune and "--mode" not in inference
    test_seg_args = ["--output", str(tmp_path), "--trained_weights", str(tmp_path / "w.pth"), "--seed", "1"]
    test_seg_args += ["--mode", "test"]
    with pytest.raises(SystemExit):  # the published flags are still accepted (the run fails on w.pth)
        test_seg.main(test_seg_args)
    assert "unrecognized arguments" not in capsys.readouterr().err


@pytest.mark.parametrize("script", ["main_train.py", "main_finetune.py", "test_seg.py", "export.py"])
def test_help_is_printed_before_pytorch_loads(script):
    """--help in a fresh process: the flags are parsed before PyTorch, MONAI or NumPy is imported (which
    took 5-6 s; BENCHMARKS.md has the times), the network list included."""
    run_help = (
        f"import runpy, sys\nsys.argv = [{script!r}, '--help']\ntry:\n    runpy.run_path({script!r}, "
        "run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print('loaded:', sorted({name.split('.')[0] for name in sys.modules} & {'torch', 'monai', 'numpy'}))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", run_help], cwd=REPO, capture_output=True, text=True, check=True, timeout=60
    )
    assert completed.stdout.rstrip().endswith("loaded: []"), completed.stdout[-300:]
    assert "--output" in completed.stdout and not completed.stderr
    if script.startswith("main_"):
        assert "REPUXNET, 3DUXNET, UNETR" in " ".join(completed.stdout.split())


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_use_the_umask_and_reach_the_disk_before_the_rename(tmp_path, monkeypatch, umask):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(engine.common.os, "fsync", lambda fd: calls.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(engine.common.os, "replace", lambda a, b: calls.append("replace") or real_replace(a, b))
    previous = os.umask(umask)
    try:
        save_torch({"w": torch.ones(2)}, tmp_path / "weights.pth")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "weights.pth").stat().st_mode) == 0o666 & ~umask
    assert calls == ["fsync", "replace"]
    assert torch.equal(torch.load(tmp_path / "weights.pth", weights_only=True)["w"], torch.ones(2))


def test_atomic_write_failure_leaves_no_temporary_file(tmp_path):
    def fail(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_atomically(tmp_path / "report.json", fail)
    assert list(tmp_path.iterdir()) == []


def test_documented_finetune_command_matches_the_published_one():
    training = (REPO / "TRAINING.md").read_text()
    command = training[training.index("python main_finetune.py") :].split("```")[0]
    assert "--max_iter 60000" in command  # the published command, and the CLI default
    parser = cli.parser_for("")
    cli.add_common_arguments(parser, "train")
    cli.add_training_arguments(parser, finetune=True)
    assert parser.get_default("max_iter") == 60000


@pytest.mark.parametrize("fresh, start", [(None, ["--resume", "auto"]), ("1", ["--overwrite"])])
def test_demo_continues_its_run_and_starts_over_only_when_asked(tmp_path, fresh, start):
    """demo.sh run again resumes (a finished run then trains no further); FRESH=1 starts over. A stand-in
    ``python`` records the commands instead of running them."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    (bin_dir / "python").chmod(0o755)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset.json").write_text("{}")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DATA": str(tmp_path / "data")}
    env["RUN"] = str(tmp_path / "run")
    env.pop("FRESH", None)
    if fresh:
        env["FRESH"] = fresh
    subprocess.run(["bash", str(REPO / "demo.sh")], env=env, check=True)
    training, segmenting = calls.read_text().splitlines()
    assert training.startswith("main_train.py") and segmenting.startswith("test_seg.py")
    flags = training.split()
    assert flags[-len(start) :] == start and ("--overwrite" in flags) == (fresh == "1")
