"""What one Triton call costs the gateway's process: the shipped unary call against two other ways to call.

The gateway's CPU a slice is mostly thread wake-ups (``benchmarks/history.md``), and a gRPC call is a good part
of them: about 1.5-2 ms of the caller's CPU for a request of 2 slices (1 MB), 10-20 voluntary context switches.
This compares, on one embedded Triton and the gateway's call shape (2 slices a request, 4 in flight, the cpu
profile's fused model), the caller's process CPU and context switches a call of:

* ``unary``   the gateway's own (:class:`gateway.triton_client.TritonClient`: ``ModelInfer`` on grpc.aio);
* ``stream``  the same request bytes written to one ``ModelStreamInfer`` stream (writes one at a time, as
              grpc.aio requires; the answers matched by request id): no call set up per request;
* ``sync``    the same request bytes through grpc's blocking stub in a pool of threads (one per request in
              flight), awaited from the event loop.

Each round runs every mode once, in an order that turns round by round, so drift in the machine's load hits
all alike::

    python -m benchmarks.ab_grpc                       # -> results/ab-grpc-latest.json (+ a table)
    python -m benchmarks.ab_grpc --rounds 8 --calls 120 --batch 8 --inflight 3

The numbers are the client's only (``getrusage`` of this process); what Triton spends is the same request
either way. Linux or macOS (``resource``).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import resource
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import InferRequestedOutput, service_pb2

from benchmarks.common import BenchError, publish_run, results_dir
from benchmarks.perf import sample_slices
from benchmarks.stack import embedded_triton
from ctscreen.cliargs import positive
from ctscreen.contracts import BOX_COUNT, HU_SLICES, LESION_BOXES, VALID_AREA_BOX
from gateway.triton_client import MODEL_INFER, ArrayInput, TritonClient, encode_infer_request

MODES = ("unary", "stream", "sync")
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"


def _usage() -> tuple[float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_nvcsw


async def _caller(mode: str, client: TritonClient, url: str, model: str,
                  inflight: int) -> tuple[Callable[[bytes, str], Awaitable[None]], Callable[[], Awaitable[None]]]:
    """``(call(request bytes, request id), close())`` of one mode."""
    if mode == "unary":
        unary = client._model_infer

        async def call_unary(request: bytes, _: str) -> None:
            await unary(request)

        async def nothing() -> None:
            return None

        return call_unary, nothing
    if mode == "stream":
        stream = client._channel.stream_stream(
            MODEL_STREAM_INFER, request_serializer=None,
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString)()
        waiting: dict[str, asyncio.Future[Any]] = {}
        writing = asyncio.Lock()  # grpc.aio takes one write at a time on a stream

        async def read() -> None:
            while (answer := await stream.read()) is not grpc.aio.EOF:
                waiting.pop(answer.infer_response.id).set_result(answer.error_message)

        reader = asyncio.ensure_future(read())

        async def call_stream(request: bytes, request_id: str) -> None:
            waiting[request_id] = asyncio.get_running_loop().create_future()
            async with writing:
                await stream.write(request)
            if error := await waiting[request_id]:
                raise BenchError(f"Triton refused a streamed request: {error}")

        async def close_stream() -> None:
            await stream.done_writing()
            await reader

        return call_stream, close_stream
    channel = grpc.insecure_channel(url, options=[("grpc.max_send_message_length", -1),
                                                  ("grpc.max_receive_message_length", -1)])
    blocking = channel.unary_unary(MODEL_INFER, request_serializer=None,
                                   response_deserializer=service_pb2.ModelInferResponse.FromString)
    pool = concurrent.futures.ThreadPoolExecutor(inflight, thread_name_prefix="grpc-sync")

    async def call_sync(request: bytes, _: str) -> None:
        await asyncio.get_running_loop().run_in_executor(pool, blocking, request)

    async def close_sync() -> None:
        pool.shutdown()
        channel.close()

    return call_sync, close_sync


async def measure(mode: str, url: str, model: str, slices: np.ndarray, calls: int, inflight: int) -> dict[str, Any]:
    """``calls`` requests of ``slices`` in ``mode``, ``inflight`` at a time, after one warm-up call: the caller's
    CPU (ms) and voluntary context switches a call, and the wall time."""
    client = TritonClient(url)
    outputs = [InferRequestedOutput(name) for name in (LESION_BOXES, BOX_COUNT, VALID_AREA_BOX)]
    call, close = await _caller(mode, client, url, model, inflight)
    room = asyncio.Semaphore(inflight)

    async def one(i: int) -> None:
        async with room:  # the request is built in the call, as the gateway builds it
            await call(encode_infer_request(model, [ArrayInput(HU_SLICES, slices)], outputs, request_id=str(i)), str(i))

    try:
        await one(-1)
        cpu0, switches0, t0 = *_usage(), time.monotonic()
        await asyncio.gather(*(one(i) for i in range(calls)))
        cpu1, switches1, t1 = *_usage(), time.monotonic()
    finally:
        await close()
        await client.close()
    return {"cpu_ms_per_call": round((cpu1 - cpu0) * 1000 / calls, 3),
            "switches_per_call": round((switches1 - switches0) / calls, 1), "wall_s": round(t1 - t0, 3)}


def order(round_index: int, modes: tuple[str, ...] = MODES) -> list[str]:
    """The modes of round ``round_index``, turned by one each round.

    >>> order(0), order(1), order(3)
    (['unary', 'stream', 'sync'], ['stream', 'sync', 'unary'], ['unary', 'stream', 'sync'])
    """
    k = round_index % len(modes)
    return [*modes[k:], *modes[:k]]


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Each mode's median CPU and context switches a call, and its median CPU against ``unary``'s.

    >>> summarise({"unary": [{"cpu_ms_per_call": 2.0, "switches_per_call": 16}],
    ...            "stream": [{"cpu_ms_per_call": 1.5, "switches_per_call": 19}]})["stream"]
    {'cpu_ms_per_call': 1.5, 'switches_per_call': 19, 'cpu_vs_unary': 0.75}
    """
    base = statistics.median(r["cpu_ms_per_call"] for r in runs["unary"])
    return {mode: {"cpu_ms_per_call": statistics.median(r["cpu_ms_per_call"] for r in rs),
                   "switches_per_call": statistics.median(r["switches_per_call"] for r in rs),
                   "cpu_vs_unary": round(statistics.median(r["cpu_ms_per_call"] for r in rs) / base, 3)}
            for mode, rs in runs.items()}


