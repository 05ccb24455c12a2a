"""Prometheus metrics of the server (``GET /metrics``), in a registry of their own (one per server, so
several servers or test apps in one process never share counters)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 - the /metrics content type

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """The server's metrics; the engine thread sets the gauges (``set_state``) after every step."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests_running = Gauge("memattn_requests_running", "requests with a sequence running", registry=r)
        self.requests_waiting = Gauge("memattn_requests_waiting", "requests waiting to be scheduled", registry=r)
        self.kv_blocks_used = Gauge("memattn_kv_blocks_used", "KV blocks held by sequences", registry=r)
        self.kv_blocks_free = Gauge("memattn_kv_blocks_free", "KV blocks free (cached prefixes included)",
                                    registry=r)
        self.prefix_cache_hit_rate = Gauge("memattn_prefix_cache_hit_rate",
                                           "prompt tokens found in the prefix cache / prompt tokens looked up",
                                           registry=r)
        self.prefix_cache_queries = Gauge("memattn_prefix_cache_queries_tokens",
                                          "prompt tokens looked up in the prefix cache so far", registry=r)
        self.prefix_cache_hits = Gauge("memattn_prefix_cache_hits_tokens",
                                       "prompt tokens found in the prefix cache so far", registry=r)
        self.generated_tokens = Counter("memattn_generation_tokens", "tokens generated", registry=r)
        self.finished_requests = Counter("memattn_completions_finished", "completions finished, by reason",
                                         ["finish_reason"], registry=r)
        self.time_to_first_token = Histogram("memattn_time_to_first_token_seconds",
                                             "seconds from a request's arrival to its first token",
                                             buckets=TTFT_BUCKETS, registry=r)

    def set_state(self, *, running, waiting, blocks_used, blocks_free, prefix_queries, prefix_hits) -> None:
        self.requests_running.set(running)
        self.requests_waiting.set(waiting)
        self.kv_blocks_used.set(blocks_used)
        self.kv_blocks_free.set(blocks_free)
        self.prefix_cache_queries.set(prefix_queries)
        self.prefix_cache_hits.set(prefix_hits)
        self.prefix_cache_hit_rate.set(prefix_hits / prefix_queries if prefix_queries else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def parse_metrics(text: str) -> dict:
    """{"name{labels}": value} of a Prometheus text exposition (for tests and quick checks)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


__all__ = ["ServerMetrics", "parse_metrics", "CONTENT_TYPE_LATEST"]
