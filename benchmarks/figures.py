"""Every published figure from one command: ``make bench`` = ``python -m benchmarks figures``.

Each step is a command of its own (a failure in one does not lose the others; its output goes to
``benchmarks/results/tmp/figures/<step>.log``). Each writes stamped results: the commit, the shipped
models' sha256, the machine, its load average and the date (``benchmarks.common.machine_info``); a
step whose program prints JSON without a stamp (``web``) or writes its own files without one
(``scaling``) is stamped here, right after it ran. Last, ``README.md``'s performance table and
``benchmarks/README.md``'s latest figures are written from those files, and every stamp is checked
against the shipped models (:mod:`benchmarks.stamps`; ``tests/test_figure_stamps.py`` does the same).

    python -m benchmarks figures [--only a,b | --skip a,b] [--list] [--dry-run]

Groups: ``performance`` (about 61 minutes on a quiet 2-core machine) and ``accuracy`` (about 25
minutes: the evaluation reports README cites), 85 in all (:func:`plan_minutes`; ``--list`` prints them, and
``tests/test_figure_stamps.py`` holds the READMEs and the Makefile to them). ``--skip accuracy`` keeps the
performance figures only.
Run it on a quiet machine: the stamp records the load average, and figures under load are not published.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, TMP_DIR, machine_info, write_json

PY = sys.executable
RESULTS = "benchmarks/results"


def _study_300_seconds() -> list[str]:
    """``--e2e-s`` for the store benchmark: the 300-slice study the ratios run just measured."""
    try:
        fig = json.loads((ROOT / RESULTS / "ratios-latest.json").read_text())["figures"]
        return ["--e2e-s", str(fig["study_300_s"])] if fig.get("study_300_s") else []
    except (OSError, ValueError, KeyError, TypeError):
        return []


@dataclass(frozen=True)
class Step:
    """One command of the plan and the stamped files it writes (paths relative to the checkout)."""

    name: str
    argv: tuple[str, ...]
    outputs: tuple[str, ...]
    models: bool  # its figures depend on the shipped models (their sha256 must match)
    minutes: float  # expected on a quiet 2-core machine
    group: str = "performance"
    capture: str | None = None  # the program prints a JSON document: write it here, stamped
    stamp_after: bool = False  # the program writes JSON without a stamp: add one
    extra: Callable[[], list[str]] | None = None  # arguments known only once earlier steps ran

    def command(self) -> list[str]:
        return [PY, *self.argv, *(self.extra() if self.extra else [])]


STACK_ARGS = ("--concurrency", "1,2", "--max-studies", "4", "--sizes", "choice:40,80", "--batches", "1,4",
              "--pa-concurrency", "1:2", "--request-count", "8", "--study-slices", "60", "--studies", "4",
              "--big-study", "300")

PLAN: tuple[Step, ...] = (
    Step("models", ("-m", "benchmarks.bench_models", "--reps", "10"), (f"{RESULTS}/models-latest.json",), True, 1.5),
    Step("phantom", ("-m", "benchmarks.bench_phantom", "--repeat", "3"), (f"{RESULTS}/phantom-latest.json",), False, 1),
    # perf_analyzer, closed-loop load, the in-process sweep, ensemble, gateway, both peers, the 300-slice
    # study, then the report (benchmarks/README.md's latest figures)
    Step("stack", ("-m", "benchmarks", "all", *STACK_ARGS),
         (f"{RESULTS}/perf-latest.json", f"{RESULTS}/ratios-latest.json"), True, 25),
    # the CPU of one 300-slice study by process, served against in process (the best setting of "stack")
    Step("cpu", ("-m", "benchmarks.cpu_split", "--slices", "300"), (f"{RESULTS}/cpu-latest.json",), True, 3),
    # the cores over time during the gateway ratio's load, and the gateway's CPU a study and a slice
    Step("timeline", ("-m", "benchmarks.cpu_timeline"), (f"{RESULTS}/timeline-latest.json",), True, 2),
    # the gateway ratio's load with Triton on one core and the gateway and client on the other, against in process
    # on Triton's core alone: the deployment's shape, reported beside the goals (not one of them)
    Step("split", ("-m", "benchmarks.split_cores"), (f"{RESULTS}/split-latest.json",), True, 3),
    # screening ahead off (A) against on (B): paired rounds of one 300-slice study on one Triton
    Step("ab-ahead", ("-m", "benchmarks.ab_gateway", "--a", "CTSCREEN_SCREEN_AHEAD=false", "--rounds", "4"),
         (f"{RESULTS}/ab-latest.json",), True, 3),
    # glibc's malloc defaults (A) against the shipped Triton environment (B): paired server starts
    Step("ab-triton", ("-m", "benchmarks.ab_triton", "--rounds", "4"), (f"{RESULTS}/ab-triton-latest.json",), True, 3.5),
    # what one Triton call costs the gateway's process: its unary call against a stream and blocking calls in threads
    Step("ab-grpc", ("-m", "benchmarks.ab_grpc", "--rounds", "4"), (f"{RESULTS}/ab-grpc-latest.json",), True, 3),
    Step("poisson", ("-m", "benchmarks", "load", "--append", "--mode", "poisson", "--rates", "0.02", "--duration",
                     "240", "--max-studies", "5", "--sizes", "lognormal:60,0.4,20,120"),
         (f"{RESULTS}/load-latest.json",), True, 6),
    Step("store", ("-m", "benchmarks.bench_store", "--jobs", "200", "--queued", "1000", "--write"),
         (f"{RESULTS}/store-latest.json",), False, 3, extra=_study_300_seconds),
    Step("admission", ("-m", "benchmarks.bench_admission",), (f"{RESULTS}/admission-latest.json",), False, 2),
    Step("web", ("-m", "benchmarks.web_worklist", "--studies", "1000", "--loads", "9"),
         (f"{RESULTS}/web-latest.json",), False, 1, capture=f"{RESULTS}/web-latest.json"),
    Step("scaling", ("-m", "benchmarks", "scaling"), (f"{RESULTS}/scaling/scaling-latest.json",), False, 1.5,
         stamp_after=True),
    Step("scaling-gateways", ("-m", "benchmarks", "scaling", "--gateways", "1,3,5"),
         (f"{RESULTS}/scaling/gateways/gateways-latest.json",), False, 0.5, stamp_after=True),
    Step("scaling-backlog-10s", ("-m", "benchmarks", "scaling", "--backlog-target-s", "10", "--out",
                                 f"{RESULTS}/scaling/backlog-target-10s"),
         (f"{RESULTS}/scaling/backlog-target-10s/scaling-latest.json",), False, 1.5, stamp_after=True),
    Step("report", ("-m", "benchmarks", "report"), (f"{RESULTS}/report.json",), True, 0.2),
    # the accuracy reports README's figures table cites (each stamps its own models' sha256)
    Step("eval", ("-m", "ctscreen.cli", "eval", "--data", "out/eval-phantom", "--make-phantom", "48",
                  "--phantom-slices", "60", "--concurrency", "2", "--out", "docs/eval/"),
         ("docs/eval/report.json",), True, 11, group="accuracy"),
    Step("quality", ("-m", "training.evaluate", "--studies", "42", "--seed", "900000", "--slices", "64", "--out",
                     "docs/models/"), ("docs/models/quality.json",), True, 6, group="accuracy"),
    Step("real", ("-m", "training.evaluate_real", "--out", "docs/models/"), ("docs/models/real.json",), True, 4,
         group="accuracy"),
    # the model cards quote the real-CT report (tests/test_figure_stamps.py checks they quote this one)
    *(Step(f"card-{task}", ("-m", "ctscreen.cli", "export", task, "--card-only", "--metrics", "docs/models/real.json"),
           (), True, 0.1, group="accuracy") for task in ("valid-area", "lesion")),
    Step("fov", ("-m", "benchmarks.fov"), (f"{RESULTS}/fov-latest.json",), True, 0.5, group="accuracy"),
    Step("noise", ("-m", "benchmarks.noise"), (f"{RESULTS}/noise-latest.json",), True, 3, group="accuracy"),
)


def plan_minutes(steps: Sequence[Step] = PLAN, group: str | None = None) -> int:
    """The expected minutes of ``steps`` (of one group, or all), rounded half up: what the prose states."""
    return math.floor(sum(s.minutes for s in steps if group in (None, s.group)) + 0.5)


def select(plan: Sequence[Step], only: Sequence[str] = (), skip: Sequence[str] = ()) -> list[Step]:
    """The steps named by ``only`` (steps or groups; all when empty), less those named by ``skip``."""
    known = {s.name for s in plan} | {s.group for s in plan}
    bad = sorted(set(only) - known) + sorted(set(skip) - known)
    if bad:
        raise ValueError(f"unknown step(s) or group(s) {', '.join(bad)}; choose from {', '.join(sorted(known))}")
    return [s for s in plan if (not only or s.name in only or s.group in only)
            and s.name not in skip and s.group not in skip]


def stamp_file(path: Path, stamp: dict[str, Any] | None = None) -> None:
    """Add ``"machine"`` (the stamp) to the JSON document at ``path`` if it has none."""
    doc = json.loads(path.read_text())
    if isinstance(doc, dict) and "machine" not in doc:
        doc["machine"] = stamp or machine_info()
        write_json(path, doc)


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("the program printed no JSON document")


def run_step(step: Step, *, logs: Path, dry_run: bool = False) -> dict[str, Any]:
    """Run one step; ``{"name", "rc", "seconds", "log"}``."""
    cmd = step.command()
    print(f"+ {' '.join(cmd[1:]) if cmd[0] == PY else ' '.join(cmd)}", flush=True)
    if dry_run:
        return {"name": step.name, "rc": 0, "seconds": 0.0, "log": None}
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{step.name}.log"
    t0 = time.monotonic()
    stamp = machine_info()  # the load average before the step, as the benchmarks record it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    with log.open("w") as fh:
        r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        fh.write(r.stdout)
    rc = r.returncode
    if rc == 0 and step.capture:
        try:
            write_json(ROOT / step.capture, {**_last_json(r.stdout), "command": " ".join(step.argv), "machine": stamp})
        except ValueError as exc:
            print(f"  {step.name}: {exc}", file=sys.stderr)
            rc = 1
    if rc == 0 and step.stamp_after:
        for out in step.outputs:
            stamp_file(ROOT / out, stamp)
    return {"name": step.name, "rc": rc, "seconds": round(time.monotonic() - t0, 1), "log": str(log)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ctscreen bench figures", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="comma list of steps or groups to run (default: all)")
    p.add_argument("--skip", default="", help="comma list of steps or groups to leave out")
    p.add_argument("--list", action="store_true", help="print the plan with the expected minutes, run nothing")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    split = lambda text: [x.strip() for x in text.split(",") if x.strip()]  # noqa: E731
    try:
        steps = select(PLAN, split(args.only), split(args.skip))
    except ValueError as exc:
        p.error(str(exc))
    if args.list:
        for s in steps:
            print(f"{s.name:<20} {s.group:<12} ~{s.minutes:>4g} min  -> {', '.join(s.outputs) or '(no stamped file)'}")
        groups = ", ".join(f"{g} ~{plan_minutes(steps, g)}" for g in dict.fromkeys(s.group for s in steps))
        print(f"total ~{plan_minutes(steps)} min on a quiet 2-core machine ({groups})")
        return 0
    load = os.getloadavg()[0]
    if load > 0.5 and not args.dry_run:
        print(f"figures: the 1-min load average is {load:.2f}: the stamps will say so; publish figures from a "
              "quiet machine", file=sys.stderr)
    results = [run_step(s, logs=TMP_DIR / "figures", dry_run=args.dry_run) for s in steps]
    if args.dry_run:
        return 0
    from benchmarks import readme_figures, stamps

    readme_figures.update()
    print("\nstep                 rc   minutes")
    for r in results:
        print(f"{r['name']:<20} {r['rc']:<4} {r['seconds'] / 60:6.1f}" + (f"  (log {r['log']})" if r["rc"] else ""))
    shipped = stamps.shipped_models()
    issues = [msg for s in PLAN for out in s.outputs for msg in stamps.problems(ROOT / out, models=s.models,
                                                                                  shipped=shipped)]
    for msg in issues:
        print(f"stamp: {msg}", file=sys.stderr)
    return 1 if issues or any(r["rc"] for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
