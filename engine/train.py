"""The one training loop of main_train.py and main_finetune.py.

Iteration-based, as published: validation every ``--eval_step`` steps and at the end, ``best_metric_model.pth``
(a plain state_dict) and its model card when the mean Dice improves. Beyond the published loop:
``checkpoint_last.pth`` at every validation and on SIGINT/SIGTERM, exact resumption (``--resume``),
non-finite losses and gradients skipped and bounded (``--max_bad_steps``), and DistributedDataParallel
under torchrun.

Data order is a function of (seed, epoch, rank): each epoch reseeds the sampler and the random
transforms, so a resumed run replays the rest of the interrupted epoch exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from monai.data import DataLoader, ThreadDataLoader
from monai.utils import set_determinism
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, RandomSampler, WeightedRandomSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from atomic_files import save_json
from dataset.cases import case_files, find_cases, resolve_root, split_folds
from dataset.checks import verify_cases
from dataset.description import DatasetConfig, DatasetError, card_preprocessing, counted, load_dataset_config
from dataset.fingerprint import FINGERPRINT_FILE, derive_from_data
from dataset.labels import LabelManager
from dataset.laterality import LEFT_RIGHT_AXIS, describe_axes, describe_pairs
from dataset.transforms import build_transforms
from dataset.union import check_mirror_images
from engine.checkpoint import (
    check_resumed_run,
    load_checkpoint,
    recorded_flags,
    resolve_resume,
    restore_training_state,
    save_checkpoint,
)
from engine.common import (
    BEST_WEIGHTS,
    FINAL_WEIGHTS,
    LAST_CHECKPOINT,
    RunStopped,
    UsageError,
    autocast_for,
    check_amp,
    check_network_output,
    check_output_folder,
    load_with_card,
    model_card_path,
    network_from_flags,
    roi_of,
    save_torch,
)
from engine.crossval import FOLD_RECORD, HELD_OUT, fold_record, fold_run, predict_held_out
from engine.distributed import Distributed
from engine.loading import cached_dataset, data_preparation_seconds, data_worker_init, fit_cache_rate
from engine.losses import segmentation_loss
from engine.memory import peak_text, start_peak
from engine.pretrained import load_pretrained, parse_channel_init
from engine.validation import foreground_dice, source_means, summarise_scores, validation_scores
from networks.dwconv import use_algorithm
from networks.registry import head_convolution, head_keys
from optimizers import build_optimizer, build_scheduler

__all__ = ["run_training"]


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


@dataclass(frozen=True)
class Pretrained:
    """The weights a run starts from: the state_dict, the model card read with it (None for published
    weights), and the file."""

    state: dict
    card: dict | None
    path: str


def _pretrained_weights(args, finetune: bool, resuming: bool, main: bool) -> Pretrained | None:
    """The weights to start from, or None (training from scratch, or resuming)."""
    if resuming:
        return None
    if not (args.pretrain if args.pretrain is not None else finetune):
        if finetune and main:
            print("note: --pretrain false: training from scratch (no pretrained weights)")
        return None
    if not args.pretrained_weights:
        if finetune:
            raise UsageError(
                "main_finetune.py needs --pretrained_weights (the trained weights to fine-tune); "
                "pass --pretrain false to train from scratch instead"
            )
        raise UsageError("--pretrain true needs --pretrained_weights")
    state, card, _ = load_with_card(args.pretrained_weights, "--pretrained_weights")
    return Pretrained(state, card, str(args.pretrained_weights))


def _initial_model(args, choice, config: DatasetConfig, pretrained: Pretrained | None, finetune: bool, main: bool):
    """The network to train, for the dataset's channels and outputs, initialised by ``--seed``, and the
    report of the pretrained weights loaded into it (None without them): fine-tuning gives it an output head
    for the dataset's outputs, mapped by name from the old one or fresh (``engine.pretrained``)."""
    model = choice.build(config.in_channels, config.num_outputs)
    if pretrained is None:
        return model, None
    source = f"--pretrained_weights {pretrained.path}"
    old_channels = _old_channels(pretrained, model, choice.name, config)
    channel_init = getattr(args, "channel_init", None)
    if channel_init is not None:
        channel_init = parse_channel_init(channel_init, old_channels, config.channels)
    old_outputs = None
    if finetune:
        old_outputs = _old_outputs(args, pretrained, model, choice.name, source)
    head = (args.head or "mapped") if finetune else None  # mapped where the old outputs have names
    report = load_pretrained(
        model,
        pretrained.state,
        choice.name,
        source,
        head=head,
        old_outputs=old_outputs,
        new_outputs=config.label_manager.output_names,
        channel_init=channel_init,
        old_channels=old_channels,
        new_channels=config.channels,
    )
    if main:
        print("\n".join(report.lines(pretrained.path)))
        if finetune:
            print(f"Output head for {config.label_manager.describe()}")
    return model, report


def _old_channels(pretrained: Pretrained, model: nn.Module, network: str, config: DatasetConfig) -> list[str]:
    """The pretrained model's input channel names: its card's, else (published weights) numbered, as many
    as its first kernel reads."""
    if pretrained.card is not None:
        return list(card_preprocessing(pretrained.card)["channels"])
    count = _input_channels_of(pretrained.state, model, set(head_keys(model, network)))
    return list(config.channels) if count is None else [str(i) for i in range(count)]


