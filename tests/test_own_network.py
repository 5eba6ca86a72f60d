"""A network of the user's own code (``--network file.py:Class``, ``--network_args``): trained, segmented,
exported without the file, rebuilt only from the unchanged file, and refused in one line where it cannot be
one; Rep3D through the scripts."""

import json
import textwrap

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_RUN, exit_message, flags, run_bundle

import export
import main_finetune
import main_train
import test_seg
from phantom import write_dataset

NETWORK_FILE = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    """A two-layer network: the smallest thing that segments."""

    def __init__(self, in_channels, out_channels, width=4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(in_channels, width, 3, padding=1), nn.ReLU())
        self.head = nn.Conv3d(width, out_channels, 1)

    def forward(self, x):
        return self.head(self.body(x))


class OtherNames(TinyNet):
    def __init__(self, in_chans, num_classes):
        super().__init__(in_chans, num_classes)


class HalfSize(TinyNet):
    def forward(self, x):
        return super().forward(x)[:, :, ::2, ::2, ::2]


class NotANetwork:
    def __init__(self, in_channels, out_channels):
        pass
'''
#: The shape flags of the tiny runs do not apply to a network of one's own.
RUN = {key: value for key, value in TINY_RUN.items() if key not in ("feat_size", "kernel_size", "hidden_size")}
#: Segmenting as the exported bundle does (no overlap between windows), so that every route is compared.
PREDICT = dict(device="cpu", overlap=0)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    write_dataset(root, num_train=2, num_val=1, num_test=1, seed=3)
    return root


def network_file(folder, text=NETWORK_FILE):
    path = folder / "my_network.py"
    path.write_text(textwrap.dedent(text))
    return path


def train(phantom, output, network, *extra):
    main_train.main(flags(root=phantom, output=output, max_iter=2, eval_step=2, network=network, **RUN) + list(extra))


def test_a_network_of_ones_own_trains_segments_exports_and_is_rebuilt_only_from_its_file(phantom, tmp_path):
    path = network_file(tmp_path)
    run = tmp_path / "run"
    train(phantom, run, f"{path}:TinyNet", "--network_args", '{"width": 6}')
    card = json.loads((run / "best_metric_model.pth.json").read_text())
    assert card["network"] == f"{path.resolve()}:TinyNet" and card["network_args"] == {"width": 6}
    plugin = card["network_plugin"]
    assert plugin["file"] == str(path.resolve()) and plugin["class"] == "TinyNet" and len(plugin["sha256"]) == 64
    weights = run / "best_metric_model.pth"
    exported = tmp_path / "exported"
    export.main(flags(trained_weights=weights, output=exported) + ["--formats", "torchscript", "onnx", "bundle"])
    test_seg.main(flags(root=phantom, output=tmp_path / "pth", trained_weights=weights, **PREDICT))
    predicted = {p.name: np.asarray(nib.load(p).dataobj) for p in (tmp_path / "pth").glob("*_seg.nii.gz")}
    assert len(predicted) == 1

    original = path.read_text()
    path.write_text(original + "\n# edited\n")
    message = exit_message(test_seg.main, flags(root=phantom, output=tmp_path / "x", trained_weights=weights))
    assert f"the network file {path.resolve()} changed since the model was trained" in message
    assert "\n" not in message and not (tmp_path / "x").exists()
    path.unlink()
    message = exit_message(test_seg.main, flags(root=phantom, output=tmp_path / "x", trained_weights=weights))
    assert f"the network file {path.resolve()} does not exist" in message

    # the exports carry no dependency on the file: they segment as the weights did with the file gone
    for model in ("model.ts", "model.onnx"):
        test_seg.main(flags(root=phantom, output=tmp_path / model, trained_weights=exported / model, **PREDICT))
    run_bundle(exported / "bundle", phantom / "imagesTs", tmp_path / "bundle", cwd=tmp_path)
    for route in ("model.ts", "model.onnx", "bundle"):
        for name, labels in predicted.items():
            np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / route / name).dataobj), labels, err_msg=route)


def test_fine_tuning_maps_the_head_of_ones_own_network_by_class_name(phantom, tmp_path):
    path = network_file(tmp_path)
    run, tuned = tmp_path / "run", tmp_path / "tuned"
    train(phantom, run, f"{path}:TinyNet")
    lateral = tmp_path / "lateral"
    write_dataset(lateral, num_train=2, num_val=1, num_test=0, seed=4, lateral=True)
    main_finetune.main(
        flags(root=lateral, output=tuned, dataset=lateral / "dataset.json", network=f"{path}:TinyNet")
        + flags(pretrained_weights=run / "best_metric_model.pth", max_iter=1, eval_step=1, lr=1e-3, **RUN)
    )
    old, new = (torch.load(r / "best_metric_model.pth", weights_only=True) for r in (run, tuned))
    assert new["head.weight"].shape[0] == 6 and old["head.weight"].shape[0] == 5
    card = json.loads((tuned / "best_metric_model.pth.json").read_text())
    # the head is the last convolution: each side's kidney starts from the old kidney output
    assert "right kidney<-kidney" in card["pretrained"]["head"] and card["network_plugin"]["class"] == "TinyNet"
    torch.testing.assert_close(new["head.weight"][2], old["head.weight"][2], atol=0.05, rtol=0)  # one step on


def test_channel_argument_names_and_a_module_path(phantom, tmp_path, monkeypatch):
    network_file(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    names = '{"in_channels_arg": "in_chans", "out_channels_arg": "num_classes"}'
    train(phantom, run, "my_network:OtherNames", "--network_args", names)
    card = json.loads((run / "best_metric_model.pth.json").read_text())
    assert card["network_plugin"]["module"] == "my_network" and card["network_args"] == {}
    assert card["network_plugin"]["in_channels_arg"] == "in_chans"
    test_seg.main(flags(root=phantom, output=tmp_path / "pth", trained_weights=run / "best_metric_model.pth"))
    assert len(list((tmp_path / "pth").glob("*_seg.nii.gz"))) == 1


@pytest.mark.parametrize(
    ("target", "network_args", "message"),
    [
        ("NotANetwork", None, "NotANetwork in {path} is not an nn.Module (a torch.nn.Module subclass)"),
        (
            "OtherNames",
            None,
            "the constructor of OtherNames in {path} takes no 'in_channels' (it takes: in_chans, num_classes); name "
            "its channel arguments with --network_args",
        ),
        ("Missing", None, "the network file {path} has no 'Missing'"),
        (
            "HalfSize",
            None,
            "its output for one 32x32x32 patch is (1, 5, 16, 16, 16), expected (1, 5, 32, 32, 32) (the classes at "
            "the input's size)",
        ),
        ("TinyNet", '{"depth": 3}', "takes no argument 'depth'; it accepts: width"),
        ("TinyNet", "[1]", "--network_args [1]: expected a JSON object"),
    ],
)
def test_what_cannot_be_a_network_is_refused_in_one_line_before_training(
    phantom, tmp_path, target, network_args, message
):
    path = network_file(tmp_path).resolve()
    extra = ["--network_args", network_args] if network_args else []
    argv = flags(root=phantom, output=tmp_path / "run", max_iter=2, network=f"{path}:{target}", **RUN) + extra
    error = exit_message(main_train.main, argv)
    assert message.format(path=path) in error and "\n" not in error
    assert not (tmp_path / "run" / "best_metric_model.pth").exists()


def test_a_missing_file_and_registry_flags_are_named(phantom, tmp_path):
    argv = flags(root=phantom, output=tmp_path / "run", network=f"{tmp_path}/nothing.py:Net", **RUN)
    assert f"the network file {tmp_path}/nothing.py does not exist" in exit_message(main_train.main, argv)
    path = network_file(tmp_path)
    argv = flags(root=phantom, output=tmp_path / "run", network=f"{path}:TinyNet", feat_size="4,8,16,32")
    assert "--feat_size does not apply to" in exit_message(main_train.main, argv + flags(**RUN))
    argv = flags(root=phantom, output=tmp_path / "run", network="REPUXNET", **TINY_RUN)
    message = exit_message(main_train.main, argv + ["--network_args", '{"in_channels_arg": "x"}'])
    assert "in_channels_arg in --network_args is for a network of your own" in message


def test_rep3d_trains_and_segments_from_the_scripts(phantom, tmp_path):
    run = tmp_path / "rep3d"
    main_train.main(flags(root=phantom, output=run, max_iter=2, eval_step=2, network="REP3D", **TINY_RUN))
    card = json.loads((run / "best_metric_model.pth.json").read_text())
    assert card["network"] == "REP3D" and card["network_plugin"] is None
    test_seg.main(flags(root=phantom, output=tmp_path / "pth", trained_weights=run / "best_metric_model.pth"))
    assert len(list((tmp_path / "pth").glob("*_seg.nii.gz"))) == 1


def test_model_stats_lists_a_network_of_ones_own(tmp_path, capsys):
    import model_stats

    path = network_file(tmp_path)
    model_stats.main([f"{path}:TinyNet", "REP3D", "--network_args", '{"width": 6}'])
    rows = capsys.readouterr().out.splitlines()
    assert rows[2].startswith(f"| {path}:TinyNet (width=6) |") and rows[3].startswith("| REP3D | 65.83 |")
    stats = model_stats.network_stats(f"{path.resolve()}:TinyNet", 32, width=6)
    assert round(stats["params_m"] * 1e6) == (1 * 6 * 27 + 6) + (6 * 5 + 5)  # two convolutions, 5 classes
    assert abs(stats["macs_g"] * 1e9 - 32**3 * (6 * 27 + 6 * 5)) < 1
