"""Pretrained weights into the network of a run (``main_finetune.py``, ``main_train.py --pretrain true``).

Each key of the network is loaded as it is, adapted, or newly initialised, and one short block says which:

- the output head, when fine-tuning: each new output whose name matches an old one (case, ``_`` and spaces
  aside) starts from that output's weights and bias; a new sided output whose unsided name matches an old
  output (FLARE's ``kidney`` -> AMOS's ``right kidney`` and ``left kidney``) starts from it; the others start
  fresh (``--head mapped``, the default where the old model's card names its outputs), or the whole head
  starts fresh (``--head fresh``, the published behaviour);
- a kernel that reads the input channels, when their count differs (``--channel_init``): ``repeat`` gives
  each new channel the old kernels' sum divided by the new channel count, so that the first activation is
  unchanged where every channel holds the same image; ``copy:NEW=OLD,...`` gives each new channel (by name)
  the kernel of an old channel (by name or number).

Any other key whose shape differs, and any key of the network the weights lack, is refused with one line
naming it; weights the network has no place for are reported as unused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from dataset.laterality import unsided_name
from engine.common import UsageError
from networks.registry import head_convolution, head_keys

__all__ = [
    "ChannelInit",
    "LoadReport",
    "load_pretrained",
    "map_outputs_by_name",
    "parse_channel_init",
]


def _normalised(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


def map_outputs_by_name(new: Sequence[str], old: Sequence[str]) -> list[int | None]:
    """For each new output name, the old output it starts from (None: fresh): the old output of the same
    name (case, ``_`` and spaces aside), else, for a sided name, the old output named like it without its
    side."""
    index = {_normalised(name): j for j, name in enumerate(old)}
    mapping = []
    for name in new:
        match = index.get(_normalised(name))
        if match is None and (unsided := unsided_name(name)) is not None:
            match = index.get(_normalised(unsided))
        mapping.append(match)
    return mapping


@dataclass(frozen=True)
class ChannelInit:
    """How a kernel that reads the input channels is adapted to another channel count: ``repeat``, or
    ``copy`` with, for each new channel, the old channel it takes."""

    rule: str
    sources: tuple[int, ...] = ()

    def describe(self, old: Sequence[str], new: Sequence[str]) -> str:
        if self.rule == "repeat":
            return f"input channels {len(old)} -> {len(new)}: each the old kernels' sum / {len(new)}"
        pairs = ", ".join(f"{name}<-{old[j]}" for name, j in zip(new, self.sources, strict=True))
        return f"input channels {len(old)} -> {len(new)}: copied ({pairs})"

    def adapt(self, kernel: torch.Tensor, new_count: int) -> torch.Tensor:
        """``kernel`` (``out, old channels, ...``) for ``new_count`` input channels."""
        if self.rule == "repeat":
            shared = kernel.sum(1, keepdim=True) / new_count
            return shared.expand(-1, new_count, *kernel.shape[2:]).clone()
        return kernel[:, list(self.sources)].clone()


def parse_channel_init(text: str, old: Sequence[str], new: Sequence[str]) -> ChannelInit:
    """``--channel_init`` (``repeat`` or ``copy:NEW=OLD,...``) against the old and new channel names; a
    UsageError naming the flag for anything else."""
    text = text.strip()
    if text == "repeat":
        return ChannelInit("repeat")
    if not text.startswith("copy:"):
        raise UsageError(f"--channel_init {text!r}: expected repeat or copy:NEW=OLD,... (channels by name)")
    old_index = {_normalised(name): j for j, name in enumerate(old)}
    new_index = {_normalised(name): i for i, name in enumerate(new)}
    sources: dict[int, int] = {}
    for entry in filter(None, (part.strip() for part in text[5:].split(","))):
        name, equals, source = (part.strip() for part in entry.partition("="))
        i = new_index.get(_normalised(name))
        j = old_index.get(_normalised(source), int(source) if source.isdigit() else None)
        if not equals or i is None or j is None or j >= len(old):
            raise UsageError(
                f"--channel_init {text!r}: {entry!r} is not NEW=OLD with NEW a channel of the dataset "
                f"({', '.join(new)}) and OLD one of the pretrained model ({', '.join(old)}) or its number"
            )
        if i in sources:
            raise UsageError(f"--channel_init {text!r}: channel {new[i]!r} is given twice")
        sources[i] = j
    missing = [new[i] for i in range(len(new)) if i not in sources]
    if missing:
        raise UsageError(f"--channel_init {text!r}: no source for the dataset's channel(s) {', '.join(missing)}")
    return ChannelInit("copy", tuple(sources[i] for i in range(len(new))))


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did with each key."""

    loaded: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    head_mapping: str | None = None

    def new_keys(self) -> list[str]:
        """The keys not loaded as they are: the ones a frozen start trains."""
        return [*self.adapted, *self.fresh]

    def lines(self, source: str) -> list[str]:
        def listed(keys: Sequence[str]) -> str:
            shown = ", ".join(keys[:4]) + (f", ... ({len(keys)} in all)" if len(keys) > 4 else "")
            return f" ({shown})" if keys else ""

        lines = [f"Loaded {source}:", f"  loaded as they are: {len(self.loaded)} tensors"]
        by_rule: dict[str, list[str]] = {}
        for key, how in self.adapted.items():
            by_rule.setdefault(how, []).append(key)
        lines += [f"  adapted: {', '.join(keys)}: {how}" for how, keys in by_rule.items()]
        lines.append(f"  newly initialised: {len(self.fresh)}{listed(self.fresh)}")
        lines.append(f"  unused: {len(self.unused)}{listed(self.unused)}")
        if self.head_mapping:
            lines.append(f"  output head: {self.head_mapping}")
        return lines