def _old_outputs(args, pretrained: Pretrained, model: nn.Module, network: str, source: str) -> list[str] | None:
    """The pretrained model's output names (None where no card names them), its output count checked
    against ``--pretrain_classes`` where that is given."""
    count = None
    try:
        path, conv = head_convolution(model, network)
        weight = pretrained.state.get(f"{path}.weight")
        if weight is not None:
            count = int(weight.shape[int(isinstance(conv, nn.ConvTranspose3d))])
    except ValueError:  # a head block (UNet): its count is read from the card, if any
        pass
    labels = LabelManager.from_card(pretrained.card) if pretrained.card is not None else None
    if count is None and labels is not None:
        count = labels.num_outputs
    flag = getattr(args, "pretrain_classes", None)
    if flag is not None and count is not None and flag != count:
        raise UsageError(f"--pretrain_classes {flag}: {source} has {count} outputs")
    if labels is None or not pretrained.card.get("classes"):
        return None
    return labels.output_names


def _input_channels_of(state: dict, model: nn.Module, head: set[str]) -> int | None:
    """The input channel count of weights where it differs from ``model``'s: dimension 1 of the first
    weight (in the model's order, the output head aside) whose shape differs from the model's there and only
    there."""
    for name, tensor in model.state_dict().items():
        loaded = state.get(name)
        if name in head or loaded is None or loaded.shape == tensor.shape:
            continue
        same_elsewhere = loaded.shape[0] == tensor.shape[0] and loaded.shape[2:] == tensor.shape[2:]
        if loaded.dim() == tensor.dim() >= 2 and same_elsewhere:
            return int(loaded.shape[1])
        return None
    return None


def _split_cases(args, config: DatasetConfig, training: list[dict], root, main: bool) -> tuple[list, list]:
    if args.fold == "all":
        if main:
            print(f"--fold all: training on all {counted(len(training), 'training case')}, without validation")
        return training, []
    if args.fold is None:
        return training, find_cases(config, root, "validation")  # none: the error says to pass --fold
    if "validation" in config.lists:
        raise UsageError(f"--fold {args.fold}: the dataset lists its own validation cases; folds need none")
    train_cases, val_cases = split_folds(training, args.num_folds, args.fold)
    if main:
        print(f"Fold {args.fold} of {args.num_folds}: validating on {len(val_cases)} of the training cases")
    return train_cases, val_cases


@dataclass
class RunData:
    """The checked cases of a run, its dataset with the settings derived from the data, what to record
    of the derivation (None when nothing was derived) and the cache rate that fits in memory."""

    config: DatasetConfig
    train_cases: list[dict]
    val_cases: list[dict]
    derivation: dict | None
    cache_rate: float


def _prepare_data(args, config: DatasetConfig, distributed: Distributed) -> RunData:
    """Cases listed, checked and read through, settings derived: on process 0 (remembered between runs),
    whose verdict or result every process gets."""
    main = distributed.is_main
    root = resolve_root(config, args.root)
    training = find_cases(config, root, "training")
    train_cases, val_cases = _split_cases(args, config, training, root, main)
    waiting = distributed.patient_group(data_preparation_seconds(train_cases + val_cases))
    outcome: tuple | str | None = None
    if main:
        try:
            outcome = _checked_and_derived(args, config, training, train_cases, val_cases, distributed)
        except DatasetError as error:
            outcome = str(error)
    outcome = distributed.broadcast(outcome, waiting)
    if isinstance(outcome, str):
        raise DatasetError(outcome)
    config, derivation, cache_rate = outcome
    if main:
        if config.sources:
            print(_sources_line(config, train_cases, val_cases))
        print(
            f"Dataset {config.name}: {len(train_cases)} training and {counted(len(val_cases), 'validation case')}, "
            f"{config.label_manager.describe()}, {config.in_channels} input channel"
            f"{'s' * (config.in_channels > 1)} ({config.describe_channels()}), "
            f"spacing {','.join(f'{v:g}' for v in config.spacing) + ' mm' if config.spacing else 'native'}"
        )
        print(_mirroring_line(config))
        print(_crops_line(config))
    return RunData(config, train_cases, val_cases, derivation, cache_rate)


def _sources_line(config: DatasetConfig, train_cases: list[dict], val_cases: list[dict]) -> str:
    """A union's sources: their cases, batch weights and labels (each with the classes it stands for)."""
    sets, described = config.label_sets, []
    total = sum(source.weight for source in config.sources)
    for index, source in enumerate(config.sources):
        cases = sum(case["source"] == index for case in train_cases)
        checked = sum(case["source"] == index for case in val_cases)
        labels = ", ".join(
            name
            if [sets.classes[v] for v in group] == [name]
            else f"{name} = {' + '.join(sets.classes[v] for v in group)}"
            for name, group in zip(sets.sources[index].label_names, sets.sources[index].sets, strict=True)
        )
        described.append(
            f"{source.name} ({cases} training, {checked} validation cases, {source.weight / total:.0%} of the batches; "
            f"{labels})"
        )
    rule = "summed into its background" if sets.unannotated == "marginal" else "trained as background (naive)"
    if sets.pseudo_labels is not None:
        rule += f", pseudo-labelled where predicted above {sets.pseudo_labels:g}"
    sources = counted(len(config.sources), "source")
    return f"Union of {sources}: {'; '.join(described)}; a class a source does not annotate is {rule}"


