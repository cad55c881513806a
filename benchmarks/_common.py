"""Helpers that several benchmark scripts share (scripts never import each other). A script imports them as
`from _common import ...`: run as `python benchmarks/X.py`, the script's own folder is first on sys.path
(benchmarks/ is not a package)."""

import datetime
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
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


def git_commit(tree: Path = Path(__file__).resolve().parents[1]) -> str:
    """The short commit `tree` is checked out at, with "+changes" when its files differ from it."""
    def git(*args):
        return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def provenance() -> dict:
    """What every figure carries: the date, the CPU it ran on and the commit."""
    from adapterlab.precision import cpu_capability

    return {"date": datetime.date.today().isoformat(), "cpu": cpu_capability()["cpu"], "cpu_cores": os.cpu_count(),
            "commit": git_commit()}


def describe_cpu(cpu: dict) -> str:
    """A report's CPU in words (from adapterlab.precision.cpu_capability): its name and whether bf16 is fast
    there, naming an AVX2-only CPU emulated by holding oneDNN below the bf16 instructions it has."""
    if cpu["fast_bf16"]:
        return f"{cpu['cpu']} (fast bf16)"
    if cpu["avx512_bf16"] or cpu["amx"]:
        return (f"{cpu['cpu']} held to AVX2 (ONEDNN_MAX_CPU_ISA, MKL, ATen: an AVX2-only CPU emulated; "
                "bf16 slow, `auto` trains in float32)")
    return f"{cpu['cpu']} (no fast bf16: `auto` trains in float32)"


def cell_cpu(cpu: dict) -> dict:
    """What a benchmark cell records of the CPU it ran on (from adapterlab.precision.cpu_capability)."""
    return {"cpu": cpu["cpu"], "fast_bf16": cpu["fast_bf16"]}


def describe_cell_cpu(cell: dict) -> str:
    """The CPU a benchmark cell recorded (its name and whether bf16 is fast there), in words."""
    return f"{cell['cpu']} ({'fast' if cell['fast_bf16'] else 'no fast'} bf16)"


def sample_std(values) -> float:
    """The sample standard deviation; 0 for a single value."""
    values = list(values)
    return statistics.stdev(values) if len(values) > 1 else 0.0


def percentiles(samples: list[float], unit: str = "ms", digits: int = 3) -> dict:
    """p50 (the median) and p95 of durations in seconds, given in `unit` ("ms" or "s")."""
    scale = {"ms": 1e3, "s": 1.0}[unit]
    ordered = sorted(samples)
    return {f"p50_{unit}": round(scale * statistics.median(ordered), digits),
            f"p95_{unit}": round(scale * ordered[int(0.95 * (len(ordered) - 1))], digits)}


def pyplot():
    """matplotlib's pyplot drawing into files only (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, file: Path, dpi: int = 110) -> None:
    """Lay the figure out, write it to `file` and free it."""
    figure.tight_layout()
    figure.savefig(file, dpi=dpi)
    pyplot().close(figure)


def plot_accuracy_bars(file: Path, datasets: list[str], bars: list[tuple[str, list, list]], k: int) -> None:
    """Grouped bars of test accuracy per dataset: one bar per (label, means, stds), with ±std error bars."""
    figure, axis = pyplot().subplots(figsize=(3 + 1.3 * len(datasets), 3.8))
    width = 0.8 / len(bars)
    for i, (label, means, stds) in enumerate(bars):
        axis.bar([j + (i - (len(bars) - 1) / 2) * width for j in range(len(datasets))], means, width,
                 yerr=stds, capsize=3, label=label)
    axis.set_xticks(range(len(datasets)), labels=datasets)
    axis.set(ylabel="test accuracy", ylim=(0, 1), title=f"k={k}: mean ± std over seeds")
    axis.legend(fontsize=8)
    save_figure(figure, file)


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
    return {"requests": len(latencies), "failures": len(failures), "requests_per_s": round(len(latencies) / elapsed, 1),
            **percentiles(latencies, digits=2)}


# Short texts of several tasks, for speed figures (the adapters are random: their answers mean nothing).
SERVE_TEXTS = ["the plot never finds its feet", "a warm, funny and generous film", "my card was declined twice",
               "rates rose again this quarter", "is there a fee for transfers abroad?", "what a dull, lifeless match"]


def random_copies(template: Path, folder: Path, count: int) -> list[str]:
    """`count` copies of a trained adapter under folder/a0000 ... with random LoRA weights of the same shapes
    (fine for speed and memory, meaningless for accuracy); their store references (folder's name/a0000 ...)."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(template / "adapter_model.safetensors")
    card = json.loads((template / "card.json").read_text())
    refs = []
    for i in range(count):
        copy = folder / f"a{i:04d}"
        shutil.copytree(template, copy)
        save_file({k: torch.randn_like(v) * 0.02 for k, v in tensors.items()}, copy / "adapter_model.safetensors")
        (copy / "card.json").write_text(json.dumps({**card, "task": folder.name, "name": copy.name}))
        refs.append(f"{folder.name}/{copy.name}")
    return refs


def random_adapter_store(root: Path, count: int) -> list[str]:
    """A store of `count` MiniLM LoRA adapters (r=8 on query/value), random copies of one trained in a step."""
    from adapterlab.recipe import validate_recipe
    from adapterlab.training import train

    recipe = validate_recipe({"task": "template", "backbone": "minilm", "method": {"name": "lora", "r": 8},
                              "data": {"path": "demo:sentiment", "k": 2}, "training": {"max_steps": 1},
                              "output": {"store": str(root), "name": "t"}})
    template = train(recipe, show_progress=False).adapter_path
    refs = random_copies(template, root / "bench", count)
    shutil.rmtree(template.parent)  # the store holds the random copies only
    return refs


def kept_adapter_store(root: Path, count: int) -> list[str]:
    """The random adapters under `root` (made there when it holds too few): a store kept between runs lets
    two source trees (PYTHONPATH) be timed on the same adapters."""
    made = sorted(f"bench/{path.name}" for path in (root / "bench").glob("a*")) if (root / "bench").is_dir() else []
    return made[:count] if len(made) >= count else random_adapter_store(root, count)


def cold_and_warm(engine, refs: list[str], checkpoints: list[int]) -> dict:
    """Cold load+activate of fresh adapters once 1, 100, ... are resident in an adapterlab Engine; warm switch
    between resident ones."""
    figures, loaded = {}, 0
    for checkpoint in checkpoints:
        while loaded < checkpoint - 1:
            engine.servable(refs[loaded])
            loaded += 1
        samples = []
        for ref in refs[loaded:loaded + 20]:
            started = time.perf_counter()
            engine.servable(ref)
            samples.append(time.perf_counter() - started)
        loaded += 20
        figures[f"cold_load_at_{checkpoint}_resident"] = percentiles(samples)
    warm = []
    for i in range(200):
        started = time.perf_counter()
        engine.servable(refs[i % 50])
        warm.append(time.perf_counter() - started)
    figures["warm_switch"] = percentiles(warm)
    return figures


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(store: Path, batching: bool, log: Path, *options: str) -> tuple[subprocess.Popen, str]:
    """`adapterlab serve` on a free loopback port, its stderr in `log`; the process and its URL once healthy."""
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "adapterlab", "serve", "--store", str(store), "--port", str(port), *options]
    process = subprocess.Popen(command + ([] if batching else ["--no-batching"]), stdout=subprocess.DEVNULL,
                               stderr=log.open("w"), env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the server did not start:\n{log.read_text()[-2000:]}")
