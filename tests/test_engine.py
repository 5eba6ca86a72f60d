"""Engine helpers: mixed precision, where sliding windows are stitched, algorithm flags."""

import pytest
import torch
from conftest import TINY_RUN, crop_cases, flags

import engine.common
from engine import UsageError, autocast_for, stitching_device
from engine.common import check_amp
from networks.dwconv import get_algorithm


def test_autocast_for_amp_flags(monkeypatch):
    cpu = torch.device("cpu")
    with autocast_for("bf16", cpu):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast_for(None, cpu):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(UsageError, match="--amp fp16 needs a CUDA device; use --amp bf16 on the CPU"):
        autocast_for("fp16", cpu)
    with pytest.raises(UsageError, match="--amp fp16 needs a CUDA device"):
        check_amp("fp16", cpu)
    # bf16 on a CPU without oneDNN's bf16 kernels is told, once, to leave --amp out; with them, nothing
    monkeypatch.setattr(engine.common, "native_bf16_cpu", lambda: False)
    assert "this CPU has no bf16 convolution kernels" in check_amp("bf16", cpu)
    assert check_amp(None, cpu) is None
    monkeypatch.setattr(engine.common, "native_bf16_cpu", lambda: True)
    assert check_amp("bf16", cpu) is None


def test_stitching_moves_to_the_cpu_only_when_the_output_would_not_fit():
    cuda = torch.device("cuda", 0)
    shape, classes = (512, 512, 400), 16
    needed = 2 * classes * 512 * 512 * 400  # the 2-byte probabilities of every class
    assert stitching_device(shape, classes, cuda, free_bytes=4 * needed) == cuda
    assert stitching_device(shape, classes, cuda, free_bytes=needed) == torch.device("cpu")
    assert stitching_device(shape, classes, torch.device("cpu")) == torch.device("cpu")


def test_amp_and_forced_algorithm_take_effect_in_training_and_inference(tmp_path, monkeypatch, capsys):
    """At kernel 3 on the CPU the automatic choice is the native convolution: --dwconv fft must switch every
    depthwise convolution to the FFT path, and --amp must run them under bf16 autocast."""
    import main_train
    import networks.dwconv
    import test_seg
    from phantom import write_dataset

    fft_calls = []  # autocast state at each FFT convolution
    real_fft = networks.dwconv.fft_depthwise_conv3d

    def spy(*args, **kwargs):
        fft_calls.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return real_fft(*args, **kwargs)

    monkeypatch.setattr(networks.dwconv, "fft_depthwise_conv3d", spy)
    root = tmp_path / "data"
    write_dataset(root, num_train=1, num_val=1, num_test=1, seed=5)
    crop_cases(root, 32)
    run = flags(root=root, output=tmp_path / "run", max_iter=2, eval_step=2, **TINY_RUN)
    main_train.main(run + ["--overwrite"])
    assert fft_calls == []  # auto: native at kernel 3 on the CPU
    capsys.readouterr()
    main_train.main(run + ["--overwrite", "--amp", "--dwconv", "fft"])
    assert fft_calls and all(fft_calls)  # every one under bf16 autocast
    note = "note: --amp bf16: this CPU has no bf16 convolution kernels"
    assert capsys.readouterr().out.count(note) == (0 if engine.common.native_bf16_cpu() else 1)
    assert get_algorithm() == "auto"  # the run's choice does not leak into the process
    weights = tmp_path / "run" / "best_metric_model.pth"
    assert all(
        torch.isfinite(v).all() for v in torch.load(weights, weights_only=True).values() if v.is_floating_point()
    )
    fft_calls.clear()
    predict = flags(root=root, trained_weights=weights, num_workers=0, device="cpu")
    test_seg.main(predict + flags(output=tmp_path / "native", dwconv="native", amp="bf16"))
    assert fft_calls == []
    capsys.readouterr()
    test_seg.main(predict + flags(output=tmp_path / "fft", dwconv="fft", amp="bf16"))
    assert fft_calls and all(fft_calls)
    assert capsys.readouterr().out.count(note) == (0 if engine.common.native_bf16_cpu() else 1)
    assert len(list((tmp_path / "fft").glob("*_seg.nii.gz"))) == 1
