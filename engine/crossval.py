"""Cross-validation studies (crossval.py): every fold's held-out cases segmented with the weights its run
names as its model (out-of-fold predictions), configurations pooled and compared case by case, ensembles and
keep-largest postprocessing chosen on them as nnU-Net v2 chooses them (``find_best_configuration``,
``ensemble_crossvalidations``, ``determine_postprocessing``), and the choice written as a plan (``plan.json``)
that ``test_seg.py --plan`` and ``export.py --plan`` apply.

A union of datasets (``dataset.union``; its model card records the ``sources``) is studied the same way, each
held-out case scored on its own source's labels (a label's prediction is the union of its set's classes, as
``test_seg.py --source`` scores a source's test cases), the foreground Dice the mean over the sources of each
one's mean over its labels (as training validation averages the sources).

A fold run (``main_train.py --fold K``) records its split in ``fold.json`` and, when it ends, segments its
held-out cases into ``validation/`` (``held_out.json`` says with what). A run trained before either is
read from its checkpoint and the dataset flags, its held-out step run on demand.
"""

from __future__ import annotations

import argparse
import csv
import functools
import itertools
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import stats

from atomic_files import replace_atomically, save_json
from dataset.cases import case_name, find_cases, split_folds
from dataset.checks import file_identity, load_record
from dataset.description import PRESETS, DatasetError, counted, load_dataset_config, read_json
from dataset.labels import LabelManager, LabelSets
from dataset.portable import CONNECTIVITY, keep_largest
from engine.common import BEST_WEIGHTS, FINAL_WEIGHTS, LAST_CHECKPOINT, UsageError, load_with_card, model_card_path
from engine.evaluate import (
    CHART_BARS,
    CHART_MARGIN,
    apply_label_map,
    dice_chart,
    dice_scores,
    evaluate_file,
    read_label,
    write_reports,
)

__all__ = [
    "FOLD_RECORD",
    "HELD_OUT",
    "FoldRun",
    "Scoring",
    "best_checkpoint_summary",
    "choose",
    "class_means",
    "fold_record",
    "fold_run",
    "foreground_mean",
    "paired_test",
    "predict_held_out",
    "read_plan",
    "run_study",
]

#: A fold run's split, written when it starts.
FOLD_RECORD = "fold.json"
#: The folder of a fold run's out-of-fold predictions, and the record of what made them.
HELD_OUT = "validation"
HELD_OUT_RECORD = "held_out.json"
PLAN_VERSION = 1
#: The neighbours a voxel's component reaches in keep-largest postprocessing (26: faces, edges and corners).
CONNECTIVITY_NEIGHBOURS = int(CONNECTIVITY.sum()) - 1


def fold_record(fold: int, num_folds: int, training: Sequence[dict], held_out: Sequence[dict]) -> dict:
    """What ``fold.json`` holds: the fold, the fold count, every training case's name (the folds together)
    and the held-out cases (image and label paths)."""
    names = sorted(case_name(case["image"]) for case in [*training, *held_out])
    return {"fold": fold, "num_folds": num_folds, "cases": names, "held_out": [dict(case) for case in held_out]}


@dataclass(frozen=True)
class FoldRun:
    """A fold run folder, its fold of ``num_folds``, its held-out cases and every case of the split."""

    folder: Path
    fold: int
    num_folds: int
    held_out: tuple[dict, ...]
    cases: tuple[str, ...]


def fold_run(folder: Path, dataset: str | None = None, root: str | None = None, datalist: str | None = None) -> FoldRun:
    """The fold run in ``folder``: from its ``fold.json``, or, for a run trained before it was written, from
    its checkpoint's flags (fold, fold count) and the dataset (``dataset``, else the card's preset; ``root``,
    ``datalist``), split again as the run split it (``dataset.cases.split_folds``: the same folds on every
    machine)."""
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such run folder")
    record = folder / FOLD_RECORD
    if record.is_file():
        content = read_json(record, "run")
        try:
            held_out = tuple(dict(case) for case in content["held_out"])
            return FoldRun(folder, int(content["fold"]), int(content["num_folds"]), held_out, tuple(content["cases"]))
        except (KeyError, TypeError, ValueError) as error:
            raise UsageError(f"{record}: not a fold record ({error})") from None
    fold, num_folds, card = _old_fold(folder)
    dataset = dataset or (card.get("dataset") if str(card.get("dataset")).lower() in PRESETS else None)
    if root is None or dataset is None:
        raise UsageError(
            f"{folder}: trained before its held-out cases were recorded ({FOLD_RECORD}): give --root and --dataset "
            "(and --datalist) as the run had them, to split its cases again"
        )
    try:
        cases = find_cases(load_dataset_config(dataset, datalist), root, "training")
        _, held_out = split_folds(cases, num_folds, fold)
    except DatasetError as error:
        raise UsageError(f"{folder}: {error}") from None
    return FoldRun(folder, fold, num_folds, tuple(held_out), tuple(sorted(case_name(c["image"]) for c in cases)))


