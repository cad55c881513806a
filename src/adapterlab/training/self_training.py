"""Self-training on unlabeled texts (`training.self_train`): the adapter trained on the k-shot rows (or
stored teacher adapters, averaged) labels `data.unlabeled`, the confident and class-balanced
pseudo-labels join the k-shot rows, and a fresh adapter is trained on both; optionally again with that
adapter as the labeller. The k-shot run starts as a single adapter's (`single.start_k_shot`, with its
selection); the test rows are never read."""

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from adapterlab.data import Pool, Split, TaskData, read_unlabeled
from adapterlab.engine import Engine
from adapterlab.errors import AdapterlabError
from adapterlab.model import AdapterModel
from adapterlab.recipe import Recipe
from adapterlab.training.builders import new_model
from adapterlab.training.loop import fit, schedule
from adapterlab.training.result import TrainResult
from adapterlab.training.single import start_k_shot

log = logging.getLogger("adapterlab")


class SelfTrainingError(AdapterlabError):
    """Self-training that cannot run as its recipe says (a teacher of other labels)."""


@dataclass
class PseudoLabels:
    """Rows of the unlabeled pool given a label: pool indices, their labels and probabilities."""

    indices: list[int]
    labels: list[int]
    confidences: list[float]

    def per_class(self, num_labels: int) -> list[int]:
        return [self.labels.count(label) for label in range(num_labels)]


def pseudo_labels(probabilities: torch.Tensor, config) -> PseudoLabels:
    """Each class keeps the rows predicted as it with at least `config.threshold` probability, the
    most confident first, up to its share of `config.keep_fraction` of the rows; with `config.balance`
    every class is cut to the count of the class with fewest."""
    count, num_labels = probabilities.shape
    confidence, predicted = probabilities.max(-1)
    quota = max(1, int(config.keep_fraction * count / num_labels))
    chosen = []
    for label in range(num_labels):
        rows = ((predicted == label) & (confidence >= config.threshold)).nonzero().squeeze(1)
        chosen.append(rows[confidence[rows].argsort(descending=True, stable=True)][:quota].tolist())
    if config.balance:
        fewest = min(map(len, chosen))
        chosen = [rows[:fewest] for rows in chosen]
    indices = [row for rows in chosen for row in rows]
    return PseudoLabels(indices, predicted[indices].tolist(), confidence[indices].tolist())


def training_rows(labelled: Split, pool: Pool, pseudo: PseudoLabels, labelled_share: float) -> Split:
    """The k-shot rows, repeated until they are at least `labelled_share` of the result, then the
    pseudo-labelled rows."""
    repeats = max(1, math.ceil(labelled_share * len(pseudo.indices) / ((1 - labelled_share) * len(labelled))))
    pairs = None
    if labelled.text_pairs is not None:
        pairs = labelled.text_pairs * repeats + [pool.text_pairs[i] for i in pseudo.indices]
    return Split(labelled.texts * repeats + [pool.texts[i] for i in pseudo.indices],
                 labelled.labels * repeats + pseudo.labels, pairs)


def score_pool(model, pool: Pool, batch_size: int, show_progress: bool, description: str) -> torch.Tensor:
    """Label probabilities (N, labels) of the pool's rows through the model's scoring path, in chunks
    of several batches so that a progress bar moves and each chunk is still batched by length."""
    chunk = 8 * batch_size
    scores = []
    for start in tqdm(range(0, len(pool), chunk), desc=description, disable=not show_progress):
        pairs = pool.text_pairs[start:start + chunk] if pool.text_pairs is not None else None
        scores.append(model.scores(pool.texts[start:start + chunk], pairs, batch_size=batch_size))
    return torch.cat(scores)


def teacher_scores(recipe, pool: Pool, label_names: list[str], show_progress: bool) -> torch.Tensor:
    """Label probabilities (N, labels) of the pool's rows by `self_train.teachers`, stored adapters served
    by an engine (the path that serves them), averaged over the teachers."""
    teachers, batch_size = recipe.training.self_train.teachers, recipe.training.eval_batch_size
    engine = Engine.for_comparison(recipe.backbone, recipe.output.store, batch_size=batch_size)
    for teacher in teachers:
        labels = engine.card(teacher).labels
        if labels != label_names:
            raise SelfTrainingError(f"training.self_train.teachers: {teacher} has labels {', '.join(labels)}, "
                                    f"not this task's {', '.join(label_names)}")
    chunk = 8 * batch_size
    total = torch.zeros(len(pool), len(label_names))
    for start in tqdm(range(0, len(pool), chunk), desc=f"pseudo-label {recipe.task} (teachers)",
                      disable=not show_progress):
        pairs = pool.text_pairs[start:start + chunk] if pool.text_pairs is not None else None
        for teacher in teachers:
            predictions = engine.predict(teacher, pool.texts[start:start + chunk], pairs)
            rows = [[prediction.scores[name] for name in label_names] for prediction in predictions]
            total[start:start + len(rows)] += torch.tensor(rows)
    return total / len(teachers)