def run(rounds: int, calls: int, batch: int, inflight: int) -> dict[str, Any]:
    slices = sample_slices(batch)
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    with embedded_triton() as triton:
        if not triton.model:
            raise BenchError("the embedded Triton names no model to screen with")
        for r in range(rounds):
            for mode in order(r):
                runs[mode].append(asyncio.run(measure(mode, triton.grpc_url, triton.model, slices, calls, inflight)))
    return {"model": triton.model, "batch": batch, "inflight": inflight, "calls": calls, "rounds": rounds,
            "runs": runs, "summary": summarise(runs)}


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"Caller's CPU a Triton call ({doc['batch']} slices a request, {doc['inflight']} in flight, "
             f"{doc['calls']} calls a run, median of {doc['rounds']} rounds, model {doc['model']}):", "",
             "| mode | CPU ms a call | voluntary context switches a call | CPU against unary |", "|---|---|---|---|"]
    lines += [f"| {mode} | {s['cpu_ms_per_call']} | {s['switches_per_call']} | {s['cpu_vs_unary']} |"
              for mode, s in doc["summary"].items()]
    machine = doc.get("machine") or {}
    if machine.get("commit"):
        lines += ["", f"Measured {machine.get('time_utc')}, commit `{machine['commit']}`, 1-min load average "
                      f"{machine.get('loadavg_1m', 0):.2f} at the start."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ab_grpc", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=positive(int), default=4, help="rounds of every mode (default 4)")
    p.add_argument("--calls", type=positive(int), default=60, help="calls a measured run (default 60)")
    p.add_argument("--batch", type=positive(int), default=2, help="slices a request (default 2, the gateway's)")
    p.add_argument("--inflight", type=positive(int), default=4, help="requests in flight (default 4, the gateway's)")
    p.add_argument("--out", type=Path, default=None, help="default results/ab-grpc-latest.json")
    args = p.parse_args(argv)
    if args.batch > 8:
        p.error("--batch must be at most 8 (the cpu profile's max_batch_size)")
    return publish_run(p.prog, argv, lambda: run(args.rounds, args.calls, args.batch, args.inflight), markdown,
                       args.out or results_dir() / "ab-grpc-latest.json")


if __name__ == "__main__":
    raise SystemExit(main())
