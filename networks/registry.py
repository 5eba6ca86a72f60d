"""The network registry: every script builds its network here, by name."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn

__all__ = ["NetworkSpec", "available_networks", "build_network", "register_network"]


@dataclass(frozen=True)
class NetworkSpec:
    """How to build one registry network.

    Args:
        constructor: the network class (or a function returning the module).
        in_channels_arg: the constructor's name for the input channel count.
        out_channels_arg: the constructor's name for the output (class) count.
        defaults: the published configuration: constructor arguments that overrides may replace.
    """

    constructor: Callable[..., nn.Module]
    in_channels_arg: str = "in_channels"
    out_channels_arg: str = "out_channels"
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    def arguments(self) -> list[str]:
        """Constructor arguments that an override may set (channel counts excluded)."""
        params = inspect.signature(self.constructor).parameters
        return [n for n in params if n not in ("self", self.in_channels_arg, self.out_channels_arg)]


_REGISTRY: dict[str, NetworkSpec] = {}


def register_network(name: str, spec: NetworkSpec) -> None:
    """Add ``spec`` to the registry under ``name`` (names are matched case-insensitively)."""
    if _lookup(name) is not None:
        raise ValueError(f"a network named {name!r} is already registered")
    _REGISTRY[name] = spec


def available_networks() -> list[str]:
    """Registered network names, in registration order."""
    return list(_REGISTRY)


def _lookup(name: str) -> str | None:
    for registered in _REGISTRY:
        if registered.lower() == name.lower():
            return registered
    return None


def build_network(name: str, in_channels: int, out_channels: int, **overrides: Any) -> nn.Module:
    """Build the registry network ``name`` with its published configuration.

    Args:
        name: a registered name (see :func:`available_networks`), case-insensitive.
        in_channels: input channels (image modalities).
        out_channels: output channels (segmentation classes, background included).
        **overrides: constructor arguments replacing the published configuration, for example
            ``feat_size=(8, 16, 32, 64), ks=5`` for a small RepUX-Net.

    Raises:
        ValueError: for an unknown name or an argument the network's constructor does not take.
    """
    registered = _lookup(name)
    if registered is None:
        raise ValueError(f"unknown network {name!r}; available: {', '.join(_REGISTRY)}")
    spec = _REGISTRY[registered]
    accepted = spec.arguments()
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise ValueError(
            f"network {registered!r} takes no argument {', '.join(map(repr, unknown))}; "
            f"it accepts: {', '.join(accepted)}"
        )
    kwargs = {**spec.defaults, **overrides, spec.in_channels_arg: in_channels, spec.out_channels_arg: out_channels}
    return spec.constructor(**kwargs)
