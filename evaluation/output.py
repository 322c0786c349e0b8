"""The files of a ``ctscreen eval`` report: ``report.md``, ``report.json``, ``results.jsonl``, ``results.csv``
and PNG plots.

The report itself (Table 3, curves, hard negatives) is built by the pure :func:`aggregator.report.build_report`
and laid out by :func:`aggregator.report.render_markdown`; this module writes it and draws the plots.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.metrics import IndeterminateAs
from aggregator.report import DEFAULT_CUTOFFS, EvalCase, Goal, build_report, render_markdown


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
    """Build the report of ``cases`` and write ``report.md``, ``report.json``, ``results.jsonl``, ``results.csv``
    and plots."""
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
    write_results_csv(report["cases"], out / "results.csv")
    return report


RESULTS_CSV_COLUMNS = ("case_id", "kind", "label", "verdict", "reason", "correct", "n_slices", "run",
                       "positive_up_to", "seconds", "error")
"""``results.csv``: one row per study, for a spreadsheet or a scoring script of one's own (``positive_up_to``:
the highest cutoff of the report's curves at which the study is still positive, empty when it is not and for
a study that failed, which has no verdict: the report's curves count it as ``--indeterminate-as`` says)."""


def write_results_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """The report's cases as CSV (UTF-8, ``,``, a header of :data:`RESULTS_CSV_COLUMNS`)."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=RESULTS_CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in RESULTS_CSV_COLUMNS})


def _csv_value(value: Any) -> Any:
    """A report value as a CSV cell: "" for None, 1/0 for a truth value, seconds to the millisecond."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return int(value)
    return round(value, 3) if isinstance(value, float) else value
