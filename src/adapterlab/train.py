"""Training one few-shot adapter under Accelerate: setup → fit → evaluate → save; with `training.select`,
a cross-validation on the k-shot rows chooses the recipe's settings first (`select_settings`).

Runs the same on one CPU or under `accelerate launch` on many processes: the k-shot rows are sharded
by the prepared data loader, gradients averaged by Accelerate, and only the main process writes.
"""

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, gather_object, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from adapterlab.backbones import Backbone, fingerprint, load_backbone, resolve_path
from adapterlab.checkpoint import (CheckpointError, checkpoint_folder, has_checkpoint, read_checkpoint,
                                   read_selection, remove_checkpoint, restore, run_identity, save_checkpoint,
                                   save_selection)
from adapterlab.crossval import PROTOTYPE_WEIGHT, PointResult, Selection, SelectionError, stratified_folds, trainings
from adapterlab.data import Pairs, Split, TaskData, load_pairs, load_task, read_unlabeled
from adapterlab.generative import GenerativeModel, build_generative_model
from adapterlab.errors import AdapterlabError
from adapterlab.heads import pooling_of
from adapterlab.methods import method_module
from adapterlab.metrics import classification_metrics, generation_metrics
from adapterlab.model import AdapterModel, build_adapter_model, parameter_counts
from adapterlab.precision import cpu_capability, mixed_precision_for
from adapterlab.recipe import Recipe
from adapterlab.self_training import self_train
from adapterlab.store import AdapterCard, save_adapter

log = logging.getLogger("adapterlab")


@dataclass
class TrainResult:
    adapter_path: Path | None  # None on processes other than the main one
    trainable_params: int
    total_params: int
    adapter_bytes: int
    train_seconds: float
    metrics: dict[str, float]

    def as_dict(self) -> dict:
        return {"adapter_path": str(self.adapter_path) if self.adapter_path else None,
                "trainable_params": self.trainable_params, "total_params": self.total_params,
                "adapter_bytes": self.adapter_bytes, "train_seconds": round(self.train_seconds, 3),
                "metrics": self.metrics}


def setup(recipe: Recipe) -> tuple[Accelerator, TaskData, AdapterModel]:
    """Accelerator, k-shot data and a fresh adapter on the frozen backbone."""
    accelerator = _accelerator(recipe.training)
    task = load_data(recipe)  # before the backbone loads
    return accelerator, task, new_model(recipe, task, accelerator)


def load_data(recipe: Recipe) -> TaskData:
    return load_pairs(recipe.data) if recipe.generates else load_task(recipe.data)


def new_model(recipe: Recipe, task: TaskData, accelerator: Accelerator,
              backbone: Backbone | None = None) -> AdapterModel | GenerativeModel:
    """A fresh adapter, seeded by training.seed, on `backbone` (bare: as loaded, or as
    `AdapterModel.release_backbone` returns it) or else on a freshly loaded frozen backbone."""
    # DDP keeps find_unused_parameters=False (no search of the graph at each step): every trainable
    # parameter reaches the loss (LoRA leaves the encoder's unused pooler alone; tests/test_methods.py).
    set_seed(recipe.training.seed)  # loading draws nothing from the generator: the seed reaches the adapter's init
    if backbone is None:
        backbone = load_backbone(recipe.backbone, recipe.quantization, backbone_device_map(recipe.quantization, accelerator))
    if recipe.generates:
        return build_generative_model(recipe, backbone)
    return build_adapter_model(recipe, backbone, task.label_names, task.label_descriptions)


