"""``ctscreen eval``: run a labelled set through the serving path and write a Table-3 report.

::

    ctscreen eval --data DIR [--url URL | --in-process] [--out docs/eval/] [--make-phantom N]

Serving paths
-------------
* default: the **embedded stack**, started here (``gateway.cli.run_stack``: embedded Triton with the cpu
  profile plus the gateway under uvicorn on a free port); every study is uploaded with
  ``POST /v1/studies`` and followed on ``/v1/jobs/{id}``, exactly as ``ctscreen screen`` does.
* ``--url URL``: the same HTTP client against a gateway that is already running (a cluster).
* ``--in-process``: the **reference**, not the serving path: ingest (:func:`gateway.ingest.load_study`),
  ONNX Runtime on ``model_repository/*/1/model.onnx`` and :func:`ctscreen.postprocess.postprocess_batch`
  in this process, then :func:`aggregator.case.decide`. For developing the report and for NIfTI sets.

Data
----
``DIR`` holds phantom studies as ``ctscreen phantom`` writes them (one folder per study with its DICOM
files and ``manifest.json``, format ``ctscreen-phantom/1``); ``--make-phantom N`` first writes the
held-out phantom set (seeds from ``training.datasets.PHANTOM_EVAL_SEED0``, kinds cycling like
training) into ``DIR``. Or ``DIR`` is a NIfTI set in the training layout (``ct_scans/`` and
``Infection_Mask/`` or the like): its cases are first written as DICOM studies under ``--work``
(:func:`write_nifti_set`), label 1 when the lesion mask is not empty.

Per-image truth: a slice is positive when its lesion mask covers more than ``--min-lesion-px`` pixels
(default 25, the paper's box size), negative when it covers none; slices in between (a lesion's tip)
are left out of the per-image metrics.

Output (``--out``): ``report.md``, ``report.json``, ``results.jsonl`` (every CaseResult with its truth)
and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.metrics import IndeterminateAs
from aggregator.report import DEFAULT_CUTOFFS, EvalCase, Goal, build_report, render_markdown
from aggregator.schema import CaseResult
from ctscreen.cliargs import positive
from ctscreen.contracts import MIN_BOX_AREA

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path("docs/eval")


class EvalError(Exception):
    """A one-line error for the user: the command exits with status 2."""


# --- the labelled set -----------------------------------------------------------------------------
@dataclass
class LabelledCase:
    """One study of the set on disk, with its truth."""

    case_id: str
    kind: str
    label: bool
    path: Path
    slice_truth: Callable[[CaseResult], dict[str, bool]]
    """Truth per image for the slices of a result (by SOP Instance UID)."""


def slice_truth_from_manifest(manifest: dict[str, Any], min_px: int = MIN_BOX_AREA) -> Callable[[CaseResult], dict[str, bool]]:
    """Per-image truth of a phantom study (``ctscreen-phantom/1`` manifest).

    The manifest gives the lesion area of each lesion slice by slice index, and for each index its
    SOP Instance UID (``files``) and z position (``z_positions``; the slices are axial, so z is the
    position along the normal). A result slice is matched by SOP Instance UID, or else to the slice
    nearest its ``position_mm`` within half the slice spacing. It is positive above ``min_px`` lesion
    pixels, negative at 0, and left out in between or when it matches no slice.
    """
    zs = np.asarray(manifest.get("z_positions") or [], dtype=float)
    if zs.size == 0:
        return lambda result: {}
    area = np.zeros(len(zs), dtype=int)
    lesion_slices = manifest.get("lesion_slices") or []
    area[np.asarray(lesion_slices, dtype=int)] = np.asarray(manifest.get("lesion_area_px") or [], dtype=int)
    by_uid = {f["sop_instance_uid"]: int(f["index"]) for f in manifest.get("files") or []
              if isinstance(f, dict) and "sop_instance_uid" in f and "index" in f}
    spacing = float(manifest.get("slice_spacing") or (np.median(np.diff(np.sort(zs))) if zs.size > 1 else 1.0))

    def index_of(uid: str, position_mm: float) -> int | None:
        if uid in by_uid:
            return by_uid[uid]
        k = int(np.argmin(np.abs(zs - position_mm)))
        return k if abs(zs[k] - position_mm) <= spacing / 2 else None

    def truth(result: CaseResult) -> dict[str, bool]:
        out = {}
        for f in result.slices:
            k = index_of(f.sop_instance_uid, f.position_mm)
            if k is None or not 0 <= k < len(area):
                continue
            px = int(area[k])
            if px == 0 or px > min_px:
                out[f.sop_instance_uid] = px > min_px
        return out

    return truth


def discover(data: Path, min_px: int = MIN_BOX_AREA) -> list[LabelledCase]:
    """Every labelled study under ``data`` (folders holding a ``manifest.json``), sorted by name."""
    if not data.is_dir():
        raise EvalError(f"--data {data}: not a directory")
    cases = []
    for manifest_path in sorted(data.rglob("manifest.json")):
        folder = manifest_path.parent
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise EvalError(f"{manifest_path}: unreadable manifest ({exc})") from exc
        kind = str(manifest.get("kind", "unknown"))
        label = manifest.get("label")
        if label is None:
            label = kind == "covid"
        cases.append(LabelledCase(
            case_id=str(folder.relative_to(data)) if folder != data else folder.name,
            kind=kind, label=bool(int(label)), path=folder,
            slice_truth=slice_truth_from_manifest(manifest, min_px),
        ))
    if not cases:
        raise EvalError(f"--data {data}: no study with a manifest.json (write one with --make-phantom N)")
    return cases


def make_phantom_set(data: Path, n: int, *, n_slices: int | None = None, encoding: str = "explicit",
                     montage: bool = True) -> None:
    """Write the held-out phantom set: ``n`` studies, seeds from ``PHANTOM_EVAL_SEED0``."""
    import phantom
    from training.datasets import PHANTOM_EVAL_SEED0, phantom_kind

    data.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        kind = phantom_kind(i)
        seed = PHANTOM_EVAL_SEED0 + i
        out = data / f"{i:03d}-{kind}-{seed}"
        if (out / "manifest.json").is_file():
            continue
        study = phantom.make_study(seed, kind=kind, n_slices=n_slices)
        phantom.write_study(study, out, encoding=encoding, montage=montage)
        logger.info("wrote %s", out)


def write_nifti_set(root: Path, out: Path) -> int:
    """Write a NIfTI set (the training layout: volumes plus lesion masks) as DICOM studies under ``out``.

    Each case becomes a folder in the phantom layout (``dicom/``, ``manifest.json``, ``masks/``) written
    by :func:`phantom.write_study`, so that it can travel the serving path like any study: axial slices
    on the 512 grid, positions along +z by the volume's slice spacing, label 1 when the lesion mask is
    not empty. Folders already written are kept. Returns the number of cases.
    """
    import nibabel as nib

    import phantom
    from training.datasets import DataError, load_nifti_case, nifti_cases

    try:
        cases = nifti_cases(root)
    except DataError as exc:
        raise EvalError(str(exc)) from exc
    for case_id, volume, lesion, lung in cases:
        folder = out / case_id
        if (folder / "manifest.json").is_file():
            continue
        try:
            v = load_nifti_case(case_id, volume, lesion, lung)
        except DataError as exc:
            raise EvalError(str(exc)) from exc
        img = nib.as_closest_canonical(nib.load(str(volume)))
        sx, sy, sz = (float(z) for z in img.header.get_zooms()[:3])
        label = int(v.lesion.any())
        study = phantom.Study(
            hu=v.hu, lung_mask=np.zeros(v.hu.shape, bool), lesion_mask=v.lesion,
            finding_mask=np.zeros(v.hu.shape, np.uint8), valid_boxes=np.where(v.valid_boxes < 0, -1, v.valid_boxes),
            kind="covid" if label else "normal", label=label,
            pixel_spacing=(sy * img.shape[1] / v.hu.shape[1], sx * img.shape[0] / v.hu.shape[2]),
            slice_thickness=sz, slice_spacing=sz,
            positions=np.array([[0.0, 0.0, k * sz] for k in range(len(v.hu))]),
            seed=0, rescale_intercept=-1024, pixel_representation=1,
        )
        phantom.write_study(study, folder, salt=case_id, montage=False)
        logger.info("wrote %s", folder)
    return len(cases)


def _looks_like_nifti_set(data: Path) -> bool:
    return data.is_dir() and not any(data.rglob("manifest.json")) and any(data.rglob("*.nii*"))


# --- serving paths ---------------------------------------------------------------------------------
Runner = Callable[[LabelledCase], tuple[CaseResult | None, float, str | None]]


def _http_runner(client: Any, timeout_s: float) -> Runner:
    from gateway.cli import screen_path

    def run(case: LabelledCase) -> tuple[CaseResult | None, float, str | None]:
        outcome = screen_path(client, case.path, quiet=True, max_wait_s=timeout_s)
        if outcome.result is None:
            err = outcome.error or {}
            return None, outcome.seconds, f"{err.get('reason', 'error')}: {err.get('message', '')}".strip()
        return CaseResult.model_validate(outcome.result), outcome.seconds, None

    return run


def _in_process_runner(repo: Path | None) -> Runner:
    from aggregator.case import SliceInput, decide
    from aggregator.schema import ModelInfo, RejectedFile, Timings
    from benchmarks.inprocess import OrtPipeline
    from ctscreen.contracts import SEGMENTATION_MODELS
    from ctscreen.postprocess import unpack_boxes
    from gateway.cli import collect_files
    from gateway.errors import GatewayError
    from gateway.ingest import load_study

    pipe = OrtPipeline(repo=repo)
    models = []
    for name in SEGMENTATION_MODELS:
        card = (repo or Path("model_repository")) / name / "1" / "model_card.json"
        info = json.loads(card.read_text()) if card.is_file() else {}
        models.append(ModelInfo(name=name, version=str(info.get("version", "unknown")),
                                sha256=info.get("sha256"), platform="onnxruntime (in-process)"))

    def run(case: LabelledCase) -> tuple[CaseResult | None, float, str | None]:
        t0 = time.monotonic()
        files = collect_files(case.path)
        try:
            study = load_study([(str(f.relative_to(case.path)), f.read_bytes()) for f in files])
        except GatewayError as exc:
            return None, time.monotonic() - t0, f"{exc.reason}: {exc.message}"
        t1 = time.monotonic()
        boxes, valid = [], []
        for i in range(0, len(study.hu), 8):
            out, counts, va = pipe(np.ascontiguousarray(study.hu[i : i + 8, None]))
            boxes += unpack_boxes(out, counts)
            valid += list(va)
        t2 = time.monotonic()
        inputs = [
            SliceInput(s.sop_instance_uid, s.position_mm, b, v, rows=s.rows, cols=s.cols,
                       to_original=s.grid.to_original)
            for s, b, v in zip(study.slices, boxes, valid, strict=True)
        ]
        decision = decide(inputs, spacing_mm=study.spacing_mm)
        t3 = time.monotonic()
        result = decision.to_result(
            study_instance_uid=study.study_instance_uid,
            series_instance_uid=study.series_instance_uid,
            models=models,
            timings=Timings(ingest_s=t1 - t0, inference_s=t2 - t1, aggregate_s=t3 - t2, total_s=t3 - t0),
            rejected=[RejectedFile(filename=r.filename, reason=r.reason, message=r.message)
                      for r in [*study.rejected, *study.excluded]],
            warnings=list(study.warnings),
            created_at=datetime.now(UTC),
        )
        return result, t3 - t0, None

    return run


@dataclass
class _Path:
    runner: Runner
    name: str


@contextmanager
def _serving_path(args: argparse.Namespace) -> Iterator[_Path]:
    """The runner of the chosen path, with its resources (server, client) open meanwhile."""
    if args.in_process:
        yield _Path(_in_process_runner(args.repo), "in-process reference (ORT + postprocess_batch, no server)")
        return
    import httpx

    if args.url:
        with httpx.Client(base_url=args.url.rstrip("/"), timeout=args.timeout) as client:
            try:
                ready = client.get("/readyz")
            except httpx.HTTPError as exc:
                raise EvalError(f"--url {args.url}: cannot connect ({exc})") from exc
            if ready.status_code != 200:
                raise EvalError(f"--url {args.url}: gateway not ready (GET /readyz -> {ready.status_code})")
            yield _Path(_http_runner(client, args.timeout), f"gateway at {args.url}")
        return
    from gateway.cli import CliError, run_stack

    with ExitStack() as resources:
        try:
            # the audit trail goes beside the report, not between the progress lines
            audit = {"audit_log_file": args.out / "audit.jsonl"}
            stack = resources.enter_context(run_stack(port=0, repo=args.repo, triton_url=args.triton_url,
                                                      settings_overrides=audit))
        except (CliError, RuntimeError, OSError) as exc:
            raise EvalError(f"cannot start the embedded stack: {exc}") from exc
        client = resources.enter_context(httpx.Client(base_url=stack.url, timeout=args.timeout))
        triton = f"Triton at {args.triton_url}" if args.triton_url else "embedded Triton, cpu profile"
        yield _Path(_http_runner(client, args.timeout), f"embedded stack (ctscreen serve: {triton} + gateway, HTTP API)")


def _run_one(case: LabelledCase, runner: Runner) -> EvalCase:
    t0 = time.monotonic()
    try:
        result, seconds, error = runner(case)
    except Exception as exc:  # noqa: BLE001 - one failed study is a row of the report, not the end
        logger.debug("case %s failed", case.case_id, exc_info=True)
        result, seconds, error = None, time.monotonic() - t0, f"{type(exc).__name__}: {exc}"
    truth = case.slice_truth(result) if result is not None else {}
    return EvalCase(case.case_id, case.kind, case.label, result, truth, seconds, error)


def _run_cases(cases: Sequence[LabelledCase], runner: Runner, *, workers: int, quiet: bool) -> list[EvalCase]:
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
        for i, future in enumerate(futures, 1):
            out.append(future.result())
            report(i, out[-1])
        return out


# --- writing the report ----------------------------------------------------------------------------
def write_plots(report: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    """Draw the PNG plots of ``report`` into ``out``; ``(title, file name)`` of each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []
    curves = report["curves"]

    def pct(v):
        return np.nan if v is None else 100.0 * v

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    for level, style in (("per_patient", "-o"), ("per_image", "--s")):
        pts = curves[level]
        cut = [p["cutoff"] for p in pts]
        name = level.replace("_", " ")
        ax.plot(cut, [pct(p["sensitivity"]) for p in pts], style, label=f"{name} sensitivity")
        ax.plot(cut, [pct(p["specificity"]) for p in pts], style, label=f"{name} specificity")
    ax.set_xlabel("cutoff (region score)")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Sensitivity and specificity over the cutoff")
    fig.tight_layout()
    fig.savefig(out / "curves.png")
    plt.close(fig)
    plots.append(("Sensitivity and specificity over the cutoff", "curves.png"))

    fig, ax = plt.subplots(figsize=(4.8, 4.8), dpi=100)
    for level, style in (("per_patient", "-o"), ("per_image", "--s")):
        pts = [p for p in curves[level] if p["sensitivity"] is not None and p["specificity"] is not None]
        xy = sorted([(0.0, 0.0), *((1 - p["specificity"], p["sensitivity"]) for p in pts), (1.0, 1.0)])
        ax.plot([x for x, _ in xy], [y for _, y in xy], style, label=level.replace("_", " "))
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC through the cutoffs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "roc.png")
    plt.close(fig)
    plots.append(("ROC through the cutoffs", "roc.png"))

    fp = report["fp_by_class"]
    if fp:
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
        names = list(fp)
        rates = [pct(fp[n]["rate"]) for n in names]
        lo = [r - pct(fp[n]["low"]) for r, n in zip(rates, names, strict=True)]
        hi = [pct(fp[n]["high"]) - r for r, n in zip(rates, names, strict=True)]
        ax.bar(names, rates, yerr=[lo, hi], capsize=4, color="#c0504d")
        for i, n in enumerate(names):
            ax.text(i + 0.08, (0 if np.isnan(rates[i]) else rates[i]) + 2, f"{fp[n]['fp']}/{fp[n]['n']}",
                    ha="left", fontsize=8)
        ax.set_ylabel("false-positive cases, % (95% CI)")
        ax.set_ylim(0, 105)
        ax.set_title("False positives per hard-negative class (per patient)")
        fig.tight_layout()
        fig.savefig(out / "fp_by_class.png")
        plt.close(fig)
        plots.append(("False positives per hard-negative class", "fp_by_class.png"))

    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.4), dpi=100)
    for ax, level in zip(axes, ("per_patient", "per_image"), strict=True):
        c = report[level]
        m = np.array([[c["tp"], c["fn"]], [c["fp"], c["tn"]]])
        ax.imshow(m, cmap="Blues")
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=12,
                    color="white" if v > m.max() / 2 else "black")
        ax.set_xticks([0, 1], ["called +", "called -"])
        ax.set_yticks([0, 1], ["truth +", "truth -"])
        ax.set_title(level.replace("_", " "))
    fig.tight_layout()
    fig.savefig(out / "confusion.png")
    plt.close(fig)
    plots.append(("Confusion matrices", "confusion.png"))
    return plots


