"""The ct_screen ensemble on the real embedded tritonserver (cpu profile), over real gRPC.

Two servers: the session ``triton`` fixture serves the shipped ONNX models and is compared with the
in-process reference pipeline (ONNX Runtime on the same files + ``ctscreen.postprocess``); a
module-scoped one serves analytic stand-ins (tests/triton_analytic.py) whose boxes are known in
advance, for the known-answer and numpy < 2 checks.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from benchmarks.cpu_split import stat_fields
from ctscreen import contracts as c
from ctscreen.embedded import MALLOC_ENV, EmbeddedTriton
from ctscreen.postprocess import postprocess_batch, unpack_boxes
from ctscreen.repo import build_repository, default_settings
from tests.triton_analytic import KNOWN_BOXES, known_slice, write_analytic_models

pytestmark = pytest.mark.triton

OUTPUTS = (c.LESION_BOXES, c.BOX_COUNT, c.VALID_AREA_BOX)
MAX_BATCH = default_settings("cpu").max_batch_size


def infer(
    url: str, hu: np.ndarray, model: str = c.ENSEMBLE_MODEL, dtype: str = "INT16"
) -> dict[str, np.ndarray]:
    with grpcclient.InferenceServerClient(url) as client:
        inp = grpcclient.InferInput(c.HU_SLICES, list(hu.shape), dtype)
        inp.set_data_from_numpy(hu)
        result = client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput(n) for n in OUTPUTS])
        return {n: result.as_numpy(n) for n in OUTPUTS}


def reference(repo: Path, hu: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The in-process pipeline: ONNX Runtime on the served ONNX files (same thread settings) + postprocess."""
    import onnxruntime as ort

    threads = json.loads((repo / ".ctscreen-repo.json").read_text())["settings"]["intra_op_threads"]
    maps = []
    for name in c.SEGMENTATION_MODELS:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        session = ort.InferenceSession(
            str(repo / name / "1" / "model.onnx"), so, providers=["CPUExecutionProvider"]
        )
        maps.append(session.run([c.PROB], {c.HU_SLICES: hu})[0])
    return postprocess_batch(*maps, hu)


@functools.lru_cache(maxsize=1)
def phantom_slices() -> np.ndarray:
    """Three 512 x 512 INT16 slices [3, 1, 512, 512]: two with the most COVID lesion and one without.

    From ``phantom.make_study`` when it exists, else a synthetic chest with blobs drawn here.
    """
    try:
        from phantom import make_study

        study = make_study(seed=7, kind="covid", n_slices=10, matrix=c.SLICE_SIZE)
        hu = np.asarray(study.hu)
        lesion = np.asarray(study.lesion_mask).reshape(len(hu), -1).sum(axis=1)
        picks = sorted(np.argsort(-lesion, kind="stable")[:2].tolist() + [int(np.argmin(lesion))])
        return hu[picks][:, None].astype(np.int16)
    except ImportError:
        pass
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[: c.SLICE_SIZE, : c.SLICE_SIZE]
    out = np.full((3, 1, c.SLICE_SIZE, c.SLICE_SIZE), -1000, np.int16)
    for i in range(3):
        out[i, 0][((xx - 256) / 220) ** 2 + ((yy - 256) / 170) ** 2 <= 1] = 40
        for cx in (170, 342):
            out[i, 0][((xx - cx) / 70) ** 2 + ((yy - 250) / 120) ** 2 <= 1] = -850
        for _ in range(2 * i):
            x, y, r = rng.integers(130, 380), rng.integers(160, 340), rng.integers(4, 18)
            out[i, 0][(xx - x) ** 2 + (yy - y) ** 2 <= r * r] = rng.integers(-650, -100)
        out[i, 0] += rng.normal(0, 15, (c.SLICE_SIZE, c.SLICE_SIZE)).astype(np.int16)
    return out


