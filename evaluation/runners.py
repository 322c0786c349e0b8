"""The serving paths of ``ctscreen eval`` and the fan-out of a labelled set through one of them.

A :data:`Runner` screens one :class:`~evaluation.dataset.LabelledCase` and returns
``(CaseResult | None, seconds, error | None)``:

* :func:`http_runner`: the gateway's HTTP API (:func:`gateway.client.screen_path`), against the embedded
  stack or a running gateway;
* :func:`in_process_runner`: the reference, not the serving path: ingest
  (:func:`gateway.ingest.load_study`), :class:`ctscreen.reference.ReferencePipeline` (ONNX Runtime and
  the post-processing in this process), then :func:`aggregator.case.decide`.

:func:`run_cases` runs a set through a runner, several cases at a time; a case that fails is a row of
the report with its error, not the end of the run.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aggregator.report import EvalCase
from aggregator.schema import CaseResult
from evaluation import EvalError
from evaluation.dataset import LabelledCase
from gateway.errors import AuthNotConfigured, InsufficientScope, Unauthorized

logger = logging.getLogger(__name__)

Runner = Callable[[LabelledCase], tuple[CaseResult | None, float, str | None]]
"""Screens one case: ``(result or None, seconds, error or None)``; raises
:class:`~evaluation.EvalError` when no case can be screened (the run stops)."""

REFUSED_CREDENTIAL = tuple(error.reason for error in (Unauthorized, InsufficientScope, AuthNotConfigured))
"""The gateway's reasons for refusing a call's credential."""


def http_runner(client: Any, timeout_s: float) -> Runner:
    """The gateway's HTTP API through ``client`` (an ``httpx.Client`` on its base URL), as ``ctscreen screen``."""
    from gateway.client import screen_path

    def run(case: LabelledCase) -> tuple[CaseResult | None, float, str | None]:
        outcome = screen_path(client, case.path, quiet=True, max_wait_s=timeout_s)
        if outcome.result is None:
            err = outcome.error or {}
            if err.get("reason") in REFUSED_CREDENTIAL:  # every study would fail alike: not a verdict on any
                raise EvalError(f"the gateway refuses the credential ({err['reason']}): set CTSCREEN_TOKEN to an API "
                                "key or access token with the studies:write and results:read scopes")
            return None, outcome.seconds, f"{err.get('reason', 'error')}: {err.get('message', '')}".strip()
        return CaseResult.model_validate(outcome.result), outcome.seconds, None

    return run


def in_process_runner(repo: Path | None) -> Runner:
    """The in-process reference on ``repo``'s ``<model>/1/model.onnx`` (default ``model_repository/``)."""
    from aggregator.case import case_result
    from aggregator.schema import ModelInfo, Timings
    from ctscreen.contracts import SEGMENTATION_MODELS
    from ctscreen.postprocess import SliceBoxes
    from ctscreen.reference import ReferencePipeline
    from ctscreen.repo import model_provenance
    from gateway.client import collect_files
    from gateway.errors import GatewayError
    from gateway.ingest import load_study

    pipe = ReferencePipeline.from_repo(repo)
    models = [ModelInfo(name=name, **model_provenance(pipe.paths[name]), platform="onnxruntime (in-process)")
              for name in SEGMENTATION_MODELS]

    def run(case: LabelledCase) -> tuple[CaseResult | None, float, str | None]:
        t0 = time.monotonic()
        files = collect_files(case.path)
        try:
            study = load_study([(str(f.relative_to(case.path)), f.read_bytes()) for f in files])
        except GatewayError as exc:  # the reason the upload route would answer (an MR series: not_ct)
            reason, message, _ = exc.narrowed()
            return None, time.monotonic() - t0, f"{reason}: {message}"
        t1 = time.monotonic()
        boxes, valid, _ = pipe.run(study.hu)
        t2 = time.monotonic()
        outputs = [SliceBoxes(b, v) for b, v in zip(boxes, valid, strict=True)]
        t3 = time.monotonic()
        result = case_result(study, outputs, models=models, created_at=datetime.now(UTC))
        t4 = time.monotonic()
        result = result.model_copy(update={"timings": Timings(ingest_s=t1 - t0, inference_s=t2 - t1,
                                                              aggregate_s=t4 - t3, total_s=t4 - t0)})
        return result, t4 - t0, None

    return run


def _run_one(case: LabelledCase, runner: Runner) -> EvalCase:
    t0 = time.monotonic()
    try:
        result, seconds, error = runner(case)
    except EvalError:  # nothing can be screened (a refused credential): the run ends, with its one-line error
        raise
    except Exception as exc:  # noqa: BLE001 - one failed study is a row of the report, not the end
        logger.debug("case %s failed", case.case_id, exc_info=True)
        result, seconds, error = None, time.monotonic() - t0, f"{type(exc).__name__}: {exc}"
    truth = case.slice_truth(result)  # a failed study: the truth of its slices, which the per-image row lacks
    return EvalCase(case.case_id, case.kind, case.label, result, truth, seconds, error)


def run_cases(cases: Sequence[LabelledCase], runner: Runner, *, workers: int, quiet: bool) -> list[EvalCase]:
    """Every case through ``runner``, ``workers`` at a time; results in the order of ``cases``."""
    from concurrent.futures import ThreadPoolExecutor

    def report(i: int, done: EvalCase) -> None:
        if not quiet:
            verdict = done.result.verdict if done.result else f"FAILED ({done.error})"
            print(f"[{i}/{len(cases)}] {done.case_id}: {done.kind}, label {int(done.label)} -> {verdict} "
                  f"({done.seconds:.1f} s)", file=sys.stderr, flush=True)

    if workers <= 1:
        out = []
        for i, case in enumerate(cases, 1):
            out.append(_run_one(case, runner))
            report(i, out[-1])
        return out
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ctscreen-eval") as pool:
        futures = [pool.submit(_run_one, case, runner) for case in cases]
        out = []
        try:
            for i, future in enumerate(futures, 1):
                out.append(future.result())
                report(i, out[-1])
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # the cases not begun are not sent
            raise
        return out
