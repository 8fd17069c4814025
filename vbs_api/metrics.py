"""``/metrics``: Prometheus text, read from the catalog at each scrape (the API runs no batch,
so what runs record is read where they record it).

- ``vbs_batches{status}``, ``vbs_fine_tuning_jobs{status}``, ``vbs_deployments{status}``: every
  status each time (0 when none), so a status left behind never keeps its last value.
- ``vbs_pool_waiting{pool}`` / ``vbs_pool_running{pool}``: work waiting for the ``gpu`` pool
  (batches validating, jobs and deployments queued) and holding it (batches in progress,
  finalizing or cancelling; jobs and deployments running).
- ``vbs_batch_duration_seconds{phase,status}``: histograms of ended batches, ``total`` from
  creation and ``running`` from ``in_progress``, counted in the database.
- ``vbs_engine_output_tokens_per_second``: output tokens over running seconds of the batches
  that ended in the last ``THROUGHPUT_WINDOW_S``.
- ``vbs_requests_processed``, ``vbs_tokens_processed``, ``vbs_api_request_seconds``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

from vbs_resources.catalog import Catalog

JOB_STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
DEPLOYMENT_STATUSES = ("queued", "running", "succeeded", "failed")
DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
THROUGHPUT_WINDOW_S = 600


class CatalogCollector:
    """The catalog's figures, collected at each scrape."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def collect(self) -> Iterator[Metric]:
        with self.catalog.engine.connect() as conn:
            batches = self.catalog.batches.count_by_status(conn)
            jobs = self.catalog.fine_tuning.count_by_status(conn)
            deployments = self.catalog.deployments.count_by_status(conn)
            durations = self.catalog.batches.durations(DURATION_BUCKETS, conn)
            since = time.time() - THROUGHPUT_WINDOW_S
            rate = self.catalog.batches.output_tokens_per_second(since, conn)
        yield _by_status("vbs_fine_tuning_jobs", "Fine-tuning jobs by status.", JOB_STATUSES, jobs)
        yield _by_status(
            "vbs_deployments", "Deployments by status.", DEPLOYMENT_STATUSES, deployments
        )
        waiting = GaugeMetricFamily(
            "vbs_pool_waiting", "Work waiting for a Dagster pool.", labels=["pool"]
        )
        waiting.add_metric(
            ["gpu"], batches.get("validating", 0) + jobs.get("queued", 0)
            + deployments.get("queued", 0),
        )  # fmt: skip
        yield waiting
        running = GaugeMetricFamily(
            "vbs_pool_running", "Work holding a Dagster pool.", labels=["pool"]
        )
        running.add_metric(
            ["gpu"],
            sum(batches.get(s, 0) for s in ("in_progress", "finalizing", "cancelling"))
            + jobs.get("running", 0) + deployments.get("running", 0),
        )  # fmt: skip
        yield running
        histogram = HistogramMetricFamily(
            "vbs_batch_duration_seconds",
            "Ended batches' durations: total (from creation) and running (from in_progress).",
            labels=["phase", "status"],
        )
        for (phase, status), (cumulative, count, total) in sorted(durations.items()):
            edges = [str(float(b)) for b in DURATION_BUCKETS]
            histogram.add_metric(
                [phase, status], [*zip(edges, cumulative, strict=True), ("+Inf", count)], total
            )
        yield histogram
        yield GaugeMetricFamily(
            "vbs_engine_output_tokens_per_second",
            f"Output tokens per running second of batches ended in the last "
            f"{THROUGHPUT_WINDOW_S} s.",
            value=rate,
        )


def _by_status(name: str, doc: str, statuses: tuple[str, ...], counts: dict) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=["status"])
    for status in statuses:
        family.add_metric([status], counts.get(status, 0))
    return family


def metrics_registry(catalog: Catalog) -> dict[str, Any]:
    """The API's registry with the gauges the ``/metrics`` route sets and the catalog's
    collector."""
    registry = CollectorRegistry()
    registry.register(CatalogCollector(catalog))
    return {
        "registry": registry,
        "latency": Histogram(
            "vbs_api_request_seconds",
            "API request latency by route.",
            ["method", "route"],
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        ),
        "batches": Gauge("vbs_batches", "Batches by OpenAI status.", ["status"], registry=registry),
        "queue": Gauge(
            "vbs_queue_depth", "Batches validating, running or finalizing.", registry=registry
        ),
        "requests": Gauge(
            "vbs_requests_processed", "Requests processed.", ["outcome"], registry=registry
        ),
        "tokens": Gauge("vbs_tokens_processed", "Tokens processed.", ["kind"], registry=registry),
    }