def _crops_line(config: DatasetConfig) -> str:
    """Where the foreground crops centre (``DatasetConfig.foreground_crops``)."""
    if config.foreground_crops == "voxels":
        return (
            "Foreground crops: centred on any labelled voxel alike, so each class in proportion to its volume "
            "(--foreground_crops classes: each class alike)"
        )
    kind = "region" if config.regions else "source label" if config.sources else "class"
    return f"Foreground crops: centred on a {kind} present in the case, each alike, then on a voxel of it"


def _mirroring_line(config: DatasetConfig) -> str:
    """What the training crops are mirrored along, and which classes a left-right flip swaps."""
    pairs = describe_pairs(config.labels, config.pairs)
    if not config.mirror_axes:
        return f"Mirroring: none (--mirror_axes to mirror); left/right pairs: {pairs}"
    swapped = "swapped on left-right flips" if LEFT_RIGHT_AXIS in config.mirror_axes else "no left-right flips"
    return (
        f"Mirroring: each crop along axes {describe_axes(config.mirror_axes)}, each with probability 1/2; "
        f"left/right pairs ({swapped}): {pairs}"
    )


def _checked_and_derived(args, config, training, train_cases, val_cases, distributed) -> tuple:
    """Check every case, warn of labels without foreground, derive what the dataset leaves to the
    data, fit the cache rate to the memory: ``(config, derivation, cache_rate)``."""
    cases = train_cases + val_cases
    summaries = _verified(cases, config, args.num_workers)
    for case, summary in zip(cases, summaries, strict=True):
        if summary.foreground is False:
            print(
                f"warning: {case['label']}: no foreground (only background); the balanced crops find no "
                "foreground in this case"
            )
        for index in summary.constant_channels:
            print(
                f"warning: {case_files({'image': case['image']})[0]}: channel {index} ({config.channels[index]}) "
                "has one value in every voxel (empty or constant): it carries nothing for this case"
            )
    config, derivation = derive_from_data(config, training, args.num_workers)
    cache_rate = args.cache_rate
    if not args.cache_dir:
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", distributed.world_size))
        cache_rate, note = fit_cache_rate(cache_rate, summaries, config.spacing, processes)
        if note:
            print(note)
    return config, derivation, cache_rate


def _verified(cases: list[dict], config: DatasetConfig, workers: int) -> list:
    """Every case read through (``dataset.checks.verify_cases``) against its dataset's labels: a union's
    against its source's."""
    if not config.sources:
        return verify_cases(
            cases, config.num_classes, workers, in_channels=config.in_channels, ignore_label=config.ignore_label
        )
    summaries: list = [None] * len(cases)
    for index, source in enumerate(config.sources):
        chosen = [i for i, case in enumerate(cases) if case["source"] == index]
        found = verify_cases(
            [cases[i] for i in chosen],
            source.config.num_classes,
            workers,
            in_channels=config.in_channels,
            ignore_label=source.config.ignore_label,
        )
        for i, summary in zip(chosen, found, strict=True):
            summaries[i] = summary
    return summaries


@dataclass
class Run:
    """What a training run works with once it is set up: the flags, the dataset and model card, the
    model (``network``: the same, wrapped for DistributedDataParallel under torchrun), its optimisation,
    its data and its ``progress`` (step, best Dice and step, non-finite step counts)."""

    args: argparse.Namespace
    distributed: Distributed
    device: torch.device
    config: DatasetConfig
    card: dict
    roi: tuple[int, int, int]
    output: Path
    model: nn.Module
    network: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loss_function: nn.Module
    train_ds: object
    val_loader: DataLoader
    gpu_transforms: bool
    stateful_buffers: list[torch.Tensor]
    progress: dict
    resumed: bool

    @property
    def main(self) -> bool:
        return self.distributed.is_main

    @property
    def best_path(self) -> Path:
        return self.output / BEST_WEIGHTS

    @property
    def final_path(self) -> Path:
        return self.output / FINAL_WEIGHTS

    @property
    def validates(self) -> bool:
        """Whether the run has validation cases (not with ``--fold all``)."""
        return self.args.fold != "all"

    @property
    def last_path(self) -> Path:
        return self.output / LAST_CHECKPOINT

    def save_last(self) -> None:
        save_checkpoint(
            self.last_path,
            self.model,
            self.optimizer,
            self.scheduler,
            self.scaler,
            self.progress,
            self.card,
            recorded_flags(self.args),
        )


def _train(args, finetune: bool, distributed: Distributed, device: torch.device) -> float:
    """Set the run up, train to ``--max_iter`` (validating every ``--eval_step``), report."""
    run = _set_up(args, finetune, distributed, device)
    # Every point at or before the checkpoint's step is already logged; later ones are replayed.
    purge_step = run.progress["step"] + 1 if run.resumed else None
    writer = SummaryWriter(log_dir=str(run.output / "tensorboard"), purge_step=purge_step) if run.main else None
    bar = tqdm(
        total=args.max_iter, initial=run.progress["step"], desc="Training", dynamic_ncols=True, disable=not run.main
    )
    try:
        _train_to_the_end(run, writer, bar)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    distributed.barrier()
    if run.main and not run.validates:
        skipped = run.progress["nonfinite_in_a_row"]
        note = f" (of step {args.max_iter - skipped}: the last {counted(skipped, 'step')} skipped as non-finite)"
        print(f"Training finished (--fold all, no validation): final weights in {run.final_path}{note * bool(skipped)}")
    elif run.main:
        print(
            f"Training finished: best mean Dice {run.progress['best_dice']:.4f} at step "
            f"{run.progress['best_step']}; weights in {run.best_path}"
        )
    if run.main and isinstance(args.fold, int) and args.held_out != "none":
        _segment_held_out(run)
    return run.progress["best_dice"]


