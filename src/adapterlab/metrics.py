"""Metrics computed here (no hub needed): accuracy and macro-F1 (scikit-learn) for classification; BLEU and chrF
(sacrebleu, multi-reference), ROUGE-L (rouge-score), exact match and slot scores of `key[value]`
meaning representations (E2E) for generation. Other names go through `evaluate` (the hub)."""

import re
import statistics

from sklearn.metrics import accuracy_score, f1_score

from adapterlab.errors import AdapterlabError

GENERATION = ("bleu", "chrf", "rouge_l", "exact_match", "slot_coverage", "slot_precision", "slot_recall", "slot_f1",
              "slot_exact_match")
ALWAYS_GENERATION = ("bleu", "chrf", "rouge_l")
BUILTIN = ("accuracy", "macro_f1", *GENERATION)
_SLOT = re.compile(r"\s*([^,\[\]]+?)\s*\[([^\]]*)\]")


def classification_metrics(predictions: list[int], references: list[int], num_labels: int,
                           extra: tuple[str, ...] = ()) -> dict[str, float]:
    """accuracy and macro-F1 (mean F1 over every label, absent ones counting 0), plus hub metrics."""
    if not references:
        return {}
    macro_f1 = f1_score(references, predictions, labels=list(range(num_labels)), average="macro", zero_division=0.0)
    results = {"accuracy": float(accuracy_score(references, predictions)), "macro_f1": float(macro_f1)}
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


def generation_metrics(outputs: list[str], references: list[list[str]], inputs: list[str],
                       extra: tuple[str, ...] = ()) -> dict[str, float]:
    """BLEU, chrF (0-100, sacrebleu, every reference of a row) and ROUGE-L F (0-1, best reference),
    plus the `extra` names: exact_match (a reference, whitespace aside), slot_coverage (the share of
    the input meaning representation's values the output mentions), slot_precision / slot_recall /
    slot_f1 / slot_exact_match (the output read as a meaning representation against the reference's)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    streams = max(len(refs) for refs in references)
    columns = [[refs[i] if i < len(refs) else None for refs in references] for i in range(streams)]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    results = {"bleu": sacrebleu.corpus_bleu(outputs, columns).score,
               "chrf": sacrebleu.corpus_chrf(outputs, columns).score,
               "rouge_l": statistics.fmean(max(scorer.score(ref, out)["rougeL"].fmeasure for ref in refs)
                                           for out, refs in zip(outputs, references))}
    for name in extra:
        if name in results or name in ("accuracy", "macro_f1"):
            continue
        if name == "exact_match":
            same = lambda a, b: " ".join(a.split()) == " ".join(b.split())  # noqa: E731
            results[name] = statistics.fmean(any(same(out, ref) for ref in refs) for out, refs in zip(outputs, references))
        elif name == "slot_coverage":
            results[name] = statistics.fmean(_coverage(slots(mr), out) for mr, out in zip(inputs, outputs))
        elif name.startswith("slot_"):
            results.update(_slot_scores(outputs, [refs[0] for refs in references]))
        else:
            results.update(_hub_metric(name, outputs, [refs[0] for refs in references]))
    return {name: value for name, value in results.items() if name in (*ALWAYS_GENERATION, *extra)}


def slots(representation: str) -> set[tuple[str, str]]:
    """The (key, value) pairs of a meaning representation like 'name[Alimentum], area[city centre]'."""
    return {(key.strip().lower(), value.strip().lower()) for key, value in _SLOT.findall(representation)}


def _coverage(pairs: set[tuple[str, str]], text: str) -> float:
    """The share of slots a text mentions: its value, or for a yes/no slot its key, letters only
    ('familyfriendly' in 'family-friendly')."""
    if not pairs:
        return 1.0
    letters = re.sub(r"[^a-z]", "", text.lower())
    said = [key in letters if value in ("yes", "no") else value in text.lower() for key, value in pairs]
    return sum(said) / len(pairs)


def _slot_scores(outputs: list[str], targets: list[str]) -> dict[str, float]:
    found = [slots(out) for out in outputs]
    wanted = [slots(target) for target in targets]
    right = sum(len(f & w) for f, w in zip(found, wanted))
    precision = right / max(1, sum(map(len, found)))
    recall = right / max(1, sum(map(len, wanted)))
    return {"slot_precision": precision, "slot_recall": recall,
            "slot_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "slot_exact_match": statistics.fmean(f == w for f, w in zip(found, wanted))}