def _reads_input(loaded: torch.Tensor, target: torch.Tensor, old_count: int, new_count: int) -> bool:
    """Whether a kernel differs from the network's only in its input channels (dimension 1)."""
    return (
        loaded.dim() == target.dim() >= 3
        and loaded.shape[1] == old_count
        and target.shape[1] == new_count
        and loaded.shape[0] == target.shape[0]
        and loaded.shape[2:] == target.shape[2:]
    )


def load_pretrained(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    network: str,
    source: str,
    head: str | None = None,
    old_outputs: Sequence[str] | None = None,
    new_outputs: Sequence[str] = (),
    channel_init: ChannelInit | None = None,
    old_channels: Sequence[str] = (),
    new_channels: Sequence[str] = (),
) -> LoadReport:
    """Load ``state`` into ``model`` (the registry network ``network``) key by key (module docstring).

    Args:
        model: the network of the run, built for the dataset's channels and outputs.
        state: the pretrained state_dict.
        network: its registry name.
        source: the flag and file, for messages (``--pretrained_weights path``).
        head: None (the head loads like any key: same outputs), ``mapped`` or ``fresh``.
        old_outputs, new_outputs: the output names of the pretrained model (None: unknown) and the run's.
        channel_init: how kernels reading the input are adapted where the channel counts differ.
        old_channels, new_channels: the input channel names of the pretrained model and the dataset.
    """
    target = model.state_dict()
    report = LoadReport()
    head_set: set[str] = set()
    mapping: list[int | None] | None = None
    out_dim = 0
    if head is not None:
        head_set = set(head_keys(model, network))
        if head == "mapped" and old_outputs is not None:
            try:
                out_dim = int(isinstance(head_convolution(model, network)[1], nn.ConvTranspose3d))
                mapping = map_outputs_by_name(new_outputs, old_outputs)
            except ValueError as error:
                report.head_mapping = f"fresh ({error}; mapping by name needs one output layer)"
        if mapping is not None:
            pairs = [f"{name}<-{old_outputs[j]}" for name, j in zip(new_outputs, mapping, strict=True) if j is not None]
            fresh = [name for name, j in zip(new_outputs, mapping, strict=True) if j is None]
            report.head_mapping = f"mapped by name: {', '.join(pairs) or 'none'}; fresh: {', '.join(fresh) or 'none'}"
        elif report.head_mapping is None:
            report.head_mapping = "fresh" + (" (--head fresh)" if head == "fresh" else " (the weights name no outputs)")
    new_state, missing, refused = {}, [], []
    for key, tensor in target.items():
        loaded = state.get(key)
        if key in head_set:
            if mapping is None or loaded is None or not any(j is not None for j in mapping):
                report.fresh.append(key)
                continue
            dim = out_dim if tensor.dim() > 1 else 0  # a transposed convolution's weight: in, out, ...
            if loaded.dim() != tensor.dim() or any(
                a != b for d, (a, b) in enumerate(zip(loaded.shape, tensor.shape, strict=True)) if d != dim
            ):
                refused.append(f"{key} {tuple(loaded.shape)} (network: {tuple(tensor.shape)})")
                continue
            mapped = tensor.detach().clone()
            for i, j in enumerate(mapping):
                if j is not None:
                    mapped.select(dim, i).copy_(loaded.select(dim, j))
            new_state[key] = mapped
            report.adapted[key] = "output channels mapped by name"
        elif loaded is None:
            missing.append(key)
        elif loaded.shape == tensor.shape:
            new_state[key] = loaded
            report.loaded.append(key)
        elif _reads_input(loaded, tensor, len(old_channels), len(new_channels)):
            if channel_init is None:
                raise UsageError(
                    f"{source}: a model of {len(old_channels)} input channel{'s' * (len(old_channels) > 1)} "
                    f"({', '.join(old_channels)}); the dataset has {len(new_channels)} ({', '.join(new_channels)}): "
                    "pass --channel_init repeat or copy:NEW=OLD,... to adapt the layers that read the input"
                )
            new_state[key] = channel_init.adapt(loaded, len(new_channels)).to(tensor.dtype)
            report.adapted[key] = channel_init.describe(old_channels, new_channels)
        else:
            refused.append(f"{key} {tuple(loaded.shape)} (network: {tuple(tensor.shape)})")
    if refused or missing:
        detail = "; ".join(refused[:3] + [f"missing {key}" for key in missing[:3]])
        raise UsageError(
            f"{source}: does not fit {network} with these flags ({detail}"
            f"{', ...' if len(refused) + len(missing) > 3 else ''}); check --network, --feat_size, --kernel_size, "
            "--hidden_size and the class count"
        )
    report.unused = [key for key in state if key not in target]
    model.load_state_dict({**target, **new_state}, strict=True)
    return report
