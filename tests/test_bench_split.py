"""``benchmarks.split_cores``: Triton on one core, the gateway and its client on another (the deployment's shape).

Cheap: the pinning of this process's threads and of the children it starts, read back from /proc as the
benchmark reads it; the check that refuses a run whose pinning did not hold; the report's row, beside the
goals and not among them. No server starts here (the benchmark itself runs in ``make bench``).
"""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from benchmarks import split_cores
from benchmarks.cpu_split import labelled_tree, processes
from benchmarks.split_cores import misplaced, pinned, placement, thread_cpus, watching

CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir() or not CPUS, reason="Linux CPU affinity")

SLEEP = "import time; time.sleep(60)"


def _status_cpus(pid: int) -> str:
    return next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines()
                if x.startswith("Cpus_allowed_list:")).split(":", 1)[1].strip()


def _restored(before: dict[int, set[int]]) -> bool:
    """Every thread of ``before`` still running has its CPUs of then."""
    now = thread_cpus()
    return all(now[t] == before[t] for t in now.keys() & before.keys())


def _child(*words: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", SLEEP, *words])


def test_every_thread_and_every_child_is_pinned_and_each_thread_restored() -> None:
    assert doctest.testmod(split_cores).failed == 0
    cpu = CPUS[-1]
    stop = threading.Event()
    older = threading.Thread(target=stop.wait, daemon=True)  # a thread started before: pinned too
    older.start()
    before = thread_cpus()
    assert older.native_id in before
    children = []
    try:
        with pinned({cpu}), watching(every=0.05) as seen:
            assert os.sched_getaffinity(0) == {cpu} and split_cores.cores() == 1
            assert all(c == {cpu} for c in thread_cpus().values()), thread_cpus()
            newer = threading.Thread(target=stop.wait, daemon=True)
            newer.start()
            assert thread_cpus()[newer.native_id] == {cpu}
            children.append(_child())
            assert _status_cpus(children[0].pid) == str(cpu)
        assert seen == {str(cpu)}
        after = thread_cpus()
        assert _restored(before)
        assert after[newer.native_id] == set(CPUS)  # created inside: given the caller's CPUs back
        assert _status_cpus(children[0].pid) == str(cpu)  # a child keeps its pinning
        with pytest.raises(OSError), pinned({max(CPUS) + 4096}):  # no CPU of the cpuset
            pass
        assert _restored(after)
        with pytest.raises(RuntimeError, match="inside"), pinned({cpu}):
            raise RuntimeError("inside")
        assert _restored(after)
    finally:
        stop.set()
        for c in children:
            c.kill()
            c.wait()


@pytest.mark.skipif(len(CPUS) < 2, reason="two CPUs")
def test_the_placement_of_the_servers_is_read_back_and_checked() -> None:
    """The benchmark reads every thread of tritonserver, its stubs and the gateway below its process, labelled
    as ``benchmarks.cpu_split`` labels them by their command lines, and names what is not on its core."""
    triton_cpu, gateway_cpu = CPUS[0], CPUS[1]
    children = []
    try:
        with pinned({triton_cpu}):
            children += [_child("tritonserver"), _child("triton_python_backend_stub", "/r/lesion/1/model.py")]
        with pinned({gateway_cpu}):
            children.append(_child("uvicorn"))
        # this process's children only: a session's Triton or PostgreSQL may run below it too
        ours = {c.pid for c in children}
        seen = placement({pid: name for pid, name in labelled_tree(processes()).items() if pid in ours})
        assert seen == {"gateway": [str(gateway_cpu)], "stub lesion": [str(triton_cpu)],
                        "triton core": [str(triton_cpu)]}
        assert misplaced(seen, {str(gateway_cpu)}, {str(triton_cpu)}, triton_cpu, gateway_cpu) == []
        assert misplaced(seen, {str(gateway_cpu)}, {str(triton_cpu)}, gateway_cpu, triton_cpu) == [
            f"gateway: threads on {gateway_cpu}, not {triton_cpu} alone",
            f"stub lesion: threads on {triton_cpu}, not {gateway_cpu} alone",
            f"triton core: threads on {triton_cpu}, not {gateway_cpu} alone",
            f"client: threads on {gateway_cpu}, not {triton_cpu} alone",
            f"in process: threads on {triton_cpu}, not {gateway_cpu} alone"]
        assert misplaced({}, set(), {str(triton_cpu)}, triton_cpu, gateway_cpu) == [
            "no tritonserver seen", "no gateway seen", "no python-backend stub seen",
            f"client: threads on none seen, not {gateway_cpu} alone"]
    finally:
        for c in children:
            c.kill()
            c.wait()


def test_one_cpu_is_refused_before_anything_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "split.json"
    with pinned({CPUS[0]}):
        assert split_cores.main(["--rounds", "1", "--out", str(out)]) == 1
    assert "split cores needs two CPUs in this process's affinity" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit) as exc:
        split_cores.main(["--ort-schedules", "sequential,nope"])
    assert exc.value.code == 2 and "--ort-schedules must be a comma list" in capsys.readouterr().err


