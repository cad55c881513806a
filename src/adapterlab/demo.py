"""`make demo`: train one adapter per demo task on one backbone, then answer held-out texts."""

from pathlib import Path

from rich.console import Console
from rich.table import Table

from adapterlab.data import load_task
from adapterlab.engine import Engine, Request
from adapterlab.recipe import load_recipe
from adapterlab.training import train

EXAMPLES_PER_TASK = 3


def run_demo(recipes_dir: Path, store: Path, console: Console) -> None:
    recipes = [load_recipe(path, [f"output.store={store}"]) for path in sorted(Path(recipes_dir).glob("*.yaml"))]
    if not recipes:
        raise FileNotFoundError(f"no demo recipes (*.yaml) in {recipes_dir}")
    if len({recipe.backbone for recipe in recipes}) != 1:
        raise ValueError("demo recipes must share one backbone")
    results = [train(recipe) for recipe in recipes]
    engine = Engine(recipes[0].backbone, store)
    summary = Table("task", "labels", "k", "trainable params", "train s", "zero-shot accuracy",
                    "held-out accuracy", "adapter")
    for recipe, result in zip(recipes, results):
        task = load_task(recipe.data)
        reference = f"{recipe.task}/{recipe.adapter_name}"
        start = engine.classify(engine.baseline(reference), task.test.texts, task.test.text_pairs)
        zero_shot = sum(p.label == task.label_names[y] for p, y in zip(start, task.test.labels)) / len(task.test)
        summary.add_row(recipe.task, str(len(task.label_names)), str(recipe.data.k), f"{result.trainable_params:,}",
                        f"{result.train_seconds:.1f}", f"{zero_shot:.1%}", f"{result.metrics['accuracy']:.1%}",
                        reference)
    console.print(summary)

    # Every task answered by one backbone, in one mixed batch.
    requests, truths = [], []
    for recipe in recipes:
        task = load_task(recipe.data)
        for text, label in zip(task.test.texts[:EXAMPLES_PER_TASK], task.test.labels):
            requests.append(Request(f"{recipe.task}/{recipe.adapter_name}", text))
            truths.append(task.label_names[label])
    answers = Table("task", "text", "predicted", "true", "score", title="one mixed batch, one backbone")
    for request, truth, prediction in zip(requests, truths, engine.predict_batch(requests)):
        answers.add_row(request.adapter.split("/")[0], request.text, prediction.label, truth, f"{prediction.score:.2f}")
    console.print(answers)
