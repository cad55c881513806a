"""The recipe: one YAML file that says what to train. The schema below is the format, the `--set`
target and the `--help` text; each field is documented once, here."""

import itertools
from pathlib import Path
from typing import Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from adapterlab.methods import METHODS, MethodConfig
from adapterlab.errors import AdapterlabError
from adapterlab.metrics import BUILTIN
from adapterlab.names import json_digest, name_problem


class RecipeError(AdapterlabError):
    """A recipe that cannot be read or does not fit the schema."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _yaml_words(cls, data):
        """YAML reads no/yes/on/off as booleans; a field whose choices are those words (and not
        booleans) gets its word back, so `--set training.mixed_precision=no` means 'no'."""
        if not isinstance(data, dict):
            return data
        words = {False: ("no", "off", "false"), True: ("yes", "on", "true")}
        fixed = {}
        for key, value in data.items():
            field = cls.model_fields.get(key)
            choices = _literal_choices(field.annotation) if field and isinstance(value, bool) else ()
            if choices and value not in choices:
                value = next((word for word in words[value] if word in choices), value)
            fixed[key] = value
        return fixed


def _literal_choices(annotation) -> tuple:
    """The values of the Literal types in `annotation` (through unions and Optional)."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    return tuple(choice for part in get_args(annotation) for choice in _literal_choices(part))


class HeadConfig(_Section):
    type: Literal["auto", "classifier", "label_words", "generate"] = Field(
        "auto", description="classifier: a linear layer on a pooled hidden state; label_words: an LLM "
        "scores each label's word after the prompt; generate: an LLM writes a completion after the prompt "
        "(few-shot SFT, the loss on the completion's tokens only; needs data.target_field). auto: "
        "classifier for encoders, label_words for LLMs.")
    max_new_tokens: int = Field(64, gt=0, description="Generation: tokens written at most when evaluating "
                                "(and the server's default).")
    pooling: Literal["auto", "mean", "cls", "last"] = Field(
        "auto", description="How a classifier pools token states. auto: as a sentence-transformers backbone "
        "folder says (1_Pooling: bge pools by CLS), else mean for encoders, last for LLMs.")
    normalize: bool | None = Field(None, description="A plain linear classifier (cosine_scale null) reads unit "
                                   "vectors; null: when the sentence-transformers folder ends in a Normalize module. "
                                   "Cosine classifiers always do.")
    text_prompt: str | None = Field(
        None, description="Encoders: prepended to every text and label description (e5: 'query: '); null: the "
        "sentence-transformers folder's default prompt, if it names one.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout before the classifier.")
    cosine_scale: float | None = Field(
        20.0, gt=0, description="Classifier on unit vectors, logits scaled by this; null: a plain linear layer.")
    init: Literal["label_descriptions", "random"] = Field(
        "label_descriptions", description="Classifier rows start as the embeddings of the label "
        "descriptions (labels.json) or names, i.e. at the zero-shot classifier; or at random.")
    tie_labels: Literal[False, True, "auto"] = Field(
        False, description="While training, the classifier's rows are the label descriptions embedded "
        "through the adapted backbone (the adapter learns both sides, as a bi-encoder); the last ones are "
        "saved as a plain classifier. Needs cosine_scale and init label_descriptions. auto: tie when every "
        "label fits in a step (at most tie_labels_per_step labels): with more, the sampled steps cost "
        "several times as much and scored lower on banking77 (docs/benchmarks.md).")
    tie_labels_per_step: int = Field(
        32, gt=1, description="With tie_labels and more labels than this, a step embeds its batch's labels "
        "plus randomly drawn others up to this many (a sampled softmax), so its cost stays flat.")
    prototype_weight: float = Field(
        0.5, ge=0, description="With tie_labels: when training ends, each label's row is its description "
        "vector plus this much of its prototype (the mean vector of the texts it trained on: with "
        "training.max_steps, those its steps drew), both unit length; "
        "0: the description alone. 0.5 scored +0.3 on the few-shot report's datasets (docs/benchmarks.md).")
    label_templates: list[str] = Field(
        ["{label}", "This text is about {label}."], min_length=1,
        description="Each label description is embedded through these templates, then averaged.")
    template: str | None = Field(
        None, description="LLM prompt; {text} (and {text_pair}) are filled in: without {text_pair}, a pair's "
        "second text follows the first on a new line. null: for a label_words head, "
        "'Classify the text as one of: WORD (DESCRIPTION), ...' then 'Text: {text}', from the task's labels.json "
        "(a description that repeats its name is left out), or 'Classify this text.' then 'Text: {text}' where "
        "no description says more than its name; for other heads 'Text: {text}\\nLabel:'.")
    chat: bool | None = Field(
        None, description="LLMs: send the prompt as a user turn of the tokenizer's chat template, so the "
        "label word opens the assistant's answer. null: when the tokenizer has a chat template.")
    label_words: dict[str, str] | None = Field(
        None, description="Label name → word the LLM should say (default: the label name, capitalised "
        "in chat mode, '_' read as a space; with a written prompt (template null), labels whose names start "
        "with the same token are lettered A, B, C, ... and the prompt lists each letter's label).")

    def ties(self, num_labels: int) -> bool:
        """Whether a task with `num_labels` labels trains with tied label descriptions."""
        return self.tie_labels is True or (self.tie_labels == "auto" and num_labels <= self.tie_labels_per_step)

    @model_validator(mode="after")
    def _tied_labels_have_rows(self):
        if self.tie_labels and (self.type == "label_words" or self.cosine_scale is None or self.init != "label_descriptions"):
            raise ValueError("tie_labels needs a cosine classifier started from the label descriptions "
                             "(type classifier or auto, cosine_scale set, init label_descriptions)")
        return self


