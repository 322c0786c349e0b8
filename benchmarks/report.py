"""The report: one JSON, one Markdown page and PNG plots from the latest results of each benchmark.

Inputs are the ``*-latest.json`` files under ``benchmarks/results/`` (written by ``ctscreen bench
perf|load|ratios`` and by the other engineers' benchmarks); every figure is printed beside its goal.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, machine_info, results_dir, write_json
from benchmarks.gpu_paper_profile import STUDY as STUDY_SLICES

logger = logging.getLogger(__name__)

README = ROOT / "benchmarks" / "README.md"
BEGIN, END = "<!-- BEGIN LATEST FIGURES (ctscreen bench report) -->", "<!-- END LATEST FIGURES -->"


def latest(name: str, results: Path | None = None) -> dict[str, Any] | None:
    """``results/<name>-latest.json`` parsed, or None."""
    path = (results or results_dir()) / f"{name}-latest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        logger.warning("%s is not valid JSON; skipped", path)
        return None


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _met(m: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[m]


# --- plots -----------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency_vs_load(load: dict[str, Any], out: Path) -> Path | None:
    runs = [r for r in load.get("runs", []) if r.get("completed")]
    if not runs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    runs = sorted(runs, key=lambda r: r["studies_per_hour"])
    xs = [r["studies_per_hour"] for r in runs]
    for q, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^:")):
        ax.plot(xs, [r["latency_s"][q] for r in runs], style, label=q)
    for r in runs:
        c = r["config"]
        tag = f"c={c['concurrency']}" if c["mode"] == "closed" else f"{c['mode']} {c['rate']}/s"
        ax.annotate(f"{tag}, {c['sizes']}", (r["studies_per_hour"], r["latency_s"]["p99"]), fontsize=6,
                    textcoords="offset points", xytext=(3, 4))
    ax.axhline(41.34, color="grey", lw=0.8, ls="-.", label="paper: 41.34 s/patient")
    ax.set_xlabel("achieved load (studies/hour)")
    ax.set_ylabel("case latency (s)")
    ax.set_ylim(bottom=0)
    ax.set_title("Case latency against load (gateway, cpu profile)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_throughput_vs_concurrency(perf: dict[str, Any] | None, load: dict[str, Any] | None, out: Path) -> Path | None:
    series: dict[str, tuple[list[float], list[float]]] = {}
    for sc in (perf or {}).get("scenarios", []):
        rows = sc.get("rows") or []
        if rows:
            series[f"{sc['model']} (b{sc['batch']}, perf_analyzer)"] = (
                [r.get("Concurrency") for r in rows], [r.get("Inferences/Second") for r in rows])
    closed = [r for r in (load or {}).get("runs", []) if r["config"]["mode"] == "closed" and r.get("completed")]
    if closed:
        series["gateway, whole studies"] = ([r["config"]["concurrency"] for r in closed],
                                            [r["slices_per_s"] for r in closed])
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (x, y) in series.items():
        ax.plot(x, y, "o-", label=label)
    ax.set_xlabel("concurrency (requests or studies in flight)")
    ax.set_ylabel("slices/s")
    ax.set_ylim(bottom=0)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title("Throughput against concurrency")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _gateway_run(ratios: dict[str, Any] | None, load: dict[str, Any] | None) -> dict[str, Any] | None:
    """The gateway run the stages come from: the ratio run's, else the last load run that completed a study."""
    return (ratios or {}).get("gateway") or next(
        (r for r in reversed((load or {}).get("runs", [])) if r.get("completed")), None)


JOB_STAGES = ("decode", "resample", "grpc", "queue", "compute", "postprocess", "aggregate")
"""The stages each job times (``timings.stages_ms_per_slice`` of its result, schema 1.1.0), in pipeline order."""


