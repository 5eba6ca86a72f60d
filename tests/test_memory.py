"""Memory at the edges: test_seg.py estimates its whole process tree from the headers before reading a voxel,
a large file is read through a slab at a time, and one reader of the memory available (a container's limit
included) serves inference and the training cache."""

import gzip
import json
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import TINY_RUN, exit_message, flags
from torch import nn

import dataset.checks
import engine.memory
import main_train
import test_seg
from dataset.description import DatasetError
from engine.memory import (
    ACTIVATION_EXTRA,
    ACTIVATION_FACTOR,
    BASELINE_BYTES,
    WORKER_BYTES,
    CaseGrid,
    ModelMemory,
    TreePeak,
    activation_bytes,
    inference_bytes,
    tree_bytes,
)
from phantom import write_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny trained RepUX-Net with its model card, and the phantom it was trained on."""
    root = tmp_path_factory.mktemp("phantom")
    write_dataset(root, num_train=2, num_val=1, num_test=2, seed=4)
    output = tmp_path_factory.mktemp("run")
    main_train.main(flags(root=root, output=output, max_iter=1, eval_step=1, **TINY_RUN))
    return root, output / "best_metric_model.pth"


# ---- 1. the headers first, then a read-through that never holds a file whole ----


def huge_header(path: Path, shape=(2000, 2000, 2000)) -> None:
    """A NIfTI file whose header says ``shape`` (int16: 16 GB of voxels) but that holds 35 kB of them."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header.set_qform(np.diag([0.8, 0.8, 0.8, 1.0]), code=1)
    header.set_sform(np.diag([0.8, 0.8, 0.8, 1.0]), code=1)
    header["vox_offset"] = 352
    with gzip.open(path, "wb") as file:
        file.write(header.binaryblock + b"\0" * 4 + b"\1" * 35_000)


def test_a_huge_case_is_refused_from_its_header_without_reading_a_voxel(model, tmp_path, monkeypatch):
    root, weights = model

    def read(*args, **kwargs):
        raise AssertionError("a file was read through")

    monkeypatch.setattr(dataset.checks, "read_through", read)
    images = tmp_path / "images"
    images.mkdir()
    huge_header(images / "huge.nii.gz")
    argv = flags(input=images, output=tmp_path / "out", trained_weights=weights, memory_limit=12, device="cpu")
    message = exit_message(test_seg.main, argv)
    assert "\n" not in message.strip()
    needed = re.match(
        r"error: huge: segmenting needs about (\d+\.\d) GB \(this process [\d.]+ GB, 2 data-loading", message
    )
    assert needed and float(needed[1]) > 12 and "more than --memory_limit 12 (GB) allows" in message
    assert "--num_workers 0 preprocesses in this process" in message


def whole_summary(path: Path, kind: str) -> dict:
    """What the read-through should find, from the whole file at once (the rule, written independently)."""
    image = nib.load(path)
    data = np.asanyarray(image.dataobj)
    if kind == "label":
        return {"values": sorted(np.unique(data).tolist())}
    finite = bool(np.isfinite(data).all())
    channels = data.reshape(-1, data.shape[3]) if data.ndim == 4 else data.reshape(-1, 1)
    return {"finite": finite, "constant": [bool(finite and c.min() == c.max()) for c in channels.T]}


def test_the_read_through_holds_a_slab_not_the_file_and_finds_what_a_whole_read_finds(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset.checks, "READ_SLAB_BYTES", 64 * 2**10)  # 64 kB: several planes at most
    rng = np.random.default_rng(0)
    image = rng.normal(size=(64, 64, 48, 2)).astype(np.float32)
    image[..., 1] = 7.0  # a constant channel
    image[3, 4, 45, 0] = np.nan  # in the last slab
    label = np.zeros((64, 64, 48), dtype=np.uint8)
    label[..., 40:] = 3  # values that only the last planes hold
    label[0, 0, 0] = 1
    files = {"image": tmp_path / "image.nii.gz", "label": tmp_path / "label.nii.gz"}
    nib.save(nib.Nifti1Image(image, np.eye(4)), files["image"])
    nib.save(nib.Nifti1Image(label, np.eye(4)), files["label"])
    for kind, path in files.items():
        tracemalloc.start()
        summary = dataset.checks.read_through(str(path), kind)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        expected = whole_summary(path, kind)
        assert {key: summary[key] for key in expected} == expected, kind
        assert summary["shape"] == list(nib.load(path).shape)
        assert peak < nib.load(path).get_fdata(dtype=np.float32).nbytes / 4, (kind, peak)  # never the whole file
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(files["image"].read_bytes()[:-20_000])
    with pytest.raises(DatasetError, match=r"truncated.nii.gz: cannot read its voxel data \(EOFError"):
        dataset.checks.read_through(str(truncated), "image")


