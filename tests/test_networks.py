"""Registry, published import paths, parameter counts, shapes and state-dict layout."""

import pytest
import torch
from conftest import TINY
from torch import nn

import networks
from networks import available_networks, build_network

#: An nnFormer small enough for CPU tests at 32^3.
NNFORMER_TINY = dict(crop_size=32, embed_dim=12, num_heads=(3, 3, 3, 3))


def count_parameters(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


# out_chans=5, counted with the published code (README.md's table beside the paper's numbers).
@pytest.mark.parametrize(
    "name, overrides, millions",
    [
        ("REPUXNET", {}, 65.83),
        ("3DUXNET", {}, 53.01),
        ("3DUXNET", {"ks": 21}, 65.85),
        ("UNETR", {}, 92.80),
    ],
)
def test_full_size_parameter_counts(name, overrides, millions):
    with torch.device("meta"):  # counts shapes without allocating or running anything
        model = build_network(name, 1, 5, **overrides)
    assert round(count_parameters(model), 2) == millions


def test_swinunetr_parameter_count():
    # MONAI's SwinUNETR computes its drop-path schedule with .item(), so it cannot be built on meta
    assert round(count_parameters(build_network("SwinUNETR", 1, 5)), 2) == 62.19


def test_registry_names_and_published_import_paths():
    assert available_networks()[:4] == ["REPUXNET", "3DUXNET", "UNETR", "SwinUNETR"]
    from networks.RepUXNet_3D.network_backbone import REPUXNET
    from networks.UXNet_3D.network_backbone import UXNET

    assert type(build_network("REPUXNET", 1, 2, **TINY)) is REPUXNET
    assert type(build_network("3dUXNet", 1, 2, **TINY)) is UXNET
    published_defaults = REPUXNET()
    assert (published_defaults.in_chans, published_defaults.out_chans, published_defaults.ks) == (1, 13, 21)
    assert published_defaults.feat_size == (48, 96, 192, 384) and published_defaults.a == 1
    with torch.device("meta"):
        uxnet = UXNET()
    depthwise = [m.kernel_size for m in uxnet.modules() if isinstance(m, nn.Conv3d) and m.groups == m.in_channels > 1]
    depthwise = [k for k in depthwise if k != (1, 1, 1)]  # the grouped pointwise convolutions aside
    assert len(depthwise) == 8 and set(depthwise) == {(7, 7, 7)}  # 3D UX-Net's published kernel: 7


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown network 'NOPE'; available: REPUXNET, 3DUXNET"):
        build_network("NOPE", 1, 2)
    with pytest.raises(ValueError, match=r"network 'REPUXNET' takes no argument 'kernel'.*accepts: depths"):
        build_network("REPUXNET", 1, 2, kernel=5)
    with pytest.raises(ValueError, match="already registered"):
        networks.register_network("repuxnet", networks.NetworkSpec(nn.Identity))


@pytest.mark.parametrize("name", ["REPUXNET", "3DUXNET"])
def test_ux_family_non_cubic_output_shape_and_head_width(name):
    model = build_network(name, 2, 3, depths=(1, 1, 1, 1), feat_size=(8, 8, 16, 16), hidden_size=16, ks=3)
    assert model.out.conv.conv.in_channels == 8  # the head takes feat_size[0], not a hard-coded 48
    out = model(torch.randn(2, 2, 32, 48, 64))
    assert out.shape == (2, 3, 32, 48, 64)


@pytest.mark.parametrize("name", ["REPUXNET", "3DUXNET"])
def test_ux_family_rejects_inputs_that_are_not_multiples_of_16(name):
    model = build_network(name, 1, 2, **TINY)
    with pytest.raises(ValueError, match=r"multiples of 16, got \(1, 1, 32, 32, 40\)"):
        model(torch.randn(1, 1, 32, 32, 40))


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("REPUXNET", dict(ks=4), "ks"),
        ("3DUXNET", dict(ks=0), "ks"),
        ("REPUXNET", dict(feat_size=(8, 16, 32)), "feat_size"),
        ("REPUXNET", dict(depths=(1, 0, 1, 1)), "depths"),
        ("REPUXNET", dict(drop_path_rate=0.1), "drop_path_rate"),
        ("REPUXNET", dict(a=0.0), "alpha"),
        ("3DUXNET", dict(drop_path_rate=1.5), "drop_path_rate"),
        ("REPUXNET", dict(spatial_dims=2), "spatial_dims"),
        ("REPUXNET", dict(hidden_size=0), "hidden_size"),
    ],
)
def test_constructor_argument_checks(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        build_network(name, 1, 2, **{**TINY, **overrides})


def expected_encoder_keys(prefix, depths, block_keys):
    keys = {f"{prefix}.downsample_layers.0.0.{p}" for p in ("weight", "bias")}
    keys |= {f"{prefix}.downsample_layers.0.1.{p}" for p in ("weight", "bias")}
    for i in (1, 2, 3):
        keys |= {f"{prefix}.downsample_layers.{i}.{j}.{p}" for j in (0, 1) for p in ("weight", "bias")}
    for s, depth in enumerate(depths):
        keys |= {f"{prefix}.stages.{s}.{b}.{k}" for b in range(depth) for k in block_keys}
        keys |= {f"{prefix}.norm{s}.{p}" for p in ("weight", "bias")}
    return keys


def test_repuxnet_state_dict_layout():
    model = build_network("REPUXNET", 1, 5, depths=(2, 1, 1, 2), feat_size=(4, 8, 16, 32), hidden_size=32, ks=5)
    state = model.state_dict()
    block = [
        "dwconv.weight",
        "dwconv.bias",
        "norm.weight",
        "norm.bias",
        "norm.running_mean",
        "norm.running_var",
        "norm.num_batches_tracked",
    ]
    encoder = {k for k in state if k.startswith("repuxnet_3d.")}
    assert encoder == expected_encoder_keys("repuxnet_3d", (2, 1, 1, 2), block)
    assert state["repuxnet_3d.stages.0.0.dwconv.weight"].shape == (4, 1, 5, 5, 5)
    assert state["repuxnet_3d.stages.3.1.dwconv.weight"].shape == (32, 1, 5, 5, 5)
    assert state["repuxnet_3d.downsample_layers.0.0.weight"].shape == (4, 1, 7, 7, 7)
    assert state["repuxnet_3d.downsample_layers.1.1.weight"].shape == (8, 4, 2, 2, 2)
    decoder_prefixes = {k.split(".")[0] for k in state} - {"repuxnet_3d"}
    assert decoder_prefixes == {f"encoder{i}" for i in range(1, 6)} | {f"decoder{i}" for i in range(1, 6)} | {"out"}
    assert state["out.conv.conv.weight"].shape == (5, 4, 1, 1, 1)
    # the deploy network, the ablation and the training network share one layout
    for variant in (dict(deploy=True), dict(bfr=False)):
        other = build_network(
            "REPUXNET", 1, 5, depths=(2, 1, 1, 2), feat_size=(4, 8, 16, 32), hidden_size=32, ks=5, **variant
        )
        assert {k: v.shape for k, v in other.state_dict().items()} == {k: v.shape for k, v in state.items()}


def test_uxnet_state_dict_layout():
    model = build_network("3DUXNET", 1, 5, **TINY)
    state = model.state_dict()
    block = [
        "gamma",
        "dwconv.weight",
        "dwconv.bias",
        "norm.weight",
        "norm.bias",
        "pwconv1.weight",
        "pwconv1.bias",
        "pwconv2.weight",
        "pwconv2.bias",
    ]
    assert {k for k in state if k.startswith("uxnet_3d.")} == expected_encoder_keys("uxnet_3d", (1, 1, 1, 1), block)
    assert state["uxnet_3d.stages.0.0.pwconv1.weight"].shape == (16, 1, 1, 1, 1)  # grouped, as published
    assert state["uxnet_3d.stages.0.0.pwconv2.weight"].shape == (4, 4, 1, 1, 1)
    assert state["uxnet_3d.stages.1.0.dwconv.weight"].shape == (8, 1, 5, 5, 5)


def test_uxnet_block_is_residual_with_layer_scale():
    model = build_network("3DUXNET", 1, 2, **TINY).eval()
    block = model.uxnet_3d.stages[0][0]
    x = torch.randn(1, 4, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x, rtol=0, atol=1e-4)  # gamma = 1e-6 at initialisation
        block.gamma.fill_(1.0)
        assert (block(x) - x).abs().max() > 1e-2


def test_uxnet_drop_path_trains():
    model = build_network("3DUXNET", 1, 2, **TINY, drop_path_rate=0.2).train()
    rates = [
        block.drop_path.drop_prob
        for stage in model.uxnet_3d.stages
        for block in stage
        if not isinstance(block.drop_path, nn.Identity)
    ]
    assert rates == pytest.approx([0.2 / 3, 0.4 / 3, 0.2])
    model(torch.randn(1, 1, 32, 32, 32)).mean().backward()


@pytest.mark.parametrize(
    "name, overrides, size",
    [
        ("UNETR", dict(img_size=(32, 32, 32), feature_size=4, hidden_size=48, mlp_dim=96, num_heads=4), (32, 32, 32)),
        ("SwinUNETR", dict(feature_size=12), (64, 32, 64)),  # its deepest map is 1/32 of the input
    ],
)
def test_monai_networks_forward(name, overrides, size):
    model = build_network(name, 1, 3, **overrides)
    assert model(torch.randn(1, 1, *size)).shape == (1, 3, *size)


def test_unetr_uses_the_published_configuration():
    with torch.device("meta"):
        model = build_network("UNETR", 1, 5)
    assert model.vit.patch_embedding.proj_type == "perceptron"
    assert len(model.vit.blocks) == 12 and model.vit.blocks[0].attn.num_heads == 12
    assert model.vit.blocks[0].mlp.linear1.out_features == 3072


@pytest.mark.parametrize(
    "name, overrides, size",
    [
        ("nnUNet", dict(filters=[4, 8, 8, 8, 8, 8]), 64),  # its deepest map is 1/32 of the input
        ("SegResNet", dict(init_filters=8), 32),
        ("UNet", dict(channels=(4, 8, 8, 8, 8)), 32),
        ("TransBTS", dict(img_size=32, embedding_dim=32, num_heads=4, hidden_dim=64, base_channels=4), 32),
        ("nnFormer", NNFORMER_TINY, 32),
    ],
)
def test_added_networks_forward_head_and_state_dict(name, overrides, size):
    from networks import replace_head

    model = build_network(name, 1, 5, **overrides)
    x = torch.randn(1, 1, size, size, size)
    assert model(x).shape == (1, 5, size, size, size)
    copy = build_network(name, 1, 5, **overrides)
    copy.load_state_dict(model.state_dict(), strict=True)
    model.eval(), copy.eval()
    with torch.no_grad():
        torch.testing.assert_close(copy(x), model(x))
    replace_head(model, name, 16)
    assert model(x).shape == (1, 16, size, size, size)


def test_comparison_network_parameter_counts():
    with torch.device("meta"):
        assert round(count_parameters(build_network("nnUNet", 1, 5)), 2) == 31.18
        transbts = count_parameters(build_network("TransBTS", 1, 5))
        nnformer = count_parameters(build_network("nnFormer", 1, 5))
    # the published code's 31.58 M less its two unused layers (a 128x512 linear and a LayerNorm)
    assert round(transbts, 2) == 31.51 and abs(transbts - 31.6) / 31.6 < 0.02  # the paper's table
    assert round(nnformer, 2) == 149.27 and abs(nnformer - 149.3) / 149.3 < 0.02  # the paper's table
    with torch.device("meta"):  # the class count follows the dataset (published defect 9)
        assert build_network("TransBTS", 1, 16).out.out_channels == 16
        assert build_network("nnFormer", 1, 16).out.out_channels == 16


def test_transbts_checks_its_input_size():
    model = build_network("TransBTS", 1, 2, img_size=32, embedding_dim=32, num_heads=4, hidden_dim=64)
    with pytest.raises(ValueError, match=r"built for inputs of \(32, 32, 32\), got \(48, 32, 32\)"):
        model(torch.randn(1, 1, 48, 32, 32))
    with pytest.raises(ValueError, match="img_size must be one or three multiples of 8"):
        build_network("TransBTS", 1, 2, img_size=30)


def test_model_stats_parameters_match_the_paper(capsys):
    """Parameters at 96^3, 5 classes, against the paper's table (rounded to 0.1 M there)."""
    import model_stats

    model_stats.main([])
    rows = {}
    for line in capsys.readouterr().out.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = (float(cells[1]), cells[3])
    for (name, overrides), (paper_params, _) in model_stats.PAPER.items():
        label = name + "".join(f" ({k}={v})" for k, v in overrides)
        assert rows[label][1] == f"{paper_params:.1f}"  # the paper's column beside ours
        if name != "REP3D":  # below
            assert abs(rows[label][0] - paper_params) <= 0.1, label
    # Rep3D's README says 66.0 M (65.8 M for its fixed prior): its published layout is RepUX-Net's without the
    # depthwise biases, plus a generator of two 1->1 7^3 convolutions and two normalisations per block
    biases = 2 * (48 + 96 + 192 + 384)
    generators = 8 * (2 * (7**3 + 1) + 2 * 2)
    counts = {name: round(model_stats.network_stats(name)["params_m"] * 1e6) for name in ("REP3D", "REPUXNET")}
    assert counts["REP3D"] == counts["REPUXNET"] - biases + generators


def test_model_stats_counts_the_large_kernels_in_full():
    """3D UX-Net at kernel 21 minus kernel 7: exactly the extra multiply-accumulates of its 8 depthwise
    convolutions (2 blocks per stage; 48, 96, 192, 384 channels on 48^3, 24^3, 12^3, 6^3 maps)."""
    from model_stats import network_stats

    extra = network_stats("3DUXNET", ks=21)["macs_g"] - network_stats("3DUXNET")["macs_g"]
    per_tap = sum(2 * channels * edge**3 for channels, edge in ((48, 48), (96, 24), (192, 12), (384, 6)))
    assert extra * 1e9 == pytest.approx(per_tap * (21**3 - 7**3), rel=1e-9)


def test_nnformer_published_configuration():
    from networks.nnFormer.nnformer import nnFormer

    with torch.device("meta"):
        model = build_network("nnFormer", 1, 5)
    assert type(model) is nnFormer and model.crop_size == (96, 96, 96)
    # tokens of 2x4x4 voxels: stage maps 48x24x24 .. 6x3x3; a window at least the smallest side shrinks to it
    assert [(s.resolution, s.window, s.shift) for s in model.encoder] == [
        ((48, 24, 24), 4, 2), ((24, 12, 12), 4, 2), ((12, 6, 6), 6, 0), ((6, 3, 3), 3, 0)
    ]  # fmt: skip
    # the decoder reads the encoder's lists reversed without the deepest entry: windows 8, 4, 4, heads 24, 12, 6
    assert [(s.resolution, s.window) for s in reversed(model.decoder)] == [
        ((12, 6, 6), 6),
        ((24, 12, 12), 4),
        ((48, 24, 24), 4),
    ]
    heads = [s.blocks[0].attn.num_heads for s in reversed(model.decoder)]
    assert heads == [24, 12, 6] and all(len(s.blocks) == 2 for s in model.decoder)
    assert [s.blocks[0].attn.cross for s in model.decoder] == [True] * 3
    assert model.out.kernel_size == model.out.stride == (2, 4, 4)


def test_nnformer_position_bias_index_is_one_entry_per_offset():
    """Pairs with the same relative offset share a bias entry and different offsets never do (the
    reference implementation's index formula merged distinct offsets)."""
    from networks.nnFormer.nnformer import relative_position_index

    window = 4
    index = relative_position_index(window)
    grid = torch.stack(torch.meshgrid(*[torch.arange(window)] * 3, indexing="ij")).flatten(1).T
    offsets = grid[:, None, :] - grid[None, :, :]
    by_offset = {}
    for offset, entry in zip(offsets.reshape(-1, 3).tolist(), index.flatten().tolist(), strict=True):
        assert by_offset.setdefault(tuple(offset), entry) == entry
    assert len(set(by_offset.values())) == len(by_offset) == (2 * window - 1) ** 3
    assert index.min() == 0 and index.max() == (2 * window - 1) ** 3 - 1


def explicit_window_attention(attention, queries, keys_values):
    """One window's multi-head attention written out (softmax of scaled products plus the position bias)."""
    n, c = queries.shape
    heads = attention.num_heads
    if attention.cross:
        q = queries
        k, v = attention.kv(keys_values).split(c, dim=-1)
    else:
        q, k, v = attention.qkv(queries).split(c, dim=-1)
    bias = attention.relative_position_bias_table[attention.relative_position_index.flatten()].view(n, n, heads)
    out = []
    for h in range(heads):
        columns = slice(h * c // heads, (h + 1) * c // heads)
        logits = q[:, columns] @ k[:, columns].T / (c // heads) ** 0.5 + bias[:, :, h]
        out.append(torch.softmax(logits, dim=-1) @ v[:, columns])
    return attention.proj(torch.cat(out, dim=-1))


@pytest.mark.parametrize("cross", [False, True])
def test_nnformer_attention_matches_the_written_out_formula(cross):
    from networks.nnFormer.nnformer import WindowAttention

    attention = WindowAttention(dim=8, window=2, num_heads=2, cross=cross).double()
    torch.nn.init.normal_(attention.relative_position_bias_table)  # make the bias matter
    x, context = torch.randn(3, 8, 8, dtype=torch.float64), torch.randn(3, 8, 8, dtype=torch.float64)
    got = attention(x, context=context if cross else None)
    for w in range(3):
        expected = explicit_window_attention(attention, x[w], context[w] if cross else x[w])
        torch.testing.assert_close(got[w], expected, rtol=1e-10, atol=1e-10)


def test_nnformer_shifted_windows_stay_inside_their_regions():
    """A token touches only its own window; after the cyclic shift, only the tokens of its region
    (the wrapped-around corner for token 0, not the tokens it was rolled next to)."""
    from networks.nnFormer.nnformer import Stage

    torch.manual_seed(0)
    stage = Stage(dim=6, resolution=(8, 8, 8), depth=2, num_heads=2, window=4, drop_path=(0.0, 0.0)).double()
    plain, shifted = stage.blocks
    assert (plain.shift, shifted.shift) == (0, 2)
    mask = stage.mask
    x = torch.randn(1, 512, 6, dtype=torch.float64)
    moved = x.clone()
    moved[0, 0] += torch.randn(6, dtype=torch.float64)  # token (0, 0, 0), not a constant (LayerNorm drops it)
    for block, reach in ((plain, 4), (shifted, 2)):
        change = (block(moved, mask) - block(x, mask)).abs().amax(-1).view(8, 8, 8)
        assert change[:reach, :reach, :reach].min() > 1e-6
        change[:reach, :reach, :reach] = 0
        assert change.max() < 1e-12


def test_nnformer_every_parameter_trains():
    """The skip attention, position biases and all stages receive gradients (no unused parameters,
    which DistributedDataParallel would reject). At 64^3 the deepest windows hold 2^3 tokens."""
    model = build_network("nnFormer", 1, 3, **{**NNFORMER_TINY, "crop_size": 64})
    model(torch.randn(1, 1, 64, 64, 64)).square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_nnformer_checks_its_arguments_and_input():
    model = build_network("nnFormer", 1, 2, **NNFORMER_TINY)
    with pytest.raises(ValueError, match=r"built for inputs of \(32, 32, 32\), got \(64, 32, 32\)"):
        model(torch.randn(1, 1, 64, 32, 32))
    with pytest.raises(ValueError, match=r"crop_size \(48, 48, 48\) must be a multiple of \(16, 32, 32\)"):
        build_network("nnFormer", 1, 2, crop_size=48)
    with pytest.raises(ValueError, match="one entry per stage"):
        build_network("nnFormer", 1, 2, num_heads=(6, 12, 24))
    with pytest.raises(ValueError, match="must be even multiples of num_heads"):
        build_network("nnFormer", 1, 2, embed_dim=20)


#: Every registry network at a size a CPU test runs in seconds, with the input edge it needs.
TINY_NETWORKS = {
    "REPUXNET": (TINY, 32),
    "3DUXNET": (TINY, 32),
    "REP3D": (TINY, 32),
    "UNETR": (dict(img_size=(32, 32, 32), feature_size=4, hidden_size=48, mlp_dim=96, num_heads=4), 32),
    "SwinUNETR": (dict(feature_size=12), 64),  # its deepest map is 1/32 of the input
    "nnFormer": (NNFORMER_TINY, 32),
    "TransBTS": (dict(img_size=32, embedding_dim=32, num_heads=4, hidden_dim=64, base_channels=4), 32),
    "nnUNet": (dict(filters=[4, 8, 8, 8, 8, 8]), 64),
    "SegResNet": (dict(init_filters=8), 32),
    "UNet": (dict(channels=(4, 8, 8, 8, 8)), 32),
}


def test_tiny_network_table_covers_the_registry():
    assert sorted(TINY_NETWORKS) == sorted(available_networks())


@pytest.mark.parametrize("name", sorted(TINY_NETWORKS))
def test_every_network_reads_every_input_channel(name):
    """Multi-channel datasets (MRI sequences): the second channel reaches the output."""
    overrides, size = TINY_NETWORKS[name]
    model = build_network(name, 2, 3, **overrides).eval()
    x = torch.randn(1, 2, size, size, size, requires_grad=True)
    output = model(x)
    assert output.shape == (1, 3, size, size, size)
    output.abs().sum().backward()
    assert x.grad[:, 1].abs().sum() > 0
