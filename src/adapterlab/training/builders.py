"""What every training mode starts from: the Accelerator, the task's rows, and a fresh adapter on the
frozen backbone (seeded by training.seed)."""

import logging

from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, set_seed

from adapterlab.backbones import Backbone, load_backbone
from adapterlab.data import TaskData, load_pairs, load_task
from adapterlab.errors import AdapterlabError
from adapterlab.generative import GenerativeModel, build_generative_model
from adapterlab.model import AdapterModel, build_adapter_model, parameter_counts
from adapterlab.precision import cpu_capability, mixed_precision_for
from adapterlab.recipe import Recipe
from adapterlab.training.library import start_from_source, with_source_method

log = logging.getLogger("adapterlab")


def setup(recipe: Recipe) -> tuple[Accelerator, TaskData, AdapterModel | GenerativeModel]:
    """Accelerator, k-shot data and a fresh adapter on the frozen backbone."""
    accelerator = new_accelerator(recipe.training)
    task = load_data(recipe)  # before the backbone loads
    return accelerator, task, new_model(recipe, task, accelerator)


def load_data(recipe: Recipe) -> TaskData:
    return load_pairs(recipe.data) if recipe.generates else load_task(recipe.data)


def new_model(recipe: Recipe, task: TaskData, accelerator: Accelerator,
              backbone: Backbone | None = None) -> AdapterModel | GenerativeModel:
    """A fresh adapter, seeded by training.seed, on `backbone` (bare: as loaded, or as
    `AdapterModel.release_backbone` returns it) or else on a freshly loaded frozen backbone; started from
    the stored adapter `training.init_from` names, if any (library.py)."""
    # DDP keeps find_unused_parameters=False (no search of the graph at each step): every trainable
    # parameter reaches the loss (LoRA leaves the encoder's unused pooler alone; tests/test_methods.py).
    set_seed(recipe.training.seed)  # loading draws nothing from the generator: the seed reaches the adapter's init
    if backbone is None:
        backbone = frozen_backbone(recipe, accelerator)
    if recipe.generates:
        return build_generative_model(recipe, backbone)
    recipe = with_source_method(recipe)
    model = build_adapter_model(recipe, backbone, task.label_names, task.label_descriptions)
    if recipe.training.init_from:
        start_from_source(model, recipe, task, backbone)
    return model


def frozen_backbone(recipe: Recipe, accelerator: Accelerator) -> Backbone:
    """The recipe's backbone, loaded frozen where this process trains it."""
    return load_backbone(recipe.backbone, recipe.quantization, backbone_device_map(recipe.quantization, accelerator))


def logged_parameter_counts(model: AdapterModel | GenerativeModel, accelerator: Accelerator) -> tuple[int, int]:
    """`parameter_counts` (trainable, total), logged once however many processes run."""
    trainable, total = parameter_counts(model)
    if accelerator.is_main_process:
        log.info("trainable parameters: %d of %d (%.3f%%); backbone frozen", trainable, total, 100 * trainable / total)
    return trainable, total


def new_accelerator(config) -> Accelerator:
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
        accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, mixed_precision=precision)
    except ValueError as error:  # e.g. fp16 without a GPU
        raise AdapterlabError(f"training.mixed_precision {precision}: {error}") from None
    refuse_unsupported_launch(accelerator, config.grad_accum)
    return accelerator


def refuse_unsupported_launch(accelerator: Accelerator, grad_accum: int) -> None:
    """Refuses a launch that training would follow wrongly: FSDP (see docs/training.md), or a gradient
    accumulation the launcher set against the recipe's (Accelerate lets its environment win, while the
    loop counts its steps from the recipe)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        raise AdapterlabError("FSDP is not supported: use DDP (accelerate_configs/multi-gpu.yaml), with "
                              "quantization.mode for a backbone too large for one GPU, or DeepSpeed ZeRO-2")
    if accelerator.gradient_accumulation_steps != grad_accum:
        raise AdapterlabError(f"the launcher sets gradient accumulation to {accelerator.gradient_accumulation_steps} "
                              f"(ACCELERATE_GRADIENT_ACCUMULATION_STEPS) but training.grad_accum is {grad_accum}: "
                              "leave it to the recipe (remove gradient_accumulation_steps from the Accelerate config)")


def _describe_cpu() -> str:
    cpu = cpu_capability()
    speed = "fast" if cpu["fast_bf16"] else "no fast"
    return f"{cpu['cpu']}, {speed} bf16 (AVX512-BF16 {cpu['avx512_bf16']}, AMX {cpu['amx']})"


def backbone_device_map(quantization, accelerator: Accelerator) -> dict | None:
    """Where this process loads the backbone. Full-precision weights load on the CPU and Accelerate
    moves them; quantized ones are placed as they load, a whole copy per process on its own GPU
    ("auto" would spread one copy over all the GPUs, which DDP cannot train). DeepSpeed is refused with a
    quantized backbone: its engine casts and wraps the whole model, bitsandbytes layers included, and no
    GPU here has tried that pairing."""
    if quantization.mode == "none":
        return None
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise AdapterlabError(f"DeepSpeed with a quantized backbone (quantization.mode {quantization.mode}) is not "
                              "supported: use DDP (accelerate_configs/multi-gpu.yaml), which trains it")
    return {"": "cpu"} if accelerator.device.type == "cpu" else {"": accelerator.local_process_index}
