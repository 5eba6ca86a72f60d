"""The one training loop (main_train.py, main_finetune.py) and the inference pass (test_seg.py).

Flags -> dataset configuration, checked file lists and a registry network -> iteration-based training
with sliding-window validation -> ``best_metric_model.pth`` (a plain state_dict) and its model card
``best_metric_model.pth.json``; or -> predictions in the input geometry.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, decollate_batch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from monai.transforms import AsDiscreted, Compose, Invertd
from monai.utils import set_determinism
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from load_datasets_transforms import DatasetConfig, build_transforms, check_cases, find_cases, load_dataset_config
from networks import build_network, canonical_name, get_spec, overrides_from_flags, replace_head, switch_to_deploy
from optimizers import build_optimizer, build_scheduler

__all__ = ["UsageError", "run_inference", "run_training", "validate"]

BEST_WEIGHTS = "best_metric_model.pth"


class UsageError(ValueError):
    """A flag or file the user must fix; the message names it and says what is wrong."""


def select_device(choice: str, gpu: int) -> torch.device:
    """``--device auto|cpu|cuda`` with ``--gpu`` as the CUDA index."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if not 0 <= gpu < torch.cuda.device_count():
        raise UsageError(f"--gpu {gpu}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", gpu)


def roi_of(roi_size: Sequence[int]) -> tuple[int, int, int]:
    roi = tuple(int(r) for r in roi_size)
    return roi * 3 if len(roi) == 1 else roi


@dataclass(frozen=True)
class NetworkChoice:
    """A registry network and its constructor overrides, as the model card stores them."""

    name: str
    overrides: dict

    def build(self, in_channels: int, out_channels: int) -> nn.Module:
        try:
            return build_network(self.name, in_channels, out_channels, **self.overrides)
        except ValueError as error:
            raise UsageError(f"--network {self.name}: {error}") from None


def network_from_flags(args, roi: tuple[int, int, int]) -> NetworkChoice:
    """The network the flags ask for; checks the ROI against the network's input multiple."""
    try:
        name = canonical_name(args.network)
        overrides = overrides_from_flags(
            name, feat_size=args.feat_size, kernel_size=args.kernel_size, hidden_size=args.hidden_size, roi_size=roi
        )
    except ValueError as error:
        raise UsageError(f"--network {args.network}: {error}") from None
    multiple = get_spec(name).input_multiple
    if any(r % multiple for r in roi):
        raise UsageError(f"--roi_size {','.join(map(str, roi))}: {name} needs multiples of {multiple}")
    return NetworkChoice(name, overrides)


