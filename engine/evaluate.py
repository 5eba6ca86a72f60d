"""Evaluation of saved segmentations in their original geometry: Dice, HD95 and normalised surface Dice.

Distances are in millimetres of the original image (its voxel spacing). How empty masks count, per
case and class:

- label and prediction both empty: the class is absent from the case; every metric is NaN and the
  row is left out of the means (it is still written to ``metrics.csv``);
- label present, prediction empty (a miss) or label empty, prediction present (a false alarm): Dice 0,
  NSD 0, and HD95 the length of the image's diagonal in mm (the worst possible distance), so that a
  miss is never better than a poor hit.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.metrics.utils import get_mask_edges, get_surface_distance
from PIL import Image, ImageDraw

from atomic_files import replace_atomically

__all__ = [
    "apply_label_map",
    "dice_chart",
    "dice_scores",
    "evaluate_case",
    "format_summary",
    "parse_label_map",
    "read_label",
    "summarise",
    "write_bar_chart",
    "write_reports",
]

METRICS = ("dice", "hd95", "nsd")


def parse_label_map(text: str) -> dict[int, int]:
    """``"3:1,1:2"`` -> ``{3: 1, 1: 2}``: model class -> test-set label (unlisted classes -> background)."""
    mapping = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        source, sep, target = item.partition(":")
        if not sep or not source.strip().isdigit() or not target.strip().isdigit():
            raise ValueError(f"--label_map {text!r}: expected MODEL_CLASS:TEST_LABEL pairs such as 3:1,1:2")
        if int(source) in mapping:
            raise ValueError(f"--label_map {text!r}: class {int(source)} is mapped twice")
        mapping[int(source)] = int(target)
    if not mapping:
        raise ValueError(f"--label_map {text!r}: no MODEL_CLASS:TEST_LABEL pair")
    return mapping


def apply_label_map(prediction: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    """Relabel a prediction: each mapped model class gets its test label, every other voxel background."""
    lookup = np.zeros(max(int(prediction.max(initial=0)), max(mapping)) + 1, dtype=np.int64)
    for source, target in mapping.items():
        lookup[source] = target
    return lookup[prediction.astype(np.int64)]


def evaluate_case(
    prediction: np.ndarray,
    label: np.ndarray,
    spacing: Sequence[float],
    classes: Sequence[int] | Mapping[int, Sequence[int]],
    nsd_tolerance: float = 1.0,
    ignore_label: int | None = None,
) -> dict[int, dict[str, float]]:
    """Dice, HD95 (mm) and NSD (tolerance in mm) of each class value in ``classes`` for one case, or of each
    region of a mapping key -> label values (the region is the voxels of any of its values, in the
    prediction and in the label: nnU-Net's ``region_or_label_to_mask``); voxels labelled ``ignore_label``
    (unannotated) count in no class or region, predicted or expected."""
    if prediction.shape != label.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from label shape {label.shape}")
    diagonal = float(np.linalg.norm(np.array(label.shape) * np.array(spacing, dtype=float)))
    results = {}
    annotated = label != ignore_label if ignore_label is not None else True
    groups = classes if isinstance(classes, Mapping) else {value: (value,) for value in classes}
    for value, values in groups.items():
        predicted, expected = _masks(prediction, label, values, annotated)
        dice = _dice(predicted, expected)
        if math.isnan(dice):
            results[value] = {name: math.nan for name in METRICS}
        elif not predicted.any() or not expected.any():
            results[value] = {"dice": 0.0, "hd95": diagonal, "nsd": 0.0}
        else:
            results[value] = {"dice": dice, **_surface_metrics(predicted, expected, spacing, nsd_tolerance)}
    return results


def evaluate_file(
    prediction_path: str | Path,
    label_path: str | Path,
    groups: Mapping[int, Sequence[int]],
    label_map: Mapping[int, int] | None = None,
    tolerance: float = 1.0,
    ignore_label: int | None = None,
) -> dict[int, dict[str, float]]:
    """:func:`evaluate_case` of a saved prediction against its label file, both read back from disk, the
    prediction relabelled by ``label_map`` first (``--label_map``, a union source's labels) where given; the
    label's voxel spacing."""
    prediction = np.asarray(nib.load(prediction_path).dataobj)
    label_image = nib.load(label_path)
    label = read_label(label_image, prediction.shape)
    if label_map is not None:
        prediction = apply_label_map(prediction, label_map)
    spacing = [float(z) for z in label_image.header.get_zooms()[:3]]
    return evaluate_case(prediction, label, spacing, groups, tolerance, ignore_label=ignore_label)


def read_label(image: nib.Nifti1Image, shape: Sequence[int]) -> np.ndarray:
    """A label file's values as integers, in the shape of the prediction scored against it."""
    return np.asarray(image.dataobj).round().astype(np.int64).reshape(shape)


def dice_scores(
    prediction: np.ndarray, label: np.ndarray, groups: Mapping[int, Sequence[int]], ignore_label: int | None = None
) -> dict[int, float]:
    """The Dice of each group (key -> label values: a class, or a region) of one case, as :func:`evaluate_case`
    scores it (nnU-Net's ``compute_metrics``: NaN where the group is in neither, 0 where in one only)."""
    annotated = label != ignore_label if ignore_label is not None else True
    return {key: _dice(*_masks(prediction, label, values, annotated)) for key, values in groups.items()}


def _masks(prediction: np.ndarray, label: np.ndarray, values: Sequence[int], annotated) -> tuple:
    return np.isin(prediction, values) & annotated, np.isin(label, values)


def _dice(predicted: np.ndarray, expected: np.ndarray) -> float:
    p, e = int(predicted.sum()), int(expected.sum())
    if p == 0 and e == 0:
        return math.nan
    return 2.0 * int(np.logical_and(predicted, expected).sum()) / (p + e)


def _surface_metrics(predicted: np.ndarray, expected: np.ndarray, spacing: Sequence[float], tolerance: float) -> dict:
    """HD95 and NSD of two non-empty masks from one extraction of their surfaces, as MONAI's
    ``compute_hausdorff_distance(percentile=95)`` and ``compute_surface_dice`` compute them: the larger of
    the two directed 95th-percentile distances, and the fraction of both surfaces within ``tolerance``."""
    edges_pred, edges_true = get_mask_edges(predicted, expected)
    to_true = np.asarray(get_surface_distance(edges_pred, edges_true, "euclidean", list(spacing)), dtype=np.float64)
    to_pred = np.asarray(get_surface_distance(edges_true, edges_pred, "euclidean", list(spacing)), dtype=np.float64)
    hd95 = max(float(np.quantile(to_true, 0.95)), float(np.quantile(to_pred, 0.95)))
    within = int((to_true <= tolerance).sum() + (to_pred <= tolerance).sum())
    return {"hd95": hd95, "nsd": within / (to_true.size + to_pred.size)}


def summarise(rows: Sequence[dict], class_names: Mapping[int, str]) -> dict:
    """Mean and standard deviation of each metric per class and over all the rows' classes, the foreground
    classes as test_seg.py scores them (NaN rows left out)."""

    def stats(values: list[float]) -> dict:
        values = [v for v in values if not math.isnan(v)]
        if not values:
            return {"mean": None, "std": None, "n": 0}
        return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}

    summary = {"classes": {}, "overall": {}}
    for value, name in class_names.items():
        chosen = [row for row in rows if row["class"] == value]
        summary["classes"][name] = {metric: stats([row[metric] for row in chosen]) for metric in METRICS}
    summary["overall"] = {metric: stats([row[metric] for row in rows]) for metric in METRICS}
    return summary


#: The Dice charts' left margin and the height of their bars' area (pixels; Dice 1 is a full bar).
CHART_MARGIN, CHART_BARS = 60, 300


def dice_chart(width: int, height: int, title: str) -> tuple[Image.Image, ImageDraw.ImageDraw, int]:
    """A white chart with its Dice axis (0 to 1) and title; returns the image, its drawing and the bars' base
    line (y)."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    base = CHART_MARGIN + CHART_BARS
    draw.line([(CHART_MARGIN, CHART_MARGIN), (CHART_MARGIN, base), (width - 20, base)], fill="black", width=2)
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = base - tick * CHART_BARS
        draw.line([(CHART_MARGIN - 5, y), (CHART_MARGIN, y)], fill="black")
        draw.text((8, y - 6), f"{tick:.2f}", fill="black")
    draw.text((CHART_MARGIN, 15), title, fill="black")
    return image, draw, base


def write_bar_chart(summary: dict, path: Path) -> None:
    """A PNG bar chart of the mean Dice of each class (with its standard deviation)."""
    names = list(summary["classes"])
    margin, bar_area = CHART_MARGIN, CHART_BARS
    image, draw, base = dice_chart(160 + 90 * len(names), 420, "Dice per class (mean, std)")
    for i, name in enumerate(names):
        stats = summary["classes"][name]["dice"]
        x = margin + 30 + 90 * i
        if stats["mean"] is not None:
            top = base - stats["mean"] * bar_area
            draw.rectangle([(x, top), (x + 50, base)], fill=(70, 130, 180))
            spread = stats["std"] * bar_area
            draw.line([(x + 25, top - spread), (x + 25, min(base, top + spread))], fill="black", width=2)
            draw.text((x, top - 16 - spread), f"{stats['mean']:.3f}", fill="black")
        draw.text((x, base + 8), name[:12], fill="black")
    replace_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


def write_reports(rows: Sequence[dict], class_names: Mapping[int, str], output: Path) -> dict:
    """``metrics.csv`` (one row per case and class), ``summary.json`` and ``dice_per_class.png``."""
    fields = ["case", "class", "name", *METRICS]

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fields)
            writer.writeheader()
            for row in rows:
                writer.writerow({**row, "name": class_names[row["class"]]})

    replace_atomically(output / "metrics.csv", write_csv)
    summary = summarise(rows, class_names)
    replace_atomically(output / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2) + "\n"))
    write_bar_chart(summary, output / "dice_per_class.png")
    return summary


def format_summary(summary: dict, scored: str = "class") -> str:
    """The summary as a markdown table (mean ± std), one row per ``scored`` (class or region)."""

    def cell(stats: dict) -> str:
        return "n/a" if stats["mean"] is None else f"{stats['mean']:.4f} ± {stats['std']:.4f}"

    lines = [f"| {scored} | Dice | HD95 (mm) | NSD |", "|---|---|---|---|"]
    for name, metrics in summary["classes"].items():
        lines.append(f"| {name} | " + " | ".join(cell(metrics[m]) for m in METRICS) + " |")
    lines.append("| **foreground mean** | " + " | ".join(cell(summary["overall"][m]) for m in METRICS) + " |")
    return "\n".join(lines)
