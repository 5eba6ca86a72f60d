"""Exports that leave the repository: the deploy form, TorchScript, ONNX and the MONAI bundle, checked
against the training-form network and against test_seg.py's segmentations."""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import onnx
import onnxruntime
import openvino
import pytest
import torch
from conftest import TINY, TINY_RUN, crop_cases, exit_message, flags, run_bundle
from monai.bundle import ConfigParser
from torch import nn

import engine.export
import export
import main_train
import test_seg
from dataset.description import load_dataset_config
from dataset.portable import case_images
from dataset.transforms import build_transforms
from engine.bundle import bundle_files
from networks import build_network, get_spec
from networks.deploy import deploy_form, repository_modules
from networks.dwconv import use_algorithm
from phantom import write_dataset

#: Inference flags of the tests (windows without overlap, to keep the passes short on a CPU).
PREDICT = dict(num_workers=0, device="cpu", cache_rate=0, overlap=0, sw_batch_size=4)
CT_CARD = dict(channels=["CT"], normalization=[{"scheme": "ct", "window": [-125.0, 275.0]}], spacing=[1.5, 1.5, 2.0])


def relative_difference(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output - reference).abs().max() / reference.abs().max())


def saved_with_card(
    folder: Path, name: str, overrides: dict, roi: int, out_channels: int = 3, preprocessing: dict = CT_CARD
) -> tuple[Path, nn.Module]:
    """A network's weights and the model card training would write beside them (with ``preprocessing``'s
    channels, normalization and spacing); the weights' path and the network."""
    model = build_network(name, 1, out_channels, **overrides).eval()
    weights = folder / "weights.pth"
    torch.save(model.state_dict(), weights)
    card = dict(
        network=name,
        network_args=overrides,
        in_channels=1,
        out_channels=out_channels,
        classes=[f"class {i}" for i in range(out_channels)],
        roi_size=[roi] * 3,
        **preprocessing,
    )
    Path(f"{weights}.json").write_text(json.dumps(card))
    return weights, model


