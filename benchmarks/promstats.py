"""Prometheus scrapes turned into per-run figures: Triton queue/compute times, gateway stage times.

A run scrapes before and after and works on the difference, so figures belong to that run alone.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import BenchError, check_target

logger = logging.getLogger(__name__)

Sample = dict[tuple[str, tuple[tuple[str, str], ...]], float]

TRITON_COUNTERS = (
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
)


def parse(text: str) -> Sample:
    """Every sample of a Prometheus text exposition, keyed by (sample name, sorted labels).

    The parser names counter samples ``<family>_total`` whatever the exposition said (Triton's
    ``nv_inference_count`` comes back as ``nv_inference_count_total``); the suffix is removed here.
    """
    out: Sample = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name = s.name[: -len("_total")] if family.type == "counter" and s.name.endswith("_total") else s.name
            out[(name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def scrape(url: str, *, allow_remote: bool = False, timeout: float = 5.0) -> Sample:
    """GET a ``/metrics`` URL and parse it; raise :class:`BenchError` when it cannot be read."""
    check_target(url, allow_remote=allow_remote)
    try:
        r = httpx.get(url, timeout=timeout)
        r.raise_for_status()
    except httpx.HTTPError as exc:
        raise BenchError(f"cannot read metrics at {url}: {exc}") from exc
    return parse(r.text)


def delta(before: Sample, after: Sample) -> Sample:
    """``after - before`` for every sample of ``after`` (missing before counts as 0)."""
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def triton_summary(d: Sample) -> dict[str, dict[str, Any]]:
    """Per-model figures from a Triton metrics delta.

    Returns ``{model: {requests, inferences, executions, avg_batch, queue_us, compute_input_us,
    compute_infer_us, compute_output_us, request_us}}``; the ``*_us`` figures are means per request.
    """
    acc: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for (name, labels), value in d.items():
        if name not in TRITON_COUNTERS:
            continue
        model = dict(labels).get("model", "?")
        acc[model][name] += value
    out: dict[str, dict[str, Any]] = {}
    for model, m in sorted(acc.items()):
        req = m["nv_inference_request_success"]
        if req <= 0 and m["nv_inference_request_failure"] <= 0:
            continue
        per = (lambda key, req=req, m=m: round(m[key] / req, 1) if req else None)  # noqa: E731
        out[model] = {
            "requests": int(req),
            "failures": int(m["nv_inference_request_failure"]),
            "inferences": int(m["nv_inference_count"]),
            "executions": int(m["nv_inference_exec_count"]),
            "avg_batch": round(m["nv_inference_count"] / m["nv_inference_exec_count"], 2)
            if m["nv_inference_exec_count"]
            else None,
            "request_us": per("nv_inference_request_duration_us"),
            "queue_us": per("nv_inference_queue_duration_us"),
            "compute_input_us": per("nv_inference_compute_input_duration_us"),
            "compute_infer_us": per("nv_inference_compute_infer_duration_us"),
            "compute_output_us": per("nv_inference_compute_output_duration_us"),
        }
    return out


def histogram_summary(d: Sample, *, prefix: str = "") -> dict[str, dict[str, Any]]:
    """Mean and count of every histogram (``*_sum``/``*_count`` pair) in a delta, by name and labels.

    Used on the gateway's ``/metrics`` whatever its stage names are, so the per-stage breakdown
    follows the gateway as it grows.
    """
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for (name, labels), value in d.items():
        if prefix and not name.startswith(prefix):
            continue
        label_txt = ",".join(f"{k}={v}" for k, v in labels if k not in {"le", "quantile"})
        if name.endswith("_sum"):
            sums[f"{name[:-4]}{{{label_txt}}}"] = value
        elif name.endswith("_count"):
            counts[f"{name[:-6]}{{{label_txt}}}"] = value
    out: dict[str, dict[str, Any]] = {}
    for key, total in sorted(sums.items()):
        n = counts.get(key, 0.0)
        if n > 0:
            out[key] = {"count": int(n), "sum": round(total, 6), "mean": round(total / n, 6)}
    return out
