"""Smoke tests of the benchmark harness: it runs on a tiny load, so it cannot rot.

These never measure speed (the benchmarks print figures; tests do not time anything). The ``triton``
tests drive the real embedded tritonserver, the real perf_analyzer binary and a real gateway process
(uvicorn) with one tiny phantom study.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import promstats
from benchmarks.cli import DELEGATES
from benchmarks.cli import main as bench_main
from benchmarks.common import UnsafeTarget, check_target, is_loopback, results_dir, set_results_dir
from benchmarks.load import LoadConfig, arrival_times
from benchmarks.studies import SizeDist
from ctscreen.contracts import BOX_COUNT, LESION_BOXES, VALID_AREA_BOX

# --- pure pieces --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("127.0.0.1:8001", True),
        ("http://127.3.4.5:9/x", True),
        ("http://localhost:8000", True),
        ("[::1]:8001", True),
        ("http://10.0.0.5:8000", False),
        ("192.168.1.2:8001", False),
        ("https://example.org", False),
    ],
)
def test_only_loopback_is_a_target_unless_allowed(url: str, ok: bool) -> None:
    assert is_loopback(url) is ok
    if ok:
        assert check_target(url) == url
    else:
        with pytest.raises(UnsafeTarget, match="not a loopback"):
            check_target(url)
        assert check_target(url, allow_remote=True) == url


def test_cli_refuses_a_remote_gateway_without_sending(capsys: pytest.CaptureFixture[str]) -> None:
    rc = bench_main(["load", "--url", "http://10.20.30.40:8080", "--max-studies", "1"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "refusing to send load to 'http://10.20.30.40:8080'" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["perf", "--pa-concurrency", "4:1"],
        ["load", "--concurrency", "0"],
        ["ratios", "--gateway-rounds", "0"],
        ["ratios", "--rounds", "-1"],
        ["load", "--rates", "x"],
        ["nonsense"],
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench_main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ctscreen bench: error:") and "Traceback" not in err


def test_cli_bad_values_are_one_line_before_anything_starts(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["load", "--url", "http://127.0.0.1:1", "--sizes", "gauss:3"]) == 1
    assert 'Argument "sizes" must be fixed:N' in capsys.readouterr().err
    assert bench_main(["load", "--gateway-env", "FOO=1"]) == 1
    err = capsys.readouterr().err
    assert "--gateway-env wants CTSCREEN_NAME=VALUE" in err and "starting" not in err


@pytest.mark.parametrize("command", sorted(DELEGATES))
def test_a_delegated_command_names_itself_in_its_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``ctscreen bench phantom --help`` said ``usage: bench_phantom``; split, sweep and gpu named their modules."""
    with pytest.raises(SystemExit) as exc:
        bench_main([command, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: ctscreen bench {command} ")

@pytest.fixture
def results_kept():
    """The results folder as it was, set back after a test that passes ``--results``."""
    before = results_dir()
    yield
    set_results_dir(before)


@pytest.mark.parametrize("command", ["fov", "noise"])
@pytest.mark.parametrize("head", [["--results", "{tmp}"], ["-v", "--results={tmp}"]])
def test_the_global_results_folder_reaches_a_delegated_command(command, head, tmp_path, monkeypatch, results_kept):
    """``ctscreen bench --results DIR fov`` ended in AttributeError: 'Namespace' object has no attribute
    'triton_url' (the delegate's name was parsed as a command of the harness). Nothing is measured here."""
    import importlib

    module = importlib.import_module(f"benchmarks.{command}")
    seen = []
    monkeypatch.setattr(module, "main", lambda argv: seen.append((argv, results_dir())) or 0)
    out = tmp_path / "res"
    assert bench_main([h.format(tmp=out) for h in head] + [command, "--shared", "/nowhere"]) == 0
    assert seen == [(["--shared", "/nowhere"], out)] and out.is_dir()


def test_the_global_results_folder_is_refused_where_it_would_not_reach(tmp_path, capsys, results_kept):
    with pytest.raises(SystemExit) as exc:
        bench_main(["--results", str(tmp_path / "res"), "figures", "--list"])
    assert exc.value.code == 2 and not (tmp_path / "res").exists()
    assert capsys.readouterr().err.strip() == ("ctscreen bench: error: --results does not reach 'figures', which "
                                               "writes where its own options say (ctscreen bench figures --help)")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("fixed:30", {30}), ("choice:20,40", {20, 40}), ("uniform:40,60", set(range(40, 61, 10)))],
)
def test_size_distributions(spec: str, expected: set[int]) -> None:
    sizes = SizeDist.parse(spec).draw(np.random.default_rng(1), 50)
    assert len(sizes) == 50 and set(sizes) <= expected
    lo, hi = 100, 400
    logn = SizeDist.parse(f"lognormal:200,0.5,{lo},{hi}").draw(np.random.default_rng(1), 200)
    assert min(logn) >= lo and max(logn) <= hi and len(set(logn)) > 3


