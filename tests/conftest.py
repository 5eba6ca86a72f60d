import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N: each worker computes on one thread, so N workers share the cores instead of oversubscribing them
    torch.set_num_threads(1)

#: A RepUX-Net / 3D UX-Net small enough for CPU tests at 32^3.
TINY = dict(depths=(1, 1, 1, 1), feat_size=(4, 8, 16, 32), hidden_size=32, ks=5)
#: Script flags for a tiny RepUX-Net run on the CPU (see :func:`flags`).
TINY_RUN = dict(
    roi_size=32, feat_size="4,8,16,32", kernel_size=3, hidden_size=16, cache_rate=1, num_workers=0, device="cpu"
)

#: Narrower layers than the published ones, so that each comparison network runs in seconds, and the
#: smallest ROI each trains on (instance norm needs more than one voxel in the deepest map).
SMALL_NETWORKS = {
    "UNETR": (dict(feature_size=4, hidden_size=48, mlp_dim=96, num_heads=4), 32),
    "SwinUNETR": (dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3)), 64),
    "nnFormer": (dict(embed_dim=12, num_heads=(3, 3, 3, 3)), 32),
    "TransBTS": (dict(embedding_dim=32, num_heads=4, hidden_dim=64, base_channels=4), 32),
    "nnUNet": (dict(filters=[4, 8, 8, 8, 8, 8]), 64),
    "SegResNet": (dict(init_filters=8), 32),
    "UNet": (dict(channels=(4, 8, 8, 8, 8)), 32),
}


def flags(**values) -> list[str]:
    """``--name value`` command-line pairs from keyword arguments."""
    return [item for name, value in values.items() for item in (f"--{name}", str(value))]


def exit_message(main, argv) -> str:
    """The message a script's ``main(argv)`` exits with (a non-zero exit is asserted)."""
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code not in (0, None)
    return str(raised.value.code)


def run_bundle(bundle: Path, images: Path, output: Path, cwd: Path) -> None:
    """``python -m monai.bundle run`` as a user runs it, in isolated mode (no PYTHONPATH, no working folder on
    the path) from a folder outside the repository."""
    command = [sys.executable, "-I", "-m", "monai.bundle", "run", "--bundle_root", str(bundle)]
    command += ["--config_file", str(bundle / "configs" / "inference.json")]
    command += ["--dataset_dir", str(images), "--output_dir", str(output), "--inferer#overlap", "0"]
    completed = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]


def crop_cases(root: Path, size: int) -> None:
    """Every NIfTI under ``root`` cut in place to its central ``size`` voxels per axis (the affine moved with
    it, so a case's image and label stay aligned): one sliding window per case, for tests whose work per
    voxel is slow (bf16 convolutions on CPUs without bf16 kernels)."""
    import nibabel as nib

    for path in sorted(root.rglob("*.nii.gz")):
        image = nib.load(path)
        starts = [max(0, (n - size) // 2) for n in image.shape[:3]]
        nib.save(image.slicer[tuple(slice(a, a + size) for a in starts)], path)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _read_through_record(tmp_path_factory):
    """Remembered read-throughs go to a folder of this test session, not the user's cache (subprocesses
    inherit it)."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