def job_stages(ratios: dict[str, Any] | None, load: dict[str, Any] | None) -> dict[str, float]:
    """Milliseconds per slice by stage as the gateway's jobs timed them, averaged over the done studies
    of the run weighted by their slices (empty when the results carry no stage timings)."""
    src = _gateway_run(ratios, load) or {}
    rows: list[tuple[int, dict[str, Any], float]] = []
    for study in src.get("studies", []):
        timings = study.get("server_timings") or {}
        stages = timings.get("stages_ms_per_slice")
        if study.get("state") == "done" and study.get("slices") and isinstance(stages, dict):
            rows.append((int(study["slices"]), stages, float(timings.get("total_s") or 0.0)))
    if not rows:
        return {}
    total = sum(n for n, _, _ in rows)
    keys = [k for k in JOB_STAGES if any(k in st for _, st, _ in rows)]
    keys += sorted({k for _, st, _ in rows for k in st} - set(keys))
    out = {k: round(sum(n * float(st.get(k, 0.0)) for n, st, _ in rows) / total, 2) for k in keys}
    out["(wall clock, accepted to done)"] = round(1000 * sum(w for _, _, w in rows) / total, 2)
    return out


def stage_breakdown(ratios: dict[str, Any] | None, load: dict[str, Any] | None) -> dict[str, float]:
    """Milliseconds per slice by stage: Triton queue/compute per model, gateway stages per slice."""
    stages: dict[str, float] = {}
    src = _gateway_run(ratios, load)
    if not src:
        return stages
    tri = src.get("triton") or {}
    for model, m in tri.items():
        if not m.get("inferences"):
            continue
        k = m["requests"] / m["inferences"] / 1000
        if model == "ct_screen":
            continue  # the ensemble's time is the sum of its steps'
        stages[f"triton {model} queue"] = round((m["queue_us"] or 0) * k, 2)
        stages[f"triton {model} compute"] = round(((m["compute_input_us"] or 0) + (m["compute_infer_us"] or 0)
                                                  + (m["compute_output_us"] or 0)) * k, 2)
    slices = sum(s["slices"] for s in src.get("studies", []) if s["state"] == "done") or 1
    for key, h in (src.get("gateway_stages") or {}).items():
        if ("stage" in key or "seconds" in key) and "stage=total" not in key:
            m = re.search(r"stage=([^,}]+)", key)
            stages[f"gateway {m.group(1) if m else key} (wall)"] = round(h["sum"] * 1000 / slices, 2)
    return stages


def plot_stage_breakdown(stages: dict[str, float], out: Path) -> Path | None:
    if not stages:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(stages) + 1.5))
    names = list(stages)
    colors = ["tab:green" if n.startswith("job") else "tab:orange" if n.startswith("gateway") else "tab:blue"
              for n in names]
    ax.barh(names, [stages[n] for n in names], color=colors)
    ax.set_xlabel("ms per slice; blue: Triton, orange: gateway (run total / slices screened);\n"
                  "green: each job's own stage timings (summed over parallel workers)", fontsize=8)
    ax.set_title("Where the time goes, per stage")
    ax.tick_params(axis="y", labelsize=7)
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# --- markdown ------------------------------------------------------------------------------------


def _goals_md(goals: list[dict[str, Any]]) -> list[str]:
    lines = ["| goal | target | measured | |", "|---|---|---|---|"]
    for g in goals:
        measured = f"{_fmt(g['measured'], 3)} {g['unit']}".strip() if g["measured"] is not None else "n/a"
        note = f": {g['note']}" if g.get("note") else ""
        lines.append(f"| {g['name']} | {g['goal']} | {measured} | {_met(g['met'])}{note} |")
    return lines


