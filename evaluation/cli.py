"""``ctscreen eval``: run a labelled set through the serving path and write a Table-3 report.

::

    ctscreen eval --data DIR [--labels FILE] [--url URL | --in-process] [--out docs/eval/] [--make-phantom N]

Serving paths
-------------
* default: the **embedded stack**, started here (``gateway.cli.run_stack``: embedded Triton with the cpu
  profile plus the gateway under uvicorn on a free port, calling the profile's ``ct_screen_fused``, as
  ``ctscreen serve`` does; ``CTSCREEN_TRITON_MODEL=ct_screen`` screens through the ensemble, which gives
  the same boxes, tested); every study is uploaded with
  ``POST /v1/studies`` and followed on ``/v1/jobs/{id}``, exactly as ``ctscreen screen`` does.
* ``--url URL``: the same HTTP client against a gateway that is already running (a cluster), with the
  credential ``ctscreen screen`` sends (``$CTSCREEN_TOKEN``); a refused credential ends the run.
* ``--in-process``: the **reference**, not the serving path: ingest (:func:`gateway.ingest.load_study`),
  ONNX Runtime on ``model_repository/*/1/model.onnx`` and :func:`ctscreen.postprocess.postprocess_batch`
  in this process (:class:`ctscreen.reference.ReferencePipeline`), then :func:`aggregator.case.decide`.
  For developing the report and for NIfTI sets.

Data
----
``DIR`` holds phantom studies as ``ctscreen phantom`` writes them (one folder per study with its DICOM
files and ``manifest.json``, format ``ctscreen-phantom/1``); ``--make-phantom N`` first writes the
held-out phantom set (seeds from ``training.datasets.PHANTOM_EVAL_SEED0``, kinds cycling like
training) into ``DIR``. Or ``DIR`` is a NIfTI set in the training layout (``ct_scans/`` and
``Infection_Mask/`` or the like): its cases are first written as DICOM studies under ``--work``
(:func:`evaluation.dataset.write_nifti_set`), label 1 when the lesion mask is not empty.

A centre's own studies: ``--labels FILE``, a CSV with a header row naming ``study`` and ``label`` (and
optionally ``kind`` and ``mask``), one row per study; ``study`` is a folder of its DICOM files, a DICOM file,
a zip or a NIfTI volume in HU, relative to ``DIR`` (or absolute); ``label`` is 1/0 (or positive/negative,
yes/no, true/false).
Only the studies listed are screened (what lies beside them under ``DIR`` that no row names is said before the
run and in the report's note; so are DICOM studies of one patient, by Patient ID: the per-patient row counts
studies), and they count per patient only, but for a NIfTI volume with its
lesion mask (``mask``), whose slices count per image too::

    study,label,kind,mask
    P0001,1,covid,
    P0002,0,normal,
    exports/P0003.zip,0,bacterial,
    volumes/P0004.nii.gz,1,covid,masks/P0004.nii.gz

Per-image truth: a slice is positive when its lesion mask covers more than ``--min-lesion-px`` pixels
(default 25, the paper's box size), negative when it covers none; slices in between (a lesion's tip)
are left out of the per-image metrics.

Output (``--out``): ``report.md``, ``report.json``, ``results.jsonl`` (every CaseResult with its truth),
``results.csv`` (one row per study) and PNG plots.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from aggregator.case import CaseRule
from aggregator.report import DEFAULT_CUTOFFS, EvalCase, goal_words
from ctscreen.cliargs import positive
from ctscreen.contracts import MIN_BOX_AREA
from ctscreen.machine import machine_info
from evaluation import EvalError
from evaluation.dataset import (
    LabelledCase,
    discover,
    labelled_cases,
    looks_like_nifti_set,
    make_phantom_set,
    read_labels,
    same_patient,
    same_patient_words,
    unlisted,
    work_folder,
    write_nifti_set,
)
from evaluation.output import write_report
from evaluation.runners import Runner, http_runner, in_process_runner, run_cases

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path("docs/eval")


@dataclass
class _Path:
    runner: Runner
    name: str


@contextmanager
def _serving_path(args: argparse.Namespace) -> Iterator[_Path]:
    """The runner of the chosen path, with its resources (server, client) open meanwhile."""
    if args.in_process:
        try:
            runner = in_process_runner(args.repo)
        except FileNotFoundError as exc:
            raise EvalError(f"--repo: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types for an unreadable model
            raise EvalError(f"--repo: ONNX Runtime cannot load the models: {str(exc).splitlines()[0]}") from exc
        yield _Path(runner, "in-process reference (ORT + postprocess_batch, no server)")
        return
    import httpx

    from gateway.client import CliError, env_token, http_client

    try:
        env_token()  # the credential ctscreen screen sends: one the HTTP header cannot carry ends the run here
    except CliError as exc:
        raise EvalError(str(exc)) from None
    if args.url:
        # the credential ctscreen screen sends ($CTSCREEN_TOKEN): a cluster's gateway refuses anonymous uploads
        with http_client(args.url.rstrip("/"), args.timeout) as client:
            try:
                ready = client.get("/readyz/triton")
            except httpx.HTTPError as exc:
                raise EvalError(f"--url {args.url}: cannot connect ({exc})") from exc
            if ready.status_code != 200:
                raise EvalError(f"--url {args.url}: gateway cannot screen now (GET /readyz/triton -> {ready.status_code})")
            yield _Path(http_runner(client, args.timeout), f"gateway at {args.url}")
        return
    from gateway.cli import run_stack

    with ExitStack() as resources:
        try:
            # the audit trail goes beside the report, not between the progress lines; this run's only (the
            # gateway appends to the file, and a report describes one run)
            (args.out / "audit.jsonl").unlink(missing_ok=True)
            audit = {"audit_log_file": args.out / "audit.jsonl"}
            stack = resources.enter_context(run_stack(port=0, repo=args.repo, triton_url=args.triton_url,
                                                      settings_overrides=audit))
        except (CliError, RuntimeError, OSError) as exc:
            raise EvalError(f"cannot start the embedded stack: {exc}") from exc
        client = resources.enter_context(http_client(stack.url, args.timeout))
        triton = f"Triton at {args.triton_url}" if args.triton_url else "embedded Triton, cpu profile"
        yield _Path(http_runner(client, args.timeout), f"embedded stack (ctscreen serve: {triton} + gateway, HTTP API)")


def _cutoffs(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from exc
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"cutoffs must lie in [0, 1]: {text!r}")
    return values


def _names(text: str) -> list[str]:
    """A comma-separated list of names (``--lesion-segments``)."""
    return [name.strip() for name in text.split(",") if name.strip()]


def _labels_note(cases: list[LabelledCase], evaluated: list[EvalCase], masked: set[str]) -> str:
    """The report's line on a labels file's truth: which studies counted per image (their mask matched screened
    slices), which masks matched none, and the DICOM SEG segments counted as lesions."""
    if not masked:
        return "labelled per study (--labels): no per-image truth, so the per-image row counts nothing"
    matched = sum(1 for c in evaluated if c.case_id in masked and c.slice_truth and c.result is not None)
    note = f"labelled per study (--labels); per-image truth from the lesion masks of {matched} of {len(evaluated)} studies"
    unmatched = sum(1 for c in evaluated if c.case_id in masked and not c.slice_truth and c.result is not None)
    if unmatched:
        note += f" ({unmatched} mask(s) matched none of the screened slices: a segmentation of another series?)"
    segments = sorted({s for c in cases for s in c.lesion_segments})
    if segments:
        note += "; DICOM SEG segments counted as lesions: " + ", ".join(repr(s) for s in segments)
    return note


def _unlisted_words(names: list[str], shown: int) -> str:
    """What lies under --data and no row of the labels file names (:func:`evaluation.dataset.unlisted`), the first
    ``shown`` of them by name.

    >>> _unlisted_words(["P7", "P8.zip", "P9"], 2)
    '3 studies under --data that no row of --labels names, not screened: P7, P8.zip and 1 more'
    """
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    what = "1 study" if len(names) == 1 else f"{len(names)} studies"
    return f"{what} under --data that no row of --labels names, not screened: {', '.join(names[:shown])}{more}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ctscreen eval",
        description="Run a labelled set through the serving path and write a Table-3 report "
                    "(Markdown, JSON, PNG plots).",
    )
    p.add_argument("--data", type=Path, required=True,
                   help="folder of labelled studies (phantom manifest.json), or of the studies --labels names")
    p.add_argument("--labels", type=Path, metavar="FILE",
                   help="CSV naming each study (a folder, DICOM file, zip or NIfTI volume, relative to --data) and its "
                        "label: header study,label[,kind][,mask]; label 1/0 (positive/negative); mask: the study's "
                        "lesion mask, per-image truth (a NIfTI volume's NIfTI mask, a DICOM study's DICOM SEG)")
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
                   help="where NIfTI volumes are written as DICOM studies (default out/eval-work)")
    p.add_argument("--phantom-slices", type=positive(int), default=None, help="slices per phantom study")
    p.add_argument("--limit", type=positive(int), help="evaluate the first N studies only")
    p.add_argument("--concurrency", type=positive(int), default=2,
                   help="studies in flight at once on the serving path (default 2; --in-process runs one at a time)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per study (default 900)")
    p.add_argument("--indeterminate-as", choices=("positive", "negative", "exclude"), default="positive",
                   help="how an indeterminate verdict counts per patient (default positive: referred)")
    p.add_argument("--lesion-segments", type=_names, default=[], metavar="NAMES",
                   help="--labels with DICOM SEG masks: the lesion segments' labels or property types, comma-separated "
                        "(default: every segment that is not anatomy by its category or type); with NIfTI masks of "
                        "several labels: the lesion labels' numbers (e.g. 3)")
    p.add_argument("--min-lesion-px", type=int, default=MIN_BOX_AREA,
                   help="per-image truth: a slice is positive above this many lesion pixels (default 25)")
    p.add_argument("--cutoffs", type=_cutoffs, default=list(DEFAULT_CUTOFFS), help="cutoffs of the curves")
    p.add_argument("--title", default="", help="a line under the report title")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-study lines")
    return p


def eval_main(argv: list[str]) -> int:
    """``ctscreen eval``; returns the exit status (0 goal met, 1 goal not met or a study failed, 2 bad arguments
    or data)."""
    args = _parser().parse_args(argv)
    if not args.timeout > 0:  # nan too: every comparison with it is false
        print("ctscreen eval: --timeout must be > 0", file=sys.stderr)
        return 2
    if args.min_lesion_px < 0:  # every slice, lesion-free ones too, was a positive of the per-image truth
        print(f"ctscreen eval: --min-lesion-px must be >= 0 (lesion pixels), got {args.min_lesion_px}", file=sys.stderr)
        return 2
    if args.triton_url and (args.url or args.in_process):
        print("ctscreen eval: --triton-url goes with the embedded stack, not with --url or --in-process",
              file=sys.stderr)
        return 2
    if args.repo is not None and not args.repo.is_dir():
        print(f"ctscreen eval: --repo {args.repo}: not a directory", file=sys.stderr)
        return 2
    if args.triton_url:
        from gateway.settings import check_endpoint

        try:
            check_endpoint(args.triton_url)
        except ValueError as exc:
            print(f"ctscreen eval: --triton-url: {exc}", file=sys.stderr)
            return 2
    below = [c for c in args.cutoffs if c < CaseRule().cutoff]
    if below:  # the curves start at the served cutoff (a box under it was never kept): say so, not drop them
        print(f"ctscreen eval: --cutoffs below the served {CaseRule().cutoff:.2f} are not measured (the served "
              f"results hold no box under it): {', '.join(f'{c:g}' for c in below)} left out", file=sys.stderr)
    if args.labels is not None and args.make_phantom:
        print("ctscreen eval: --labels names your own studies; --make-phantom writes phantom studies with their "
              "own truth: give one or the other", file=sys.stderr)
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
    stamp = machine_info()  # before the run writes anything (its audit trail lands in --out as it goes)
    try:
        if args.make_phantom:
            make_phantom_set(args.data, args.make_phantom, n_slices=args.phantom_slices)
        data = args.data
        if args.labels is not None:
            if not data.is_dir():
                raise EvalError(f"--data {data}: not a directory")
            rows = read_labels(args.labels, data)
            left_out = unlisted(rows, data, skip=(args.labels, args.out, args.work))
            rows = rows[: args.limit] if args.limit else rows
            cases = labelled_cases(rows, work_folder(args.work, data, "labels"), quiet=args.quiet,
                                   min_px=args.min_lesion_px, named_segments=args.lesion_segments)
            if left_out:  # said before the run: a study forgotten in the file is not measured
                print(f"ctscreen eval: {_unlisted_words(left_out, 5)}", file=sys.stderr)
            patients = same_patient(rows, cases)  # counted apart, as studies: said, not refused
            if patients:
                print(f"ctscreen eval: warning: {same_patient_words(patients, len(cases))}", file=sys.stderr)
            masked = {row.study for row in rows if row.mask is not None}
        else:
            written = None
            if looks_like_nifti_set(data):
                data = work_folder(args.work, data, "set")
                written = write_nifti_set(args.data, data)
                if not args.quiet:
                    print(f"NIfTI set: {len(written)} cases written as DICOM studies under {data}", file=sys.stderr)
            cases = discover(data, args.min_lesion_px)
            if written is not None:  # this set's cases only: never a study left there by an earlier set
                ids = set(written)
                cases = [c for c in cases if c.case_id in ids]
            note = ""
            left_out, patients = [], []
        if args.limit:
            cases = cases[: args.limit]
        t0 = time.monotonic()
        path_name = ""
        with _serving_path(args) as path:
            path_name = path.name
            evaluated = run_cases(cases, path.runner, workers=1 if args.in_process else args.concurrency,
                                  quiet=args.quiet)
        if args.labels is not None:  # after the run: a mask counts once it matched screened slices
            note = _labels_note(cases, evaluated, masked)
            if left_out:
                note += f"; {_unlisted_words(left_out, 20)}"
            if patients:
                note += f"; {same_patient_words(patients, len(cases))}"
        meta = {
            "title": args.title,
            "command": "ctscreen eval " + " ".join(shlex.quote(a) for a in argv),
            "data": str(args.data),
            "labels": str(args.labels) if args.labels is not None else "",
            "unlisted": left_out,
            "same_patient": patients,  # the labels file's lines of the studies of one patient, a list per patient
            "note": note,
            "serving_path": path_name,
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "wall_s": round(time.monotonic() - t0, 1),
            "min_lesion_px": args.min_lesion_px,
            "concurrency": 1 if args.in_process else args.concurrency,
            "machine": stamp,  # the figure's stamp: commit, CPU, load, the shipped models' sha256
        }
        report = write_report(evaluated, args.out, meta=meta, cutoffs=args.cutoffs,
                              indeterminate_as=args.indeterminate_as)
    except EvalError as exc:
        print(f"ctscreen eval: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # --work or --data not writable or readable, a disk full while converting
        where = f": {exc.filename}" if exc.filename else ""
        print(f"ctscreen eval: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    pp = report["per_patient"]["metrics"]
    sens, spec = pp["sensitivity"]["value"], pp["specificity"]["value"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    counted = "left out" if args.indeterminate_as == "exclude" else f"counted {args.indeterminate_as}"
    failed = (f"; {report['n_failed']} of {report['n_cases']} studies failed ({counted}; see the report's cases)"
              if report["n_failed"] else "")
    print(f"per patient: sensitivity {fmt(sens)}, specificity {fmt(spec)} ({goal_words(report['goal'])}){failed}; "
          f"report in {args.out / 'report.md'}")
    # a study that failed has no verdict: the run did not measure what it was asked to, whatever the goal says
    return 0 if report["goal"]["met"] and not report["n_failed"] else 1