@pytest.mark.parametrize("spec", ["fixed", "choice:", "uniform:1", "lognormal:1,2", "fixed:-3", "poisson:3"])
def test_bad_size_specs(spec: str) -> None:
    with pytest.raises(ValueError, match='Argument "sizes"'):
        SizeDist.parse(spec)


@pytest.mark.parametrize("mode", ["poisson", "bursty"])
def test_open_loop_arrivals_are_bounded(mode: str) -> None:
    cfg = LoadConfig(url="http://127.0.0.1:1", mode=mode, rate=2.0, burst=4, duration=10.0, max_studies=1000)
    times = arrival_times(cfg, np.random.default_rng(0))
    assert times == sorted(times) and times[0] == 0.0 and times[-1] <= 10.0
    assert 5 <= len(times) <= 60  # about rate x duration = 20
    if mode == "bursty":
        assert len(set(times)) * 4 >= len(times) and len(set(times)) < len(times)
    capped = arrival_times(LoadConfig(url="http://127.0.0.1:1", mode=mode, rate=50.0, burst=4, duration=100.0,
                                      max_studies=7), np.random.default_rng(0))
    assert len(capped) == 7


TRITON_METRICS = """\
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="lesion",version="1"} 10
nv_inference_count{model="lesion",version="1"} 40
nv_inference_exec_count{model="lesion",version="1"} 5
nv_inference_queue_duration_us{model="lesion",version="1"} 5000
nv_inference_compute_infer_duration_us{model="lesion",version="1"} 200000
nv_inference_request_failure{model="lesion",version="1"} 0
"""


def test_triton_metrics_summary_from_a_delta() -> None:
    before = promstats.parse(TRITON_METRICS.replace(" 10\n", " 0\n").replace(" 40\n", " 0\n").replace(" 5\n", " 0\n")
                             .replace(" 5000\n", " 0\n").replace(" 200000\n", " 0\n"))
    after = promstats.parse(TRITON_METRICS)
    s = promstats.triton_summary(promstats.delta(before, after))["lesion"]
    assert s["requests"] == 10 and s["inferences"] == 40 and s["avg_batch"] == 8.0
    assert s["queue_us"] == 500.0 and s["compute_infer_us"] == 20000.0
    hist = promstats.histogram_summary(promstats.parse(
        'x_stage_seconds_sum{stage="decode"} 3\nx_stage_seconds_count{stage="decode"} 2\n'))
    assert hist == {"x_stage_seconds{stage=decode}": {"count": 2, "sum": 3.0, "mean": 1.5}}


def test_a_ratio_compares_the_best_of_as_many_runs_of_each_side() -> None:
    """The best of more noisy runs is higher by the noise alone: the ensemble's and the gateway's ratios
    each take the in-process runs that alternated with them, as many as their own (issue 17)."""
    import doctest

    from benchmarks import ratios

    assert doctest.testmod(ratios, optionflags=doctest.ELLIPSIS).failed == 0
    ensemble, in_process, later_in_process = [30.0, 31.0, 29.0], [32.0, 30.0, 31.0], [36.0]
    assert ratios.best_over_best(ensemble, in_process) == pytest.approx(31 / 32, abs=1e-3)
    with pytest.raises(ValueError, match="as many runs"):
        ratios.best_over_best(ensemble, in_process + later_in_process)


