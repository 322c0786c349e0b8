"""The evaluation report: from labelled case results to a Table-3-like summary (pure, no I/O).

:func:`build_report` turns :class:`EvalCase` records (truth plus the :class:`~aggregator.schema.CaseResult`
the serving path returned) into a plain-data report; :func:`render_markdown` lays it out like the
paper's Table 3. Writing files and drawing plots is the job of :mod:`evaluation.output`.

Definitions
-----------
* **Per patient**: truth is the case label (1 = COVID-19); the prediction is the verdict, an
  indeterminate verdict counting as ``indeterminate_as`` (default positive: referred to a reader).
* **Per image**: truth is given per slice (SOP Instance UID) by the caller; the prediction is "at least
  one lesion box survived the rule's filters on this slice". Slices without truth are not counted, nor those of
  a failed case (no slice screened): ``per_image_missing`` says how many cases and truth slices that leaves out.
* **Curves over the cutoff**: every result is re-decided (:func:`aggregator.case.replay`) with the
  rule's ``cutoff`` set to each value; the boxes Triton returned were already cut at the served cutoff,
  so the curve is exact for cutoffs at or above it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from aggregator.case import CaseRule, replay
from aggregator.metrics import (
    METRICS,
    Confusion,
    IndeterminateAs,
    auc,
    called_positive,
    false_positives_by_class,
    sweep,
    table3,
)
from aggregator.schema import SCHEMA_VERSION, CaseResult

__all__ = ["DEFAULT_CUTOFFS", "DEFAULT_VARIANTS", "EvalCase", "Goal", "build_report", "goal_words", "render_markdown"]

DEFAULT_CUTOFFS: tuple[float, ...] = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
"""Cutoffs of the curves: the paper's 0.50 up to 0.95 (Triton already cut at 0.50)."""


DEFAULT_VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("as served", {}),
    ("quadrants split at the image centre", {"quadrant_split": "image"}),
    ("spanning box counts at its centre only", {"spanning": "centre"}),
    ("run of 2 slices", {"run_slices": 2}),
    ("run of 4 slices", {"run_slices": 4}),
    ("run of 3 slices and >= 10 mm", {"run_mm": 10.0}),
    ("gap tolerance 2.5", {"gap_tolerance": 2.5}),
)
"""Rule variants the report re-decides every result under (exact: they only change how the kept boxes
are combined), to show what each documented choice of ``docs/case-rule.md`` does on the set."""


@dataclass(frozen=True)
class Goal:
    """Per-patient acceptance goal: point estimates at least these."""

    sensitivity: float = 0.95
    specificity: float = 0.90


@dataclass(frozen=True)
class EvalCase:
    """One labelled case and what the serving path returned for it.

    Parameters
    ----------
    case_id : str
        Name of the case in the data set.
    kind : str
        Class of the case (phantom kind: ``covid``, ``normal``, ``nodule``, ...).
    label : bool
        Truth per patient: True for COVID-19.
    result : CaseResult or None
        The result, or None when the serving path failed on the case (``error`` says why).
    slice_truth : Mapping[str, bool]
        Truth per image, by SOP Instance UID; for a failed case, of the slices its truth knows (none counted per
        image: the report says how many the per-image row lacks).
    seconds : float or None
        Wall-clock time from upload to result, as the client saw it.
    error : str or None
        Why there is no result.
    """

    case_id: str
    kind: str
    label: bool
    result: CaseResult | None
    slice_truth: Mapping[str, bool] = field(default_factory=dict)
    seconds: float | None = None
    error: str | None = None


def _per_image(cases: Iterable[EvalCase], cutoff: float | None = None) -> Confusion:
    truth, predicted = [], []
    for case in cases:
        if case.result is None:
            continue
        for f in case.result.slices:
            if f.sop_instance_uid not in case.slice_truth:
                continue
            truth.append(bool(case.slice_truth[f.sop_instance_uid]))
            # float32, as decide() compares: a score stored from float32 must pass the same cutoffs
            predicted.append(any(cutoff is None or np.float32(b.score) >= np.float32(cutoff) for b in f.boxes))
    return Confusion.from_labels(truth, predicted)


def _per_image_missing(cases: Iterable[EvalCase]) -> dict[str, int]:
    """What the per-image row lacks: the failed studies (no slice screened) and, where their truth is known, their
    truth slices (positive and negative)."""
    failed = [c for c in cases if c.result is None]
    truths = [v for c in failed for v in c.slice_truth.values()]
    return {"studies": len(failed), "studies_with_truth": sum(bool(c.slice_truth) for c in failed),
            "slices": len(truths), "positive_slices": sum(map(bool, truths))}