def build(results: Path | None = None, *, update_readme: bool | None = None) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and ``plots/*.png`` under ``results``; return the report.

    ``benchmarks/README.md`` gets the figures too when ``results`` is the repository's own folder.
    """
    results = results or results_dir()
    if update_readme is None:
        update_readme = results.resolve() == (ROOT / "benchmarks" / "results").resolve()
    perf, load, ratios = latest("perf", results), latest("load", results), latest("ratios", results)
    others = {name: latest(name, results) for name in ("phantom", "models", "decode", "gpu")}
    plots = results / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    stages = stage_breakdown(ratios, load)
    per_job = job_stages(ratios, load)
    plotted = stages | {f"job {k}": v for k, v in per_job.items() if k in JOB_STAGES}
    figs = {
        "latency_vs_load": plot_latency_vs_load(load, plots / "latency_vs_load.png") if load else None,
        "throughput_vs_concurrency": plot_throughput_vs_concurrency(perf, load, plots / "throughput_vs_concurrency.png"),
        "stage_breakdown": plot_stage_breakdown(plotted, plots / "stage_breakdown.png"),
    }
    goals = list((ratios or {}).get("goals", []))
    report = {
        "generated": machine_info()["time_utc"],
        "machine": (ratios or load or perf or {}).get("machine") or machine_info(),
        "goals": goals,
        "figures": (ratios or {}).get("figures"),
        "where_the_time_goes": _explain(ratios),
        "stage_ms_per_slice": stages,
        "job_stage_ms_per_slice": per_job,
        "ort_sweep": ((ratios or {}).get("ort") or {}).get("sweep"),
        "load_runs": [_load_row(r) for r in (load or {}).get("runs", [])],
        "perf": [_perf_row(s) for s in (perf or {}).get("scenarios", [])],
        "plots": {k: str(v.relative_to(results)) for k, v in figs.items() if v},
        "other_benchmarks": {k: v for k, v in others.items() if v},
        "scaling": _scaling(results / "scaling"),
        "cpu_split": latest("cpu", results),
        "cpu_timeline": latest("timeline", results),
        # Triton and the gateway on a core each (the deployment's shape): beside the goals, not one of them
        "split_cores": latest("split", results),
    }
    write_json(results / "report.json", report)
    md = markdown(report)
    (results / "report.md").write_text(md)
    if update_readme:
        _update_readme(md)
    return report


def _explain(ratios: dict[str, Any] | None) -> list[str] | None:
    if not ratios:
        return None
    from benchmarks.ratios import explain

    return explain(ratios)


def _scaling(folder: Path) -> dict[str, Any] | None:
    """What the scaling simulation (``ctscreen bench scaling``) left in ``results/scaling``."""
    if not folder.is_dir():
        return None
    md = sorted(p.name for p in folder.glob("*.md"))
    plots = sorted(p.name for p in folder.glob("*.png"))
    plots.sort(key=lambda n: (n != "summary.png", n))
    return {"md": md[0] if md else None, "plots": plots,
            "json": sorted(p.name for p in folder.glob("*.json"))}


def _load_row(r: dict[str, Any]) -> dict[str, Any]:
    c = r["config"]
    return {"mode": c["mode"], "rate_per_s": c["rate"] if c["mode"] != "closed" else None,
            "concurrency": c["concurrency"] if c["mode"] == "closed" else None, "sizes": c["sizes"],
            "sent": r["sent"], "completed": r["completed"], "errors": r["errors"],
            "studies_per_hour": r["studies_per_hour"], "slices_per_s": r["slices_per_s"], "latency_s": r["latency_s"]}


def _perf_row(s: dict[str, Any]) -> dict[str, Any]:
    if "error" in s:
        return {"model": s["model"], "batch": s.get("batch"), "error": s["error"]}
    best = max(s["rows"], key=lambda r: r.get("Inferences/Second") or 0) if s["rows"] else {}
    return {"model": s["model"], "batch": s["batch"], "csv": s["csv"], "command": s["command"],
            "best_concurrency": best.get("Concurrency"), "best_infer_per_s": best.get("Inferences/Second"),
            "p99_latency_us_at_best": best.get("p99 latency")}


def _models(machine: dict[str, Any]) -> str:
    """``valid_area 2.0.0 `46133983ec4e`, lesion ...`` from a stamp (benchmarks.stamps), or why there is none."""
    models = machine.get("models") or {}
    if not models:
        return "**not stamped** (measured before stamps named the models)"
    return ", ".join(f"{name} {m.get('version')} `{str(m.get('sha256'))[:12]}`" for name, m in models.items())


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# ctscreen benchmark report", "",
        f"Generated {report['generated']} on: {m.get('cpu')} , {m.get('cores')} cores, {m.get('memory_gib')} GiB, "
        f"no GPU, commit `{m.get('commit')}`{' (uncommitted changes)' if m.get('dirty') else ''}, "
        f"1-min load average at start {_fmt(m.get('loadavg_1m'))}, models: {_models(m)}.", "",
        "## Goals (goal against measured)", "",
    ]
    lines += _goals_md(report["goals"]) if report["goals"] else ["No ratio run yet: `ctscreen bench ratios`."]
    if report.get("split_cores"):
        from benchmarks.split_cores import report_lines

        lines += ["", *report_lines(report["split_cores"])]
    if report.get("where_the_time_goes"):
        lines += ["", "### Where the time goes", ""] + [f"- {s}" for s in report["where_the_time_goes"]]
    if report["stage_ms_per_slice"]:
        lines += ["", "| stage | ms per slice |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in report["stage_ms_per_slice"].items()]
    if report.get("job_stage_ms_per_slice"):
        lines += ["", "### Where every millisecond of a slice goes (each job's own timings)", "",
                  "Averaged over the run's studies, weighted by slices. A stage's milliseconds are summed over "
                  "its parallel workers, and the stages overlap (a study is decoded while it is screened, "
                  "several requests are in flight, the two segmentation models run side by side), so they "
                  "add up to more than the wall clock. grpc is the round trip less Triton's own time; queue "
                  "and compute are Triton's statistics of the ensemble's models.", "",
                  "| stage | ms per slice |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in report["job_stage_ms_per_slice"].items()]
    if report.get("cpu_split"):
        from benchmarks.cpu_split import markdown as cpu_markdown

        lines += ["", "### Where the CPU of one study goes (process CPU, `python -m benchmarks.cpu_split`)", "",
                  "On a CPU-bound machine a study cannot be served in less wall time than its CPU over the "
                  "cores allows: the goal `gateway / in process <= 1.15` needs the served CPU within about "
                  "1.15 x the in-process CPU.", "", cpu_markdown(report["cpu_split"]).rstrip()]
    if report.get("cpu_timeline"):
        from benchmarks.cpu_timeline import summary as timeline_summary

        stamp = report["cpu_timeline"].get("machine") or {}
        lines += ["", "### Where the cores go during the gateway's load (`python -m benchmarks.cpu_timeline`)", "",
                  "Every process's CPU sampled during one load of the gateway ratio's shape: cores left idle would "
                  "be a gap in the pipeline; all of them busy means only the served path's CPU moves the ratio "
                  "(`results/timeline-latest.json` holds the samples).", "",
                  timeline_summary(report["cpu_timeline"])
                  + (f" Measured {stamp.get('time_utc')}, commit `{stamp.get('commit')}`." if stamp else "")]
    if report.get("ort_sweep"):
        lines += ["", "### In-process ONNX Runtime sweep (the denominator is its best setting)", "",
                  "| batch | intra-op threads per session | schedule | slices/s |", "|---|---|---|---|"]
        for r in sorted(report["ort_sweep"], key=lambda r: -(r.get("slices_per_s") or 0)):
            lines.append(f"| {r['batch']} | {r['threads']} | {r['schedule']} | "
                         f"{_fmt(r.get('slices_per_s')) if 'slices_per_s' in r else r.get('error', 'n/a')} |")
    if report["load_runs"]:
        lines += ["", "## Case level (whole studies through the gateway)", "",
                  "| arrivals | sizes | sent | done | errors | studies/h | slices/s | p50 s | p95 s | p99 s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["load_runs"]:
            arr = f"closed c={r['concurrency']}" if r["mode"] == "closed" else f"{r['mode']} {r['rate_per_s']}/s"
            lat = r["latency_s"]
            lines.append(f"| {arr} | {r['sizes']} | {r['sent']} | {r['completed']} | {r['errors'] or 0} | "
                         f"{r['studies_per_hour']} | {r['slices_per_s']} | {_fmt(lat['p50'])} | {_fmt(lat['p95'])} | "
                         f"{_fmt(lat['p99'])} |")
        lines.append("")
        lines.append("The paper reports 41.34 s per patient (GPU workstation).")
    if report["perf"]:
        lines += ["", "## Model level (perf_analyzer, gRPC)", "",
                  "| model | batch | best concurrency | inferences/s | p99 latency (ms) | CSV |", "|---|---|---|---|---|---|"]
        for p in report["perf"]:
            if "error" in p:
                lines.append(f"| {p['model']} | {p.get('batch')} | failed: {p['error'][:80]} | | | |")
            else:
                p99 = p["p99_latency_us_at_best"]
                lines.append(f"| {p['model']} | {p['batch']} | {_fmt(p['best_concurrency'], 0)} | "
                             f"{_fmt(p['best_infer_per_s'])} | {_fmt(p99 / 1000 if p99 else None, 1)} | `{p['csv']}` |")
    if report["plots"]:
        lines += ["", "## Plots", ""] + [f"![{k}](plots/{Path(v).name})" for k, v in report["plots"].items()]
    if report.get("scaling"):
        sc = report["scaling"]
        lines += ["", "## Scaling beyond one machine (simulation)", "",
                  f"See [`scaling/{sc['md']}`](scaling/{sc['md']})." if sc.get("md") else "See `scaling/`."]
        lines += [f"![{Path(p).stem}](scaling/{p})" for p in sc.get("plots", [])[:1]]
    for name, doc in report["other_benchmarks"].items():
        if name == "gpu" and isinstance(doc, dict) and doc.get("study"):
            lines += ["", *gpu_markdown(doc)]
            continue
        summ = doc.get("summary") if isinstance(doc, dict) else None
        lines += ["", f"## {name}", "", f"See `{name}-latest.json`." + (f" Summary: {json.dumps(summ)[:400]}" if summ else "")]
    return "\n".join(lines) + "\n"


GPU_PATHS = {
    "triton-tensorrt": "Triton, TensorRT FP16 plans, the ensemble over gRPC",
    "triton-ort": "Triton, ONNX Runtime with the TensorRT provider, the ensemble over gRPC",
    "ort-cuda": "ONNX Runtime's CUDA provider in process (not Triton)",
    "torch-cuda": "PyTorch in process (not Triton: the node had no GPU tritonserver)",
    "ort-cpu-smoke": "ONNX Runtime on the CPU (a smoke run, not a GPU figure)",
}


def gpu_markdown(doc: dict[str, Any]) -> list[str]:
    """The GPU section of the report from ``gpu-latest.json`` (``benchmarks/gpu_paper_profile.py run``)."""
    m, summ = doc.get("machine") or {}, doc.get("summary") or {}
    path = doc.get("path", "?")
    lines = [
        "## The paper profile on a GPU (`python benchmarks/gpu_paper_profile.py run`)", "",
        f"{m.get('gpu') or 'no GPU'}, {m.get('cores')} cores; path `{path}`: {GPU_PATHS.get(path, path)}; "
        f"{doc.get('profile')}; commit `{m.get('commit')}`, {m.get('time_utc')}, 1-min load average "
        f"{_fmt(m.get('loadavg_1m'))}, stamped models {_models(m)}.", "",
        f"One {summ.get('study_slices')}-slice study: **{_fmt(summ.get(f'seconds_per_{STUDY_SLICES}_slice_study'))} s** "
        f"({_fmt(summ.get('ms_per_slice'))} ms per slice; the paper: 41.34 s per patient). "
        f"Best setting: {_fmt(summ.get('best_slices_per_s'))} slices/s.",
    ]
    if doc.get("post_maps"):
        lines[-1] += f" Post-processing ({doc.get('post_workers')} CPU threads) ran on {doc['post_maps']}."
    runs = [doc["study"], *doc.get("runs", [])]
    stages = [r.get("ms_per_slice_by_stage") for r in runs]
    keys = list(next((s for s in stages if s), {}))
    lines += ["", "| precision | batch | concurrency | slices/s | s per 500 slices |"
              + "".join(f" {k} ms/slice |" for k in keys), "|---|---|---|---|---|" + "---|" * len(keys)]
    for r, st in zip(runs, stages, strict=True):
        cells = "".join(f" {_fmt((st or {}).get(k))} |" for k in keys)
        lines.append(f"| {r.get('precision', 'fp16')} | {r.get('batch')} | {r.get('concurrency', 1)} | "
                     f"{_fmt(r.get('slices_per_s'))} | {_fmt(STUDY_SLICES / r['slices_per_s'] if r.get('slices_per_s') else None)} |"
                     + cells)
    if keys:
        lines += ["", "Stages are summed over the study: models is the synchronised wall time of both networks; "
                  "post is CPU time of the post-processing threads, overlapped with the rest."]
    if doc.get("stopped"):
        lines += ["", "Skipped for time: " + "; ".join(doc["stopped"])]
    return lines


def _update_readme(md: str, readme: Path = README) -> None:
    if not readme.is_file():
        return
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        return
    body = re.sub(r"^# ctscreen benchmark report\n", "", md)
    body = body.replace("](plots/", "](results/plots/").replace("](scaling/", "](results/scaling/")
    body = body.replace("`benchmarks/results/", "`results/").replace("## ", "### ")
    new = text.split(BEGIN)[0] + BEGIN + "\n" + body + END + text.split(END, 1)[1]
    readme.write_text(new)
