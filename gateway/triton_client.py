"""A Triton gRPC client that sends tensors without copying them through protobuf.

``tritonclient.grpc.aio.InferenceServerClient.infer`` turns each tensor into bytes (``tobytes``), copies
them into the request message (``raw_input_contents.extend``) and serialises the message (a third copy,
and protobuf's slowest one for megabytes): measured on this project's 2-core machine, 2.25 ms of the
gateway's CPU per 512 x 512 slice (``SerializeToString`` alone 1.0 ms, ``extend`` 0.22, ``tobytes``
0.22), as much as decoding the DICOM file. A slice that reaches Triton costs the cores the models need.

:class:`TritonClient` is that client with one method replaced: :meth:`TritonClient.infer` writes the
request's wire form itself: the small part of the message (model, tensor descriptions, outputs) through
protobuf, then each tensor's bytes as a ``raw_input_contents`` field (number 7, length-delimited),
joined once. Protobuf readers take a message's fields in any order and a repeated field's entries in the
order they come, so Triton reads the same request. :class:`ArrayInput` is an ``InferInput`` over a numpy
array's memory (``set_data_from_numpy`` copies it): with both, a slice's bytes are copied once in Python,
from the array into the message, then once by gRPC's core.

Every other call (readiness, metadata, statistics) is tritonclient's own; errors are tritonclient's
``InferenceServerException`` with the gRPC status, as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import InferInput, InferRequestedOutput, InferResult, service_pb2
from tritonclient.grpc._utils import raise_error_grpc
from tritonclient.utils import np_to_triton_dtype

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
RAW_INPUT_CONTENTS = 7
"""``ModelInferRequest.raw_input_contents``'s field number (``grpc_service.proto``)."""
_LENGTH_DELIMITED = 2


def varint(value: int) -> bytes:
    """``value`` (>= 0) as a protobuf base-128 varint."""
    if value < 0:
        raise ValueError(f'Argument "value" must be >= 0, got {value}.')
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


class ArrayInput(InferInput):
    """An ``InferInput`` whose content is ``array``'s memory (C-contiguous; a copy is made only if it is not).

    The array must not change until the request is sent. Only :class:`TritonClient` sends it (tritonclient's
    own ``infer`` wants bytes)."""

    def __init__(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        super().__init__(name, list(array.shape), np_to_triton_dtype(array.dtype))
        self.array = array
        self._raw_content = memoryview(array.data).cast("B")  # what InferInput._get_content() hands out


def encode_infer_request(model_name: str, inputs: Sequence[InferInput],
                         outputs: Sequence[InferRequestedOutput] = (), model_version: str = "",
                         request_id: str = "", priority: int = 0) -> bytes:
    """The serialised ``ModelInferRequest`` of ``inputs`` (their raw contents, in order) and ``outputs``;
    ``priority``: the request's Triton priority level (0: the model's default), as tritonclient sends it."""
    head = service_pb2.ModelInferRequest(model_name=model_name, model_version=model_version, id=request_id)
    if priority:
        head.parameters["priority"].uint64_param = priority
    raws: list[Any] = []
    for inp in inputs:
        head.inputs.append(inp._get_tensor())
        raw = inp._get_content()
        if raw is not None:  # None: the tensor is in a shared-memory region (its parameters say which)
            raws.append(memoryview(raw).cast("B"))
    for out in outputs:
        head.outputs.append(out._get_tensor())
    tag = bytes([RAW_INPUT_CONTENTS << 3 | _LENGTH_DELIMITED])
    parts: list[Any] = [head.SerializeToString()]
    for raw in raws:
        parts += [tag, varint(raw.nbytes), raw]
    return b"".join(parts)


class TritonClient(grpcaio.InferenceServerClient):
    """``tritonclient.grpc.aio.InferenceServerClient`` whose :meth:`infer` sends tensors without protobuf copies."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._model_infer = self._channel.unary_unary(
            MODEL_INFER, request_serializer=None, response_deserializer=service_pb2.ModelInferResponse.FromString,
        )

    async def infer(self, model_name: str, inputs: Sequence[InferInput], model_version: str = "",
                    outputs: Sequence[InferRequestedOutput] | None = None, request_id: str = "",
                    client_timeout: float | None = None, headers: dict[str, str] | None = None,
                    priority: int = 0, **unsupported: Any) -> InferResult:
        """As tritonclient's ``infer`` for plain requests (no sequences, parameters, compression)."""
        if any(value not in (None, 0, False, "") for value in unsupported.values()):
            raise ValueError(f"TritonClient.infer does not send {sorted(unsupported)}.")
        request = encode_infer_request(model_name, inputs, outputs or (), model_version, request_id, priority)
        try:
            response = await self._model_infer(request, metadata=self._get_metadata(headers), timeout=client_timeout)
        except grpc.RpcError as exc:
            raise_error_grpc(exc)  # tritonclient's own mapping (InferenceServerException with the status)
        return InferResult(response)
