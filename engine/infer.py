"""The inference pass of test_seg.py: the files or test cases to segment, the model(s) from their cards,
then per case the averaged probabilities (softmax of classes or sigmoid of regions; ensemble, mirroring along
the axes each model was trained to mirror) in the input geometry, labels and probabilities."""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import torch
from monai.data import CacheDataset, DataLoader
from torch import nn
from tqdm import tqdm

from atomic_files import FileGroup
from dataset.cases import case_files, cases_from_paths, find_cases, label_for, resolve_root
from dataset.checks import verify_cases
from dataset.description import MEDIAN, DatasetConfig, counted, load_dataset_config
from dataset.labels import LabelManager
from dataset.laterality import (
    LEFT_RIGHT_AXIS,
    check_lateral_pairs,
    check_mirror_axes,
    describe_axes,
    describe_pairs,
    find_lateral_pairs,
    mirrorings,
)
from dataset.portable import case_output_name, keep_largest, named_apart
from dataset.transforms import build_transforms
from engine.common import (
    NetworkChoice,
    RunStopped,
    UsageError,
    as_json,
    autocast_for,
    check_amp,
    check_output_folder,
    load_into,
    load_with_card,
    network_from_flags,
    parse_card,
    roi_of,
    select_device,
)
from engine.evaluate import (
    evaluate_file,
    format_summary,
    parse_label_map,
    write_reports,
)
from engine.export import EXPORT_SUFFIXES, ExportedNetwork, exported_network
from engine.input_grid import InputGrid, labels_on_input_grid
from engine.loading import data_worker_init
from engine.memory import (
    ModelMemory,
    TreeMemory,
    activation_bytes,
    available_bytes,
    case_grid,
    device_bytes,
    gigabytes,
    tree_bytes,
    windows_per_batch,
)
from engine.predict import (
    ModelPasses,
    ProbabilitiesFile,
    mean_probabilities,
    probabilities_path,
    segmentation_path,
    write_segmentation,
)
from engine.stitching import stitching_device
from networks import switch_to_deploy
from networks.dwconv import use_algorithm

__all__ = ["run_inference"]

#: The flags that describe a network's shape (a model card decides them when there is one).
SHAPE_FLAGS = ("feat_size", "kernel_size", "hidden_size", "network_args")


def run_inference(args, cases: list[dict] | None = None) -> list[Path]:
    """Sliding-window inference over the test images (or the given ``cases``, ``{"image": ..., "label":
    ...}``: a fold's held-out cases), written as ``<case>_seg.nii.gz`` in each input's geometry (shape and
    affine), uint8 labels. With ``args.plan``, a study's plan (``engine.crossval``) gives the weights, the
    mirroring and the postprocessing. Returns the written paths."""
    with use_algorithm(args.dwconv):
        return _infer(args, cases)


def _model_from_card(card: dict, source: str, args, config: DatasetConfig):
    """The network, input channels, class count, ROI, dataset settings and outputs (a :class:`LabelManager`)
    a model card decides; one line names the flags that say otherwise (the card wins)."""
    choice, in_channels, out_channels, roi, classes = parse_card(card, source)
    try:
        card_config = config.with_preprocessing(card) if "spacing" in card else None
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(f"{source}: not a valid model card ({error})") from None
    if card_config is not None and card_config.in_channels != in_channels:
        raise UsageError(
            f"{source}: not a valid model card ({card_config.in_channels} channels, in_channels {in_channels})"
        )
    ignored = []
    if args.roi_size is not None and tuple(args.roi_size) != roi:
        ignored.append(f"--roi_size {_text(args.roi_size)} (card: {_text(roi)})")
    if args.network is not None or any(getattr(args, f) is not None for f in SHAPE_FLAGS):
        try:
            flagged = argparse.Namespace(**{**vars(args), "network": args.network or choice.name})
            given, saved = network_from_flags(flagged, roi), as_json(choice.overrides)
            agrees = given.name == choice.name and all(saved.get(k) == v for k, v in as_json(given.overrides).items())
        except UsageError:  # flags that do not even fit the card's network
            agrees = False
        if not agrees:
            ignored.append(f"--network and shape flags (card: {choice.name} {choice.overrides})")
    if args.dataset is not None:
        differing = _preprocessing_differences(config, card_config) if card_config is not None else []
        if classes and not _relabelled(args) and config.labels != classes:
            differing.append(f"{config.num_classes} classes (card: {len(classes)})")
        if differing:
            ignored.append(f"--dataset {args.dataset}: {', '.join(differing)}")
    if ignored:
        print(f"note: the model card {source} decides; ignored: {'; '.join(ignored)}")
    if card_config is None:
        print(f"note: {source} records no preprocessing; using that of {config.source or config.name}")
        card_config = config
    if classes and not _relabelled(args):  # with a label map, the dataset's labels describe the test labels
        card_config = replace(card_config, labels=classes, ignore_label=card.get("ignore_label"))
    try:  # the model's outputs; with a label map, card_config's labels are the test set's
        named = card_config.labels if card_config.num_classes == out_channels else None
        outputs = LabelManager.from_card(card, named)
    except (ValueError, TypeError) as error:
        raise UsageError(f"{source}: not a valid model card ({error})") from None
    if outputs.has_regions:
        regions = tuple(outputs.regions.items())
        card_config = replace(
            card_config, labels=outputs.classes, regions=regions, regions_class_order=outputs.regions_class_order
        )
    else:
        card_config = replace(card_config, regions=(), regions_class_order=())
    return choice, in_channels, out_channels, roi, card_config, outputs


