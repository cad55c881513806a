"""Scaling benchmark: training speed of the MiniLM LoRA recipe on 1 and on 2 CPU processes.

Runs recipes/sst2-lora-minilm.yaml (SST-2, k examples per class, a fixed number of optimizer steps)
three times through `accelerate launch ... -m adapterlab train --json`, the machine's cores split evenly
between the processes:
  - one_process: accelerate_configs/cpu.yaml, batch B;
  - two_processes_same_per_process_batch: cpu-2proc.yaml (MPI), batch B per process (global 2B);
  - two_processes_same_global_batch: cpu-2proc.yaml, batch B/2 per process (global B: the same
    training as one process).
Measured per run: train_seconds (from --json: seconds in `fit` on the main process, loading and
evaluation excluded; the fastest of --repeats rounds, all rounds listed), steps per second, rows per
second, and each figure's ratio to one process. Rounds interleave the three runs, so that a burst of
load elsewhere on the machine does not fall on one of them only.
MPI needs openmpi-bin; the OMPI_ALLOW_RUN_AS_ROOT variables that it needs as root are set here.
Prints one JSON object on stdout (last line); progress goes to stderr.

    make bench
    .venv/bin/python benchmarks/scaling.py [--steps 40] [--batch-size 16] [--k 16] [--repeats 1] [--threads N]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "sst2-lora-minilm.yaml"
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
MPI_AS_ROOT = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def threads(processes: int, options) -> int:
    """Torch threads per process: --threads, else the machine's cores split between the processes."""
    return options.threads or max(1, (os.cpu_count() or 1) // processes)


def launch(config: str, processes: int, batch_size: int, options, store: str) -> float:
    """One training run; its train_seconds."""
    overrides = [f"data.path={SHARED_DATA / 'sst2'}", f"data.k={options.k}", "data.test_limit=1",
                 f"training.max_steps={options.steps}", f"training.batch_size={batch_size}", f"output.store={store}"]
    command = [ACCELERATE, "launch", "--config_file", str(ROOT / "accelerate_configs" / config),
               "--num_cpu_threads_per_process", str(threads(processes, options)),
               "-m", "adapterlab", "train", str(RECIPE), "--json", "--quiet",
               *[arg for o in overrides for arg in ("--set", o)]]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, **MPI_AS_ROOT}, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{config} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["train_seconds"]


def figures(processes: int, batch_size: int, rounds: list[float], options) -> dict:
    seconds, global_batch = min(rounds), batch_size * processes
    return {"processes": processes, "threads_per_process": threads(processes, options),
            "batch_size_per_process": batch_size, "global_batch": global_batch, "steps": options.steps,
            "train_seconds": seconds, "train_seconds_rounds": rounds,
            "steps_per_second": round(options.steps / seconds, 3),
            "rows_per_second": round(options.steps * global_batch / seconds, 1)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=16, help="batch of the one-process run (even)")
    parser.add_argument("--k", type=int, default=16, help="training examples per class")
    parser.add_argument("--threads", type=int, help="torch threads per process (default: cores / processes)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the three runs; the fastest counts")
    options = parser.parse_args(argv)
    if shutil.which("mpirun") is None:
        sys.exit("needs MPI for the 2-process runs: apt-get install openmpi-bin")

    batch = options.batch_size
    shapes = {"one_process": ("cpu.yaml", 1, batch),
              "two_processes_same_per_process_batch": ("cpu-2proc.yaml", 2, batch),
              "two_processes_same_global_batch": ("cpu-2proc.yaml", 2, batch // 2)}
    rounds = {name: [] for name in shapes}
    with tempfile.TemporaryDirectory() as store:
        for _ in range(options.repeats):
            for name, (config, processes, batch_size) in shapes.items():
                rounds[name].append(launch(config, processes, batch_size, options, store))
                print(json.dumps({name: rounds[name][-1]}), file=sys.stderr)
    runs = {name: figures(processes, batch_size, rounds[name], options)
            for name, (_, processes, batch_size) in shapes.items()}
    one = runs["one_process"]
    for run in runs.values():
        run["steps_per_second_vs_one_process"] = round(run["steps_per_second"] / one["steps_per_second"], 3)
        run["rows_per_second_vs_one_process"] = round(run["rows_per_second"] / one["rows_per_second"], 3)
    return {"benchmark": "scaling", "backbone": "minilm", "dataset": "sst2", "k": options.k, "runs": runs,
            "cpu_count": os.cpu_count()}


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(main()))
