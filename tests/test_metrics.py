"""Classification metrics through scikit-learn give the values of the counting they replaced."""

import random

import pytest

from adapterlab.metrics import classification_metrics


def counted(predictions: list[int], references: list[int], num_labels: int) -> dict[str, float]:
    """accuracy and macro-F1 as adapterlab counted them by hand: F1 = 2·tp / (predicted + actual) per label,
    0 for a label neither predicted nor present, averaged over every label of the task."""
    correct = sum(p == r for p, r in zip(predictions, references))
    f1s = []
    for label in range(num_labels):
        tp = sum(p == label and r == label for p, r in zip(predictions, references))
        predicted, actual = predictions.count(label), references.count(label)
        f1s.append(2 * tp / (predicted + actual) if predicted + actual else 0.0)
    return {"accuracy": correct / len(references), "macro_f1": sum(f1s) / num_labels}


@pytest.mark.parametrize("seed", range(40))
def test_same_values_as_the_counting_on_random_cases(seed):
    draw = random.Random(seed)
    num_labels, rows = draw.randint(2, 12), draw.randint(1, 60)
    present = draw.sample(range(num_labels), draw.randint(1, num_labels))  # some labels absent from the rows
    references = [draw.choice(present) for _ in range(rows)]
    guessed = draw.sample(range(num_labels), draw.randint(1, num_labels))  # and some never predicted
    predictions = [r if draw.random() < 0.5 else draw.choice(guessed) for r in references]
    metrics = classification_metrics(predictions, references, num_labels)
    assert metrics == pytest.approx(counted(predictions, references, num_labels), abs=1e-12)
    assert all(type(value) is float for value in metrics.values())  # written to JSON cards


def test_labels_missing_from_predictions_and_rows_count_as_zero():
    # 4 labels: label 2 is never predicted, label 3 is in neither list; both count 0 in the mean.
    metrics = classification_metrics([0, 0, 1, 1], [0, 1, 1, 2], 4)
    assert metrics["accuracy"] == 0.5
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 0 + 0) / 4)  # F1 of labels 0 and 1: 2/3, 1/2


def test_no_rows_no_metrics():
    assert classification_metrics([], [], 3) == {}