def _segment_held_out(run: Run) -> None:
    """The out-of-fold predictions of a ``--fold K`` run (``engine.crossval.predict_held_out``), with the
    run's device, precision, workers and sliding-window batch."""
    args = run.args
    flags = ["--device", run.device.type, "--gpu", str(args.gpu), "--num_workers", str(args.num_workers)]
    flags += ["--sw_batch_size", str(args.sw_batch_size), "--dwconv", args.dwconv, "--cache_rate", "0"]
    flags += ["--amp", args.amp] if args.amp else []
    predict_held_out(fold_run(run.output), args.held_out, flags)
    print(f"Held-out cases of fold {args.fold} segmented and scored in {run.output / HELD_OUT}")


def _train_to_the_end(run: Run, writer: SummaryWriter | None, bar: tqdm) -> None:
    """The training loop: steps, each recorded; a validation every ``--eval_step`` steps and at the end; a
    clean stop on SIGINT/SIGTERM."""
    args, progress = run.args, run.progress
    steps_per_epoch = len(_epoch_batches(run, 0))
    autocast = autocast_for(args.amp, run.device)
    run.network.train()
    with StopSignals() as stop:
        while progress["step"] < args.max_iter:
            epoch, offset = divmod(progress["step"], steps_per_epoch)
            batches = iter(_epoch_batches(run, epoch))
            for _ in range(offset):  # replay the part of the epoch a resumed run has already trained on
                next(batches)
            for batch in batches:
                step = progress["step"] + 1
                loss, problem = _training_step(
                    run.network,
                    batch,
                    run.loss_function,
                    run.optimizer,
                    run.scaler,
                    autocast,
                    run.stateful_buffers,
                    run.distributed,
                    run.device,
                )
                _record_step(run, step, loss, problem, writer, bar)
                stop_early = False
                if step % args.eval_step == 0 or step == args.max_iter:
                    stop_early = _validate(run, step, writer, bar)
                    _describe(bar, step, args.max_iter, loss, progress, refresh=True)
                if run.distributed.any(stop.signum is not None, run.device):
                    raise _stopped(stop.signum, step, progress, run.last_path, run.save_last if run.main else None)
                if progress["step"] >= args.max_iter or stop_early:
                    return


def _epoch_batches(run: Run, epoch: int) -> DataLoader:
    """The training batches of ``epoch``: a function of (seed, epoch, rank) only (MONAI's DataLoader seeds
    the random transforms from the loader's generator)."""
    args, distributed = run.args, run.distributed
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch * 1009 + distributed.rank)
    if run.config.sources:
        sampler = _source_sampler(run, generator)
    elif distributed.enabled:
        sampler = DistributedSampler(run.train_ds, distributed.world_size, distributed.rank, seed=args.seed)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(run.train_ds, generator=generator)
    loader_class = ThreadDataLoader if run.gpu_transforms else DataLoader
    return loader_class(
        run.train_ds,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=0 if run.gpu_transforms else args.num_workers,  # CUDA tensors stay in the main process
        pin_memory=run.device.type == "cuda" and not run.gpu_transforms,
        generator=generator,
        worker_init_fn=data_worker_init,
    )