def _old_fold(folder: Path) -> tuple[int, int, dict]:
    """The fold, fold count and model card of a run without ``fold.json``, from its checkpoint."""
    checkpoint = folder / LAST_CHECKPOINT
    if not checkpoint.is_file():
        raise UsageError(
            f"{folder}: neither {FOLD_RECORD} nor {LAST_CHECKPOINT}, so its fold is unknown (is this a --fold run?)"
        )
    flags, card, _ = _checkpoint_facts(checkpoint)
    fold, num_folds = flags.get("fold", card.get("fold")), flags.get("num_folds")
    if not isinstance(fold, int) or not isinstance(num_folds, int):
        raise UsageError(f"{folder}: not a cross-validation fold (--fold {fold}, --num_folds {num_folds})")
    return fold, num_folds, card


def _checkpoint_facts(path: Path) -> tuple[dict, dict, int]:
    """A training checkpoint's flags, model card and step, read once per version of the file (a run trained
    before ``fold.json`` is asked for its fold, then for whether it finished)."""
    return _read_checkpoint_facts(str(path), tuple(file_identity(path)[1]))


@functools.lru_cache(maxsize=64)
def _read_checkpoint_facts(path: str, identity: tuple) -> tuple[dict, dict, int]:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return saved.get("flags") or {}, saved.get("card") or {}, saved["progress"]["step"]


def run_weights(folder: Path, checkpoint: str) -> Path:
    """A fold run's model: its final weights (``final_model.pth``, or a finished run's ``checkpoint_last.pth``)
    or its best checkpoint; a UsageError naming what is missing."""
    if checkpoint == "best":
        if not (folder / BEST_WEIGHTS).is_file():
            raise UsageError(f"{folder}: no {BEST_WEIGHTS}")
        return folder / BEST_WEIGHTS
    if (folder / FINAL_WEIGHTS).is_file():
        return folder / FINAL_WEIGHTS
    last = folder / LAST_CHECKPOINT
    if last.is_file():
        flags, _, step = _checkpoint_facts(last)
        max_iter = flags.get("max_iter")
        if max_iter is not None and step >= max_iter:
            return last
        raise UsageError(f"{folder}: the run has not finished (step {step} of {max_iter}): no final weights yet")
    raise UsageError(
        f"{folder}: no final weights ({FINAL_WEIGHTS}, or a finished {LAST_CHECKPOINT}); --checkpoint best scores "
        "its best checkpoint instead (selected on these cases)"
    )


def predict_held_out(run: FoldRun, checkpoint: str, flags: Sequence[str] = ()) -> dict:
    """Segment ``run``'s held-out cases with its model (:func:`run_weights`) into ``<run>/validation/``, as
    ``test_seg.py --tta --save_probabilities --evaluate`` does (mirroring as the model card says; ``flags``:
    more test_seg.py flags, such as the device), unless they are there already from the same weights; the
    record of what made them (``held_out.json``). A union's cases are scored on their sources' labels
    (:class:`Scoring`)."""
    from cli import inference_parser
    from engine.infer import run_inference

    weights = run_weights(run.folder, checkpoint)
    output = run.folder / HELD_OUT
    names = sorted(case_name(case["image"]) for case in run.held_out)
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UsageError(f"{run.folder}: two held-out cases are named {twice[0]} (their predictions would clash)")
    # Named within the run (size and modification time), so that a run folder moved or copied keeps them.
    identity = {"weights_file": weights.name, "file": file_identity(weights)[1], "cases": names}
    record = load_record(output / HELD_OUT_RECORD)
    if all(record.get(key) == value for key, value in identity.items()):
        return record
    _, card, _ = load_with_card(str(weights), "--trained_weights")
    sets = _label_sets(card or {}, str(weights))
    sources = {case_name(case["image"]): int(case["source"]) for case in run.held_out} if sets else {}
    command = ["--trained_weights", str(weights), "--output", str(output), "--tta", "--save_probabilities"]
    command += [] if sets else ["--evaluate"]
    args = inference_parser("").parse_args([*command, *flags])
    print(f"{run.folder}: segmenting the {counted(len(names), 'held-out case')} of fold {run.fold} with {weights.name}")
    run_inference(args, cases=[dict(case) for case in run.held_out])
    if sets is not None:
        scoring = Scoring(LabelManager(sets.classes), sets, sources)
        _evaluate_by_source(scoring, run.held_out, output, args.nsd_tolerance)
    record = {
        **identity,
        "weights": str(weights.resolve()),
        "checkpoint": checkpoint,
        "selected_on_these_cases": checkpoint == "best",
        "mirror_axes": None if card is None else card.get("mirror_axes"),
        "card": card or {},
        "fold": run.fold,
        "num_folds": run.num_folds,
        "labels": {case_name(case["image"]): case["label"] for case in run.held_out},
        **({"sources": sources} if sets else {}),
    }
    save_json(record, output / HELD_OUT_RECORD)
    return record


