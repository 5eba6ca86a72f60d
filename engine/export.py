"""export.py's work, and test_seg.py's way back in: a trained model's deploy form as TorchScript
(``model.ts``), ONNX (``model.onnx``) and a MONAI bundle, each checked against the training-form network
before anything is written; and exported files loaded for inference, their model card checked against
the one each file holds inside."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from atomic_files import replace_atomically
from dataset.description import ChannelNorm, card_preprocessing
from dataset.labels import LabelManager
from dataset.transforms import ORIENTATION
from engine.bundle import bundle_files
from engine.common import (
    RunStopped,
    UsageError,
    as_json,
    check_output_folder,
    load_into,
    load_with_card,
    model_card_path,
    parse_card,
)
from engine.formats import FORMATS, ONNX_RUNTIMES, OPSET, TOLERANCE
from networks import get_spec
from networks.deploy import deploy_form, repository_modules

__all__ = [
    "EXPORT_SUFFIXES",
    "FORMATS",
    "ONNX_RUNTIMES",
    "OPSET",
    "TOLERANCE",
    "ArrayNetwork",
    "exported_network",
    "onnx_runtime_network",
    "openvino_network",
    "run_export",
]

TORCHSCRIPT_FILE, ONNX_FILE, BUNDLE_FOLDER = "model.ts", "model.onnx", "bundle"
EXPORT_SUFFIXES = (".ts", ".onnx")
#: Where an exported file holds its model card: a TorchScript extra file, an ONNX metadata entry.
EMBEDDED_CARD = "model_card.json"
#: The card entries that decide inference: the card beside an export must agree with the one inside.
INFERENCE_ENTRIES = (
    "network",
    "network_args",
    "in_channels",
    "out_channels",
    "classes",
    "roi_size",
    "channels",
    "normalization",
    "spacing",
    "ignore_label",
    "orientation",
    "mirror_axes",
    "lateral_pairs",
    "regions",
    "regions_class_order",
)
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
ONNX_INSTALL = "pip install -r requirements-deploy.txt"


def run_export(args) -> list[Path]:
    """Export ``--trained_weights`` into ``--output`` in ``--formats``; returns the written paths."""
    formats = list(dict.fromkeys(args.formats))
    if "onnx" in formats:
        missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
        if missing:
            raise UsageError(
                f"--formats onnx needs {', '.join(missing)} ({ONNX_INSTALL}); or leave onnx out of --formats"
            )
    output = check_output_folder(args.output)
    state, card, source = _trained_with_card(args.trained_weights)
    choice, in_channels, out_channels, roi, _ = parse_card(card, source)
    for name in _outputs(formats):
        if (output / name).exists() and not args.overwrite:
            raise UsageError(f"--output {output}: {name} exists already; choose another folder or pass --overwrite")
    model = choice.build(in_channels, out_channels)
    load_into(model, state, args.trained_weights, "--trained_weights", choice.name)
    model.eval()
    deployed = deploy_form(model)
    left = repository_modules(deployed)
    if left:  # deploy_form's promise; a new layer type of this repository would need its own conversion
        raise RuntimeError(f"the deploy form still holds this repository's layers: {', '.join(left[:5])}")
    spec = get_spec(choice.name)
    spatial = _spatial_text(spec.any_size_export, spec.input_multiple, roi)
    print(
        f"Exporting {choice.name} from {args.trained_weights} (model card {source}): deploy form with every "
        f"depthwise convolution a native conv3d; spatial size {spatial}"
    )
    inputs = _check_inputs(in_channels, roi, spec.input_multiple, spec.any_size_export)
    with torch.no_grad():
        references = [model(x) for x in inputs]
    card = {**card, "orientation": ORIENTATION}  # what every image is reoriented to before the network
    embedded = {**card, "export": {"torch": torch.__version__}}
    files: dict[str, bytes] = {}
    if "torchscript" in formats or "bundle" in formats:
        data = _torchscript(deployed, inputs[0], embedded)
        check = _check(TORCHSCRIPT_FILE, _torchscript_runner(data), inputs, references)
        if "torchscript" in formats:
            files[TORCHSCRIPT_FILE] = data
            files[f"{TORCHSCRIPT_FILE}.json"] = _card_file(card, "torchscript", args.trained_weights, spatial, check)
        if "bundle" in formats:
            postprocessing = _plan_postprocessing(args, card)
            bundle = bundle_files(
                card, data, str(args.trained_weights), args.sw_batch_size, args.overlap, postprocessing
            )
            files.update({f"{BUNDLE_FOLDER}/{name}": content for name, content in bundle.items()})
    if "onnx" in formats:
        data = _onnx(deployed, inputs[0], embedded, spec.input_multiple, spec.any_size_export)
        check = _check(ONNX_FILE, onnx_runtime_network(data), inputs, references)
        files[ONNX_FILE] = data
        files[f"{ONNX_FILE}.json"] = _card_file(card, "onnx", args.trained_weights, spatial, check)
    if "bundle" in formats and (output / BUNDLE_FOLDER).exists():
        shutil.rmtree(output / BUNDLE_FOLDER)  # --overwrite: no file of an older bundle stays beside the new one
    written = []
    for name, content in files.items():
        path = output / name
        replace_atomically(path, lambda tmp, content=content: Path(tmp).write_bytes(content))
        written.append(path)
    shown = [name for name in files if "/" not in name] + ([f"{BUNDLE_FOLDER}/"] if "bundle" in formats else [])
    print(f"Wrote {', '.join(shown)} to {output}")
    return written


def _plan_postprocessing(args, card: dict) -> dict | None:
    """``--plan``: the study's keep-largest entries (as the label values each keeps) for the bundle, with what
    the bundle does not do of the plan (an ensemble of several weights, mirroring), said in its README."""
    if not getattr(args, "plan", None):
        return None
    from engine.crossval import read_plan

    plan = read_plan(Path(args.plan))
    try:
        values = LabelManager.from_card(card).keep_largest_values(plan["keep_largest"])
    except ValueError as error:
        raise UsageError(f"--plan {args.plan}: keep_largest: {error}") from None
    weights = [str(Path(w).resolve()) for w in plan["weights"]]
    if str(Path(args.trained_weights).resolve()) not in weights:
        print(f"note: --plan {args.plan}: {args.trained_weights} is none of its weights; its postprocessing applies")
    keep = [value if isinstance(value, int) else list(value) for value in values]
    return {"keep_largest": keep, "plan": str(args.plan), "weights": len(weights)}


def _card_file(card: dict, fmt: str, weights: str, spatial: str, check: dict) -> bytes:
    """The model card beside an export: the training card and what the export is, and how it was checked."""
    export = {
        "format": fmt,
        **({"opset": OPSET} if fmt == "onnx" else {}),
        "torch": torch.__version__,
        "from": str(weights),
        "input": f"image: batch, channel, x, y, z ({ORIENTATION}, preprocessed as this card says)",
        "output": "logits: batch, class, x, y, z",
        "spatial_size": spatial,
        **check,
    }
    return (json.dumps({**card, "export": export}, indent=2) + "\n").encode()


def _outputs(formats: list[str]) -> list[str]:
    names = {"torchscript": [TORCHSCRIPT_FILE], "onnx": [ONNX_FILE], "bundle": [BUNDLE_FOLDER]}
    return [name for fmt in formats for name in names[fmt]]


def _spatial_text(any_size: bool, multiple: int, roi: tuple[int, int, int]) -> str:
    return f"any multiple of {multiple}" if any_size else f"{'x'.join(map(str, roi))} only (the ROI)"


def _trained_with_card(weights: str) -> tuple[dict, dict, str]:
    """The state dict of ``weights`` and its model card (beside it, or inside a training checkpoint), the
    card's preprocessing entries in full form (each channel's scheme with its window or nonzero_mask)."""
    state, card, source = load_with_card(weights, "--trained_weights")
    if not isinstance(card, dict):
        raise UsageError(
            f"--trained_weights {weights}: no model card beside it ({model_card_path(weights).name}); an export "
            "needs the card that training writes (network, classes, channels, ROI, preprocessing)"
        )
    try:
        preprocessing = card_preprocessing(card)
        preprocessing["normalization"] = [ChannelNorm.from_json(e).to_json() for e in preprocessing["normalization"]]
    except (KeyError, TypeError, ValueError) as error:
        raise UsageError(f"{source}: not a valid model card ({error})") from None
    return state, {**card, **preprocessing}, source


def _check_inputs(in_channels: int, roi: tuple[int, int, int], multiple: int, any_size: bool) -> list[torch.Tensor]:
    """Random inputs the exports are checked on: a batch of 2 at the ROI size (a batch of 1 would let the
    exporter fix the batch axis) and, for any-size exports, one a multiple larger on the first axis."""
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, in_channels, *roi, generator=generator)]
    if any_size:
        inputs.append(torch.randn(1, in_channels, roi[0] + multiple, *roi[1:], generator=generator))
    return inputs


def _differences(output: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """The largest absolute difference, and it relative to the largest absolute reference value."""
    difference = float((output.float() - reference.float()).abs().max())
    return difference, difference / max(float(reference.abs().max()), torch.finfo(torch.float32).tiny)


def _check(name: str, run: Callable, inputs: list[torch.Tensor], references: list[torch.Tensor]) -> dict:
    """``name``'s outputs against the training-form network's on ``inputs``: one printed line, the largest
    differences returned; a RunStopped naming ``name`` above :data:`TOLERANCE`."""
    worst_abs = worst_rel = 0.0
    shown = []
    for x, reference in zip(inputs, references, strict=True):
        output = run(x)
        shape = "x".join(map(str, x.shape))
        if tuple(output.shape) != tuple(reference.shape):
            raise RunStopped(
                f"{name}: output {tuple(output.shape)} on input {shape}, the training-form network's "
                f"{tuple(reference.shape)}; nothing written",
                1,
            )
        absolute, relative = _differences(output, reference)
        worst_abs, worst_rel = max(worst_abs, absolute), max(worst_rel, relative)
        shown.append(f"{absolute:.2g} ({relative:.2g} relative) on {shape}")
        if not relative <= TOLERANCE:
            raise RunStopped(
                f"{name}: differs from the training-form network by {relative:.3g} relative ({absolute:.3g} absolute) "
                f"on input {shape}, above {TOLERANCE:g}; nothing written",
                1,
            )
    print(f"{name}: largest difference to the training-form network {', '.join(shown)}")
    return {"max_abs_diff": worst_abs, "max_rel_diff": worst_rel, "checked_on": [list(x.shape) for x in inputs]}


@contextlib.contextmanager
def _torchscript_quietly() -> Iterator[None]:
    """TorchScript without its deprecation warnings (PyTorch now points to torch.export; MONAI bundles still
    load ``model.ts``) and without the trace's warnings that the forwards' Python shape checks become
    constants (the check at a second input size, for any-size networks, shows nothing that matters was)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated", category=FutureWarning)
        yield


