"""Choosing a recipe's settings by cross-validation on its k-shot rows alone (`training.select`): the
stratified folds, the grid's trainings, the choice, and the record the card keeps. The trainings run
through train.py's loop (`train.select_settings`)."""

import math
import random
from dataclasses import asdict, dataclass, field

from adapterlab.errors import AdapterlabError

PROTOTYPE_WEIGHT = "head.prototype_weight"  # applied after training: the points differing in it share trainings
# How sure the held-out rows must make a fallback: the folds train on part of the rows, so their estimate
# trails the final run's, and with 16 rows a class one row is several points.
FALLBACK_P_VALUE = 0.05


class SelectionError(AdapterlabError):
    """A selection that cannot run on this task's rows, or would cost more than its max_cost."""


def stratified_folds(labels: list[int], folds: int, seed: int, names: list[str]) -> list[list[int]]:
    """`folds` disjoint parts of the row indices: each class's rows, shuffled with `seed`, dealt over
    the parts in turn (continuing from class to class), so that every part holds out every class and
    part sizes differ by at most one row."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    rng = random.Random(seed)
    parts: list[list[int]] = [[] for _ in range(folds)]
    dealt = 0
    for label in sorted(by_class):
        rows = by_class[label]
        if len(rows) < folds:
            raise SelectionError(f"class {names[label]!r} has {len(rows)} training rows, fewer than "
                                 f"training.select.folds {folds}: some fold would not hold it out")
        rng.shuffle(rows)
        for row in rows:
            parts[dealt % folds].append(row)
            dealt += 1
    return parts


def trainings(points: list[dict]) -> dict[tuple, list[dict]]:
    """Grid points grouped by what their training needs: all settings but the prototype weight."""
    groups: dict[tuple, list[dict]] = {}
    for point in points:
        key = tuple((name, value) for name, value in point.items() if name != PROTOTYPE_WEIGHT)
        groups.setdefault(key, []).append(point)
    return groups


@dataclass
class PointResult:
    settings: dict
    steps: int  # optimizer steps of its trainings over all folds
    right: list[int] = field(default_factory=list)  # the held-out rows it got right, over all folds

    @property
    def correct(self) -> int:  # each row is held out once
        return len(self.right)


@dataclass
class Selection:
    """The outcome of a cross-validation: every grid point's held-out accuracy, and what it cost."""

    folds: int
    grid: dict[str, list]
    rows: int
    points: list[PointResult]
    trainings: int
    cost: float  # its optimizer steps over those of one run of the recipe as written
    seconds: float = 0.0
    zero_shot_right: list[int] | None = None  # the rows the adapter's untrained start gets right

    @property
    def chosen(self) -> PointResult:
        """The best held-out accuracy; ties go to fewer steps, then to the first written."""
        return min(self.points, key=lambda point: (-point.correct, point.steps))

    def state(self) -> dict:
        """Plain JSON, kept with a run's checkpoints (`from_state` reads it back)."""
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> "Selection":
        return cls(**{**state, "points": [PointResult(**point) for point in state["points"]]})

    def accuracy(self, correct: int) -> float:
        return correct / self.rows

    @property
    def zero_shot_correct(self) -> int | None:
        return None if self.zero_shot_right is None else len(self.zero_shot_right)

    @property
    def below_zero_shot(self) -> bool:
        return self.zero_shot_right is not None and self.chosen.correct < self.zero_shot_correct

    @property
    def below_zero_shot_p_value(self) -> float:
        """A one-sided sign test on the rows where the chosen point and the zero-shot start disagree: how
        likely the start's lead on them (or more) is if neither were better."""
        start, chosen = set(self.zero_shot_right or ()), set(self.chosen.right)
        wins, losses = len(start - chosen), len(chosen - start)
        disagreements = wins + losses
        return sum(math.comb(disagreements, i) for i in range(wins, disagreements + 1)) / 2 ** disagreements

    @property
    def clearly_below_zero_shot(self) -> bool:
        """Below its zero-shot start by more than the held-out rows' chance: what a fallback needs."""
        return self.below_zero_shot and self.below_zero_shot_p_value < FALLBACK_P_VALUE

    def record(self, fell_back: bool, train_seconds: float) -> dict:
        """What the card keeps: the choice and its estimate beside the zero-shot one, every point, the cost."""
        return {
            "method": "cv", "folds": self.folds, "rows": self.rows, "grid": self.grid,
            "chosen": self.chosen.settings, "cv_accuracy": round(self.accuracy(self.chosen.correct), 4),
            "zero_shot_cv_accuracy": round(self.accuracy(self.zero_shot_correct), 4),
            "below_zero_shot": self.below_zero_shot, "p_value": round(self.below_zero_shot_p_value, 4),
            "fell_back": fell_back,
            "points": [{"settings": p.settings, "cv_accuracy": round(self.accuracy(p.correct), 4)} for p in self.points],
            "trainings": self.trainings, "seconds": round(self.seconds, 3), "steps_ratio": round(self.cost, 3),
            # against the final run of the chosen settings; none when it fell back and nothing trained
            "time_ratio": None if fell_back else round(self.seconds / train_seconds, 3),
        }