def _label_sets(card: dict, where: str) -> LabelSets | None:
    """The label sets of a union's model card, or None; a UsageError naming the card if they do not read."""
    try:
        return LabelSets.from_card(card)
    except ValueError as error:
        raise UsageError(f"{where}: not a valid model card ({error})") from None


def _evaluate_by_source(scoring: Scoring, cases: Sequence[dict], output: Path, tolerance: float) -> None:
    """``metrics.csv``, ``summary.json`` and the chart of a union's held-out predictions in ``output``, each
    case scored on its own source's labels (what ``test_seg.py --evaluate`` writes, a row per case and label)."""
    rows = []
    for case in cases:
        name = case_name(case["image"])
        label_map, groups, ignore = scoring.case_groups(name)
        results = evaluate_file(output / f"{name}_seg.nii.gz", case["label"], groups, label_map, tolerance, ignore)
        rows += [{"case": name, "class": key, **metrics} for key, metrics in results.items()]
    write_reports(rows, scoring.names, output)


# ---- the study ----


@dataclass(frozen=True)
class Scoring:
    """What the study scores, case by case: each class (or region) of the model's outputs, as nnU-Net scores
    them; of a union of datasets, each case on its own source's labels (``sources``: case -> source), the keys
    numbering every source's labels in turn (``LabelSets.scored_labels``)."""

    manager: LabelManager
    sets: LabelSets | None = None
    sources: Mapping[str, int] = field(default_factory=dict)

    @property
    def names(self) -> dict[int, str]:
        """Key -> what it scores: a class or region, or a union's ``source label``."""
        if self.sets is None:
            return {key: name for key, (name, _) in self.manager.scored().items()}
        return {key: name for key, (_, _, name) in self.sets.scored_labels().items()}

    @property
    def keys(self) -> list[int]:
        return list(self.names)

    def mean(self, means: dict[int, float]) -> float:
        """The foreground Dice of the keys' means: their mean (nnU-Net's ``foreground_mean``); of a union, the
        mean over the sources of each one's mean over its labels."""
        if self.sets is None:
            return foreground_mean(means)
        by_source: dict[int, dict[int, float]] = {}
        for key, (source, _, _) in self.sets.scored_labels().items():
            by_source.setdefault(source, {})[key] = means[key]
        return foreground_mean({source: foreground_mean(values) for source, values in by_source.items()})

    def case_groups(self, case: str) -> tuple[dict[int, int] | None, dict[int, tuple[int, ...]], int | None]:
        """How one case is scored: the label map its prediction takes first (a union's: its source's labels)
        or None, the label values of each key it is scored on, and its ignore label."""
        if self.sets is None:
            groups = {key: values for key, (_, values) in self.manager.scored().items()}
            return None, groups, self.manager.ignore_label
        source = self.sources[case]
        groups = {key: (value,) for key, (k, value, _) in self.sets.scored_labels().items() if k == source}
        return self.sets.source_label_map(source), groups, self.sets.sources[source].ignore_label

    def dice(self, prediction: np.ndarray, case: str, label_path: str) -> dict[int, float]:
        """The Dice of each key on one case (NaN: absent from label and prediction, or another source's)."""
        label_map, groups, ignore = self.case_groups(case)
        label = read_label(nib.load(label_path), prediction.shape)
        prediction = prediction if label_map is None else apply_label_map(prediction, label_map)
        scores = dice_scores(prediction, label, groups, ignore)
        return {key: scores.get(key, math.nan) for key in self.keys}

    @property
    def entries(self) -> list[int]:
        """The per-class keep-largest entries tried: each key (a class value or region number); of a union,
        each class (its keys are sources' labels)."""
        return self.keys if self.sets is None else list(range(1, len(self.manager.classes)))

    def judged_on(self, entry: int) -> list[int]:
        """The keys whose means decide a per-class entry: its own; a union class's, every label whose set
        holds it."""
        if self.sets is None:
            return [entry]
        return [
            key
            for key, (source, value, _) in self.sets.scored_labels().items()
            if entry in self.sets.sources[source].sets[value - 1]
        ]

    def entry_name(self, entry: int) -> str:
        return self.names[entry] if self.sets is None else self.manager.classes[entry]


@dataclass
class Configuration:
    """A configuration of the study: its name, fold runs, their held-out records and model card."""

    name: str
    runs: list[FoldRun]
    records: list[dict]
    card: dict

    @property
    def cases(self) -> dict[str, FoldRun]:
        return {name: run for run, record in zip(self.runs, self.records, strict=True) for name in record["cases"]}

    @property
    def weights(self) -> list[str]:
        """The weights each fold's held-out cases were segmented with, where the run folder is now."""
        return [
            str((run.folder / record["weights_file"]).resolve())
            for run, record in zip(self.runs, self.records, strict=True)
        ]