def assert_same_boxes(got: dict[str, np.ndarray], want: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    boxes, counts, valid = want
    np.testing.assert_array_equal(got[c.BOX_COUNT], counts)
    np.testing.assert_array_equal(got[c.VALID_AREA_BOX], valid)
    for g, w in zip(
        unpack_boxes(got[c.LESION_BOXES], got[c.BOX_COUNT]), unpack_boxes(boxes, counts), strict=True
    ):
        np.testing.assert_array_equal(g[:, :4], w[:, :4])
        np.testing.assert_allclose(g[:, 4], w[:, 4], rtol=1e-5)


# --- the session server: shipped models ---------------------------------------------------------


def test_every_model_is_ready(triton: EmbeddedTriton) -> None:
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        assert client.is_server_ready()
        index = {m.name: m.state for m in client.get_model_repository_index().models}
    expected = {c.VALID_AREA_MODEL, c.LESION_MODEL, c.POSTPROCESS_MODEL, c.ENSEMBLE_MODEL, c.FUSED_MODEL}
    assert expected <= set(index)
    assert {index[name] for name in expected} == {"READY"}


@pytest.fixture(scope="module")
def shipped_reference(triton: EmbeddedTriton) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return reference(triton.repo_dir, phantom_slices())


# the cpu profile serves the same screen twice: the ensemble, and the fused model (its three steps in one stub)
SCREEN_MODELS = pytest.mark.parametrize("model", [c.ENSEMBLE_MODEL, c.FUSED_MODEL])


@SCREEN_MODELS
def test_ensemble_equals_in_process_reference(triton: EmbeddedTriton, shipped_reference, model: str) -> None:
    hu = phantom_slices()
    got = infer(triton.grpc_url, hu, model)
    assert got[c.LESION_BOXES].shape[0] == len(hu) and got[c.LESION_BOXES].shape[2] == 5
    assert got[c.BOX_COUNT].shape == (len(hu), 1) and got[c.VALID_AREA_BOX].shape == (len(hu), 4)
    assert_same_boxes(got, shipped_reference)


@SCREEN_MODELS
def test_one_slice_per_request_equals_reference(triton: EmbeddedTriton, shipped_reference, model: str) -> None:
    """Single-slice requests (what the dynamic batcher merges) give the same answer."""
    hu, want = phantom_slices(), shipped_reference
    for i in range(len(hu)):
        got = infer(triton.grpc_url, hu[i : i + 1], model)
        assert_same_boxes(got, tuple(w[i : i + 1] for w in want))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("hu", "dtype", "message"),
    [
        (np.zeros((1, 1, 512, 512), np.float32), "FP32", "input 'HU_SLICES' data-type is 'FP32'"),
        (np.zeros((1, 1, 256, 256), np.int16), "INT16", "unexpected shape for input 'HU_SLICES'"),
        (np.zeros((1, 512, 512), np.int16), "INT16", "unexpected shape for input 'HU_SLICES'"),
        (np.zeros((MAX_BATCH + 1, 1, 512, 512), np.int16), "INT16", f"batch-size must be <= {MAX_BATCH}"),
    ],
    ids=["fp32", "256x256", "no-channel", "batch-too-big"],
)
@SCREEN_MODELS
def test_bad_request_gets_clear_error_and_server_keeps_serving(
    triton: EmbeddedTriton, hu: np.ndarray, dtype: str, message: str, model: str
) -> None:
    with pytest.raises(InferenceServerException) as info:
        infer(triton.grpc_url, hu, model, dtype=dtype)
    assert message in str(info.value)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert infer(triton.grpc_url, np.full((1, 1, 512, 512), -1000, np.int16), model)[c.BOX_COUNT].shape == (1, 1)


@SCREEN_MODELS
def test_served_configs_carry_model_provenance(triton: EmbeddedTriton, model: str) -> None:
    """The gateway fills CaseResult.models from the called model's ``models`` parameter."""
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        config = client.get_model_config(model, as_json=True)["config"]
        models = json.loads(config["parameters"]["models"]["string_value"])
        for name in c.SEGMENTATION_MODELS:
            served = triton.repo_dir / name / "1" / "model.onnx"
            assert models[name]["sha256"] == hashlib.sha256(served.read_bytes()).hexdigest()
            card = json.loads((served.parent / "model_card.json").read_text())
            assert models[name]["version"] == card["version"]
            own = client.get_model_config(name, as_json=True)["config"]["parameters"]
            assert own["sha256"]["string_value"] == models[name]["sha256"]


def test_fused_model_runs_its_vendored_copy_on_the_served_onnx_files(triton: EmbeddedTriton) -> None:
    """The fused model loads the very ONNX files of the ensemble's steps (hard links in its version folder)
    and the ``ctscreen`` rendered with it, never another installed one."""
    version = triton.repo_dir / c.FUSED_MODEL / "1"
    for name in c.SEGMENTATION_MODELS:
        assert (version / f"{name}.onnx").read_bytes() == (triton.repo_dir / name / "1" / "model.onnx").read_bytes()
    log = triton.log_file.read_text()
    assert f"{c.FUSED_MODEL}: {version / 'valid_area.onnx'} + {version / 'lesion.onnx'}" in log
    assert f"(ctscreen.reference from {version / 'ctscreen'})" in log
    assert triton.screen_model == c.FUSED_MODEL


def test_postprocess_runs_the_vendored_copy(triton: EmbeddedTriton) -> None:
    """The rendered postprocess model imports ctscreen from its own folder, not from this checkout."""
    vendored = triton.repo_dir / c.POSTPROCESS_MODEL / "1" / "ctscreen"
    assert f"ctscreen.postprocess from {vendored}" in triton.log_file.read_text()