@dataclass
class Round:
    """What one round did: the pseudo-labels it kept per class, the rows and steps it trained on."""

    round: int
    kept: int
    kept_per_class: dict[str, int]
    mean_confidence: float | None
    training_rows: int
    labelled_repeats: int
    steps: int
    score_seconds: float
    train_seconds: float


@dataclass
class SelfTraining:
    """The card's record of a self-trained adapter."""

    setting: str  # "k=16 labelled + 1000 unlabeled": reported apart from the k-only adapters
    teachers: list[str]  # stored adapters that labelled the first round; empty: the k-shot run here
    unlabeled: str
    unlabeled_rows: int
    labelled_rows: int
    threshold: float
    keep_fraction: float
    balance: bool
    labelled_share: float
    first_train_seconds: float
    rounds: list[Round]

    def record(self) -> dict:
        seconds = self.first_train_seconds + sum(r.score_seconds + r.train_seconds for r in self.rounds)
        return {**asdict(self), "seconds": round(seconds, 3)}


def self_train(model, labelled: Split, pool: Pool, recipe, retrain: Callable[[Split], tuple[object, int]],
               first_train_seconds: float, show_progress: bool) -> tuple[object, SelfTraining]:
    """Rounds of pseudo-labelling `pool` with the latest model and `retrain`ing a fresh one on the
    labelled rows and the kept pseudo-labels; returns the last model and the record."""
    config, names = recipe.training.self_train, model.label_names
    record = SelfTraining(f"k={recipe.data.k} labelled + {len(pool)} unlabeled", config.teachers, recipe.data.unlabeled,
                          len(pool), len(labelled), config.threshold, config.keep_fraction, config.balance,
                          config.labelled_share, round(first_train_seconds, 3), [])
    for number in range(1, config.rounds + 1):
        started = time.perf_counter()
        if number == 1 and config.teachers:
            probabilities = teacher_scores(recipe, pool, names, show_progress)
        else:
            probabilities = score_pool(model, pool, recipe.training.eval_batch_size, show_progress,
                                       f"pseudo-label {recipe.task} (round {number})")
        pseudo = pseudo_labels(probabilities, config)
        scored = time.perf_counter()
        kept = dict(zip(names, pseudo.per_class(len(names))))
        log.info("self-training round %d: %d of %d unlabeled rows kept as pseudo-labels (%s)", number,
                 len(pseudo.indices), len(pool), ", ".join(f"{name} {n}" for name, n in kept.items()))
        if not pseudo.indices:
            log.warning("self-training round %d kept no pseudo-labels (a class had none above the threshold %s): "
                        "it retrains on the k-shot rows alone", number, config.threshold)
        rows = training_rows(labelled, pool, pseudo, config.labelled_share)
        model, steps = retrain(rows)
        confidences = pseudo.confidences
        record.rounds.append(Round(
            number, len(pseudo.indices), kept, round(sum(confidences) / len(confidences), 4) if confidences else None,
            len(rows), (len(rows) - len(pseudo.indices)) // len(labelled), steps, round(scored - started, 3),
            round(time.perf_counter() - scored, 3)))
    return model, record


def train_self_training(recipe: Recipe, show_progress: bool = True, resume: bool = False) -> TrainResult:
    """The k-shot run, then `self_train.rounds` rounds; stores the last round's adapter."""
    start = start_k_shot(recipe, show_progress, resume)
    recipe, task, accelerator = start.recipe, start.task, start.accelerator
    started = time.perf_counter()
    # fallen back, the adapter stays at its start: it answers as its zero-shot classifier; stored teachers
    # label the unlabeled rows in place of a k-shot run
    if not start.fell_back and not recipe.training.self_train.teachers:
        fit(start.model, task.train, recipe, accelerator, show_progress, resume)
    first_train_seconds = time.perf_counter() - started
    model, record = self_train(start.model, task.train, read_unlabeled(recipe.data), recipe,
                               _retrainer(recipe, task, accelerator, show_progress), first_train_seconds,
                               show_progress and accelerator.is_main_process)
    return start.finish(model, time.perf_counter() - started, record.record())


def _retrainer(recipe: Recipe, task: TaskData, accelerator: Accelerator,
               show_progress: bool) -> Callable[[Split], tuple[AdapterModel, int]]:
    """Each round's training: a fresh adapter trains `self_train.steps` times the k-shot run's optimizer
    steps, on the k-shot rows and the pseudo-labels."""
    steps = schedule(len(task.train), recipe.training, accelerator.num_processes)[0]
    retraining = recipe.with_settings({"training.max_steps": max(1, round(recipe.training.self_train.steps * steps)),
                                       "training.select": None})

    def retrain(rows: Split) -> tuple[AdapterModel, int]:
        accelerator.free_memory()  # drops the previous round's prepared model before the next one loads
        fresh = new_model(retraining, task, accelerator)
        fit(fresh, rows, retraining, accelerator, show_progress)
        return fresh, retraining.training.max_steps

    return retrain