#: One candidate's Dice: case -> scored key (class value, or region number) -> Dice (NaN: absent from both).
Scores = dict[str, dict[int, float]]


def run_study(args: argparse.Namespace) -> dict:
    """crossval.py: the study of ``args.configuration`` (``[[name, run, ...], ...]``) into ``args.output``;
    returns the plan (none with ``args.held_out_only``: the runs' held-out cases segmented, no study)."""
    output = Path(args.output)
    configurations = _configurations(args)
    if args.held_out_only:
        for configuration in configurations:
            for run in configuration.runs:
                print(f"{run.folder}: held-out cases of fold {run.fold} in {run.folder / HELD_OUT}")
        return {}
    _check_cases(configurations)
    scoring = _scoring(configurations)
    manager, keys = scoring.manager, scoring.keys
    labels = _labels(configurations[0])
    singles = {c.name: _scores_from_metrics(c, keys) for c in configurations}
    candidates = {(c.name,): singles[c.name] for c in configurations}
    for size in range(2, min(args.max_ensemble, len(configurations)) + 1):
        for members in itertools.combinations(configurations, size):
            names = tuple(member.name for member in members)
            candidates[names] = _ensemble(members, scoring, labels, output / "ensembles" / "+".join(names))
    means = {names: class_means(scores, keys) for names, scores in candidates.items()}
    chosen = choose(means, scoring.mean)
    source = _predictions_of(chosen, configurations, output)
    stages, entries = _postprocessing(source, means[chosen], scoring, labels, args.min_gain, output)
    chosen_configurations = [c for c in configurations if c.name in chosen]
    plan = {
        "version": PLAN_VERSION,
        "chosen": list(chosen),
        "weights": [weight for c in chosen_configurations for weight in c.weights],
        "checkpoint": args.checkpoint,
        "tta": True,
        "keep_largest": entries,
        "connectivity": CONNECTIVITY_NEIGHBOURS,
        "outputs": manager.to_card(),
        "scores": {
            "before": _score_entry(means[chosen], scoring),
            "after": _score_entry(stages[-1]["means"], scoring),
        },
    }
    output.mkdir(parents=True, exist_ok=True)
    save_json(plan, output / "plan.json")
    _write_scores(candidates, keys, output / "scores.csv")
    _write_plot(configurations, means, scoring, output / "dice_per_configuration.png")
    report = _report(args, configurations, candidates, means, chosen, stages, scoring)
    replace_atomically(output / "report.md", lambda tmp: Path(tmp).write_text(report))
    print(report)
    print(f"Wrote {output / 'report.md'}, {output / 'plan.json'}, {output / 'scores.csv'}")
    return plan


def _configurations(args) -> list[Configuration]:
    """Each ``--configuration NAME RUN [RUN ...]`` with its fold runs and held-out records (made now where
    missing); one line naming what is wrong otherwise."""
    configurations, seen = [], set()
    flags = [*args.inference_flags]
    for entry in args.configuration:
        if len(entry) < 2:
            raise UsageError(f"--configuration {' '.join(entry)}: a name and its fold run folders expected")
        name, folders = entry[0], entry[1:]
        if name in seen:
            raise UsageError(f"--configuration {name}: given twice")
        seen.add(name)
        runs = [fold_run(Path(folder), args.dataset, args.root, args.datalist) for folder in folders]
        folds = [run.fold for run in runs]
        twice = sorted({fold for fold in folds if folds.count(fold) > 1})
        if twice:
            raise UsageError(f"--configuration {name}: fold {twice[0]} given twice")
        if len({run.num_folds for run in runs}) > 1:
            raise UsageError(f"--configuration {name}: runs of different --num_folds")
        records = [predict_held_out(run, args.checkpoint, flags) for run in runs]
        configurations.append(Configuration(name, runs, records, records[0]["card"]))
    return configurations


def _scoring(configurations: list[Configuration]) -> Scoring:
    """What the configurations' cases are scored on: their outputs (one label manager for them all) and, for
    a union of datasets, its sources and each case's; a UsageError naming two configurations that differ."""
    managers = [LabelManager.from_card(c.card) for c in configurations]
    sets = [_label_sets(c.card, f"--configuration {c.name}") for c in configurations]
    first = configurations[0].name
    for configuration, manager, other in zip(configurations[1:], managers[1:], sets[1:], strict=True):
        if not manager.same_outputs(managers[0]):
            raise UsageError(
                f"--configuration {configuration.name}: its outputs ({manager.describe()}) are not those of "
                f"{first} ({managers[0].describe()})"
            )
        if _sources_of(other) != _sources_of(sets[0]):
            raise UsageError(
                f"--configuration {configuration.name}: its sources ({_sources_text(other)}) are not those of "
                f"{first} ({_sources_text(sets[0])})"
            )
    if sets[0] is None:
        return Scoring(managers[0])
    sources: dict[str, int] = {}
    for configuration in configurations:
        for run, record in zip(configuration.runs, configuration.records, strict=True):
            if "sources" not in record:
                raise UsageError(f"{run.folder / HELD_OUT / HELD_OUT_RECORD}: no case sources (segment it again)")
            sources |= record["sources"]
    return Scoring(managers[0], sets[0], sources)