def test_gpu_script_dry_run_prints_the_plan() -> None:
    out = subprocess.run([sys.executable, "benchmarks/gpu_paper_profile.py", "build", "--out", "/tmp/ctscreen-paper",
                          "--dry-run"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--untrained --profile paper" in out.stdout and "repo build --profile gpu" in out.stdout
    out = subprocess.run([sys.executable, "benchmarks/gpu_paper_profile.py", "measure", "--triton-url",
                          "10.0.0.1:8001"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "refusing" in out.stderr


# --- against the real embedded Triton -------------------------------------------------------------------


@pytest.mark.triton
def test_monai_style_client_and_ensemble_client_agree(triton) -> None:
    """The MONAI-style client (JSON tensors over HTTP) gets the very boxes the gRPC client gets."""
    from benchmarks.perf import sample_slices
    from benchmarks.ratios import MonaiStyleRemoteModel, ensemble_throughput

    slices = sample_slices(2)
    run = ensemble_throughput(triton.grpc_url, slices, batch=2, concurrency=1, min_slices=2)
    assert run["slices"] >= 2 and run["slices_per_s"] > 0

    import tritonclient.grpc as grpcclient

    cli = grpcclient.InferenceServerClient(triton.grpc_url)
    inp = grpcclient.InferInput("HU_SLICES", [1, 1, 512, 512], "INT16")
    inp.set_data_from_numpy(slices[:1])
    ref = cli.infer("ct_screen", [inp])
    model = MonaiStyleRemoteModel(triton.http_url)
    try:
        got = model(slices[:1])
    finally:
        model.close()
    for name in (LESION_BOXES, BOX_COUNT, VALID_AREA_BOX):
        np.testing.assert_array_equal(got[name], ref.as_numpy(name))
    assert got[VALID_AREA_BOX].shape == (1, 4) and got[BOX_COUNT].shape == (1, 1)


@pytest.mark.triton
def test_perf_analyzer_scenario_on_the_ensemble(triton, tmp_path) -> None:
    from benchmarks import perf

    names = perf.model_inputs(triton.http_url, "ct_screen")
    data = perf.input_data_file("ct_screen", names, tmp_path, n=1)
    assert json.loads(data.read_text())["data"][0]["HU_SLICES"]["shape"] == [1, 512, 512]
    res = perf.run_scenario("ct_screen", triton.grpc_url, input_data=data, input_names=names, batch=1,
                            concurrency=(1, 1, 1), request_count=3, max_trials=10, stability=1000, out_dir=tmp_path)
    assert res["rows"] and res["rows"][0]["Concurrency"] == 1 and res["rows"][0]["Inferences/Second"] > 0
    assert "--shape HU_SLICES:1,512,512" in res["command"]


@pytest.mark.triton
def test_perf_analyzer_scenario_on_the_postprocess_model(triton, tmp_path) -> None:
    """The post-processing model's perf_analyzer data carries all three of its inputs (the two maps and
    the HU of its lung-field check): perf_analyzer refuses a request that lacks one."""
    from benchmarks import perf

    names = perf.model_inputs(triton.http_url, "postprocess")
    data = perf.input_data_file("postprocess", names, tmp_path, n=1)
    assert set(json.loads(data.read_text())["data"][0]) == {"VALID_PROB", "LESION_PROB", "HU_SLICES"}
    res = perf.run_scenario("postprocess", triton.grpc_url, input_data=data, input_names=names, batch=1,
                            concurrency=(1, 1, 1), request_count=3, max_trials=10, stability=1000, out_dir=tmp_path)
    assert res["rows"] and res["rows"][0]["Inferences/Second"] > 0, res


@pytest.mark.triton
def test_case_load_through_a_real_gateway_and_report(triton, tmp_path, monkeypatch) -> None:
    """One tiny phantom study through a real gateway process, followed by its server-sent events (a
    poll every 60 s would show in the spy as an empty follow); then the report is written."""
    from benchmarks import load, report, stack
    from benchmarks.load import run_load

    followed = []
    real_follow = load._follow_events

    async def spy(*args, **kw):
        followed.append(await real_follow(*args, **kw))
        return followed[-1]

    monkeypatch.setattr(load, "_follow_events", spy)
    from benchmarks.studies import ensure_study

    study = ensure_study("covid", 8, seed=5, matrix=128, cache=tmp_path / "studies")
    assert study.n_slices == 8
    target = stack.TritonTarget(triton.grpc_url, f"http://{triton.http_url}", triton.metrics_url)
    with stack.gateway(target) as url:
        cfg = LoadConfig(url=url, mode="closed", concurrency=1, max_studies=1, duration=60, study_timeout=120,
                         sizes="fixed:8", kinds=("covid",), poll_interval=60, triton_metrics_url=triton.metrics_url)
        res = run_load(cfg, {("covid", 8): study})
    assert res["sent"] == 1 and res["completed"] == 1, res["errors"]
    assert len(followed) == 1 and followed[0]["state"] == "done"  # the events told, no poll did
    assert res["studies"][0]["verdict"] in ("positive", "negative", "indeterminate")
    assert res["slices_per_s"] > 0 and res["latency_s"]["p99"] > 0
    assert res["triton"]["ct_screen"]["inferences"] == 8
    assert any("stage" in k for k in res["gateway_stages"])

    # the MONAI-style path (pydicom, 128 -> 512 resize, one JSON request per slice) reaches the same verdict
    from benchmarks.ratios import monai_style_run

    mon = monai_style_run(f"http://{triton.http_url}", [study])
    assert mon["studies"] == 1 and mon["slices"] == 8
    assert mon["runs"][0]["verdict"] == res["studies"][0]["verdict"]

    (tmp_path / "load-latest.json").write_text(json.dumps({"machine": {}, "runs": [res]}))
    rep = report.build(tmp_path)
    assert (tmp_path / "report.md").read_text().startswith("# ctscreen benchmark report")
    assert (tmp_path / "plots" / "latency_vs_load.png").stat().st_size > 1000
    assert rep["stage_ms_per_slice"]  # per-stage breakdown from Triton and gateway metrics
    # and every stage of a slice as the job timed it (issue 17, item 3), in the JSON and the page
    job = rep["job_stage_ms_per_slice"]
    assert set(report.JOB_STAGES) <= set(job) and all(v >= 0 for v in job.values()), job
    assert job["compute"] > 0 and job["decode"] > 0
    assert sum(job[k] for k in report.JOB_STAGES) > 0
    assert "Where every millisecond of a slice goes" in (tmp_path / "report.md").read_text()


def test_cpu_split_counts_each_process_under_its_label() -> None:
    """``benchmarks.cpu_split.snapshot`` reads /proc: a child whose command line names uvicorn counts as
    the gateway (its own CPU, while it runs), this process as the client."""
    import time

    from benchmarks.cpu_split import snapshot, split

    before = snapshot()
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\ntime.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", burn, "uvicorn"])
    try:
        deadline = time.monotonic() + 20
        while (snapshot().get("gateway") or 0) < 0.35 and time.monotonic() < deadline:
            time.sleep(0.1)
        after = snapshot()
    finally:
        child.kill()
        child.wait()
    got = split(before, after, 1)
    assert 350 <= got["gateway"] < 2000, got
    assert got["total"] >= got["gateway"]


def test_cpu_split_names_every_round_and_reports_the_median_one(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.cpu_split import main, markdown

    def pair(ratio: float) -> dict:
        return {"cpu_ratio": ratio, "wall_ratio": ratio + 0.02, "served_cpu_ms_per_slice": 70.0 * ratio,
                "in_process_cpu_ms_per_slice": 70.0}

    doc = {"slices": 300, "cpu_ratio": 1.16, "wall_ratio": 1.18, "rounds": [pair(1.2), pair(1.16), pair(1.1)],
           "served": {"latency_s": 11.0, "cpu_ms_per_slice": {"gateway": 9.0, "total": 81.2}},
           "in_process": {"wall_s": 9.3, "cpu_ms_per_slice": 70.0, "batch": 1, "threads": 1, "schedule": "workers"}}
    text = markdown(doc)
    assert "median CPU ratio of 3 alternating rounds (CPU ratios 1.2, 1.16, 1.1;" in text
    assert "(CPU ratio 1.16)" in text and "| gateway | 9.0 |" in text
    assert "Measured" not in text  # no stamp in the result, none invented
    stamped = markdown({**doc, "machine": {"commit": "abc1234", "time_utc": "2026-12-03T21:02:48Z", "loadavg_1m": 1.4}})
    assert "commit `abc1234`, 1-min load average 1.40 at the start." in stamped
    import doctest

    from benchmarks import cpu_split

    assert doctest.testmod(cpu_split).failed == 0
    with pytest.raises(SystemExit) as exc:
        main(["--rounds", "0"])
    assert exc.value.code == 2 and "--rounds" in capsys.readouterr().err


@pytest.mark.parametrize(("module", "argv", "fragment"), [
    ("ab_gateway", ["--a", "FOO=1"], "expected CTSCREEN_NAME=value, UVICORN_NAME=value or MALLOC_NAME=value, got 'FOO=1'"),
    ("ab_gateway", ["--b", "CTSCREEN_SCREEN_AHEAD"], "expected CTSCREEN_NAME=value"),
    ("ab_gateway", ["--a-tree", "/nonexistent"], "--a-tree /nonexistent is not a checkout of this repository"),
    ("ab_gateway", ["--slices", "4"], "--slices must be at least 8"),
    ("ab_triton", ["--a", "MALLOC_TOP_PAD_"], "expected NAME=value or NAME= (to remove NAME), got 'MALLOC_TOP_PAD_'"),
    ("ab_triton", ["--b", "=1"], "expected NAME=value"),
    ("ab_triton", ["--rounds", "0"], "--rounds must be at least 1"),
    ("ab_triton", ["--models", "lesion"], "invalid choice: 'lesion'"),
    ("ab_triton", ["--b-repo", "/nonexistent-repo"], "--b-repo /nonexistent-repo: no rendered cpu model repository there"),
    ("ab_grpc", ["--rounds", "0"], "argument --rounds: expected a value > 0, got '0'"),
    ("ab_grpc", ["--batch", "9"], "--batch must be at most 8 (the cpu profile's max_batch_size)"),
])
def test_ab_bad_arguments_exit_2_before_anything_starts(module: str, argv: list[str], fragment: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import importlib

    with pytest.raises(SystemExit) as exc:
        importlib.import_module(f"benchmarks.{module}").main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_cpu_timeline_reads_cores_busy_and_fits_a_study_and_a_slice(capsys: pytest.CaptureFixture[str],
                                                                    tmp_path: Path) -> None:
    """``benchmarks.cpu_timeline``: samples become cores busy by process group (stubs summed), the gateway's CPU
    per study is fitted as a x slices + b, the summary names both, and bad sizes exit 2 before anything starts."""
    import doctest

    from benchmarks import cpu_timeline
    from benchmarks.cpu_timeline import cores_busy, fit, main, markdown

    assert doctest.testmod(cpu_timeline).failed == 0
    rows = cores_busy([(0.0, {"gateway": 1.0}), (0.1, {"gateway": 1.1, "stub lesion": 0.1, "stub valid_area": 0.05}),
                       (0.2, {"gateway": 1.1, "stub lesion": 0.28, "stub valid_area": 0.05})])
    assert [r["stubs"] for r in rows] == [1.5, 1.8] and [r["gateway"] for r in rows] == [1.0, 0.0]
    assert fit([(8, 0.12), (60, 0.38)]) == (0.005, 0.08)
    with pytest.raises(ValueError, match="two study sizes"):
        fit([(8, 0.1), (8, 0.2)])
    doc = {"load": {"study_slices": 60, "studies": 4, "concurrency": 2, "step_s": 0.1, "wall_s": 7.3,
                    "slices_per_s": 33.0, "cores": 2, "share_of_samples_cores_all_busy": 0.9,
                    "mean_cores_busy": {"gateway": 0.2, "stubs": 1.7, "total": 1.9}, "timeline": rows},
           "gateway_cpu": {"fit_slices": [8, 60], "studies_a_point": 8, "rounds": 3, "ms_a_slice": 5.0,
                           "ms_a_study": 80.0, "ms_a_slice_in_60_slice_studies": 6.33}}
    text = markdown(doc)
    assert "5.0 ms a slice + 80.0 ms a study, so 6.33 ms a slice in studies of 60" in text
    assert "90 % of the 0.1 s samples had at least 90% of the cores busy" in text
    from benchmarks import report

    (tmp_path / "timeline-latest.json").write_text(json.dumps({**doc, "machine": {"commit": "abc1234"}}))
    report.build(tmp_path, update_readme=False)  # the report shows it
    page = (tmp_path / "report.md").read_text()
    assert "Where the cores go during the gateway's load" in page and "6.33 ms a slice in studies of 60" in page
    for argv in (["--fit-slices", "8"], ["--fit-slices", "60,60"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and "--fit-slices must be two different sizes" in capsys.readouterr().err


def test_ab_triton_table_names_both_sides_and_every_busy_process() -> None:
    """``benchmarks.ab_triton``: A's glibc defaults are named as such, B with no settings is the shipped server,
    and each model's row carries best and median slices/s and the median CPU of every process that worked."""
    import doctest

    from benchmarks import ab_triton
    from benchmarks.ab_triton import markdown, side_env, summary

    assert doctest.testmod(ab_triton).failed == 0
    runs = {"A": {"ct_screen": [{"slices_per_s": 36.0, "cpu_ms_per_slice": {"stub postprocess": 7.0, "stub x": 0.01,
                                                                            "total": 55.0}},
                                {"slices_per_s": 36.4, "cpu_ms_per_slice": {"stub postprocess": 7.2, "total": 55.4}}]},
            "B": {"ct_screen": [{"slices_per_s": 37.6, "cpu_ms_per_slice": {"stub postprocess": 5.8, "total": 53.5}},
                                {"slices_per_s": 37.0, "cpu_ms_per_slice": {"stub postprocess": 5.6, "total": 53.3}}]}}
    doc = {"rounds": 2, "call": {"batch": 2, "concurrency": 4}, "env_a": side_env(None), "env_b": side_env([]),
           "summary": summary(runs)}
    text = markdown(doc)
    assert "- A: MALLOC_MMAP_THRESHOLD_=(glibc default)" in text and "- B: the shipped server" in text
    assert "| ct_screen | 36.40 (36.20) | 37.60 (37.30) | stub postprocess 7.10 / 5.70; total 55.20 / 53.40 |" in text
    with_repos = markdown({**doc, "env_a": side_env([]), "repo_a": "/tmp/a", "repo_b": "/tmp/b"})
    assert "- A: the shipped server, models of /tmp/a" in with_repos and "- B: the shipped server, models of /tmp/b" in with_repos


def test_a_delegated_command_configures_its_own_logging(monkeypatch, results_kept):
    """The harness configured the root logger (WARNING) before handing over, so a delegate's own basicConfig did
    nothing: ``ctscreen bench sweep -v`` and fov's progress at INFO went quiet. Only a ``-v`` given before the
    command configures it now. Nothing is measured here."""
    import importlib
    import logging

    calls: list[str] = []
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: calls.append(logging.getLevelName(kw.get("level"))))
    module = importlib.import_module("benchmarks.fov")
    monkeypatch.setattr(module, "main", lambda argv: calls.append("delegate") or 0)
    assert bench_main(["fov"]) == 0 and calls == ["delegate"]
    calls.clear()
    assert bench_main(["-v", "fov"]) == 0 and calls == ["INFO", "delegate"]


def test_ab_grpc_turns_the_order_each_round_and_compares_with_unary() -> None:
    """``benchmarks.ab_grpc``: every mode runs once a round, first in turn; the table gives each mode's median CPU and
    context switches a call and its CPU against the shipped unary call's, stamped when the run was."""
    import doctest

    from benchmarks import ab_grpc
    from benchmarks.ab_grpc import MODES, markdown, order, summarise

    assert doctest.testmod(ab_grpc).failed == 0
    assert [order(r)[0] for r in range(3)] == list(MODES) and all(sorted(order(r)) == sorted(MODES) for r in range(4))
    runs = {"unary": [{"cpu_ms_per_call": c, "switches_per_call": 16.0} for c in (1.8, 2.0, 2.4)],
            "stream": [{"cpu_ms_per_call": c, "switches_per_call": 20.0} for c in (1.6, 1.5, 1.7)],
            "sync": [{"cpu_ms_per_call": c, "switches_per_call": 22.0} for c in (2.2, 2.6, 2.1)]}
    text = markdown({"batch": 2, "inflight": 4, "calls": 60, "rounds": 3, "model": "ct_screen_fused",
                     "summary": summarise(runs), "machine": {"commit": "abc1234", "time_utc": "2026-12-07T23:55:28Z",
                                                             "loadavg_1m": 4.79}})
    assert "| unary | 2.0 | 16.0 | 1.0 |" in text and "| stream | 1.6 | 20.0 | 0.8 |" in text, text
    assert "| sync | 2.2 | 22.0 | 1.1 |" in text and "commit `abc1234`, 1-min load average 4.79" in text
