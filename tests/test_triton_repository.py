"""The rendered model repositories (cpu, gpu, gpu-ort) without a server: configs, ONNX files, CLI.

TensorRT and a GPU are not available here: the gpu profile is checked as far as it can be without
them (configs parse as Triton ModelConfig protobufs, names/dtypes/shapes match the contracts and the
ONNX files, the TensorRT-ready ONNX computes the same maps as the original under ONNX Runtime, and
scripts/build_trt_engines.sh issues the right trtexec command, run with a stand-in trtexec).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ctscreen import contracts as c
from ctscreen.repo import (
    MARKER,
    PROFILES,
    SOURCE_DIR,
    ProfileSettings,
    RepositoryError,
    build_repository,
    check_onnx,
    default_settings,
    hu_cast_onnx,
    tensorrt_ready_onnx,
)

ROOT = Path(__file__).resolve().parent.parent
ONNX_TYPES = {onnx.TensorProto.INT16: mc.TYPE_INT16, onnx.TensorProto.FLOAT: mc.TYPE_FP32}
SLICE = [1, c.SLICE_SIZE, c.SLICE_SIZE]


@pytest.fixture(scope="module", params=PROFILES)
def rendered(request, tmp_path_factory) -> tuple[str, Path]:
    profile = request.param
    return profile, build_repository(profile, tmp_path_factory.mktemp(profile) / "repo")


def load_config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def configs(repo: Path) -> dict[str, mc.ModelConfig]:
    return {p.parent.name: load_config(p) for p in sorted(repo.glob("*/config.pbtxt"))}


def io(config: mc.ModelConfig, kind: str) -> dict[str, tuple[int, list[int]]]:
    return {t.name: (t.data_type, list(t.dims)) for t in getattr(config, kind)}


def test_every_config_parses_and_names_its_folder(rendered) -> None:
    profile, repo = rendered
    cfgs = configs(repo)
    expected = {c.VALID_AREA_MODEL, c.LESION_MODEL, c.POSTPROCESS_MODEL, c.ENSEMBLE_MODEL}
    extra = {"gpu": {c.HU_CAST_MODEL}, "gpu-ort": {c.HU_CAST_MODEL}, "cpu": {c.FUSED_MODEL}}.get(profile, set())
    assert set(cfgs) == expected | extra
    for name, config in cfgs.items():
        assert config.name == name
        assert (repo / name / "1").is_dir()


def test_every_model_but_the_ensemble_schedules_by_priority(rendered) -> None:
    """Every model Triton schedules has the priority levels the gateway's requests name (an urgent study's go
    first, ``gateway.jobs.triton_priority``), with routine the level of a request that names none; the
    ensemble has no queue of its own: Triton passes its requests' priority to its steps."""
    _, repo = rendered
    for name, config in configs(repo).items():
        if name == c.ENSEMBLE_MODEL:
            assert config.platform == "ensemble" and not config.HasField("dynamic_batching")
            continue
        batcher = config.dynamic_batching
        if name == c.FUSED_MODEL:  # measured slower with them (docs/triton.md, "Priority")
            assert config.HasField("dynamic_batching") and batcher.priority_levels == 0
            continue
        assert config.HasField("dynamic_batching"), name
        assert (batcher.priority_levels, batcher.default_priority_level) == (2, 2), name
        assert (c.PRIORITY_LEVELS, c.DEFAULT_PRIORITY_LEVEL) == (2, 2)