UNETR_TINY = dict(img_size=(32, 32, 32), feature_size=4, hidden_size=48, mlp_dim=96, num_heads=4)


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("REPUXNET", TINY),  # 5^3 kernels: the training form convolves through FFT on the CPU
        ("3DUXNET", TINY),
        ("REP3D", TINY),  # the learned prior folded into plain kernels
        ("UNet", dict(channels=(4, 8, 8, 8, 8))),
        ("UNETR", UNETR_TINY),  # built for one input size
    ],
)
def test_torchscript_and_onnx_compute_the_training_form_network(name, overrides, tmp_path, capsys):
    weights, model = saved_with_card(tmp_path, name, overrides, 32)
    output = tmp_path / "export"
    export.main(flags(trained_weights=weights, output=output) + ["--formats", "torchscript", "onnx"])
    printed = capsys.readouterr().out
    assert "model.ts: largest difference to the training-form network" in printed
    assert "model.onnx: largest difference to the training-form network" in printed
    assert sorted(p.name for p in output.iterdir()) == ["model.onnx", "model.onnx.json", "model.ts", "model.ts.json"]

    spec = get_spec(name)
    # Inputs of our own, unlike the export's check: another batch size and, where the export allows it,
    # other spatial sizes (multiples of what the network needs).
    shapes = [(3, 1, 32, 32, 32)] + ([(1, 1, 32 + spec.input_multiple, 32, 64)] if spec.any_size_export else [])
    scripted = torch.jit.load(output / "model.ts")
    session = onnxruntime.InferenceSession(str(output / "model.onnx"), providers=["CPUExecutionProvider"])
    compiled = openvino.Core().compile_model(str(output / "model.onnx"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for shape in shapes:
        x = torch.randn(shape)
        with torch.no_grad():
            reference = model(x)
            assert relative_difference(scripted(x), reference) < 1e-4
        onnx_output = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
        assert relative_difference(onnx_output, reference) < 1e-4
        assert relative_difference(torch.from_numpy(compiled(x.numpy())[0]), reference) < 1e-4
    input_shape = session.get_inputs()[0].shape
    assert isinstance(input_shape[0], str) and input_shape[1] == 1  # dynamic batch, fixed channels
    if spec.any_size_export:
        assert all(f"{spec.input_multiple}*" in axis for axis in input_shape[2:])
    else:
        assert input_shape[2:] == [32, 32, 32]

    card = json.loads((output / "model.onnx.json").read_text())
    assert card["export"]["format"] == "onnx" and card["export"]["opset"] == engine.export.OPSET
    assert 0 <= card["export"]["max_rel_diff"] < 1e-4 and card["classes"] == ["class 0", "class 1", "class 2"]
    proto = onnx.load(output / "model.onnx")
    assert {entry.domain or "ai.onnx": entry.version for entry in proto.opset_import}["ai.onnx"] == engine.export.OPSET
    assert not {node.op_type for node in proto.graph.node} & {"DFT", "STFT"}  # no FFT in the deploy form
    assert "fft" not in str(scripted.inlined_graph)


def test_deploy_form_has_no_fft_and_no_prior_and_the_same_weights():
    model = build_network("REPUXNET", 1, 3, **TINY).eval()
    deployed = deploy_form(model)
    assert repository_modules(model) and not repository_modules(deployed)  # the model itself is untouched
    assert not [name for name, _ in deployed.named_buffers() if name.endswith("prior")]
    depthwise = [m for m in deployed.modules() if type(m) is nn.Conv3d and m.groups > 1]
    assert len(depthwise) == 4 and all(m.kernel_size == (5, 5, 5) for m in depthwise)  # one per block
    assert deployed.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(deployed.state_dict()[k], v) for k, v in model.state_dict().items())
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad(), use_algorithm("fft"):  # the training form through FFT, the deploy form without
        reference = model(x)
        original = torch.fft.rfftn
        torch.fft.rfftn = None  # any FFT in the deploy form's forward would fail here
        try:
            output = deployed(x)
        finally:
            torch.fft.rfftn = original
    assert relative_difference(output, reference) < 1e-5


@pytest.mark.parametrize(
    "script", ["dataset/portable.py", "dataset/labels.py", "engine/stitching.py", "engine/input_grid.py"]
)
def test_the_bundles_scripts_import_nothing_of_this_repository(script):
    source = Path(__file__).resolve().parents[1] / script
    modules = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):  # a relative import (level 1) names a sibling the bundle carries
            modules.add(node.module.split(".")[0] if node.level == 0 else f"scripts.{node.module}")
    allowed = {"__future__", "re", "math", "collections", "dataclasses", "pathlib", "typing"}
    allowed |= {"os", "threading", "torch", "monai", "scipy", "numpy", "nibabel", "scripts.stitching"}
    assert modules <= allowed, modules - allowed


@pytest.mark.parametrize(
    "channels, normalization, modality, value_format",
    [
        (["CT"], [{"scheme": "ct", "window": [-125.0, 275.0]}], "CT", "hounsfield"),
        (["T2w"], [{"scheme": "ct", "window": [0.0, 1000.0]}], "MR", "magnitude"),  # FeTA: a fixed window
        (["CT", "T1"], [{"scheme": "ct", "window": [-100.0, 240.0]}, "zscore"], "CT/MR", "magnitude"),
    ],
)
def test_the_bundle_metadata_takes_the_modality_from_the_channel_names(channels, normalization, modality, value_format):
    card = {
        "network": "REPUXNET",
        "network_args": {},
        "in_channels": len(channels),
        "out_channels": 2,
        "classes": ["background", "brain"],
        "roi_size": [32, 32, 32],
        "channels": channels,
        "normalization": normalization,
        "spacing": None,
    }
    files = bundle_files(card, b"", "model.pth", 4, 0.5)
    image = json.loads(files["configs/metadata.json"])["network_data_format"]["inputs"]["image"]
    assert (image["modality"], image["format"]) == (modality, value_format)