def _preprocessing_differences(config: DatasetConfig, card_config: DatasetConfig) -> list[str]:
    """The dataset's preprocessing settings that differ from a card's (settings it leaves to the data
    agree with any)."""
    if config.in_channels != card_config.in_channels:
        return [f"{config.in_channels} channels (card: {card_config.in_channels})"]
    differing = []
    if config.spacing != MEDIAN and config.spacing != card_config.spacing:
        differing.append(f"spacing {_spacing_text(config.spacing)} (card: {_spacing_text(card_config.spacing)})")
    for name, mine, card in zip(config.channels, config.normalization, card_config.normalization, strict=True):
        if mine.scheme != card.scheme or (not mine.left_to_data and mine != card):
            differing.append(f"normalization of {name} {mine.describe()} (card: {card.describe()})")
    return differing


def _spacing_text(spacing) -> str:
    return f"{_text(spacing)} mm" if spacing else "native"


def _text(value) -> str:
    if isinstance(value, tuple | list):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _model_to_run(args, config: DatasetConfig, weights: str):
    """The network, input channels, class count, ROI and dataset settings to segment with, the weights (a
    state dict, or an exported network: ``model.ts``, ``model.onnx``), their :class:`TrainedMirroring` and
    what their outputs mean: from the model card beside the weights or in a training checkpoint, else from
    the flags (published state dicts)."""
    if weights.endswith(EXPORT_SUFFIXES):
        state, card, source = exported_network(weights, "--trained_weights", args.runtime, float32=args.amp is None)
    else:
        state, card, source = load_with_card(weights, "--trained_weights")
    if card is None:
        if config.to_derive():
            raise UsageError(
                f"--trained_weights {weights}: no model card beside it, and {config.source} leaves "
                f"{', '.join(config.to_derive())} to the training data; segment with weights that have their card"
            )
        roi = roi_of(args.roi_size or 96)
        mirroring, outputs = TrainedMirroring(None, config.pairs, None), config.label_manager
        choice = network_from_flags(args, roi)
        return choice, config.in_channels, config.num_outputs, roi, config, state, mirroring, outputs
    choice, in_channels, out_channels, roi, config, outputs = _model_from_card(card, source, args, config)
    if not isinstance(state, ExportedNetwork):
        choice.load()  # a network of the user's own: its file, unchanged, before any case is read
    print(
        f"Model card {source}: {choice.name} {choice.overrides}, {outputs.describe()}, ROI {_text(roi)}, "
        f"{in_channels} input channel{'s' * (in_channels > 1)} "
        f"({config.describe_channels()}), "
        f"spacing {_spacing_text(config.spacing)}"
    )
    return choice, in_channels, out_channels, roi, config, state, _trained_mirroring(card, source, config), outputs


@dataclass(frozen=True)
class TrainedMirroring:
    """What a model card says of mirroring: the axes mirrored in training (None: not recorded), the
    left/right class pairs, and the card that says it (None: weights without a card)."""

    axes: tuple[int, ...] | None
    lateral_pairs: tuple[tuple[int, int], ...]
    card: str | None