def _accelerator(config) -> Accelerator:
    """Accelerate keeps one state per process, fixed by its first Accelerator; several runs in one
    process (a sweep, the tests) may differ in mixed precision, so a single-process run starts from a
    fresh state. A launched process runs one recipe and keeps the launcher's (the process state is only
    read once it exists: created here first, it would miss the launcher's settings). `auto` asks the
    device the process state chose."""
    if PartialState._shared_state and not PartialState().use_distributed:
        AcceleratorState._reset_state()
    precision = config.mixed_precision
    if precision == "auto":
        device = Accelerator(gradient_accumulation_steps=config.grad_accum).device
        precision = mixed_precision_for(device)
        AcceleratorState._reset_state()  # the process state (ranks, device) stays; the precision is set anew
        if PartialState().is_main_process:
            log.info("mixed precision: %s (auto, on %s%s)", precision, device,
                     f": {_describe_cpu()}" if device.type == "cpu" else "")
    try:
        return Accelerator(gradient_accumulation_steps=config.grad_accum, mixed_precision=precision)
    except ValueError as error:  # e.g. fp16 without a GPU
        raise AdapterlabError(f"training.mixed_precision {precision}: {error}") from None


def _describe_cpu() -> str:
    cpu = cpu_capability()
    speed = "fast" if cpu["fast_bf16"] else "no fast"
    return f"{cpu['cpu']}, {speed} bf16 (AVX512-BF16 {cpu['avx512_bf16']}, AMX {cpu['amx']})"


def backbone_device_map(quantization, accelerator: Accelerator) -> dict | None:
    """Where this process loads the backbone. Full-precision weights load on the CPU and Accelerate
    moves them; quantized ones are placed as they load, a whole copy per process on its own GPU
    ("auto" would spread one copy over all the GPUs, which DDP cannot train)."""
    if quantization.mode == "none":
        return None
    return {"": "cpu"} if accelerator.device.type == "cpu" else {"": accelerator.local_process_index}


def train(recipe: Recipe, show_progress: bool = True, resume: bool = False) -> TrainResult:
    if recipe.training.ensemble > 1:
        from adapterlab.ensemble import train_ensemble  # it trains each member through this module

        return train_ensemble(recipe, show_progress, resume)
    accelerator, task = _accelerator(recipe.training), load_data(recipe)
    selection = chosen_settings(recipe, task, accelerator, show_progress, resume) if recipe.training.select else None
    if selection:
        recipe = recipe.with_settings(selection.chosen.settings)
    model = new_model(recipe, task, accelerator)
    trainable, total = parameter_counts(model)
    if accelerator.is_main_process:  # one log, one progress bar, one writer, however many processes
        log.info("trainable parameters: %d of %d (%.3f%%); backbone frozen", trainable, total, 100 * trainable / total)
    fall_back = False
    if selection:  # the untrained start on every k-shot row: the rows the folds held out, one by one
        selection.zero_shot_right = _right(model, task.train, recipe)
        fall_back = selection.clearly_below_zero_shot and recipe.training.select.fallback == "zero_shot"
        if selection.below_zero_shot and accelerator.is_main_process:
            log.warning("cross-validation puts the adapter below its zero-shot start (%d against %d of %d rows, "
                        "p=%.3f)%s", selection.chosen.correct, selection.zero_shot_correct, selection.rows,
                        selection.below_zero_shot_p_value,
                        ": storing the start untrained (fallback zero_shot)" if fall_back else "")

    started = time.perf_counter()
    teachers = recipe.training.self_train.teachers if recipe.training.self_train else []
    # fallen back, the adapter stays at its start: it answers as its zero-shot classifier; stored teachers
    # label the unlabeled rows in place of a k-shot run
    if not fall_back and not teachers:
        fit(model, task.train, recipe, accelerator, show_progress, resume)
    self_training = None
    if recipe.training.self_train:
        model, self_training = _self_train(model, task, recipe, accelerator, show_progress,
                                           time.perf_counter() - started)
    train_seconds = time.perf_counter() - started

    model = accelerator.unwrap_model(model)
    metrics = evaluate(model, task.test, recipe) if task.test is not None else {}
    path, size = None, 0
    if accelerator.is_main_process:
        card = make_card(_resolved(recipe, model, accelerator), task, model, trainable, total, train_seconds, metrics,
                         selection.record(fall_back, train_seconds) if selection else None,
                         self_training.record() if self_training else None)
        path, card = save_adapter(model, card, recipe.output.store)
        size = card.adapter_bytes
        remove_checkpoint(checkpoint_folder(recipe))  # the run is complete: nothing left to resume
    accelerator.wait_for_everyone()
    return TrainResult(path, trainable, total, size, train_seconds, metrics)