def write_report(cases: Sequence[EvalCase], out: Path, *, meta: dict[str, Any] | None = None,
                 cutoffs: Sequence[float] = DEFAULT_CUTOFFS, indeterminate_as: IndeterminateAs = "positive",
                 goal: Goal | None = None) -> dict[str, Any]:
    """Build the report of ``cases`` and write ``report.md``, ``report.json``, ``results.jsonl`` and plots."""
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(cases, cutoffs=cutoffs, indeterminate_as=indeterminate_as, goal=goal, meta=meta)
    plots = write_plots(report, out)
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    (out / "report.md").write_text(render_markdown(report, plots=plots))
    with (out / "results.jsonl").open("w") as fh:
        for c in cases:
            row = {"case_id": c.case_id, "kind": c.kind, "label": int(c.label), "error": c.error,
                   "seconds": c.seconds, "slice_truth": dict(c.slice_truth),
                   "result": None if c.result is None else c.result.model_dump(mode="json")}
            fh.write(json.dumps(row, sort_keys=True) + "\n")
    return report


# --- the command ------------------------------------------------------------------------------------
def _cutoffs(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from exc
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"cutoffs must lie in [0, 1]: {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ctscreen eval",
        description="Run a labelled set through the serving path and write a Table-3 report "
                    "(Markdown, JSON, PNG plots).",
    )
    p.add_argument("--data", type=Path, required=True, help="folder of labelled studies (phantom manifest.json)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running gateway (default: start the embedded stack here)")
    where.add_argument("--in-process", action="store_true",
                       help="reference path: ingest + ONNX Runtime + postprocess in this process, no server")
    p.add_argument("--triton-url", metavar="HOST:PORT",
                   help="with the embedded stack: use this running Triton (gRPC) instead of starting one")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report folder (default docs/eval)")
    p.add_argument("--repo", type=Path, default=None,
                   help="embedded stack: a rendered Triton repository (default: the cpu profile rendered from "
                        "model_repository/); --in-process: a folder of <model>/1/model.onnx (default model_repository/)")
    p.add_argument("--make-phantom", type=positive(int), metavar="N",
                   help="first write N held-out phantom studies into --data (existing ones are kept)")
    p.add_argument("--work", type=Path, default=Path("out/eval-work"),
                   help="where a NIfTI set is written as DICOM studies (default out/eval-work)")
    p.add_argument("--phantom-slices", type=positive(int), default=None, help="slices per phantom study")
    p.add_argument("--limit", type=positive(int), help="evaluate the first N studies only")
    p.add_argument("--concurrency", type=positive(int), default=2,
                   help="studies in flight at once on the serving path (default 2; --in-process runs one at a time)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per study (default 900)")
    p.add_argument("--indeterminate-as", choices=("positive", "negative", "exclude"), default="positive",
                   help="how an indeterminate verdict counts per patient (default positive: referred)")
    p.add_argument("--min-lesion-px", type=int, default=MIN_BOX_AREA,
                   help="per-image truth: a slice is positive above this many lesion pixels (default 25)")
    p.add_argument("--cutoffs", type=_cutoffs, default=list(DEFAULT_CUTOFFS), help="cutoffs of the curves")
    p.add_argument("--title", default="", help="a line under the report title")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-study lines")
    return p


