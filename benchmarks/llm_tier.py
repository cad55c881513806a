"""The LLM classification tier, today's path against this tree's, side by side in one run on this CPU.

SmolLM2-135M-Instruct with a k-shot LoRA adapter (recipes/sst2-lora-smollm2.yaml, label words), on the
same SST-2 test rows (../shared/data/sst2), the same adapter, each tree in its own process:
  - scoring: seconds for the engine to answer `--rows` rows (loaded and warmed first), today's tree
    (`--base-src`, a checkout of the commit before the prompt-start cache) and this one, alternating for
    `--rounds`, on the adapter today's tree trained (its card is one both trees read; today's refuses the
    keys cards have gained since); the answers compared row by row (argmax equal, largest probability
    difference);
  - training: seconds in `fit` of the k-shot adapter under each tree, beside SetFit's seconds on the same
    dataset and seed from benchmarks/results/fewshot-setfit.jsonl.
Prints one JSON object on stdout (last line); everything else goes to stderr.

    git worktree add --detach ../llm-base ca8c7d8   # today's path, once (beside this checkout)
    .venv/bin/python benchmarks/llm_tier.py [--rows 1000] [--rounds 1] [--base-src ../llm-base/src]
    .venv/bin/python benchmarks/llm_tier.py --rows 64 --set training.max_steps=2     # a quick check
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import SHARED_DATA, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "sst2-lora-smollm2.yaml"
SETFIT = ROOT / "benchmarks" / "results" / "fewshot-setfit.jsonl"
TARGET_SPEEDUP = 3.0


def train_worker(store: str, k: int, seed: int, name: str, overrides: list[str]) -> dict:
    """Trains the recipe's adapter under the tree on PYTHONPATH; its seconds in `fit`."""
    from adapterlab.recipe import load_recipe
    from adapterlab.training import train

    recipe = load_recipe(RECIPE, [f"data.k={k}", f"data.seed={seed}", f"training.seed={seed}", f"output.store={store}",
                                  f"output.name={name}", "data.test_limit=16", f"data.path={SHARED_DATA / 'sst2'}",
                                  *overrides])
    result = train(recipe, show_progress=False)
    return {"adapter": f"{recipe.task}/{name}", "train_seconds": round(result.train_seconds, 2)}


def score_worker(store: str, adapter: str, rows: int, dtype: str, out: str) -> dict:
    """The engine's answers to the first `rows` test rows under the tree on PYTHONPATH, timed once warm."""
    from adapterlab.engine import Engine

    texts = [row["text"] for row in read_jsonl(SHARED_DATA / "sst2" / "test.jsonl")][:rows]
    engine = Engine("smollm2-135m", store, dtype=dtype)
    engine.predict(adapter, texts[:4])  # loads the adapter (and today's lazy parts) before the clock starts
    started = time.perf_counter()
    predictions = engine.predict(adapter, texts)
    seconds = time.perf_counter() - started
    Path(out).write_text(json.dumps([list(p.scores.values()) for p in predictions]))
    return {"score_seconds": round(seconds, 2), "rows": len(texts)}


def run_worker(src: Path, *args: str) -> dict:
    """One worker of this script in a fresh process, `src` first on its path; its JSON line."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run([sys.executable, __file__, *args], env=env, stdout=subprocess.PIPE, check=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compared(base: list[list[float]], new: list[list[float]]) -> dict:
    argmax = lambda row: max(range(len(row)), key=row.__getitem__)  # noqa: E731
    differ = sum(argmax(a) != argmax(b) for a, b in zip(base, new))
    largest = max(abs(x - y) for a, b in zip(base, new) for x, y in zip(a, b))
    return {"argmax_differ": differ, "max_probability_difference": largest}


def setfit_seconds(seed: int) -> float | None:
    times = [row["train_seconds"] for row in read_jsonl(SETFIT)
             if row["dataset"] == "sst2" and row["seed"] == seed and row["status"] == "ok"]
    return statistics.mean(times) if times else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=1, help="scoring runs per tree, alternating")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", help="the engines' dtype (both trees)")
    parser.add_argument("--base-src", type=Path, default=ROOT.parent / "llm-base" / "src")
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        help="a recipe override for training (e.g. training.max_steps=2 for a quick run)")
    args = parser.parse_args()
    if not (args.base_src / "adapterlab").is_dir():
        sys.exit(f"--base-src {args.base_src}: no adapterlab there (make the worktree: see this script's docstring)")
    new_src = ROOT / "src"
    with tempfile.TemporaryDirectory() as store:
        training = {tree: run_worker(src, "train", store, str(args.k), str(args.seed), tree, *args.overrides)
                    for tree, src in (("base", args.base_src), ("new", new_src))}
        adapter = training["base"]["adapter"]
        seconds, answers = {"base": [], "new": []}, {}
        for round_ in range(args.rounds):
            for tree, src in (("base", args.base_src), ("new", new_src)):
                out = Path(store) / f"{tree}-{round_}.json"
                seconds[tree].append(run_worker(src, "score", store, adapter, str(args.rows), args.dtype, str(out))
                                     ["score_seconds"])
                answers[tree] = json.loads(out.read_text())
                print(f"{tree} round {round_}: {seconds[tree][-1]} s", file=sys.stderr)
    base, new = statistics.median(seconds["base"]), statistics.median(seconds["new"])
    from adapterlab.precision import cpu_capability

    report = {"cpu": cpu_capability()["cpu"], "rows": args.rows, "dtype": args.dtype,
              "scoring": {"base_seconds": seconds["base"], "new_seconds": seconds["new"],
                          "speedup": round(base / new, 2), "target_speedup": TARGET_SPEEDUP,
                          **compared(answers["base"], answers["new"])},
              "training": {f"{tree}_seconds": run["train_seconds"] for tree, run in training.items()}
              | {"setfit_seconds": setfit_seconds(args.seed), "k": args.k, "seed": args.seed, "overrides": args.overrides}}
    print(json.dumps(report))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("train", "score"):
        worker = {"train": train_worker, "score": score_worker}[sys.argv[1]]
        values = sys.argv[2:]
        if sys.argv[1] == "train":
            print(json.dumps(worker(values[0], int(values[1]), int(values[2]), values[3], values[4:])))
        else:
            print(json.dumps(worker(values[0], values[1], int(values[2]), values[3], values[4])))
    else:
        main()