def _replace_atomically(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` to a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_torch(obj, path: Path) -> None:
    _replace_atomically(path, lambda tmp: torch.save(obj, tmp))


def save_json(data: dict, path: Path) -> None:
    _replace_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def model_card_path(weights: str | os.PathLike) -> Path:
    """The model card beside a weights file: ``best_metric_model.pth`` -> ``best_metric_model.pth.json``."""
    return Path(f"{weights}.json")


def load_weights(path: str | os.PathLike, flag: str) -> dict:
    """A state_dict from ``path``: a plain one (published format) or one under ``state_dict``/``model``."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or foreign files
        raise UsageError(f"{flag} {path}: cannot read as PyTorch weights ({error})") from None
    if isinstance(loaded, dict):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise UsageError(f"{flag} {path}: not a state_dict of tensors")
    return loaded


def load_into(model: nn.Module, state: dict, path: str | os.PathLike, flag: str, network: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with an error that names the file and the mismatch."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split("\n", 2)[1:2]).strip() or str(error)
        raise UsageError(
            f"{flag} {path}: does not fit {network} with these flags ({detail[:300]}); check --network, "
            "--feat_size, --kernel_size, --hidden_size and the class count"
        ) from None


def validate(
    model: nn.Module,
    loader: DataLoader,
    roi: Sequence[int],
    sw_batch_size: int,
    num_classes: int,
    device: torch.device,
    progress: bool = True,
) -> tuple[float, list[float]]:
    """Sliding-window validation: the published mean Dice (background included, mean over cases and
    classes) and the Dice of each class (mean over the cases where it is present)."""
    metric = DiceMetric(include_background=True, reduction="none", get_not_nans=False)
    model.eval()
    with torch.no_grad():
        for batch in tqdm(loader, desc="Validate", dynamic_ncols=True, leave=False, disable=not progress):
            image, label = batch["image"].to(device), batch["label"].to(device)
            logits = sliding_window_inference(image, roi, sw_batch_size, model)
            prediction = one_hot(logits.argmax(1, keepdim=True), num_classes)
            metric(y_pred=prediction, y=one_hot(label.long(), num_classes))
    scores = metric.aggregate()  # cases x classes, NaN where a class is absent from the label
    metric.reset()
    model.train()
    per_class = torch.nanmean(scores, dim=0).tolist()
    return float(torch.nanmean(scores)), per_class


def _loop(loader: DataLoader) -> Iterator[dict]:
    while True:
        yield from loader


def _checked_cases(config: DatasetConfig, root: str, split: str) -> list[dict]:
    cases = find_cases(config, root, split)
    check_cases(cases, config.num_classes)
    return cases


def run_training(args, finetune: bool = False) -> float:
    """Train as main_train.py (``finetune=False``) or main_finetune.py does; returns the best mean Dice.

    Everything a user can get wrong (flags, weights file, dataset files) is checked before any caching
    or training starts.
    """
    device = select_device(args.device, args.gpu)
    roi = roi_of(args.roi_size)
    output = Path(args.output)
    if (output / BEST_WEIGHTS).exists() and not args.overwrite:
        raise UsageError(f"--output {output}: already holds {BEST_WEIGHTS}; pass --overwrite or choose another folder")
    config = load_dataset_config(args.dataset, args.datalist)
    choice = network_from_flags(args, roi)
    state = None
    if args.pretrain:
        if not args.pretrained_weights:
            raise UsageError("--pretrain true needs --pretrained_weights")
        state = load_weights(args.pretrained_weights, "--pretrained_weights")
    pretrain_classes = getattr(args, "pretrain_classes", None) if finetune else None
    train_cases = _checked_cases(config, args.root, "training")
    val_cases = _checked_cases(config, args.root, "validation")
    print(
        f"Dataset {config.name}: {len(train_cases)} training and {len(val_cases)} validation cases, "
        f"{config.num_classes} classes ({', '.join(config.labels)})"
    )

    set_determinism(seed=args.seed)
    if state is not None:
        loaded_classes = pretrain_classes or config.num_classes
        model = choice.build(1, loaded_classes)
        load_into(model, state, args.pretrained_weights, "--pretrained_weights", choice.name)
        if finetune:
            replace_head(model, choice.name, config.num_classes)
            print(f"Loaded {args.pretrained_weights} ({loaded_classes} classes); new head for {config.num_classes}")
        else:
            print(f"Loaded {args.pretrained_weights}")
    else:
        model = choice.build(1, config.num_classes)
    model.to(device)

    train_transforms, val_transforms = build_transforms(config, "train", roi, args.crop_sample)
    train_ds = CacheDataset(train_cases, train_transforms, cache_rate=args.cache_rate, num_workers=args.num_workers)
    val_ds = CacheDataset(val_cases, val_transforms, cache_rate=args.cache_rate, num_workers=args.num_workers)
    pin = device.type == "cuda"
    train_loader = DataLoader(
        train_ds, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers, pin_memory=pin
    )
    val_loader = DataLoader(val_ds, batch_size=1, num_workers=args.num_workers, pin_memory=pin)

    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    try:
        optimizer = build_optimizer(model, args.optim, lr=args.lr)
        scheduler = build_scheduler(optimizer, args.lr_schedule, max_iter=args.max_iter, warmup_iter=args.warmup_iter)
    except ValueError as error:
        raise UsageError(f"--optim/--lr/--lr_schedule: {error}") from None

    output.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(log_dir=str(output / "tensorboard"))
    card = {
        "network": choice.name,
        "network_args": choice.overrides,
        "in_channels": 1,
        "out_channels": config.num_classes,
        "classes": list(config.labels),
        "dataset": config.name,
        "spacing": config.spacing,
        "intensity": {"a_min": config.a_min, "a_max": config.a_max},
        "roi_size": list(roi),
    }
    best_dice, best_step, step = 0.0, 0, 0
    batches = _loop(train_loader)
    model.train()
    bar = tqdm(total=args.max_iter, desc="Training", dynamic_ncols=True)
    try:
        while step < args.max_iter:
            batch = next(batches)
            image, label = batch["image"].to(device), batch["label"].to(device)
            loss = loss_function(model(image), label)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            writer.add_scalar("train/loss", loss.item(), step)
            writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
            scheduler.step()
            step += 1
            bar.update(1)
            bar.set_description(
                f"Training ({step} / {args.max_iter} Steps) (loss={loss.item():2.5f}, best dice={best_dice:.4f})"
            )
            if step % args.eval_step == 0 or step == args.max_iter:
                dice, per_class = validate(model, val_loader, roi, args.sw_batch_size, config.num_classes, device)
                writer.add_scalar("val/mean_dice", dice, step)
                for name, value in zip(config.labels, per_class, strict=True):
                    writer.add_scalar(f"val/dice_{name.replace(' ', '_')}", value, step)
                if dice > best_dice:
                    best_dice, best_step = dice, step
                    save_torch(model.state_dict(), output / BEST_WEIGHTS)
                    save_json(
                        {**card, "best_metric": best_dice, "best_step": best_step},
                        model_card_path(output / BEST_WEIGHTS),
                    )
                    verdict = "saved new best model"
                else:
                    verdict = "not improved"
                classes = ", ".join(f"{n} {v:.4f}" for n, v in zip(config.labels, per_class, strict=True))
                bar.write(
                    f"step {step}: mean Dice {dice:.4f} ({verdict}; best {best_dice:.4f} at step "
                    f"{best_step}); per class: {classes}"
                )
    finally:
        bar.close()
        writer.close()
    print(f"Training finished: best mean Dice {best_dice:.4f} at step {best_step}; weights in {output / BEST_WEIGHTS}")
    return best_dice


def _write_prediction(prediction: np.ndarray, image_path: str, output: Path) -> Path:
    source = nib.load(image_path)
    shape = tuple(source.shape[:3])
    if prediction.shape != shape:
        raise RuntimeError(f"{image_path}: prediction shape {prediction.shape} differs from the input's {shape}")
    header = source.header.copy()
    header.set_data_dtype(np.uint8)
    nifti = nib.Nifti1Image(prediction.astype(np.uint8), source.affine, header)
    nifti.header.set_slope_inter(1.0, 0.0)
    name = Path(image_path).name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem
    path = output / f"{stem}_seg.nii.gz"
    _replace_atomically(path, lambda tmp: nib.save(nifti, tmp))
    return path


def run_inference(args) -> list[Path]:
    """Sliding-window inference over the test images, written as ``<case>_seg.nii.gz`` in each input's
    geometry (shape and affine), uint8 labels. Returns the written paths."""
    device = select_device(args.device, args.gpu)
    config = load_dataset_config(args.dataset, args.datalist)
    state = load_weights(args.trained_weights, "--trained_weights")
    card_path = model_card_path(args.trained_weights)
    if card_path.is_file():
        try:
            card = json.loads(card_path.read_text())
            choice = NetworkChoice(canonical_name(card["network"]), dict(card["network_args"]))
            out_channels = int(card["out_channels"])
            roi = roi_of(args.roi_size or card["roi_size"])
        except (ValueError, KeyError, TypeError) as error:
            raise UsageError(f"{card_path}: not a valid model card ({error})") from None
        print(f"Network from {card_path}: {choice.name} {choice.overrides}, {out_channels} classes")
    else:
        roi = roi_of(args.roi_size or (96,))
        choice = network_from_flags(args, roi)
        out_channels = config.num_classes
    cases = find_cases(config, args.root, "test")
    check_cases(cases, config.num_classes)
    model = choice.build(1, out_channels)
    load_into(model, state, args.trained_weights, "--trained_weights", choice.name)
    switch_to_deploy(model)  # plain convolutions for RepUX-Net: same outputs, no W * M per forward
    model.to(device).eval()

    test_transforms = build_transforms(config, "test")
    images = [{"image": case["image"]} for case in cases]
    dataset = CacheDataset(images, test_transforms, cache_rate=args.cache_rate, num_workers=args.num_workers)
    loader = DataLoader(dataset, batch_size=1, num_workers=args.num_workers)
    post = Compose(
        [
            Invertd(keys="pred", transform=test_transforms, orig_keys="image", nearest_interp=False, to_tensor=True),
            AsDiscreted(keys="pred", argmax=True),
        ]
    )
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    with torch.no_grad():
        for batch, case in zip(tqdm(loader, desc="Inference", dynamic_ncols=True), images, strict=True):
            logits = sliding_window_inference(
                batch["image"].to(device), roi, args.sw_batch_size, model, overlap=args.overlap
            )
            batch["pred"] = torch.softmax(logits, dim=1).cpu()
            item = post(decollate_batch(batch)[0])
            prediction = item["pred"][0].numpy().astype(np.uint8)
            written.append(_write_prediction(prediction, case["image"], output))
            print(f"Wrote {written[-1]}")
    print(f"Wrote {len(written)} segmentations to {output}")
    return written