def _per_image_missing_words(missing: Mapping[str, int]) -> str:
    """The report's sentence on :func:`_per_image_missing` ("" when nothing is missing).

    >>> _per_image_missing_words({"studies": 2, "studies_with_truth": 1, "slices": 60, "positive_slices": 9})
    '**Per image leaves out 2 failed studies** (no slice screened): 60 truth slices of 1 of them (9 positive, 51 negative); the other 1 has no per-image truth.'
    """
    n = missing.get("studies", 0)
    if not n:
        return ""
    words = f"**Per image leaves out {n} failed stud{'y' if n == 1 else 'ies'}** (no slice screened)"
    known, slices, pos = missing["studies_with_truth"], missing["slices"], missing["positive_slices"]
    if not known:
        return words + f": {'its' if n == 1 else 'their'} per-image truth is not known."
    whose = "it" if n == 1 else f"all {n}" if known == n else f"{known} of them"
    words += f": {slices} truth slices of {whose} ({pos} positive, {slices - pos} negative)"
    if known < n:
        words += f"; the other {n - known} {'has' if n - known == 1 else 'have'} no per-image truth"
    return words + "."


def _verdicts(cases: Sequence[EvalCase], rule: CaseRule | None) -> list[str]:
    out = []
    for case in cases:
        if case.result is None:
            out.append("indeterminate")
        elif rule is None:
            out.append(case.result.verdict)
        else:
            out.append(replay(case.result, rule).verdict)
    return out