def _torchscript(model: nn.Module, example: torch.Tensor, card: dict) -> bytes:
    """``model`` traced on ``example`` and saved with ``card`` inside, as bytes."""
    with _torchscript_quietly():
        with torch.no_grad():
            traced = torch.jit.trace(model, example, check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={EMBEDDED_CARD: json.dumps(card)})
    return buffer.getvalue()


def _torchscript_runner(data: bytes) -> Callable:
    with _torchscript_quietly():
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return run


def _onnx(model: nn.Module, example: torch.Tensor, card: dict, multiple: int, any_size: bool) -> bytes:
    """``model`` exported by PyTorch's ``torch.export`` exporter: batch axis dynamic, spatial axes dynamic
    at multiples of ``multiple`` (``any_size``) or fixed to the example's; ``card`` in the metadata."""
    dim = torch.export.Dim
    axes = {0: dim("batch", min=1, max=4096)}
    if any_size:
        axes |= {axis: multiple * dim(name, min=1, max=4096) for axis, name in zip((2, 3, 4), "xyz", strict=True)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            dynamic_shapes=(axes,),
            input_names=["image"],
            output_names=["logits"],
            opset_version=OPSET,
            verbose=False,
        )
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = EMBEDDED_CARD, json.dumps(card)
    return proto.SerializeToString()


