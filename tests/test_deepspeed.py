"""What DeepSpeed ZeRO-2 asks of training, checked on the CPU without DeepSpeed (it runs on GPUs only under
Accelerate): a model cast to bf16 with no autocast trains and scores, the launch config leaves accumulation
and clipping to the recipe, and the learning rate schedule follows optimizer steps."""

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_deepspeed_cmd_env

from adapterlab.recipe import validate_recipe
from adapterlab.training.builders import setup
from adapterlab.training.loop import fit, linear_schedule
from conftest import ROOT, tiny_recipe

HEADS = {"tied cosine": {}, "cosine": {"tie_labels": False},
         "linear": {"cosine_scale": None, "init": "random", "tie_labels": False}}


@pytest.mark.parametrize("head", HEADS.values(), ids=HEADS.keys())
def test_a_model_cast_to_bf16_as_deepspeed_casts_it_trains_and_scores(tiny_bert, tmp_path, head):
    recipe = validate_recipe(tiny_recipe(tiny_bert, tmp_path, head=head, training={"mixed_precision": "no"}))
    _, task, model = setup(recipe)
    model.to(torch.bfloat16)  # what DeepSpeed's engine does to the whole model under bf16, with no autocast
    model.train()
    loss = model.loss(model, model.batch(task.train, list(range(4)), recipe.training.max_length))
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    scores = model.scores(task.test.texts[:3])
    assert scores.shape == (3, len(task.label_names)) and torch.allclose(scores.sum(-1), torch.ones(3))


def deepspeed_launch_environment(config: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file CONFIG` gives DeepSpeed's processes."""
    args = launch_command_parser().parse_args(["--config_file", str(ROOT / "accelerate_configs" / config),
                                               "--num_processes", "2", "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    return prepare_deepspeed_cmd_env(args)[1]


def test_the_deepspeed_config_leaves_accumulation_to_the_recipe_and_clips_nothing():
    environment = deepspeed_launch_environment("deepspeed-zero2.yaml")
    # Set, it would override training.grad_accum (Accelerate lets its environment win); absent, Accelerate
    # fills DeepSpeed's "auto" from the recipe's Accelerator.
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in environment
    assert float(environment["ACCELERATE_GRADIENT_CLIPPING"]) == 0.0  # DDP's loop clips nothing either
    assert environment["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"


def test_the_schedule_warms_up_then_decays_over_optimizer_steps_not_batches(tiny_bert, tmp_path):
    training = {"max_steps": 5, "batch_size": 2, "grad_accum": 2, "warmup_ratio": 0.4, "lr": 1e-3,
                "mixed_precision": "no"}
    recipe = validate_recipe(tiny_recipe(tiny_bert, tmp_path, training=training))
    accelerator, task, model = setup(recipe)
    rates = []
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, *_: rates.append(optimizer.param_groups[0]["lr"]))
    try:
        fit(model, task.train, recipe, accelerator, show_progress=False)
    finally:
        hook.remove()
    # 2 warmup steps of 5, one rate per optimizer step (10 batches)
    assert rates == pytest.approx([0, 5e-4, 1e-3, 1e-3 * 2 / 3, 1e-3 / 3])


def test_the_schedule_of_n_processes_counts_each_process_step():
    """Accelerate's prepared scheduler steps once per process at each optimizer step: n processes end
    where one does, at each of its steps."""
    rates = {}
    for processes in (1, 3):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = linear_schedule(optimizer, 5, 0.4, processes)
        rates[processes] = []
        for _ in range(5):
            rates[processes].append(optimizer.param_groups[0]["lr"])
            for _ in range(processes):
                scheduler.step()
    assert rates[1] == pytest.approx(rates[3]) and rates[1] == pytest.approx([0, 0.5, 1, 2 / 3, 1 / 3])
