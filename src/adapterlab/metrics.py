"""Classification metrics computed here (no hub needed); other names go through `evaluate`."""

from adapterlab.errors import AdapterlabError

BUILTIN = ("accuracy", "macro_f1")


def classification_metrics(predictions: list[int], references: list[int], num_labels: int,
                           extra: tuple[str, ...] = ()) -> dict[str, float]:
    """accuracy and macro-F1 (mean F1 over every label, absent ones counting 0), plus hub metrics."""
    if not references:
        return {}
    correct = sum(p == r for p, r in zip(predictions, references))
    f1s = []
    for label in range(num_labels):
        tp = sum(p == label and r == label for p, r in zip(predictions, references))
        predicted, actual = predictions.count(label), references.count(label)
        f1s.append(2 * tp / (predicted + actual) if predicted + actual else 0.0)
    results = {"accuracy": correct / len(references), "macro_f1": sum(f1s) / num_labels}
    for name in extra:
        if name not in BUILTIN:
            results.update(_hub_metric(name, predictions, references))
    return results


def _hub_metric(name: str, predictions: list[int], references: list[int]) -> dict[str, float]:
    try:
        import evaluate
    except ImportError:
        raise AdapterlabError(f"metric {name!r} needs `pip install adapterlab[hub]`") from None
    try:
        metric = evaluate.load(name)
    except Exception as error:  # offline: the metric script lives on the hub
        raise AdapterlabError(f"metric {name!r} could not be loaded from the hub ({type(error).__name__})") from None
    scores = metric.compute(predictions=predictions, references=references)
    return {f"{name}.{key}" if key != name else name: float(value) for key, value in scores.items()}
