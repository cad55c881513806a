"""Helpers that several benchmark scripts share. A script imports them as `from _common import ...`: run as
`python benchmarks/X.py`, the script's own folder is first on sys.path (benchmarks/ is not a package)."""

import json
import os
import threading
import time
from pathlib import Path


def read_jsonl(file: Path) -> list[dict]:
    """The rows of a JSON-lines file (blank lines skipped); none when the file does not exist yet."""
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()] if file.exists() else []


def append_jsonl(file: Path, row: dict) -> None:
    """Append one row as a JSON line."""
    with open(file, "a") as handle:  # one line per finished cell: a rerun skips it
        handle.write(json.dumps(row) + "\n")


def wait_for_quiet() -> None:
    """Someone is timing something while /tmp/quiet exists: start nothing heavy until it is gone."""
    while os.path.exists("/tmp/quiet"):
        time.sleep(20)


# The shared datasets (../shared/data beside the project): read there, never copied into it.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# The shared datasets of text pairs → the column of each row's second text.
PAIR_FIELDS = {"rte": "text_pair", "cb": "text_pair"}


def describe_cpu(cpu: dict) -> str:
    """A report's CPU in words (from adapterlab.precision.cpu_capability): its name and whether bf16 is fast
    there, naming an AVX2-only CPU emulated by holding oneDNN below the bf16 instructions it has."""
    if cpu["fast_bf16"]:
        return f"{cpu['cpu']} (fast bf16)"
    if cpu["avx512_bf16"] or cpu["amx"]:
        return (f"{cpu['cpu']} held to AVX2 (ONEDNN_MAX_CPU_ISA, MKL, ATen: an AVX2-only CPU emulated; "
                "bf16 slow, `auto` trains in float32)")
    return f"{cpu['cpu']} (no fast bf16: `auto` trains in float32)"


def describe_cell_cpu(cell: dict) -> str:
    """The CPU a benchmark cell recorded (its name and whether bf16 is fast there), in words."""
    return f"{cell['cpu']} ({'fast' if cell['fast_bf16'] else 'no fast'} bf16)"


def plot_accuracy_bars(file: Path, datasets: list[str], bars: list[tuple[str, list, list]], k: int) -> None:
    """Grouped bars of test accuracy per dataset: one bar per (label, means, stds), with ±std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(3 + 1.3 * len(datasets), 3.8))
    width = 0.8 / len(bars)
    for i, (label, means, stds) in enumerate(bars):
        axis.bar([j + (i - (len(bars) - 1) / 2) * width for j in range(len(datasets))], means, width,
                 yerr=stds, capsize=3, label=label)
    axis.set_xticks(range(len(datasets)), labels=datasets)
    axis.set(ylabel="test accuracy", ylim=(0, 1), title=f"k={k}: mean ± std over seeds")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(file, dpi=110)
    plt.close(figure)


def run_threads(target, count: int) -> float:
    """Run target(0) ... target(count - 1) in threads at once; the seconds until the last one ends."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def classify_clients(url: str, plan: list[list[tuple[str, str]]], seconds: float) -> dict:
    """A client thread per plan entry posts its (adapter, text) requests to /v1/classify in turn; rate and p50/p95."""
    import httpx

    latencies: list[float] = []
    failures = []
    deadline = time.monotonic() + seconds  # no phase runs longer, whatever the request counts

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            for adapter, text in plan[index]:
                if time.monotonic() > deadline:
                    break
                started = time.perf_counter()
                response = http.post("/v1/classify", json={"adapter": adapter, "inputs": [text]})
                latencies.append(time.perf_counter() - started)  # list.append is atomic
                if response.status_code != 200:
                    failures.append(response.status_code)

    elapsed = run_threads(client, len(plan))
    ordered = sorted(latencies)
    return {"requests": len(ordered), "failures": len(failures), "requests_per_s": round(len(ordered) / elapsed, 1),
            "p50_ms": round(1e3 * ordered[len(ordered) // 2], 2),
            "p95_ms": round(1e3 * ordered[int(0.95 * (len(ordered) - 1))], 2)}
