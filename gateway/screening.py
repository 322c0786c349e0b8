"""One screening function: a study's files in, a :class:`~aggregator.schema.CaseResult` out.

:meth:`Screener.prepare` has ingest read the files once (parse each file, choose the series, decode
to HU, sort along the slice normal, keep the headers an SR needs; CPU work in a thread pool);
:meth:`Screener.screen` fans the slices out to Triton through the :class:`~gateway.triton_pool.TritonPool`
and lets :func:`aggregator.case.case_result` turn the prepared study and Triton's outputs into the result. Nothing here knows about jobs, leases or the store:
:mod:`gateway.worker` calls it for a claimed job, and the upload route calls :meth:`Screener.prepare`
to refuse a study that cannot be screened with its specific 4xx before accepting it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aggregator.case import CaseRule, case_result
from aggregator.schema import CaseResult, ModelInfo, Timings
from gateway.ingest import PreparedStudy, load_study
from gateway.metrics import Metrics
from gateway.report import SrContext
from gateway.triton_pool import TritonPool

Loader = Callable[[Sequence[tuple[str, bytes]]], PreparedStudy]
"""``sources -> PreparedStudy`` (default :func:`gateway.ingest.load_study`)."""


def _ingest_loader(workers: int) -> Loader:
    def load(sources: Sequence[tuple[str, bytes]]) -> PreparedStudy:
        return load_study(sources, workers=workers)

    return load


@dataclass
class Prepared:
    """A decoded study, ready for Triton."""

    study: PreparedStudy
    sr_context: SrContext | None
    ingest_s: float
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def study_instance_uid(self) -> str:
        return self.study.study_instance_uid

    @property
    def series_instance_uid(self) -> str:
        return self.study.series_instance_uid

    @property
    def n_slices(self) -> int:
        return self.study.n_slices


class Screener:
    """Decodes studies and screens them.

    Parameters
    ----------
    pool : TritonPool
        Where slices are screened.
    metrics : Metrics
        Stage latencies, slices and verdicts are counted here.
    decode_workers : int
        Threads decoding DICOM.
    rule : CaseRule | None
        The case rule (paper defaults).
    loader : Loader | None
        ``sources -> PreparedStudy``; defaults to :func:`gateway.ingest.load_study`.
    """

    def __init__(self, pool: TritonPool, metrics: Metrics, *, decode_workers: int = 2,
                 rule: CaseRule | None = None, loader: Loader | None = None) -> None:
        self.pool = pool
        self.metrics = metrics
        self.rule = rule or CaseRule()
        self._loader = loader or _ingest_loader(decode_workers)
        self.executor = ThreadPoolExecutor(max_workers=decode_workers, thread_name_prefix="ctscreen-decode")
        self._models: list[ModelInfo] | None = None

    def close(self) -> None:
        """Stop the decode threads."""
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def prepare(self, sources: Sequence[tuple[str, bytes]]) -> Prepared:
        """Decode a study's files.

        Raises
        ------
        gateway.errors.GatewayError
            The study cannot be screened (not DICOM, not CT, no usable series, ...), with its reason.
        """
        loop = asyncio.get_running_loop()
        t = time.monotonic()
        study = await loop.run_in_executor(self.executor, self._loader, sources)
        ingest_s = time.monotonic() - t
        self.metrics.stage.labels("decode").observe(ingest_s)
        for r in (*study.rejected, *study.excluded):
            self.metrics.error(str(r.reason))
        return Prepared(study, study.sr_context, ingest_s)

    async def screen(self, prepared: Prepared, *, job_id: str, started: float,
                     on_batch: Callable[[int], None] | None = None,
                     on_aggregate: Callable[[], Any] | None = None) -> CaseResult:
        """Screen a prepared study; ``started`` (epoch seconds) is when its job was accepted.

        Raises
        ------
        gateway.triton_pool.InferenceUnavailable
            No Triton could answer (the caller retries later).
        gateway.triton_pool.InferenceFailed
            Triton refused the request.
        """
        study = prepared.study
        timings = {"ingest_s": prepared.ingest_s}
        t = time.monotonic()

        def progress(n: int) -> None:
            self.metrics.slices.inc(n)
            if on_batch is not None:
                on_batch(n)

        outputs = await self.pool.infer(study.hu, on_batch=progress)
        timings["inference_s"] = time.monotonic() - t
        self.metrics.stage.labels("infer").observe(timings["inference_s"])
        if on_aggregate is not None:
            await on_aggregate()
        t = time.monotonic()
        models = await self._model_info()
        result = case_result(study, outputs, self.rule, models=models, job_id=job_id, created_at=datetime.now(UTC))
        timings["aggregate_s"] = time.monotonic() - t
        timings["total_s"] = max(time.time() - started, timings["inference_s"] + timings["aggregate_s"])
        self.metrics.stage.labels("aggregate").observe(timings["aggregate_s"])
        self.metrics.stage.labels("total").observe(timings["total_s"])
        result = result.model_copy(update={"timings": Timings(**timings)})
        self.metrics.studies.labels(result.verdict).inc()
        return result

    async def _model_info(self) -> list[ModelInfo]:
        if self._models is None:
            version = await self.pool.model_version()
            if version is None:
                return [ModelInfo(name=self.pool.model_name, version="unknown")]
            models = [ModelInfo(name=self.pool.model_name, version=version, platform="ensemble")]
            for name, info in sorted((await self.pool.component_models()).items()):
                models.append(ModelInfo(name=name, version=info.get("version", "unknown"),
                                        sha256=info.get("sha256")))
            self._models = models
        return self._models
