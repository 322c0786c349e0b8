"""Prometheus metrics of the gateway (one registry per app, served at ``/metrics``).

Names (stable; the Helm chart's autoscaling reads ``ctscreen_backlog_slices``):

=====================================  =========  ==========================================================
``ctscreen_studies_total{verdict}``    counter    studies finished: positive, negative, indeterminate, failed
``ctscreen_slices_total``              counter    slices answered by Triton
``ctscreen_errors_total{reason}``      counter    refused requests, refused files and failed jobs by reason
``ctscreen_stage_seconds{stage}``      histogram  per-study latency of decode, infer, aggregate, total
                                                  (total: from the job created, its queue included)
``ctscreen_study_turnaround_seconds``  histogram  from a study's last instance received (an upload:
                                                  accepted) to its verdict, by ``{origin}`` (``upload``;
                                                  ``stow``: STOW-RS and C-STORE, its quiet period included)
                                                  and ``{priority}`` (``urgent``, ``routine``, ``low``)
``ctscreen_studies_inflight{state}``   gauge      studies queued / running now
``ctscreen_inflight_requests``         gauge      Triton requests on the wire now
``ctscreen_backlog_slices``            gauge      slices accepted and not yet answered (queued studies
                                                  counted by their file count until decoded): raw, this
                                                  gateway's share, to be summed over gateways
``ctscreen_triton_endpoints``          gauge      live Triton endpoints in the pool
``ctscreen_triton_slices_per_second``  gauge      measured rate of each endpoint ``{endpoint}``
``ctscreen_triton_slices_total``       counter    slices answered by each endpoint ``{endpoint}``
``ctscreen_triton_retries_total``      counter    batches tried again after a transport failure
``ctscreen_triton_restarts_total``     counter    restarts of the embedded Triton after it died (``ctscreen serve``)
``ctscreen_dicom_discarded_total``     counter    C-STORE instances of a class other than CT answered Success and
                                                  discarded, by ``{sop_class}`` (its keyword, else its UID)
=====================================  =========  ==========================================================

No gateway exports backlog *seconds*: a gateway sees only its own share of the backlog and of each Triton
pod's time, so per-gateway estimates summed over G gateways read up to G times the drain time. The chart's
PrometheusRule records one fleet-wide series instead, ``ctscreen:backlog_seconds:fleet`` = sum of
``ctscreen_backlog_slices`` / the slices per second the whole Triton fleet serves (Triton's own
``nv_inference_count``), and the autoscaler reads that.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydicom.uid import UID

from gateway.jobs import PRIORITIES
from gateway.triton_pool import TritonPool

STAGES = ("decode", "infer", "aggregate", "total")
ORIGINS = ("upload", "stow")
"""How a study came (``jobs.origin``): uploaded whole, or instance by instance (STOW-RS, C-STORE)."""
_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, math.inf)


class _LiveCollector(Collector):
    """Gauges read from the pool and the job store at scrape time (never stale)."""

    def __init__(self, pool: TritonPool, jobs_state: Callable[[], tuple[int, int, int]]) -> None:
        self._pool = pool
        self._jobs_state = jobs_state

    def collect(self) -> Iterator[Metric]:
        queued, running, backlog_known = self._jobs_state()
        backlog = max(backlog_known, self._pool.pending_slices)
        studies = GaugeMetricFamily("ctscreen_studies_inflight", "Studies queued or running now.",
                                    labels=["state"])
        studies.add_metric(["queued"], queued)
        studies.add_metric(["running"], running)
        yield studies
        yield GaugeMetricFamily("ctscreen_inflight_requests", "Triton requests on the wire now.",
                                value=self._pool.inflight_requests)
        yield GaugeMetricFamily("ctscreen_backlog_slices",
                                "Slices accepted by this gateway and not yet answered (sum over gateways).",
                                value=backlog)
        rates = self._pool.rates()
        yield GaugeMetricFamily("ctscreen_triton_endpoints", "Live Triton endpoints.", value=len(rates))
        per_rate = GaugeMetricFamily("ctscreen_triton_slices_per_second",
                                     "Measured slices per second of each Triton endpoint.", labels=["endpoint"])
        for url, rate in rates.items():
            per_rate.add_metric([url], rate)
        yield per_rate
        per_count = CounterMetricFamily("ctscreen_triton_slices", "Slices answered by each Triton endpoint.",
                                        labels=["endpoint"])
        for url, n in self._pool.slice_counts.items():
            per_count.add_metric([url], n)
        yield per_count
        yield CounterMetricFamily("ctscreen_triton_retries", "Batches tried again after a failure.",
                                  value=self._pool.retries)


class Metrics:
    """The gateway's metrics, in a registry of their own (several apps may live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.studies = Counter("ctscreen_studies", "Studies finished, by verdict (failed: no verdict).",
                               ["verdict"], registry=self.registry)
        self.slices = Counter("ctscreen_slices", "Slices answered by Triton.", registry=self.registry)
        self.errors = Counter("ctscreen_errors", "Refused requests, refused files and failed jobs by reason.",
                              ["reason"], registry=self.registry)
        self.stage = Histogram("ctscreen_stage_seconds", "Per-study latency of each stage.", ["stage"],
                               buckets=_BUCKETS, registry=self.registry)
        self.turnaround = Histogram(
            "ctscreen_study_turnaround_seconds",
            "From a study's last instance received (an upload: accepted) to its verdict, by origin and priority.",
            ["origin", "priority"], buckets=_BUCKETS, registry=self.registry)
        self.triton_restarts = Counter("ctscreen_triton_restarts",
                                       "Restarts of the embedded Triton after it died (ctscreen serve).",
                                       registry=self.registry)
        self.dicom_discarded = Counter("ctscreen_dicom_discarded",
                                       "C-STORE instances of a class other than CT answered Success and discarded.",
                                       ["sop_class"], registry=self.registry)
        for verdict in ("positive", "negative", "indeterminate", "failed"):
            self.studies.labels(verdict)
        for stage in STAGES:
            self.stage.labels(stage)
        for origin in ORIGINS:
            for priority in PRIORITIES:
                self.turnaround.labels(origin, priority)

    def attach(self, pool: TritonPool, jobs_state: Callable[[], tuple[int, int, int]]) -> None:
        """Register the live gauges of ``pool`` and of the job store (``(queued, running, backlog)``)."""
        self.registry.register(_LiveCollector(pool, jobs_state))

    def failed(self, reason: str, n: int = 1) -> None:
        """Count ``n`` studies that ended without a verdict, for ``reason``."""
        self.error(reason, n)
        self.studies.labels("failed").inc(n)

    def error(self, reason: str, n: int = 1) -> None:
        """Count ``n`` errors of ``reason``."""
        self.errors.labels(reason).inc(n)

    def discarded(self, sop_class_uid: str) -> None:
        """Count one DICOM instance of ``sop_class_uid`` (not CT) received and discarded (labelled by keyword)."""
        self.dicom_discarded.labels(UID(sop_class_uid).keyword or sop_class_uid).inc()