def test_segmentation_models_match_contract_and_onnx(rendered) -> None:
    profile, repo = rendered
    settings = json.loads((repo / MARKER).read_text())["settings"]
    want_input = mc.TYPE_FP32 if profile.startswith("gpu") else mc.TYPE_INT16
    for name in c.SEGMENTATION_MODELS:
        config = load_config(repo / name / "config.pbtxt")
        assert io(config, "input") == {c.HU_SLICES: (want_input, SLICE)}
        assert io(config, "output") == {c.PROB: (mc.TYPE_FP32, SLICE)}
        graph = onnx.load(str(repo / name / "1" / "model.onnx")).graph
        (gi,), (go,) = graph.input, graph.output
        assert (gi.name, ONNX_TYPES[gi.type.tensor_type.elem_type]) == (c.HU_SLICES, want_input)
        assert (go.name, ONNX_TYPES[go.type.tensor_type.elem_type]) == (c.PROB, mc.TYPE_FP32)
        assert [d.dim_value for d in gi.type.tensor_type.shape.dim][1:] == SLICE
        # batching: preferred sizes within max, warm-up at 1 and a larger batch, one version served
        assert config.max_batch_size == settings["max_batch_size"]
        batcher = config.dynamic_batching
        assert list(batcher.preferred_batch_size) == settings["preferred_batch_sizes"]
        assert max(batcher.preferred_batch_size) <= config.max_batch_size
        assert batcher.max_queue_delay_microseconds == settings["max_queue_delay_us"]
        assert [w.batch_size for w in config.model_warmup] == [1, settings["warmup_batch"]]
        assert all(set(w.inputs) == {c.HU_SLICES} for w in config.model_warmup)
        assert config.version_policy.latest.num_versions == 1
        kind = {"cpu": mc.ModelInstanceGroup.KIND_CPU}.get(profile, mc.ModelInstanceGroup.KIND_GPU)
        assert [g.kind for g in config.instance_group] == [kind]
        if profile == "cpu":
            assert config.backend == "python" and (repo / name / "1" / "model.py").is_file()
            assert config.parameters["intra_op_thread_count"].string_value == str(
                settings["intra_op_threads"]
            )
            assert config.parameters["run_batch_size"].string_value == str(settings["run_batch"]) == "1"
        elif profile == "gpu":
            assert config.platform == "tensorrt_plan" and config.default_model_filename == "model.plan"
        else:
            assert config.backend == "onnxruntime"
            (accel,) = config.optimization.execution_accelerators.gpu_execution_accelerator
            assert accel.name == "tensorrt" and accel.parameters["precision_mode"] == "FP16"
            assert (
                accel.parameters["trt_profile_max_shapes"]
                == f"{c.HU_SLICES}:{config.max_batch_size}x1x512x512"
            )


def test_postprocess_and_ensemble_match_contract(rendered) -> None:
    profile, repo = rendered
    cfgs = configs(repo)
    pp, ens = cfgs[c.POSTPROCESS_MODEL], cfgs[c.ENSEMBLE_MODEL]
    outputs = {
        c.LESION_BOXES: (mc.TYPE_FP32, [-1, 5]),
        c.BOX_COUNT: (mc.TYPE_INT32, [1]),
        c.VALID_AREA_BOX: (mc.TYPE_FP32, [4]),
    }
    assert pp.backend == "python"
    assert io(pp, "input") == {
        c.VALID_PROB: (mc.TYPE_FP32, SLICE),
        c.LESION_PROB: (mc.TYPE_FP32, SLICE),
        c.HU_SLICES: (mc.TYPE_INT16, SLICE),  # the raw HU, also on the gpu profiles (lung-field check)
    }
    assert io(pp, "output") == outputs
    assert pp.parameters["prob_cutoff"].string_value == str(c.PROB_CUTOFF)
    assert pp.parameters["min_box_area"].string_value == str(c.MIN_BOX_AREA)
    assert ens.platform == "ensemble"
    assert io(ens, "input") == {c.HU_SLICES: (mc.TYPE_INT16, SLICE)}
    assert io(ens, "output") == outputs
    assert 0 < ens.max_batch_size <= min(cfg.max_batch_size for cfg in cfgs.values() if cfg is not ens)
    # every step's tensors exist: each consumed name is the ensemble input or produced by an earlier step
    produced = {c.HU_SLICES}
    for step in ens.ensemble_scheduling.step:
        model = cfgs[step.model_name]
        assert set(step.input_map) == {t.name for t in model.input}
        assert set(step.output_map) <= {t.name for t in model.output}
        assert set(step.input_map.values()) <= produced, step.model_name
        produced |= set(step.output_map.values())
    assert set(outputs) <= produced
    order = [s.model_name for s in ens.ensemble_scheduling.step]
    assert order[-1] == c.POSTPROCESS_MODEL
    assert (order[0] == c.HU_CAST_MODEL) == profile.startswith("gpu")


def test_cpu_fused_model_has_the_ensemble_contract_and_its_settings(rendered) -> None:
    """The cpu profile's fused model answers exactly what the ensemble answers (a client picks either by
    name), with the segmentation models' instances, threads and slices per call and the post-processing
    thresholds, and vendors a verbatim copy of the in-process reference it runs."""
    profile, repo = rendered
    cfgs = configs(repo)
    if profile != "cpu":
        assert c.FUSED_MODEL not in cfgs
        return
    fused, ens, lesion = cfgs[c.FUSED_MODEL], cfgs[c.ENSEMBLE_MODEL], cfgs[c.LESION_MODEL]
    assert fused.backend == "python"
    assert io(fused, "input") == io(ens, "input") and io(fused, "output") == io(ens, "output")
    assert fused.max_batch_size == ens.max_batch_size
    assert fused.instance_group[0].count == lesion.instance_group[0].count
    for key in ("run_batch_size", "allow_spinning"):
        assert fused.parameters[key].string_value == lesion.parameters[key].string_value, key
    # the nets run in turn in a fused instance: its threads may fill the cores the two share side by side
    threads = int(fused.parameters["intra_op_thread_count"].string_value)
    settings = json.loads((repo / MARKER).read_text())["settings"]
    assert threads == settings["fused_threads"] >= settings["intra_op_threads"]
    assert fused.parameters["prob_cutoff"].string_value == str(c.PROB_CUTOFF)
    assert fused.parameters["min_box_area"].string_value == str(c.MIN_BOX_AREA)
    models = json.loads(fused.parameters["models"].string_value)
    for name in c.SEGMENTATION_MODELS:  # the files it loads are the ones its provenance names
        onnx = repo / c.FUSED_MODEL / "1" / f"{name}.onnx"
        assert models[name]["sha256"] == hashlib.sha256(onnx.read_bytes()).hexdigest()
    for name in ("__init__.py", "contracts.py", "lungs.py", "postprocess.py", "machine.py", "reference.py"):
        vendored = repo / c.FUSED_MODEL / "1" / "ctscreen" / name
        assert vendored.read_bytes() == (ROOT / "ctscreen" / name).read_bytes()


