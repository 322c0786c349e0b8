"""Case-level load generator: whole studies against the gateway, as a screening centre sends them.

Arrivals are open-loop (``poisson``: exponential gaps at ``rate`` studies/s; ``bursty``: bursts of
``burst`` studies whose starts are Poisson at ``rate / burst``) or closed-loop (``closed``:
``concurrency`` clients, each sending its next study when the last one finished). Study sizes are
drawn from a :class:`~benchmarks.studies.SizeDist`. Every run is bounded: arrivals stop after
``duration`` seconds or ``max_studies`` studies, and a study still unfinished ``study_timeout`` seconds
after it was sent counts as an error (``timeout``).

A study's latency runs from the first byte of its upload to the moment the client learns that its job
finished: by default from the job's server-sent events (``GET /v1/jobs/{id}/events``, as an integration
follows a job; the gateway wakes the stream when the job changes), else (``follow="poll"``, or a gateway
without the stream) from the poll that sees it, whose interval bounds the error. The gateway's own
timings are kept beside it when it reports them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import numpy as np

from benchmarks import promstats
from benchmarks.common import BenchError, check_target, percentiles
from benchmarks.studies import PoolStudy, SizeDist, build_pool

logger = logging.getLogger(__name__)

MODES = ("poisson", "bursty", "closed")
DONE_STATES = {"done", "completed", "complete", "succeeded", "success", "finished"}
FAILED_STATES = {"failed", "error", "rejected", "cancelled", "canceled"}


@dataclass
class LoadConfig:
    """What one load run does; every field is bounded and checked by :meth:`validate`."""

    url: str
    mode: str = "closed"
    rate: float = 0.05
    burst: int = 3
    concurrency: int = 1
    duration: float = 120.0
    max_studies: int = 10
    study_timeout: float = 600.0
    poll_interval: float = 0.25
    sizes: str = "fixed:60"
    kinds: tuple[str, ...] = ("covid", "normal")
    upload: str = "files"
    follow: str = "events"
    """How the client learns that a job finished: ``events`` (server-sent events) or ``poll``."""
    seed: int = 0
    allow_remote: bool = False
    triton_metrics_url: str | None = None

    def validate(self) -> None:
        check_target(self.url, allow_remote=self.allow_remote)
        if self.triton_metrics_url:
            check_target(self.triton_metrics_url, allow_remote=self.allow_remote)
        if self.mode not in MODES:
            raise ValueError(f'Argument "mode" must be one of {", ".join(MODES)}, got {self.mode!r}.')
        if self.mode != "closed" and not 0 < self.rate <= 100:
            raise ValueError(f'Argument "rate" must be in (0, 100] studies/s, got {self.rate}.')
        if not 1 <= self.concurrency <= 256:
            raise ValueError(f'Argument "concurrency" must be in [1, 256], got {self.concurrency}.')
        if not 1 <= self.burst <= 256:
            raise ValueError(f'Argument "burst" must be in [1, 256], got {self.burst}.')
        if not 0 < self.duration <= 24 * 3600:
            raise ValueError(f'Argument "duration" must be in (0, 86400] s, got {self.duration}.')
        if not 1 <= self.max_studies <= 100_000:
            raise ValueError(f'Argument "max_studies" must be in [1, 100000], got {self.max_studies}.')
        if not 0 < self.study_timeout <= 24 * 3600:
            raise ValueError(f'Argument "study_timeout" must be in (0, 86400] s, got {self.study_timeout}.')
        if self.upload not in ("files", "zip"):
            raise ValueError(f'Argument "upload" must be files or zip, got {self.upload!r}.')
        if self.follow not in ("events", "poll"):
            raise ValueError(f'Argument "follow" must be events or poll, got {self.follow!r}.')
        SizeDist.parse(self.sizes)


@dataclass
class StudyOutcome:
    """What happened to one study."""

    index: int
    kind: str
    n_slices: int
    sent_at: float
    accepted_at: float | None = None
    finished_at: float | None = None
    state: str = "pending"
    error: str | None = None
    http_status: int | None = None
    throttled: int = 0
    message: str | None = None
    verdict: Any = None
    server_timings: dict[str, Any] | None = field(default=None)

    @property
    def latency(self) -> float | None:
        if self.finished_at is None or self.state != "done":
            return None
        return self.finished_at - self.sent_at


# --- the gateway's API, read tolerantly ---------------------------------------------------------------


def job_id_of(doc: dict[str, Any]) -> str:
    for key in ("job_id", "id", "job"):
        if key in doc and isinstance(doc[key], str | int):
            return str(doc[key])
    raise BenchError(f"the gateway's 202 answer has no job id: {str(doc)[:200]}")


def job_state_of(doc: dict[str, Any]) -> str:
    state = str(doc.get("state") or doc.get("status") or "").lower()
    if state in DONE_STATES:
        return "done"
    if state in FAILED_STATES:
        return "failed"
    return state or "unknown"


def _verdict_of(doc: dict[str, Any]) -> Any:
    result = doc.get("result")
    if isinstance(result, dict):
        return result.get("verdict")
    return None


def _timings_of(doc: dict[str, Any]) -> dict[str, Any] | None:
    result = doc.get("result")
    if isinstance(result, dict) and isinstance(result.get("timings"), dict):
        return result["timings"]
    return None


def _retry_after(resp: httpx.Response) -> float:
    try:
        return min(30.0, max(0.1, float(resp.headers.get("retry-after", "1"))))
    except ValueError:
        return 1.0


async def submit_and_wait(
    client: httpx.AsyncClient, cfg: LoadConfig, study: PoolStudy, out: StudyOutcome, deadline: float
) -> None:
    """Upload one study, follow its job to the end, fill ``out``; never raises."""
    try:
        while True:
            if cfg.upload == "zip":
                files = [("files", ("study.zip", study.zip_bytes(), "application/zip"))]
            else:
                files = [("files", (name, data, "application/dicom")) for name, data in study.files]
            resp = await client.post("/v1/studies", files=files)
            out.http_status = resp.status_code
            if resp.status_code == 429 and time.monotonic() + _retry_after(resp) < deadline:
                out.throttled += 1
                await asyncio.sleep(_retry_after(resp))
                continue
            break
        if resp.status_code != 202:
            out.state, out.error = "failed", f"http_{resp.status_code}"
            try:
                reason = resp.json().get("reason") or resp.json().get("detail")
                if isinstance(reason, str):
                    out.error += f":{reason[:60]}"
            except ValueError:
                pass
            out.finished_at = time.monotonic()
            return
        job = job_id_of(resp.json())
        out.accepted_at = time.monotonic()
        doc = await _follow_events(client, job, deadline) if cfg.follow == "events" else None
        while doc is None and time.monotonic() < deadline:
            await asyncio.sleep(cfg.poll_interval)
            r = await client.get(f"/v1/jobs/{job}")
            if r.status_code != 200:
                out.state, out.error = "failed", f"poll_http_{r.status_code}"
                out.finished_at = time.monotonic()
                return
            if job_state_of(r.json()) in ("done", "failed"):
                doc = r.json()
        if doc is None:
            out.state, out.error, out.finished_at = "failed", "timeout", time.monotonic()
            return
        out.finished_at = time.monotonic()
        out.state = job_state_of(doc)
        out.verdict = _verdict_of(doc)
        out.server_timings = _timings_of(doc)
        if out.state == "failed":
            err = doc.get("error") or doc.get("reason") or "job_failed"
            out.error = str(err.get("reason", err) if isinstance(err, dict) else err)[:80]
            if isinstance(err, dict) and err.get("message"):
                out.message = str(err["message"])[:300]
    except (httpx.HTTPError, BenchError, ValueError) as exc:
        out.state, out.error, out.finished_at = "failed", f"{type(exc).__name__}", time.monotonic()
        logger.debug("study %d failed: %s", out.index, exc)


async def _follow_events(client: httpx.AsyncClient, job: str, deadline: float) -> dict[str, Any] | None:
    """The finished job from its server-sent events; None when the gateway has no such stream, it ended
    early or the deadline passed (the caller polls then, or reports the timeout)."""

    async def read() -> dict[str, Any] | None:
        async with client.stream("GET", f"/v1/jobs/{job}/events") as r:
            if r.status_code != 200 or not r.headers.get("content-type", "").startswith("text/event-stream"):
                return None
            event = ""
            async for line in r.aiter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event in ("done", "failed"):
                    doc = json.loads(line[5:])
                    return doc if isinstance(doc, dict) and job_state_of(doc) in ("done", "failed") else None
        return None

    try:
        return await asyncio.wait_for(read(), max(0.1, deadline - time.monotonic()))
    except TimeoutError:
        return None


def arrival_times(cfg: LoadConfig, rng: np.random.Generator) -> list[float]:
    """Offsets (s from the start) of the open-loop arrivals, within ``duration`` and ``max_studies``."""
    times: list[float] = []
    t = 0.0
    if cfg.mode == "poisson":
        while len(times) < cfg.max_studies:
            if times:
                t += rng.exponential(1.0 / cfg.rate)
            if t > cfg.duration:
                break
            times.append(t)
    elif cfg.mode == "bursty":
        while len(times) < cfg.max_studies:
            if times:
                t += rng.exponential(cfg.burst / cfg.rate)
            if t > cfg.duration:
                break
            times.extend([t] * min(cfg.burst, cfg.max_studies - len(times)))
    else:
        raise ValueError(f"arrival_times is for open-loop modes, not {cfg.mode!r}")
    return times


async def run_load_async(cfg: LoadConfig, pool: dict[tuple[str, int], PoolStudy] | None = None) -> dict[str, Any]:
    """Run one bounded load and return its summary (see :func:`summarise`)."""
    cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    sizes = SizeDist.parse(cfg.sizes).draw(rng, cfg.max_studies)
    if pool is None:
        pool = build_pool(sizes, cfg.kinds)
    plan = [pool[(cfg.kinds[i % len(cfg.kinds)], n)] for i, n in enumerate(sizes)]
    tri_before = promstats.scrape(cfg.triton_metrics_url, allow_remote=cfg.allow_remote) if cfg.triton_metrics_url else None
    gw_before = _try_scrape(cfg.url.rstrip("/") + "/metrics", cfg.allow_remote)
    outcomes: list[StudyOutcome] = []
    limits = httpx.Limits(max_connections=max(8, 2 * cfg.concurrency), max_keepalive_connections=16)
    t0 = time.monotonic()
    hard_stop = t0 + cfg.duration + cfg.study_timeout
    async with httpx.AsyncClient(base_url=cfg.url, timeout=httpx.Timeout(cfg.study_timeout), limits=limits) as client:

        async def one(i: int, study: PoolStudy) -> None:
            out = StudyOutcome(index=i, kind=study.kind, n_slices=study.n_slices, sent_at=time.monotonic())
            outcomes.append(out)
            await submit_and_wait(client, cfg, study, out, min(hard_stop, out.sent_at + cfg.study_timeout))

        if cfg.mode == "closed":
            counter = iter(range(cfg.max_studies))

            async def worker() -> None:
                for i in counter:
                    if time.monotonic() - t0 > cfg.duration:
                        return
                    await one(i, plan[i])

            await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
        else:
            tasks = []
            for i, at in enumerate(arrival_times(cfg, rng)):
                delay = t0 + at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i, plan[i])))
            await asyncio.gather(*tasks)
    t1 = time.monotonic()
    tri = (promstats.triton_summary(promstats.delta(
        tri_before, promstats.scrape(cfg.triton_metrics_url, allow_remote=cfg.allow_remote)))
        if tri_before is not None and cfg.triton_metrics_url else None)
    gw_after = _try_scrape(cfg.url.rstrip("/") + "/metrics", cfg.allow_remote)
    gw = promstats.histogram_summary(promstats.delta(gw_before, gw_after)) if gw_before and gw_after else None
    return summarise(cfg, outcomes, t0, t1, tri, gw)


def _try_scrape(url: str, allow_remote: bool) -> promstats.Sample | None:
    try:
        return promstats.scrape(url, allow_remote=allow_remote)
    except BenchError as exc:
        logger.info("no gateway metrics: %s", exc)
        return None


def summarise(
    cfg: LoadConfig,
    outcomes: list[StudyOutcome],
    t0: float,
    t1: float,
    triton: dict[str, Any] | None,
    gateway: dict[str, Any] | None,
) -> dict[str, Any]:
    """Studies/hour, case latency percentiles, slices/s and errors of one run."""
    done = [o for o in outcomes if o.state == "done"]
    lat = [o.latency for o in done if o.latency is not None]
    wall = max(1e-9, (max((o.finished_at or t1) for o in outcomes) if outcomes else t1) - t0)
    slices = sum(o.n_slices for o in done)
    errors = Counter(o.error or "unknown" for o in outcomes if o.state != "done")
    offered = cfg.rate if cfg.mode != "closed" else None
    return {
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("allow_remote",)},
        "sent": len(outcomes),
        "completed": len(done),
        "errors": dict(errors),
        "error_rate": round(1 - len(done) / len(outcomes), 4) if outcomes else None,
        "throttled_429": sum(o.throttled for o in outcomes),
        "wall_s": round(wall, 3),
        "offered_studies_per_hour": round(offered * 3600, 1) if offered else None,
        "studies_per_hour": round(len(done) / wall * 3600, 2),
        "slices_per_s": round(slices / wall, 3),
        "latency_s": {k: (round(v, 3) if v is not None else None) for k, v in percentiles(lat).items()}
        | {"mean": round(float(np.mean(lat)), 3) if lat else None, "max": round(max(lat), 3) if lat else None},
        "latency_per_slice_ms": round(1000 * float(np.mean([o.latency / o.n_slices for o in done
                                                            if o.latency is not None])), 2)
        if done
        else None,
        "studies": [
            {
                "i": o.index,
                "kind": o.kind,
                "slices": o.n_slices,
                "state": o.state,
                "error": o.error,
                "message": o.message,
                "latency_s": round(o.latency, 3) if o.latency is not None else None,
                "verdict": o.verdict,
                "server_timings": o.server_timings,
            }
            for o in sorted(outcomes, key=lambda o: o.index)
        ],
        "triton": triton,
        "gateway_stages": gateway,
    }


def run_load(cfg: LoadConfig, pool: dict[tuple[str, int], PoolStudy] | None = None) -> dict[str, Any]:
    """Synchronous wrapper of :func:`run_load_async`."""
    return asyncio.run(run_load_async(cfg, pool))
