"""How long the light commands take: `adapterlab --help`, `adapters list` on a store of 20 adapters and
`adapters show`, each run `--runs` times as a new process (the median wall time of each, in seconds).

The store holds 20 adapter folders with their cards only: listing and showing read nothing else. The
command is the `adapterlab` script beside this Python (the one a user types), with PYTHONPATH as given,
so the same script times another checkout: PYTHONPATH=../other/src python benchmarks/cli_speed.py.

Prints one JSON object on stdout:
    .venv/bin/python benchmarks/cli_speed.py > benchmarks/results/cli_speed.json
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ADAPTERS = 20


def cpu_name() -> str:
    """The CPU's model name as the kernel reports it."""
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def write_store(store: Path) -> None:
    """ADAPTERS adapter folders of two tasks, each with a valid card.json."""
    for i in range(ADAPTERS):
        task = ("sentiment", "topic")[i % 2]
        card = {"task": task, "name": f"lora-k16-s{i}", "labels": ["negative", "positive"],
                "label_descriptions": ["negative", "positive"], "backbone": "minilm",
                "backbone_fingerprint": "sha256:" + "0" * 64, "method": "lora", "k": 16, "seed": i,
                "recipe": {"task": task}, "metrics": {"accuracy": 0.8}, "trainable_params": 12_000,
                "backbone_params": 22_700_000, "adapter_bytes": 150_000}
        folder = store / task / card["name"]
        folder.mkdir(parents=True)
        (folder / "card.json").write_text(json.dumps(card))


def median_seconds(command: list[str], runs: int) -> float:
    """The median wall time of `runs` runs; a run that fails stops the benchmark."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs of each command")
    args = parser.parse_args()
    script = Path(sys.executable).with_name("adapterlab")
    cli = [str(script)] if script.exists() else [sys.executable, "-m", "adapterlab"]
    with tempfile.TemporaryDirectory() as folder:
        store = Path(folder) / "store"
        write_store(store)
        commands = {"adapterlab --help": ["--help"],
                    f"adapterlab adapters list ({ADAPTERS} adapters)": ["adapters", "list", "--store", str(store)],
                    "adapterlab adapters show": ["adapters", "show", "topic/lora-k16-s1", "--store", str(store)]}
        load = os.getloadavg()[0]
        medians = {name: median_seconds([*cli, *words], args.runs) for name, words in commands.items()}
    print(json.dumps({"date": date.today().isoformat(), "cpu": cpu_name(), "cores": os.cpu_count(),
                      "load_average_at_start": round(load, 2), "runs": args.runs,
                      "median_seconds": medians}, indent=2))


if __name__ == "__main__":
    main()
