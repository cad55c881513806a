"""The Accelerate loop: `fit` trains a model on rows (the schedule, the optimizer's parameter groups,
seeded dropout, the frozen stem's states, checkpoints to start from or resume), and `evaluate` scores it.

Runs the same on one CPU or under `accelerate launch` on many processes: the rows are sharded by the
prepared data loader, gradients averaged by Accelerate, and only the main process writes checkpoints.
"""

import logging
import math
from typing import Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from peft import PeftModel
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from adapterlab.backbones import Backbone
from adapterlab.data import Pairs, Split
from adapterlab.generative import GenerativeModel
from adapterlab.methods import method_module
from adapterlab.metrics import classification_metrics, generation_metrics
from adapterlab.model import AdapterModel
from adapterlab.recipe import Recipe
from adapterlab.training.checkpoint import (CheckpointError, checkpoint_folder, has_checkpoint, read_checkpoint,
                                            restore, run_identity, save_checkpoint)

log = logging.getLogger("adapterlab")


class TrainableModel(Protocol):
    """What `fit` trains (an nn.Module): a classifier (`AdapterModel`) or a generative model
    (`GenerativeModel`). Only a classifier may have frozen stem layers or tied labels
    (`frozen_stem_states`, `ties_labels`)."""

    backbone: Backbone
    peft_model: PeftModel
    head: nn.Module

    def batch(self, rows: Split | Pairs, indices: list[int], max_length: int,
              stem: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """A training batch of the chosen rows."""

    def loss(self, prepared: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's loss through `prepared`, this model as Accelerate wraps it."""


def ties_labels(model: TrainableModel) -> bool:
    """Whether the model's label rows are its label descriptions trained through the adapter (a classifier
    with head.tie_labels), to be settled into its head when training ends; a generative model has none."""
    return isinstance(model, AdapterModel) and model.tied


def fit(model: TrainableModel, rows: Split | Pairs, recipe: Recipe, accelerator: Accelerator, show_progress: bool,
        resume: bool = False, stem: list[torch.Tensor] | None = None, settle: bool = True) -> None:
    """Cross-entropy on the k-shot rows; only adapter and head parameters get gradients. With
    `training.checkpoint_every` the main process checkpoints the run; `resume` continues its checkpoint.
    `stem`: the rows' stem states (`frozen_stem_states`) when already computed, else they are computed here.
    `settle`: a tied head's rows are written at the end (cross-validation writes them per prototype weight)."""
    config = recipe.training
    steps, order = schedule(len(rows), config, accelerator.num_processes)
    # A fixed stream of row indices, cut into consecutive batches that Accelerate deals out to the
    # processes: one process with batch 16 sees the same global batches as two with batch 8.
    loader = DataLoader(order, batch_size=config.batch_size,
                        collate_fn=lambda indices: model.batch(rows, indices, config.max_length, stem))
    optimizer = torch.optim.AdamW(_param_groups(model, recipe), weight_decay=config.weight_decay)
    scheduler = linear_schedule(optimizer, steps, config.warmup_ratio, accelerator.num_processes)
    # One call, as Accelerate documents for DeepSpeed: prepared alone, the scheduler came back bare there,
    # stepped at every batch instead of once per optimizer step.
    prepared, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    stem = stem or frozen_stem_states(model, rows, config)  # read by the loader's collate_fn
    identity = run_identity(recipe, model.backbone.fingerprint, accelerator.num_processes)
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
    prepared.eval()
    accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)  # drops autocast: evaluated as the engine serves
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _release_deepspeed(model, accelerator)
    if settle and ties_labels(model):  # prototypes of the rows trained on: a run of max_steps may draw a part
        seen = sorted(set(order))
        model.settle_label_vectors(rows if len(seen) == len(rows) else rows.select(seen), recipe.head.prototype_weight)


def linear_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup_ratio: float, processes: int):
    """Linear warmup over `warmup_ratio` of the `steps` optimizer steps, then linear decay to 0. Accelerate's
    prepared scheduler advances once per process at each optimizer step, hence the factor; so it does under
    DeepSpeed, whose engine drives only schedulers of its own kinds, not this LambdaLR."""
    return get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * steps) * processes, steps * processes)


def _release_deepspeed(model: TrainableModel, accelerator: Accelerator) -> None:
    """After training under DeepSpeed: the model back in float32 (the engine cast all of it to bf16, without
    autocast), so that it is evaluated and stored as a single process leaves it; and the engine let go, since
    Accelerate ties `backward` to the first engine prepared and a later fit (a fold, an ensemble member)
    prepares its own."""
    accelerator.free_memory()
    model.float()


def _start_step(recipe: Recipe, identity: dict, model: TrainableModel, optimizer, scheduler, accelerator: Accelerator,
                resume: bool) -> int:
    """0, or with `resume` the step of the run's checkpoint, restored into model, optimizer and scheduler."""
    if (resume or recipe.training.checkpoint_every) and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise CheckpointError("checkpoints need one process or DDP: under DeepSpeed a process holds a shard")
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


def schedule(num_rows: int, config, processes: int) -> tuple[int, list[int]]:
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


def _param_groups(model: TrainableModel, recipe: Recipe) -> list[dict]:
    lr = recipe.training.lr or method_module(recipe.method.name).DEFAULT_LR
    adapter = [p for p in model.peft_model.parameters() if p.requires_grad]
    head = [p for p in model.head.parameters() if p.requires_grad]
    groups = [{"params": adapter, "lr": lr}]
    if head:
        groups.append({"params": head, "lr": recipe.training.head_lr or lr})
    return groups


def frozen_stem_states(model: TrainableModel, rows: Split | Pairs, config) -> list[torch.Tensor] | None:
    """Each row's states after a classifier's lower encoder layers that hold nothing trainable (LoRA on
    the top layers only), computed once instead of at every epoch; None when no layer can be skipped (a
    generative model's layers all run)."""
    if not isinstance(model, AdapterModel) or not model.stem_layers:
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