def _sources_of(sets: LabelSets | None) -> list | None:
    return None if sets is None else [(source.name, source.label_names, source.sets) for source in sets.sources]


def _sources_text(sets: LabelSets | None) -> str:
    return "none: one dataset" if sets is None else ", ".join(source.name for source in sets.sources)


def _check_cases(configurations: list[Configuration]) -> None:
    """Every case of a configuration's split held out by exactly one fold, with probabilities; every
    configuration trained on the same cases."""
    for configuration in configurations:
        owner: dict[str, Path] = {}
        for run, record in zip(configuration.runs, configuration.records, strict=True):
            for name in record["cases"]:
                if name in owner:
                    raise UsageError(
                        f"--configuration {configuration.name}: case {name} is held out by two folds ({owner[name]}, "
                        f"{run.folder})"
                    )
                owner[name] = run.folder
                if not (run.folder / HELD_OUT / f"{name}_probabilities.npz").is_file():
                    raise UsageError(f"{run.folder}: no probabilities of case {name} in {run.folder / HELD_OUT}")
        split = set(configuration.runs[0].cases)
        for run in configuration.runs[1:]:
            if set(run.cases) != split:
                only = sorted(split ^ set(run.cases))
                raise UsageError(
                    f"--configuration {configuration.name}: {configuration.runs[0].folder} and {run.folder} split "
                    f"different cases: {_names(only)} in one only"
                )
        missing = sorted(split - set(owner))
        if missing:
            raise UsageError(
                f"--configuration {configuration.name}: {counted(len(missing), 'case')} held out by no run given: "
                f"{_names(missing)} (a fold missing?)"
            )
    first = set(configurations[0].runs[0].cases)
    for configuration in configurations[1:]:
        other = set(configuration.runs[0].cases)
        if other != first:
            only = sorted(first ^ other)
            raise UsageError(
                f"--configuration {configuration.name} and {configurations[0].name} were trained on different cases: "
                f"{_names(only)} in one only"
            )


def _names(names: Sequence[str]) -> str:
    return ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")


def _labels(configuration: Configuration) -> dict[str, str]:
    return {name: path for record in configuration.records for name, path in record["labels"].items()}


def _scores_from_metrics(configuration: Configuration, keys: list[int]) -> Scores:
    """A configuration's Dice per case and key, as its folds' ``metrics.csv`` (test_seg.py --evaluate) hold it."""
    scores: Scores = {}
    for run in configuration.runs:
        path = run.folder / HELD_OUT / "metrics.csv"
        with open(path, newline="") as file:
            for row in csv.DictReader(file):
                scores.setdefault(row["case"], {})[int(row["class"])] = float(row["dice"])
    return {case: {key: values.get(key, math.nan) for key in keys} for case, values in sorted(scores.items())}


def class_means(scores: Scores, keys: Sequence[int]) -> dict[int, float]:
    """The mean Dice of each key over the cases where it has one (nnU-Net: ``np.nanmean``; NaN where none has)."""
    means = {}
    for key in keys:
        values = [case[key] for case in scores.values() if not math.isnan(case[key])]
        means[key] = float(np.mean(values)) if values else math.nan
    return means


def foreground_mean(means: dict[int, float]) -> float:
    """The mean of the class (or region) means: nnU-Net's ``foreground_mean``, over the keys that have one."""
    values = [value for value in means.values() if not math.isnan(value)]
    return float(np.mean(values)) if values else math.nan


def choose(means: dict[tuple[str, ...], dict[int, float]], mean=foreground_mean) -> tuple[str, ...]:
    """The candidate (a configuration, or an ensemble of several) of the highest foreground mean (``mean`` of
    its means); a tie goes to fewer models, then to the first given (nnU-Net's ``find_best_configuration``
    keeps the first of a tie, its single configurations coming before its ensembles)."""
    return max(means, key=lambda names: (mean(means[names]), -len(names)))


def case_means(scores: Scores) -> dict[str, float]:
    """Each case's mean Dice over the keys it has a score for (the paired test's unit)."""
    means = {}
    for case, values in scores.items():
        present = [v for v in values.values() if not math.isnan(v)]
        if present:
            means[case] = float(np.mean(present))
    return means