def _source_sampler(run: Run, generator: torch.Generator) -> WeightedRandomSampler:
    """A union's cases drawn with replacement, each source in proportion to its ``weight`` (whatever its case
    count), as many draws an epoch as this process's share of the cases."""
    sources = [case["source"] for case in run.train_ds.data]
    weights = [run.config.sources[k].weight / sources.count(k) for k in sources]
    share = -(-len(sources) // run.distributed.world_size)
    return WeightedRandomSampler(weights, share, replacement=True, generator=generator)


def _record_step(run: Run, step: int, loss: float, problem: str | None, writer, bar: tqdm) -> None:
    """After a step: count it if it was skipped, log it, advance the schedule and the progress; stop the run
    after ``--max_bad_steps`` skipped steps in a row."""
    progress = run.progress
    _count_nonfinite(progress, step, problem, bar if run.main else None)
    if writer is not None:
        writer.add_scalar("train/loss", loss, step)
        writer.add_scalar("train/lr", run.optimizer.param_groups[0]["lr"], step)
        writer.add_scalar("train/nonfinite_steps", progress["nonfinite_steps"], step)
    with warnings.catch_warnings():  # a skipped first step never called optimizer.step(); it counts on purpose
        warnings.filterwarnings(
            "ignore", message=r"Detected call of `lr_scheduler.step\(\)` before", category=UserWarning
        )
        run.scheduler.step()
    progress["step"] = step
    # The first step is shown at once (tqdm otherwise redraws at most every 0.1 s, and may skip it).
    _describe(bar, step, run.args.max_iter, loss, progress, refresh=step == 1)
    bar.update(1)
    if progress["nonfinite_in_a_row"] >= run.args.max_bad_steps:
        kept = run.last_path if run.last_path.exists() else "no checkpoint yet"
        best = run.best_path if run.best_path.exists() else "none yet"
        raise RunStopped(
            f"stopping: {progress['nonfinite_in_a_row']} steps in a row had a non-finite loss or gradient (steps "
            f"{progress['first_nonfinite']}-{step}); kept the last good checkpoint ({kept}) and the best weights "
            f"({best}); try a lower --lr or no --amp",
            1,
        )


def _validate(run: Run, step: int, writer, bar: tqdm) -> bool:
    """Score the validation cases with the weights and buffers that are saved (rank 0's), report, then write
    the checkpoint and, when the selection score improved, the best weights and their model card; True when
    ``--patience`` ends the run here (every rank agrees: the scores are gathered)."""
    args, progress = run.args, run.progress
    run.distributed.broadcast_tensors(run.stateful_buffers)
    if not run.validates:
        _save_without_validation(run, step)
        return False
    snapshot = {} if run.main else None
    start_peak(run.device)
    scores = validation_scores(
        run.model,
        run.val_loader,
        run.roi,
        args.sw_batch_size,
        run.config.label_manager,
        run.device,
        args.amp,
        run.main,
        snapshot,
    )
    peak = peak_text(run.device)
    scores = torch.cat(run.distributed.gather(scores))
    dice, per_class = summarise_scores(scores, run.config.label_manager)
    foreground = foreground_dice(scores, run.config.label_manager)
    improved = select_weights(progress, dice, step, args.select)
    stop_early = args.patience is not None and progress["validations_without_better"] >= args.patience
    if not run.main:
        return stop_early
    _report(
        writer, bar, run.config.label_manager, step, (dice, foreground, per_class, scores), progress, improved, peak
    )
    if "overlay" in snapshot:
        writer.add_image("val/overlay", snapshot["overlay"], step, dataformats="HWC")
    # The checkpoint first: it also holds what the best weights hold, so that a run killed between the two
    # writes resumes coherently (see _restore_best_weights).
    if progress["nonfinite_in_a_row"] == 0:  # during a run of non-finite steps, keep the last good one
        run.save_last()
    if improved:
        save_torch(run.model.state_dict(), run.best_path)
        best_card = {
            **run.card,
            "best_metric": dice,
            "best_metric_foreground": foreground,
            "best_step": step,
            "selection": _selection_record(args.select, progress),
        }
        save_json(best_card, model_card_path(run.best_path))
    if stop_early:
        bar.write(
            f"Stopped early at step {step}: {args.patience} validations without a better "
            f"{SELECTION_SCORES[args.select]} (--patience {args.patience})"
        )
    if (step == args.max_iter or stop_early) and isinstance(args.fold, int):  # what held-out cases are scored with
        _save_final(run, step)
    return stop_early


#: nnU-Net's smoothing of the score it selects its best checkpoint on (``ema_fg_dice``): 0.9 old + 0.1 new,
#: the first validation's score as it is.
EMA_MOMENTUM = 0.9
#: What each ``--select`` rule compares between validations.
SELECTION_SCORES = {
    "best": "mean Dice",
    "ema": f"moving average of the mean Dice ({EMA_MOMENTUM:g} old + {1 - EMA_MOMENTUM:g} new)",
    "last": "validation (the last one is kept)",
}


def select_weights(progress: dict, dice: float, step: int, rule: str) -> bool:
    """Record a validation's mean Dice in ``progress`` under the ``--select`` rule (``best``: the mean Dice,
    ``ema``: its moving average, ``last``: every validation); True when these weights become the best
    ones. ``progress`` keeps the selection score, its best, the Dice and step of the best weights and the
    validations since the score last improved (for ``--patience``)."""
    score = dice
    if rule == "ema":
        previous = progress.get("ema_dice")
        score = dice if previous is None else EMA_MOMENTUM * previous + (1 - EMA_MOMENTUM) * dice
        progress["ema_dice"] = score
    improved = rule == "last" or score > progress.get("best_score", progress["best_dice"])
    if improved:
        progress.update(best_dice=dice, best_step=step, best_score=score, validations_without_better=0)
    else:
        progress["validations_without_better"] = progress.get("validations_without_better", 0) + 1
    return improved


def _selection_record(rule: str, progress: dict) -> dict:
    """The model card's account of how the best weights were chosen."""
    record = {"rule": rule, "compared": SELECTION_SCORES[rule]}
    if rule == "ema":
        record["score"] = progress.get("best_score", progress["best_dice"])
    return record


def _save_without_validation(run: Run, step: int) -> None:
    """A run without validation (``--fold all``): the checkpoint at every ``--eval_step`` (during non-finite
    steps, the last good one is kept); at the end, the final weights (:func:`_save_final`), which are the
    model."""
    if not run.main:
        return
    if not run.progress["nonfinite_in_a_row"]:
        run.save_last()
    if step == run.args.max_iter:
        _save_final(run, step)


def _save_final(run: Run, step: int) -> None:
    """The final weights and their model card (the model of ``--fold all``, and the weights a ``--fold K`` run
    segments its held-out cases with): a skipped step changes no weight, so after non-finite last steps they
    are those of the last good step, which the card's ``final_step`` names."""
    save_torch(run.model.state_dict(), run.final_path)
    good_step = step - run.progress["nonfinite_in_a_row"]
    save_json({**run.card, "final_step": good_step}, model_card_path(run.final_path))


def _set_up(args, finetune: bool, distributed: Distributed, device: torch.device) -> Run:
    """Everything a user can get wrong checked (flags, weights, checkpoint, dataset files), then the model,
    data, optimisation and progress of the run (restored when it resumes)."""
    main = distributed.is_main
    amp_note = check_amp(args.amp, device)
    if amp_note and main:
        print(amp_note)
    roi = roi_of(args.roi_size)
    output = check_output_folder(args.output)
    resume = resolve_resume(args.resume, output, args.overwrite)
    trained = next((name for name in (BEST_WEIGHTS, FINAL_WEIGHTS) if (output / name).exists()), None)
    if resume is None and trained and not args.overwrite:
        raise UsageError(
            f"--output {output}: already holds {trained}; pass --resume auto to continue that run, "
            "--overwrite to start over, or choose another folder"
        )
    if args.patience is not None and (args.select == "last" or args.fold == "all"):
        raise UsageError(
            f"--patience {args.patience}: "
            + (
                "--select last keeps every validation, nothing to wait for"
                if args.select == "last"
                else "--fold all has no validation to wait on"
            )
        )
    checkpoint = load_checkpoint(resume) if resume else None
    config = load_dataset_config(args.dataset, args.datalist)
    if args.mirror_axes is not None:
        config = replace(config, mirror_axes=args.mirror_axes)
        check_mirror_images(config, f"--mirror_axes with {config.source}")
    if args.foreground_crops is not None:
        config = replace(config, foreground_crops=args.foreground_crops)
    choice = network_from_flags(args, roi)
    pretrained = _pretrained_weights(args, finetune, checkpoint is not None, main)
    set_determinism(seed=args.seed)
    model, loaded = _initial_model(args, choice, config, pretrained, finetune, main)
    check_network_output(model, choice, config.in_channels, config.num_outputs, roi)
    data = _prepare_data(args, config, distributed)
    card = _model_card(args, choice, data, roi)
    if loaded is not None:
        card["pretrained"] = {
            "weights": pretrained.path,
            "head": loaded.head_mapping,
            "channel_init": getattr(args, "channel_init", None),
            "new_keys": loaded.new_keys(),
            "freeze_steps": getattr(args, "freeze_steps", 0),
            "encoder_lr_scale": getattr(args, "encoder_lr_scale", 1.0),
        }
    elif checkpoint is not None and "pretrained" in checkpoint["card"]:
        card["pretrained"] = checkpoint["card"]["pretrained"]
        _check_frozen_start_on_resume(args, card["pretrained"], resume)
    elif getattr(args, "freeze_steps", 0) or getattr(args, "encoder_lr_scale", 1.0) != 1.0:
        raise UsageError("--freeze_steps and --encoder_lr_scale apply to pretrained weights (--pretrain true)")
    notes = check_resumed_run(checkpoint, card, args, resume) if checkpoint is not None else []
    gpu_transforms = args.gpu_transforms and device.type == "cuda"
    if args.gpu_transforms and not gpu_transforms and main:
        print("note: --gpu_transforms applies to CUDA devices; the transforms run on the CPU")
    model.to(device)
    train_ds, val_loader = _datasets(args, data, roi, distributed, device, gpu_transforms)
    optimizer, scheduler, scaler = _optimisation(args, model, device, card.get("pretrained"))
    if main and card.get("pretrained", {}).get("freeze_steps") and checkpoint is None:
        print(_frozen_start_line(card["pretrained"], args))
    progress = dict(step=0, best_dice=0.0, best_step=0, nonfinite_steps=0, nonfinite_in_a_row=0, first_nonfinite=0)
    if checkpoint is not None:
        base_rates = [group["initial_lr"] for group in optimizer.param_groups]
        progress = restore_training_state(
            checkpoint, model, optimizer, scheduler, scaler, lr=base_rates, max_iter=args.max_iter
        )
        if main:
            best = f" (best Dice {progress['best_dice']:.4f})" if args.fold != "all" else ""
            print(f"Resumed from {resume} at step {progress['step']}{best}")
            for note in notes:
                print(note)
            _restore_best_weights(checkpoint, progress, output / BEST_WEIGHTS, args.select)
    network = model
    if distributed.enabled:
        network = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    # A forward can change only the buffers the state dict holds (BatchNorm statistics); the others are
    # derived constants (BFR priors, attention masks) and need no copy at every step.
    saved_buffer_names = set(model.state_dict())
    stateful_buffers = [buffer for name, buffer in model.named_buffers() if name in saved_buffer_names]
    output.mkdir(parents=True, exist_ok=True)
    if main and data.derivation is not None:
        save_json(data.derivation, output / FINGERPRINT_FILE)
    if main and isinstance(args.fold, int):
        save_json(fold_record(args.fold, args.num_folds, data.train_cases, data.val_cases), output / FOLD_RECORD)
    loss_function = segmentation_loss(data.config.label_manager)
    return Run(
        args=args,
        distributed=distributed,
        device=device,
        config=data.config,
        card=card,
        roi=roi,
        output=output,
        model=model,
        network=network,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        loss_function=loss_function,
        train_ds=train_ds,
        val_loader=val_loader,
        gpu_transforms=gpu_transforms,
        stateful_buffers=stateful_buffers,
        progress=progress,
        resumed=checkpoint is not None,
    )


def _optimisation(args, model: nn.Module, device: torch.device, pretrained: dict | None) -> tuple:
    """The optimizer, learning-rate schedule and gradient scaler (fp16 only) of the flags. With pretrained
    weights, a frozen start or an encoder rate scale (the card's ``pretrained`` entry), two groups: what the
    loader initialised or adapted (head, new stem) at ``--lr``, the pretrained rest at ``--lr`` times the
    scale, held still for the frozen steps."""
    freeze = pretrained.get("freeze_steps", 0) if pretrained else 0
    scale = pretrained.get("encoder_lr_scale", 1.0) if pretrained else 1.0
    parameters: list | nn.Module = model
    if freeze or scale != 1.0:
        new_keys = set(pretrained["new_keys"])
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        parameters = [
            {"params": [p for name, p in named if name in new_keys], "lr": args.lr},
            {"params": [p for name, p in named if name not in new_keys], "lr": args.lr * scale},
        ]
        if not parameters[0]["params"]:
            raise UsageError("--freeze_steps/--encoder_lr_scale: the pretrained weights left nothing newly initialised")
    try:
        optimizer = build_optimizer(parameters, args.optim, lr=args.lr)
        scheduler = build_scheduler(
            optimizer,
            args.lr_schedule,
            max_iter=args.max_iter,
            warmup_iter=args.warmup_iter,
            start_iter=freeze,
            frozen_groups=(1,) if freeze else (),
        )
    except ValueError as error:
        raise UsageError(f"--optim/--lr/--lr_schedule/--freeze_steps: {error}") from None
    return optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")


def _frozen_start_line(pretrained: dict, args) -> str:
    scale = pretrained.get("encoder_lr_scale", 1.0)
    rate = f" at {scale:g} x --lr" if scale != 1.0 else ""
    return (
        f"Frozen start: steps 1-{pretrained['freeze_steps']} train only the newly initialised or adapted weights "
        f"({len(pretrained['new_keys'])} tensors); then everything{rate}, the {args.lr_schedule} schedule "
        "starting there"
    )


def _check_frozen_start_on_resume(args, pretrained: dict, resume: Path) -> None:
    """A resumed run keeps the frozen start and the encoder rate of its checkpoint's card."""
    for flag, default in (("freeze_steps", 0), ("encoder_lr_scale", 1.0)):
        given, saved = getattr(args, flag, default), pretrained.get(flag, default)
        if given != default and given != saved:
            raise UsageError(f"--resume {resume}: --{flag} {given} (checkpoint: {saved}): a resumed run keeps it")


def _model_card(args, choice, data: RunData, roi: tuple[int, int, int]) -> dict:
    """The model card of a run: network, channels, classes (and the ignore label), preprocessing (derived
    settings named), ROI, the axes mirrored in training and the left/right class pairs, fold (None, a
    number, or ``all``)."""
    config = data.config
    return {
        "network": choice.name,
        "network_args": choice.overrides,
        "network_plugin": choice.plugin,
        "in_channels": config.in_channels,
        "out_channels": config.num_outputs,
        **config.label_manager.to_card(),
        "dataset": config.name,
        **config.preprocessing(),
        "derived": data.derivation["derived"] if data.derivation else {},
        "roi_size": list(roi),
        "ignore_label": config.ignore_label,
        "mirror_axes": list(config.mirror_axes),
        "lateral_pairs": [list(pair) for pair in config.pairs],
        "foreground_crops": config.foreground_crops,
        "fold": args.fold,
    }


def _datasets(args, data: RunData, roi, distributed: Distributed, device: torch.device, gpu_transforms: bool):
    """The cached training dataset and the loader of this process's share of the validation cases."""
    train_transforms, val_transforms = build_transforms(
        data.config, "train", roi, args.crop_sample, device=device if gpu_transforms else None
    )
    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    train_ds = cached_dataset(data.train_cases, train_transforms, data.cache_rate, args.num_workers, cache_dir)
    # Each rank validates its share of the cases; the scores are gathered once (every rank agrees).
    val_share = data.val_cases[distributed.rank :: distributed.world_size]
    val_ds = cached_dataset(val_share, val_transforms, data.cache_rate, args.num_workers, cache_dir)
    val_loader = DataLoader(
        val_ds,
        batch_size=1,
        num_workers=0 if gpu_transforms else args.num_workers,
        pin_memory=device.type == "cuda" and not gpu_transforms,
        worker_init_fn=data_worker_init,
    )
    return train_ds, val_loader


def _training_step(
    network: nn.Module,
    batch: dict,
    loss_function,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    autocast: torch.autocast,
    stateful_buffers: list[torch.Tensor],
    distributed: Distributed,
    device: torch.device,
) -> tuple[float, str | None]:
    """One update. A non-finite loss, or a finite loss with a non-finite gradient (global norm; fp32 and
    bf16, where fp16's gradient scaler does not catch it), skips the update and leaves no trace: weights,
    optimizer state and BatchNorm statistics stay as they were. Returns the loss and, for a skipped step,
    what was not finite; every rank agrees."""
    image, label = batch["image"].to(device), batch["label"].to(device)
    targets = (label, batch["source"].to(device)) if "source" in batch else (label,)  # a union's crops' sources
    buffers = [buffer.clone() for buffer in stateful_buffers]  # the forward also updates BatchNorm statistics
    with autocast:
        loss = loss_function(network(image), *targets)
    optimizer.zero_grad(set_to_none=True)
    problem = None
    if distributed.any(not torch.isfinite(loss).item(), device):
        problem = f"non-finite loss ({loss.item()})"
    else:
        scaler.scale(loss).backward()
        if not scaler.is_enabled():
            gradients = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(gradients)
            if distributed.any(not torch.isfinite(norm).item(), device):
                problem = f"non-finite gradient (norm {norm.item()})"
        if problem is None:
            scaler.step(optimizer)
            scaler.update()
    if problem is not None:
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, saved in zip(stateful_buffers, buffers, strict=True):
                buffer.copy_(saved)
    return loss.item(), problem


def _count_nonfinite(progress: dict, step: int, problem: str | None, bar: tqdm | None) -> None:
    if problem is None:
        progress["nonfinite_in_a_row"] = 0
        return
    progress["nonfinite_steps"] += 1
    progress["nonfinite_in_a_row"] += 1
    if progress["nonfinite_in_a_row"] == 1:
        progress["first_nonfinite"] = step
    if bar is not None:
        bar.write(f"warning: step {step}: {problem}; update skipped")


def _stopped(signum, step: int, progress: dict, last_path: Path, save_last) -> RunStopped:
    """The stop after a signal: the checkpoint is written (by ``save_last``, on rank 0), unless the steps
    since the last good one were skipped (non-finite), which keeps the last good checkpoint."""
    signum = signum or signal.SIGTERM
    if progress["nonfinite_in_a_row"]:
        kept = f"kept the last good checkpoint {last_path}" if last_path.exists() else "no good checkpoint yet"
        saved = f"during {progress['nonfinite_in_a_row']} non-finite steps in a row; {kept}"
    else:
        if save_last is not None:
            save_last()
        saved = f"saved {last_path}"
    return RunStopped(
        f"stopped by {signal.Signals(signum).name} at step {step}; {saved}; continue with --resume auto", 128 + signum
    )


def _restore_best_weights(checkpoint: dict, progress: dict, best_path: Path, rule: str) -> None:
    """A checkpoint written at the step of the best Dice holds the best weights: rewrite them if a run was
    killed between the checkpoint and the best weights (or the best weights were removed)."""
    step = progress["best_step"]
    if not step or step != progress["step"]:
        return
    card_path = model_card_path(best_path)
    try:
        saved_step = json.loads(card_path.read_text()).get("best_step") if best_path.is_file() else None
    except (OSError, ValueError):
        saved_step = None
    if saved_step == step:
        return
    save_torch(checkpoint["model"], best_path)
    card = {**checkpoint["card"], "best_metric": progress["best_dice"], "best_step": step}
    save_json({**card, "selection": _selection_record(rule, progress)}, card_path)
    print(f"note: rewrote {best_path} (step {step}) from the checkpoint")


def _describe(bar: tqdm, step: int, max_iter: int, loss: float, progress: dict, refresh: bool = False) -> None:
    best = f", best dice={progress['best_dice']:.4f}" if progress["best_step"] else ""
    bar.set_description(f"Training ({step} / {max_iter} Steps) (loss={loss:2.5f}{best})", refresh=refresh)


def _report(writer, bar, label_manager, step, summary: tuple, progress, improved, peak: str) -> None:
    """One validation's line and TensorBoard scalars; ``summary``: the mean Dice, the foreground mean, each
    output's (or a union's column's) Dice and the scores (cases x outputs)."""
    dice, foreground, per_class, scores = summary
    sets = label_manager.label_sets
    names = label_manager.output_names if sets is None else [f"{sets.sources[k].name} {n}" for k, n in sets.columns]
    writer.add_scalar("val/mean_dice", dice, step)
    writer.add_scalar("val/mean_dice_foreground", foreground, step)
    for name, value in zip(names, per_class, strict=True):
        writer.add_scalar(f"val/dice_{name.replace(' ', '_')}", value, step)
    verdict = "saved new best model" if improved else "not improved"
    listed = ", ".join(f"{n} {v:.4f}" for n, v in zip(names, per_class, strict=True))
    mean = "over the regions" if label_manager.has_regions else "background included, as published"
    if sets is not None:
        mean = "the mean over the sources of each one's mean over its label sets, background included"
    kind = "region" if label_manager.has_regions else "class" if sets is None else "source label"
    if sets is not None:
        means = source_means(scores, sets)
        for source, value in zip(sets.sources, means, strict=True):
            writer.add_scalar(f"val/mean_dice_{source.name.replace(' ', '_')}", value, step)
        mean += "; per source: " + ", ".join(f"{s.name} {v:.4f}" for s, v in zip(sets.sources, means, strict=True))
    bar.write(
        f"step {step}: mean Dice {dice:.4f} ({mean}; {verdict}; best "
        f"{progress['best_dice']:.4f} at step {progress['best_step']}), foreground mean Dice {foreground:.4f}; "
        f"per {kind}: {listed}" + (f"; validation {peak}" if peak else "")
    )
