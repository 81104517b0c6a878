"""Prometheus metrics, in a registry of the app's own (two apps in one process never share counters)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_latency = Histogram(
            "mmrec_request_latency_seconds",
            "Request latency by route template, method and status.",
            ["method", "route", "status"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        )
        self.cache_requests = Counter(
            "mmrec_cache_requests",
            "Recommendation cache lookups by result (hit, miss, error: the cache backend was unreachable).",
            ["result"],
            registry=self.registry,
        )
        self.recommendations = Counter(
            "mmrec_recommendations", "Recommendation lists computed, by strategy.", ["strategy"], registry=self.registry
        )
        self.search_batch_size = Histogram(
            "mmrec_search_batch_size",
            "Searches answered by one micro-batch (one FAISS call).",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
        )
        self.items_ingested = Counter("mmrec_items_ingested", "Items added through the API.", registry=self.registry)
        self.items_deleted = Counter("mmrec_items_deleted", "Items deleted through the API.", registry=self.registry)
        self.events_recorded = Counter("mmrec_events_recorded", "User events recorded.", registry=self.registry)
        self.index_size = Gauge("mmrec_index_size", "Live items in the index.", registry=self.registry)
        self.in_flight = 0  # HTTP requests in progress (RequestMetrics, on the event loop); micro-batching reads it
        Gauge("mmrec_requests_in_flight", "HTTP requests in progress.", registry=self.registry).set_function(
            lambda: self.in_flight
        )
        for result in ("hit", "miss", "error"):
            self.cache_requests.labels(result=result)

    def track_index_size(self, size: Callable[[], float]) -> None:
        self.index_size.set_function(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)
