"""Model cards: the README.md of an adapter, or of a folder exported from one, as the Hugging Face Hub
reads it. YAML metadata first (base model, library, tags, the test metrics as a model-index), kept
from a card peft wrote and extended; then what the adapter is, the k-shot rows it learnt from, and how
its head turns features into label scores (the head is no peft file, so a reader elsewhere needs that)."""

from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from peft import __version__ as peft_version
from torch import nn

from adapterlab.heads import ClassifierHead, LabelWordHead

TASK_TAGS = {"classify": "text-classification", "generate": "text-generation"}
_POOLED = {"mean": "the mean of the token states (padding masked)", "cls": "the first token's state",
           "last": "the last token's state"}
# How each kind of folder loads, by the library that loads it.
_USE = {"peft": "Load with `adapterlab predict`, or with peft: `PeftModel.from_pretrained(base, folder)` on the "
                "base model named above.",
        "transformers": "The adapter is merged into these weights: transformers loads the folder as a model of "
                        "the base model's kind, and `adapterlab.merge.load_merged` as adapterlab's model.",
        "sentence-transformers": "The adapter is merged into these weights: `SentenceTransformer(folder).encode` "
                                 "gives the pooled vectors the head reads, and `adapterlab.merge.load_merged` "
                                 "loads the classifier.",
        None: "Served by `adapterlab predict`; each member folder is a peft adapter."}


def model_card(card, base_model: str, library: str | None, kept: str | None = None,
               head: nn.Module | None = None) -> str:
    """README.md for `card` (an AdapterCard) on `base_model`, loaded by `library` (peft, transformers,
    sentence-transformers; None: none loads the folder as it is). `kept`: the README already there
    (peft's), whose metadata stays where this adds nothing in its place."""
    data = ModelCard(kept).data.to_dict() if kept else {}
    data.pop("model-index", None)
    tags = [tag for tag in data.get("tags") or [] if not tag.startswith("base_model:")]
    if library == "peft":  # peft's own tag, naming the base model as other machines know it
        tags.append(f"base_model:adapter:{base_model}")
    tags += ["adapterlab", card.method, "few-shot", TASK_TAGS[card.kind]]
    results = _eval_results(card)
    data.update(base_model=base_model, library_name=library, tags=sorted(set(tags)), eval_results=results or None,
                model_name=f"{card.task}/{card.name}" if results else None)
    metadata = ModelCardData(**data)
    return str(ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n{_text(card, base_model, library, head)}"))


def _eval_results(card) -> list[EvalResult]:
    data = _data_name(card)
    return [EvalResult(task_type=TASK_TAGS[card.kind], dataset_type=data, dataset_name=data, dataset_split="test",
                       metric_type=metric, metric_value=value) for metric, value in card.metrics.items()]


def _data_name(card) -> str:
    """The dataset's name without the folders above it (they mean nothing on another machine)."""
    return Path(str(card.recipe.get("data", {}).get("path", "unknown"))).name


def _text(card, base_model: str, library: str | None, head: nn.Module | None) -> str:
    what = (f"An ensemble of {len(card.members)} {card.method} adapters (in members/, training seeds "
            f"{', '.join(str(m['seed']) for m in card.members)}; it answers with the mean of their label "
            "probabilities)" if card.members else f"A {card.method} adapter")
    backbone = f"`{card.backbone}`" + (f" (`{base_model}`)" if base_model != card.backbone else "")
    rows = "examples per class" if card.kind == "classify" else "training rows"
    shots = f"k = {card.k} {rows}" if card.k is not None else f"all {rows}"
    metrics = ", ".join(f"{k} {v:.3f}" for k, v in card.metrics.items()) or "not evaluated"
    lines = [f"# {card.task} / {card.name}", "",
             f"{what} for {backbone}, made by adapterlab.", "",
             "## Training data", "",
             f"Few-shot: {shots}, drawn with seed {card.seed} from `{_data_name(card)}`."]
    if card.labels:
        lines.append(f"Labels: {', '.join(card.labels)}.")
    lines += ["", f"- test metrics: {metrics}",
              f"- trainable parameters: {card.trainable_params:,} "
              f"({100 * card.trainable_params / card.backbone_params:.2f}% of the backbone)",
              f"- backbone fingerprint: `{card.backbone_fingerprint}`", "", "## Use", ""]
    if head is not None:
        lines += [head_note(head), ""]
    lines.append(f"{_USE[library]} card.json holds the full recipe.")
    if library == "peft":  # the line peft looks for before adding its own
        lines += ["", "### Framework versions", "", f"- PEFT {peft_version}"]
    return "\n".join(lines) + "\n"


def head_note(head: nn.Module) -> str:
    """How the head turns the backbone's features into label scores, for a reader without adapterlab."""
    if isinstance(head, ClassifierHead):
        if head.cosine_scale is not None:
            scores = f"{head.cosine_scale:g} × cosine(pooled, each row of linear.weight) + linear.bias"
        else:
            scores = f"linear.weight · {'unit(pooled)' if head.normalize else 'pooled'} + linear.bias"
        return (f"The task head is in head.safetensors (not a peft file): label scores = {scores}, where pooled "
                f"is {_POOLED[head.pooling]}; rows in the order of the labels above, softmaxed.")
    if isinstance(head, LabelWordHead):
        return (f"No trained head: the label scores are the next-token logits of the label words (token ids "
                f"{head.token_ids.tolist()}) after the prompt template in card.json.")
    return "No head: the adapter writes text after the prompt template in card.json."