def paired_test(scores: Scores, reference: Scores) -> tuple[float, int]:
    """Wilcoxon signed-rank test of the per-case means against ``reference``'s (the cases both score): its
    two-sided p-value and n; p = 1 where the two are equal on every case."""
    mine, theirs = case_means(scores), case_means(reference)
    cases = sorted(set(mine) & set(theirs))
    a, b = np.array([mine[c] for c in cases]), np.array([theirs[c] for c in cases])
    if not cases or np.all(a == b):
        return 1.0, len(cases)
    return float(stats.wilcoxon(a, b).pvalue), len(cases)


def _ensemble(members: Sequence[Configuration], scoring: Scoring, labels: dict, folder: Path) -> Scores:
    """The Dice of an ensemble: each case's saved probabilities averaged over the members (float16 as saved,
    summed in float32), made a label map by the label manager, written to ``folder`` and scored."""
    scores: Scores = {}
    for name, label_path in sorted(labels.items()):
        total, reference = None, None
        for member in members:
            run = member.cases[name]
            probabilities = np.load(run.folder / HELD_OUT / f"{name}_probabilities.npz")["probabilities"]
            total = probabilities.astype(np.float32) if total is None else total + probabilities
            reference = run.folder / HELD_OUT / f"{name}_seg.nii.gz"
        total /= len(members)
        prediction = scoring.manager.label_map(torch.from_numpy(total)).numpy()
        _write_labels(prediction, reference, folder / f"{name}_seg.nii.gz")
        scores[name] = scoring.dice(prediction, name, label_path)
    return scores


def _write_labels(labels: np.ndarray, like: Path, path: Path) -> None:
    source = nib.load(like)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(labels.astype(np.uint8), source.affine, source.header)
    replace_atomically(path, lambda tmp: nib.save(image, tmp))


def _predictions_of(chosen: tuple[str, ...], configurations: list[Configuration], output: Path) -> dict[str, Path]:
    """Where the chosen candidate's label maps are, case by case."""
    if len(chosen) > 1:
        folder = output / "ensembles" / "+".join(chosen)
        return {name: folder / f"{name}_seg.nii.gz" for name in _labels(configurations[0])}
    configuration = next(c for c in configurations if c.name == chosen[0])
    return {name: run.folder / HELD_OUT / f"{name}_seg.nii.gz" for name, run in configuration.cases.items()}


def _postprocessing(
    source: dict[str, Path], baseline: dict[int, float], scoring: Scoring, labels: dict, min_gain: float, output: Path
) -> tuple[list[dict], list]:
    """nnU-Net's ``determine_postprocessing`` on the chosen label maps (whose class means, as scored, are
    ``baseline``): the largest component of the
    foreground as a whole, kept where the foreground mean rises (by more than ``min_gain``) and no class or
    region mean falls; then of each class (region) in label order, on what the first stage left, kept where
    that one's mean rises (by more than ``min_gain``). One case is held at a time: each stage's label maps
    wait on disk (``STUDY/.postprocessing``) until the stage is decided. Writes the result to
    ``STUDY/predictions/``; returns the stages (the baseline first) and the kept entries, as
    ``--keep_largest`` (and a plan) take them: a class value or region number, or a list of label values kept
    as one. A union's classes are kept each where the mean of the labels whose sets hold it rises
    (:meth:`Scoring.judged_on`)."""
    manager, keys, work = scoring.manager, scoring.keys, output / ".postprocessing"
    shutil.rmtree(work, ignore_errors=True)
    current = dict(source)
    stages = [{"entry": None, "means": baseline, "kept": True}]
    candidates: list = [list(manager.foreground_values)]
    if len(scoring.entries) > 1:
        candidates += scoring.entries
    entries = []
    for index, entry in enumerate(candidates):
        values, trial, trial_scores = manager.keep_largest_values([entry]), {}, {}
        for name, path in current.items():
            kept_labels = keep_largest(_read_labels(path), values)
            trial_scores[name] = scoring.dice(kept_labels, name, labels[name])
            trial[name] = work / str(index) / f"{name}.npy"
            trial[name].parent.mkdir(parents=True, exist_ok=True)
            np.save(trial[name], kept_labels)
        before, after = _last_kept(stages), class_means(trial_scores, keys)
        if isinstance(entry, list):
            kept = scoring.mean(after) > scoring.mean(before) + min_gain and not any(
                after[key] < before[key] for key in keys if not math.isnan(before[key])
            )
        else:
            judged = scoring.judged_on(entry)
            rise = foreground_mean({k: after[k] for k in judged}) - foreground_mean({k: before[k] for k in judged})
            kept = rise > min_gain
        stages.append({"entry": entry, "means": after, "kept": bool(kept), "before": before})
        if kept:
            current, entries = trial, [*entries, entry]
    for name, path in current.items():
        _write_labels(_read_labels(path), source[name], output / "predictions" / f"{name}_seg.nii.gz")
    shutil.rmtree(work, ignore_errors=True)
    stages.append({"entry": "result", "means": _last_kept(stages), "kept": True})
    return stages, entries


