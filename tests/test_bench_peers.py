"""Issue 17: the in-process sweep, the MONAI Deploy App SDK peer and the GPU script, on tiny sizes.

Nothing here times anything: the benchmarks print figures; these check that each path runs and that
every schedule of the in-process baseline screens exactly what the plain pipeline screens.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import gpu_paper_profile as gpu
from benchmarks import monai_sdk, sweep_inprocess
from benchmarks.common import ROOT
from benchmarks.dicom_volume import decode_series
from benchmarks.studies import ensure_study


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory):
    return ensure_study("covid", 8, seed=5, matrix=128, cache=tmp_path_factory.mktemp("studies"))


# --- the in-process sweep ------------------------------------------------------------------------


def test_the_grid_covers_batch_threads_and_schedules() -> None:
    grid = sweep_inprocess.settings(n_cores=2)
    assert {s.batch for s in grid} == {1, 2, 4, 8, 16} and {s.threads for s in grid} == {1, 2}
    assert {s.schedule for s in grid} == set(sweep_inprocess.SCHEDULES)
    assert not any(s.schedule == "workers" and s.threads == 2 for s in grid)  # one pipeline: sequential again
    assert len(grid) == 5 * (4 + 3)
    with pytest.raises(ValueError, match='"schedule"'):
        sweep_inprocess.Setting(4, 1, "fastest")


def test_every_schedule_screens_what_the_plain_pipeline_screens(study) -> None:
    hu, meta = decode_series(study.files)
    x = np.ascontiguousarray(hu[:3, None])
    ref = sweep_inprocess.Runner(sweep_inprocess.Setting(1, 1, "sequential"))(x)
    assert len(ref) == 3
    for schedule in sweep_inprocess.SCHEDULES:
        got = sweep_inprocess.Runner(sweep_inprocess.Setting(2, 1, schedule))(x)  # 2 + a partial batch of 1
        assert len(got) == 3, schedule
        for (b0, v0), (b1, v1) in zip(ref, got, strict=True):
            np.testing.assert_allclose(v1, v0, atol=1.0, err_msg=schedule)
            assert b1.shape == b0.shape, schedule


def test_sweep_keeps_going_past_a_failing_setting_and_a_study_gets_a_verdict(study, monkeypatch) -> None:
    hu, meta = decode_series(study.files)
    grid = [sweep_inprocess.Setting(2, 1, "sequential"), sweep_inprocess.Setting(4, 1, "concurrent")]
    real = sweep_inprocess.measure

    def measure(s, x):
        if s.schedule == "concurrent":
            raise RuntimeError("refused")
        return real(s, x)

    monkeypatch.setattr(sweep_inprocess, "measure", measure)
    res = sweep_inprocess.sweep(sweep_inprocess.tile(hu[:2, None], 4), grid)
    assert res["best"]["schedule"] == "sequential" and res["best"]["slices"] == 4
    assert res["runs"][1]["error"] == "RuntimeError: refused"
    assert sweep_inprocess.best_settings(res) == [grid[0]]
    one = sweep_inprocess.study_in_process(grid[0], hu, meta)
    assert one["slices"] == 8 and one["verdict"] in ("positive", "negative", "indeterminate")
    assert one["wall_s"] >= one["models_and_postprocess_s"]


# --- the MONAI Deploy App SDK peer ---------------------------------------------------------------------


def test_the_sdk_peer_says_why_it_cannot_run(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CTSCREEN_MONAI_VENV", str(tmp_path / "none"))
    assert "run scripts/setup_monai_peer.sh once" in monai_sdk.unavailable()
    with pytest.raises(monai_sdk.BenchError, match="no MONAI Deploy SDK environment"):
        monai_sdk.run("http://127.0.0.1:1", [])


@pytest.mark.triton
@pytest.mark.skipif(monai_sdk.unavailable() is not None, reason=str(monai_sdk.unavailable()))
def test_the_sdk_client_reaches_the_in_process_verdict(triton, study) -> None:
    """The SDK's own TritonRemoteModel (valid_area, lesion) against the same Triton reaches the verdict
    the same models reach in process."""
    sdk = monai_sdk.run(f"http://{triton.http_url}", [study])
    assert sdk["studies"] == 1 and sdk["slices"] == 8 and sdk["versions"]["monai-deploy-app-sdk"] != "missing"
    hu, meta = decode_series(study.files)
    ref = sweep_inprocess.study_in_process(sweep_inprocess.Setting(8, 1, "sequential"), hu, meta)
    assert sdk["runs"][0]["verdict"] == ref["verdict"] == "positive"


# --- the GPU script ------------------------------------------------------------------------------------


def _script(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "benchmarks/gpu_paper_profile.py", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_gpu_run_dry_run_plans_every_path_within_8_minutes() -> None:
    out = _script("run", "--dry-run", "--out", "/tmp/ctscreen-paper")
    assert out.returncode == 0, out.stderr
    assert "budget 480 s" in out.stdout
    if not gpu.gpu_present():
        for path in gpu.PATHS:
            assert f"# {path}" in out.stdout
    assert "--untrained --profile paper" in out.stdout and "build_trt_engines.sh" in out.stdout
    assert "repo build --profile gpu-ort" in out.stdout and "CUDA in process" in out.stdout
    assert "PyTorch CUDA in process" in out.stdout


def test_the_strongest_path_the_node_has_is_chosen() -> None:
    node = {"gpu": True, "tritonserver": None, "backends": [], "trtexec": None, "ort_providers": ["CPUExecutionProvider"],
            "torch_cuda": None}
    assert gpu.choose_path(node) is None
    assert gpu.choose_path({**node, "torch_cuda": "torch 2.11.0, NVIDIA H200"}) == "torch-cuda"
    assert gpu.choose_path({**node, "torch_cuda": "x", "ort_providers": ["CUDAExecutionProvider"]}) == "ort-cuda"
    assert gpu.choose_path({**node, "torch_cuda": "x", "tritonserver": "/opt/tritonserver/bin/tritonserver",
                            "backends": ["onnxruntime", "tensorrt"], "trtexec": "/usr/bin/trtexec"}) == "triton-tensorrt"
    assert gpu.choose_path({**node, "gpu": False, "torch_cuda": "x"}) is None


def test_the_torch_path_screens_a_study_on_the_cpu_with_either_maps() -> None:
    """The torch-cuda path's study loop, on the CPU with the lite networks (the paper's would take minutes
    here): every slice is post-processed, from the networks' own maps or from the maps given, slice i
    from map i % M."""
    pytest.importorskip("segmentation_models_pytorch", reason="needs the train extra (torch)")
    from benchmarks.perf import sample_slices
    from ctscreen.postprocess import postprocess_batch
    from training.nets import build

    nets = {m: build(m, "lite").eval() for m in ("valid_area", "lesion")}
    hu = sample_slices(3)
    own = gpu.torch_study(nets, hu, 2, precision="fp32", workers=2)  # 2 + a partial batch of 1
    assert own["slices"] == 3 and own["batch"] == 2 and own["slices_per_s"] > 0
    assert set(own["ms_per_slice_by_stage"]) == {"h2d", "models", "d2h", "post"}
    assert own["ms_per_slice_by_stage"]["post"] > 0 and own["ms_per_slice_by_stage"]["models"] > 0

    valid = np.zeros((2, 1, 512, 512), np.float32)
    valid[:, :, 100:420, 60:460] = 0.9
    lesion = np.zeros_like(valid)
    lesion[0, 0, 200:240, 120:170] = 0.9  # map 0 has a lesion, map 1 none
    given = gpu.torch_study(nets, hu, 1, precision="fp16", post_maps=(valid, lesion), workers=1)  # autocast: CUDA only
    idx = np.arange(3) % 2
    _, counts, _ = postprocess_batch(valid[idx], lesion[idx], hu)
    assert given["boxes"] == int(counts.sum()) == 2  # slices 0 and 2 from map 0, slice 1 from map 1

    from benchmarks import report  # the report's GPU table gets a column per stage

    doc = {"path": "torch-cuda", "study": own, "runs": [given], "machine": {"gpu": "NVIDIA H200"},
           "summary": {"study_slices": 3, "seconds_per_500_slice_study": 1.0, "ms_per_slice": 2.0}}
    table = report.gpu_markdown(doc)
    assert "| precision | batch | concurrency | slices/s | s per 500 slices | h2d ms/slice | models ms/slice |" in table[6]
    assert table[8].startswith("| fp32 | 2 | 1 |") and table[9].startswith("| fp16 | 1 | 1 |")
    assert "PyTorch in process (not Triton" in table[2]
    with pytest.raises(ValueError, match='"precision"'):
        gpu.torch_study(nets, hu, 2, precision="int8")


@pytest.mark.skipif(gpu.gpu_present(), reason="a GPU is here")
def test_gpu_run_without_a_gpu_exits_2_with_one_line() -> None:
    out = _script("run", "--out", "/tmp/ctscreen-paper")
    assert out.returncode == 2 and "no GPU path on this node" in out.stderr and "Traceback" not in out.stderr


def test_gpu_cpu_smoke_writes_stamped_figures(tmp_path: Path) -> None:
    res = tmp_path / "gpu.json"
    out = _script("run", "--cpu-smoke", "--slices", "4", "--results", str(res), timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(res.read_text())
    assert doc["smoke"] is True and doc["path"] == "ort-cpu-smoke" and doc["study"]["slices"] >= 4
    assert doc["summary"]["seconds_per_500_slice_study"] > 0 and doc["summary"]["ms_per_slice"] > 0
    assert doc["machine"]["models"] and doc["budget_s"] == 480

    # the report picks it up as its GPU section, labelled with the path it took
    from benchmarks import report

    (tmp_path / "gpu-latest.json").write_text(res.read_text())
    report.build(tmp_path, update_readme=False)
    page = (tmp_path / "report.md").read_text()
    assert "## The paper profile on a GPU" in page and "`ort-cpu-smoke`: ONNX Runtime on the CPU (a smoke run" in page
    rows = [line for line in page.split("## The paper profile on a GPU")[1].splitlines() if line.startswith("| fp16 |")]
    assert len(rows) == 1 + len(doc["runs"])


def test_the_budget_skips_what_would_not_fit() -> None:
    now = [0.0]
    budget = gpu.Budget(100, reserve=10, clock=lambda: now[0])

    def measure(item: int) -> dict:
        now[0] += item
        return {"item": item}

    out = gpu.within(budget, [30, 40, 20, 5], measure, first_estimate=30)
    # 30 (60 s left), 40 (20 s left), then the next would need the 40 s the longest took: skipped, the last too
    assert [r["item"] for r in out.runs] == [30, 40]
    assert len(out.stopped) == 2 and "skipped, 20 s left, ~40 s needed" in out.stopped[0]
    assert budget.left() == 20 and budget.timeout() == 20
    now[0] = 200
    assert budget.timeout() == 1.0 and not budget.fits(0)
