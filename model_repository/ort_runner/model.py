"""Triton python-backend model: one ONNX segmentation graph run by ONNX Runtime on the CPU.

The cpu profile renders this file as ``valid_area/1/model.py`` and ``lesion/1/model.py`` beside the
``model.onnx`` of each model. Everything comes from the model configuration, parsed once in
:meth:`TritonPythonModel.initialize`:

* the one input and the one output (name, dtype, per-item dims);
* ``parameters``: ``onnx_file`` (in the version folder), ``intra_op_thread_count``,
  ``inter_op_thread_count`` and ``allow_spinning`` (``"0"``/``"1"``), as in Triton's onnxruntime
  backend, and ``run_batch_size``: the most slices per ONNX Runtime call (``"0"``, the default: the
  whole dynamic batch in one call).

:meth:`TritonPythonModel.execute` runs the well-formed requests of a dynamic batch together, in calls
of at most ``run_batch_size`` slices, and returns exactly one response per request; a malformed request
gets its own ``TritonError`` response and does not fail the others. Batching requests saves round trips
to the stub; splitting the calls keeps each call's activations in the CPU caches (on a CPU, ONNX
Runtime spends more per slice on a bigger call, see docs/triton.md).
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def _param(config: dict, key: str, default: str) -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return value if value != "" else default


def _int_param(config: dict, key: str, default: int, minimum: int) -> int:
    """An integer parameter, or a load failure naming the model, the parameter and the value."""
    text = _param(config, key, str(default))
    try:
        value: int | None = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise pb_utils.TritonModelException(
            f"{config['name']}: parameter {key} must be an integer >= {minimum}, got {text!r}"
        )
    return value


class TritonPythonModel:
    """ONNX Runtime on the CPU behind Triton's dynamic batcher."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.model_name = config["name"]
        (inp,) = config["input"]
        (out,) = config["output"]
        self.input_name = inp["name"]
        self.output_name = out["name"]
        self.input_dtype = pb_utils.triton_string_to_numpy(inp["data_type"])
        self.output_dtype = pb_utils.triton_string_to_numpy(out["data_type"])
        self.item_dims = tuple(int(d) for d in inp["dims"])

        version_dir = os.path.join(args["model_repository"], args["model_version"])
        onnx_path = os.path.join(version_dir, _param(config, "onnx_file", "model.onnx"))
        if not os.path.isfile(onnx_path):
            raise pb_utils.TritonModelException(f"{self.model_name}: ONNX file not found: {onnx_path}")

        self.run_batch = _int_param(config, "run_batch_size", 0, minimum=0)
        so = ort.SessionOptions()
        so.intra_op_num_threads = _int_param(config, "intra_op_thread_count", 1, minimum=1)
        so.inter_op_num_threads = _int_param(config, "inter_op_thread_count", 1, minimum=1)
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        spin = _param(config, "allow_spinning", "0")
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        so.add_session_config_entry("session.inter_op.allow_spinning", spin)
        self.session = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])

        (sess_in,) = self.session.get_inputs()
        sess_outs = [o.name for o in self.session.get_outputs()]
        if sess_in.name != self.input_name or self.output_name not in sess_outs:
            raise pb_utils.TritonModelException(
                f"{self.model_name}: {onnx_path} has input {sess_in.name!r} and outputs {sess_outs}, "
                f"the config expects {self.input_name!r} -> {self.output_name!r}"
            )
        self.logger = pb_utils.Logger
        self.logger.log_info(
            f"{self.model_name}: {onnx_path} on ONNX Runtime {ort.__version__}, "
            f"intra_op={so.intra_op_num_threads} inter_op={so.inter_op_num_threads} spinning={spin} "
            f"run_batch_size={self.run_batch}{' (the whole batch)' if not self.run_batch else ''}"
        )

    def _check(self, array: np.ndarray) -> str | None:
        """An error message for a malformed input, None when it is well formed."""
        if array.dtype != self.input_dtype:
            return (
                f"{self.model_name}: input {self.input_name!r} must be {np.dtype(self.input_dtype).name}, "
                f"got {array.dtype.name}"
            )
        if array.ndim != len(self.item_dims) + 1 or tuple(array.shape[1:]) != self.item_dims:
            return (
                f"{self.model_name}: input {self.input_name!r} must have shape [B, "
                f"{', '.join(map(str, self.item_dims))}], got {list(array.shape)}"
            )
        return None

    def _run(self, batch: np.ndarray) -> np.ndarray:
        """The output of ``batch``, in ONNX Runtime calls of at most ``run_batch`` slices."""
        step = self.run_batch
        if not step or len(batch) <= step:
            return self.session.run([self.output_name], {self.input_name: batch})[0]
        parts = [
            self.session.run([self.output_name], {self.input_name: batch[i : i + step]})[0]
            for i in range(0, len(batch), step)
        ]
        return np.concatenate(parts, axis=0)

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        arrays, owners = [], []
        for i, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
            array = None if tensor is None else tensor.as_numpy()
            error = (
                f"{self.model_name}: missing input {self.input_name!r}"
                if array is None
                else self._check(array)
            )
            if error is not None:
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(error)
                )
                continue
            arrays.append(array)
            owners.append(i)
        if arrays:
            batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
            try:
                result = self._run(batch)
            except Exception as exc:  # noqa: BLE001 - one error response per request, never a crash
                for i in owners:
                    responses[i] = pb_utils.InferenceResponse(
                        output_tensors=[], error=pb_utils.TritonError(f"{self.model_name}: {exc}")
                    )
                return responses
            result = np.ascontiguousarray(result, dtype=self.output_dtype)
            start = 0
            for i, array in zip(owners, arrays, strict=True):
                stop = start + len(array)
                out = pb_utils.Tensor(self.output_name, result[start:stop])
                responses[i] = pb_utils.InferenceResponse(output_tensors=[out])
                start = stop
        return responses

    def finalize(self) -> None:
        self.session = None
