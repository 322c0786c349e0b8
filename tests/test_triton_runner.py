"""The cpu profile's python-backend runner (``model_repository/ort_runner/model.py``) outside a server.

Its serving is tested on the real tritonserver (tests/test_triton_server.py: the ensemble equals the
in-process reference, malformed requests get their own errors). What a server cannot show is how the
runner cuts a dynamic batch into ONNX Runtime calls, so this test loads the file with a stand-in for
``triton_python_backend_utils`` (that module exists only inside Triton's stub process) and a real
ONNX Runtime session on the shipped valid_area model, and records the calls.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from ctscreen import contracts as c

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "model_repository" / "ort_runner" / "model.py"
SLICE = (1, c.SLICE_SIZE, c.SLICE_SIZE)


class _Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, array

    def as_numpy(self) -> np.ndarray:
        return self.array


class _Response:
    def __init__(self, output_tensors: list, error: object = None) -> None:
        self.output_tensors, self.error = output_tensors, error


def _stand_in_pb_utils() -> types.ModuleType:
    """The few names of ``triton_python_backend_utils`` the runner uses (a stand-in: see the docstring)."""
    pb = types.ModuleType("triton_python_backend_utils")
    pb.triton_string_to_numpy = {"TYPE_INT16": np.int16, "TYPE_FP32": np.float32}.__getitem__
    pb.TritonModelException = RuntimeError
    pb.TritonError = str
    pb.Tensor = _Tensor
    pb.InferenceResponse = _Response
    pb.Logger = types.SimpleNamespace(log_info=lambda message: None)
    pb.get_input_tensor_by_name = lambda request, name: request.get(name)
    return pb


@pytest.fixture
def runner_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _stand_in_pb_utils())
    spec = importlib.util.spec_from_file_location("ctscreen_ort_runner_under_test", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model(module, run_batch: str, fail_on_call: int | None = None, **params: str):
    """The runner on the shipped valid_area model; its ONNX Runtime calls are recorded (slices per call),
    and call number ``fail_on_call`` (from 1) raises as ONNX Runtime does on a failed run."""
    parameters = {k: {"string_value": v} for k, v in {"run_batch_size": run_batch, **params}.items()}
    config = {
        "name": c.VALID_AREA_MODEL,
        "input": [{"name": c.HU_SLICES, "data_type": "TYPE_INT16", "dims": list(SLICE)}],
        "output": [{"name": c.PROB, "data_type": "TYPE_FP32", "dims": list(SLICE)}],
        "parameters": parameters,
    }
    model = module.TritonPythonModel()
    model.initialize({
        "model_config": json.dumps(config),
        "model_repository": str(ROOT / "model_repository" / c.VALID_AREA_MODEL),
        "model_version": "1",
    })
    calls: list[int] = []
    run = model.session.run

    def recording_run(outputs, feeds):
        calls.append(len(feeds[c.HU_SLICES]))
        if len(calls) == fail_on_call:
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : out of memory")
        return run(outputs, feeds)

    model.session = types.SimpleNamespace(run=recording_run)
    return model, calls


def _requests(*arrays: np.ndarray) -> list[dict]:
    return [{c.HU_SLICES: _Tensor(c.HU_SLICES, a)} for a in arrays]


@pytest.mark.parametrize(("run_batch", "want_calls"), [("1", [1, 1, 1]), ("2", [2, 1]), ("0", [3]), ("", [3])])
def test_a_dynamic_batch_runs_in_calls_of_run_batch_size_with_the_same_answers(
    runner_module, run_batch, want_calls
) -> None:
    hu = np.random.default_rng(3).integers(-1024, 400, (3, *SLICE)).astype(np.int16)
    bad = np.zeros((1, 1, 8, 8), np.int16)
    requests = _requests(hu[:1], bad, hu[1:])
    model, calls = _model(runner_module, run_batch)
    whole, _ = _model(runner_module, "0")
    want = whole.session.run([c.PROB], {c.HU_SLICES: hu})[0]

    responses = model.execute(requests)

    assert calls == want_calls
    assert responses[1].error is not None and "must have shape" in responses[1].error
    got = np.concatenate([responses[0].output_tensors[0].array, responses[2].output_tensors[0].array])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_failing_call_answers_every_request_of_the_batch_with_its_error(runner_module) -> None:
    hu = np.full((3, *SLICE), -1000, np.int16)
    model, calls = _model(runner_module, "1", fail_on_call=2)
    responses = model.execute(_requests(hu[:1], hu[1:]))
    assert calls == [1, 1]  # no call after the failure
    assert [r.output_tensors for r in responses] == [[], []]
    assert all("valid_area: [ONNXRuntimeError]" in r.error for r in responses)


def test_a_request_of_no_slice_is_answered_with_no_slice(runner_module) -> None:
    model, calls = _model(runner_module, "1")
    (response,) = model.execute(_requests(np.zeros((0, *SLICE), np.int16)))
    assert response.error is None and response.output_tensors[0].array.shape == (0, *SLICE)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"run_batch": "-1"}, "valid_area: parameter run_batch_size must be an integer >= 0, got '-1'"),
        ({"run_batch": "2.0"}, "valid_area: parameter run_batch_size must be an integer >= 0, got '2.0'"),
        ({"run_batch": "1", "intra_op_thread_count": "x"},
         "valid_area: parameter intra_op_thread_count must be an integer >= 1, got 'x'"),
    ],
    ids=["negative", "not-an-integer", "threads"],
)
def test_a_bad_parameter_fails_the_load_naming_it(runner_module, params, message) -> None:
    run_batch = params.pop("run_batch")
    with pytest.raises(RuntimeError) as info:
        _model(runner_module, run_batch, **params)
    assert str(info.value) == message