def chosen_settings(recipe: Recipe, task: TaskData, accelerator: Accelerator, show_progress: bool,
                    resume: bool) -> Selection:
    """`select_settings`, or with `resume` the choice an interrupted run of this recipe made; a run that
    checkpoints keeps its choice beside its checkpoints."""
    folder = checkpoint_folder(recipe)
    identity = run_identity(recipe, fingerprint(resolve_path(recipe.backbone)), accelerator.num_processes)
    saved = read_selection(folder, identity) if resume else None
    if saved:
        selection = Selection.from_state(saved)
        if accelerator.is_main_process:
            log.info("resuming with the settings the interrupted run chose: %s", selection.chosen.settings)
        return selection
    selection = select_settings(recipe, task, accelerator, show_progress)
    if recipe.training.checkpoint_every and accelerator.is_main_process:
        save_selection(folder, selection.state(), identity)
    return selection


def select_settings(recipe: Recipe, task: TaskData, accelerator: Accelerator, show_progress: bool) -> Selection:
    """Cross-validates the grid of `training.select` on the k-shot rows (`task.train`; the test rows are
    never read): each training on folds-1 parts, scored on the part left out, every part in turn."""
    select, rows = recipe.training.select, task.train
    held_out_parts = stratified_folds(rows.labels, select.folds, recipe.data.seed, task.label_names)
    kept_parts = [[i for part in held_out_parts if part is not held_out for i in part] for held_out in held_out_parts]
    groups = list(trainings(select.points).values())
    trials = [recipe.with_settings({**points[0], "training.select": None, "training.checkpoint_every": None})
              for points in groups]
    folds = [[_fold_recipe(trial, len(kept), len(rows)) for kept in kept_parts] for trial in trials]
    steps = [sum(_schedule(len(kept), fold.training, accelerator.num_processes)[0]
                 for kept, fold in zip(kept_parts, trial_folds)) for trial_folds in folds]
    cost = sum(steps) / _schedule(len(rows), recipe.training, accelerator.num_processes)[0]
    if cost > select.max_cost:
        raise SelectionError(f"training.select would train {cost:.2f}x the optimizer steps of one run of this recipe "
                             f"({len(trials)} trainings x {select.folds} folds), over its max_cost {select.max_cost}: "
                             "fewer folds, grid values or epochs")
    results = [[PointResult(point, trial_steps) for point in points] for points, trial_steps in zip(groups, steps)]
    progress = tqdm(total=len(trials) * select.folds, desc=f"select {recipe.task}",
                    disable=not (show_progress and accelerator.is_main_process))
    started = time.perf_counter()
    backbone = None  # loaded once: each fold's adapter is built on it, then taken out of it
    stems = {}  # every k-shot row's stem states, by how rows are read: the folds' rows are among them
    for trial_folds, group in zip(folds, results):
        for fold, kept, held_out in zip(trial_folds, kept_parts, held_out_parts):
            model = new_model(fold, task, accelerator, backbone)
            reading = (fold.training.max_length, model.template, model.chat, model.text_prompt)
            if reading not in stems:
                stems[reading] = _stem_states(model, rows, fold.training)
            stem = stems[reading]
            fit(model, rows.select(kept), fold, accelerator, show_progress=False,
                stem=[stem[i] for i in kept] if stem else None, settle=False)
            if model.tied:  # each prototype weight settles the same trained label vectors anew
                weights = [result.settings.get(PROTOTYPE_WEIGHT, fold.head.prototype_weight) for result in group]
                right = _right_per_prototype_weight(model, rows.select(kept), rows.select(held_out), weights)
            else:
                right = [_right(model, rows.select(held_out), fold)] * len(group)
            for result, positions in zip(group, right):
                result.right += [held_out[i] for i in positions]
            accelerator.free_memory()  # drops the prepared model before the next fold's
            backbone = model.release_backbone()
            progress.update(1)
    progress.close()
    return Selection(select.folds, select.grid, len(rows), [r for group in results for r in group],
                     len(trials) * select.folds, cost, time.perf_counter() - started)


