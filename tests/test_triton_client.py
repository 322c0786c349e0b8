"""The gateway's Triton client (:mod:`gateway.triton_client`): the request it writes by hand is the request
tritonclient writes, and a real Triton answers it as it answers tritonclient's own client."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import service_pb2
from tritonclient.grpc._utils import _get_inference_request
from tritonclient.utils import InferenceServerException

from ctscreen import contracts as c
from gateway.triton_client import ArrayInput, TritonClient, encode_infer_request, varint
from phantom import make_study

OUTPUTS = (c.LESION_BOXES, c.BOX_COUNT, c.VALID_AREA_BOX)


def test_varint_is_protobufs():
    from google.protobuf.internal.encoder import _VarintBytes

    for value in (0, 1, 127, 128, 300, 2**21, 512 * 512 * 2 * 8, 2**40):
        assert varint(value) == _VarintBytes(value), value
    with pytest.raises(ValueError, match="must be >= 0"):
        varint(-1)


def _inputs(batch: np.ndarray, other: np.ndarray) -> list[grpcclient.InferInput]:
    plain = grpcclient.InferInput("B", list(other.shape), "FP32")
    plain.set_data_from_numpy(other)
    return [ArrayInput(c.HU_SLICES, batch), plain]


@pytest.mark.parametrize("priority", [0, 1, 3])
def test_the_hand_written_request_is_tritonclients(priority):
    """Parsed back, the bytes are the message tritonclient builds of the same inputs, tensors in order, with the
    same priority parameter (none for 0, the model's default level)."""
    batch = np.random.default_rng(0).integers(-1024, 3000, (3, 1, 64, 64)).astype(np.int16)
    other = np.arange(10, dtype=np.float32)
    inputs = _inputs(batch, other)
    outputs = [grpcclient.InferRequestedOutput(n) for n in OUTPUTS]
    ours = service_pb2.ModelInferRequest.FromString(
        encode_infer_request("ct_screen", inputs, outputs, model_version="1", request_id="r1", priority=priority))
    plain = grpcclient.InferInput(c.HU_SLICES, list(batch.shape), "INT16")
    plain.set_data_from_numpy(batch)
    theirs = _get_inference_request(model_name="ct_screen", inputs=[plain, inputs[1]], model_version="1",
                                    request_id="r1", outputs=outputs, sequence_id=0, sequence_start=False,
                                    sequence_end=False, priority=priority, timeout=None, parameters=None)
    assert ours == theirs
    assert ours.raw_input_contents[0] == batch.tobytes() and ours.raw_input_contents[1] == other.tobytes()


def test_an_array_input_shares_the_arrays_memory():
    batch = np.zeros((2, 1, 8, 8), np.int16)
    inp = ArrayInput(c.HU_SLICES, batch)
    batch[0, 0, 0, 0] = 7  # the same memory: no copy was taken
    assert np.frombuffer(inp._get_content(), np.int16)[0] == 7
    assert inp.shape() == [2, 1, 8, 8] and inp.datatype() == "INT16"
    strided = np.zeros((4, 1, 8, 8), np.int16)[::2]  # not contiguous: copied once, in order
    assert ArrayInput(c.HU_SLICES, strided)._get_content().nbytes == strided.nbytes


@pytest.mark.triton
def test_triton_answers_it_as_it_answers_tritonclient(triton):
    study = make_study(3, "covid", n_slices=40)
    with_lesion = int(np.flatnonzero(study.lesion_mask.any(axis=(1, 2)))[0])
    hu = study.hu[with_lesion:with_lesion + 4, None]

    async def both() -> tuple[dict, dict]:
        ours, theirs = TritonClient(triton.grpc_url), grpcaio.InferenceServerClient(triton.grpc_url)
        try:
            outputs = [grpcclient.InferRequestedOutput(n) for n in OUTPUTS]
            a = await ours.infer(c.ENSEMBLE_MODEL, [ArrayInput(c.HU_SLICES, hu)], outputs=outputs, client_timeout=60)
            plain = grpcclient.InferInput(c.HU_SLICES, list(hu.shape), "INT16")
            plain.set_data_from_numpy(hu)
            b = await theirs.infer(c.ENSEMBLE_MODEL, [plain], outputs=outputs, client_timeout=60)
            return {n: a.as_numpy(n) for n in OUTPUTS}, {n: b.as_numpy(n) for n in OUTPUTS}
        finally:
            await ours.close()
            await theirs.close()

    ours, theirs = asyncio.run(both())
    assert int(theirs[c.BOX_COUNT].sum()) > 0  # the phantom's lesion slices: boxes to compare
    for name in OUTPUTS:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


@pytest.mark.triton
def test_triton_errors_keep_their_grpc_status(triton):
    async def refused(model: str, hu: np.ndarray) -> InferenceServerException:
        client = TritonClient(triton.grpc_url)
        try:
            with pytest.raises(InferenceServerException) as info:
                await client.infer(model, [ArrayInput(c.HU_SLICES, hu)], client_timeout=60)
            return info.value
        finally:
            await client.close()

    missing = asyncio.run(refused("no_such_model", np.zeros((1, 1, 512, 512), np.int16)))
    assert missing.status() == "StatusCode.NOT_FOUND" or "unknown model" in str(missing)
    wrong = asyncio.run(refused(c.ENSEMBLE_MODEL, np.zeros((1, 1, 16, 16), np.int16)))
    assert wrong.status() == "StatusCode.INVALID_ARGUMENT", wrong


def test_it_refuses_what_it_does_not_send():
    async def go() -> None:
        client = TritonClient("127.0.0.1:1")
        try:
            with pytest.raises(ValueError, match="sequence_id"):
                await client.infer("m", [ArrayInput("x", np.zeros(2, np.int16))], sequence_id=4)
        finally:
            await client.close()

    asyncio.run(go())
