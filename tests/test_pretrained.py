"""Pretrained weights into another dataset's network (engine.pretrained): the report, the output head
mapped by class name, other input channels, and the refusals."""

import re

import pytest
import torch
from conftest import SMALL_NETWORKS, TINY

from engine.common import UsageError
from engine.pretrained import ChannelInit, load_pretrained, map_outputs_by_name, parse_channel_init
from networks import build_network
from networks.registry import get_spec

FLARE = ["background", "spleen", "kidney", "liver", "pancreas"]
#: A fine-tuning dataset: two sides of FLARE's kidney, a renamed liver, a new class, in another order.
NEW = ["Background", "right kidney", "Kidney_L", "aorta", "LIVER", "spleen"]
SOURCES = [0, 2, 2, None, 3, 1]


def test_outputs_map_by_name_and_by_name_without_side():
    assert map_outputs_by_name(NEW, FLARE) == SOURCES
    assert map_outputs_by_name(["background", "left adrenal gland"], FLARE) == [0, None]
    # an old sided class keeps its side: a new right kidney does not start from an old left kidney
    assert map_outputs_by_name(["right kidney", "kidney"], ["background", "left kidney"]) == [None, None]


def _tiny(in_channels: int, outputs: int) -> torch.nn.Module:
    return build_network("REPUXNET", in_channels, outputs, **TINY).eval()


def test_report_mapped_head_adapted_stem_unused_and_old_probabilities_kept():
    old = _tiny(1, len(FLARE))
    state = {**old.state_dict(), "extra.weight": torch.ones(3)}
    new = _tiny(2, len(NEW))
    report = load_pretrained(
        new,
        state,
        "REPUXNET",
        "--pretrained_weights old.pth",
        head="mapped",
        old_outputs=FLARE,
        new_outputs=NEW,
        channel_init=ChannelInit("repeat"),
        old_channels=["CT"],
        new_channels=["T1", "T2"],
    )
    repeated = "input channels 1 -> 2: each the old kernels' sum / 2"
    mapped = "output channels mapped by name"
    # the input reaches the stem and, as in the published network, encoder1's residual block
    assert report.adapted == {
        "repuxnet_3d.downsample_layers.0.0.weight": repeated,
        "encoder1.layer.conv1.conv.weight": repeated,
        "encoder1.layer.conv3.conv.weight": repeated,
        "out.conv.conv.weight": mapped,
        "out.conv.conv.bias": mapped,
    }
    assert report.unused == ["extra.weight"] and report.fresh == []
    assert len(report.loaded) == len(old.state_dict()) - 5
    assert "right kidney<-kidney" in report.head_mapping and "fresh: aorta" in report.head_mapping
    lines = report.lines("old.pth")
    assert lines[0] == "Loaded old.pth:" and any(line.startswith("  unused: 1 (extra.weight)") for line in lines)
    # at step 0 the new model, given the old image in both channels, gives the old logits of each mapped class,
    # so its probabilities over the mapped classes are the old model's over their sources
    image = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        old_logits, new_logits = old(image), new(image.repeat(1, 2, 1, 1, 1))
    for i, j in enumerate(SOURCES):
        if j is not None:
            torch.testing.assert_close(new_logits[:, i], old_logits[:, j], rtol=1e-4, atol=1e-4)


def test_fresh_head_and_a_head_without_names_start_fresh():
    old = _tiny(1, len(FLARE))
    for head, names in (("fresh", FLARE), ("mapped", None)):
        new = _tiny(1, len(NEW))
        initial = new.out.conv.conv.weight.detach().clone()
        report = load_pretrained(
            new, old.state_dict(), "REPUXNET", "w", head=head, old_outputs=names, new_outputs=NEW,
            old_channels=["CT"], new_channels=["CT"],
        )  # fmt: skip
        assert report.fresh == ["out.conv.conv.weight", "out.conv.conv.bias"] and not report.adapted
        assert torch.equal(new.out.conv.conv.weight, initial)
        assert report.head_mapping.startswith("fresh")


