"""README.md's performance table, written from the stamped result files (``python -m benchmarks figures``).

The table sits between two markers in README.md's "Figures" section; every row names its command and
its result file, and carries the stamp of that file (date, 1-min load average, commit). A figure whose
result file is missing reads "not measured". The accuracy table above it is written by hand from the
evaluation reports, which stamp their own models' sha256.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT

README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
BEGIN = "<!-- BEGIN PERFORMANCE FIGURES (python -m benchmarks figures) -->"
END = "<!-- END PERFORMANCE FIGURES -->"
FIGURES = "`python -m benchmarks figures --only {}`"


def _load(rel: str) -> dict[str, Any] | None:
    try:
        return json.loads((RESULTS / rel).read_text())
    except (OSError, ValueError):
        return None


def _stamp(doc: dict[str, Any] | None, models: bool) -> str:
    m = (doc or {}).get("machine") or {}
    if not m:
        return "not stamped"
    day = str(m.get("time_utc", "?"))[:10]
    load = m.get("loadavg_1m")
    text = f"{day}, load {load:.1f}, `{m.get('commit', '?')}`" if isinstance(load, int | float) else day
    if models:
        from benchmarks.stamps import shipped_models

        want = {k: v["sha256"] for k, v in shipped_models().items()}
        got = {k: v.get("sha256") for k, v in (m.get("models") or {}).items()}
        text += ("" if got == want else ", **models not stamped: stale**" if not got else ", **other models: stale**")
    return text


def _n(v: Any, fmt: str = "{:.2f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def _row(what: str, rel: str, figure: Callable[[dict[str, Any]], str], goal: str, step: str,
         report: str | None = None, models: bool = True) -> str:
    doc = _load(rel)
    try:
        text = figure(doc) if doc else "not measured"
    except (KeyError, TypeError, IndexError, StopIteration, ZeroDivisionError):
        text = "not measured (the result file lacks it)"
    link = report or f"benchmarks/results/{rel}"
    return f"| {what} | {text} | {goal} | {FIGURES.format(step)} | [{Path(link).name}]({link}) | {_stamp(doc, models)} |"


def _models(doc: dict[str, Any]) -> str:
    rows = {(r["model"].split()[1], r["batch"]): r["ms_per_slice_median"] for r in doc["rows"] if "shipped" in r["model"]}
    return (f"valid_area {rows['valid_area', 1]:.1f} ms, lesion {rows['lesion', 1]:.1f} ms per slice (batch 4: "
            f"{rows.get(('valid_area', 4), float('nan')):.1f} / {rows.get(('lesion', 4), float('nan')):.1f} ms)")


def _goal(name: str) -> Callable[[dict[str, Any]], str]:
    def get(doc: dict[str, Any]) -> str:
        g = next(g for g in doc["goals"] if g["name"].startswith(name))
        if g["measured"] is None:
            return f"not measured: {g.get('note') or 'skipped'}"
        unit = " " + g["unit"] if g["unit"] else ""
        if g["unit"]:
            return f"{g['measured']:.2f}{unit}"
        return f"{g['measured']:.3f}" + (" (missed)" if g.get("met") is False else "")
    return get


def _study(doc: dict[str, Any]) -> str:
    f = doc["figures"]
    return (f"{_n(f['study_300_s'], '{:.1f}')} s (in process {_n(f.get('study_300_in_process_s'), '{:.1f}')} s; "
            "paper: 41.34 s per patient on a GPU)")


def _ens(doc: dict[str, Any]) -> str:
    best = doc["figures"].get("ort_best_setting")
    return _goal("Triton ensemble")(doc) + (f" (in process: {best})" if best else "")


def _store(key: str) -> Callable[[dict[str, Any]], str]:
    def get(doc: dict[str, Any]) -> str:
        d = doc[key]
        if key == "claim_complete_postgresql":
            return f"median {d['median_ms']:.1f} ms, p95 {d['p95_ms']:.1f} ms"
        if key == "store_work_300_slice_study":
            return f"{d['store_total_s']:.2f} s = {100 * d['fraction']:.1f} % of the {d['e2e_s']:.1f} s end to end"
        return f"{d['rss_before_mb']:.1f} -> {d['rss_after_mb']:.1f} MB ({d['rss_growth_mb']:+.1f} MB)"
    return get


def _scaling(doc: dict[str, Any]) -> str:
    r = {(x["policy"], x["slice_cost_s"]): x for x in doc["results"]}
    ours, sample = r["ctscreen-backlog", 0.005], r["sample-queue-time", 0.005]
    return (f"backlog-seconds policy: {ours['gpu_hours']:.0f} GPU-h, {ours['interrupted_studies']} studies cut, p95 "
            f"{ours['latency_p95_s']} s; sample chart's queue-time HPA: {sample['gpu_hours']:.0f} GPU-h")


def table() -> str:
    """The performance table (Markdown) from the latest stamped results."""
    ratios = "ratios-latest.json"
    rows = [
        "| what | figure | goal | how to repeat | result | stamp (date, load, commit) |",
        "|---|---|---|---|---|---|",
        _row("lite models, ONNX Runtime 2 threads", "models-latest.json", _models, "<= 15 / <= 60 ms", "models",
             "docs/models/README.md"),
        _row("300-slice study, cpu profile, end to end", ratios, _study, "<= 30 s", "stack",
             "benchmarks/results/report.md"),
        _row("same study: gateway end to end / in process", ratios, _goal("300-slice study: gateway"), "<= 1.15",
             "stack", "benchmarks/results/report.md"),
        _row("Triton ensemble / in-process ONNX Runtime (best of the batch x threads sweep)", ratios, _ens, ">= 0.95",
             "stack", "benchmarks/results/report.md"),
        _row("gateway end to end / in-process ONNX Runtime (best setting)", ratios, _goal("gateway end-to-end"),
             ">= 0.90", "stack", "benchmarks/results/report.md"),
        _row("not a goal: the same ratio in the deployment's shape, Triton on one core, the gateway and its client "
             "on the other, in process on Triton's core alone", "split-latest.json",
             lambda d: f"{_n(d['figures']['split_over_in_process'], '{:.2f}')} "
                       f"({d['figures']['gateway_slices_per_s']} / {d['figures']['in_process_slices_per_s']} slices/s)",
             "none (the goal is the row above)", "split", "benchmarks/results/report.md"),
        _row("ctscreen / MONAI Deploy App SDK client (`TritonRemoteModel`), studies per hour", ratios,
             _goal("ctscreen / MONAI Deploy"), ">= 3", "stack", "benchmarks/results/report.md"),
        _row("ctscreen / plain HTTP-JSON client (one slice per request), studies per hour", ratios,
             _goal("ctscreen / plain"), ">= 3", "stack", "benchmarks/results/report.md"),
        _row("state store (PostgreSQL 15): claim + complete round trip", "store-latest.json",
             _store("claim_complete_postgresql"), "<= 10 ms", "store", models=False),
        _row("state store work of a 300-slice upload (300 fsynced blobs, transactions, heartbeats)",
             "store-latest.json", _store("store_work_300_slice_study"), "<= 5 %", "store", models=False),
        _row("gateway RSS with 1,000 queued STOW studies (no Triton)", "store-latest.json",
             _store("memory_queued_studies"), "flat", "store", models=False),
        _row("phantom: 300-slice 512 x 512 study", "phantom-latest.json",
             lambda d: f"{d['summary']['make_best_s']:.1f} s wall ({d['summary']['make_cpu_best_s']:.1f} s CPU), "
                       f"{d['summary']['peak_rss_mb']} MB peak", "<= 15 s, < 2 GB", "phantom", "docs/phantom/README.md",
             models=False),
        _row("web worklist, 1,000 studies, first paint", "web-latest.json",
             lambda d: f"median {d['median_s']:.2f} s over {len(d['loads_s'])} loads", "<= 1 s", "web", models=False),
        _row("scaling simulation, 200 hospitals for a week (5 ms per slice)", "scaling/scaling-latest.json", _scaling,
             "-", "scaling", "benchmarks/results/scaling/scaling.md", models=False),
    ]
    models = (_load(ratios) or {}).get("machine", {}).get("models") or {}
    sha = ", ".join(f"{k} {v['version']} `{v['sha256'][:12]}`" for k, v in models.items()) or "not stamped"
    return "\n".join(rows) + (f"\n\nModels behind the model-dependent rows (stamped sha256): {sha}. "
                              "`make bench` regenerates every row; `tests/test_figure_stamps.py` fails while a "
                              "stamp names other models than those in `model_repository`.")


def update(readme: Path = README) -> bool:
    """Rewrite the table between the markers of ``readme``; False when the markers are not there."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        return False
    new = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: f"{BEGIN}\n{table()}\n{END}", text, flags=re.S)
    readme.write_text(new)
    return True
