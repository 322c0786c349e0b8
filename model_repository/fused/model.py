"""Triton python-backend model ``ct_screen_fused`` (cpu profile): the whole screen of a slice in one stub.

The ``ct_screen`` ensemble runs three python stubs per slice on a CPU (valid_area, lesion, postprocess):
two probability maps (2 MB a slice) cross shared memory twice, and six stub processes share two cores'
caches. This model runs the same work where it is cheapest on a CPU, in one process per instance:
:class:`ctscreen.reference.ReferencePipeline` (ONNX Runtime on the two shipped graphs, then
:func:`ctscreen.postprocess.postprocess_batch`), the very code of the in-process reference the
benchmarks compare with. Its inputs and outputs are those of the ensemble, so a client picks either by
name (``CTSCREEN_TRITON_MODEL``); the ensemble stays served beside it.

``ctscreen repo build --profile cpu`` puts ``valid_area.onnx`` and ``lesion.onnx`` beside this file and a
verbatim copy of ``ctscreen/{__init__,contracts,lungs,postprocess,machine,reference}.py`` in ``1/ctscreen/``;
this file puts its own folder first on ``sys.path``, so it always runs the copy rendered with it.

Configuration (parsed once in :meth:`TritonPythonModel.initialize`), ``parameters``: ``intra_op_thread_count``,
``allow_spinning`` (``"0"``/``"1"``), ``run_batch_size`` (most slices per ONNX Runtime call; ``"0"``: the
whole request), ``prob_cutoff`` and ``min_box_area``. Each request is screened on its own (the padded box
count ``K`` differs per request) and gets exactly one response; a malformed one gets its own error.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from ctscreen import contracts  # noqa: E402
from ctscreen.postprocess import postprocess_batch  # noqa: E402
from ctscreen.reference import ReferencePipeline  # noqa: E402


OUTPUTS = (contracts.LESION_BOXES, contracts.BOX_COUNT, contracts.VALID_AREA_BOX)


def _param(config: dict, key: str, default: str) -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return value if value != "" else default


class TritonPythonModel:
    """Valid area, lesion and post-processing of each request, in this stub."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.model_name = config["name"]
        (inp,) = config["input"]
        self.item_dims = tuple(int(d) for d in inp["dims"])
        here = os.path.dirname(os.path.abspath(__file__))
        paths = [os.path.join(here, f"{m}.onnx") for m in (contracts.VALID_AREA_MODEL, contracts.LESION_MODEL)]
        for path in paths:
            if not os.path.isfile(path):
                raise pb_utils.TritonModelException(f"{self.model_name}: ONNX file not found: {path}")
        try:
            threads = int(_param(config, "intra_op_thread_count", "1"))
            self.run_batch = int(_param(config, "run_batch_size", "0"))
            self.cutoff = float(_param(config, "prob_cutoff", str(contracts.PROB_CUTOFF)))
            self.min_area = int(_param(config, "min_box_area", str(contracts.MIN_BOX_AREA)))
            if threads < 1 or self.run_batch < 0:
                raise ValueError("intra_op_thread_count must be >= 1 and run_batch_size >= 0")
        except ValueError as exc:
            raise pb_utils.TritonModelException(f"{self.model_name}: bad parameter: {exc}") from None
        spin = _param(config, "allow_spinning", "0") == "1"
        self.pipe = ReferencePipeline(*paths, threads=threads, spinning=spin)
        pb_utils.Logger.log_info(
            f"{self.model_name}: {paths[0]} + {paths[1]}, intra_op={threads} spinning={int(spin)} "
            f"run_batch_size={self.run_batch} cutoff={self.cutoff} min_area={self.min_area} "
            f"(ctscreen.reference from {os.path.dirname(sys.modules['ctscreen.reference'].__file__)})"
        )

    def _input(self, request) -> np.ndarray:
        """The request's HU slices; ValueError naming what is wrong with them."""
        tensor = pb_utils.get_input_tensor_by_name(request, contracts.HU_SLICES)
        if tensor is None:
            raise ValueError(f"missing input {contracts.HU_SLICES!r}")
        hu = tensor.as_numpy()
        if hu.dtype != np.int16 or hu.ndim != len(self.item_dims) + 1 or tuple(hu.shape[1:]) != self.item_dims:
            raise ValueError(
                f"input {contracts.HU_SLICES!r} must be int16 [B, {', '.join(map(str, self.item_dims))}], "
                f"got {hu.dtype.name} {list(hu.shape)}"
            )
        return hu

    def _screen(self, hu: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        step = self.run_batch or len(hu)
        parts = [self.pipe.maps(hu[i : i + step]) for i in range(0, len(hu), step)]
        valid, lesion = parts[0] if len(parts) == 1 else map(np.concatenate, zip(*parts, strict=True))
        return postprocess_batch(valid, lesion, hu, cutoff=self.cutoff, min_area=self.min_area)

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                outputs = zip(OUTPUTS, self._screen(self._input(request)), strict=True)
            except Exception as exc:  # noqa: BLE001 - one error response per request, never a crash
                error = pb_utils.TritonError(f"{self.model_name}: {exc}")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, a) for n, a in outputs]))
        return responses

    def finalize(self) -> None:
        self.pipe = None