def _read_labels(path: Path) -> np.ndarray:
    """A label map from a NIfTI file or a stage's ``.npy``."""
    return np.load(path) if path.suffix == ".npy" else np.asarray(nib.load(path).dataobj)


def _last_kept(stages: list[dict]) -> dict[int, float]:
    return next(stage["means"] for stage in reversed(stages) if stage["kept"])


def _score_entry(means: dict[int, float], scoring: Scoring) -> dict:
    return {"foreground_mean": _number(scoring.mean(means)), "mean": {str(k): _number(v) for k, v in means.items()}}


def _number(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 6)


def _write_scores(candidates: dict[tuple, Scores], keys: list[int], path: Path) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["candidate", "case", *map(str, keys)])
            for names, scores in candidates.items():
                for case, values in scores.items():
                    writer.writerow(["+".join(names), case, *(values[key] for key in keys)])

    replace_atomically(path, write)


# ---- the report ----

COLOURS = [(70, 130, 180), (230, 140, 50), (90, 170, 90), (200, 80, 80), (150, 110, 190), (120, 120, 120)]


def _write_plot(configurations: list[Configuration], means: dict, scoring: Scoring, path: Path) -> None:
    """A PNG of each configuration's mean Dice per class (region, or a union's source label), a bar per
    configuration."""
    names, keys = list(scoring.names.values()), scoring.keys
    group = 24 * len(configurations) + 30
    width, height, margin, bar_area = 120 + group * len(names), 460, CHART_MARGIN, CHART_BARS
    title = "Out-of-fold Dice per class, mean over cases"
    image, draw, base = dice_chart(width, height + 20 * len(configurations), title)
    for i, (key, name) in enumerate(zip(keys, names, strict=True)):
        x0 = margin + 20 + group * i
        for j, configuration in enumerate(configurations):
            value = means[(configuration.name,)][key]
            if not math.isnan(value):
                x = x0 + 24 * j
                draw.rectangle([(x, base - value * bar_area), (x + 18, base)], fill=COLOURS[j % len(COLOURS)])
        draw.text((x0, base + 8), name[:14], fill="black")
    for j, configuration in enumerate(configurations):
        y = height + 20 * j - 40
        draw.rectangle([(margin, y), (margin + 14, y + 12)], fill=COLOURS[j % len(COLOURS)])
        draw.text((margin + 20, y), configuration.name, fill="black")
    replace_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


def best_checkpoint_summary(folders: Sequence[str | Path]) -> dict:
    """The published-style number: each fold's training-time validation Dice of its best checkpoint (a
    checkpoint chosen on those same cases, on the network's grid, background included as the published
    training selects), with their mean and population std (cv_summary.py)."""
    folds = []
    for folder in folders:
        card_path = model_card_path(Path(folder) / BEST_WEIGHTS)
        if not card_path.is_file():
            raise ValueError(f"{folder}: no {card_path.name} (is this a training --output?)")
        try:
            card = read_json(card_path, "card")
            folds.append({"folder": str(folder), "best_dice": float(card["best_metric"]), "step": card["best_step"]})
            if "best_metric_foreground" in card:
                folds[-1]["best_foreground"] = float(card["best_metric_foreground"])
        except (DatasetError, ValueError, KeyError) as error:
            raise ValueError(f"{card_path}: not a model card with best_metric ({error})") from None
    scores = [fold["best_dice"] for fold in folds]
    return {"folds": folds, "mean": float(np.mean(scores)), "std": float(np.std(scores)), "n": len(scores)}


def _best_checkpoint_text(configuration: Configuration) -> str:
    """The published-style number of a configuration, made comparable: its folds' training-time validation
    foreground Dice of the best checkpoint (mean ± std over folds; background included where a card from
    before the foreground was recorded has only that, said so)."""
    try:
        folds = best_checkpoint_summary([run.folder for run in configuration.runs])["folds"]
    except ValueError:
        return "n/a"
    if all("best_foreground" in fold for fold in folds):
        values = [fold["best_foreground"] for fold in folds]
        return f"{np.mean(values):.4f} ± {np.std(values):.4f}"
    values = [fold["best_dice"] for fold in folds]
    return f"{np.mean(values):.4f} ± {np.std(values):.4f} (background included)"


