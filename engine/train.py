"""The one training loop of main_train.py and main_finetune.py.

Iteration-based, as published: validation every ``--eval_step`` steps and at the end, ``best_metric_model.pth``
(a plain state_dict) and its model card when the mean Dice improves. Beyond the published loop:
``checkpoint_last.pth`` at every validation and on SIGINT/SIGTERM, exact resumption (``--resume``),
non-finite losses skipped and bounded (``--max_bad_steps``), and DistributedDataParallel under torchrun.

Data order is a function of (seed, epoch, rank): each epoch reseeds the sampler and the random
transforms, so a resumed run replays the rest of the interrupted epoch exactly.
"""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, PersistentDataset, ThreadDataLoader
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from monai.utils import set_determinism
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, RandomSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from engine.checkpoint import load_checkpoint, resolve_resume, restore_training_state, save_checkpoint
from engine.common import (
    BEST_WEIGHTS,
    LAST_CHECKPOINT,
    RunStopped,
    UsageError,
    autocast_for,
    checked_cases,
    load_into,
    load_weights,
    model_card_path,
    network_from_flags,
    roi_of,
    save_json,
    save_torch,
    stitching_device,
)
from engine.distributed import Distributed
from load_datasets_transforms import build_transforms, load_dataset_config, split_folds
from networks import replace_head
from networks.dwconv import use_algorithm
from optimizers import build_optimizer, build_scheduler

__all__ = ["overlay_slice", "run_training", "summarise_scores", "validation_scores"]


def validation_scores(
    model: nn.Module,
    loader,
    roi,
    sw_batch_size: int,
    num_classes: int,
    device: torch.device,
    amp: str | None = None,
    progress: bool = True,
    snapshot: dict | None = None,
) -> torch.Tensor:
    """Per-case, per-class Dice (cases x classes, NaN where a class is absent from the label) of the
    argmax of sliding-window predictions. With ``snapshot``, its ``"overlay"`` receives the first case's
    middle axial slice: image, image with label, image with prediction (H x W x 3, uint8)."""
    metric = DiceMetric(include_background=True, reduction="none", get_not_nans=False)
    was_training = model.training
    model.eval()
    cases = 0
    with torch.no_grad():
        for batch in tqdm(loader, desc="Validate", dynamic_ncols=True, leave=False, disable=not progress):
            cases += 1
            image, label = batch["image"], batch["label"]
            output_device = stitching_device(image.shape[2:], num_classes, device)
            with autocast_for(amp, device):
                logits = sliding_window_inference(
                    image.to(device), roi, sw_batch_size, model, sw_device=device, device=output_device
                )
            argmax = logits.argmax(1, keepdim=True)
            if snapshot is not None and cases == 1:
                snapshot["overlay"] = overlay_slice(
                    image[0, 0].numpy(), label[0, 0].numpy(), argmax[0, 0].cpu().numpy()
                )
            prediction = one_hot(argmax, num_classes)
            metric(y_pred=prediction, y=one_hot(label.to(output_device).long(), num_classes))
    model.train(was_training)
    if cases == 0:  # a rank whose share of the validation cases is empty
        return torch.empty(0, num_classes)
    scores = metric.aggregate().cpu()
    metric.reset()
    return scores


# Distinct colours for label values 1, 2, ... (value 0 is background).
PALETTE = np.array(
    [
        [0, 0, 0],
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
        [0, 128, 128],
        [220, 190, 255],
        [170, 110, 40],
        [255, 250, 200],
        [128, 0, 0],
    ],
    dtype=np.float32,
)