def _fold_recipe(trial: Recipe, kept: int, rows: int) -> Recipe:
    """A trial as one fold trains it: a user's `training.max_steps` shrinks with the share of the rows the
    fold keeps, as a number of epochs does by itself, so each fold passes over its rows as often as the
    final run will over all of them."""
    if not trial.training.max_steps:
        return trial
    return trial.with_settings({"training.max_steps": max(1, round(trial.training.max_steps * kept / rows))})


def _self_train(model: AdapterModel, task: TaskData, recipe: Recipe, accelerator: Accelerator, show_progress: bool,
                first_train_seconds: float):
    """`training.self_train` after the k-shot run (self_training.py): each round's fresh adapter trains
    `self_train.steps` times the k-shot run's optimizer steps, on the k-shot rows and the pseudo-labels."""
    steps = _schedule(len(task.train), recipe.training, accelerator.num_processes)[0]
    retraining = recipe.with_settings({"training.max_steps": max(1, round(recipe.training.self_train.steps * steps)),
                                       "training.select": None})

    def retrain(rows: Split) -> tuple[AdapterModel, int]:
        accelerator.free_memory()  # drops the previous round's prepared model before the next one loads
        fresh = new_model(retraining, task, accelerator)
        fit(fresh, rows, retraining, accelerator, show_progress)
        return fresh, retraining.training.max_steps

    return self_train(model, task.train, read_unlabeled(recipe.data), recipe, retrain, first_train_seconds,
                      show_progress and accelerator.is_main_process)


def _right(model: AdapterModel, rows: Split, recipe: Recipe) -> list[int]:
    """The positions of `rows` the model labels right, through the scoring path that `evaluate` uses."""
    predictions = model.scores(rows.texts, rows.text_pairs, batch_size=recipe.training.eval_batch_size).argmax(-1)
    return (predictions == torch.tensor(rows.labels)).nonzero().flatten().tolist()


def _right_per_prototype_weight(model: AdapterModel, kept: Split, held_out: Split,
                                weights: list[float]) -> list[list[int]]:
    """`_right` on the held-out rows under each prototype weight, every row embedded once for all the
    weights: a tied head scores unit vectors by cosine, and only its rows change from weight to weight."""
    kept_vectors = model.text_vectors(kept.texts, kept.text_pairs)
    held_out_vectors = model.text_vectors(held_out.texts, held_out.text_pairs)
    labels = torch.tensor(held_out.labels)
    right = []
    for weight in weights:
        model.settle_label_vectors(kept, weight, kept_vectors)
        predictions = model.head.scores_of_unit_vectors(held_out_vectors).argmax(-1).cpu()
        right.append((predictions == labels).nonzero().flatten().tolist())
    return right