SPLIT = {  # the shape a run writes (benchmarks.split_cores.run), cut down
    "what": split_cores.NAME, "cpus": {"triton": 0, "gateway_and_client": 1, "in_process": 0},
    "pinning": {"processes": {"gateway": ["1"], "stub ct_screen_fused": ["0"], "triton core": ["0"]},
                "client": ["1"], "in_process": ["0"]},
    "load": {"study_slices": 60, "studies": 4, "concurrency": 2, "rounds": 2},
    "gateway_rounds": [{"slices_per_s": 30.0, "completed": 4, "sent": 4, "in_process_slices_per_s": 31.0},
                       {"slices_per_s": 40.0, "completed": 3, "sent": 4, "in_process_slices_per_s": 33.0}],
    "figures": {"split_over_in_process": 0.968, "gateway_slices_per_s": 30.0, "in_process_slices_per_s": 31.0,
                "in_process_setting": "batch 2, 1 thread(s) per session, concurrent"},
    "machine": {"commit": "abc1234", "time_utc": "2026-12-06T16:48:47Z", "loadavg_1m": 0.3},
}


def test_the_report_shows_the_split_figure_beside_the_goals_not_among_them(tmp_path: Path) -> None:
    from benchmarks import report

    goal = {"name": "gateway end-to-end / in-process ORT, best setting (slices/s)", "goal": ">= 0.90",
            "measured": 0.86, "unit": "", "met": False, "note": None}
    (tmp_path / "ratios-latest.json").write_text(json.dumps({"goals": [goal], "machine": {"commit": "abc1234"}}))
    (tmp_path / "split-latest.json").write_text(json.dumps(SPLIT))
    rep = report.build(tmp_path, update_readme=False)
    assert rep["goals"] == [goal]  # the goal stays the shared-core ratio, reported as missed
    page = (tmp_path / "report.md").read_text()
    goals, rest = page.split("| gateway end-to-end / in-process ORT, best setting (slices/s) | >= 0.90 | 0.860 | "
                             "**missed** |\n", 1)
    assert "split_cores" not in goals
    assert rest.startswith("\n| beside the goals, not a goal | target | measured | |\n")
    assert ("| gateway end to end on its own core / in-process ORT on Triton's one core (deployment shape; not the "
            "goal) | none (the goal is the shared-core row above) | 0.968 |") in rest
    assert "Gateway end to end 30.0 slices/s (best of 1 completed of 2 loads of 4 studies of 60 slices" in rest
    assert "Pinning read back from /proc: gateway on 1; stub ct_screen_fused on 0; triton core on 0; client on 1." in rest
    assert "commit `abc1234`" in rest
    table = split_cores.markdown(SPLIT)
    assert "| 2 | 40.0 | 3/4 | 33.0 |" in table
