"""Networks from the user's own code: ``--network path/to/file.py:ClassName`` or ``package.module:ClassName``.

The class must be an ``nn.Module`` whose constructor takes the input and output channel counts (by default
as ``in_channels`` and ``out_channels``; other names with ``in_channels_arg`` / ``out_channels_arg`` in
``--network_args``). It is registered in the network registry under ``/absolute/file.py:ClassName``, so that
every script builds it as it builds the registry's own networks. The model card records the file, the class,
the arguments and the file's SHA-256: a card is rebuilt only from the same file (:func:`load_plugin` with
``sha256``). Exports (TorchScript, ONNX, the bundle) hold the traced network and need no file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import sys
from pathlib import Path

from networks.registry import NetworkSpec, register_network

__all__ = ["CHANNEL_ARGS", "is_plugin", "load_plugin", "parse_network_args"]

#: The registry name of each network of the user's imported in this process, with its card record.
_LOADED: dict[str, dict] = {}

#: The keys of ``--network_args`` that name the constructor's channel arguments (not passed to it).
CHANNEL_ARGS = ("in_channels_arg", "out_channels_arg")


def is_plugin(network: str) -> bool:
    """Whether ``--network`` names the user's own class (``file.py:Class`` or ``module:Class``)."""
    return ":" in network


def parse_network_args(text: str | None) -> tuple[dict, dict]:
    """``--network_args`` (a JSON object, or None): the constructor arguments, and the channel argument names
    (:data:`CHANNEL_ARGS`) taken out of them; a one-line ValueError for anything but a JSON object."""
    if text is None:
        return {}, {}
    try:
        arguments = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--network_args {text}: not JSON ({error})") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"--network_args {text}: expected a JSON object such as '{{\"width\": 16}}'")
    return arguments, {key: arguments.pop(key) for key in CHANNEL_ARGS if key in arguments}


def _file_of(target: str) -> tuple[Path, str, str | None]:
    """The file of ``target``, its class name, and its module name (None for a file path)."""
    where, _, attribute = target.rpartition(":")
    if not where or not attribute.isidentifier():
        raise ValueError(f"{target!r}: expected path/to/file.py:ClassName or package.module:ClassName")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"the network file {path} does not exist")
        return path, attribute, None
    try:
        spec = importlib.util.find_spec(where)
    except (ImportError, ValueError) as error:
        raise ValueError(f"cannot find the module {where!r} ({error})") from None
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        raise ValueError(f"no module {where!r} on the Python path (or a file: give it as path/to/file.py:{attribute})")
    return Path(spec.origin).resolve(), attribute, where


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_plugin(
    target: str,
    in_channels_arg: str = "in_channels",
    out_channels_arg: str = "out_channels",
    sha256: str | None = None,
) -> tuple[str, dict]:
    """Import the class ``target`` names, check it, and register it; returns its registry name and what a
    model card records of it (``file``, ``class``, ``module``, ``sha256``, the channel argument names). A
    file already registered with the same content is not imported again.

    Raises a one-line ValueError naming the file: gone, changed since ``sha256`` (a card's), failing to
    import, without the class, a class that is not an ``nn.Module``, or a constructor without the channel
    arguments.
    """
    from torch import nn

    path, attribute, module_name = _file_of(target)
    digest = _sha256(path)
    if sha256 is not None and digest != sha256:
        raise ValueError(
            f"the network file {path} changed since the model was trained (SHA-256 {digest[:12]}..., the model card "
            f"says {sha256[:12]}...); restore that file or train again"
        )
    name = f"{path}:{attribute}"
    record = {
        "file": str(path),
        "class": attribute,
        "module": module_name,
        "sha256": digest,
        CHANNEL_ARGS[0]: in_channels_arg,
        CHANNEL_ARGS[1]: out_channels_arg,
    }
    if _LOADED.get(name) == record:
        return name, record
    try:
        if module_name is not None:
            module = importlib.import_module(module_name)
        else:
            unique = f"repuxnet_network_{digest[:16]}"
            spec = importlib.util.spec_from_file_location(unique, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[unique] = module  # dataclasses and pickling look their module up here
            spec.loader.exec_module(module)
    except Exception as error:  # the user's code may raise anything on import
        raise ValueError(f"importing the network file {path} failed ({type(error).__name__}: {error})") from None
    network_class = getattr(module, attribute, None)
    if network_class is None:
        raise ValueError(f"the network file {path} has no {attribute!r}")
    if not (isinstance(network_class, type) and issubclass(network_class, nn.Module)):
        raise ValueError(f"{attribute} in {path} is not an nn.Module (a torch.nn.Module subclass)")
    parameters = inspect.signature(network_class).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    for argument in (in_channels_arg, out_channels_arg):
        if argument not in parameters and not takes_any:
            raise ValueError(
                f"the constructor of {attribute} in {path} takes no {argument!r} (it takes: "
                f"{', '.join(parameters) or 'nothing'}); name its channel arguments with --network_args "
                f'\'{{"{CHANNEL_ARGS[0]}": ..., "{CHANNEL_ARGS[1]}": ...}}\''
            )
    # The user's code: no input multiple is known (the ROI-sized check before training decides), the head
    # for fine-tuning is its last 3D convolution, and exports are traced at the ROI size.
    spec = NetworkSpec(
        network_class,
        in_channels_arg,
        out_channels_arg,
        head="",
        input_multiple=1,
        any_size_export=False,
    )
    register_network(name, spec, replace=True)
    _LOADED[name] = record
    return name, record