def _trained_mirroring(card: dict, source: str, config: DatasetConfig) -> TrainedMirroring:
    """The card's mirror axes and lateral pairs (pairs it does not record: found from its class names)."""
    num_classes = int(card["out_channels"])
    try:
        axes = card.get("mirror_axes")
        axes = None if axes is None else check_mirror_axes(axes, source)
        if card.get("regions"):  # a region holds labels of either side: nothing to swap (dataset.description)
            return TrainedMirroring(axes, (), source)
        pairs = card.get("lateral_pairs")
        if pairs is not None:
            pairs = check_lateral_pairs(pairs, num_classes, source)
    except ValueError as error:
        raise UsageError(f"{source}: not a valid model card ({error})") from None
    if pairs is None:
        classes = card.get("classes")
        pairs = find_lateral_pairs(classes) if classes else config.pairs if config.num_classes == num_classes else ()
    return TrainedMirroring(axes, pairs, source)


def _relabelled(args) -> bool:
    """Whether the test labels are not the model's classes (``--label_map``, or ``--source``'s labels)."""
    return bool(args.label_map or args.source)


def _source_of(args, config: DatasetConfig) -> tuple[DatasetConfig, dict[int, int] | None]:
    """With ``--source NAME`` (a union ``--dataset``): that source's dataset, whose test cases are segmented,
    and the label map that scores them on its labels (each unified class to the source label whose set holds
    it: a set's prediction is the union of its classes'); else the dataset and None."""
    name = args.source
    if name is None:
        return config, None
    if not config.sources:
        raise UsageError(f"--source {name}: --dataset {_dataset_of(args)} is not a union of datasets (no 'sources')")
    if args.label_map:
        raise UsageError(f"--source {name} and --label_map: the source's labels map the classes; give one of them")
    names = [source.name for source in config.sources]
    if name not in names:
        raise UsageError(f"--source {name}: {config.source} has the sources {', '.join(names)}")
    index = names.index(name)
    return config.sources[index].config, config.label_sets.source_label_map(index)


def _label_map_of(args, outputs: LabelManager, config: DatasetConfig) -> dict[int, int] | None:
    """``--label_map`` parsed and checked against the model's classes and the dataset's labels (refused for a
    region model: its outputs are no classes to rename)."""
    out_channels = len(outputs.classes)
    if not args.label_map:
        return None
    if outputs.has_regions:
        raise UsageError(
            f"--label_map {args.label_map}: the model predicts regions ({', '.join(outputs.regions)}), and a label "
            "map renames classes; a region model is evaluated on labels of its own regions' values"
        )
    try:
        label_map = parse_label_map(args.label_map)
    except ValueError as error:
        raise UsageError(str(error)) from None
    outside = sorted(c for c in label_map if c >= out_channels)
    if outside:
        raise UsageError(f"--label_map {args.label_map}: the model has no class {outside[0]} ({out_channels} classes)")
    unknown = sorted(t for t in label_map.values() if t >= config.num_classes)
    if unknown:
        raise UsageError(f"--label_map {args.label_map}: the dataset has no label {unknown[0]}")
    return label_map


def _dataset_of(args) -> str:
    """``--dataset``; without it, the ``dataset.json`` in ``--root`` (a Decathlon, nnU-Net or this
    repository's description), else the published folders (``flare``)."""
    if args.dataset is not None:
        return args.dataset
    if args.root is not None and (Path(args.root) / "dataset.json").is_file():
        return str(Path(args.root) / "dataset.json")
    return "flare"


@dataclass
class LoadedModel:
    """One model of the ensemble: its weights file, network, channels, classes, ROI, preprocessing
    (``config``) and state dict, or the exported network of a ``model.ts`` or ``model.onnx``, what its
    card says of mirroring, and what its outputs mean (``outputs``). Building the network hands the state
    dict over to it (``state`` is None then): the weights are held once while cases are segmented."""

    weights: str
    choice: NetworkChoice
    in_channels: int
    out_channels: int
    roi: tuple[int, int, int]
    config: DatasetConfig
    state: dict | ExportedNetwork | None
    mirroring: TrainedMirroring
    outputs: LabelManager

    def build(self, device: torch.device) -> nn.Module:
        if isinstance(self.state, ExportedNetwork):
            return self.state.build(device)
        if self.state is None:
            raise RuntimeError(f"{self.weights}: built once already")
        model = self.choice.build(self.in_channels, self.out_channels)
        load_into(model, self.state, self.weights, "--trained_weights", self.choice.name)
        self.state = None
        switch_to_deploy(model)  # plain convolutions for RepUX-Net: same outputs, no W * M per forward
        return model.to(device).eval()


def _models_to_run(args, config: DatasetConfig) -> list[LoadedModel]:
    """Every ``--trained_weights`` with its card; an ensemble must agree on classes, input channels and
    preprocessing (networks and ROIs may differ), else a UsageError names the two weights and what differs."""
    models = [LoadedModel(weights, *_model_to_run(args, config, weights)) for weights in args.trained_weights]
    for other in models[1:]:
        differences = _disagreements(models[0], other)
        if differences:
            raise UsageError(
                f"--trained_weights {models[0].weights} and {other.weights} cannot be ensembled: "
                f"{'; '.join(differences)} (an ensemble needs one set of classes, input channels and preprocessing)"
            )
    return models