class QuantizationConfig(_Section):
    mode: Literal["none", "8bit", "4bit"] = Field(
        "none", description="Load the backbone's linear layers in 8 or 4 bits (bitsandbytes; CPU or GPU). "
        "Adapters trained this way serve on the full-precision backbone too.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="4-bit compute dtype.")


class DataConfig(_Section):
    path: str = Field(
        description="A folder with train/test .jsonl, .csv or .parquet files (and labels.json), one such file, "
        "'demo:NAME' for a dataset shipped with adapterlab, or a hub dataset id.")
    test_path: str | None = Field(None, description="Test file, when `path` names a single train file.")
    text_field: str = Field("text", description="Column holding the text.")
    text_pair_field: str | None = Field(None, description="Column holding the second text of a pair.")
    label_field: str = Field("label", description="Column holding the label (index or name).")
    target_field: str | None = Field(
        None, description="Generation tasks (head.type generate): the column holding the completion; "
        "text_field is the input (e2e: mr → ref; extraction: ref → mr).")
    references_field: str | None = Field(
        None, description="Generation tasks: a column holding every reference of a test row (a list), for "
        "multi-reference scores (e2e: refs); default: the target alone.")
    labels: list[str] | None = Field(None, description="Label names in index order (default: labels.json).")
    k: int | None = Field(16, gt=0, description="Training examples per class (generation tasks: training rows); "
                          "null uses every row.")
    seed: int = Field(0, description="Seed of the k-shot draw.")
    test_limit: int | None = Field(None, gt=0, description="Evaluate on the first N test rows only.")
    unlabeled: str | None = Field(
        None, description="Texts without labels for training.self_train: a .jsonl, .csv or .parquet file "
        "(text_field and text_pair_field; any labels in it are ignored), a .txt file (one text a line), or `train`: "
        "the train split's rows other than the k-shot rows, their labels dropped. Never the test split.")
    unlabeled_rows: int | None = Field(None, gt=0, description="Read at most N unlabeled rows, drawn with data.seed; "
                                       "null: all of them.")


AUTO_SOURCE = "auto"  # training.init_from: the k-shot rows choose the source among the store's adapters

# Grid keys that cannot vary between the trainings of one selection: the selection itself, the
# precision the run's Accelerator was made with, the checkpoints, the self-training and the ensemble of
# the final run.
_NOT_SELECTABLE = {"training.select", "training.mixed_precision", "training.checkpoint_every", "training.self_train",
                   "training.ensemble"}


class SelectionConfig(_Section):
    folds: int = Field(
        2, ge=2, le=10, description="Stratified folds of the k-shot rows: each grid point trains on folds-1 parts "
        "and is scored on the one left out, every part in turn. Every class needs at least this many rows "
        "(data.k >= folds). More folds train on more rows each (a closer estimate) and cost more trainings.")
    grid: dict[str, list] | None = Field(
        None, min_length=1, description="Settings to choose among: a dotted training.* or head.* key "
        "(training.epochs, training.max_steps, training.lr, head.tie_labels, head.prototype_weight, ...) → the "
        "values to try; every combination is a grid point. Ties go to the point of fewer optimizer steps, then to "
        "the first written. head.prototype_weight costs no training: the points that differ only in it share their "
        "trainings. A selection has a grid or candidates.")
    candidates: list[str] = Field(
        [], description="Other recipe files (paths relative to this recipe's file) to choose among beside this "
        "recipe as written, each with its own backbone, method, head and training settings but this recipe's task, "
        "data and output, so that all see the same k-shot rows and folds. Each is cross-validated on its own "
        "backbone, cheapest first (backbone weight bytes × training tokens), within training.budget_seconds. The "
        "cheapest trains unless costlier ones beat it clearly on the held-out rows they disagree on (a sign test, "
        "p < 0.05): then the best cross-validated accuracy among those. A candidate selects nothing itself (no "
        "training.select, no init_from auto) and trains one classifier. The card's selection lists each "
        "candidate's cv_accuracy, p_value_over_cheapest and seconds.")
    max_cost: float = Field(
        3.0, gt=0, description="The selection may train at most this many times the optimizer steps of one run of "
        "the recipe as written (all grid points × folds, each on folds-1 parts of the rows); a grid that costs "
        "more is refused before anything trains. The card records the measured time ratio. Candidates are bounded "
        "by training.budget_seconds instead.")
    fallback: Literal["none", "zero_shot"] = Field(
        "none", description="When the chosen point's cross-validated accuracy is below the zero-shot classifier "
        "the adapter starts from (scored on the same rows: the card's below_zero_shot) by more than chance (a "
        "one-sided sign test on the rows where they disagree, p < 0.05: the card's p_value), zero_shot stores "
        "that start untrained, so the adapter answers exactly as its zero-shot classifier; none trains it anyway.")

    @model_validator(mode="after")
    def _grid_or_candidates(self):
        if self.grid is not None and self.candidates:
            raise ValueError("training.select takes a grid or candidates, not both: each candidate trains as written")
        if self.grid is None and not self.candidates:
            raise ValueError("training.select needs a grid or candidates to choose among")
        return self

    @model_validator(mode="after")
    def _grid_names_settings(self):
        for key, values in (self.grid or {}).items():
            section, _, name = key.partition(".")
            fields = {"training": TrainingConfig.model_fields, "head": HeadConfig.model_fields}.get(section, {})
            if name not in fields or key in _NOT_SELECTABLE:
                raise ValueError(f"grid key {key!r} is not a setting a selection can vary (a training.* or head.* "
                                 f"field other than {', '.join(sorted(_NOT_SELECTABLE))})")
            if not values:
                raise ValueError(f"grid key {key!r} has no values to try")
            if key == "training.init_from" and AUTO_SOURCE in values:
                raise ValueError("grid key 'training.init_from' takes sources (TASK/NAME) and null; auto is "
                                 "training.init_from's own setting")
        return self

    @property
    def points(self) -> list[dict]:
        """Every combination of the grid's values, in the order written (none without a grid)."""
        if self.grid is None:
            return []
        return [dict(zip(self.grid, values)) for values in itertools.product(*self.grid.values())]


class SelfTrainingConfig(_Section):
    rounds: int = Field(1, ge=1, le=5, description="Each round scores data.unlabeled with the latest adapter, keeps "
                        "confident pseudo-labels and trains a fresh adapter on the k-shot rows and them.")
    threshold: float = Field(0.0, ge=0, lt=1, description="A pseudo-label needs at least this probability for its "
                             "class (the adapter's softmax, as evaluation scores it).")
    keep_fraction: float = Field(
        0.2, gt=0, le=1, description="At most this share of the unlabeled rows become pseudo-labels in a round, "
        "split evenly over the classes: each class keeps its most confident rows up to its share. Fewer are "
        "righter: on MPQA (k=16) the top 20 % were 92 % right, the top 50 % 85 %, all of them 81 % (docs/self-training.md).")
    balance: bool = Field(True, description="Every class keeps as many pseudo-labels as the class with fewest, so "
                          "that the pseudo-labels cannot pile onto one class; false: each class up to its share.")
    labelled_share: float = Field(
        0.5, ge=0, lt=1, description="The k-shot rows are repeated until they are at least this share of a "
        "retraining's rows, so that the true labels are not drowned by the pseudo-labels.")
    steps: float = Field(1.0, gt=0, description="Optimizer steps of each retraining, as a multiple of the k-shot "
                         "run's: the cost stays in proportion to that run whatever the number of unlabeled rows "
                         "(30 epochs over hundreds of pseudo-labelled rows would cost ten times as much).")
    teachers: list[str] = Field(
        [], description="Stored adapters of this task (TASK/NAME in output.store, or folders) that label the first "
        "round instead of an adapter trained here on the k-shot rows (that run is skipped); with several, their "
        "probabilities are averaged, an ensemble. Empty: the k-shot run here labels it.")


class TrainingConfig(_Section):
    epochs: int = Field(10, gt=0, description="Passes over the k-shot rows (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs.")
    lr: float | None = Field(None, gt=0, description="Learning rate (default: the method's).")
    head_lr: float | None = Field(None, gt=0, description="Learning rate of the head (default: lr).")
    batch_size: int = Field(16, gt=0, description="Rows per device per forward pass.")
    grad_accum: int = Field(1, gt=0, description="Forward passes per optimizer step.")
    max_length: int = Field(128, gt=0, description="Tokens per training input; longer inputs are truncated.")
    eval_max_length: int | None = Field(
        None, gt=0, description="Tokens per input when evaluating and serving (default: max_length); "
        "more than max_length reads more of long texts at no training cost.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] | None = Field(
        "auto", description="Autocast while training (Accelerate's mixed_precision); weights stay float32 and "
        "evaluation runs in full precision. auto: from the hardware, bf16 where the device computes it natively "
        "(a GPU with bf16, a CPU with AVX512-BF16 or AMX), fp16 on other GPUs, else no: on a CPU with AVX2 "
        "only, bf16 is ~30x slower than float32. null: the launcher's setting (accelerate config or "
        "ACCELERATE_MIXED_PRECISION). The card records what ran.")
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps with a rising learning rate.")
    seed: int = Field(0, description="Seed of initialisation, dropout and shuffling.")
    checkpoint_every: int | None = Field(
        None, gt=0, description="Save the run's state every N optimizer steps (STORE/.checkpoints/), so "
        "that `adapterlab train --resume` continues a killed run; null: no checkpoints.")
    eval_batch_size: int = Field(64, gt=0)
    metrics: list[str] = Field(
        [], description="Metrics beyond accuracy and macro_f1, by `evaluate` name (needs the hub, and "
        "trust_hub_metrics: evaluate.load runs the metric's script from the hub).")
    trust_hub_metrics: bool = Field(
        False, description="Allow metrics that evaluate.load fetches from the Hugging Face hub and runs as code.")
    ensemble: int = Field(
        1, ge=1, le=16, description="Train this many adapters on the same k-shot rows, with training seeds seed, "
        "seed+1, ...; they are stored as one adapter whose answer is the mean of their label probabilities "
        "(its card lists them) and served in one backbone pass. Classification only; costs N trainings, and N "
        "rows of each pass per request. 1: a single adapter.")
    select: SelectionConfig | None = Field(
        None, description="Choose settings by cross-validation on the k-shot rows alone (never the test rows), then "
        "train on all of them with the best; the card records the choice, its estimate and the zero-shot one. "
        "null: train the recipe as written.")
    budget_seconds: float | None = Field(
        None, gt=0, description="Wall-time budget of a selection among training.select.candidates, which run "
        "cheapest first: a candidate whose estimate (its backbone load plus its first fold's seconds × folds) would "
        "take the selection past the budget is skipped, and the card records it as skipped with its estimate; the "
        "cheapest always runs. A soft bound: a candidate's first fold runs before it is judged, and the final run "
        "is not counted. null: every candidate runs.")
    self_train: SelfTrainingConfig | None = Field(
        None, description="Self-training on data.unlabeled: after the k-shot run, rounds of confident, class-balanced "
        "pseudo-labels and a fresh adapter retrained on the k-shot rows and them; the card's self_training records "
        "the setting ('k=16 labelled + 1000 unlabeled'), the pseudo-labels kept per class and round, and the seconds. "
        "null: the k-shot rows alone.")
    init_from: str | None = Field(
        None, description="Start from a stored classifier of the same backbone and method (the adapter library): "
        "TASK/NAME in output.store, or an adapter folder. Its method settings replace method.*, its adapter weights "
        "are the start, and so are its head rows when it knows every label of this task by name; otherwise the head "
        "starts from this task's label descriptions embedded through the source. auto: each stored classifier of "
        "other tasks is scored as a start on the k-shot rows; those that start above the zero-shot classifier (the "
        "best init_candidates of them, those that know every label of this task by name first) and none are "
        "cross-validated on the k-shot rows (training.select), and the best trains; the card's init_from records the candidates and the choice. null: a fresh adapter.")
    init_candidates: int = Field(
        2, ge=1, le=16, description="With init_from auto: how many of the best-starting stored adapters the "
        "cross-validation tries beside none (each adds one training of the recipe, in folds).")

    @model_validator(mode="after")
    def _hub_code_is_opted_into(self):
        fetched = [name for name in self.metrics if name not in BUILTIN]
        if fetched and not self.trust_hub_metrics:
            raise ValueError(f"metrics {', '.join(map(repr, fetched))} would run code from the Hugging Face hub "
                             "(evaluate.load); set training.trust_hub_metrics: true to allow it")
        return self

    @property
    def inference_max_length(self) -> int:
        return self.eval_max_length or self.max_length


class OutputConfig(_Section):
    store: str = Field("adapters", description="Adapter store folder.")
    name: str | None = Field(
        None, description="Adapter name. Default: METHOD-kK-sSEED (-ensN for an ensemble), then a digest of the "
        "settings that change the trained adapter (lora-k16-s0-f2fa1d): 6 hex digits of SHA-256 over the recipe's "
        "fields written differently from their defaults, as written (backbone and data.path as given, never "
        "resolved), but "
        "output.*, data.test_path, data.test_limit, data.references_field, training.eval_batch_size, "
        "training.metrics, training.trust_hub_metrics and training.checkpoint_every, which only decide how a run "
        "is scored, checkpointed or stored. Same settings, same name; other settings, another name.")
    overwrite: bool = Field(True, description="Replace an adapter of the same name in the store; false: refuse, "
                            "before training and again, under the adapter's lock, when saving (another run may "
                            "have saved that name meanwhile). `adapterlab train` sets it from --overwrite.")


# Settings that decide how a run is scored on the test rows, checkpointed or stored, never the adapter it
# trains: left out of its settings digest (OutputConfig.name states the rule).
NOT_IN_SETTINGS_DIGEST = {"output": True, "data": {"test_path", "test_limit", "references_field"},
                          "training": {"eval_batch_size", "metrics", "trust_hub_metrics", "checkpoint_every"}}
SETTINGS_DIGEST_CHARS = 6


class Recipe(_Section):
    task: str = Field(description="Task name; adapters are stored under STORE/TASK/.")
    backbone: str = Field(description="'minilm', 'smollm2-135m', a local HF folder or a hub id.")
    quantization: QuantizationConfig = QuantizationConfig()
    method: MethodConfig
    head: HeadConfig = HeadConfig()
    data: DataConfig
    training: TrainingConfig = TrainingConfig()
    output: OutputConfig = OutputConfig()
    # with_name_pinned: the digest of the settings as given, kept while a run chooses and resolves settings
    _pinned_digest: str | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _names_are_safe(self):
        """The task and the adapter name become folders: output.name, or the name made of the method,
        data.k and data.seed (a huge k makes one too long)."""
        adapter = "output.name" if self.output.name is not None else "the adapter name (set output.name)"
        for field, value in (("task", self.task), (adapter, self.adapter_name)):
            problem = name_problem(value)
            if problem:
                raise ValueError(f"{field} {value!r} {problem}")
        return self

    @model_validator(mode="after")
    def _generation_has_targets(self):
        if (self.head.type == "generate") != (self.data.target_field is not None):
            raise ValueError("head.type generate and data.target_field go together: a generation task reads its "
                             "completions from target_field")
        return self

    @model_validator(mode="after")
    def _selection_can_run(self):
        if (select := self.training.select) is None:
            return self
        self._classification_only("training.select scores grid points by held-out accuracy")
        if self.data.k is not None and self.data.k < select.folds:
            raise ValueError(f"training.select.folds {select.folds} needs at least {select.folds} rows per class "
                             f"(each fold holds out every class); data.k is {self.data.k}")
        if select.fallback == "zero_shot" and not METHODS[self.method.name].UNTRAINED_IS_BACKBONE:
            raise ValueError(f"training.select.fallback zero_shot stores the untrained adapter, but an untrained "
                             f"{self.method.name} adapter changes the backbone's answers (lora's does not)")
        for point in select.points:  # each point must be a valid recipe: refused now, not after hours of folds
            try:
                self.with_settings({**point, "training.select": None})
            except ValidationError as error:
                raise ValueError(f"training.select.grid point {point}: {describe_errors(error)}") from None
        return self

    @model_validator(mode="after")
    def _candidates_can_run(self):
        training = self.training
        if not (training.select and training.select.candidates):
            if training.budget_seconds is not None:
                raise ValueError("training.budget_seconds bounds a selection among training.select.candidates, "
                                 "and this recipe offers none")
            return self
        for refused, setting in ((training.init_from == AUTO_SOURCE, "training.init_from auto"),
                                 (training.self_train is not None, "training.self_train")):
            if refused:
                raise ValueError(f"training.select.candidates and {setting} do not combine: each candidate trains "
                                 "one classifier as written")
        try:
            candidates = candidate_recipes(self)
        except RecipeError as error:
            raise ValueError(str(error)) from None
        for path, candidate in zip(training.select.candidates, candidates):
            if training.select.fallback == "zero_shot" and not METHODS[candidate.method.name].UNTRAINED_IS_BACKBONE:
                raise ValueError(f"training.select.fallback zero_shot stores the untrained adapter, but candidate "
                                 f"{path}'s untrained {candidate.method.name} adapter changes the backbone's answers")
            if candidate.training.mixed_precision != training.mixed_precision:  # one Accelerator runs them all
                raise ValueError(f"candidate {path} sets training.mixed_precision {candidate.training.mixed_precision}"
                                 f", this recipe {training.mixed_precision}: one run has one precision")
        return self

    @model_validator(mode="after")
    def _self_training_has_texts(self):
        self_train, unlabeled = self.training.self_train, self.data.unlabeled
        if (self_train is None) != (unlabeled is None):
            raise ValueError("training.self_train and data.unlabeled go together: self-training reads the unlabeled "
                             "texts, and nothing else does")
        if self_train is None:
            return self
        self._classification_only("training.self_train keeps pseudo-labels by their class probability")
        if unlabeled == "train" and self.data.k is None:
            raise ValueError("data.unlabeled train means the train rows other than the k-shot rows; with data.k null "
                             "every train row is labelled and none is left")
        if self.training.checkpoint_every:
            raise ValueError("training.self_train trains several adapters in one run: it cannot resume from "
                             "training.checkpoint_every's checkpoints (set it to null)")
        return self

    @model_validator(mode="after")
    def _library_start_can_run(self):
        init_from = self.training.init_from
        if init_from is None:
            return self
        self._classification_only("training.init_from starts a classifier from a stored one")
        if init_from == AUTO_SOURCE and self.training.ensemble > 1:
            raise ValueError("training.init_from auto chooses by cross-validation, which training.ensemble does not "
                             "combine with: name the source (TASK/NAME) for an ensemble")
        if self.training.select and "training.init_from" in (self.training.select.grid or {}) and init_from == AUTO_SOURCE:
            raise ValueError("training.init_from auto fills training.select.grid's training.init_from itself: "
                             "give one or the other")
        return self

    @model_validator(mode="after")
    def _ensemble_can_run(self):
        if self.training.ensemble == 1:
            return self
        for refused, why in ((self.generates, "averages label probabilities: it needs a classification task, not "
                                              "head.type generate"),
                             (self.training.select is not None, "and training.select do not combine: choose the "
                                                                "settings first, then train the ensemble with them"),
                             (self.training.checkpoint_every is not None, "trains its members without checkpoints: "
                                                                          "set training.checkpoint_every to null")):
            if refused:
                raise ValueError(f"training.ensemble {self.training.ensemble} {why}")
        return self

    def _classification_only(self, feature: str) -> None:
        if self.generates:
            raise ValueError(f"{feature}: it needs a classification task, not head.type generate")

    def with_settings(self, settings: dict) -> "Recipe":
        """This recipe with dotted `section.field` settings replaced, validated anew (a pinned digest kept)."""
        raw = self.model_dump()
        for key, value in settings.items():
            section, _, name = key.partition(".")
            raw[section][name] = value
        changed = Recipe.model_validate(raw)
        changed._pinned_digest = self._pinned_digest
        return changed

    def with_name_pinned(self) -> "Recipe":
        """This recipe with its adapter name written into output.name and its settings digest kept, so that
        the settings a run chooses (training.select, init_from auto) or resolves (the head's auto fields)
        change neither the folder it saves to nor the digest its card records."""
        pinned = self.with_settings({"output.name": self.adapter_name})
        pinned._pinned_digest = self.settings_digest
        return pinned

    def written_settings(self, exclude: dict) -> dict:
        """The fields written differently from their defaults, but `exclude` (as pydantic's), as JSON; with
        the method's name, its section's default: without it LoRA and prefix-tuning at their defaults read alike."""
        settings = self.model_dump(mode="json", exclude=exclude, exclude_defaults=True)
        settings["method"] = {**settings.get("method", {}), "name": self.method.name}
        return settings

    @property
    def settings_digest(self) -> str:
        """What tells this recipe's adapter from one trained with other settings (OutputConfig.name's rule).
        Defaults are left out so that a new field of a later version keeps the names of earlier runs."""
        if self._pinned_digest:
            return self._pinned_digest
        written = self.written_settings(NOT_IN_SETTINGS_DIGEST)
        # a section whose written fields are all left out reads as one not written
        return json_digest({key: value for key, value in written.items() if value != {}}, SETTINGS_DIGEST_CHARS)

    @property
    def generates(self) -> bool:
        return self.head.type == "generate"

    @property
    def adapter_name(self) -> str:
        """output.name, else METHOD-kK-sSEED (-ensN), then the settings digest."""
        ensemble = f"-ens{self.training.ensemble}" if self.training.ensemble > 1 else ""
        return self.output.name or (f"{self.method.name}-k{self.data.k or 'all'}-s{self.data.seed}{ensemble}-"
                                    f"{self.settings_digest}")


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe, apply `key.sub=value` overrides, read its candidates' paths from its folder, validate."""
    path = Path(path)
    raw = _read_recipe_file(path)
    for override in overrides:
        apply_override(raw, override)
    _candidates_from(raw, path.parent)
    return validate_recipe(raw, source=str(path))


def _read_recipe_file(path: Path) -> dict:
    """A recipe file's YAML mapping, not yet validated."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"recipe not found: {path}") from None
    except UnicodeDecodeError as error:
        raise RecipeError(f"{path}: not UTF-8 text (byte {error.start})") from None
    except OSError as error:  # a folder, a file it may not read
        raise RecipeError(f"{path}: cannot be read ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: malformed YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping, got {type(raw).__name__}")
    return raw


def _candidates_from(raw: dict, folder: Path) -> None:
    """training.select.candidates as paths from `folder`, the recipe file's (absolute ones stay)."""
    training = raw.get("training")
    select = training.get("select") if isinstance(training, dict) else None
    candidates = select.get("candidates") if isinstance(select, dict) else None
    if isinstance(candidates, list):
        select["candidates"] = [str(folder / path) if isinstance(path, str) else path for path in candidates]


def candidate_recipes(recipe: Recipe) -> list[Recipe]:
    """The recipes `training.select.candidates` names, each with `recipe`'s task, data, output and training
    seed, so that all train and score on the same rows, store where `recipe` would, and a sweep over seeds
    varies the candidates' initialisation with the recipe's."""
    shared = recipe.model_dump(include={"task", "data", "output"})
    candidates = [_candidate(path, shared, recipe.training.seed) for path in recipe.training.select.candidates]
    for candidate in candidates:  # the adapter is named and carded by the settings the user gave
        candidate._pinned_digest = recipe._pinned_digest
    return candidates


def _candidate(path: str, shared: dict, seed: int) -> Recipe:
    where = f"training.select.candidates {path}"
    try:
        raw = _read_recipe_file(Path(path))
    except RecipeError as error:
        raise RecipeError(f"training.select.candidates: {error}") from None
    training = raw.get("training")
    if isinstance(training, dict) and training.get("select") is not None:  # refused unread: it may name this recipe
        raise RecipeError(f"{where} has its own training.select: a candidate trains as written (no nested selections)")
    own = validate_recipe(raw, source=where)
    for refused, why in ((own.generates, "is a generation recipe (head.type generate): candidates are classifiers, "
                                         "compared by held-out accuracy"),
                         (own.training.init_from == AUTO_SOURCE, "chooses its source (training.init_from auto): a "
                                                                 "candidate trains as written (no nested selections)"),
                         (own.training.ensemble > 1 or own.training.self_train is not None,
                          "trains an ensemble or self-trains: a candidate trains one classifier")):
        if refused:
            raise RecipeError(f"{where} {why}")
    mixed = {**own.model_dump(), **shared}
    mixed["training"]["seed"] = seed
    return validate_recipe(mixed, source=where)


def apply_override(raw: dict, override: str) -> None:
    """Set `a.b.c=value` in a nested dict."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise RecipeError(f"--set {override!r}: expected KEY=VALUE")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {override!r}: {part!r} is not a section")
    node[leaf] = _parse_value(value)


def _parse_value(text: str):
    """YAML scalars and lists ('3', 'null', '[a, b]'); a mapping only when written as one
    ('{a: b}'), so that prompt templates like 'Review: {text}' stay strings."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, dict) and not (text.lstrip().startswith("{") and ": " in text):
        return text
    return value


def validate_recipe(raw: dict, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as error:
        raise RecipeError(f"{source}: {describe_errors(error)}") from None


def describe_errors(error: ValidationError) -> str:
    """One line per problem, naming the key: 'training.lrr: unknown key'."""
    problems = []
    for item in error.errors():
        where = ".".join(_key(part) for part in item["loc"] if part not in METHODS)  # drop union tags
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)


def _key(part: str | int) -> str:
    """A key as written, quoted unless it is a plain word: a key may hold a newline, the message may not."""
    return str(part) if isinstance(part, int) or part.isidentifier() else repr(part)
