"""Prompting baselines of generation tasks: the bare backbone, prompted through the engine, scored as
an adapter of the task is scored (the classification baselines are `zeroshot`'s)."""

from adapterlab.data import load_pairs
from adapterlab.engine import Engine, GenerationRequest
from adapterlab.generation import Sampling
from adapterlab.metrics import generation_metrics
from adapterlab.prompts import prompt_request, template_of, uses_chat


def evaluate_prompting(engine: Engine, recipe, shots: int = 0) -> dict:
    """What prompting the bare backbone scores on a generation recipe's task, the baseline its adapter
    is measured against: the recipe's template alone (zero-shot), or after `shots` of its k training
    rows as demonstrations (in-context). Greedy, the recipe's max_new_tokens and metrics, its test rows."""
    task = load_pairs(recipe.data)
    demonstrations = tuple(zip(task.train.inputs, task.train.targets))[:shots]
    chat = uses_chat(recipe.head, engine.backbone)
    sampling = Sampling(recipe.head.max_new_tokens)
    requests = [GenerationRequest(None, **prompt_request(template_of(recipe.head), chat, text, demonstrations),
                                  sampling=sampling) for text in task.test.inputs]
    outputs = [sequence.text.strip() for sequence in engine.generate(requests)]
    return generation_metrics(outputs, task.test.references, task.test.inputs, tuple(recipe.training.metrics))
