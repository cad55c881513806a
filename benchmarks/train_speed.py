"""Train-speed benchmark: a 16-shot LoRA adapter (adapterlab) against a full fine-tune (transformers Trainer).

Both train the packaged MiniLM backbone on the same k-shot SST-2 rows (recipes/sst2-lora-minilm.yaml,
data ../shared/data/sst2), for the recipe's epochs and batch size, on the CPU. Measured per seed:
  - adapterlab: seconds in `fit` (backbone already loaded), trainable parameters and their share of the
    backbone's, accuracy on the full test split;
  - full_finetune: seconds in `Trainer.train()` (AutoModelForSequenceClassification, lr 2e-5, no eval,
    no checkpoints), trainable parameters, accuracy on the same test rows.
With --precisions the adapter trains once per training.mixed_precision (e.g. `auto no bf16`), side by
side in one run: on a CPU with AVX2 alone bf16 is many times slower than float32, on one with
AVX512-BF16 or AMX faster; the output names the CPU and what `auto` chose there.
Prints one JSON object on stdout (last line); everything else goes to stderr.

    make bench
    .venv/bin/python benchmarks/train_speed.py [--seeds 0 1 2] [--k 16] [--threads 1] [--set method.layers=null]
    .venv/bin/python benchmarks/train_speed.py --recipe recipes/sst2-lora-minilm-tied.yaml --precisions auto no bf16
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "sst2-lora-minilm.yaml"
FULL_FINETUNE_LR = 2e-5
TARGETS = {"train_seconds_max": 15, "ratio_max": 0.5, "trainable_pct_max": 1.0}


def load(recipe_file: Path, seed: int, k: int, store: str, overrides: list[str]):
    from adapterlab.recipe import load_recipe

    recipe = load_recipe(recipe_file, [f"data.k={k}", f"data.seed={seed}", f"training.seed={seed}", f"output.store={store}",
                                  *overrides])
    recipe.data.path = str((ROOT / recipe.data.path).resolve())  # the recipe's path is relative to the repo root
    return recipe


def bench_adapter(recipe) -> tuple[dict, object]:
    """Train one adapter; time only `fit` (the backbone is loaded by `setup`). Returns the task too."""
    from adapterlab.model import parameter_counts
    from adapterlab.training.builders import setup
    from adapterlab.training.loop import evaluate, fit

    accelerator, task, model = setup(recipe)
    trainable, total = parameter_counts(model)
    started = time.perf_counter()
    fit(model, task.train, recipe, accelerator, show_progress=False)
    seconds = time.perf_counter() - started
    metrics = evaluate(accelerator.unwrap_model(model), task.test, recipe)
    return {"mixed_precision": str(accelerator.mixed_precision), "train_seconds": round(seconds, 3),
            "trainable_params": trainable,
            "trainable_pct": round(100 * trainable / (total - trainable), 4),
            "accuracy": round(metrics["accuracy"], 4)}, task


def bench_full_finetune(recipe, task, seed: int) -> dict:
    """Full fine-tune of the same backbone with transformers' Trainer on the same rows; time only train()."""
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)
    from adapterlab.backbones import resolve_path

    folder = resolve_path(recipe.backbone)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=len(task.label_names))
    encoded = tokenizer(task.train.texts, truncation=True, max_length=128)
    rows = [{"input_ids": ids, "attention_mask": mask, "labels": label}
            for ids, mask, label in zip(encoded["input_ids"], encoded["attention_mask"], task.train.labels)]
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(output_dir=output_dir, num_train_epochs=recipe.training.epochs,
                                 per_device_train_batch_size=recipe.training.batch_size,
                                 learning_rate=FULL_FINETUNE_LR, eval_strategy="no", save_strategy="no",
                                 report_to=[], use_cpu=True, seed=seed, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=DataCollatorWithPadding(tokenizer))
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    return {"train_seconds": round(seconds, 3),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "accuracy": round(accuracy(model, tokenizer, task.test, recipe.training.eval_batch_size), 4)}


@torch.no_grad()
def accuracy(model, tokenizer, rows, batch_size: int) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(rows), batch_size):
        batch = tokenizer(rows.texts[start:start + batch_size], padding=True, truncation=True, max_length=128,
                          return_tensors="pt")
        predictions = model(**batch).logits.argmax(-1).tolist()
        correct += sum(p == y for p, y in zip(predictions, rows.labels[start:start + batch_size]))
    return correct / len(rows)


def mean_of(runs: list[dict], key: str) -> dict:
    fields = [f for f, value in runs[0][key].items() if not isinstance(value, str)]
    return {**{f: v for f, v in runs[0][key].items() if isinstance(v, str)},
            **{f: round(statistics.mean(run[key][f] for run in runs), 4) for f in fields}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="k-shot draw and training seeds")
    parser.add_argument("--k", type=int, default=16, help="training examples per class")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 helps on a busy machine")
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="the adapter's recipe")
    parser.add_argument("--precisions", nargs="+", default=["auto"], choices=["auto", "no", "bf16", "fp16"],
                        help="train the adapter under each training.mixed_precision, side by side")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override, as for `adapterlab train` (the full fine-tune follows its epochs)")
    options = parser.parse_args(argv)
    if options.threads:
        torch.set_num_threads(options.threads)

    from adapterlab.precision import cpu_capability

    runs = []
    with tempfile.TemporaryDirectory() as store:
        for seed in options.seeds:
            run = {"seed": seed}
            for precision in options.precisions:
                recipe = load(options.recipe, seed, options.k, store,
                              [*options.overrides, f"training.mixed_precision={precision}"])
                run[f"adapterlab_{precision}"], task = bench_adapter(recipe)
            full = bench_full_finetune(recipe, task, seed)
            adapter = run[f"adapterlab_{options.precisions[0]}"]
            runs.append({**run, "train_rows": len(task.train), "test_rows": len(task.test), "adapterlab": adapter,
                         "full_finetune": full,
                         "ratio_train_seconds": round(adapter["train_seconds"] / full["train_seconds"], 4)})
            print(json.dumps(runs[-1]), file=sys.stderr)

    adapter, full = mean_of(runs, "adapterlab"), mean_of(runs, "full_finetune")
    ratio = round(statistics.mean(run["ratio_train_seconds"] for run in runs), 4)
    return {"benchmark": "train_speed", "cpu": cpu_capability(), "backbone": recipe.backbone, "k": options.k,
            "dataset": recipe.task, "recipe": str(options.recipe), "seeds": options.seeds,
            "overrides": options.overrides, "epochs": recipe.training.epochs, "batch_size": recipe.training.batch_size,
            "adapterlab": adapter, "full_finetune": full, "ratio_train_seconds": ratio,
            "by_precision": {p: mean_of(runs, f"adapterlab_{p}") for p in options.precisions},
            "targets": TARGETS,
            "meets_targets": adapter["train_seconds"] <= TARGETS["train_seconds_max"]
                             and ratio <= TARGETS["ratio_max"]
                             and adapter["trainable_pct"] <= TARGETS["trainable_pct_max"],
            "per_seed": runs, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its logs on stdout
        result = main()
    print(json.dumps(result))
