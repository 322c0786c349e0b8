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


def _model(module, run_batch: str):
    config = {
        "name": c.VALID_AREA_MODEL,
        "input": [{"name": c.HU_SLICES, "data_type": "TYPE_INT16", "dims": list(SLICE)}],
        "output": [{"name": c.PROB, "data_type": "TYPE_FP32", "dims": list(SLICE)}],
        "parameters": {"run_batch_size": {"string_value": run_batch}},
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
        return run(outputs, feeds)

    model.session = types.SimpleNamespace(run=recording_run)
    return model, calls


@pytest.mark.parametrize(("run_batch", "want_calls"), [("1", [1, 1, 1]), ("2", [2, 1]), ("0", [3]), ("", [3])])
def test_a_dynamic_batch_runs_in_calls_of_run_batch_size_with_the_same_answers(
    runner_module, run_batch, want_calls
) -> None:
    hu = np.random.default_rng(3).integers(-1024, 400, (3, *SLICE)).astype(np.int16)
    bad = np.zeros((1, 1, 8, 8), np.int16)
    requests = [{c.HU_SLICES: _Tensor(c.HU_SLICES, a)} for a in (hu[:1], bad, hu[1:])]
    model, calls = _model(runner_module, run_batch)
    whole, _ = _model(runner_module, "0")
    want = whole.session.run([c.PROB], {c.HU_SLICES: hu})[0]

    responses = model.execute(requests)

    assert calls == want_calls
    assert responses[1].error is not None and "must have shape" in responses[1].error
    got = np.concatenate([responses[0].output_tensors[0].array, responses[2].output_tensors[0].array])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_negative_run_batch_size_fails_the_load(runner_module) -> None:
    with pytest.raises(RuntimeError, match="run_batch_size must be >= 0, got -1"):
        _model(runner_module, "-1")