def test_postprocess_vendors_a_verbatim_copy(rendered) -> None:
    _, repo = rendered
    for name in ("__init__.py", "contracts.py", "lungs.py", "postprocess.py"):
        vendored = repo / c.POSTPROCESS_MODEL / "1" / "ctscreen" / name
        assert vendored.read_bytes() == (ROOT / "ctscreen" / name).read_bytes()


def test_cpu_thread_counts_do_not_oversubscribe() -> None:
    """Each model's instances together fit the cores (one model can fill them while the other waits),
    and on more than one core the lesion net gets more than one instance."""
    cores = len(os.sched_getaffinity(0))
    settings = default_settings("cpu")
    assert settings.intra_op_threads * settings.instance_count <= max(cores, 1)
    assert settings.postprocess_instances == settings.instance_count
    if cores >= 2:
        assert settings.instance_count >= 2


@pytest.mark.parametrize("cores", [1, 2, 3, 4, 8, 16])
def test_fused_instances_take_every_core_and_no_more(cores, monkeypatch) -> None:
    """The fused model runs the two nets in turn: its instances times its threads fill the cores (up to
    rounding), where the segmentation models' threads are halved because they run side by side."""
    import ctscreen.repo as repo_module

    monkeypatch.setattr(repo_module.machine, "cores", lambda: cores)
    s = default_settings("cpu")
    assert s.instance_count * s.fused_threads <= cores < s.instance_count * (s.fused_threads + 1)


def test_tensorrt_ready_onnx_computes_the_same_maps(tmp_path) -> None:
    src = SOURCE_DIR / c.LESION_MODEL / "1" / "model.onnx"
    dst = tensorrt_ready_onnx(src, tmp_path / "model.onnx")
    hu = np.random.default_rng(0).integers(-1024, 3000, (2, *SLICE)).astype(np.int16)
    want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {c.HU_SLICES: hu})[0]
    session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float)"
    got = session.run(None, {c.HU_SLICES: hu.astype(np.float32)})[0]
    np.testing.assert_array_equal(got, want)


def test_tensorrt_ready_onnx_refuses_an_int16_op(tmp_path) -> None:
    from onnx import TensorProto, helper

    shape = ["B", *SLICE]
    graph = helper.make_graph(
        [helper.make_node("Neg", [c.HU_SLICES], [c.PROB])],
        "g",
        [helper.make_tensor_value_info(c.HU_SLICES, TensorProto.INT16, shape)],
        [helper.make_tensor_value_info(c.PROB, TensorProto.INT16, shape)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "bad.onnx")
    with pytest.raises(RepositoryError, match="feeds Neg"):
        tensorrt_ready_onnx(tmp_path / "bad.onnx", tmp_path / "out.onnx")
    with pytest.raises(RepositoryError, match="output 'PROB' must be FLOAT"):
        check_onnx(tmp_path / "bad.onnx")


def test_hu_cast_is_exact(tmp_path) -> None:
    path = hu_cast_onnx(tmp_path / "cast.onnx")
    hu = np.zeros((1, *SLICE), np.int16)
    hu[0, 0, 0, :5] = [-32768, -1024, 0, 3071, 32767]
    (out,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {c.HU_SLICES: hu})
    assert out.dtype == np.float32 and out.tolist() == hu.astype(np.float32).tolist()


def test_missing_onnx_names_the_path(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "valid_area" / "1" / "model.onnx")):
        build_repository("cpu", tmp_path / "out", onnx_dir=tmp_path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_batch_size": 0}, '"max_batch_size" must be >= 1'),
        ({"preferred_batch_sizes": (4, 16)}, '"preferred_batch_sizes" must be'),
        ({"intra_op_threads": 0}, '"intra_op_threads" must be >= 1'),
        ({"run_batch": -1}, '"run_batch" must be >= 0'),
        ({"warmup_batch": 9}, '"warmup_batch" must be <= max_batch_size'),
    ],
)
def test_bad_settings_are_refused(changes, message) -> None:
    base = dict(max_batch_size=8, preferred_batch_sizes=(4, 8), max_queue_delay_us=0)
    with pytest.raises(RepositoryError, match=message):
        ProfileSettings(**{**base, **changes})


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ctscreen.cli", *args], capture_output=True, text=True, timeout=120, **kw
    )


