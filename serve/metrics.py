"""``/metrics``: Prometheus text for one app, from its own ``CollectorRegistry`` (never the process-global one).

Gauges and counters are read from ``Scheduler.stats()`` at scrape time; the batch-fill histogram observes every
predictor call as it is made (``Scheduler.on_call``); request latency and status are observed by the app for each
``POST /v1/images``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 600, float("inf"))


class _SchedulerCollector:
    """Queue depth, images in flight and the scheduler's running totals, read when scraped."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler

    def collect(self):
        s = self.scheduler.stats()
        yield GaugeMetricFamily("ddpm_serve_queue_depth", "Images admitted but not yet in the batch.",
                                value=s["queue_depth"])
        yield GaugeMetricFamily("ddpm_serve_images_in_flight", "Images in the batch (being denoised).",
                                value=s["images_in_flight"])
        yield CounterMetricFamily("ddpm_serve_images", "Images finished (rate() of it is images/s).",
                                  value=s["images_done"])
        yield CounterMetricFamily("ddpm_serve_jobs", "Requests whose images all finished.", value=s["requests_done"])
        yield CounterMetricFamily("ddpm_serve_predictor_calls", "Batched predictor calls.", value=s["predictor_calls"])


class Metrics:
    """The app's registry: scheduler gauges, batch fill per predictor call, request latency by status."""

    def __init__(self, scheduler, max_batch: int) -> None:
        self.scheduler = scheduler
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_SchedulerCollector(scheduler))
        buckets, b = [], 1
        while b < max_batch:
            buckets.append(b)
            b *= 2
        self.batch_fill = Histogram("ddpm_serve_batch_fill", "Rows per predictor call (guided images count twice).",
                                    buckets=(*buckets, max_batch, 2 * max_batch, float("inf")),
                                    registry=self.registry)
        self.latency = Histogram("ddpm_serve_request_seconds", "POST /v1/images latency, arrival to response.",
                                 ["status"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter("ddpm_serve_requests", "POST /v1/images requests by response status.", ["status"],
                                registry=self.registry)
        scheduler.on_call.append(self.batch_fill.observe)

    def observe_request(self, status: int, seconds: float) -> None:
        self.requests.labels(str(status)).inc()
        self.latency.labels(str(status)).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