def test_segmentation_stubs_run_the_configured_slices_per_call(triton: EmbeddedTriton) -> None:
    """Each cpu-profile stub read ``run_batch_size`` from its rendered config (one slice per ONNX Runtime
    call by default; the splitting itself is tested in tests/test_triton_runner.py)."""
    want = json.loads((triton.repo_dir / ".ctscreen-repo.json").read_text())["settings"]["run_batch"]
    said = re.compile(rf"run_batch_size={want}\b")
    lines = triton.log_file.read_text().splitlines()
    for name in c.SEGMENTATION_MODELS:
        assert any(f"{name}: " in line and said.search(line) for line in lines), name


def _stub_faults(server: EmbeddedTriton, model: str) -> int:
    """Minor page faults so far of the server's python stubs that run ``model`` (its instances together)."""
    total = 0
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            stat = stat_fields(proc.name)
        except (OSError, ValueError):
            continue  # not a process, or one that ended
        if int(stat[1]) == server.pid and f"/{model}/1/model.py".encode() in b" ".join(cmdline):
            total += int(stat[7])  # minflt
    return total


def _faults_a_slice(server: EmbeddedTriton, model: str, stub: str, requests: int = 10) -> float:
    hu = phantom_slices()[:2]
    with ThreadPoolExecutor(4) as pool:  # requests in flight together: every instance has run this shape
        list(pool.map(lambda _: infer(server.grpc_url, hu, model), range(16)))
    before = _stub_faults(server, stub)
    for _ in range(requests):
        infer(server.grpc_url, hu, model)
    return (_stub_faults(server, stub) - before) / (requests * len(hu))


