"""Parameters and multiply-accumulates (MACs) of registry networks, beside the paper's numbers.

    python model_stats.py                       # every registry network at 96^3, 5 classes
    python model_stats.py REPUXNET 3DUXNET --size 128 --out_channels 16
    python model_stats.py REP3D my_network.py:TinyNet --network_args '{"width": 16}'   # a network of your own

Nothing is computed: the network runs on PyTorch's meta device (shapes only) under its FLOP counter,
which counts convolutions and matrix products (1 MAC = 2 FLOPs). Large-kernel convolutions are counted
in full, as ``nn.Conv3d`` computes them (the published convention; our FFT path does less work).
The paper's FLOPs column was made with another counter, so only the parameters compare one to one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from networks import available_networks, build_network, canonical_name, overrides_from_flags
from networks.dwconv import full_kernels
from networks.plugins import is_plugin, load_plugin, parse_network_args

#: The paper's table (the published README): parameters (M) and FLOPs (G) at 96^3, by registry name and
#: arguments; Rep3D's parameters from leeh43/Rep3D's README (no FLOPs given there).
PAPER = {
    ("REPUXNET", ()): (65.8, 757.4),
    ("3DUXNET", ()): (53.0, 639.4),
    ("3DUXNET", (("ks", 21),)): (65.9, 757.6),
    ("SwinUNETR", ()): (62.2, 328.4),
    ("UNETR", ()): (92.8, 82.6),
    ("nnFormer", ()): (149.3, 240.2),
    ("TransBTS", ()): (31.6, 110.4),
    ("nnUNet", ()): (31.2, 743.3),
    ("REP3D", ()): (66.0, None),
}


def network_stats(name: str, size: int = 96, in_channels: int = 1, out_channels: int = 5, **overrides) -> dict:
    """Parameters (millions) and MACs (billions) of one registry network for a ``1 x C x size^3`` input."""
    overrides = {**overrides_from_flags(name, roi_size=(size,) * 3), **overrides}  # networks built for one size
    try:
        with torch.device("meta"):
            model = build_network(name, in_channels, out_channels, **overrides)
    except (RuntimeError, NotImplementedError):  # constructors that read values (MONAI's SwinUNETR)
        model = build_network(name, in_channels, out_channels, **overrides).to("meta")
    parameters = sum(p.numel() for p in model.parameters())
    model.eval()
    with torch.no_grad(), full_kernels(), FlopCounterMode(display=False) as counter:
        model(torch.empty(1, in_channels, size, size, size, device="meta"))
    return {"params_m": parameters / 1e6, "macs_g": counter.get_total_flops() / 2e9}


def table(rows: Sequence[tuple[str, dict, dict, tuple | None]], size: int) -> str:
    lines = [
        f"| network | parameters (M) | MACs at {size}^3 (G) | paper: parameters (M) | paper: FLOPs (G) |",
        "|---|---|---|---|---|",
    ]
    for label, _, stats, paper in rows:
        paper_cells = " | ".join("-" if v is None else f"{v:.1f}" for v in (paper or (None, None)))
        lines.append(f"| {label} | {stats['params_m']:.2f} | {stats['macs_g']:.1f} | {paper_cells} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "networks",
        nargs="*",
        help=f"registry names (default: all of {', '.join(available_networks())}) or networks of your own "
        "(path/to/file.py:ClassName)",
    )
    parser.add_argument("--size", type=int, default=96, help="input edge length (default 96)")
    parser.add_argument("--out_channels", type=int, default=5, help="classes (default 5, FLARE)")
    parser.add_argument(
        "--network_args", default=None, help="constructor arguments (JSON) of the networks of your own listed"
    )
    args = parser.parse_args(argv)
    try:
        network_args, channel_args = parse_network_args(args.network_args)
    except ValueError as error:
        sys.exit(f"error: {error}")
    requested, labels = [], {}
    for name in args.networks:
        if is_plugin(name):
            try:
                registered, _ = load_plugin(name, **channel_args)
            except ValueError as error:
                sys.exit(f"error: {name}: {error}")
            labels[registered] = name
            requested.append((registered, dict(network_args)))
        else:
            requested.append((name, {}))
    requested = requested or [(n, {}) for n in available_networks()]
    if not args.networks:  # the paper's "3D UX-Net (k=21)" row
        index = [n for n, _ in requested].index("3DUXNET") + 1
        requested.insert(index, ("3DUXNET", {"ks": 21}))
    rows = []
    for name, overrides in requested:
        try:
            stats = network_stats(name, args.size, out_channels=args.out_channels, **overrides)
        except ValueError as error:
            sys.exit(f"error: {error}")
        key = (canonical_name(name), tuple(sorted(overrides.items())))
        label = labels.get(name, canonical_name(name)) + "".join(f" ({k}={v})" for k, v in overrides.items())
        paper = PAPER.get(key) if args.size == 96 and args.out_channels == 5 else None
        rows.append((label, overrides, stats, paper))
    print(table(rows, args.size))


if __name__ == "__main__":
    main()