def _disagreements(first: LoadedModel, other: LoadedModel) -> list[str]:
    a, b = first.config, other.config
    differences = []
    if first.outputs.has_regions or other.outputs.has_regions:
        if not first.outputs.same_outputs(other.outputs):
            differences.append(f"outputs: {first.outputs.describe()} vs {other.outputs.describe()}")
    elif first.out_channels != other.out_channels or a.labels != b.labels:
        differences.append(f"classes {', '.join(a.labels)} vs {', '.join(b.labels)}")
    if first.in_channels != other.in_channels:
        differences.append(f"{first.in_channels} vs {other.in_channels} input channels")
    if a.spacing != b.spacing:
        differences.append(f"spacing {_spacing_text(a.spacing)} vs {_spacing_text(b.spacing)}")
    if a.normalization != b.normalization:
        differences.append(f"normalization {a.describe_channels()} vs {b.describe_channels()}")
    return differences


def _cases_to_segment(args, config: DatasetConfig) -> list[dict]:
    """The files of ``--input`` (labels from ``--labels``), or the test cases of the dataset under ``--root``.
    Labels are kept for ``--evaluate`` only; a case without one is segmented, named, and not scored."""
    if args.input:
        if args.root is not None:
            raise UsageError("--input and --root: give the files to segment one way (--input, or --root's test cases)")
        cases = cases_from_paths(args.input, config)
        if args.evaluate and not args.labels:
            raise UsageError("--evaluate with --input needs --labels FOLDER (a <case>.nii.gz label per input case)")
        if args.labels and not Path(args.labels).is_dir():
            raise UsageError(f"--labels {args.labels}: no such folder")
        if args.labels:
            for case in cases:
                label = label_for(case["image"], Path(args.labels), config.file_ending)
                if label is not None:
                    case["label"] = str(label)
        where = f"--labels {args.labels}"
    else:
        root = resolve_root(config, args.root)
        cases = find_cases(config, root, "test")
        where = f"a labelsTs folder in {root} or a test list with labels"
    _check_outputs(args, cases)
    if not args.evaluate:
        return [{"image": case["image"]} for case in cases]
    unlabelled = [case_output_name(case["image"]) for case in cases if "label" not in case]
    if len(unlabelled) == len(cases):
        raise UsageError(f"--evaluate needs labels: {where}; none of the {counted(len(cases), 'case')} has one")
    if unlabelled:
        print(
            f"note: --evaluate: {counted(len(unlabelled), 'case')} without a label (segmented, not scored): "
            f"{', '.join(unlabelled[:10])}{' ...' if len(unlabelled) > 10 else ''}"
        )
    return cases


def _given_cases(args, cases: list[dict]) -> list[dict]:
    """Cases handed over by a caller (a fold's held-out cases), checked as listed ones are."""
    _check_outputs(args, cases)
    if args.evaluate and not all("label" in case for case in cases):
        raise UsageError("--evaluate: every case handed over needs its label")
    return [dict(case) for case in cases] if args.evaluate else [{"image": case["image"]} for case in cases]


def _apply_plan(args) -> dict:
    """``--plan``: a study's ``plan.json`` (``engine.crossval``) sets the weights (every fold of every chosen
    configuration) and the mirroring; flags that would say otherwise are refused, naming them."""
    from engine.crossval import read_plan

    plan = read_plan(Path(args.plan))
    flags = {
        "--trained_weights": args.trained_weights,
        "--keep_largest": args.keep_largest,
        "--tta_axes": args.tta_axes is not None,
        "--tta": args.tta and not plan["tta"],
    }
    given = [flag for flag, value in flags.items() if value]
    if given:
        raise UsageError(
            f"--plan {args.plan} sets the weights, the mirroring and the postprocessing; drop {', '.join(given)}"
        )
    args.trained_weights, args.tta = list(plan["weights"]), bool(plan["tta"])
    return plan


def _plan_keep(plan: dict, path: str, outputs: LabelManager) -> list:
    try:
        return outputs.keep_largest_values(plan["keep_largest"])
    except ValueError as error:
        raise UsageError(f"--plan {path}: keep_largest: {error}") from None


