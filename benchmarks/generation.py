"""Generation figures (JSON on stdout), side by side in one run, on SmolLM2-135M:

  - throughput (generated tokens/s) and p50/p95 latency of 1, 8 and 32 concurrent clients spread over
    16 generative adapters: `adapterlab serve` (/v1/chat/completions, the engine's decoder: rows of every
    adapter in one batch, joining between steps) against the path it replaced (one prompt at a time,
    `PeftModel.from_pretrained` for each request, then `generate` on the same chat-templated prompt),
    which runs in this process without HTTP, so the comparison leans its way. Chat, as clients of an
    instruct model send it: SmolLM2 answers each of these requests with a sentence or more (as raw
    completions, half of these prompts end at once, which measures prompt reading, not generation);
  - time to first token of a streamed request alone, and beside 15 other adapters' streams;
  - classification latency (a SmolLM2 classification adapter on /v1/classify) idle and while 8
    clients generate: p95 under load against idle;
  - cold load of a generative adapter once 1 and 1,000 are resident in one engine (same LRU cache).

Random LoRA weights copied from one trained adapter: fine for speed, meaningless for text. Greedy
decoding; every request asks for --max-tokens (a row ends earlier at the end token; tokens are counted,
and the mean per request is reported).

    .venv/bin/python benchmarks/generation.py [--max-tokens 32] [--resident 1000]
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from _common import SHARED_DATA, cold_and_warm, percentiles, random_copies, run_threads, start_server

PROMPTS = ["Write one sentence about a restaurant: name[The Eagle], food[French], area[riverside]",
           "Describe a coffee shop near the river in a few words.",
           "name[Aromi], eatType[pub], customer rating[5 out of 5]. Say it in one sentence.",
           "Tell a customer where to find a cheap family-friendly place to eat."]
PHASE_SECONDS = 240  # no phase runs longer, whatever the request counts


def make_store(root: Path, count: int) -> tuple[list[str], str]:
    """`count` generative adapters (random copies of one trained in a step) and one classification
    adapter, all on SmolLM2; returns the generative references and the classifier's."""
    from adapterlab.recipe import validate_recipe
    from adapterlab.training import train

    data = str(SHARED_DATA / "e2e")
    common = {"backbone": "smollm2-135m", "method": {"name": "lora", "r": 8}, "training": {"max_steps": 1},
              "output": {"store": str(root), "name": "t"}}
    template = train(validate_recipe({**common, "task": "template",
                                      "head": {"type": "generate", "template": "{text}", "max_new_tokens": 32},
                                      "data": {"path": data, "text_field": "mr", "target_field": "ref", "k": 4,
                                               "test_limit": 1}}), show_progress=False).adapter_path
    classifier = train(validate_recipe({**common, "task": "sentiment", "data": {"path": "demo:sentiment", "k": 2}}),
                       show_progress=False).adapter_path
    refs = random_copies(template, root / "gen", count)
    shutil.rmtree(template)
    return refs, f"sentiment/{classifier.name}"


def progress(message: str) -> None:
    print(f"[generation benchmark] {message}", file=sys.stderr, flush=True)


def run_clients(send, refs: list[str], clients: int, requests: int) -> dict:
    """`clients` threads, each sending `requests` prompts in turn, client i to adapter i % len(refs);
    `send(ref, prompt)` returns the number of tokens generated."""
    latencies, tokens, failures = [], [], []
    deadline = time.monotonic() + PHASE_SECONDS

    def client(index: int) -> None:
        for step in range(requests):
            if time.monotonic() > deadline:
                return
            started = time.perf_counter()
            try:
                tokens.append(send(refs[index % len(refs)], PROMPTS[(index + step) % len(PROMPTS)]))
            except Exception as error:  # noqa: BLE001 - counted, then reported
                failures.append(repr(error))
                continue
            latencies.append(time.perf_counter() - started)

    elapsed = run_threads(client, clients)
    return {"clients": clients, "requests": len(latencies), "failures": len(failures),
            "tokens_per_request": round(sum(tokens) / max(len(tokens), 1), 1),
            "tokens_per_s": round(sum(tokens) / elapsed, 1), **percentiles(latencies, "s")}


def served(url: str, max_tokens: int):
    http = httpx.Client(base_url=url, timeout=300, limits=httpx.Limits(max_connections=64))

    def send(ref: str, prompt: str) -> int:
        response = http.post("/v1/chat/completions", json={"model": ref, "messages": [{"role": "user", "content": prompt}],
                                                           "max_tokens": max_tokens, "temperature": 0,
                                                           # the chat as sent, as the per-request peft path reads it
                                                           "adapterlab": {"template": False}})
        response.raise_for_status()
        return response.json()["usage"]["completion_tokens"]
    return send


def per_request_peft(store: Path, max_tokens: int):
    """The replaced path: one request at a time, the adapter loaded by peft for it, then generate."""
    from peft import PeftModel

    from adapterlab.backbones import load_backbone

    backbone = load_backbone("smollm2-135m")
    lock = threading.Lock()

    def send(ref: str, prompt: str) -> int:
        with lock:
            model = PeftModel.from_pretrained(backbone.model, str(store / ref))
            ids = backbone.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                         return_tensors="pt", return_dict=True)
            with torch.inference_mode():
                output = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False,
                                        pad_token_id=backbone.tokenizer.eos_token_id)
            model.unload()  # the bare backbone back, for the next request's adapter
            return output.shape[1] - ids.input_ids.shape[1]
    return send


