"""Mirroring and the classes it must swap: left/right pairs of labels, and the spatial axes a model mirrors.

Every image is reoriented to RAS before training and inference, so spatial axis 0 runs from the patient's
left to their right, axis 1 from posterior to anterior, axis 2 from inferior to superior. A flip along axis
0 puts the left kidney where the right one was: in a mirrored training crop the pair's labels are swapped,
so that a class keeps meaning its side of the body, and a mirrored test-time pass has the pair's
probabilities swapped back. Flips along the other axes swap nothing.

A pair is found from the class names (``left X`` / ``right X``, ``X_left`` / ``X_right``, ``X_L`` /
``X_R``, ``lt X`` / ``rt X``, any case, the side anywhere in the name as in TotalSegmentator's
``rib_left_1``; and one-word abbreviations that differ by a leading ``l`` / ``r`` only, as ``lkid`` /
``rkid`` in MONAI's BTCV list), or given in the dataset JSON as ``"lateral_pairs": [[2, 3], ...]``.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence

import torch

__all__ = [
    "AXIS_NAMES",
    "LEFT_RIGHT_AXIS",
    "check_lateral_pairs",
    "check_mirror_axes",
    "describe_axes",
    "describe_pairs",
    "find_lateral_pairs",
    "mirrorings",
    "lateral_order",
    "swap_lateral_labels",
    "unsided_name",
]

#: The spatial axis (after reorientation to RAS) that runs from the patient's left to their right.
LEFT_RIGHT_AXIS = 0
#: What each spatial axis runs along, after reorientation to RAS.
AXIS_NAMES = ("left-right", "posterior-anterior", "inferior-superior")

_SIDE_WORDS = {"left": "left", "l": "left", "lt": "left", "right": "right", "r": "right", "rt": "right"}
_WORD = re.compile(r"[a-z0-9]+")
Pairs = tuple[tuple[int, int], ...]


def _side_and_key(name: str) -> tuple[str, tuple] | None:
    """The side a class name states and the name without it, or None for a name without exactly one side."""
    words = _WORD.findall(name.lower())
    sides = [i for i, word in enumerate(words) if word in _SIDE_WORDS]
    if len(sides) == 1:
        i = sides[0]
        return _SIDE_WORDS[words[i]], ("word", *words[:i], "<side>", *words[i + 1 :])
    if not sides and len(words) == 1 and len(words[0]) >= 3 and words[0][0] in "lr" and words[0][1].isalpha():
        return ("left" if words[0][0] == "l" else "right"), ("abbreviation", words[0][1:])
    return None


def unsided_name(name: str) -> str | None:
    """The name without the side it states (``right kidney`` -> ``kidney``, ``Kidney_L`` -> ``kidney``), in
    lower-case words; None for a name that states no side or more than one."""
    found = _side_and_key(name)
    if found is None:
        return None
    return " ".join(word for word in found[1][1:] if word != "<side>")


def find_lateral_pairs(labels: Sequence[str]) -> Pairs:
    """The pairs of class values whose names differ by their side only (see the module docstring), each
    ordered by value; background (value 0) is never in one, nor is a name whose rest is shared by more
    than one class of a side."""
    by_key: dict[tuple, dict[str, list[int]]] = {}
    for value, name in enumerate(labels):
        if value == 0:
            continue
        found = _side_and_key(name)
        if found is not None:
            side, key = found
            by_key.setdefault(key, {"left": [], "right": []})[side].append(value)
    pairs = [
        tuple(sorted((sides["left"][0], sides["right"][0])))
        for sides in by_key.values()
        if len(sides["left"]) == 1 and len(sides["right"]) == 1
    ]
    return tuple(sorted(pairs))


def check_lateral_pairs(pairs: object, num_classes: int, where: str) -> Pairs:
    """``"lateral_pairs"`` of a dataset JSON or a model card: a list of ``[a, b]`` class values, each a
    foreground class in at most one pair. Raises ValueError naming ``where`` otherwise."""
    example = 'a list of [a, b] class values, such as [[2, 3]] for "right kidney" 2 and "left kidney" 3'
    if not isinstance(pairs, list | tuple):
        raise ValueError(f"{where}: 'lateral_pairs' must be {example}, got {pairs!r}")
    checked, seen = [], set()
    for pair in pairs:
        valid = isinstance(pair, list | tuple) and len(pair) == 2
        valid = valid and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
        if not valid:
            raise ValueError(f"{where}: 'lateral_pairs' must be {example}, got the entry {pair!r}")
        outside = [v for v in pair if not 0 < v < num_classes]
        if outside:
            raise ValueError(
                f"{where}: 'lateral_pairs' {list(pair)}: {outside[0]} is not a foreground class (1..{num_classes - 1})"
            )
        if pair[0] == pair[1] or seen & set(pair):
            repeated = pair[0] if pair[0] == pair[1] or pair[0] in seen else pair[1]
            raise ValueError(f"{where}: 'lateral_pairs': class {repeated} is in more than one place")
        seen |= set(pair)
        checked.append(tuple(sorted(pair)))
    return tuple(sorted(checked))


def check_mirror_axes(axes: Iterable[int], where: str) -> tuple[int, ...]:
    """Spatial axes to mirror, as a sorted tuple without repeats; ValueError naming ``where`` for another
    axis than 0, 1, 2."""
    axes = tuple(axes)
    if not all(isinstance(a, int) and not isinstance(a, bool) and 0 <= a <= 2 for a in axes):
        raise ValueError(f"{where}: mirror axes {list(axes)}: expected spatial axes 0, 1, 2 (of the RAS grid)")
    return tuple(sorted(set(axes)))


def describe_axes(axes: Sequence[int]) -> str:
    """``0 (left-right), 2 (inferior-superior)``, or ``none``."""
    return ", ".join(f"{a} ({AXIS_NAMES[a]})" for a in axes) or "none"


def describe_pairs(labels: Sequence[str], pairs: Pairs) -> str:
    """``right kidney (2) <-> left kidney (3)``, one per pair, or ``none``."""
    return ", ".join(f"{labels[a]} ({a}) <-> {labels[b]} ({b})" for a, b in pairs) or "none"


def mirrorings(axes: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Every combination of the spatial ``axes`` to flip, the unmirrored pass first: ``2 ** len(axes)``
    (nnU-Net's test-time mirroring over its allowed axes)."""
    return tuple(combo for count in range(len(axes) + 1) for combo in itertools.combinations(axes, count))


def swap_lateral_labels(label: torch.Tensor, pairs: Pairs) -> torch.Tensor:
    """``label`` (any shape) with the values of each pair exchanged; every other value kept."""
    if not pairs:
        return label
    swapped = label.clone()
    for a, b in pairs:
        swapped[label == a] = b
        swapped[label == b] = a
    return swapped


def lateral_order(pairs: Pairs, num_classes: int) -> list[int]:
    """The class channel each of ``num_classes`` channels goes to once each pair is exchanged (its own
    inverse): ``probabilities[:, lateral_order(...)]`` is the swap."""
    order = list(range(num_classes))
    for a, b in pairs:
        order[a], order[b] = b, a
    return order
