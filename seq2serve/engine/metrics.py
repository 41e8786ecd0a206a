"""The engine's Prometheus series. One registry per app (tests run several apps in a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
)


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.batch_size = Histogram(
            "seq2serve_batch_size",
            "Rows in each decoder step (generate), first-token call of joining requests "
            "(prefill) or encoder call (encode/classify).",
            ["kind"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=registry,
        )
        self.queue_depth = Gauge(
            "seq2serve_queue_depth", "Requests waiting for a batch slot.", registry=registry
        )
        self.active_sequences = Gauge(
            "seq2serve_active_sequences",
            "Sequences in the running generation batch.",
            registry=registry,
        )
        self.generated_tokens = Counter(
            "seq2serve_generated_tokens", "Tokens generated.", registry=registry
        )
        self.time_to_first_token = Histogram(
            "seq2serve_time_to_first_token_seconds",
            "From a generation request's arrival to its first token.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency = Histogram(
            "seq2serve_inter_token_latency_seconds",
            "Between consecutive tokens of one sequence.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