def _fp_images_by_kind(cases: Iterable[EvalCase]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for case in cases:
        if case.result is None or case.label:
            continue
        row = out.setdefault(case.kind, {"slices": 0, "fp_slices": 0})
        for f in case.result.slices:
            if f.sop_instance_uid in case.slice_truth and not case.slice_truth[f.sop_instance_uid]:
                row["slices"] += 1
                row["fp_slices"] += bool(f.boxes)
    return dict(sorted(out.items()))


def _median(values: Sequence[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2.0


def build_report(
    cases: Sequence[EvalCase],
    *,
    cutoffs: Iterable[float] = DEFAULT_CUTOFFS,
    indeterminate_as: IndeterminateAs = "positive",
    goal: Goal | None = None,
    meta: Mapping[str, Any] | None = None,
    variants: Sequence[tuple[str, Mapping[str, Any]]] = DEFAULT_VARIANTS,
) -> dict[str, Any]:
    """Summarise an evaluation as plain data (JSON-ready).

    Parameters
    ----------
    cases : Sequence[EvalCase]
        Every case of the set, failed ones included (they count as indeterminate).
    cutoffs : Iterable[float]
        Cutoffs of the curves.
    indeterminate_as : {"positive", "negative", "exclude"}
        How an indeterminate (or failed) case counts per patient.
    goal : Goal or None
        Per-patient goal to check; default :class:`Goal` (sensitivity 0.95, specificity 0.90).
    meta : Mapping or None
        Free-form context recorded as is (command, data set, serving path, date).
    variants : Sequence of (name, overrides)
        Rule variants to re-decide every result under (``CaseRule`` field overrides).

    Returns
    -------
    dict
        ``per_patient``, ``per_image`` (confusion and metrics), ``per_image_missing`` (the failed studies the
        per-image row lacks and their truth slices, where known), ``table3`` rows, ``curves``,
        ``fp_by_class``, ``fp_images_by_kind``, ``variants``, ``goal``, ``rule``, ``models``,
        ``timing`` and ``cases``.
    """
    if not cases:
        raise ValueError('Argument "cases" must not be empty.')
    goal = goal or Goal()
    truth = [c.label for c in cases]
    verdicts = _verdicts(cases, None)
    patient = Confusion.from_verdicts(truth, verdicts, indeterminate_as)
    image = _per_image(cases)
    results = [c.result for c in cases if c.result is not None]
    rule = CaseRule.from_params(results[0].rule) if results else CaseRule()
    rules = {r.rule.model_dump_json() for r in results}

    cutoffs = [float(c) for c in cutoffs if c >= rule.cutoff] or [rule.cutoff]
    # every case replayed once per cutoff: the patient curve and each case's positive_up_to read these
    verdicts_at = {c: _verdicts(cases, replace(rule, cutoff=c)) for c in sorted(set(cutoffs))}

    def patient_at(cutoff: float) -> Confusion:
        return Confusion.from_verdicts(truth, verdicts_at[cutoff], indeterminate_as)

    patient_curve = sweep(cutoffs, patient_at)
    image_curve = sweep(cutoffs, lambda c: _per_image(cases, c))
    sens, spec = patient.sensitivity().value, patient.specificity().value
    seconds = [c.seconds for c in cases if c.seconds is not None]
    return {
        "schema_version": SCHEMA_VERSION,
        "meta": dict(meta or {}),
        "n_cases": len(cases),
        "n_failed": sum(c.result is None for c in cases),
        "n_slices": sum(len(r.slices) for r in results),
        "kinds": {k: sum(c.kind == k for c in cases) for k in sorted({c.kind for c in cases})},
        "indeterminate_as": indeterminate_as,
        "per_patient": patient.as_dict(),
        "per_image": image.as_dict(),
        "per_image_missing": _per_image_missing(cases),
        "table3": table3({"per image": image, "per patient": patient}),
        "goal": _goal(goal, sens, spec, positives=any(c.label for c in cases),
                      negatives=any(not c.label for c in cases)),
        "rule": rule.params().model_dump(),
        "rules_differ": len(rules) > 1,
        "models": [m.model_dump() for m in results[0].models] if results else [],
        "curves": {
            "per_patient": [_point(p) for p in patient_curve],
            "per_image": [_point(p) for p in image_curve],
            "auc_per_patient": auc(patient_curve),
            "auc_per_image": auc(image_curve),
        },
        "fp_by_class": false_positives_by_class(
            [(c.kind, c.label, v) for c, v in zip(cases, verdicts, strict=True)],
            indeterminate=indeterminate_as,
        ),
        "fp_images_by_kind": _fp_images_by_kind(cases),
        "variants": [_variant(name, overrides, cases, truth, rule, indeterminate_as) for name, overrides in variants],
        "timing": {
            "cases_timed": len(seconds),
            "median_s": _median(seconds),
            "total_s": sum(seconds) if seconds else None,
        },
        "cases": [_case_row(c, called_positive(v, indeterminate_as), up_to) for c, v, up_to
                  in zip(cases, verdicts, _positive_up_to(verdicts_at), strict=True)],
    }


def _goal(goal: Goal, sens: float | None, spec: float | None, *, positives: bool, negatives: bool) -> dict[str, Any]:
    """The per-patient goal judged on the classes the set holds: a set of one class (a centre's lesion-free
    scans) measures one of the two measures and is judged on it (``measured`` says which). A measure of a
    class the set holds but that has no value (every such study failed and was excluded) is not met."""
    measured = [name for name, held in (("sensitivity", positives), ("specificity", negatives)) if held]
    met = bool(measured) and (not positives or (sens is not None and sens >= goal.sensitivity)) and (
        not negatives or (spec is not None and spec >= goal.specificity))
    return {"sensitivity": goal.sensitivity, "specificity": goal.specificity, "measured": measured, "met": met}


def goal_words(goal: Mapping[str, Any]) -> str:
    """``goal met`` / ``goal NOT met``, saying which measure was not measured when only one was.

    >>> goal_words({"met": True, "measured": ["specificity"]})
    'goal met on specificity; sensitivity not measured: no COVID-19 study'
    >>> goal_words({"met": False, "measured": ["sensitivity", "specificity"]})
    'goal NOT met'
    """
    words = "goal met" if goal["met"] else "goal NOT met"
    measured = goal.get("measured", ["sensitivity", "specificity"])
    if measured == ["specificity"]:
        return f"{words} on specificity; sensitivity not measured: no COVID-19 study"
    if measured == ["sensitivity"]:
        return f"{words} on sensitivity; specificity not measured: no study without COVID-19"
    return words if measured else f"{words}: nothing measured"


def _variant(name: str, overrides: Mapping[str, Any], cases: Sequence[EvalCase], truth: list[bool],
             rule: CaseRule, indeterminate_as: IndeterminateAs) -> dict[str, Any]:
    variant = replace(rule, **overrides)
    c = Confusion.from_verdicts(truth, _verdicts(cases, variant), indeterminate_as)
    return {"name": name, "overrides": dict(overrides), "tp": c.tp, "fn": c.fn, "tn": c.tn, "fp": c.fp,
            "indeterminate": c.indeterminate, "sensitivity": c.sensitivity().value,
            "specificity": c.specificity().value}


def _point(p) -> dict[str, Any]:
    c = p.confusion
    return {"cutoff": p.cutoff, "tp": c.tp, "fp": c.fp, "tn": c.tn, "fn": c.fn,
            "sensitivity": c.sensitivity().value, "specificity": c.specificity().value}


def _positive_up_to(verdicts_at: Mapping[float, list[str]]) -> list[float | None]:
    """Each case's highest cutoff (of ``verdicts_at``'s, the cases' verdicts replayed at each, ascending from
    the served one) at which the case rule still calls it positive; None when it is not positive at the first:
    a study-level score a reader can sweep."""
    n = len(next(iter(verdicts_at.values())))
    out: list[float | None] = [None] * n
    still = [True] * n  # positive at every cutoff so far
    for cutoff in sorted(verdicts_at):
        for i, verdict in enumerate(verdicts_at[cutoff]):
            still[i] = still[i] and verdict == "positive"
            if still[i]:
                out[i] = cutoff
    return out


def _case_row(c: EvalCase, called: bool | None, positive_up_to: float | None = None) -> dict[str, Any]:
    """A case of the report; ``called``: its verdict as the per-patient row counts it (an indeterminate or failed
    one as ``indeterminate_as`` says, None when left out), so ``correct`` sums to the row's TP + TN."""
    r = c.result
    ev = r.evidence if r is not None else None
    return {
        "case_id": c.case_id,
        "kind": c.kind,
        "label": int(c.label),
        "verdict": r.verdict if r else "failed",
        "reason": r.reason if r else "failed",
        "correct": None if called is None else called == c.label,
        "n_slices": len(r.slices) if r else 0,
        "run": f"{ev.n_slices} in {ev.quadrant}" if ev else "",
        "positive_up_to": positive_up_to,
        "seconds": c.seconds,
        "error": c.error,
    }


def _cell(text: str, limit: int = 160) -> str:
    """``text`` fit for one Markdown table cell: one line, no ``|``, at most ``limit`` characters."""
    flat = " ".join(str(text).split()).replace("|", "/")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _percent(v: float | None) -> str:
    """``95.0%``, or ``n/a`` (no percent sign)."""
    return "n/a" if v is None else f"{_pct(v)}%"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def render_markdown(report: Mapping[str, Any], *, plots: Sequence[tuple[str, str]] = ()) -> str:
    """The report as Markdown: Table 3 first, then curves, hard negatives and every case.

    ``plots`` is a list of ``(title, relative path)`` of PNG files to link.
    """
    meta = report.get("meta", {})
    lines = ["# ctscreen evaluation", ""]
    if meta.get("title"):
        lines += [str(meta["title"]), ""]
    for key in ("command", "data", "labels", "serving_path", "date", "note"):
        if meta.get(key):
            lines.append(f"- **{key.replace('_', ' ')}**: `{meta[key]}`" if key == "command" else f"- **{key.replace('_', ' ')}**: {meta[key]}")
    machine = meta.get("machine")
    if isinstance(machine, Mapping):  # the stamp every published figure carries (report.json: meta.machine)
        dirty = " (uncommitted changes)" if machine.get("dirty") else ""
        load = machine.get("loadavg_1m")
        where = (f"{machine.get('cpu')}, {machine.get('cores')} cores, load {load:.1f}"
                 if isinstance(load, (int, float)) else f"{machine.get('cpu')}")
        lines.append(f"- **stamp**: commit `{machine.get('commit')}`{dirty}; {where}")
    kinds = ", ".join(f"{k} {n}" for k, n in report["kinds"].items())
    lines += [
        f"- **cases**: {report['n_cases']} ({kinds}); slices: {report['n_slices']}; failed: {report['n_failed']}",
        f"- **indeterminate counted as**: {report['indeterminate_as']} "
        f"({report['per_patient']['indeterminate']} indeterminate cases"
        + (f", {report['n_failed']} of them failed: no verdict, the error in the cases below)" if report["n_failed"] else ")"),
        "",
        "## Table 3",
        "",
        "Metrics in %, 95% Wilson interval in brackets. Per image: a slice is positive in truth when its lesion "
        "mask holds more than `--min-lesion-px` lesion pixels (default 25; slices with fewer, but some, are left "
        "out), and called positive when it gets any lesion box, wherever on the slice.",
        "",
        *([missing, ""] if (missing := _per_image_missing_words(report.get("per_image_missing", {}))) else []),
        "| level | TP | FN | TN | FP | accuracy | sensitivity | specificity | PPV | NPV |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["table3"]:
        cells = [f"{row[m]} [{row[m + '_ci']}]" for m in METRICS]
        lines.append(f"| {row['level']} | {row['TP']} | {row['FN']} | {row['TN']} | {row['FP']} | " + " | ".join(cells) + " |")
    g = report["goal"]
    pp = report["per_patient"]["metrics"]
    lines += [
        "",
        f"**Per-patient goal** (sensitivity >= {g['sensitivity']:.2f}, specificity >= {g['specificity']:.2f}): "
        f"{goal_words(g).removeprefix('goal ')} (sensitivity {_percent(pp['sensitivity']['value'])}, "
        f"specificity {_percent(pp['specificity']['value'])}).",
        "",
        "## Case rule",
        "",
        "| parameter | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in report["rule"].items()]
    if report.get("rules_differ"):
        lines += ["", "**Warning**: not every result used the same rule; the table shows the first."]
    if report["models"]:
        lines += ["", "## Models", "", "| name | version | platform | sha256 |", "|---|---|---|---|"]
        lines += [f"| {m['name']} | {m['version']} | {m.get('platform') or ''} | {(m.get('sha256') or '')[:12]} |"
                  for m in report["models"]]
    curves = report["curves"]
    lines += ["", "## Curves over the cutoff", "",
              f"AUC (trapezoids through the points): per patient {curves['auc_per_patient'] if curves['auc_per_patient'] is None else round(curves['auc_per_patient'], 3)}, "
              f"per image {curves['auc_per_image'] if curves['auc_per_image'] is None else round(curves['auc_per_image'], 3)}.", "",
              "| cutoff | patient sens | patient spec | image sens | image spec |", "|---:|---:|---:|---:|---:|"]
    for p, i in zip(curves["per_patient"], curves["per_image"], strict=True):
        lines.append(f"| {p['cutoff']:.2f} | {_pct(p['sensitivity'])} | {_pct(p['specificity'])} | "
                     f"{_pct(i['sensitivity'])} | {_pct(i['specificity'])} |")
    lines += ["", "## False positives per hard-negative class", "",
              "| class | cases | FP cases | indeterminate | FP rate [95% CI] | slices | FP slices |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    img = report["fp_images_by_kind"]
    for cls, row in report["fp_by_class"].items():
        ci = "n/a" if row["low"] is None else f"{_pct(row['low'])}-{_pct(row['high'])}"
        s = img.get(cls, {"slices": 0, "fp_slices": 0})
        lines.append(f"| {cls} | {row['n']} | {row['fp']} | {row['indeterminate']} | {_pct(row['rate'])} [{ci}] | "
                     f"{s['slices']} | {s['fp_slices']} |")
    if report.get("variants"):
        lines += ["", "## Rule variants (per patient)", "",
                  "Every result re-decided under a variant of the served rule (see docs/case-rule.md).", "",
                  "| variant | TP | FN | TN | FP | indeterminate | sensitivity | specificity |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for v in report["variants"]:
            lines.append(f"| {v['name']} | {v['tp']} | {v['fn']} | {v['tn']} | {v['fp']} | {v['indeterminate']} | "
                         f"{_pct(v['sensitivity'])} | {_pct(v['specificity'])} |")
    for title, path in plots:
        lines += ["", f"![{title}]({path})"]
    t = report["timing"]
    if t["median_s"] is not None:
        lines += ["", f"Time per case (upload to result, as the client saw it): median {t['median_s']:.2f} s, "
                  f"total {t['total_s']:.1f} s over {t['cases_timed']} cases."]
    lines += ["", "## Cases", "", "| case | kind | label | verdict | reason | slices | longest run | s |",
              "|---|---|---:|---|---|---:|---|---:|"]
    for c in report["cases"]:
        mark = {True: "", False: " **x**"}.get(c["correct"], " (left out)")
        secs = "" if c["seconds"] is None else f"{c['seconds']:.2f}"
        reason = c["reason"] if c["verdict"] != "failed" else _cell(c.get("error") or "failed")
        lines.append(f"| {c['case_id']} | {c['kind']} | {c['label']} | {c['verdict']}{mark} | {reason} | "
                     f"{c['n_slices']} | {c['run']} | {secs} |")
    return "\n".join(lines) + "\n"