def _check_outputs(args, cases: list[dict]) -> None:
    """Refuse two cases that would write one output (``dataset.portable.named_apart``) and an ``--output``
    folder that holds images to segment: the next run over that folder would read the segmentations written
    there as images (``case_seg_seg.nii.gz``)."""
    try:
        named_apart(cases)
    except ValueError as error:
        raise UsageError(str(error)) from None
    output = Path(args.output)
    folder = output.resolve()
    for case in cases:
        for path in case_files({"image": case["image"]}):
            if Path(path).resolve().parent == folder:
                raise UsageError(
                    f"--output {output}: the folder of the images to segment ({path}); the segmentations written "
                    "there would be read as images by the next run over it: write them to another folder"
                )


def _infer(args, given: list[dict] | None = None) -> list[Path]:
    plan = _apply_plan(args) if getattr(args, "plan", None) else None
    device = select_device(args.device, args.gpu)
    amp_note = check_amp(args.amp, device)
    if amp_note:
        print(amp_note)
    autocast = autocast_for(args.amp, device)
    output = check_output_folder(args.output)
    if args.runtime == "openvino" and device.type != "cpu" and any(w.endswith(".onnx") for w in args.trained_weights):
        raise UsageError("--runtime openvino runs model.onnx on the CPU: add --device cpu, or use onnxruntime")
    dataset = load_dataset_config(_dataset_of(args), args.datalist)
    tested, source_map = _source_of(args, dataset)
    models = _models_to_run(args, tested)
    if args.amp and args.runtime == "onnxruntime" and any(w.endswith(".onnx") for w in args.trained_weights):
        print(
            "note: --amp: model.onnx runs in float32 on ONNX Runtime (the export is float32); the other routes, "
            "and model.onnx with --runtime openvino, run in reduced precision"
        )
    config = models[0].config
    cases = _cases_to_segment(args, config) if given is None else _given_cases(args, given)
    outputs = models[0].outputs
    label_map = _label_map_of(args, outputs, config) if source_map is None else source_map
    if source_map is not None and outputs.classes != dataset.labels:
        raise UsageError(
            f"--source {args.source}: the model's classes ({', '.join(outputs.classes)}) are not those of "
            f"{dataset.source} ({', '.join(dataset.labels)})"
        )
    keep = _classes_to_keep(args.keep_largest, outputs) if plan is None else _plan_keep(plan, args.plan, outputs)
    _check_memory(args, cases, models, device)  # from the headers, before any voxel is read
    verify_cases(
        cases, config.num_classes, args.num_workers, in_channels=models[0].in_channels, ignore_label=config.ignore_label
    )
    test_axes = _test_mirror_axes(args, models)
    written, rows, started = [], [], time.perf_counter()
    try:
        _segment_cases(args, models, test_axes, cases, output, device, autocast, label_map, keep, written, rows)
    except KeyboardInterrupt:
        raise RunStopped(
            f"stopped by SIGINT after {counted(len(written), 'case')} of {len(cases)}; every segmentation in "
            f"{output} is complete (none half-written)",
            130,
        ) from None
    elapsed = time.perf_counter() - started
    passes = f"{counted(len(models), 'model')}" + _mirrorings_text(test_axes)
    print(
        f"Wrote {counted(len(written), 'segmentation')} to {output} in {elapsed:.1f} s ({elapsed / len(written):.1f} s "
        f"per case; {passes})"
    )
    if args.evaluate:
        _report_evaluation(rows, config, output, sum("label" in case for case in cases))
    return written