def _onnx_session(data: bytes | str, device: torch.device | None = None):
    import onnxruntime

    providers = ["CPUExecutionProvider"]
    if (
        device is not None
        and device.type == "cuda"
        and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    ):
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    return onnxruntime.InferenceSession(data, providers=providers)


class ArrayNetwork:
    """A network that runs outside PyTorch (ONNX Runtime, OpenVINO), called like a module:
    ``logits = network(image)``, float32 tensors in and out (on the input's device); ``run`` maps a NumPy
    image to NumPy logits."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray]) -> None:
        self.run = run

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(image.detach().float().cpu().numpy())
        return torch.from_numpy(self.run(array)).to(image.device)


def onnx_runtime_network(model: bytes | str, device: torch.device | None = None) -> ArrayNetwork:
    """An ONNX model (its bytes or path) on ONNX Runtime, on CUDA for a CUDA ``device`` where it can."""
    session = _onnx_session(model, device)
    if device is not None and device.type == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        print(f"note: ONNX Runtime has no CUDA provider here (install onnxruntime-gpu); {model} runs on the CPU")
    return ArrayNetwork(lambda array: session.run(None, {"image": array})[0])


def openvino_network(path: str, float32: bool) -> ArrayNetwork:
    """An ONNX model compiled by OpenVINO for the CPU. ``float32``: OpenVINO computes in float32; else in its
    CPU default precision (bf16 where the processor has it, as ``--amp`` asks)."""
    import openvino

    settings = {"INFERENCE_PRECISION_HINT": "f32"} if float32 else {}
    compiled = openvino.Core().compile_model(path, "CPU", settings)
    return ArrayNetwork(lambda array: compiled(array)[0])


@dataclass(frozen=True)
class ExportedNetwork:
    """An exported file (``model.ts``, ``model.onnx``) to segment with; a ``model.onnx`` runs on
    ``runtime`` (``onnxruntime`` or ``openvino``), with OpenVINO in float32 or its default precision."""

    path: str
    runtime: str = "onnxruntime"
    float32: bool = True

    def build(self, device: torch.device):
        if self.path.endswith(".onnx"):
            if self.runtime == "openvino":
                return openvino_network(self.path, self.float32)
            return onnx_runtime_network(self.path, device)
        with _torchscript_quietly():
            return torch.jit.load(self.path, map_location=device).eval()


def exported_network(
    path: str, flag: str, runtime: str = "onnxruntime", float32: bool = True
) -> tuple[ExportedNetwork, dict, str]:
    """An exported file, its model card (beside it: ``model.ts.json``) and the card's path; a ``model.onnx``
    runs on ``runtime`` (see :class:`ExportedNetwork`). A UsageError naming the file for one that cannot be
    read (or a runtime that is not installed), and naming the card where it is missing or describes another
    model than the one inside the file."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    if path.endswith(".onnx"):
        package, name = ("openvino", "OpenVINO") if runtime == "openvino" else ("onnxruntime", "ONNX Runtime")
        if importlib.util.find_spec(package) is None:
            raise UsageError(f"{flag} {path}: segmenting with an ONNX model on {name} needs {package} ({ONNX_INSTALL})")
        try:
            inside = _onnx_card(path, runtime)
        except Exception as error:  # the runtimes raise their own types for corrupt files
            raise UsageError(f"{flag} {path}: not a readable ONNX model ({_first_line(error)})") from None
    else:
        extra = {EMBEDDED_CARD: ""}
        try:
            with _torchscript_quietly():
                torch.jit.load(path, map_location="cpu", _extra_files=extra)
        except Exception as error:  # torch raises many types for corrupt or foreign files
            raise UsageError(f"{flag} {path}: not a readable TorchScript model ({_first_line(error)})") from None
        inside = extra[EMBEDDED_CARD] or None
    if not inside:
        raise UsageError(f"{flag} {path}: holds no model card (not written by export.py); export it with export.py")
    card_path = model_card_path(path)
    if not card_path.is_file():
        raise UsageError(f"{flag} {path}: no model card beside it ({card_path}); export.py writes it")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"{card_path}: not a valid model card ({error})") from None
    if not isinstance(card, dict):
        raise UsageError(f"{card_path}: not a valid model card (not a JSON object)")
    try:
        embedded = json.loads(inside)
    except ValueError as error:
        raise UsageError(f"{flag} {path}: the model card inside it is not JSON ({error})") from None
    differing = [key for key in INFERENCE_ENTRIES if as_json(card.get(key)) != as_json(embedded.get(key))]
    if differing:
        raise UsageError(
            f"{card_path}: not the model card of {path} (its {', '.join(differing)} differ from the card inside it)"
        )
    return ExportedNetwork(path, runtime, float32), card, str(card_path)


def _onnx_card(path: str, runtime: str) -> str | None:
    """The model card inside ``model.onnx``, read (and the file checked) by ``runtime``."""
    if runtime == "openvino":
        import openvino

        model = openvino.Core().read_model(path)
        key = ["framework", EMBEDDED_CARD]
        return model.get_rt_info(key).astype(str) if model.has_rt_info(key) else None
    return _onnx_session(path).get_modelmeta().custom_metadata_map.get(EMBEDDED_CARD)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
