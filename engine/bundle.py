"""A MONAI bundle of an exported model (the MONAI Model Zoo layout), runnable with MONAI alone:

    python -m monai.bundle run --bundle_root B --config_file B/configs/inference.json \\
        --dataset_dir IMAGES --output_dir OUT

``configs/inference.json`` holds the model card's preprocessing (the chain ``test_seg.py`` builds with
``dataset.transforms.build_transforms``) and test_seg.py's slab-wise sliding window and inversion to each
input's geometry; ``scripts/portable.py``, ``scripts/labels.py``, ``scripts/stitching.py`` and
``scripts/input_grid.py`` are this repository's ``dataset/portable.py``, ``dataset/labels.py``,
``engine/stitching.py`` and ``engine/input_grid.py``, copied;
``models/model.ts`` is the TorchScript deploy form.
"""

from __future__ import annotations

import json
from pathlib import Path

import monai
import nibabel
import numpy as np
import scipy
import torch

import dataset.labels
import dataset.portable
import engine.input_grid
import engine.stitching
from dataset.description import card_preprocessing
from dataset.labels import LabelManager
from dataset.laterality import check_lateral_pairs, describe_axes, describe_pairs
from dataset.portable import BODY_HU
from dataset.transforms import AXIS_LABELS, ORIENTATION

__all__ = ["bundle_files", "inference_config"]

#: The bundle's version of this layout (MONAI's metadata ``version``).
BUNDLE_VERSION = "0.1.0"
#: The metadata schema of the MONAI Model Zoo, which ``python -m monai.bundle verify_metadata`` checks against.
METADATA_SCHEMA = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)


#: The Model Zoo's logging configuration: MONAI's messages on the standard output.
LOGGING = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def _preprocessing_transforms(preprocessing: dict) -> list[dict]:
    """The test chain of ``dataset.transforms.build_transforms`` as MONAI config entries."""
    transforms = [
        {"_target_": "scripts.portable.LoadCased", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": ORIENTATION, "labels": [list(p) for p in AXIS_LABELS]},
    ]
    if preprocessing["spacing"] is not None:
        transforms.append({"_target_": "Spacingd", "keys": "image", "pixdim": "@spacing", "mode": "bilinear"})
    transforms += [
        {
            "_target_": "CropForegroundd",
            "keys": "image",
            "source_key": "image",
            "select_fn": {"_target_": "scripts.portable.AnyChannelForeground", "normalization": "@normalization"},
            "allow_smaller": True,
        },
        {"_target_": "scripts.portable.NormalizeChannelsd", "keys": "image", "normalization": "@normalization"},
        {"_target_": "EnsureTyped", "keys": "image", "dtype": "$numpy.float32", "track_meta": True},
    ]
    return transforms


#: The bundle's postprocessing: each case's labels written as test_seg.py names them.
POSTPROCESSING = [
    {
        "_target_": "SaveImaged",
        "keys": "pred",
        "output_dir": "@output_dir",
        "output_postfix": "seg",
        "output_ext": ".nii.gz",
        "output_dtype": "$numpy.uint8",
        "resample": False,
        "separate_folder": False,
        "output_name_formatter": {"_target_": "scripts.portable.saved_name", "_mode_": "callable"},
        "print_log": True,
    },
]


def postprocessing_transforms(keep_largest: list | None) -> list[dict]:
    """The bundle's postprocessing: keep-largest components (a study plan's, as label values) where given,
    then each case's labels written as test_seg.py names them."""
    kept = (
        []
        if not keep_largest
        else [{"_target_": "scripts.portable.KeepLargestd", "keys": "pred", "entries": keep_largest}]
    )
    return kept + POSTPROCESSING


def inference_config(card: dict, sw_batch_size: int, overlap: float, keep_largest: list | None = None) -> dict:
    """``configs/inference.json`` of the model ``card`` describes (``keep_largest``: a study plan's keep-largest
    entries, as the label values each keeps)."""
    preprocessing = card_preprocessing(card)
    return {
        "imports": ["$import os", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "dataset_dir": "$os.path.join(@bundle_root, 'images')",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "in_channels": int(card.get("in_channels", 1)),
        "channels": preprocessing["channels"],
        "normalization": preprocessing["normalization"],
        "spacing": preprocessing["spacing"],
        "roi_size": list(card["roi_size"]),
        "network_def": "$torch.jit.load(os.path.join(@bundle_root, 'models', 'model.ts'), map_location=@device)",
        "network": "$@network_def.eval()",
        "datalist": {
            "_target_": "scripts.portable.checked_cases",
            "folder": "@dataset_dir",
            "in_channels": "@in_channels",
        },
        "preprocessing": {"_target_": "Compose", "transforms": _preprocessing_transforms(preprocessing)},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "label_manager": {"_target_": "scripts.labels.LabelManager", **LabelManager.from_card(card).to_card()},
        "inferer": {
            "_target_": "scripts.input_grid.SlabInferer",
            "roi_size": "@roi_size",
            "label_manager": "@label_manager",
            "sw_batch_size": sw_batch_size,
            "overlap": overlap,
        },
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing_transforms(keep_largest)},
        "run": [
            {
                "_target_": "scripts.portable.segment_all",
                "dataloader": "@dataloader",
                "network": "@network",
                "inferer": "@inferer",
                "postprocessing": "@postprocessing",
                "device": "@device",
            }
        ],
    }


def _metadata(card: dict, source: str) -> dict:
    preprocessing = card_preprocessing(card)
    manager = LabelManager.from_card(card)
    outputs = manager.output_names
    # The modality is the channels' (a FeTA T2w scaled by a fixed window, the "ct" scheme, is still MR).
    modalities = sorted({"CT" if name.strip().lower() == "ct" else "MR" for name in preprocessing["channels"]})
    return {
        "schema": METADATA_SCHEMA,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported from {Path(source).name} by the RepUX-Net repository's export.py"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"nibabel": nibabel.__version__, "scipy": scipy.__version__},
        "name": f"{card['network']} {card.get('dataset', '')}".strip(),
        "task": f"{card.get('dataset', 'volume')} segmentation",
        "description": f"{card['network']} trained with the 3D RepUX-Net repository; {manager.describe()}",
        "authors": "whoever trained the weights (see docs/README.md)",
        "copyright": "as the training data's licence allows",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield" if modalities == ["CT"] else "magnitude",
                    "modality": "/".join(modalities),
                    "num_channels": int(card.get("in_channels", 1)),
                    "spatial_shape": list(card["roi_size"]),
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": dict(enumerate(preprocessing["channels"])),
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": len(outputs),
                    "spatial_shape": list(card["roi_size"]),
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": dict(enumerate(outputs)),
                }
            },
        },
    }