def _cell(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    return "n/a" if not values else f"{np.mean(values):.4f} ± {np.std(values):.4f}"


def _report(args, configurations, candidates, means, chosen, stages, scoring: Scoring) -> str:
    """The study in markdown: configurations (per class, over cases and over folds, paired test against the
    chosen one, the published-style number beside), ensembles, the choice and its postprocessing."""
    names, keys, mean = list(scoring.names.values()), scoring.keys, scoring.mean
    best = candidates[chosen]
    weights = "best checkpoints (selected on these cases)" if args.checkpoint == "best" else "final weights"
    lines = [
        "# Cross-validation study",
        "",
        f"Out-of-fold predictions of the {weights}, in each case's original geometry, mirrored as each model "
        "card says (test_seg.py --tta). Dice per case as "
        "nnU-Net scores it (a class absent from label and prediction left out); class means over the cases; the "
        "foreground Dice is the mean of the class means, its spread that of the cases' means over their classes, and "
        "over folds the mean and spread of each fold's own foreground Dice."
        + (
            " A union of datasets: each case is scored on its own source's labels (a label's prediction is the union "
            "of its set's classes), and the foreground Dice is the mean over the sources of each one's mean over its "
            "labels."
            if scoring.sets is not None
            else ""
        ),
        "",
        "| configuration | network | folds | mirroring | foreground Dice ± std over cases | over folds | "
        + " | ".join(names)
        + " | vs chosen (Wilcoxon p, n) | best checkpoint's training-time foreground Dice (selected on these cases) |",
        "|---" * (8 + len(names)) + "|",
    ]
    for configuration in configurations:
        scores = candidates[(configuration.name,)]
        per_case = list(case_means(scores).values())
        folds = [mean(class_means({c: scores[c] for c in record["cases"]}, keys)) for record in configuration.records]
        classes = [_cell([scores[c][key] for c in scores]) for key in keys]
        p, n = paired_test(scores, best)
        axes = configuration.records[0].get("mirror_axes")
        mirroring = "none" if not axes else "axes " + ",".join(map(str, axes))
        published_text = _best_checkpoint_text(configuration)
        spread = f"{mean(means[(configuration.name,)]):.4f} ± {np.std(per_case):.4f}"
        lines.append(
            f"| {configuration.name} | {configuration.card.get('network', '?')} | {len(configuration.runs)} | "
            f"{mirroring} | {spread} | {_cell(folds)} | {' | '.join(classes)} | "
            f"{'chosen' if (configuration.name,) == chosen else f'{p:.3g} ({n})'} | {published_text} |"
        )
    ensembles = [names_ for names_ in candidates if len(names_) > 1]
    if ensembles:
        lines += ["", "Ensembles (saved probabilities averaged):", ""]
        lines += ["| ensemble | foreground Dice | vs chosen (Wilcoxon p, n) |", "|---|---|---|"]
        for members in ensembles:
            p, n = paired_test(candidates[members], best)
            verdict = "chosen" if members == chosen else f"{p:.3g} ({n})"
            lines.append(f"| {' + '.join(members)} | {mean(means[members]):.4f} | {verdict} |")
    lines += [
        "",
        f"Chosen: **{' + '.join(chosen)}** (foreground Dice {mean(means[chosen]):.4f}; the best single "
        "model or ensemble, a tie going to fewer models).",
        "",
        f"Keep-largest-component postprocessing ({CONNECTIVITY_NEIGHBOURS}-connectivity, as nnU-Net's), nnU-Net's "
        f"rule with --min_gain {args.min_gain:g}:",
        "",
        "| stage | entry | foreground before | foreground after | kept |",
        "|---|---|---|---|---|",
    ]
    for stage in stages[1:-1]:
        entry = stage["entry"]
        label = "foreground as a whole" if isinstance(entry, list) else scoring.entry_name(entry)
        lines.append(
            f"| {'1' if isinstance(entry, list) else '2'} | {label} | {mean(stage['before']):.4f} | "
            f"{mean(stage['means']):.4f} | {'yes' if stage['kept'] else 'no'} |"
        )
    final = stages[-1]["means"]
    lines += [
        "",
        f"After postprocessing: foreground Dice {mean(final):.4f}; "
        + ", ".join(f"{name} {final[key]:.4f}" for name, key in zip(names, keys, strict=True)),
        "",
        "![Dice per configuration](dice_per_configuration.png)",
        "",
    ]
    return "\n".join(lines)


def read_plan(path: Path) -> dict:
    """A study's ``plan.json``, checked: ``weights`` (existing files), ``tta``, ``keep_largest``."""
    content = read_json(path, "--plan")
    weights, tta, keep = content.get("weights"), content.get("tta"), content.get("keep_largest")
    if not isinstance(weights, list) or not weights or not all(isinstance(w, str) for w in weights):
        raise UsageError(f"--plan {path}: 'weights' must be a list of weight files")
    missing = [w for w in weights if not Path(w).is_file()]
    if missing:
        raise UsageError(f"--plan {path}: weights {missing[0]}: no such file")
    if not isinstance(tta, bool) or not isinstance(keep, list):
        raise UsageError(f"--plan {path}: 'tta' must be true or false and 'keep_largest' a list")
    return content
