"""Triton python-backend model ``postprocess``: probability maps (and the HU slices the models saw, for
the lung-field check of the valid area) -> lesion boxes and valid-area box.

The code that decides is :func:`ctscreen.postprocess.postprocess_batch`, the very function the
in-process reference pipeline calls. ``ctscreen repo build`` puts a verbatim copy of
``ctscreen/{__init__,contracts,lungs,postprocess}.py`` in ``1/ctscreen/`` beside this file, and this file puts
its own folder first on ``sys.path``, so the model needs only numpy and scipy (an NGC tritonserver image)
and always runs the copy rendered with it, never another installed ``ctscreen``.

Configuration (parsed once in :meth:`TritonPythonModel.initialize`): ``parameters.prob_cutoff`` and
``parameters.min_box_area``. Each request is post-processed on its own, because the padded box count
``K`` differs per request; every request gets exactly one response.
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


class TritonPythonModel:
    """Boxes from the valid-area and lesion probability maps of each request."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.model_name = config["name"]
        params = config.get("parameters", {})
        self.cutoff = float(params.get("prob_cutoff", {}).get("string_value") or contracts.PROB_CUTOFF)
        self.min_area = int(params.get("min_box_area", {}).get("string_value") or contracts.MIN_BOX_AREA)
        dims = {i["name"]: tuple(int(d) for d in i["dims"]) for i in config["input"]}
        self.item_dims = dims[contracts.VALID_PROB]
        pb_utils.Logger.log_info(
            f"{self.model_name}: cutoff={self.cutoff} min_area={self.min_area} numpy {np.__version__} "
            f"(ctscreen.postprocess from {os.path.dirname(sys.modules['ctscreen'].__file__)})"
        )

    def _inputs(self, request) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
        arrays = []
        for name, dtype in (
            (contracts.VALID_PROB, np.float32),
            (contracts.LESION_PROB, np.float32),
            (contracts.HU_SLICES, np.int16),
        ):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                return f"{self.model_name}: missing input {name!r}"
            array = tensor.as_numpy()
            if array.dtype != dtype or tuple(array.shape[1:]) != self.item_dims:
                return (
                    f"{self.model_name}: input {name!r} must be {np.dtype(dtype).name} [B, "
                    f"{', '.join(map(str, self.item_dims))}], got {array.dtype.name} {list(array.shape)}"
                )
            arrays.append(array)
        if not arrays[0].shape == arrays[1].shape == arrays[2].shape:
            return (
                f"{self.model_name}: inputs differ in shape: "
                + " vs ".join(str(list(a.shape)) for a in arrays)
            )
        return arrays[0], arrays[1], arrays[2]

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            inputs = self._inputs(request)
            if isinstance(inputs, str):
                responses.append(
                    pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(inputs))
                )
                continue
            try:
                boxes, counts, valid = postprocess_batch(*inputs, cutoff=self.cutoff, min_area=self.min_area)
            except ValueError as exc:
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[], error=pb_utils.TritonError(f"{self.model_name}: {exc}")
                    )
                )
                continue
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor(contracts.LESION_BOXES, boxes),
                        pb_utils.Tensor(contracts.BOX_COUNT, counts),
                        pb_utils.Tensor(contracts.VALID_AREA_BOX, valid),
                    ]
                )
            )
        return responses