def test_cli_renders_and_replaces_only_its_own_folder(tmp_path) -> None:
    out = tmp_path / "repo"
    done = run_cli("repo", "build", "--profile", "cpu", "--out", str(out), "--threads", "1", "--run-batch", "0")
    assert done.returncode == 0, done.stderr
    assert (out / MARKER).is_file() and (out / c.ENSEMBLE_MODEL / "config.pbtxt").is_file()
    lesion = load_config(out / c.LESION_MODEL / "config.pbtxt")
    assert lesion.parameters["run_batch_size"].string_value == "0"
    again = run_cli("repo", "build", "--profile", "gpu", "--out", str(out))
    assert again.returncode == 0 and (out / "hu_cast").is_dir()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    refused = run_cli("repo", "build", "--profile", "cpu", "--out", str(foreign))
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"ctscreen repo: refusing to replace {foreign}: it is not empty and was not rendered by ctscreen"
    ]
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_cli_bad_setting_is_one_line(tmp_path) -> None:
    done = run_cli(
        "repo", "build", "--profile", "cpu", "--out", str(tmp_path / "r"), "--preferred-batch-sizes", "4,x"
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "--preferred-batch-sizes" in done.stderr


def test_trt_build_script_issues_the_right_trtexec_command(tmp_path) -> None:
    """Runs scripts/build_trt_engines.sh --dry-run (a stand-in trtexec: no GPU or TensorRT here)."""
    src = build_repository("gpu", tmp_path / "src")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    script = str(ROOT / "scripts" / "build_trt_engines.sh")
    done = subprocess.run(
        ["bash", script, "--repo", str(src), "--out", str(tmp_path / "dst"), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    calls = [line.split()[2:] for line in done.stdout.splitlines() if line.startswith("[dry-run] trtexec")]
    assert len(calls) == 2
    for name, args in zip(c.SEGMENTATION_MODELS, calls, strict=True):
        flags = dict(a.split("=", 1) for a in args if "=" in a)
        assert flags["--onnx"] == str(src / name / "1" / "model.onnx")  # the FP32-input graph
        config = load_config(src / name / "config.pbtxt")
        assert flags["--minShapes"] == f"{c.HU_SLICES}:1x1x512x512"
        assert flags["--optShapes"] == f"{c.HU_SLICES}:16x1x512x512"
        assert flags["--maxShapes"] == f"{c.HU_SLICES}:{config.max_batch_size}x1x512x512"
        assert "--fp16" in args
        plan = tmp_path / "dst" / name / "1" / "model.plan"
        # copied out of the cache (issue 18: pruning the cache never takes a plan from a running pod)
        assert plan.is_file() and not plan.is_symlink() and plan.stat().st_size > 0
    assert (tmp_path / "dst" / c.HU_CAST_MODEL / "1" / "model.onnx").is_file()
    wrong = subprocess.run(
        ["bash", script, "--repo", str(src), "--out", str(tmp_path / "d2"), "--max-batch", "64", "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert wrong.returncode != 0 and "differs from max_batch_size" in wrong.stderr


def test_the_documented_repo_build_usage_names_every_option(capsys):
    """docs/triton.md's usage line left out --fused-threads."""
    import re

    from ctscreen.repo import main as repo_main

    with pytest.raises(SystemExit):
        repo_main(["build", "--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    doc = (ROOT / "docs" / "triton.md").read_text()
    block = doc[doc.index("ctscreen repo build --profile"):].split("```")[0]
    assert set(re.findall(r"--[\w-]+", block)) == set(re.findall(r"--[\w-]+", usage)) - {"--help"}


def test_ctscreen_help_names_every_profile_repo_build_renders(capsys):
    """``ctscreen --help`` said ``repo``: "render the Triton model repository (cpu or gpu profile)", while
    ``repo build --profile`` takes gpu-ort too (TensorRT absent: ONNX Runtime's CUDA provider)."""
    import re

    from ctscreen.cli import main
    from ctscreen.repo import PROFILES

    assert main(["--help"]) == 0
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("repo ")]
    assert set(PROFILES) <= set(re.findall(r"[\w-]+", line)), line
