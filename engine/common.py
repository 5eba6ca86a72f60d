"""What training and inference share: errors, devices, precision, networks from flags, safe writes."""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from monai.utils import ensure_tuple_rep
from torch import nn

from atomic_files import replace_atomically
from networks import build_network, canonical_name, get_spec, overrides_from_flags
from networks.plugins import CHANNEL_ARGS, is_plugin, load_plugin, parse_network_args

__all__ = [
    "BEST_WEIGHTS",
    "FINAL_WEIGHTS",
    "LAST_CHECKPOINT",
    "NetworkChoice",
    "RunStopped",
    "UsageError",
    "as_json",
    "autocast_for",
    "check_amp",
    "check_network_output",
    "check_output_folder",
    "load_into",
    "load_trained",
    "load_with_card",
    "load_weights",
    "model_card_path",
    "network_from_flags",
    "parse_card",
    "roi_of",
    "save_torch",
    "select_device",
]

BEST_WEIGHTS = "best_metric_model.pth"
#: The weights of a run without validation (``--fold all``), written at its end.
FINAL_WEIGHTS = "final_model.pth"
LAST_CHECKPOINT = "checkpoint_last.pth"


class UsageError(ValueError):
    """A flag or file the user must fix; the message names it and says what is wrong."""


class RunStopped(RuntimeError):
    """A run that stopped on purpose (a signal, repeated non-finite losses); ``exit_code`` for the shell."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def select_device(choice: str, gpu: int) -> torch.device:
    """``--device auto|cpu|cuda`` with ``--gpu`` as the CUDA index."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if not 0 <= gpu < torch.cuda.device_count():
        raise UsageError(f"--gpu {gpu}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", gpu)


