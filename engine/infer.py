"""The inference pass of test_seg.py: sliding window, transforms inverted, labels in the input geometry."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, decollate_batch
from monai.inferers import sliding_window_inference
from monai.transforms import AsDiscreted, Compose, Invertd
from tqdm import tqdm

from engine.common import (
    NetworkChoice,
    UsageError,
    as_json,
    autocast_for,
    check_output_folder,
    load_into,
    load_trained,
    model_card_path,
    network_from_flags,
    replace_atomically,
    roi_of,
    select_device,
    stitching_device,
)
from engine.data import verify_cases
from engine.evaluate import apply_label_map, evaluate_case, format_summary, parse_label_map, write_reports
from load_datasets_transforms import (
    MEDIAN,
    DatasetConfig,
    build_transforms,
    case_files,
    case_name,
    find_cases,
    load_dataset_config,
    resolve_root,
)
from networks import canonical_name, switch_to_deploy
from networks.dwconv import use_algorithm

__all__ = ["run_inference"]

#: The flags that describe a network's shape (a model card decides them when there is one).
SHAPE_FLAGS = ("feat_size", "kernel_size", "hidden_size")


def _output_name(image: str | list[str]) -> str:
    """The name a case's outputs take: its image file's without ``.nii.gz`` or ``.nii``, or for one file
    per channel the case name (without ``_0000``)."""
    if not isinstance(image, str):
        return case_name(image)
    return Path(image).name.removesuffix(".gz").removesuffix(".nii")


def _write_prediction(prediction: np.ndarray, image: str | list[str], output: Path) -> Path:
    image_path = case_files({"image": image})[0]  # the geometry of every channel file (checked)
    source = nib.load(image_path)
    shape = tuple(source.shape[:3])
    if prediction.shape != shape:
        raise RuntimeError(f"{image_path}: prediction shape {prediction.shape} differs from the input's {shape}")
    header = source.header.copy()
    header.set_data_dtype(np.uint8)
    nifti = nib.Nifti1Image(prediction.astype(np.uint8), source.affine, header)
    nifti.header.set_slope_inter(1.0, 0.0)
    path = output / f"{_output_name(image)}_seg.nii.gz"
    replace_atomically(path, lambda tmp: nib.save(nifti, tmp))
    return path


def run_inference(args) -> list[Path]:
    """Sliding-window inference over the test images, written as ``<case>_seg.nii.gz`` in each input's
    geometry (shape and affine), uint8 labels. Returns the written paths."""
    with use_algorithm(args.dwconv):
        return _infer(args)


def _model_from_card(card: dict, source: str, args, config: DatasetConfig):
    """The network, input channels, class count, ROI and dataset settings a model card decides; one line
    names the flags that say otherwise (the card wins)."""
    try:
        choice = NetworkChoice(canonical_name(card["network"]), dict(card["network_args"]))
        in_channels, out_channels = int(card.get("in_channels", 1)), int(card["out_channels"])
        roi = roi_of(card["roi_size"])
        card_config = config.with_preprocessing(card) if "spacing" in card else None
        classes = tuple(str(name) for name in card.get("classes", ()))
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(f"{source}: not a valid model card ({error})") from None
    if classes and len(classes) != out_channels:
        raise UsageError(f"{source}: not a valid model card ({len(classes)} classes for {out_channels} outputs)")
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
        if classes and not args.label_map and config.labels != classes:
            differing.append(f"{config.num_classes} classes (card: {len(classes)})")
        if differing:
            ignored.append(f"--dataset {args.dataset}: {', '.join(differing)}")
    if ignored:
        print(f"note: the model card {source} decides; ignored: {'; '.join(ignored)}")
    if card_config is None:
        print(f"note: {source} records no preprocessing; using that of {config.source or config.name}")
        card_config = config
    if classes and not args.label_map:  # with a label map, the dataset's labels describe the test labels
        card_config = replace(card_config, labels=classes)
    return choice, in_channels, out_channels, roi, card_config


def _preprocessing_differences(config: DatasetConfig, card_config: DatasetConfig) -> list[str]:
    """The dataset's preprocessing settings that differ from a card's (settings it leaves to the data
    agree with any)."""
    if config.in_channels != card_config.in_channels:
        return [f"{config.in_channels} channels (card: {card_config.in_channels})"]
    differing = []
    if config.spacing != MEDIAN and config.spacing != card_config.spacing:
        differing.append(f"spacing {_spacing_text(config.spacing)} (card: {_spacing_text(card_config.spacing)})")
    for name, mine, card in zip(config.channels, config.normalization, card_config.normalization, strict=True):
        if mine.scheme != card.scheme or (mine.window is not None and mine.window != card.window):
            differing.append(f"normalization of {name} {mine.describe()} (card: {card.describe()})")
    return differing


def _spacing_text(spacing) -> str:
    return f"{_text(spacing)} mm" if spacing else "native"


def _text(value) -> str:
    if isinstance(value, tuple | list):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _model_to_run(args, config: DatasetConfig):
    """The network, input channels, class count, ROI and dataset settings to segment with, and the weights:
    from the model
    card beside the weights or in a training checkpoint, else from the flags (published state dicts)."""
    state, checkpoint_card = load_trained(args.trained_weights, "--trained_weights")
    card_path = model_card_path(args.trained_weights)
    card, source = checkpoint_card, f"{args.trained_weights} (a training checkpoint: its model weights and card)"
    if card_path.is_file():
        try:
            card, source = json.loads(card_path.read_text()), str(card_path)
        except (OSError, ValueError) as error:
            raise UsageError(f"{card_path}: not a valid model card ({error})") from None
    if card is None:
        if config.to_derive():
            raise UsageError(
                f"--trained_weights {args.trained_weights}: no model card beside it, and {config.source} leaves "
                f"{', '.join(config.to_derive())} to the training data; segment with weights that have their card"
            )
        roi = roi_of(args.roi_size or 96)
        return network_from_flags(args, roi), config.in_channels, config.num_classes, roi, config, state
    choice, in_channels, out_channels, roi, config = _model_from_card(card, source, args, config)
    print(
        f"Model card {source}: {choice.name} {choice.overrides}, {out_channels} classes, ROI {_text(roi)}, "
        f"{in_channels} input channel{'s' * (in_channels > 1)} "
        f"({config.describe_channels()}), "
        f"spacing {_spacing_text(config.spacing)}"
    )
    return choice, in_channels, out_channels, roi, config, state


def _label_map_of(args, out_channels: int, config: DatasetConfig) -> dict[int, int] | None:
    """``--label_map`` parsed and checked against the model's classes and the dataset's labels."""
    if not args.label_map:
        return None
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


def _infer(args) -> list[Path]:
    device = select_device(args.device, args.gpu)
    autocast = autocast_for(args.amp, device)
    output = check_output_folder(args.output)
    config = load_dataset_config(_dataset_of(args), args.datalist)
    choice, in_channels, out_channels, roi, config, state = _model_to_run(args, config)
    root = resolve_root(config, args.root)
    cases = find_cases(config, root, "test")
    label_map = _label_map_of(args, out_channels, config)
    if args.evaluate and not all("label" in case for case in cases):
        raise UsageError(f"--evaluate needs labels: a labelsTs folder in {root} or a test list with labels")
    verify_cases(cases, config.num_classes, args.num_workers, in_channels=in_channels)
    model = choice.build(in_channels, out_channels)
    load_into(model, state, args.trained_weights, "--trained_weights", choice.name)
    switch_to_deploy(model)  # plain convolutions for RepUX-Net: same outputs, no W * M per forward
    model.to(device).eval()

    test_transforms = build_transforms(config, "test")
    images = [{"image": case["image"]} for case in cases]  # labels, if any, are read back for --evaluate
    dataset = CacheDataset(images, test_transforms, cache_rate=args.cache_rate, num_workers=args.num_workers)
    loader = DataLoader(dataset, batch_size=1, num_workers=args.num_workers)
    post = Compose(
        [
            Invertd(keys="pred", transform=test_transforms, orig_keys="image", nearest_interp=False, to_tensor=True),
            AsDiscreted(keys="pred", argmax=True),
        ]
    )
    output.mkdir(parents=True, exist_ok=True)
    written, rows = [], []
    with torch.no_grad():
        for batch, case in zip(tqdm(loader, desc="Inference", dynamic_ncols=True), cases, strict=True):
            output_device = stitching_device(batch["image"].shape[2:], out_channels, device)
            with autocast:
                logits = sliding_window_inference(
                    batch["image"].to(device),
                    roi,
                    args.sw_batch_size,
                    model,
                    overlap=args.overlap,
                    sw_device=device,
                    device=output_device,
                )
            batch["pred"] = torch.softmax(logits.float(), dim=1).cpu()
            item = post(decollate_batch(batch)[0])
            prediction = item["pred"][0].numpy().astype(np.uint8)
            written.append(_write_prediction(prediction, case["image"], output))
            print(f"Wrote {written[-1]}")
            if args.evaluate:
                rows += _evaluate(written[-1], case, config, label_map, args.nsd_tolerance)
    print(f"Wrote {len(written)} segmentations to {output}")
    if args.evaluate:
        names = {value: name for value, name in enumerate(config.labels) if value}  # background not scored
        summary = write_reports(rows, names, output)
        print(
            f"Evaluation in the original geometry ({len(written)} cases; foreground classes, background not "
            f"scored): {output / 'metrics.csv'}, "
            f"{output / 'summary.json'}, {output / 'dice_per_class.png'}"
        )
        print(format_summary(summary))
    return written


def _evaluate(prediction_path: Path, case: dict, config, label_map, tolerance: float) -> list[dict]:
    """Metric rows of one saved prediction against its label, read back from disk."""
    prediction = np.asarray(nib.load(prediction_path).dataobj)
    label_image = nib.load(case["label"])
    label = np.asarray(label_image.dataobj).round().astype(np.int64).reshape(prediction.shape)
    if label_map is not None:
        prediction = apply_label_map(prediction, label_map)
    spacing = [float(z) for z in label_image.header.get_zooms()[:3]]
    results = evaluate_case(prediction, label, spacing, range(1, config.num_classes), tolerance)
    return [{"case": _output_name(case["image"]), "class": value, **metrics} for value, metrics in results.items()]