#: What each normalisation scheme does (``dataset.portable``), for the bundle README.
SCHEME_TEXT = {
    "ct": "clipped to the window and scaled to [0, 1]; the crop keeps where it is above the window's low end",
    "ct_zscore": (
        "clipped to the window, minus the mean, divided by the standard deviation (nnU-Net's CT "
        f"normalisation, the training cases' foreground statistics); the crop keeps the body (above {BODY_HU:g} HU)"
    ),
    "zscore": (
        "minus its mean, divided by its standard deviation, in each case on its own (with nonzero_mask over "
        "the non-zero region only); the crop keeps where it is non-zero"
    ),
    "none": "as it is; the crop keeps where it is non-zero",
}


def _schemes_note(normalization: list) -> str:
    """What each normalisation scheme a model uses does, as the bundle README's list items."""
    schemes = dict.fromkeys(entry if isinstance(entry, str) else entry["scheme"] for entry in normalization)
    return "\n".join(f"  - `{scheme}`: {SCHEME_TEXT[scheme]}" for scheme in schemes)


def _plan_note(plan: dict | None, manager: LabelManager) -> str:
    """What the bundle applies of a study's plan (its keep-largest postprocessing) and what not."""
    if plan is None:
        return "- postprocessing: none (`test_seg.py --keep_largest` or a study's `--plan` is not applied)"
    names = manager.label_map_names()
    kept = [
        names.get(entry, str(entry)) if isinstance(entry, int) else "+".join(names.get(v, str(v)) for v in entry)
        for entry in plan["keep_largest"]
    ]
    ensemble = (
        f"; the plan's {plan['weights']} weights (its folds and configurations) are an ensemble this bundle of one "
        "model does not reproduce, and it runs one unmirrored pass: `test_seg.py --plan` applies the whole plan"
        if plan["weights"] > 1
        else ""
    )
    what = ", then ".join(kept) if kept else "nothing (the study kept no step)"
    study = Path(plan["plan"]).name
    return f"- postprocessing, from the study plan `{study}`: the largest component kept of {what}{ensemble}"


