"""The published entry points of the data code, ``data_loader(args)`` and ``data_transforms(args)``,
with the published names and return values. The data code itself lives in :mod:`dataset`: describing a
dataset (``dataset.description``), finding and pairing its cases (``dataset.cases``), checking its files
(``dataset.checks``), its fingerprint and derived settings (``dataset.fingerprint``), its transforms
(``dataset.transforms``).
"""

from __future__ import annotations

from dataclasses import replace

from dataset.cases import find_cases, resolve_root
from dataset.checks import check_cases
from dataset.description import load_dataset_config
from dataset.fingerprint import derive_from_data
from dataset.transforms import build_transforms
from engine.common import roi_of

__all__ = ["data_loader", "data_transforms"]


def data_loader(args) -> tuple:
    """The published entry point: checked file lists of ``args.dataset`` under ``args.root``.

    Returns ``(train_samples, valid_samples, out_classes)`` for ``args.mode == "train"`` and
    ``(test_samples, out_classes)`` for ``"test"``; samples are ``{"images": [...], "labels": [...]}``.
    """
    config = load_dataset_config(args.dataset, getattr(args, "datalist", None))
    root = resolve_root(config, getattr(args, "root", None))
    print(f"Start to load data from directory: {root}")
    splits = ("training", "validation") if args.mode == "train" else ("test",)
    samples = []
    for split in splits:
        cases = find_cases(config, root, split)
        check_cases(cases, config.num_classes, in_channels=config.in_channels)
        samples.append({"images": [c["image"] for c in cases], "labels": [c["label"] for c in cases if "label" in c]})
    print(f"Finished loading all {args.mode} samples from dataset: {config.name}!")
    print(f"Number of classes for segmentation: {config.num_classes}")
    return (*samples, config.num_classes)


def data_transforms(args):
    """The published entry point: ``(train_transforms, val_transforms)`` or the test transforms. What a
    dataset JSON leaves to the data (spacing, CT normalisations, z-score masks) is derived from its training cases
    under ``args.root``, as training derives it (``dataset.fingerprint.derive_from_data``, remembered)."""
    config = load_dataset_config(args.dataset, getattr(args, "datalist", None))
    if config.to_derive():
        training = find_cases(config, resolve_root(config, getattr(args, "root", None)), "training")
        config, _ = derive_from_data(config, training, getattr(args, "num_workers", 0) or 1)
    if getattr(args, "mirror_axes", None) is not None:
        config = replace(config, mirror_axes=tuple(args.mirror_axes))
    roi = roi_of(getattr(args, "roi_size", 96))
    return build_transforms(config, args.mode, roi, getattr(args, "crop_sample", 2))
