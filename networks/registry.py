"""The network registry: every script builds its network here, by name.

A network's constructor may be registered as ``"module:attribute"``, imported when the network is first
built: the registry's names (the scripts' ``--network`` help) are known without importing PyTorch.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "NetworkSpec",
    "available_networks",
    "build_network",
    "canonical_name",
    "get_spec",
    "head_convolution",
    "head_keys",
    "overrides_from_flags",
    "register_network",
    "replace_head",
]


@dataclass(frozen=True)
class NetworkSpec:
    """How to build one registry network.

    Args:
        constructor: the network class (or a function returning the module), or its ``"module:attribute"``
            path, imported when first needed (:meth:`factory`).
        in_channels_arg: the constructor's name for the input channel count.
        out_channels_arg: the constructor's name for the output (class) count.
        defaults: the published configuration: constructor arguments that overrides may replace.
        head: attribute path of the output head (replaced for fine-tuning on other classes).
        input_multiple: input spatial sizes must be multiples of this.
        min_input: the smallest input edge the network trains on (None: ``input_multiple``); larger where
            instance normalisation would see a single voxel at the deepest level.
        flag_args: command-line shape flags (``feat_size``, ``kernel_size``, ``hidden_size``, ``roi_size``)
            that apply to this network, and the constructor argument each one sets.
        new_head: ``new_head(model, out_channels)`` replaces the head where replacing the last Conv3d of
            ``head`` is not enough (None: that generic replacement).
        any_size_export: its TorchScript and ONNX exports take any spatial size that is a multiple of
            ``input_multiple``; False: the ROI size only (a network built for one size, or one whose forward
            computes shapes in Python, which a trace fixes), which is all sliding-window inference needs.
    """

    constructor: Callable[..., nn.Module] | str
    in_channels_arg: str = "in_channels"
    out_channels_arg: str = "out_channels"
    defaults: Mapping[str, Any] = field(default_factory=dict)
    head: str = "out"
    input_multiple: int = 16
    min_input: int | None = None
    flag_args: Mapping[str, str] = field(default_factory=dict)
    new_head: Callable[[nn.Module, int], None] | None = None
    any_size_export: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        object.__setattr__(self, "flag_args", MappingProxyType(dict(self.flag_args)))

    @property
    def smallest_input(self) -> int:
        return self.min_input or self.input_multiple

    def factory(self) -> Callable[..., nn.Module]:
        """The constructor, imported from its ``"module:attribute"`` path where it was registered as one."""
        if not isinstance(self.constructor, str):
            return self.constructor
        module, _, attribute = self.constructor.partition(":")
        return getattr(importlib.import_module(module), attribute)

    def arguments(self) -> list[str]:
        """Constructor arguments that an override may set (channel counts excluded)."""
        params = inspect.signature(self.factory()).parameters
        return [n for n in params if n not in ("self", self.in_channels_arg, self.out_channels_arg)]


_REGISTRY: dict[str, NetworkSpec] = {}


def register_network(name: str, spec: NetworkSpec, replace: bool = False) -> None:
    """Add ``spec`` to the registry under ``name`` (names are matched case-insensitively); ``replace``: the
    entry of that name, if any, is replaced (a user's network file imported again)."""
    registered = _lookup(name)
    if registered is not None:
        if not replace:
            raise ValueError(f"a network named {name!r} is already registered")
        del _REGISTRY[registered]
    _REGISTRY[name] = spec


def available_networks() -> list[str]:
    """Registered network names, in registration order (a user's networks, ``file.py:Class``, aside)."""
    return [name for name in _REGISTRY if ":" not in name]


def _lookup(name: str) -> str | None:
    for registered in _REGISTRY:
        if registered.lower() == name.lower():
            return registered
    return None


def canonical_name(name: str) -> str:
    """The registered spelling of ``name``; ValueError listing the choices for an unknown one."""
    registered = _lookup(name)
    if registered is None:
        raise ValueError(f"unknown network {name!r}; available: {', '.join(available_networks())}")
    return registered


def get_spec(name: str) -> NetworkSpec:
    """The registry entry of ``name`` (case-insensitive)."""
    return _REGISTRY[canonical_name(name)]


def overrides_from_flags(name: str, **flags: Any) -> dict[str, Any]:
    """Constructor overrides from the scripts' shape flags; flags that are None keep the published value.

    ``roi_size`` sets the input size of networks built for one (UNETR's ``img_size``) and is ignored by
    the others; any other flag given for a network it does not apply to is a ValueError.
    """
    registered = canonical_name(name)
    spec = _REGISTRY[registered]
    overrides = {}
    for flag, value in flags.items():
        if value is None:
            continue
        if flag in spec.flag_args:
            overrides[spec.flag_args[flag]] = value
        elif flag != "roi_size":
            raise ValueError(f"--{flag} does not apply to {registered}")
    return overrides


def head_convolution(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    """The qualified name and module of the last 3D convolution (plain or transposed) of the output head of
    ``model`` (a registry network ``name``): the layer whose output channels are the classes. ValueError for
    a network whose head is a block of several such layers (``NetworkSpec.new_head``) or has none."""
    from torch import nn  # here: the registry's names load without PyTorch

    spec = get_spec(name)
    if spec.new_head is not None:
        raise ValueError(f"the head of {canonical_name(name)} is a block whose inner layers have the class count too")
    found = None
    # The head's last convolution (UnetOutBlock wraps it as head.conv.conv; nnFormer's is transposed).
    for module_name, module in model.get_submodule(spec.head).named_modules(prefix=spec.head):
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
            found = (module_name, module)
    if found is None:
        raise ValueError(f"the head {spec.head!r} of {canonical_name(name)} has no 3D convolution")
    return found


def head_keys(model: nn.Module, name: str) -> tuple[str, ...]:
    """The state_dict keys whose shape follows the class count: the head convolution's weight and bias, or
    every key of the head block of a network with ``NetworkSpec.new_head``."""
    spec = get_spec(name)
    if spec.new_head is not None:
        return tuple(key for key in model.state_dict() if key.startswith(spec.head + "."))
    path, conv = head_convolution(model, name)
    return tuple(f"{path}.{key}" for key in conv.state_dict())


def replace_head(model: nn.Module, name: str, out_channels: int) -> nn.Module:
    """Give ``model`` (a registry network ``name``) a new, freshly initialised output for ``out_channels`` classes.

    The last 3D convolution (plain or transposed) of the head is replaced by one of the same kind with the
    same input channels, kernel and stride, on the same device and dtype. Returns ``model``.
    """
    from torch import nn

    spec = get_spec(name)
    if spec.new_head is not None:
        spec.new_head(model, out_channels)
        return model
    path, conv = head_convolution(model, name)
    parent_path, _, attribute = path.rpartition(".")
    extra = {"output_padding": conv.output_padding} if isinstance(conv, nn.ConvTranspose3d) else {}
    new = type(conv)(
        conv.in_channels,
        out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=conv.bias is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
        **extra,
    )
    setattr(model.get_submodule(parent_path), attribute, new)
    return model


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
    registered = canonical_name(name)
    spec = _REGISTRY[registered]
    accepted = spec.arguments()
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise ValueError(
            f"network {registered!r} takes no argument {', '.join(map(repr, unknown))}; "
            f"it accepts: {', '.join(accepted)}"
        )
    kwargs = {**spec.defaults, **overrides, spec.in_channels_arg: in_channels, spec.out_channels_arg: out_channels}
    return spec.factory()(**kwargs)