def _readme(card: dict, source: str, config: dict, plan: dict | None = None) -> str:
    preprocessing = card_preprocessing(card)
    manager = LabelManager.from_card(card)
    classes = list(manager.classes)
    spacing = preprocessing["spacing"]
    grid = f"{'x'.join(f'{value:g}' for value in spacing)} mm" if spacing else "the native grid"
    return f"""# {card["network"]}: {card.get("dataset", "segmentation")}

Exported from `{Path(source).name}` by the 3D RepUX-Net repository's `export.py`: the network's deploy form
(TorchScript, every depthwise convolution a native `conv3d`), with the preprocessing it was trained with.

## Run

```bash
python -m monai.bundle run --bundle_root BUNDLE --config_file BUNDLE/configs/inference.json \\
    --dataset_dir IMAGES --output_dir OUT
```

needs PyTorch, MONAI with its command line (`pip install "monai[fire]"`), nibabel and SciPy only.
Every `.nii`/`.nii.gz` in `IMAGES` is a case (with several input channels: a 4D file, whatever its name,
or `<case>_0000.nii.gz`, `<case>_0001.nii.gz`, ... one file per channel, stacked on channel 0's geometry
when their affines differ by float noise); `OUT/<case>_seg.nii.gz` is its segmentation (uint8, in the
input's geometry; `<case>` without nnU-Net's `_0000`, as the repository's `test_seg.py` names it). Any
entry of the config can be set for one run, e.g. `--inferer#overlap 0.7`.

## The model

- input: {int(card.get("in_channels", 1))} channel(s): {", ".join(preprocessing["channels"])}
- {_outputs_note(manager)}
- preprocessing: reoriented to {ORIENTATION}, resampled to {grid} (bilinear), cropped to the foreground
  (the box of the voxels where any channel shows it), each channel normalised:
  {"; ".join(json.dumps(entry) for entry in preprocessing["normalization"])}
{_schemes_note(preprocessing["normalization"])}
- sliding window {"x".join(map(str, card["roi_size"]))}, batch {config["inferer"]["sw_batch_size"]}, overlap
  {config["inferer"]["overlap"]}; the {"regions' sigmoid" if manager.has_regions else "softmax"} stitched a slab
  at a time and held in 2 bytes per output and voxel, brought to the input's voxels a slab at a time
  (trilinear, the crop and the orientation undone), {_label_map_note(manager)}: what the repository's
  `test_seg.py` does
- {_mirroring_note(card, classes)}
{_plan_note(plan, manager)}

`scripts/portable.py` holds the operations MONAI has no transform for (the per-channel normalisation,
the foreground rule, the image folder's cases and the loop), `scripts/labels.py` what the outputs mean,
`scripts/stitching.py` and `scripts/input_grid.py` the slab-wise inference; the same files the training
repository preprocesses and segments with.
"""


def _outputs_note(manager: LabelManager) -> str:
    if not manager.has_regions:
        return f"classes: {', '.join(f'{i} {name}' for i, name in enumerate(manager.classes))}"
    regions = "; ".join(f"{name}: labels {', '.join(map(str, values))}" for name, values in manager.regions.items())
    painted = ", ".join(f"{value} {name}" for value, name in manager.label_map_names().items())
    return f"outputs: one sigmoid per region ({regions}); the label map's values: {painted}"


def _label_map_note(manager: LabelManager) -> str:
    if not manager.has_regions:
        return "argmax"
    order = ", ".join(map(str, manager.regions_class_order))
    return f"each region above 0.5 painted with its label ({order}, in region order; later regions overwrite)"


def _mirroring_note(card: dict, classes: list[str]) -> str:
    """What the bundle's README says of test-time mirroring: it runs one pass, unmirrored."""
    axes = card.get("mirror_axes")
    if not axes:
        trained = "trained without mirroring" if axes == [] else "trained without recorded mirroring"
        return f"one pass, unmirrored: the model was {trained}, and mirrored passes would put left on right"
    pairs = describe_pairs(classes, check_lateral_pairs(card.get("lateral_pairs", []), len(classes), "card"))
    return (
        f"one pass, unmirrored: this bundle does not mirror at test time. The model was trained mirrored along "
        f"the RAS axes {describe_axes(axes)}; the repository's `test_seg.py --tta` averages those mirrorings, "
        f"swapping back the left/right pairs ({pairs}) on left-right flips"
    )


def bundle_files(
    card: dict, torchscript: bytes, source: str, sw_batch_size: int, overlap: float, plan: dict | None = None
) -> dict[str, bytes]:
    """The bundle's files (relative path -> content) for the model ``card`` describes (as export.py passes
    it: each channel's normalisation in full), whose TorchScript deploy form is ``torchscript``; ``source``
    names the trained weights; ``plan``: a study plan's postprocessing (``keep_largest`` as label values, the
    ``plan`` file and its number of ``weights``)."""
    config = inference_config(card, sw_batch_size, overlap, plan and plan["keep_largest"])
    return {
        "configs/inference.json": (json.dumps(config, indent=2) + "\n").encode(),
        "configs/metadata.json": (json.dumps(_metadata(card, source), indent=2) + "\n").encode(),
        "models/model.ts": torchscript,
        "scripts/__init__.py": b'"""The operations of this bundle that MONAI has no transform for."""\n',
        "configs/logging.conf": LOGGING.encode(),
        "scripts/portable.py": Path(dataset.portable.__file__).read_bytes(),
        "scripts/labels.py": Path(dataset.labels.__file__).read_bytes(),
        "scripts/stitching.py": Path(engine.stitching.__file__).read_bytes(),
        "scripts/input_grid.py": Path(engine.input_grid.__file__).read_bytes(),
        "docs/README.md": _readme(card, source, config, plan).encode(),
    }