def overlay_slice(image: np.ndarray, label: np.ndarray, prediction: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The middle axial slice (last axis, RAS) of a volume: image | image + label | image + prediction."""
    z = image.shape[-1] // 2
    gray = np.repeat(np.clip(np.rot90(image[..., z]), 0, 1)[..., None] * 255, 3, axis=-1)

    def blend(mask: np.ndarray) -> np.ndarray:
        mask = np.rot90(mask[..., z]).astype(np.int64)
        colours = PALETTE[mask % len(PALETTE)]
        return np.where((mask > 0)[..., None], (1 - alpha) * gray + alpha * colours, gray)

    return np.concatenate([gray, blend(label), blend(prediction)], axis=1).astype(np.uint8)


def summarise_scores(scores: torch.Tensor) -> tuple[float, list[float]]:
    """The published mean Dice (background included, mean over cases and classes, absent classes left
    out) and the Dice of each class (mean over the cases where it is present)."""
    return float(torch.nanmean(scores)), torch.nanmean(scores, dim=0).tolist()


class StopSignals:
    """Turns SIGINT and SIGTERM into a request to stop after the current step (restored on exit); a
    second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopSignals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def run_training(args, finetune: bool = False) -> float:
    """Train as main_train.py (``finetune=False``) or main_finetune.py does; returns the best mean Dice.

    Everything a user can get wrong (flags, weights, checkpoint and dataset files) is checked before any
    caching or training starts.
    """
    distributed, device = Distributed.start(args.device, args.gpu)
    try:
        with use_algorithm(args.dwconv):
            return _train(args, finetune, distributed, device)
    finally:
        distributed.close()


def _datasets(args, cases, transforms, cache_dir: Path | None):
    if cache_dir is not None:
        return PersistentDataset(cases, transforms, cache_dir=cache_dir)
    return CacheDataset(cases, transforms, cache_rate=args.cache_rate, num_workers=args.num_workers, progress=False)


def _train(args, finetune: bool, distributed: Distributed, device: torch.device) -> float:
    main = distributed.is_main
    autocast = autocast_for(args.amp, device)
    roi = roi_of(args.roi_size)
    output = Path(args.output)
    resume = resolve_resume(args.resume, output)
    if resume is None and (output / BEST_WEIGHTS).exists() and not args.overwrite:
        raise UsageError(
            f"--output {output}: already holds {BEST_WEIGHTS}; pass --resume auto to continue that run, "
            "--overwrite to start over, or choose another folder"
        )
    checkpoint = load_checkpoint(resume) if resume else None
    config = load_dataset_config(args.dataset, args.datalist)
    choice = network_from_flags(args, roi)
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
    if checkpoint is not None:
        saved = {k: checkpoint["card"].get(k) for k in ("network", "network_args", "out_channels", "roi_size")}
        current = {k: card[k] for k in saved}
        if saved != current:
            raise UsageError(f"--resume {resume}: the checkpoint is of {saved}, but the flags ask for {current}")
    pretrained = None
    if args.pretrain and checkpoint is None:
        if not args.pretrained_weights:
            raise UsageError("--pretrain true needs --pretrained_weights")
        pretrained = load_weights(args.pretrained_weights, "--pretrained_weights")
    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    gpu_transforms = args.gpu_transforms and device.type == "cuda"
    if args.gpu_transforms and not gpu_transforms and main:
        print("note: --gpu_transforms applies to CUDA devices; the transforms run on the CPU")
    train_cases = checked_cases(config, args.root, "training")
    if args.fold is not None:
        if "validation" in config.lists:
            raise UsageError(f"--fold {args.fold}: the dataset lists its own validation cases; folds need none")
        train_cases, val_cases = split_folds(train_cases, args.num_folds, args.fold)
        if main:
            print(f"Fold {args.fold} of {args.num_folds}: validating on {len(val_cases)} of the training cases")
    else:
        val_cases = checked_cases(config, args.root, "validation")
    if main:
        print(
            f"Dataset {config.name}: {len(train_cases)} training and {len(val_cases)} validation cases, "
            f"{config.num_classes} classes ({', '.join(config.labels)})"
        )

    set_determinism(seed=args.seed)
    if pretrained is not None:
        loaded_classes = (getattr(args, "pretrain_classes", None) if finetune else None) or config.num_classes
        model = choice.build(1, loaded_classes)
        load_into(model, pretrained, args.pretrained_weights, "--pretrained_weights", choice.name)
        if finetune:
            replace_head(model, choice.name, config.num_classes)
        if main:
            print(f"Loaded {args.pretrained_weights} ({loaded_classes} classes); output head for {config.num_classes}")
    else:
        model = choice.build(1, config.num_classes)
    model.to(device)

    train_transforms, val_transforms = build_transforms(
        config, "train", roi, args.crop_sample, device=device if gpu_transforms else None
    )
    train_ds = _datasets(args, train_cases, train_transforms, cache_dir)
    # Each rank validates its share of the cases; the scores are gathered (every rank agrees).
    val_ds = _datasets(args, val_cases[distributed.rank :: distributed.world_size], val_transforms, cache_dir)
    pin = device.type == "cuda" and not gpu_transforms
    workers = 0 if gpu_transforms else args.num_workers  # CUDA tensors stay in the main process
    val_loader = DataLoader(val_ds, batch_size=1, num_workers=workers, pin_memory=pin)

    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    try:
        optimizer = build_optimizer(model, args.optim, lr=args.lr)
        scheduler = build_scheduler(optimizer, args.lr_schedule, max_iter=args.max_iter, warmup_iter=args.warmup_iter)
    except ValueError as error:
        raise UsageError(f"--optim/--lr/--lr_schedule: {error}") from None
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    progress = {"step": 0, "best_dice": 0.0, "best_step": 0, "nonfinite_steps": 0}
    if checkpoint is not None:
        progress = restore_training_state(checkpoint, model, optimizer, scheduler, scaler)
        if main:
            print(f"Resumed from {resume} at step {progress['step']} (best Dice {progress['best_dice']:.4f})")
        saved_max_iter = getattr(scheduler, "max_iter", args.max_iter)
        if saved_max_iter != args.max_iter:  # a longer (or shorter) run: the schedule follows --max_iter
            scheduler.max_iter = args.max_iter
            if main:
                print(
                    f"note: --max_iter {args.max_iter}: the learning-rate schedule now ends there "
                    f"(was {saved_max_iter})"
                )
    network = model
    if distributed.enabled:
        network = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    def epoch_batches(epoch: int):
        """The training batches of ``epoch``: a function of (seed, epoch, rank) only."""
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch * 1009 + distributed.rank)
        train_transforms.set_random_state(seed=(args.seed * 7919 + epoch * 104_729 + distributed.rank) % 2**32)
        if distributed.enabled:
            sampler = DistributedSampler(train_ds, distributed.world_size, distributed.rank, seed=args.seed)
            sampler.set_epoch(epoch)
        else:
            sampler = RandomSampler(train_ds, generator=generator)
        loader_class = ThreadDataLoader if gpu_transforms else DataLoader
        return loader_class(
            train_ds,
            batch_size=args.batch_size,
            sampler=sampler,
            num_workers=workers,
            pin_memory=pin,
            generator=generator,
        )

    steps_per_epoch = len(epoch_batches(0))
    # A forward can change only the buffers the state dict holds (BatchNorm statistics); the others are
    # derived constants (BFR priors, attention masks) and need no copy at every step.
    saved_buffer_names = set(model.state_dict())
    stateful_buffers = [buffer for name, buffer in model.named_buffers() if name in saved_buffer_names]
    output.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(log_dir=str(output / "tensorboard"), purge_step=progress["step"] or None) if main else None
    best_path, last_path = output / BEST_WEIGHTS, output / LAST_CHECKPOINT
    bad_in_a_row, first_bad = 0, None
    bar = tqdm(total=args.max_iter, initial=progress["step"], desc="Training", dynamic_ncols=True, disable=not main)
    network.train()
    try:
        with StopSignals() as stop:
            while progress["step"] < args.max_iter:
                epoch, offset = divmod(progress["step"], steps_per_epoch)
                batches = iter(epoch_batches(epoch))
                for _ in range(offset):  # replay the part of the epoch a resumed run has already trained on
                    next(batches)
                for batch in batches:
                    step = progress["step"] + 1
                    image, label = batch["image"].to(device), batch["label"].to(device)
                    # A non-finite step must leave no trace: the forward also updates BatchNorm statistics.
                    buffers = [buffer.clone() for buffer in stateful_buffers]
                    with autocast:
                        loss = loss_function(network(image), label)
                    optimizer.zero_grad(set_to_none=True)
                    finite = not distributed.any(not torch.isfinite(loss).item(), device)
                    if finite:
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()
                        bad_in_a_row = 0
                    else:  # skip the update; every rank agrees
                        with torch.no_grad():
                            for buffer, saved in zip(stateful_buffers, buffers, strict=True):
                                buffer.copy_(saved)
                        progress["nonfinite_steps"] += 1
                        bad_in_a_row += 1
                        first_bad = step if bad_in_a_row == 1 else first_bad
                        if main:
                            bar.write(f"warning: step {step}: non-finite loss ({loss.item()}); update skipped")
                    if writer is not None:
                        writer.add_scalar("train/loss", loss.item(), step - 1)
                        writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step - 1)
                        writer.add_scalar("train/nonfinite_steps", progress["nonfinite_steps"], step - 1)
                    scheduler.step()
                    progress["step"] = step
                    bar.update(1)
                    bar.set_description(
                        f"Training ({step} / {args.max_iter} Steps) (loss={loss.item():2.5f}, "
                        f"best dice={progress['best_dice']:.4f})"
                    )
                    if bad_in_a_row >= args.max_bad_steps:
                        kept = f"{last_path}" if last_path.exists() else "no checkpoint yet"
                        raise RunStopped(
                            f"stopping: the loss was not finite for {bad_in_a_row} steps in a row (steps "
                            f"{first_bad}-{step}); kept the last good checkpoint ({kept}) and the best weights "
                            f"({best_path if best_path.exists() else 'none yet'}); try a lower --lr or no --amp",
                            1,
                        )
                    if step % args.eval_step == 0 or step == args.max_iter:
                        snapshot = {} if main else None
                        scores = validation_scores(
                            model,
                            val_loader,
                            roi,
                            args.sw_batch_size,
                            config.num_classes,
                            device,
                            args.amp,
                            main,
                            snapshot,
                        )
                        dice, per_class = summarise_scores(torch.cat(distributed.gather(scores)))
                        improved = dice > progress["best_dice"]
                        if improved:
                            progress["best_dice"], progress["best_step"] = dice, step
                        if main:
                            _report(writer, bar, config.labels, step, dice, per_class, progress, improved)
                            if "overlay" in snapshot:
                                writer.add_image("val/overlay", snapshot["overlay"], step, dataformats="HWC")
                            if improved:
                                save_torch(model.state_dict(), best_path)
                                save_json({**card, "best_metric": dice, "best_step": step}, model_card_path(best_path))
                            if bad_in_a_row == 0:  # during a run of non-finite losses, keep the last good one
                                save_checkpoint(last_path, model, optimizer, scheduler, scaler, progress, card)
                    if distributed.any(stop.signum is not None, device):
                        if main:
                            save_checkpoint(last_path, model, optimizer, scheduler, scaler, progress, card)
                        signum = stop.signum or signal.SIGTERM
                        raise RunStopped(
                            f"stopped by {signal.Signals(signum).name} at step {step}; saved {last_path}; "
                            f"continue with --resume auto",
                            128 + signum,
                        )
                    if progress["step"] >= args.max_iter:
                        break
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    distributed.barrier()
    if main:
        print(
            f"Training finished: best mean Dice {progress['best_dice']:.4f} at step {progress['best_step']}; "
            f"weights in {best_path}"
        )
    return progress["best_dice"]


def _report(writer, bar, labels, step, dice, per_class, progress, improved) -> None:
    writer.add_scalar("val/mean_dice", dice, step)
    for name, value in zip(labels, per_class, strict=True):
        writer.add_scalar(f"val/dice_{name.replace(' ', '_')}", value, step)
    verdict = "saved new best model" if improved else "not improved"
    classes = ", ".join(f"{n} {v:.4f}" for n, v in zip(labels, per_class, strict=True))
    bar.write(
        f"step {step}: mean Dice {dice:.4f} ({verdict}; best {progress['best_dice']:.4f} at step "
        f"{progress['best_step']}); per class: {classes}"
    )