def fit(model: AdapterModel, rows: Split, recipe: Recipe, accelerator: Accelerator, show_progress: bool,
        resume: bool = False, stem: list[torch.Tensor] | None = None, settle: bool = True) -> None:
    """Cross-entropy on the k-shot rows; only adapter and head parameters get gradients. With
    `training.checkpoint_every` the main process checkpoints the run; `resume` continues its checkpoint.
    `stem`: the rows' stem states (`_stem_states`) when already computed, else they are computed here.
    `settle`: a tied head's rows are written at the end (cross-validation writes them per prototype weight)."""
    config = recipe.training
    steps, order = _schedule(len(rows), config, accelerator.num_processes)
    # A fixed stream of row indices, cut into consecutive batches that Accelerate deals out to the
    # processes: one process with batch 16 sees the same global batches as two with batch 8.
    loader = DataLoader(order, batch_size=config.batch_size,
                        collate_fn=lambda indices: model.batch(rows, indices, config.max_length, stem))
    optimizer = torch.optim.AdamW(_param_groups(model, recipe), weight_decay=config.weight_decay)
    prepared, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    stem = stem or _stem_states(model, rows, config)  # read by the loader's collate_fn
    # The prepared scheduler advances once per process at each step, hence the factor.
    n = accelerator.num_processes
    scheduler = accelerator.prepare(get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * steps) * n, steps * n))
    identity = run_identity(recipe, model.backbone.fingerprint, n)
    step = _start_step(recipe, identity, model, optimizer, scheduler, accelerator, resume)
    if step:  # the row stream is fixed, so skipping the batches already trained on continues it exactly
        loader = accelerator.skip_first_batches(loader, step * config.grad_accum)
    prepared.train()
    progress = tqdm(total=steps, initial=step, desc=f"train {recipe.task}",
                    disable=not (show_progress and accelerator.is_main_process))
    for index, batch in enumerate(loader, start=step * config.grad_accum):
        _seed_dropout(config.seed, index, accelerator)
        with accelerator.accumulate(prepared):
            loss = model.loss(prepared, batch)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}")
            if config.checkpoint_every and step % config.checkpoint_every == 0 and accelerator.is_main_process:
                save_checkpoint(checkpoint_folder(recipe), step, model, optimizer, scheduler, identity)
    progress.close()
    if model.tied and settle:
        model.settle_label_vectors(rows, recipe.head.prototype_weight)
    prepared.eval()
    accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)  # drops autocast: evaluated as the engine serves


def _start_step(recipe: Recipe, identity: dict, model: AdapterModel, optimizer, scheduler, accelerator: Accelerator,
                resume: bool) -> int:
    """0, or with `resume` the step of the run's checkpoint, restored into model, optimizer and scheduler."""
    if (resume or recipe.training.checkpoint_every) and accelerator.distributed_type in (DistributedType.FSDP,
                                                                                         DistributedType.DEEPSPEED):
        raise CheckpointError("checkpoints need one process or DDP: under FSDP or DeepSpeed a process holds a shard")
    folder = checkpoint_folder(recipe)
    if not resume:
        if has_checkpoint(folder) and accelerator.is_main_process:
            log.info("a checkpoint of an earlier run is in %s; training from the start replaces it (--resume "
                     "continues it)", folder)
        return 0
    checkpoint = read_checkpoint(folder, identity)  # every process reads the same files
    step = restore(checkpoint, model, optimizer, scheduler) if checkpoint else 0
    if len(set(gather_object([step]))) > 1:
        raise CheckpointError(f"the processes found different checkpoints in {folder}: resuming several machines "
                              "needs the store on a shared filesystem")
    if accelerator.is_main_process and checkpoint:
        log.info("resuming from %s at step %d", folder, step)
    elif accelerator.is_main_process:
        log.info("no checkpoint in %s: training from the start", folder)
    return step


def _seed_dropout(seed: int, batch_index: int, accelerator: Accelerator) -> None:
    """Dropout masks drawn from (seed, batch) alone, a stream per process, so that a resumed run draws
    the masks of the uninterrupted one; a reseed costs microseconds."""
    torch.manual_seed((seed % 2**31) * 2**32 + batch_index * accelerator.num_processes + accelerator.process_index)


