"""The server's metrics, rendered in the Prometheus text format."""

from bisect import bisect_left
from collections import Counter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
FINISH_REASONS = ("stop", "length", "cancelled")  # cancelled: its client left


class Histogram:
    def __init__(self, bounds: tuple[float, ...]):
        self.bounds, self.counts, self.sum = bounds, [0] * (len(bounds) + 1), 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def lines(self, labels: str = "") -> list[str]:
        """Samples with `labels` ('key="value",' each) prepended to the bucket bounds."""
        cumulative, lines = 0, []
        for bound, count in zip((*self.bounds, "+Inf"), self.counts):
            cumulative += count
            lines.append(f'_bucket{{{labels}le="{bound}"}} {cumulative}')
        labels = f"{{{labels.rstrip(',')}}}" if labels else ""
        return lines + [f"_sum{labels} {self.sum}", f"_count{labels} {cumulative}"]


class Metrics:
    """Counted on the event loop; the engine figures are a snapshot the worker publishes."""

    def __init__(self):
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latency: dict[str, Histogram] = {}
        self.batch_rows = Histogram(BATCH_BUCKETS)
        self.engine = {"resident": 0, "hits": 0, "misses": 0, "evictions": 0}
        self.truncated = 0  # inputs cut to their adapter's token limit
        self.generation = {"running": 0, "tokens": 0, **{reason: 0 for reason in FINISH_REASONS}}

    def figures(self) -> dict:
        """The figures a backend's engine and decoder produced, in one dict (a Ray replica reports them)."""
        return {**self.engine, **self.generation, "truncated": self.truncated,
                "batches": sum(self.batch_rows.counts)}

    def add_up(self, figures: list[dict]) -> None:
        """Take the sums of several backends' `figures` (an ingress in front of replicas)."""
        self.engine = {key: sum(f[key] for f in figures) for key in self.engine}
        self.generation = {key: sum(f[key] for f in figures) for key in self.generation}
        self.truncated = sum(f["truncated"] for f in figures)

    def record(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[endpoint, status] += 1
        self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def render(self) -> str:
        """The Prometheus text format."""
        requests = self.requests.items()
        out = family("adapterlab_requests_total", "counter", "HTTP requests by endpoint and status.",
                     [f'{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in requests])
        out += family("adapterlab_errors_total", "counter", "HTTP answers with status >= 400.",
                      [f'{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in requests if s >= 400])
        out += family("adapterlab_request_seconds", "histogram", "Request latency.",
                      [line for e, h in self.latency.items() for line in h.lines(f'endpoint="{e}",')])
        out += family("adapterlab_batch_rows", "histogram", "Rows per engine batch.", self.batch_rows.lines())
        out += family("adapterlab_truncated_inputs_total", "counter",
                      "Inputs cut to their adapter's token limit (answered from their first tokens).",
                      [f" {self.truncated}"])
        out += family("adapterlab_resident_adapters", "gauge", "Adapters loaded in the engine.",
                      [f" {self.engine['resident']}"])
        for name in ("hits", "misses", "evictions"):
            out += family(f"adapterlab_cache_{name}_total", "counter", f"Engine adapter cache {name}.",
                          [f" {self.engine[name]}"])
        out += family("adapterlab_generations_running", "gauge", "Generated rows in the decoder or waiting for it.",
                      [f" {self.generation['running']}"])
        out += family("adapterlab_generated_tokens_total", "counter", "Tokens the decoder chose (one per row a step).",
                      [f" {self.generation['tokens']}"])
        out += family("adapterlab_generations_total", "counter", "Generated rows by how they ended.",
                      [f'{{finish_reason="{reason}"}} {self.generation[reason]}' for reason in FINISH_REASONS])
        return "\n".join(out) + "\n"


def family(name: str, kind: str, description: str, samples: list[str]) -> list[str]:
    """A metric family; each sample is its labels (and _bucket/_sum/_count suffix) and value."""
    return [f"# HELP {name} {description}", f"# TYPE {name} {kind}"] + [name + sample for sample in samples]
