"""One benchmark run side by side on two source trees (JSON on stdout): the command runs `--rounds` times
on each, alternating (base, head, head, base, ...) so that background load weighs on both alike, with
PYTHONPATH set to the tree's `src`. Every number in the command's last stdout line (a JSON object) is
reported per tree as mean and std over the rounds, with head/base. `{tree}` in the command becomes
"base" or "head" (e.g. a store per tree, when the older code reads another card schema).

    .venv/bin/python benchmarks/compare_trees.py --base ../before/src [--head src] [--rounds 3] \
        -- .venv/bin/python benchmarks/engine.py --store /tmp/store-{tree}
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from _common import git_commit, provenance, sample_std


def numbers(value, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a JSON value, by dotted path (booleans are not numbers here)."""
    if isinstance(value, dict):
        return {path: number for key, item in value.items() for path, number in numbers(item, f"{prefix}{key}.").items()}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {prefix.rstrip("."): float(value)}
    return {}


def run_once(command: list[str], label: str, src: Path) -> dict:
    argv = [part.replace("{tree}", label) for part in command]
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(src)})
    if done.returncode != 0:
        raise SystemExit(f"{label} run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    print(f"{label}: done", file=sys.stderr, flush=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(runs: dict[str, list[dict]]) -> dict:
    leaves = {label: [numbers(run) for run in label_runs] for label, label_runs in runs.items()}
    table = {}
    for path in leaves["base"][0]:
        per_tree = {label: [run[path] for run in label_runs if path in run] for label, label_runs in leaves.items()}
        row = {label: {"mean": round(statistics.fmean(values), 4), "std": round(sample_std(values), 4)}
               for label, values in per_tree.items() if values}
        if "head" in row and row["base"]["mean"]:
            row["head_over_base"] = round(row["head"]["mean"] / row["base"]["mean"], 3)
        table[path] = row
    return table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", type=Path, required=True, help="The older tree's src folder.")
    parser.add_argument("--head", type=Path, default=Path(__file__).resolve().parents[1] / "src")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="After --: the benchmark command.")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the benchmark command after --")
    trees = {"base": args.base.resolve(), "head": args.head.resolve()}
    runs = {"base": [], "head": []}
    for round_ in range(args.rounds):
        order = ("base", "head") if round_ % 2 == 0 else ("head", "base")
        for label in order:
            runs[label].append(run_once(command, label, trees[label]))
    print(json.dumps({
        **provenance(), "command": " ".join(command), "rounds": args.rounds,
        "commits": {label: git_commit(tree.parent) for label, tree in trees.items()},
        "figures": summary(runs), "runs": runs}))


if __name__ == "__main__":
    sys.exit(main())
