"""GPU check: one JSON line per phase on stdout, each phase in its own try (a failure prints its error's
tail and the next phase runs), within --minutes (9):

  environment   versions, the GPU, its memory and bf16;
  templates     `adapterlab train` subprocesses (recipes and `--set` overrides only), a few steps in fp32:
                MiniLM LoRA and prefix-tuning (SST-2), generative SmolLM2 LoRA (E2E);
  engine        --adapters random copies of the MiniLM adapters resident: device memory, cold load, a
                mixed batch of --rows adapters against one adapter, prefixes and zero-shot rows mixed
                (equal to each row alone), float32 against bfloat16, no NaN;
  decoder       SmolLM2 with random generative LoRA copies: tokens/s, batched rows equal each alone;
  http          `adapterlab serve` on the SmolLM2 store: --clients concurrent completion clients over
                its adapters, and a streamed completion (its text equal to the same request unstreamed);
  training      the same MiniLM and SmolLM2 LoRA cells in the other --precisions (bf16, fp16), SmolLM2 in
                4 bits;
  cuda_tests    the tests parametrized on a CUDA device (pytest -k cuda).

Without a GPU it runs what the CPU can check and names what it skipped (the CUDA tests, fp16 and
4-bit training). Small flags and tiny backbones check the script itself on a CPU:

    .venv/bin/python benchmarks/gpu_check.py [--adapters 1000] [--rows 64] [--max-tokens 32]
        [--train-steps 3] [--precisions bf16,fp16,fp32] [--clients 16] [--encoder minilm] [--llm smollm2-135m]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path

import torch

from _common import SHARED_DATA, percentiles, random_copies, run_threads, start_server

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["a gorgeous, moving film", "dull and overlong", "the best thing I saw this year", "a waste of time"]
MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}
RECIPES = {  # recipe: (shared dataset, what its fp32 adapter is to the later phases)
    "sst2-lora-minilm.yaml": ("sst2", "encoder_lora"),
    "sst2-prefix-minilm.yaml": ("sst2", "encoder_prefix"),
    "e2e-lora-smollm2.yaml": ("e2e", "llm_lora"),
}


class Skipped(Exception):
    """A phase (or part) this machine cannot check; the message says why."""


def log(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def tail(text: str, characters: int = 1500) -> str:
    return text[-characters:]


def seconds_left(made: dict, most: float) -> float:
    """A subprocess's limit: `most`, or less so that it ends by the check's deadline."""
    return max(1.0, min(most, made["deadline"] - time.monotonic()))


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_memory() -> dict:
    if not torch.cuda.is_available():
        return {}
    return {"device_allocated_mib": round(torch.cuda.memory_allocated() / 2**20, 1),
            "device_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


# --- phases ----------------------------------------------------------------------------------------
def environment(args, made: dict) -> dict:
    from adapterlab.precision import cpu_capability

    versions = {name: _version(name) for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes")}
    figures = {"versions": versions, "cuda": torch.cuda.is_available(), "cpu": cpu_capability()["cpu"],
               "cpu_cores": os.cpu_count()}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        figures |= {"gpu": properties.name, "gpu_memory_gib": round(properties.total_memory / 2**30, 1),
                    "capability": list(torch.cuda.get_device_capability(0)), "bf16": torch.cuda.is_bf16_supported(),
                    "cuda_version": torch.version.cuda}
    return figures


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cuda_tests(args, made: dict) -> dict:
    if not torch.cuda.is_available():
        raise Skipped("no CUDA GPU: the tests' cuda parameters skip themselves")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda", "-m", "not slow", "tests"]
    process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                             timeout=seconds_left(made, args.test_seconds))
    summary = process.stdout.strip().splitlines()[-1] if process.stdout.strip() else ""
    if process.returncode not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"pytest exited {process.returncode}: {summary}\n{tail(process.stdout)}")
    return {"summary": summary}


def templates(args, made: dict) -> dict:
    """The fp32 cells (MiniLM LoRA and prefix-tuning, generative SmolLM2 LoRA): the adapters that the
    engine, decoder and http phases copy."""
    cells = [(args.encoder, "sst2-lora-minilm.yaml"), (args.encoder, "sst2-prefix-minilm.yaml"),
             (args.llm, "e2e-lora-smollm2.yaml")]
    return run_cells(args, made, [(backbone, recipe, "fp32", []) for backbone, recipe in cells])


def training(args, made: dict) -> dict:
    """The other precisions of --precisions, and SmolLM2 in 4 bits."""
    cells = [(backbone, recipe, precision, []) for precision in args.precisions if precision != "fp32"
             for backbone, recipe in ((args.encoder, "sst2-lora-minilm.yaml"), (args.llm, "e2e-lora-smollm2.yaml"))]
    quantized = args.quantized if args.quantized is not None else torch.cuda.is_available()
    compute = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    if quantized:
        cells.append((args.llm, "e2e-lora-smollm2.yaml", "fp32", ["quantization.mode=4bit",
                                                                 f"quantization.compute_dtype={compute}"]))
    figures = run_cells(args, made, cells)
    if not quantized:
        figures["cells"].append({"cell": "e2e-lora-smollm2-4bit", "skipped": "4-bit training is checked on a GPU "
                                                                             "(--quantized to try it here)"})
    return figures


def run_cells(args, made: dict, cells: list[tuple[str, str, str, list[str]]]) -> dict:
    """Each cell an `adapterlab train` subprocess; an fp32 one becomes a template of the later phases."""
    results, failures = [], []
    for backbone, recipe, precision, extra in cells:
        name = f"{Path(recipe).stem}-{'4bit' if extra else precision}"
        if precision == "fp16" and not torch.cuda.is_available():
            results.append({"cell": name, "skipped": "fp16 autocast trains on a GPU"})
            continue
        log(f"training {name}")
        cell = train_cell(args, made, (backbone, recipe, precision, extra), name)
        results.append(cell)
        if "error" in cell:
            failures.append(name)
        elif precision == "fp32" and not extra:
            made[RECIPES[recipe][1]] = cell["adapter_path"]
    if failures:
        raise RuntimeError(json.dumps({"failed": failures, "cells": results}))
    return {"cells": results}


def train_cell(args, made: dict, cell: tuple[str, str, str, list[str]], name: str) -> dict:
    backbone, recipe, precision, extra = cell
    overrides = [f"backbone={backbone}", f"data.path={SHARED_DATA / RECIPES[recipe][0]}", "data.k=4", "data.test_limit=8",
                 f"training.max_steps={args.train_steps}", f"training.mixed_precision={MIXED_PRECISION[precision]}",
                 f"output.store={Path(made['root']) / 'trained'}", f"output.name={name}", *extra]
    if "lora-minilm" in recipe:
        overrides.append("method.layers=null")  # every layer: the recipe's top three need a 6-layer model
    command = [sys.executable, "-m", "adapterlab", "train", str(ROOT / "recipes" / recipe), "--json", "--quiet"]
    command += [part for override in overrides for part in ("--set", override)]
    started = time.perf_counter()
    process = subprocess.run(command, capture_output=True, text=True, timeout=seconds_left(made, args.train_seconds),
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    cell = {"cell": name, "seconds": round(time.perf_counter() - started, 1)}
    if process.returncode != 0:
        return {**cell, "error": f"exit {process.returncode}: {tail(process.stderr)}"}
    result = json.loads(process.stdout.strip().splitlines()[-1])
    return {**cell, "adapter_path": result["adapter_path"], "train_seconds": result["train_seconds"],
            "metrics": result["metrics"]}


def engine(args, made: dict) -> dict:
    from adapterlab.engine import Engine, Request

    store = Path(made["root"]) / "engine"
    refs = random_copies(Path(_template(made, "encoder_lora")), store / "lora", args.adapters + 20)
    prefixes = random_copies(Path(_template(made, "encoder_prefix")), store / "prefix", 4)
    served = Engine(args.encoder, store, max_adapters=None)
    figures = {"device": str(served.backbone.device), "dtype": str(served.backbone.dtype).removeprefix("torch."),
               **{f"{key}_after_backbone": value for key, value in device_memory().items()}}
    served.predict(refs[0], TEXTS[:1])  # the device's first kernels, before any timing
    cold = []
    for ref in refs[args.adapters:]:  # 20 fresh adapters: read from disk, copied into a slot, answering
        started = time.perf_counter()
        served.predict(ref, TEXTS[:1])
        cold.append(time.perf_counter() - started)
    figures["cold_load_and_first_answer_p50_ms"] = round(1000 * statistics.median(cold), 2)
    started = time.perf_counter()
    for ref in refs[:args.adapters]:
        served.servable(ref)
    figures |= {"resident_adapters": len(served.resident()), "host_load_seconds": round(time.perf_counter() - started, 2),
                **{f"{key}_with_resident": value for key, value in device_memory().items()}}
    figures |= mixed_against_one(served, refs, args.rows)
    for start in range(0, args.adapters, args.rows):  # every resident adapter through the device once
        served.predict_batch([Request(ref, TEXTS[0]) for ref in refs[start:start + args.rows]])
    figures |= {"slot_bytes": served.slots.nbytes(), "device_resident": len(served.device_resident()),
                **{f"{key}_after_all": value for key, value in device_memory().items()}}
    figures |= mixing_and_drift(args, store, refs[:8] + prefixes)
    return figures


def _template(made: dict, key: str) -> str:
    if key not in made:
        raise RuntimeError(f"no template adapter {key}: its fp32 training cell did not run or failed")
    return made[key]


def mixed_against_one(served, refs: list[str], rows: int, pairs: int = 5) -> dict:
    from adapterlab.engine import Request

    texts = [TEXTS[i % len(TEXTS)] for i in range(rows)]
    batches = {"mixed": [Request(refs[i], text) for i, text in enumerate(texts)],
               "one": [Request(refs[0], text) for text in texts]}
    seconds = {name: [] for name in batches}
    for _ in range(pairs + 1):  # in turn: a drifting load weighs on both alike; the first is a warm-up
        for name, requests in batches.items():
            started = time.perf_counter()
            served.predict_batch(requests)
            synchronize()
            seconds[name].append(time.perf_counter() - started)
    speed = {name: rows / statistics.median(samples[1:]) for name, samples in seconds.items()}
    return {"rows": rows, "mixed_rows_per_s": round(speed["mixed"], 1), "one_adapter_rows_per_s": round(speed["one"], 1),
            "ratio_mixed_vs_one_adapter": round(speed["mixed"] / speed["one"], 3)}


def mixing_and_drift(args, store: Path, refs: list[str]) -> dict:
    """LoRA, prefix and zero-shot rows in one float32 batch against each row alone; bfloat16 against
    float32 on the same rows; every probability finite."""
    from adapterlab.engine import Engine, Request

    requests = [Request(refs[i % len(refs)], text) for i, text in enumerate(TEXTS * 3)]
    requests += [Request(None, text, labels=("sports", "politics", "music")) for text in TEXTS]
    full = Engine(args.encoder, store, dtype="float32")
    mixed = full.predict_batch(requests)
    alone = [full.predict_batch([request])[0] for request in requests]
    half = Engine(args.encoder, store, dtype="bfloat16").predict_batch(requests)
    difference = lambda a, b: max(abs(x.scores[k] - y.scores[k]) for x, y in zip(a, b) for k in x.scores)  # noqa: E731
    finite = all(value == value and abs(value) != float("inf") for p in mixed + half for value in p.scores.values())
    if not finite:
        raise RuntimeError("a probability is NaN or infinite")
    figures = {"mixed_vs_alone_max_abs_diff": difference(mixed, alone), "bf16_vs_fp32_max_abs_diff": difference(half, mixed),
               "bf16_vs_fp32_same_label": sum(a.label == b.label for a, b in zip(half, mixed)) / len(mixed),
               "all_finite": finite}
    if figures["mixed_vs_alone_max_abs_diff"] > 1e-4:
        raise RuntimeError(f"a mixed batch differs from its rows alone: {figures}")
    return figures


def decoder(args, made: dict) -> dict:
    from adapterlab.engine import Engine, GenerationRequest
    from adapterlab.generation import Sampling

    store = Path(made["root"]) / "decoder"
    refs = random_copies(Path(_template(made, "llm_lora")), store / "gen", 16)
    prompts = [f"Write a sentence about {topic}." for topic in ("rivers", "coffee", "trains", "music")]
    served = Engine(args.llm, store, max_adapters=None)
    requests = [GenerationRequest(refs[i % 16] if i % 4 else None, prompts[i % 4], sampling=Sampling(args.max_tokens))
                for i in range(args.rows)]
    served.generate(requests[:2])  # warm-up
    synchronize()
    started = time.perf_counter()
    outputs = served.generate(requests)
    synchronize()
    seconds = time.perf_counter() - started
    tokens = sum(len(s.token_ids) for s in outputs)
    exact = Engine(args.llm, store, dtype="float32")
    check = requests[:4] + [GenerationRequest(refs[0], prompts[0], sampling=Sampling(args.max_tokens, 0.8, 0.9, seed=7))] * 2
    together = [s.token_ids for s in exact.generate(check)]
    alone = [exact.generate([request])[0].token_ids for request in check]
    if together != alone:
        raise RuntimeError(f"batched rows differ from the same rows alone: {together} against {alone}")
    return {"device": str(served.backbone.device), "dtype": str(served.backbone.dtype).removeprefix("torch."),
            "rows": len(requests), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
            "batched_equals_alone": True, "seeded_rows_equal": together[-1] == together[-2], **device_memory()}


def http(args, made: dict) -> dict:
    import httpx

    store = Path(made["root"]) / "decoder"
    refs = sorted(f"gen/{path.name}" for path in (store / "gen").glob("a*"))
    if not refs:
        raise RuntimeError("no adapters: the decoder phase makes the store this phase serves")
    process, url = start_server(store, True, Path(made["root"]) / "server.log", "--backbone", args.llm,
                                "--max-queued-generations", str(4 * args.clients))
    try:
        figures = {"completions": completion_clients(url, refs, args)}
        body = {"model": refs[0], "prompt": "Once upon a time", "max_tokens": args.max_tokens, "temperature": 0}
        with httpx.Client(base_url=url, timeout=120) as client:
            whole = client.post("/v1/completions", json=body).raise_for_status().json()["choices"][0]["text"]
            started, first, pieces = time.perf_counter(), None, []
            with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                for line in response.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        first = first or time.perf_counter() - started
                        pieces += [choice["text"] for choice in json.loads(line[6:])["choices"]]
        figures["stream"] = {"events": len(pieces), "first_event_s": round(first or -1, 3),
                             "equals_unstreamed": "".join(pieces) == whole}
        if figures["completions"]["failures"] or not figures["stream"]["equals_unstreamed"]:
            raise RuntimeError(json.dumps(figures))
        return figures
    finally:
        process.terminate()
        process.wait(30)


def completion_clients(url: str, refs: list[str], args) -> dict:
    """--clients threads at once, each sending --requests completions in turn, client i to adapter i."""
    import httpx

    latencies, tokens, failures = [], [], []

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as http_client:
            for step in range(args.requests):
                started = time.perf_counter()
                response = http_client.post("/v1/completions", json={
                    "model": refs[index % len(refs)], "prompt": TEXTS[(index + step) % len(TEXTS)],
                    "max_tokens": args.max_tokens, "temperature": 0})
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text[:200]}")
                    continue
                latencies.append(time.perf_counter() - started)
                tokens.append(response.json()["usage"]["completion_tokens"])

    elapsed = run_threads(client, args.clients)
    return {"clients": args.clients, "requests": len(latencies), "failures": failures[:3],
            "tokens_per_s": round(sum(tokens) / elapsed, 1), **(percentiles(latencies, "s") if latencies else {})}


# In this order: the templates' phases first, the rest where time is left (each limited to the deadline).
PHASES = {"environment": environment, "templates": templates, "engine": engine, "decoder": decoder, "http": http,
          "training": training, "cuda_tests": cuda_tests}


def run_phase(name: str, args, made: dict, deadline: float) -> dict:
    if time.monotonic() > deadline:
        return {"phase": name, "skipped": "out of time (--minutes)"}
    log(name)
    started = time.perf_counter()
    try:
        figures = {"ok": True, **PHASES[name](args, made)}
    except Skipped as reason:
        figures = {"skipped": str(reason)}
    except Exception:  # noqa: BLE001 - reported, and the next phase runs
        figures = {"ok": False, "error": tail(traceback.format_exc())}
    return {"phase": name, "seconds": round(time.perf_counter() - started, 1), **figures}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", default=",".join(PHASES), help=f"Comma-separated, of {', '.join(PHASES)}.")
    parser.add_argument("--minutes", type=float, default=9, help="Phases not started by then are skipped, and "
                        "subprocesses stop by then.")
    parser.add_argument("--encoder", default="minilm")
    parser.add_argument("--llm", default="smollm2-135m")
    parser.add_argument("--adapters", type=int, default=1000, help="Resident adapters in the engine phase.")
    parser.add_argument("--rows", type=int, default=64, help="Rows of a mixed batch; generations at once.")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--precisions", default="bf16,fp16,fp32", type=lambda text: text.split(","))
    parser.add_argument("--quantized", action=argparse.BooleanOptionalAction, help="Train SmolLM2 in 4 bits "
                        "(default: on a GPU).")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4, help="Completions per HTTP client.")
    parser.add_argument("--test-seconds", type=int, default=240)
    parser.add_argument("--train-seconds", type=int, default=180, help="Limit of one training subprocess.")
    args = parser.parse_args(argv)
    unknown = [name for name in args.phases.split(",") if name not in PHASES]
    unknown += [name for name in args.precisions if name not in MIXED_PRECISION]
    if unknown:
        parser.error(f"unknown phases or precisions: {', '.join(unknown)}")
    deadline = time.monotonic() + 60 * args.minutes
    results = []
    with tempfile.TemporaryDirectory(prefix="adapterlab-gpu-check-", ignore_cleanup_errors=True) as root:
        made = {"root": root, "deadline": deadline}
        for name in args.phases.split(","):
            results.append(run_phase(name, args, made, deadline))
            print(json.dumps(results[-1]), flush=True)
    failed = [r["phase"] for r in results if r.get("ok") is False]
    skipped = [r["phase"] for r in results if "skipped" in r]
    print(json.dumps({"phase": "summary", "failed": failed, "skipped": skipped}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