def _check_memory(args, cases: list[dict], models: list[LoadedModel], device: torch.device) -> None:
    """Refuse, before any file is read through and any case segmented, a run whose estimated peak
    (``engine.memory.tree_bytes``: this process and its data-loading workers, every model, the network's
    activations; each case from its header) exceeds ``--memory_limit`` or what the machine has, or, on a GPU,
    a case whose windows and activations exceed what the GPU has free; say where the probabilities are held.
    The estimate without the activations is checked first: a case far too large is refused at once."""
    config, first = models[0].config, models[0]
    grids = []
    for case in cases:
        try:
            grids.append(case_grid(case_output_name(case["image"]), case_files(case)[0], config.spacing))
        except Exception:  # nibabel raises several types for an unreadable header: the read-through names it
            continue
    if not grids:
        return
    limit = args.memory_limit * 2**30 if args.memory_limit else available_bytes()
    # The activations on this host: first the windows' logits alone (a lower bound), then traced; on a GPU, none.
    weights = [_weight_bytes(model, device) for model in models]
    on_gpu = [ModelMemory(model.roi, size, lambda batch: 0) for model, size in zip(models, weights, strict=True)]
    untraced = [ModelMemory(model.roi, size, lambda batch: None) for model, size in zip(models, weights, strict=True)]
    _refuse_above(_tree(args, grids, first, untraced if device.type == "cpu" else on_gpu), limit, args, first, grids)
    autocast = autocast_for(args.amp, device)
    traced = [
        ModelMemory(model.roi, size, _activations(model, device, autocast))
        for model, size in zip(models, weights, strict=True)
    ]
    estimate = _tree(args, grids, first, traced if device.type == "cpu" else on_gpu)
    _refuse_above(estimate, limit, args, first, grids)
    largest = next(grid for grid in grids if grid.name == estimate.largest)
    holder = stitching_device(largest.network_shape, first.out_channels, device)
    if device.type == "cuda":
        _check_gpu(args, grids, models, traced, device, holder)
    workers = f", {args.num_workers} data-loading workers {gigabytes(estimate.workers)}" if args.num_workers else ""
    unknown = "" if estimate.activations_known else "; the network's activations could not be traced"
    size = gigabytes(2 * first.out_channels * math.prod(largest.network_shape))
    print(
        f"Memory: segmenting needs about {gigabytes(estimate.total)} at most (this process "
        f"{gigabytes(estimate.main)}{workers}; largest case {estimate.largest}{unknown})"
        + (f" of the {gigabytes(limit)} available" if limit is not None else "")
        + f"; probabilities ({size} at most) held on {'the CPU' if holder.type == 'cpu' else holder}"
        + (" (too large for the GPU's free memory)" if holder != device else "")
    )


def _tree(args, grids: list, model: LoadedModel, memories: list) -> TreeMemory:
    return tree_bytes(
        grids,
        model.in_channels,
        model.out_channels,
        memories,
        args.sw_batch_size,
        args.overlap,
        args.num_workers,
        args.cache_rate,
    )


def _refuse_above(estimate: TreeMemory, limit: int | None, args, model: LoadedModel, grids: list) -> None:
    if limit is None or estimate.total <= limit:
        return
    largest = next(grid for grid in grids if grid.name == estimate.largest)
    what = f"{model.out_channels} outputs x {'x'.join(map(str, largest.network_shape))} voxels on the network grid"
    parts = f"this process {gigabytes(estimate.main)}"
    if args.num_workers:
        parts += f", {args.num_workers} data-loading workers {gigabytes(estimate.workers)}"
    if args.memory_limit:
        verdict = f"more than --memory_limit {args.memory_limit:g} (GB) allows: raise it where the machine has more"
    else:
        verdict = (
            f"more than the {gigabytes(limit)} available: free memory, use a machine with more, or give "
            "--memory_limit where the estimate is too high"
        )
    fewer = "; --num_workers 0 preprocesses in this process, one case at a time" if args.num_workers else ""
    raise UsageError(
        f"{estimate.largest}: segmenting needs about {gigabytes(estimate.total)} ({parts}; {what}; TRAINING.md, "
        f"Memory), {verdict}{fewer}"
    )


def _weight_bytes(model: LoadedModel, device: torch.device) -> int:
    """The host memory of a model's weights while cases are segmented: its network's (none on a GPU; the
    loaded state dict is handed over to the network, :meth:`LoadedModel.build`); of an export, its file's
    size."""
    if isinstance(model.state, ExportedNetwork):
        return Path(model.weights).stat().st_size
    return sum(tensor.nbytes for tensor in model.state.values()) if device.type == "cpu" else 0


def _activations(model: LoadedModel, device: torch.device, autocast: torch.autocast):
    """``batch -> bytes`` of the model's network on ``device`` under ``autocast`` (``engine.memory.
    activation_bytes``: its card's network stands for an export), None where it cannot be traced; each batch
    size traced once."""
    traced: dict[int, int | None] = {}

    def build() -> nn.Module:
        network = model.choice.build(model.in_channels, model.out_channels)
        switch_to_deploy(network)
        return network.eval()

    def of(batch: int) -> int | None:
        if batch not in traced:
            try:
                traced[batch] = activation_bytes(build, model.in_channels, model.roi, batch, device.type, autocast)
            except Exception:  # a network whose forward needs real values: its logits stand for it
                traced[batch] = None
        return traced[batch]

    return of