def native_bf16_cpu() -> bool:
    """Whether this CPU has oneDNN's bf16 kernels (AVX-512 or newer). Without them PyTorch computes bf16
    convolutions through a slow fallback: on an AVX2 CPU the demo network's training step ran 28x and its
    inference 91x slower than in float32 (BENCHMARKS.md)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_amp(amp: str | None, device: torch.device) -> str | None:
    """``--amp`` checked against the device before any work: fp16 needs CUDA (UsageError); bf16 on a CPU
    without bf16 kernels runs, but so slowly that the returned one-line note says so (None otherwise)."""
    autocast_for(amp, device)
    if amp == "bf16" and device.type == "cpu" and not native_bf16_cpu():
        return (
            "note: --amp bf16: this CPU has no bf16 convolution kernels (oneDNN needs AVX-512), so bf16 runs "
            "slower than float32 here (on AVX2: training 28x, inference 91x, BENCHMARKS.md); leave out --amp"
        )
    return None


def autocast_for(amp: str | None, device: torch.device) -> torch.autocast:
    """The autocast context of ``--amp`` (disabled without it); fp16 needs CUDA."""
    if amp == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA device; use --amp bf16 on the CPU")
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=amp is not None)


@dataclass(frozen=True)
class NetworkChoice:
    """A network and its constructor overrides, as the model card stores them; for the user's own network
    (``--network file.py:Class``) also what the card records of its file (``networks.plugins``)."""

    name: str
    overrides: dict
    plugin: dict | None = None

    def load(self) -> None:
        """Import a user's network from its recorded file (the same SHA-256 as in training); a UsageError
        naming the file where it is gone or changed. Registry networks need nothing."""
        if self.plugin is None:
            return
        target = f"{self.plugin['file']}:{self.plugin['class']}"
        if self.plugin.get("module"):
            target = f"{self.plugin['module']}:{self.plugin['class']}"
        try:
            load_plugin(target, *(self.plugin[key] for key in CHANNEL_ARGS), sha256=self.plugin["sha256"])
        except ValueError as error:
            raise UsageError(f"--network {self.name}: {error}") from None

    def build(self, in_channels: int, out_channels: int) -> nn.Module:
        self.load()
        try:
            return build_network(self.name, in_channels, out_channels, **self.overrides)
        except (ValueError, TypeError) as error:  # TypeError: a user's constructor refusing its arguments
            raise UsageError(f"--network {self.name}: {error}") from None


def check_network_output(model: nn.Module, choice: NetworkChoice, in_channels: int, out_channels: int, roi) -> None:
    """One ROI-sized forward (batch 1, evaluation mode, no gradients) of a user's network, before any long
    work: a UsageError where it fails or its output is not ``(1, out_channels, *roi)``."""
    if choice.plugin is None:
        return
    training = model.training
    model.eval()
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    try:
        with torch.no_grad():
            output = model(torch.zeros(1, in_channels, *roi, device=device))
    except Exception as error:  # the user's forward may raise anything
        raise UsageError(
            f"--network {choice.name}: a forward of one {'x'.join(map(str, roi))} patch with {in_channels} "
            f"channel{'s' * (in_channels > 1)} failed ({type(error).__name__}: {error})"
        ) from None
    finally:
        model.train(training)
    expected = (1, out_channels, *roi)
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    if shape != expected:
        raise UsageError(
            f"--network {choice.name}: its output for one {'x'.join(map(str, roi))} patch is {shape}, expected "
            f"{expected} (the classes at the input's size)"
        )


class CardModel(NamedTuple):
    """What a model card says of its network: which one, its input channels, class count, ROI and class
    names (empty for an old card without them)."""

    choice: NetworkChoice
    in_channels: int
    out_channels: int
    roi: tuple[int, int, int]
    classes: tuple[str, ...]


def parse_card(card: dict, source: str) -> CardModel:
    """The network entries of a model card; a UsageError naming ``source`` where one is missing or wrong."""
    try:
        plugin = card.get("network_plugin")
        name = card["network"] if plugin else canonical_name(card["network"])
        choice = NetworkChoice(name, dict(card["network_args"]), dict(plugin) if plugin else None)
        in_channels, out_channels = int(card.get("in_channels", 1)), int(card["out_channels"])
        roi = roi_of(card["roi_size"])
        classes = tuple(str(name) for name in card.get("classes", ()))
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(f"{source}: not a valid model card ({error})") from None
    regions = card.get("regions") or {}
    if not isinstance(regions, dict):
        raise UsageError(f"{source}: not a valid model card (regions {regions!r})")
    if regions and len(regions) != out_channels:
        raise UsageError(f"{source}: not a valid model card ({len(regions)} regions for {out_channels} outputs)")
    if classes and not regions and len(classes) != out_channels:
        raise UsageError(f"{source}: not a valid model card ({len(classes)} classes for {out_channels} outputs)")
    return CardModel(choice, in_channels, out_channels, roi, classes)


def roi_of(roi_size: int | str | Sequence[int]) -> tuple[int, int, int]:
    """A patch size from one edge or three: ``96``, ``"96"``, ``[96]``, ``"96,96,64"``, ``(96, 96, 64)``.

    Raises ValueError for any other count or a value that is not a positive integer.
    """
    if isinstance(roi_size, str):
        values: list = [part for part in roi_size.replace(" ", "").split(",") if part]
    elif isinstance(roi_size, Sequence):
        values = list(roi_size)
    else:
        values = [roi_size]
    try:
        edges = [int(v) for v in values if isinstance(v, str | numbers.Integral) and not isinstance(v, bool)]
    except ValueError:  # a string that is not an integer
        edges = []
    if len(values) not in (1, 3) or len(edges) != len(values) or any(e < 1 for e in edges):
        raise ValueError(f"ROI size {roi_size!r}: expected one or three positive integers, such as 96 or 96,96,64")
    return ensure_tuple_rep(edges[0] if len(edges) == 1 else tuple(edges), 3)


def network_from_flags(args, roi: tuple[int, int, int]) -> NetworkChoice:
    """The network the flags ask for (a registry name, or the user's ``file.py:Class`` imported here), with
    ``--network_args``; checks the ROI against the network's input multiple."""
    try:
        arguments, channel_args = parse_network_args(getattr(args, "network_args", None))
    except ValueError as error:
        raise UsageError(str(error)) from None
    plugin = None
    try:
        if is_plugin(args.network or ""):
            name, plugin = load_plugin(args.network, **channel_args)
        elif channel_args:
            raise ValueError(
                f"{', '.join(channel_args)} in --network_args is for a network of your own (file.py:Class)"
            )
        else:
            name = canonical_name(args.network or "REPUXNET")
        overrides = overrides_from_flags(
            name, feat_size=args.feat_size, kernel_size=args.kernel_size, hidden_size=args.hidden_size, roi_size=roi
        )
        overrides.update(arguments)
    except ValueError as error:
        raise UsageError(f"--network {args.network}: {error}") from None
    spec = get_spec(name)
    if any(r % spec.input_multiple for r in roi):
        raise UsageError(f"--roi_size {','.join(map(str, roi))}: {name} needs multiples of {spec.input_multiple}")
    if min(roi) < spec.smallest_input:
        raise UsageError(
            f"--roi_size {','.join(map(str, roi))}: too small for {name}, whose deepest level would be a single "
            f"voxel; use at least {spec.smallest_input} on every axis"
        )
    return NetworkChoice(name, overrides, plugin)


def check_output_folder(output: str | os.PathLike) -> Path:
    """``--output`` as a folder path that can be created and written to; a clear UsageError where a file
    stands in the way or the folder (or the nearest existing one above it) is not writable."""
    path = Path(output)
    for candidate in (path, *path.absolute().parents):
        if candidate.exists():
            if not candidate.is_dir():
                what = "is a file" if candidate == path else f"lies under the file {candidate}"
                raise UsageError(f"--output {path}: {what}, not a folder; choose a folder")
            if not os.access(candidate, os.W_OK | os.X_OK):
                where = "" if candidate == path else f" ({candidate}, where it would be created)"
                raise UsageError(f"--output {path}: the folder{where} is not writable; choose another folder")
            break
    return path


def save_torch(obj, path: Path) -> None:
    replace_atomically(path, lambda tmp: torch.save(obj, tmp))


def as_json(value):
    """``value`` as its JSON round trip (tuples become lists), to compare settings with a model card's."""
    return json.loads(json.dumps(value))


def model_card_path(weights: str | os.PathLike) -> Path:
    """The model card beside a weights file: ``best_metric_model.pth`` -> ``best_metric_model.pth.json``."""
    return Path(f"{weights}.json")


def load_weights(path: str | os.PathLike, flag: str) -> dict:
    """A state_dict from ``path``: a plain one (published format) or one under ``state_dict``/``model``
    (such as the model part of a training checkpoint)."""
    return load_trained(path, flag)[0]


def load_trained(path: str | os.PathLike, flag: str) -> tuple[dict, dict | None]:
    """The state_dict of ``path`` (see :func:`load_weights`) and, for a training checkpoint
    (``checkpoint_last.pth``), the model card it holds (else None)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or foreign files
        raise UsageError(f"{flag} {path}: cannot read as PyTorch weights ({error})") from None
    card = None
    if isinstance(loaded, dict):
        if isinstance(loaded.get("card"), dict) and "progress" in loaded:
            card = loaded["card"]
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise UsageError(f"{flag} {path}: not a state_dict of tensors")
    return loaded, card


def load_with_card(weights: str, flag: str) -> tuple[dict, dict | None, str]:
    """The state dict of ``weights``, its model card (beside it, else inside a training checkpoint, else
    None) and where the card was read."""
    state, card = load_trained(weights, flag)
    card_path, source = model_card_path(weights), f"{weights} (a training checkpoint: its model weights and card)"
    if card_path.is_file():
        try:
            card, source = json.loads(card_path.read_text()), str(card_path)
        except (OSError, ValueError) as error:
            raise UsageError(f"{card_path}: not a valid model card ({error})") from None
    return state, card, source


def load_into(model: nn.Module, state: dict, path: str | os.PathLike, flag: str, network: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with an error that names the file and the mismatch."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split("\n", 2)[1:2]).strip() or str(error)
        raise UsageError(
            f"{flag} {path}: does not fit {network} with these flags ({detail[:300]}); check --network, "
            "--feat_size, --kernel_size, --hidden_size and the class count"
        ) from None