def test_ctrl_c_while_the_cases_are_read_through_ends_in_one_line(model, tmp_path, monkeypatch, capsys):
    root, weights = model

    def interrupted(path, kind, stop=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(dataset.checks, "read_through", interrupted)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # nothing remembered: every file is read
    argv = flags(root=root, output=tmp_path / "out", trained_weights=weights, device="cpu", num_workers=0)
    with pytest.raises(SystemExit) as stopped:
        test_seg.main(argv)
    assert stopped.value.code == 130
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("stopped by SIGINT while reading the cases through (0 of 2 files read")
    assert "Traceback" not in "\n".join(error)


# ---- 2. what the estimate covers: every process, every model, the network's activations ----


class TwoConvolutions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Conv3d(1, 8, 3, padding=1), nn.Conv3d(8, 2, 3, padding=1)

    def forward(self, x):
        return self.second(self.first(x))


def test_traced_activations_are_the_tensors_alive_at_once():
    """While the second convolution runs, the first one's output (8 channels) and its own (2) are alive: the
    traced peak is exactly their bytes (the input is the caller's)."""
    batch, roi = 3, (16, 16, 8)
    voxels = batch * 16 * 16 * 8
    expected = (8 + 2) * voxels * 4
    assert activation_bytes(TwoConvolutions, 1, roi, batch) == int(expected * ACTIVATION_FACTOR) + ACTIVATION_EXTRA


MEASURE_FORWARD = """
import sys, torch
from engine.memory import peak_resident_bytes, reset_peak_resident, resident_bytes
from networks import build_network, switch_to_deploy
torch.set_grad_enabled(False)
network = build_network(sys.argv[1], 1, 5, **eval(sys.argv[2])).eval()
switch_to_deploy(network)
windows = torch.zeros(2, 1, 64, 64, 64)
reset_peak_resident()
before = resident_bytes()
network(windows)
print(peak_resident_bytes() - before)
"""


@pytest.mark.parametrize(
    "name, overrides",
    [("REPUXNET", {"feat_size": (16, 32, 64, 128), "ks": 7, "hidden_size": 256}), ("nnUNet", {})],
)
def test_the_activation_estimate_bounds_a_real_forward_on_the_cpu(name, overrides):
    """The estimate against the peak resident memory a real forward adds in a fresh process (kernel's
    VmHWM): above it, and not more than twice it."""
    completed = subprocess.run(
        [sys.executable, "-c", MEASURE_FORWARD, name, repr(overrides)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    measured = int(completed.stdout.strip().splitlines()[-1])
    from networks import build_network, switch_to_deploy

    def build():
        network = build_network(name, 1, 5, **overrides).eval()
        switch_to_deploy(network)
        return network

    estimate = activation_bytes(build, 1, (64, 64, 64), 2)
    assert measured < estimate < 2 * measured, (measured, estimate)


CASE = CaseGrid("a", (256, 256, 80), (137, 137, 100))


def activations_of(size: int):
    return lambda batch: batch * size


def test_the_estimate_adds_the_workers_preprocessing_the_next_cases():
    one = ModelMemory((96, 96, 96), 10 * 2**20, activations_of(2**28))
    alone = tree_bytes([CASE], 1, 16, [one], 4, 0.5, 0, 0.0)
    need = inference_bytes(CASE.input_shape, 1, CASE.network_shape, 16, (96, 96, 96), 4, 4 * 2**28)
    assert alone.workers == 0
    assert alone.main == BASELINE_BYTES + 10 * 2**20 + max(need.segmenting, need.preprocessing)
    three = tree_bytes([CASE] * 3, 1, 16, [one], 4, 0.5, 2, 0.0)
    # while the main process segments one case, each of the two workers preprocesses another
    assert three.workers == 2 * WORKER_BYTES + 2 * need.preprocessing
    image = 137 * 137 * 100 * 4
    assert three.main == BASELINE_BYTES + 10 * 2**20 + need.segmenting + 2 * image  # two batches waiting
    single = tree_bytes([CASE], 1, 16, [one], 4, 0.5, 2, 0.0)  # no next case: the worker idles meanwhile
    assert single.total == BASELINE_BYTES + 10 * 2**20 + 2 * WORKER_BYTES + max(need.segmenting, need.preprocessing)


def test_the_estimate_holds_every_model_and_the_largest_pass():
    small = ModelMemory((64, 64, 64), 10 * 2**20, activations_of(2**27))
    large = ModelMemory((96, 96, 96), 30 * 2**20, activations_of(2**28))
    ensemble = tree_bytes([CASE], 1, 16, [small, large], 4, 0.5, 0, 0.0)
    alone = tree_bytes([CASE], 1, 16, [large], 4, 0.5, 0, 0.0)
    assert ensemble.main == alone.main + 10 * 2**20  # both models' weights, the larger pass
    unknown = tree_bytes([CASE], 1, 16, [ModelMemory((96, 96, 96), 0, lambda batch: None)], 4, 0.5, 0, 0.0)
    assert not unknown.activations_known and alone.activations_known


def test_cached_cases_are_held_by_the_main_process():
    one = ModelMemory((96, 96, 96), 0, activations_of(2**20))
    cached = tree_bytes([CASE] * 2, 1, 16, [one], 4, 0.5, 2, 1.0)
    uncached = tree_bytes([CASE] * 2, 1, 16, [one], 4, 0.5, 2, 0.0)
    need = inference_bytes(CASE.input_shape, 1, CASE.network_shape, 16, (96, 96, 96), 4, 4 * 2**20)
    image = 137 * 137 * 100 * 4
    assert cached.workers == 2 * WORKER_BYTES  # nothing left to preprocess
    assert cached.main == BASELINE_BYTES + 2 * image + max(need.segmenting + image, 2 * need.preprocessing)
    assert uncached.workers == 2 * WORKER_BYTES + need.preprocessing  # the second case, while the first is segmented


def test_the_estimate_is_above_the_measured_peak_of_the_process_tree(model, tmp_path):
    """test_seg.py with its defaults (two data-loading workers) in a process of its own: its printed estimate
    is above the proportional set size of it and its workers, summed, at their peak."""
    root, weights = model
    command = [sys.executable, str(REPO / "test_seg.py"), "--root", str(root), "--output", str(tmp_path / "out")]
    command += ["--trained_weights", str(weights), "--device", "cpu"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreePeak(process.pid).start()
    output, _ = process.communicate()
    peak = sampler.stop()
    assert process.returncode == 0, output[-2000:]
    line = re.search(
        r"Memory: segmenting needs about ([\d.]+) GB at most \(this process [\d.]+ GB, 2 data-loading", output
    )
    assert line, output[-2000:]
    assert sampler.processes == 3  # the two workers were counted
    assert 0 < peak < float(line[1]) * 2**30


# ---- 13. one reader of the memory available ----


def test_the_training_cache_is_fitted_to_a_containers_limit(monkeypatch):
    """A container whose limit is below what the host has: the cache rate is fitted to the container."""
    from dataset.checks import CaseSummary
    from engine.loading import fit_cache_rate

    files = {
        "/proc/meminfo": "MemAvailable:   20971520 kB\n",  # 20 GB on the host
        "/sys/fs/cgroup/memory.max": str(2 * 2**30),  # 2 GB for the container, 1 GB of it used
        "/sys/fs/cgroup/memory.current": str(2**30),
    }
    monkeypatch.setattr(engine.memory, "_read", files.get)
    assert engine.memory.available_bytes() == 2**30
    summaries = [CaseSummary((256, 256, 256), (1.0, 1.0, 1.0), 1, True)] * 4  # 128 MB each with its label
    rate, note = fit_cache_rate(1.0, summaries, None, processes=2)
    assert note is not None and rate == int(0.75 * 2**30 / (2 * 4 * 128 * 2**20) * 100) / 100
    assert json.dumps(rate)  # a plain number