def _check_gpu(args, grids: list, models: list[LoadedModel], traced: list, device, holder) -> None:
    """Refuse a case whose windows, activations and (where held there) probabilities exceed the GPU's free
    memory."""
    free = torch.cuda.mem_get_info(device)[0]
    for grid in grids:
        for model, memory in zip(models, traced, strict=True):
            batch = windows_per_batch(grid.network_shape, model.roi, args.overlap, args.sw_batch_size)
            activations = memory.activations(batch) or 0
            on_device = activations + device_bytes(
                grid.network_shape,
                model.in_channels,
                model.out_channels,
                model.roi,
                batch,
                math.prod(grid.input_shape),
                holder == device,
            )
            if on_device > free:
                raise UsageError(
                    f"{grid.name}: inference needs about {gigabytes(on_device)} on {device} (the network's "
                    f"activations for {batch} windows, a row of {'x'.join(map(str, model.roi))} windows across "
                    f"{grid.network_shape[0]}x{grid.network_shape[1]} voxels, {model.out_channels} outputs), which "
                    f"has {gigabytes(free)} free: use --sw_batch_size 1, or --device cpu"
                )


def _test_mirror_axes(args, models: list[LoadedModel]) -> list[tuple[int, ...]]:
    """The axes each model mirrors at test time: none without ``--tta``; with it, those mirrored in its
    training (nnU-Net's rule; none for a model trained without mirroring, or whose card does not record
    it, each said in one line); ``--tta_axes`` for every model."""
    if args.tta_axes is not None:
        print(f"--tta_axes: every model mirrors along axes {describe_axes(args.tta_axes)}")
        return [tuple(args.tta_axes)] * len(models)
    if not args.tta:
        return [()] * len(models)
    for model in models:
        print(_tta_line(model))
    return [model.mirroring.axes or () for model in models]


def _tta_line(model: LoadedModel) -> str:
    """What ``--tta`` does with ``model``, in one line: its trained axes and pairs, or why it runs unmirrored."""
    mirroring, weights = model.mirroring, model.weights
    if mirroring.card is None:
        return (
            f"note: --tta: {weights} has no model card to say which axes it was trained to mirror: it runs "
            "unmirrored; --tta_axes 0,1,2 mirrors it anyway"
        )
    if mirroring.axes is None:
        return (
            f"note: --tta: the model card {mirroring.card} does not record the axes mirrored in training (written "
            f"before they were): {weights} runs unmirrored; --tta_axes 0,1,2 mirrors it anyway"
        )
    if not mirroring.axes:
        return (
            f"note: --tta: {weights} was trained without mirroring (the model card {mirroring.card} records no "
            "mirror axes), and mirrored passes would put left on right: one pass; --tta_axes overrides"
        )
    pairs = describe_pairs(model.config.labels, mirroring.lateral_pairs)
    swapped = f"left/right pairs swapped back: {pairs}" if LEFT_RIGHT_AXIS in mirroring.axes else "no pair swapped"
    return (
        f"--tta: {weights} mirrors along axes {describe_axes(mirroring.axes)} as in training "
        f"({len(mirrorings(mirroring.axes))} passes); {swapped}"
    )


def _mirrorings_text(test_axes: list[tuple[int, ...]]) -> str:
    """``, 8 mirrorings each`` (or ``, 8/1 mirrorings``, per model), nothing without mirrored passes."""
    counts = [len(mirrorings(axes)) for axes in test_axes]
    if max(counts) == 1:
        return ""
    if len(set(counts)) == 1:
        return f", {counts[0]} mirrorings each" if len(counts) > 1 else f", {counts[0]} mirrorings"
    return f", {'/'.join(map(str, counts))} mirrorings"


def _segment_cases(
    args, models, test_axes, cases, output: Path, device, autocast, label_map, keep, written, rows
) -> None:
    """Segment ``cases`` with the ensemble of ``models`` (each mirrored along its ``test_axes``), appending
    each written segmentation to ``written`` and, with ``--evaluate``, each case's metric rows to ``rows``
    (so that an interrupted run knows them)."""
    config, out_channels = models[0].config, models[0].out_channels
    networks = [
        ModelPasses(model.build(device), model.roi, axes, model.mirroring.lateral_pairs)
        for model, axes in zip(models, test_axes, strict=True)
    ]
    transforms = build_transforms(config, "test")
    images = [{"image": case["image"]} for case in cases]  # labels, if any, are read back for --evaluate
    dataset = CacheDataset(images, transforms, cache_rate=args.cache_rate, num_workers=args.num_workers)
    loader = DataLoader(dataset, batch_size=1, num_workers=args.num_workers, worker_init_fn=data_worker_init)
    output.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(cases), desc="Inference", dynamic_ncols=True) as bar, torch.no_grad():
        for batch, case in zip(loader, cases, strict=True):
            start = time.perf_counter()
            probabilities = mean_probabilities(
                batch["image"],
                networks,
                out_channels,
                args.sw_batch_size,
                args.overlap,
                autocast,
                device,
                finish=models[0].outputs.finish,
            )
            paths = _write_case(probabilities, batch["image"], case, keep, args.save_probabilities, models[0], output)
            written.append(paths[0])
            bar.update(1)
            seconds = time.perf_counter() - start
            bar.write(f"{case_output_name(case['image'])}: {seconds:.1f} s, wrote {', '.join(map(str, paths))}")
            if args.evaluate and "label" in case:
                rows += _evaluate(paths[0], case, config, label_map, args.nsd_tolerance)