def _schedule(num_rows: int, config, processes: int) -> tuple[int, list[int]]:
    """Optimizer steps, and the row order for all of them: a seeded shuffle per epoch, independent of
    the number of processes."""
    global_batch = config.batch_size * processes
    steps = config.max_steps or config.epochs * math.ceil(math.ceil(num_rows / global_batch) / config.grad_accum)
    needed = steps * config.grad_accum * global_batch
    generator = torch.Generator().manual_seed(config.seed)
    order = []
    while len(order) < needed:
        order += torch.randperm(num_rows, generator=generator).tolist()
    return steps, order[:needed]


def _param_groups(model: AdapterModel, recipe: Recipe) -> list[dict]:
    lr = recipe.training.lr or method_module(recipe.method.name).DEFAULT_LR
    adapter = [p for p in model.peft_model.parameters() if p.requires_grad]
    head = [p for p in model.head.parameters() if p.requires_grad]
    groups = [{"params": adapter, "lr": lr}]
    if head:
        groups.append({"params": head, "lr": recipe.training.head_lr or lr})
    return groups


def _stem_states(model: AdapterModel, rows: Split, config) -> list[torch.Tensor] | None:
    """Each row's states after the encoder's lower layers that hold nothing trainable (LoRA on the top
    layers only), computed once instead of at every epoch; None when no layer can be skipped."""
    if not model.stem_layers:
        return None
    model.eval()
    device = next(model.peft_model.parameters()).device
    states = []
    for start in range(0, len(rows), config.eval_batch_size):
        chosen = rows.select(list(range(start, min(start + config.eval_batch_size, len(rows)))))
        batch = model.tokenize(chosen.texts, chosen.text_pairs, config.max_length)
        states += [row.cpu() for row in model.stem_states({k: v.to(device) for k, v in batch.items()})]
    return states


def evaluate(model: AdapterModel | GenerativeModel, rows: Split | Pairs, recipe: Recipe) -> dict[str, float]:
    """Test metrics of `model` on `rows`: classification through the same scoring path the engine uses;
    generation by greedy completions scored against each row's references."""
    if isinstance(model, GenerativeModel):
        return generation_metrics(model.generate(rows.inputs), rows.references, rows.inputs,
                                  tuple(recipe.training.metrics))
    scores = model.scores(rows.texts, rows.text_pairs, batch_size=recipe.training.eval_batch_size)
    predictions = scores.argmax(-1).tolist()
    return classification_metrics(predictions, rows.labels, len(model.label_names), tuple(recipe.training.metrics))


def make_card(recipe: Recipe, task: TaskData, model: AdapterModel, trainable: int, total: int, train_seconds: float,
              metrics: dict[str, float], selection: dict | None = None,
              self_training: dict | None = None) -> AdapterCard:
    return AdapterCard(
        task=recipe.task, name=recipe.adapter_name, kind="generate" if recipe.generates else "classify",
        labels=task.label_names,
        label_descriptions=task.label_descriptions, backbone=recipe.backbone,
        backbone_fingerprint=model.backbone.fingerprint, method=recipe.method.name, k=recipe.data.k,
        seed=recipe.data.seed, recipe=recipe.model_dump(mode="json"), metrics=metrics,
        trainable_params=trainable, backbone_params=total - trainable,
        train_seconds=round(train_seconds, 3), selection=selection, self_training=self_training)


def _resolved(recipe: Recipe, model: AdapterModel, accelerator: Accelerator) -> Recipe:
    """The recipe as it ran: settings left to the backbone (the chat template, a sentence-transformers
    folder's pooling, normalisation and prompt), the task (tie_labels auto) or the hardware and launcher
    (mixed precision) written out."""
    backbone = model.backbone
    head = recipe.head.model_copy(update={
        "chat": model.chat, "tie_labels": model.tied, "pooling": pooling_of(recipe.head, backbone),
        "text_prompt": model.text_prompt, "normalize": getattr(model.head, "normalize", None)})
    training = recipe.training.model_copy(update={"mixed_precision": str(accelerator.mixed_precision)})
    return recipe.model_copy(update={"head": head, "training": training})
