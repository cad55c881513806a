"""The server's metrics, kept and rendered in the Prometheus text format by `prometheus_client`."""

from prometheus_client import (CollectorRegistry, Counter, Histogram, PlatformCollector, ProcessCollector,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
FINISH_REASONS = ("stop", "length", "cancelled")  # cancelled: its client left


class Metrics:
    """A registry of its own per server (a process may hold several: tests, a Ray ingress beside its
    replicas), with the process and platform figures. Requests and batch sizes are counted on the event loop;
    the engine and decoder figures are a snapshot the worker publishes, read when the registry is collected."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("adapterlab_requests", "HTTP requests by endpoint and status.",
                                ["endpoint", "status"], registry=self.registry)
        self.errors = Counter("adapterlab_errors", "HTTP answers with status >= 400.", ["endpoint", "status"],
                              registry=self.registry)
        self.latency = Histogram("adapterlab_request_seconds", "Request latency.", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_rows = Histogram("adapterlab_batch_rows", "Rows per engine batch.", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.engine = {"resident": 0, "hits": 0, "misses": 0, "evictions": 0}
        self.truncated = 0  # inputs cut to their adapter's token limit
        self.generation = {"running": 0, "tokens": 0, **{reason: 0 for reason in FINISH_REASONS}}
        self.registry.register(self)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def figures(self) -> dict:
        """The figures a backend's engine and decoder produced, in one dict (a Ray replica reports them)."""
        batches = next(sample.value for family in self.batch_rows.collect() for sample in family.samples
                       if sample.name.endswith("_count"))
        return {**self.engine, **self.generation, "truncated": self.truncated, "batches": int(batches)}

    def add_up(self, figures: list[dict]) -> None:
        """Take the sums of several backends' `figures` (an ingress in front of replicas)."""
        self.engine = {key: sum(f[key] for f in figures) for key in self.engine}
        self.generation = {key: sum(f[key] for f in figures) for key in self.generation}
        self.truncated = sum(f["truncated"] for f in figures)

    def record(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def collect(self):
        """The snapshot's families (the registry calls this when it is collected)."""
        yield CounterMetricFamily("adapterlab_truncated_inputs", "Inputs cut to their adapter's token limit "
                                  "(answered from their first tokens).", value=self.truncated)
        yield GaugeMetricFamily("adapterlab_resident_adapters", "Adapters loaded in the engine.",
                                value=self.engine["resident"])
        for name in ("hits", "misses", "evictions"):
            yield CounterMetricFamily(f"adapterlab_cache_{name}", f"Engine adapter cache {name}.",
                                      value=self.engine[name])
        yield GaugeMetricFamily("adapterlab_generations_running", "Generated rows in the decoder or waiting for it.",
                                value=self.generation["running"])
        yield CounterMetricFamily("adapterlab_generated_tokens", "Tokens the decoder chose (one per row a step).",
                                  value=self.generation["tokens"])
        ended = CounterMetricFamily("adapterlab_generations", "Generated rows by how they ended.",
                                    labels=["finish_reason"])
        for reason in FINISH_REASONS:
            ended.add_metric([reason], self.generation[reason])
        yield ended

    def render(self) -> str:
        """The Prometheus text format."""
        return generate_latest(self.registry).decode()