def first_token_seconds(url: str, ref: str, max_tokens: int) -> float:
    """Seconds to the stream's first event: a completion stream sends one as its first token is
    decoded (without stop strings nothing is held back)."""
    started = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", timeout=300,
                      json={"model": ref, "prompt": PROMPTS[0], "max_tokens": max_tokens, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                return time.perf_counter() - started
    raise RuntimeError(f"the stream of {ref} sent no event")


def time_to_first_token(url: str, refs: list[str], max_tokens: int, repeats: int = 8) -> dict:
    alone = [first_token_seconds(url, refs[0], max_tokens) for _ in range(repeats)]
    stop = threading.Event()

    def background(ref: str) -> None:
        while not stop.is_set():
            first_token_seconds(url, ref, 4 * max_tokens)

    others = [threading.Thread(target=background, args=(ref,)) for ref in refs[1:16]]
    for thread in others:
        thread.start()
    time.sleep(5)  # the other streams are decoding
    beside = [first_token_seconds(url, refs[0], max_tokens) for _ in range(repeats)]
    stop.set()
    for thread in others:
        thread.join()
    return {"alone": percentiles(alone, "s"), "beside_15_adapters": percentiles(beside, "s")}


def classification_latency(url: str, classifier: str, refs: list[str], max_tokens: int, requests: int = 40) -> dict:
    def classify_many() -> list[float]:
        samples = []
        with httpx.Client(base_url=url, timeout=120) as http:
            for i in range(requests):
                started = time.perf_counter()
                http.post("/v1/classify", json={"adapter": classifier, "inputs": [PROMPTS[i % len(PROMPTS)]]}
                          ).raise_for_status()
                samples.append(time.perf_counter() - started)
        return samples

    idle = classify_many()
    stop = threading.Event()
    send = served(url, max_tokens)

    def generating(ref: str) -> None:
        while not stop.is_set():
            send(ref, PROMPTS[0])

    load = [threading.Thread(target=generating, args=(ref,)) for ref in refs[:8]]
    for thread in load:
        thread.start()
    time.sleep(3)
    loaded = classify_many()
    stop.set()
    for thread in load:
        thread.join()
    figures = {"idle": percentiles(idle, "s"), "under_8_generating_clients": percentiles(loaded, "s")}
    ratio = figures["under_8_generating_clients"]["p95_s"] / figures["idle"]["p95_s"]
    return {**figures, "p95_ratio": round(ratio, 2)}


def cold_loads(store: Path, refs: list[str], resident: int) -> dict:
    from adapterlab.engine import Engine

    engine = Engine("smollm2-135m", store=store, max_adapters=resident + 50)
    return cold_and_warm(engine, refs, [1, resident])


def main() -> int:
    from adapterlab.precision import cpu_capability

    parser = argparse.ArgumentParser()
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--resident", type=int, default=1000, help="Adapters resident for the cold-load figure.")
    parser.add_argument("--requests", type=int, default=2, help="Per client, at 8 and 32 clients (1 client: 8).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="adapterlab-generation-bench-", ignore_cleanup_errors=True) as folder:
        root = Path(folder)
        store = root / "store"
        progress(f"writing {args.resident + 20} adapters")
        refs, classifier = make_store(store, args.resident + 20)
        served_refs = refs[:16]
        figures: dict = {"benchmark": "generation", "backbone": "smollm2-135m", "adapters": 16,
                         "max_tokens": args.max_tokens, "cpu": cpu_capability(), "cpu_cores": os.cpu_count()}
        # Room for every client's generation: the default queue bound (16) would answer the 32 clients' rest with 503.
        process, url = start_server(store, True, root / "server.log", "--max-queued-generations", "64")
        try:
            send = served(url, args.max_tokens)
            run_clients(send, served_refs, 16, 1)  # warm-up: every adapter loaded once
            replaced = per_request_peft(store, args.max_tokens)
            throughput = {}
            for clients in (1, 8, 32):
                progress(f"{clients} clients: the engine, then per-request peft")
                requests = 8 if clients == 1 else args.requests
                engine = run_clients(send, served_refs, clients, requests)
                before = run_clients(replaced, served_refs, clients, requests)
                throughput[f"{clients}_clients"] = {
                    "engine": engine, "per_request_peft": before,
                    "tokens_per_s_ratio": round(engine["tokens_per_s"] / before["tokens_per_s"], 2)}
            figures["throughput"] = throughput
            progress("time to first token, then classification under generation load")
            figures["time_to_first_token"] = time_to_first_token(url, served_refs, args.max_tokens)
            figures["classification_latency"] = classification_latency(url, classifier, served_refs, args.max_tokens)
        finally:
            process.terminate()
            process.wait(30)
        progress(f"cold loads with {args.resident} resident")
        figures["cold_load"] = cold_loads(store, refs, args.resident)
        ratio_32 = figures["throughput"]["32_clients"]["tokens_per_s_ratio"]
        single = figures["throughput"]["1_clients"]
        slower_alone = single["engine"]["p50_s"] / single["per_request_peft"]["p50_s"]
        cold = figures["cold_load"][f"cold_load_at_{args.resident}_resident"]["p50_ms"]
        figures["targets"] = {"tokens_per_s_ratio_at_32_min": 5.0, "latency_ratio_at_1_max": 1.2,
                              "classification_p95_ratio_max": 2.0, "cold_load_ms_max": 5.0}
        figures["targets_met"] = {"throughput_at_32": ratio_32 >= 5.0, "latency_at_1": slower_alone <= 1.2,
                                  "classification_p95": figures["classification_latency"]["p95_ratio"] <= 2.0,
                                  "cold_load": cold <= 5.0}
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