def test_case_images_groups_channel_files_and_names_a_missing_one(tmp_path):
    for name in ("a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz", "four_d.nii.gz", "notes.txt"):
        (tmp_path / name).touch()
    cases = case_images(tmp_path, 2)
    assert [
        case["image"] if isinstance(case["image"], str) else [Path(p).name for p in case["image"]] for case in cases
    ] == [
        ["a_0000.nii.gz", "a_0001.nii.gz"],
        ["b_0000.nii.gz", "b_0001.nii.gz"],
        str(tmp_path / "four_d.nii.gz"),
    ]
    assert len(case_images(tmp_path, 1)) == 5  # one channel: every file is a case
    (tmp_path / "b_0001.nii.gz").unlink()
    with pytest.raises(ValueError, match="case b has channel files 0000; expected 0000, 0001"):
        case_images(tmp_path, 2)


def bad_inputs(folder: Path) -> dict[str, tuple[Path, str]]:
    """Folders of what a user gives a two-channel bundle by mistake, each with the line it must end with."""
    volume = np.random.default_rng(0).normal(size=(16, 16, 8)).astype(np.float32)
    inputs = {}
    for name in ("two_in_one", "empty", "one_channel", "truncated"):
        (folder / name).mkdir(parents=True)
        inputs[name] = folder / name
    nib.save(nib.Nifti1Image(volume, np.eye(4)), inputs["two_in_one"] / "x_0000.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([volume, volume], -1), np.eye(4)), inputs["two_in_one"] / "x_0001.nii.gz")
    nib.save(nib.Nifti1Image(volume, np.eye(4)), inputs["empty"] / "y_0000.nii.gz")
    (inputs["empty"] / "y_0001.nii.gz").write_bytes(b"")
    nib.save(nib.Nifti1Image(volume, np.eye(4)), inputs["one_channel"] / "z.nii.gz")
    for channel in (0, 1):
        nib.save(nib.Nifti1Image(volume, np.eye(4)), inputs["truncated"] / f"t_{channel:04d}.nii.gz")
    whole = (inputs["truncated"] / "t_0001.nii.gz").read_bytes()
    (inputs["truncated"] / "t_0001.nii.gz").write_bytes(whole[: len(whole) // 2])
    return {
        "two_in_one": (
            inputs["two_in_one"],
            f"error: {inputs['two_in_one']}: case x has channel files 0000; expected 0000, 0001 (x_0001.nii.gz holds "
            "several channels: a case of its own)",
        ),
        "empty": (inputs["empty"], f"error: {inputs['empty'] / 'y_0001.nii.gz'}: cannot read as NIfTI ("),
        "one_channel": (
            inputs["one_channel"],
            f"error: {inputs['one_channel'] / 'z.nii.gz'}: 1 channel, but the model takes 2 (a 4D file with the "
            "channels last, or <case>_0000.nii.gz, <case>_0001.nii.gz, ... one file per channel)",
        ),
        "truncated": (
            inputs["truncated"],
            f"error: {inputs['truncated'] / 't_0000.nii.gz'}, {inputs['truncated'] / 't_0001.nii.gz'}: cannot be "
            "loaded (EOFError: ",
        ),
    }


def test_the_bundle_says_what_is_wrong_with_an_input_in_one_line(tmp_path):
    """What the bundle's config lists and loads (scripts.portable.checked_cases, segment_all), given a two-
    channel file named as channel 1, an empty file, a one-channel image for two channels, a truncated file:
    one ``error:`` line naming the file (the process's exit), as test_seg.py reports it."""
    from monai.data import DataLoader, Dataset

    from dataset.portable import LoadCased, checked_cases, segment_all

    for name, (folder, expected) in bad_inputs(tmp_path).items():
        with pytest.raises(SystemExit) as stopped:
            cases = checked_cases(folder, 2)
            loader = DataLoader(Dataset(cases, LoadCased(keys="image")), batch_size=1, num_workers=0)
            segment_all(loader, nn.Identity(), lambda image, network: image, lambda case: None, "cpu")
        message = str(stopped.value.code)
        assert "\n" not in message and message.startswith(expected), (name, message)


# ---- a model trained a few steps, through every route ----


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    """A phantom CT task, a RepUX-Net trained on it for a few steps, and its exports."""
    root = tmp_path_factory.mktemp("ct")
    write_dataset(root, num_train=2, num_val=1, num_test=2, seed=8)
    run = tmp_path_factory.mktemp("ct_run")
    tiny = {**TINY_RUN, "kernel_size": 5}  # a kernel the CPU convolves through FFT in training and .pth inference
    main_train.main(flags(root=root, output=run, max_iter=4, eval_step=4, lr=1e-2, **tiny))
    weights = run / "best_metric_model.pth"
    exported = tmp_path_factory.mktemp("ct_export")
    export.main(flags(trained_weights=weights, output=exported))
    return root, weights, exported


class Segmentations(dict):
    """A run's ``<case>_seg.nii.gz`` images by name; ``folder`` holds their probabilities files too."""

    def __init__(self, folder: Path) -> None:
        super().__init__({p.name: nib.load(p) for p in sorted(folder.glob("*_seg.nii.gz"))})
        self.folder = folder


def segment(weights: list, cases: Path, output: Path, extra: tuple = ()) -> Segmentations:
    """The segmentations of a dataset's test cases (``cases`` its root) or of the images in a folder."""
    source = {"root": cases} if (cases / "dataset.json").exists() else {"input": cases}
    argv = flags(output=output, **source, **PREDICT) + ["--save_probabilities", "--trained_weights"]
    test_seg.main(argv + [*map(str, weights), *extra])
    return Segmentations(output)


def one_test_case(root: Path, folder: Path) -> Path:
    """``folder`` holding a copy of the dataset's first test image, as ``case.nii.gz``."""
    folder.mkdir()
    shutil.copy(sorted((root / "imagesTs").glob("*.nii.gz"))[0], folder / "case.nii.gz")
    return folder


def assert_same_segmentations(expected: Segmentations, actual: dict) -> None:
    """The same labels, but at near ties: where another route's float32 differs in the sixth digit, a voxel
    whose two most probable classes are within the 2-byte resolution of the held probabilities (and the
    float16 rounding of the saved ones: 1e-3) may take the other class."""
    assert sorted(actual) == sorted(expected)
    for name, image in expected.items():
        labels, reference = np.asarray(actual[name].dataobj), np.asarray(image.dataobj)
        differing = labels != reference
        if differing.any():
            saved = np.load(expected.folder / name.replace("_seg.nii.gz", "_probabilities.npz"))["probabilities"]
            top_two = np.sort(saved[:, differing].astype(np.float32), axis=0)[-2:]
            assert (top_two[1] - top_two[0]).max() < 1e-3 and differing.mean() < 1e-4, (name, differing.sum())
        assert np.allclose(actual[name].affine, image.affine), name


def test_a_trained_model_segments_identically_through_pth_torchscript_onnx_openvino_and_the_bundle(ct, tmp_path):
    root, weights, exported = ct
    assert sorted(p.name for p in (exported / "bundle").rglob("*") if p.is_file()) == [
        "README.md",
        "__init__.py",
        "inference.json",
        "input_grid.py",
        "labels.py",
        "logging.conf",
        "metadata.json",
        "model.ts",
        "portable.py",
        "stitching.py",
    ]
    expected = segment([weights], root, tmp_path / "pth")
    labels = np.concatenate([np.asarray(image.dataobj).ravel() for image in expected.values()])
    assert len(expected) == 2 and len(np.unique(labels)) > 1  # a trained model, not a constant one
    for name in ("model.ts", "model.onnx"):
        assert_same_segmentations(expected, segment([exported / name], root, tmp_path / name))
    # OpenVINO's float32 differs from PyTorch's by up to 1e-4 relative: a voxel at a near tie between two
    # classes may take the other one.
    openvino = segment([exported / "model.onnx"], root, tmp_path / "openvino", ("--runtime", "openvino"))
    assert sorted(openvino) == sorted(expected)
    for name, image in expected.items():
        differing = np.asarray(openvino[name].dataobj) != np.asarray(image.dataobj)
        assert differing.mean() < 1e-4 and np.allclose(openvino[name].affine, image.affine), differing.sum()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    run_bundle(exported / "bundle", root / "imagesTs", tmp_path / "bundle", cwd=outside)
    bundled = Segmentations(tmp_path / "bundle")
    assert_same_segmentations(expected, bundled)
    torchscript = Segmentations(tmp_path / "model.ts")  # the same TorchScript through the same slab-wise code
    for name, image in torchscript.items():
        np.testing.assert_array_equal(np.asarray(bundled[name].dataobj), np.asarray(image.dataobj), err_msg=name)


def test_an_ensemble_may_mix_weights_and_exports(ct, tmp_path):
    root, weights, exported = ct
    expected = segment([weights], root, tmp_path / "pth")
    mixed = segment([weights, exported / "model.ts", exported / "model.onnx"], root, tmp_path / "mixed")
    assert_same_segmentations(expected, mixed)


def test_test_seg_and_the_bundle_name_outputs_alike_and_refuse_two_inputs_of_one_name(ct, tmp_path):
    root, weights, exported = ct
    images = tmp_path / "images"
    images.mkdir()
    source = sorted((root / "imagesTs").glob("*.nii.gz"))[0]
    shutil.copy(source, images / "case_0000.nii.gz")  # nnU-Net's name of a single-channel case
    argv = flags(output=tmp_path / "pth", **PREDICT) + ["--input", str(images), "--trained_weights", str(weights)]
    test_seg.main(argv)
    run_bundle(exported / "bundle", images, tmp_path / "bundle", cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "pth").glob("*_seg.nii.gz")) == ["case_seg.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "bundle").glob("*_seg.nii.gz")) == ["case_seg.nii.gz"]
    shutil.copy(source, images / "case.nii.gz")  # would be written as case_seg.nii.gz too
    argv = flags(output=tmp_path / "two", **PREDICT) + ["--input", str(images), "--trained_weights", str(weights)]
    message = exit_message(test_seg.main, argv)
    assert "case.nii.gz and" in message and "case_0000.nii.gz would both be written as case_seg.nii.gz" in message
    assert not (tmp_path / "two").exists() or not any((tmp_path / "two").iterdir())
    with pytest.raises(ValueError, match="would both be written as case_seg.nii.gz"):
        case_images(images, 1)


def test_amp_says_that_onnx_runtime_runs_float32(ct, tmp_path, capsys):
    root, _, exported = ct
    images = one_test_case(root, tmp_path / "images")
    crop_cases(images, 32)  # one window: bf16 convolutions are slow on CPUs without bf16 kernels

    def notes(weights: Path) -> list[str]:
        argv = flags(output=tmp_path / weights.suffix[1:], **PREDICT) + ["--input", str(images), "--amp"]
        test_seg.main(argv + ["--trained_weights", str(weights)])
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: --amp")]

    onnx_notes = notes(exported / "model.onnx")
    assert any(note.startswith("note: --amp: model.onnx runs in float32 on ONNX Runtime") for note in onnx_notes)
    assert not any(note.startswith("note: --amp:") for note in notes(exported / "model.ts"))


def test_every_route_mirrors_along_the_card_axes_with_its_pairs(ct, tmp_path, capsys):
    root, weights, _ = ct
    images = one_test_case(root, tmp_path / "images")  # in an odd orientation (ASR): each route segments it 4 times
    mirrored = tmp_path / "mirrored.pth"
    shutil.copy(weights, mirrored)
    card = {**json.loads(Path(f"{weights}.json").read_text()), "mirror_axes": [0, 2], "lateral_pairs": [[1, 3]]}
    Path(f"{mirrored}.json").write_text(json.dumps(card))
    exported = tmp_path / "export"
    export.main(flags(trained_weights=mirrored, output=exported))
    readme = (exported / "bundle" / "docs" / "README.md").read_text()
    assert "one pass, unmirrored: this bundle does not mirror at test time" in " ".join(readme.split())
    capsys.readouterr()
    expected = segment([mirrored], images, tmp_path / "pth", ("--tta",))
    assert "(4 passes); left/right pairs swapped back: spleen (1) <-> liver (3)" in capsys.readouterr().out
    plain = segment([weights], images, tmp_path / "plain")
    differing = [(np.asarray(plain[n].dataobj) != np.asarray(expected[n].dataobj)).sum() for n in expected]
    assert sorted(plain) == sorted(expected) and sum(differing) > 0  # the mirrored passes count
    for name in ("model.ts", "model.onnx"):
        assert_same_segmentations(expected, segment([exported / name], images, tmp_path / name, ("--tta",)))
        assert f"--tta: {exported / name} mirrors along axes 0 (left-right), 2" in capsys.readouterr().out
    beside = exported / "model.ts.json"
    beside.write_text(json.dumps({**json.loads(beside.read_text()), "mirror_axes": [0, 1, 2]}))
    argv = flags(root=root, output=tmp_path / "out", trained_weights=exported / "model.ts")
    message = exit_message(test_seg.main, argv)
    assert "(its mirror_axes differ from the card inside it)" in message


def test_a_corrupt_export_or_a_wrong_card_is_refused_by_name(ct, tmp_path):
    root, _, exported = ct
    for name, what in (("model.ts", "not a readable TorchScript model"), ("model.onnx", "not a readable ONNX model")):
        broken = tmp_path / name
        broken.write_bytes((exported / name).read_bytes()[:5000])
        shutil.copy(exported / f"{name}.json", tmp_path / f"{name}.json")
        message = exit_message(test_seg.main, flags(root=root, output=tmp_path / "out", trained_weights=broken))
        assert f"--trained_weights {broken}: {what}" in message
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(exported / "model.ts", other / "model.ts")
    card = json.loads((exported / "model.ts.json").read_text())
    card["classes"] = ["background", "liver", "spleen", "kidney", "pancreas"]
    (other / "model.ts.json").write_text(json.dumps(card))
    message = exit_message(test_seg.main, flags(root=root, output=tmp_path / "out", trained_weights=other / "model.ts"))
    assert f"{other / 'model.ts.json'}: not the model card of {other / 'model.ts'} (its classes differ" in message
    (other / "model.ts.json").unlink()
    message = exit_message(test_seg.main, flags(root=root, output=tmp_path / "out", trained_weights=other / "model.ts"))
    assert "no model card beside it" in message and "model.ts.json" in message
    assert not (tmp_path / "out").exists()


def test_an_export_that_differs_is_not_written_and_is_named(ct, tmp_path, monkeypatch, capsys):
    _, weights, _ = ct
    exact = engine.export.onnx_runtime_network
    monkeypatch.setattr(engine.export, "onnx_runtime_network", lambda data: lambda x: exact(data)(x) * 1.01)
    output = tmp_path / "export"
    message = exit_message(export.main, flags(trained_weights=weights, output=output))
    assert message == "1"  # stopped, not a usage error
    stopped = capsys.readouterr().err
    assert "model.onnx: differs from the training-form network by 0.01 relative" in stopped
    assert "above 0.0001; nothing written" in stopped
    assert not output.exists() or not any(output.iterdir())


def test_export_needs_the_card_and_says_what_to_install(ct, tmp_path, monkeypatch):
    _, weights, exported = ct
    bare = tmp_path / "bare.pth"
    shutil.copy(weights, bare)
    message = exit_message(export.main, flags(trained_weights=bare, output=tmp_path / "out"))
    assert f"--trained_weights {bare}: no model card beside it (bare.pth.json)" in message
    message = exit_message(export.main, flags(trained_weights=weights, output=exported) + ["--formats", "torchscript"])
    assert "model.ts exists already" in message and "--overwrite" in message
    checkpoint = weights.parent / "checkpoint_last.pth"  # holds its card: no file beside it needed
    export.main(flags(trained_weights=checkpoint, output=tmp_path / "from_checkpoint") + ["--formats", "torchscript"])
    card = json.loads((tmp_path / "from_checkpoint" / "model.ts.json").read_text())
    assert card["export"]["from"] == str(checkpoint) and card["classes"][1:] == [
        "spleen",
        "kidney",
        "liver",
        "pancreas",
    ]

    def without_onnxruntime(name, *args):
        return None if name in ("onnxruntime", "openvino") else find_spec(name, *args)

    find_spec = engine.export.importlib.util.find_spec
    monkeypatch.setattr(engine.export.importlib.util, "find_spec", without_onnxruntime)
    message = exit_message(export.main, flags(trained_weights=weights, output=tmp_path / "out"))
    assert "--formats onnx needs onnxruntime (pip install -r requirements-deploy.txt)" in message
    root = ct[0]
    message = exit_message(
        test_seg.main, flags(root=root, output=tmp_path / "seg", trained_weights=exported / "model.onnx")
    )
    assert "on ONNX Runtime needs onnxruntime (pip install -r requirements-deploy.txt)" in message
    onnx_flags = flags(root=root, output=tmp_path / "seg", trained_weights=exported / "model.onnx", runtime="openvino")
    message = exit_message(test_seg.main, onnx_flags)
    assert "on OpenVINO needs openvino (pip install -r requirements-deploy.txt)" in message


def test_the_bundle_preprocesses_an_nnunet_ct_as_test_seg_does(tmp_path, monkeypatch):
    """nnU-Net's CT normalisation (ct_zscore) and the body crop, from the model card: the bundle's
    preprocessing chain gives test_seg.py's (and training's) input, voxel for voxel."""
    norm = {"scheme": "ct_zscore", "window": [-60.0, 100.0], "mean": 45.0, "std": 48.0}
    preprocessing = dict(channels=["CT"], normalization=[norm], spacing=[2.0, 2.0, 2.5])
    weights, _ = saved_with_card(tmp_path, "UNet", dict(channels=(4, 8, 8, 8, 8)), 32, 5, preprocessing)
    export.main(flags(trained_weights=weights, output=tmp_path / "export") + ["--formats", "bundle"])
    bundle = tmp_path / "export" / "bundle"
    images = tmp_path / "images"
    write_dataset(images, num_train=1, num_test=1, seed=5, layout="nnunet")
    (image,) = (images / "imagesTs").glob("*.nii.gz")
    card = json.loads(Path(f"{weights}.json").read_text())
    expected = build_transforms(load_dataset_config("flare").with_preprocessing(card), "test")({"image": str(image)})
    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    parser["bundle_root"] = str(bundle)
    monkeypatch.syspath_prepend(str(bundle))
    for name in [name for name in sys.modules if name.split(".")[0] == "scripts"]:
        monkeypatch.delitem(sys.modules, name)
    try:
        actual = parser.get_parsed_content("preprocessing")({"image": str(image)})
    finally:
        for name in [name for name in sys.modules if name.split(".")[0] == "scripts"]:
            del sys.modules[name]
    assert actual["image"].shape == expected["image"].shape
    assert torch.allclose(actual["image"].as_tensor(), expected["image"].as_tensor(), atol=1e-6)
    assert np.allclose(actual["image"].affine, expected["image"].affine)
    values = expected["image"].as_tensor()
    assert float(values.min()) == pytest.approx((-60 - 45) / 48, abs=1e-5)  # clipped, then standardised
    assert float(values.max()) == pytest.approx((100 - 45) / 48, abs=1e-5)
    readme = (bundle / "docs" / "README.md").read_text()
    assert "`ct_zscore`: clipped to the window, minus the mean, divided by the standard deviation" in readme


def test_a_two_channel_mri_model_segments_identically_through_its_bundle(tmp_path):
    """Per-channel files (nnU-Net's layout), z-scored over the non-zero region: the bundle groups and
    normalises them as the repository does."""
    root = tmp_path / "mri"
    write_dataset(root, num_train=2, num_test=2, seed=3, modality="mri", layout="nnunet")
    run = tmp_path / "run"
    training = flags(dataset=root / "dataset.json", output=run, max_iter=2, eval_step=2, lr=1e-2, fold=0, num_folds=2)
    main_train.main(training + flags(held_out="none", **TINY_RUN))
    weights = run / "best_metric_model.pth"
    card = json.loads(Path(f"{weights}.json").read_text())
    assert card["in_channels"] == 2 and {entry["scheme"] for entry in card["normalization"]} == {"zscore"}
    exported = tmp_path / "export"
    export.main(flags(trained_weights=weights, output=exported) + ["--formats", "bundle"])
    expected = segment([weights], root, tmp_path / "pth")
    assert len(expected) == 2
    run_bundle(exported / "bundle", root / "imagesTs", tmp_path / "bundle", cwd=tmp_path)
    assert_same_segmentations(expected, Segmentations(tmp_path / "bundle"))
    # As tolerant as test_seg.py: channel files whose affines differ by float noise, a 4D file named _0001.
    images, (first, second) = tmp_path / "odd", sorted({p.name[:11] for p in (root / "imagesTs").glob("*.nii.gz")})
    images.mkdir()
    shutil.copy(root / "imagesTs" / f"{first}_0000.nii.gz", images / f"{first}_0000.nii.gz")
    channel = nib.load(root / "imagesTs" / f"{first}_0001.nii.gz")
    noisy = channel.affine + 2e-6
    nib.save(nib.Nifti1Image(np.asarray(channel.dataobj), noisy, channel.header), images / f"{first}_0001.nii.gz")
    channels = [nib.load(root / "imagesTs" / f"{second}_{c:04d}.nii.gz") for c in (0, 1)]
    stacked = np.stack([np.asarray(c.dataobj) for c in channels], axis=-1)
    nib.save(nib.Nifti1Image(stacked, channels[0].affine), images / f"{second}_0001.nii.gz")
    argv = flags(output=tmp_path / "odd_pth", **PREDICT) + ["--input", str(images), "--trained_weights", str(weights)]
    test_seg.main(argv + ["--save_probabilities"])
    run_bundle(exported / "bundle", images, tmp_path / "odd_bundle", cwd=tmp_path)
    folder, expected = bad_inputs(tmp_path / "bad")["one_channel"]  # run as its README says: one line, no traceback
    command = [sys.executable, "-I", "-m", "monai.bundle", "run", "--bundle_root", str(exported / "bundle")]
    command += ["--config_file", str(exported / "bundle" / "configs" / "inference.json"), "--dataset_dir", str(folder)]
    completed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert completed.returncode == 1 and completed.stderr.rstrip().splitlines()[-1] == expected
    assert "Traceback" not in completed.stderr
    odd = Segmentations(tmp_path / "odd_pth")
    assert sorted(odd) == [f"{first}_seg.nii.gz", f"{second}_0001_seg.nii.gz"]
    assert_same_segmentations(odd, Segmentations(tmp_path / "odd_bundle"))