def eval_main(argv: list[str]) -> int:
    """``ctscreen eval``; returns the exit status (0 done, 1 goal not met, 2 bad arguments or data)."""
    args = _parser().parse_args(argv)
    if args.timeout <= 0:
        print("ctscreen eval: --timeout must be > 0", file=sys.stderr)
        return 2
    if args.triton_url and (args.url or args.in_process):
        print("ctscreen eval: --triton-url goes with the embedded stack, not with --url or --in-process",
              file=sys.stderr)
        return 2
    if args.repo is not None and not args.repo.is_dir():
        print(f"ctscreen eval: --repo {args.repo}: not a directory", file=sys.stderr)
        return 2
    if args.triton_url:
        from gateway.settings import check_endpoint  # lazily: the aggregator imports no gateway code

        try:
            check_endpoint(args.triton_url)
        except ValueError as exc:
            print(f"ctscreen eval: --triton-url: {exc}", file=sys.stderr)
            return 2
    if args.url and not args.url.lower().startswith(("http://", "https://")):
        print(f"ctscreen eval: --url must start with http:// or https://, got {args.url!r}", file=sys.stderr)
        return 2
    try:  # before the run, not after it: a report folder that cannot be written would lose the run
        args.out.mkdir(parents=True, exist_ok=True)
        if not os.access(args.out, os.W_OK):
            raise PermissionError(f"{args.out} is not writable")
    except OSError as exc:
        print(f"ctscreen eval: --out {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.make_phantom:
            make_phantom_set(args.data, args.make_phantom, n_slices=args.phantom_slices)
        data = args.data
        if _looks_like_nifti_set(data):
            data = args.work / data.resolve().name
            n = write_nifti_set(args.data, data)
            if not args.quiet:
                print(f"NIfTI set: {n} cases written as DICOM studies under {data}", file=sys.stderr)
        cases = discover(data, args.min_lesion_px)
        if args.limit:
            cases = cases[: args.limit]
        t0 = time.monotonic()
        path_name = ""
        with _serving_path(args) as path:
            path_name = path.name
            evaluated = _run_cases(cases, path.runner, workers=1 if args.in_process else args.concurrency,
                                   quiet=args.quiet)
        meta = {
            "title": args.title,
            "command": "ctscreen eval " + " ".join(shlex.quote(a) for a in argv),
            "data": str(args.data),
            "serving_path": path_name,
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "wall_s": round(time.monotonic() - t0, 1),
            "min_lesion_px": args.min_lesion_px,
            "concurrency": 1 if args.in_process else args.concurrency,
        }
        report = write_report(evaluated, args.out, meta=meta, cutoffs=args.cutoffs,
                              indeterminate_as=args.indeterminate_as)
    except EvalError as exc:
        print(f"ctscreen eval: {exc}", file=sys.stderr)
        return 2
    pp = report["per_patient"]["metrics"]
    sens, spec = pp["sensitivity"]["value"], pp["specificity"]["value"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"per patient: sensitivity {fmt(sens)}, specificity {fmt(spec)} "
          f"(goal {'met' if report['goal']['met'] else 'NOT met'}); report in {args.out / 'report.md'}")
    return 0 if report["goal"]["met"] else 1