def _write_case(probabilities, image, case, keep, save_probabilities, model, output: Path) -> list[Path]:
    """A case's probabilities (network grid) brought to the input's voxels slab by slab, its labels (largest
    components kept for ``keep``) written, and with ``save_probabilities`` the probabilities too: both
    written to temporary files, then renamed into place together (:class:`atomic_files.FileGroup`), so that
    an interrupt leaves the previous pair or the new one, never a segmentation without its probabilities."""
    grid, label_manager = InputGrid.of(image), model.outputs
    paths = [segmentation_path(case["image"], output)]
    with FileGroup() as files:
        if save_probabilities:
            paths.append(probabilities_path(case["image"], output))
            affine = nib.load(case_files({"image": case["image"]})[0]).affine
            shape = (model.out_channels, *grid.shape)
            with ProbabilitiesFile(files.temporary(paths[1]), shape, affine, label_manager.output_names) as file:
                labels = labels_on_input_grid(probabilities, grid, label_manager, file)
        else:
            labels = labels_on_input_grid(probabilities, grid, label_manager)
        labels = keep_largest(labels, keep) if keep else labels
        write_segmentation(labels, case["image"], files.temporary(paths[0]))
        files.commit()
    return paths


def _classes_to_keep(keep_largest: str | None, label_manager: LabelManager) -> list:
    """``--keep_largest``: comma-separated entries applied in order, each a class value (of a region model, a
    region number, 1 the first), label values joined by ``+`` kept as one (``1+2+3``), ``foreground`` (every
    foreground value as one: nnU-Net's first stage), or ``all`` alone (every class or region on its own); as
    the label values each keeps (:meth:`LabelManager.keep_largest_values`)."""
    if not keep_largest:
        return []
    if keep_largest.strip().lower() == "all":
        every = list(label_manager.scored()) if label_manager.has_regions else list(label_manager.foreground_values)
        return label_manager.keep_largest_values(every)
    what = "region numbers" if label_manager.has_regions else "class values"
    entries = []
    try:
        for text in filter(None, (part.strip() for part in keep_largest.split(","))):
            if text.lower() == "foreground":
                entries.append(label_manager.foreground_values)
            elif "+" in text:
                entries.append(tuple(int(value) for value in text.split("+")))
            else:
                entries.append(int(text))
    except ValueError:
        raise UsageError(
            f"--keep_largest {keep_largest}: expected {what} such as 1,3, label values kept as one such as 1+2, "
            "foreground, or all"
        ) from None
    if not entries:
        raise UsageError(f"--keep_largest {keep_largest}: expected {what} such as 1,3, or all")
    try:
        return label_manager.keep_largest_values(entries)
    except ValueError as error:
        raise UsageError(f"--keep_largest {keep_largest}: {error}") from None


def _report_evaluation(rows: list[dict], config: DatasetConfig, output: Path, count: int) -> None:
    manager = config.label_manager
    names = {key: name for key, (name, _) in manager.scored().items()}  # background not scored
    summary = write_reports(rows, names, output)
    scored = "regions rebuilt from the label maps" if manager.has_regions else "foreground classes"
    print(
        f"Evaluation in the original geometry ({counted(count, 'case')}; {scored}, background not scored): "
        f"{output / 'metrics.csv'}, {output / 'summary.json'}, {output / 'dice_per_class.png'}"
    )
    print(format_summary(summary, "region" if manager.has_regions else "class"))


def _evaluate(prediction_path: Path, case: dict, config, label_map, tolerance: float) -> list[dict]:
    """Metric rows of one saved prediction against its label, read back from disk."""
    groups = {key: values for key, (_, values) in config.label_manager.scored().items()}
    results = evaluate_file(prediction_path, case["label"], groups, label_map, tolerance, config.ignore_label)
    return [{"case": case_output_name(case["image"]), "class": value, **metrics} for value, metrics in results.items()]