def _environ(server: EmbeddedTriton) -> dict[str, str]:
    raw = Path(f"/proc/{server.pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw if item)


@pytest.fixture(scope="module")
def glibc_malloc(tmp_path_factory: pytest.TempPathFactory):
    """The shipped cpu repository on a server given glibc's malloc defaults (every MALLOC_ENV name removed)."""
    log = tmp_path_factory.mktemp("glibc-malloc") / "tritonserver.log"
    server = EmbeddedTriton(log_file=log, env=dict.fromkeys(MALLOC_ENV)).start()
    try:
        yield server
    finally:
        server.kill()  # a graceful stop unloads for 3-4 s (EmbeddedTriton.kill)


@pytest.mark.parametrize(("model", "stub"), [(c.FUSED_MODEL, c.FUSED_MODEL), (c.ENSEMBLE_MODEL, c.POSTPROCESS_MODEL)])
def test_stubs_keep_their_memory_between_requests(triton: EmbeddedTriton, glibc_malloc: EmbeddedTriton,
                                                  model: str, stub: str) -> None:
    """With ``ctscreen.embedded.MALLOC_ENV`` (in the server's environment, which its stubs inherit) the
    post-processing's slice-sized arrays stay on the stubs' heaps: a request faults no pages in (under one a
    slice here, the bound is 50). With glibc's defaults the memory goes back to the kernel after every request
    and comes back as page faults (700-1000 a slice here), ~1.2 ms of CPU a slice in the fused stubs (docs/triton.md,
    "Memory allocator"). ``env`` removes names from a server's environment."""
    if set(MALLOC_ENV) & set(os.environ) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        pytest.skip("this run's environment sets its own glibc malloc policy, which the servers inherit")
    shipped, defaults = _environ(triton), _environ(glibc_malloc)
    assert {k: shipped.get(k) for k in MALLOC_ENV} == MALLOC_ENV
    assert not set(MALLOC_ENV) & set(defaults)
    kept, returned = _faults_a_slice(triton, model, stub), _faults_a_slice(glibc_malloc, model, stub)
    assert kept < 50 and returned > 100, f"{stub}: {kept:.1f} page faults a slice shipped, {returned:.0f} with glibc's defaults"


def test_metrics_endpoint_counts_inferences(triton: EmbeddedTriton) -> None:
    infer(triton.grpc_url, np.full((1, 1, 512, 512), -1000, np.int16))
    text = urllib.request.urlopen(triton.metrics_url, timeout=10).read().decode()
    assert f'nv_inference_request_success{{model="{c.ENSEMBLE_MODEL}",version="1"}}' in text


# --- a second server: analytic models with known answers -----------------------------------------


@pytest.fixture(scope="module")
def analytic(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("analytic")
    onnx_dir = write_analytic_models(root / "onnx")
    settings = default_settings("cpu")
    repo = build_repository("cpu", root / "repo", onnx_dir=onnx_dir, settings=settings)
    server = EmbeddedTriton(repo, log_file=root / "tritonserver.log").start()
    try:
        yield server
    finally:
        server.kill()  # a graceful stop unloads for 3-4 s (EmbeddedTriton.kill)


def test_known_lesions_give_known_boxes(analytic: EmbeddedTriton) -> None:
    """Regression for numpy >= 2 in the stub (0-byte pb_utils.Tensor): outputs are non-empty and right."""
    got = infer(analytic.grpc_url, known_slice()[None])
    assert got[c.LESION_BOXES].nbytes > 0 and got[c.VALID_AREA_BOX].nbytes > 0
    assert int(got[c.BOX_COUNT][0, 0]) == KNOWN_BOXES
    (boxes,) = unpack_boxes(got[c.LESION_BOXES], got[c.BOX_COUNT])
    centres = sorted(((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in boxes)
    np.testing.assert_allclose(centres, [(129.5, 169.5), (337.5, 307.5)], atol=1.0)
    assert (boxes[:, 4] >= c.PROB_CUTOFF).all()
    np.testing.assert_allclose(got[c.VALID_AREA_BOX][0], [80, 120, 439, 379], atol=1.5)


def test_stub_runs_numpy_below_2(analytic: EmbeddedTriton) -> None:
    log = analytic.log_file.read_text()
    assert "numpy 1." in log, "the python-backend stub must import numpy < 2"


@pytest.mark.parametrize("air", [-1000, -1024])
def test_empty_slice_gives_no_boxes_and_empty_valid_area(analytic: EmbeddedTriton, air: int) -> None:
    hu = np.stack([np.full((1, 512, 512), air, np.int16), known_slice()])
    got = infer(analytic.grpc_url, hu)
    assert got[c.BOX_COUNT][:, 0].tolist() == [0, KNOWN_BOXES]
    assert got[c.VALID_AREA_BOX][0].tolist() == list(c.EMPTY_BOX)
    assert (got[c.LESION_BOXES][0] == -1).all()


def test_analytic_ensemble_equals_reference(analytic: EmbeddedTriton) -> None:
    hu = np.concatenate([phantom_slices(), known_slice()[None]])
    assert_same_boxes(infer(analytic.grpc_url, hu), reference(analytic.repo_dir, hu))


def test_valid_area_counts_only_on_the_lung_field(analytic: EmbeddedTriton) -> None:
    """The ensemble hands the HU to ``postprocess``, which keeps valid-area pixels only on the slice's
    classical lung field: lung-like HU outside the body (a -850 HU cushion on the table) and an air
    pocket in the abdomen too small to be lung are marked by the valid-area model (its band takes any
    -980..-400 HU) but give no valid area, and a lesion there no box; the slice with lungs keeps its
    valid area. (Seen failing with the lung field check removed from ``valid_area_box``.)"""
    abdomen = np.full((1, 512, 512), -1000, np.int16)
    abdomen[0, 90:410, 50:470] = 200  # the body, no lungs
    abdomen[0, 200:215, 240:270] = -850  # a gas pocket of 450 px: below the lung field's 0.4 % floor
    abdomen[0, 420:470, 60:460] = -850  # a cushion under the patient, outside the body
    abdomen[0, 440:460, 200:230] = -300  # a "lesion" on the cushion
    got = infer(analytic.grpc_url, np.stack([abdomen, known_slice()]))
    assert got[c.VALID_AREA_BOX][0].tolist() == list(c.EMPTY_BOX)
    assert got[c.BOX_COUNT][:, 0].tolist() == [0, KNOWN_BOXES]
    np.testing.assert_allclose(got[c.VALID_AREA_BOX][1], [80, 120, 439, 379], atol=1.5)


def diseased_base() -> np.ndarray:
    """A lung base that COVID-19 pneumonia has filled (INT16 [1, 512, 512]): consolidation (-300 HU)
    with aerated lobules (-850 HU, 16 x 16 px) left between it, each far below the lung field's
    0.4 % floor, together 44 % of the lung."""
    hu = np.full((1, 512, 512), -1000, np.int16)
    hu[0, 90:410, 50:470] = 200  # the body
    hu[0, 150:366, 100:412] = -300  # consolidated lung
    for y in range(154, 350, 24):
        for x in range(104, 396, 24):
            hu[0, y : y + 16, x : x + 16] = -850
    return hu


def test_a_lung_filled_by_lesions_keeps_its_valid_area(analytic: EmbeddedTriton) -> None:
    """The lung field takes the lesion net's pixels as seeds: a base whose aerated parts are specks
    between consolidation (a real validation slice lost its valid area so) is one field, so its
    valid area and its lesion box stay. (Seen failing with the seed removed: the valid area came
    back empty and the box with it.)"""
    got = infer(analytic.grpc_url, diseased_base()[None])
    assert tuple(got[c.VALID_AREA_BOX][0].tolist()) != c.EMPTY_BOX
    x0, y0, x1, y1 = got[c.VALID_AREA_BOX][0]
    assert x0 <= 110 and y0 <= 160 and x1 >= 390 and y1 >= 345
    assert got[c.BOX_COUNT][0, 0] >= 1