def test_refusals_name_the_key_or_the_flag():
    old = _tiny(1, len(FLARE)).state_dict()
    kwargs = dict(old_channels=["CT"], new_channels=["CT"])
    key = "repuxnet_3d.downsample_layers.1.0.weight"
    other = {**old, key: torch.zeros(3)}
    with pytest.raises(UsageError, match=rf"w: does not fit REPUXNET .*{re.escape(key)} \(3,\)"):
        load_pretrained(_tiny(1, 5), other, "REPUXNET", "w", **kwargs)
    missing = {k: v for k, v in old.items() if k != key}
    with pytest.raises(UsageError, match=rf"missing {re.escape(key)}"):
        load_pretrained(_tiny(1, 5), missing, "REPUXNET", "w", **kwargs)
    with pytest.raises(UsageError, match=r"1 input channel \(CT\); the dataset has 2 \(T1, T2\): pass --channel_init"):
        load_pretrained(_tiny(2, 5), old, "REPUXNET", "w", old_channels=["CT"], new_channels=["T1", "T2"])
    with pytest.raises(UsageError, match="does not fit"):  # another class count without fine-tuning's head rule
        load_pretrained(_tiny(1, 6), old, "REPUXNET", "w", **kwargs)


def test_channel_init_copy_by_name_or_number_and_its_refusals():
    rule = parse_channel_init("copy: T2=CT, T1=0", ["CT"], ["T1", "T2"])
    assert rule == ChannelInit("copy", (0, 0))
    kernel = torch.arange(2 * 3 * 2).float().reshape(2, 3, 2)
    copied = parse_channel_init("copy:a=c,b=a", ["a", "b", "c"], ["a", "b"]).adapt(kernel, 2)
    assert torch.equal(copied, kernel[:, [2, 0]])
    for text, message in (
        ("mean", "expected repeat or copy"),
        ("copy:T1=CT", "no source for the dataset's channel(s) T2"),
        ("copy:T1=CT,T2=PET", "'T2=PET' is not NEW=OLD"),
        ("copy:T1=CT,T1=CT", "channel 'T1' is given twice"),
        ("copy:T1=CT,T2=3", "'T2=3' is not NEW=OLD"),
    ):
        with pytest.raises(UsageError, match=f"--channel_init .*{re.escape(message)}"):
            parse_channel_init(text, ["CT"], ["T1", "T2"])


#: Networks whose every input-reading layer is a convolution; UNETR's patch embedding is a linear layer
#: over flattened patches ("perceptron"), which ``repeat`` does not adapt: it is refused, naming the key.
CONVOLUTION_STEMS = ["REPUXNET", "3DUXNET", "REP3D", *(name for name in SMALL_NETWORKS if name != "UNETR")]


@pytest.mark.parametrize("name", CONVOLUTION_STEMS)
def test_repeat_keeps_the_output_on_duplicated_channels_for_every_convolution_stem(name):
    widths, roi = SMALL_NETWORKS.get(name, (TINY, 32))
    spec = get_spec(name)
    size = {spec.flag_args["roi_size"]: roi} if "roi_size" in spec.flag_args else {}
    old = build_network(name, 1, 3, **widths, **size).eval()
    new = build_network(name, 3, 3, **widths, **size).eval()
    report = load_pretrained(
        new, old.state_dict(), name, "w", channel_init=ChannelInit("repeat"), old_channels=["CT"],
        new_channels=["a", "b", "c"],
    )  # fmt: skip
    assert report.adapted and not report.fresh
    image = torch.randn(1, 1, roi, roi, roi)
    with torch.no_grad():
        torch.testing.assert_close(new(image.repeat(1, 3, 1, 1, 1)), old(image), rtol=1e-3, atol=1e-4)


def test_unetr_linear_patch_embedding_is_refused():
    widths, roi = SMALL_NETWORKS["UNETR"]
    old = build_network("UNETR", 1, 3, **widths, img_size=(roi,) * 3)
    new = build_network("UNETR", 2, 3, **widths, img_size=(roi,) * 3)
    with pytest.raises(UsageError, match=r"does not fit UNETR .*patch_embedding"):
        load_pretrained(
            new, old.state_dict(), "UNETR", "w", channel_init=ChannelInit("repeat"), old_channels=["CT"],
            new_channels=["a", "b"],
        )  # fmt: skip
