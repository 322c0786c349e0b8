"""Unit tests of :class:`gateway.triton_pool.TritonPool` scheduling, one layer only.

A fake Triton client (``tests/gateway_app_fakes.FakeTriton``) stands in for the gRPC client here,
because these tests need endpoints that fail on command, count calls and measure concurrency; the
real gRPC path is covered by ``tests/test_e2e_gateway.py`` against the embedded Triton.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gateway.errors import InferenceFailed, InferenceUnavailable
from gateway.jobs import PRIORITIES, triton_priority
from gateway.triton_pool import TritonPool
from tests.gateway_app_fakes import MARK, FakeFleet, FakeTriton


def _hu(z: int, marked: tuple[int, ...] = ()) -> np.ndarray:
    hu = np.full((z, 512, 512), -1000, np.int16)
    for i in marked:
        hu[i][MARK] = 50
    return hu


def _run(coro):
    return asyncio.run(coro)


def test_results_in_slice_order_each_slice_once():
    fleet = FakeFleet(**{"a:1": {"delay": 0.01}, "b:1": {"delay": 0.003}})
    pool = TritonPool(["a:1", "b:1"], batch_size=3, max_inflight=2, client_factory=fleet)
    seen: list[int] = []
    out = _run(pool.infer(_hu(20, (5, 17)), on_batch=seen.append))
    assert len(out) == 20 and sum(seen) == 20
    assert [i for i, o in enumerate(out) if len(o.boxes)] == [5, 17]
    assert all(o.valid_area.tolist() == [0, 0, 511, 511] for o in out)
    assert sum(pool.slice_counts.values()) == 20
    assert sum(c.slices for c in fleet.clients.values()) == 20
    assert pool.pending_slices == 0 and pool.inflight_requests == 0


def test_inflight_bound_and_least_loaded_spread():
    fleet = FakeFleet(**{"a:1": {"delay": 0.02}, "b:1": {"delay": 0.02}})
    pool = TritonPool(["a:1", "b:1"], batch_size=2, max_inflight=2, client_factory=fleet)
    _run(pool.infer(_hu(40)))
    for client in fleet.clients.values():
        assert client.max_inflight_seen == 2
        assert client.slices == 20  # equal speed: the least-loaded pick alternates
    assert all(t == pool.timeout_s for c in fleet.clients.values() for t in c.timeouts)


def test_an_urgent_batch_takes_the_next_free_slot_before_the_routine_ones_waiting():
    """Two routine studies keep batches waiting for the one slot; an urgent batch sent meanwhile is the next
    call made, and the routine batches go on after it. Seen failing without the overtaking in ``_acquire``: the
    routine batches waiting before it took the slot first (the urgent one was the fourth call after it came)."""
    fleet = FakeFleet(**{"a:1": {"delay": 0.01}})
    pool = TritonPool(["a:1"], batch_size=2, max_inflight=1, client_factory=fleet)

    async def main() -> int:
        studies = [asyncio.ensure_future(pool.infer(_hu(20), priority=2)) for _ in range(2)]
        while "a:1" not in fleet.clients or fleet.clients["a:1"].calls < 3:
            await asyncio.sleep(0.001)
        client = fleet.clients["a:1"]
        sent_at = client.calls
        await pool.infer_batch(_hu(2), priority=1)
        await asyncio.gather(*studies)
        return client.priorities.index(1) + 1 - sent_at

    assert _run(main()) == 1  # the very next call
    client = fleet.clients["a:1"]
    assert sorted(client.priorities) == [1] + [2] * 20 and client.slices == 42
    assert pool.pending_slices == 0 and pool.inflight_requests == 0


def test_a_low_study_being_screened_is_not_starved_by_routine_ones():
    """A low study is claimed after the routine ones, but once screened its batches wait their turn beside the
    routine studies' (one Triton level for both, gateway.jobs.triton_priority). With a level of its own below
    routine, a 4-slice low study ended after a 120-slice routine study started after it: a busy gateway always
    has routine batches waiting, and the low study held its worker slot meanwhile."""
    fleet = FakeFleet(**{"a:1": {"delay": 0.005}})
    pool = TritonPool(["a:1"], batch_size=2, max_inflight=2, client_factory=fleet)
    ended: list[str] = []

    async def study(name: str, z: int, rank: str, after: float) -> None:
        await asyncio.sleep(after)
        await pool.infer(_hu(z), priority=triton_priority(PRIORITIES[rank]))
        ended.append(name)

    async def main() -> None:
        await asyncio.gather(study("routine", 120, "routine", 0.0), study("low", 4, "low", 0.02),
                             study("later routine", 120, "routine", 0.04))

    _run(main())
    assert ended.index("low") == 0, ended


def test_a_study_keeps_a_window_of_batches_sent_not_all_of_them():
    """Every batch sent waits for a slot, and each answer wakes every waiter: a 100-slice study sent whole
    had 50 batches waiting (O(batches^2) wake-ups of the gateway's CPU). Sent through a window of twice
    the endpoints' room, no more than that wait, and every slice is still answered once, in order."""
    fleet = FakeFleet(**{"a:1": {"delay": 0.005}})
    pool = TritonPool(["a:1"], batch_size=2, max_inflight=2, client_factory=fleet)
    waiting = most = 0
    acquire = pool._acquire

    async def counted(tried, priority=0):
        nonlocal waiting, most
        waiting += 1
        most = max(most, waiting)
        try:
            return await acquire(tried, priority)
        finally:
            waiting -= 1

    pool._acquire = counted  # type: ignore[method-assign]
    out = _run(asyncio.wait_for(pool.infer(_hu(100, (7, 93))), 30))
    assert [i for i, o in enumerate(out) if len(o.boxes)] == [7, 93] and len(out) == 100
    assert pool.pending_slices == 0 and fleet.clients["a:1"].max_inflight_seen == 2
    assert most <= pool.window() == 4, most


def test_batches_failing_together_raise_one_error_and_leave_none_unread():
    """Two batches refused in the same turn: the study raises one InferenceFailed, no more than its window
    was ever sent, and no batch's error is left unretrieved (asyncio would log it as "never retrieved",
    with a traceback, when the task goes)."""
    import gc

    fleet = FakeFleet(**{"a:1": {"delay": 0.01, "fail_with": "StatusCode.INVALID_ARG"}})
    pool = TritonPool(["a:1"], batch_size=2, max_inflight=2, client_factory=fleet)
    unread: list[str] = []

    async def go() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: unread.append(ctx["message"]))
        with pytest.raises(InferenceFailed):
            await pool.infer(_hu(20))
        await asyncio.sleep(0.05)  # the cancelled batches end
        gc.collect()

    _run(go())
    assert unread == [], unread
    assert fleet.clients["a:1"].calls <= pool.window() == 4
    assert pool.pending_slices == 0 and pool.inflight_requests == 0


def test_unavailable_endpoint_is_retried_elsewhere_without_double_counting():
    fleet = FakeFleet(**{"bad:1": {"fail_with": "StatusCode.UNAVAILABLE"}, "good:1": {"delay": 0.002}})
    pool = TritonPool(["bad:1", "good:1"], batch_size=4, max_inflight=2, client_factory=fleet)
    out = _run(pool.infer(_hu(24, (3,))))
    assert len(out) == 24 and [i for i, o in enumerate(out) if len(o.boxes)] == [3]
    assert pool.slice_counts == {"bad:1": 0, "good:1": 24}
    assert fleet.clients["bad:1"].calls >= 1 and pool.retries >= 1
    assert all(o.endpoint == "good:1" for o in out)


def test_deadline_exceeded_is_retried():
    fleet = FakeFleet(**{"a:1": {"fail_first": 1, "fail_with": "StatusCode.DEADLINE_EXCEEDED"}})
    pool = TritonPool(["a:1"], batch_size=8, client_factory=fleet)
    out = _run(pool.infer(_hu(8)))
    assert len(out) == 8 and pool.retries == 1 and pool.slice_counts == {"a:1": 8}
    assert fleet.clients["a:1"].calls == 2


def test_every_endpoint_down_raises_unavailable():
    fleet = FakeFleet(**{"a:1": {"fail_with": "StatusCode.UNAVAILABLE"}})
    pool = TritonPool(["a:1"], batch_size=8, max_attempts=2, timeout_s=2, client_factory=fleet)
    with pytest.raises(InferenceUnavailable, match="tries"):
        _run(pool.infer(_hu(8)))
    assert pool.pending_slices == 0


def test_a_batch_cancelled_while_it_gives_its_slot_back_still_gives_it_back():
    """A try fails, and its batch is cancelled (its study failed elsewhere) while it waits for the pool's
    lock to give the slot back: the slot must come back all the same. Kept, it filled an endpoint on
    probation (one request at a time until one succeeds) for good, and a job hung in "inferring" after a
    real Triton restart (tests/test_gateway_cluster.py, once in CI). The pool's lock is held by the test
    (a private attribute) to make the interleaving certain."""
    fleet = FakeFleet(**{"a:1": {"fail_with": "StatusCode.UNAVAILABLE", "delay": 0.05}})
    pool = TritonPool(["a:1"], batch_size=1, max_inflight=2, max_attempts=1, client_factory=fleet)

    async def scenario() -> int:
        task = asyncio.ensure_future(pool.infer_batch(_hu(1)))
        while "a:1" not in fleet.clients or not fleet.clients["a:1"].calls:  # the try is under way
            await asyncio.sleep(0.001)
        cond = pool._condition()
        await cond.acquire()  # another coroutine holds the lock when the try fails
        for _ in range(2000):  # until the try has failed: the batch then waits for the lock to give its slot back
            if pool.retries:
                break
            await asyncio.sleep(0.001)
        assert pool.retries == 1 and not task.done()
        task.cancel()
        cond.release()
        with pytest.raises(asyncio.CancelledError):
            await task
        return pool.inflight_requests

    assert _run(scenario()) == 0


def test_no_endpoint_raises_unavailable_after_the_deadline():
    pool = TritonPool([], batch_size=8, timeout_s=0.2, client_factory=FakeFleet())
    with pytest.raises(InferenceUnavailable, match="none configured"):
        _run(pool.infer(_hu(2)))


def test_invalid_argument_is_not_retried():
    fleet = FakeFleet(**{"a:1": {"fail_with": "StatusCode.INVALID_ARGUMENT"}})
    pool = TritonPool(["a:1"], client_factory=fleet)
    with pytest.raises(InferenceFailed, match="INVALID_ARGUMENT"):
        _run(pool.infer(_hu(4)))
    assert fleet.clients["a:1"].calls == 1


def test_failure_messages_name_no_address(caplog):
    """A job's error reaches every results:read caller (the worklist, the service view): the endpoints'
    addresses stay in the log, for the operators."""
    url = "10.20.30.40:8001"
    pool = TritonPool([url], client_factory=FakeFleet(**{url: {"fail_with": "StatusCode.INVALID_ARGUMENT"}}))
    with caplog.at_level("WARNING", logger="gateway.triton_pool"), pytest.raises(InferenceFailed) as refused:
        _run(pool.infer(_hu(4)))
    assert "INVALID_ARGUMENT" in str(refused.value) and "10.20.30.40" not in str(refused.value)
    # UNAVAILABLE: the endpoint rests 0.25 s, longer than the pool waits for a healthy one
    resting = TritonPool([url], max_attempts=3, timeout_s=0.1,
                         client_factory=FakeFleet(**{url: {"fail_with": "StatusCode.UNAVAILABLE"}}))
    with caplog.at_level("WARNING", logger="gateway.triton_pool"), pytest.raises(InferenceUnavailable) as none:
        _run(resting.infer(_hu(2)))
    assert "could take a request" in str(none.value) and "10.20.30.40" not in str(none.value)
    assert url in caplog.text  # the operators' log names it


def test_set_endpoints_adds_and_retires():
    fleet = FakeFleet()
    pool = TritonPool(["a:1"], batch_size=4, client_factory=fleet)

    async def scenario():
        await pool.infer(_hu(8))
        pool.set_endpoints(["b:1"])
        assert pool.endpoints == ["b:1"]
        await pool.infer(_hu(8))
        await asyncio.sleep(0)
        pool.set_endpoints(["b:1", "c:1", "c:1", " "])
        assert pool.endpoints == ["b:1", "c:1"]

    _run(scenario())
    assert pool.slice_counts == {"a:1": 8, "b:1": 8, "c:1": 0}


def test_readiness_and_rates():
    fleet = FakeFleet(**{"a:1": {"ready": False}})
    pool = TritonPool(["a:1", "b:1"], default_rate=10.0, client_factory=fleet)
    assert _run(pool.ready_endpoints()) == ["b:1"]
    assert pool.capacity() == 20.0


def test_one_paused_endpoint_does_not_hold_the_answer_that_another_is_ready():
    """A paused tritonserver (SIGSTOP) answers no probe: its call waits out the probe's deadline. ``is_ready``, the
    worker's look before each idle claim, waited for every endpoint's probe, so one paused endpoint of two held the
    claims of every replica ``ready_timeout_s`` (2 s) a look, with the other ready. It answers at the first ready
    one now; ``ready_endpoints`` (every endpoint's state) still waits for each. The paused one is a fake whose
    probe sleeps out its deadline, as the real client's does on a stopped server (tests/test_gateway_app_api.py
    has that one)."""

    class Paused(FakeTriton):
        async def is_server_ready(self, client_timeout=None, **kw):
            await asyncio.sleep(client_timeout)
            raise TimeoutError("Deadline Exceeded")

    def factory(url: str) -> FakeTriton:
        return Paused(url) if url == "paused:1" else FakeTriton(url)

    pool = TritonPool(["paused:1", "b:1"], ready_timeout_s=2.0, client_factory=factory)

    async def scenario() -> tuple[bool, float, list[str], float]:
        loop = asyncio.get_running_loop()
        t = loop.time()
        ready = await pool.is_ready()
        first = loop.time() - t
        t = loop.time()
        every = await pool.ready_endpoints()
        return ready, first, every, loop.time() - t

    ready, first, every, all_s = _run(scenario())
    assert ready and first < 0.5, first
    assert every == ["b:1"] and all_s >= 2.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"batch_size": 0}, "batch_size"), ({"max_inflight": 0}, "max_inflight"), ({"timeout_s": 0}, "timeout_s"),
     ({"max_attempts": 0}, "max_attempts")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TritonPool(["a:1"], **kwargs)


def test_bad_batch_shape():
    pool = TritonPool(["a:1"], client_factory=FakeFleet())
    with pytest.raises(ValueError, match="batch"):
        _run(pool.infer_batch(np.zeros((2, 256, 256), np.int16)))
    with pytest.raises(ValueError, match="int16"):
        _run(pool.infer_batch(np.zeros((2, 512, 512), np.float32)))


def test_waiting_for_a_busy_healthy_endpoint_has_no_deadline():
    """Batches queued behind a busy endpoint wait longer than timeout_s without failing."""
    fleet = FakeFleet(**{"a:1": {"delay": 0.05}})
    pool = TritonPool(["a:1"], batch_size=1, max_inflight=1, timeout_s=0.3, client_factory=fleet)
    out = _run(pool.infer(_hu(12)))  # 12 x 0.05 s = 0.6 s > timeout_s
    assert len(out) == 12 and pool.retries == 0


def test_failing_endpoint_is_on_probation():
    """After failures an endpoint rests, then takes one request at a time until one succeeds."""
    fleet = FakeFleet(**{"a:1": {"fail_first": 2, "delay": 0.02}})
    pool = TritonPool(["a:1"], batch_size=1, max_inflight=2, client_factory=fleet)
    out = _run(pool.infer(_hu(6)))
    assert len(out) == 6 and pool.retries == 2 and pool.slice_counts == {"a:1": 6}
    events = fleet.clients["a:1"].events
    starts = {call: (i, n) for i, (kind, call, n) in enumerate(events) if kind == "start"}
    ends = {call: i for i, (kind, call, _) in enumerate(events) if kind == "end"}
    assert starts[1][1] == 1 and starts[2][1] == 2  # healthy: max_inflight at once (both fail)
    assert starts[3][1] == 1 and starts[4][0] > ends[3]  # on probation: the third runs alone
    assert max(n for _, n in starts.values()) == 2 and any(n == 2 for call, (_, n) in starts.items() if call > 3)


def test_a_streamed_study_sends_each_batch_once_its_slices_are_filled():
    """``ready`` (a study streamed through): the rows of a batch are marked only just before the
    count that covers them is yielded, so a batch sent early would come back without its boxes."""
    fleet = FakeFleet(**{"a:1": {"delay": 0.001}})
    pool = TritonPool(["a:1"], batch_size=4, max_inflight=4, client_factory=fleet)
    hu = _hu(10)
    sent_before: list[int] = []

    async def ready():
        done = 0
        for filled in (3, 4, 9, 10):
            for i in range(done, filled):
                hu[i][MARK] = 50
            done = filled
            sent_before.append(fleet.clients["a:1"].calls if "a:1" in fleet.clients else 0)
            yield filled
            for _ in range(3):
                await asyncio.sleep(0)  # let the batches sent run

    out = _run(pool.infer(hu, ready=ready()))
    assert all(len(o.boxes) for o in out), [len(o.boxes) for o in out]
    assert sent_before == [0, 0, 1, 2]  # each request left as soon as its batch was filled, not at the end
    assert pool.pending_slices == 0 and pool.inflight_requests == 0


def test_a_stream_that_ends_before_the_last_slice_is_an_error():
    pool = TritonPool(["a:1"], batch_size=4, client_factory=FakeFleet())

    async def ready():
        yield 4

    with pytest.raises(ValueError, match="ended before all 10"):
        _run(pool.infer(_hu(10), ready=ready()))
    assert pool.pending_slices == 0


def test_a_batch_given_up_as_room_comes_is_cancelled_not_sent():
    """A batch waiting for room on a busy endpoint, whose study is given up (Triton away, the job released) just
    as a slot frees: asyncio.wait_for on Python 3.11 returned the wait's result and lost the cancel (CPython
    gh-86296), so the abandoned batch took the slot and went on calling Triton, tries and all (seen in a review's
    run: six tries after its job was released). Every such cancel now ends the wait."""
    async def scenario() -> int:
        pool = TritonPool(["fake:1"], max_inflight=1, client_factory=FakeFleet())
        ep = await pool._acquire(set())  # the only slot, taken
        lost = 0
        for _ in range(20):
            waiter = asyncio.create_task(pool._acquire(set()))
            await asyncio.sleep(0.01)  # waiting for room
            await pool._release(ep, 0)  # room comes (notify_all) ...
            waiter.cancel()  # ... as its study is given up
            try:
                ep = await waiter
                lost += 1
            except asyncio.CancelledError:
                ep = await pool._acquire(set())
        return lost

    assert asyncio.run(scenario()) == 0


class _Gated(FakeTriton):
    """A fake endpoint whose calls wait for ``gate`` (every call while it is not set) before they are answered."""

    def __init__(self, url: str, **kw) -> None:
        super().__init__(url, **kw)
        self.gate = asyncio.Event()

    async def infer(self, *args, **kw):
        await self.gate.wait()  # the gate of the moment the call is made
        return await super().infer(*args, **kw)


def test_the_slots_an_urgent_batch_leaves_free_go_to_the_routine_batches_at_once():
    """Three answers come back together (Triton answers a batch of requests at once) with three routine batches
    and one urgent batch waiting: the urgent one takes a slot, and the routine ones take the other two. Seen
    failing before: the routine batches, woken with the urgent one, left every free slot to it and were not woken
    again; two slots stayed idle until the next answer or the waiters' look a second later (1 of 3 taken)."""
    clients: dict[str, _Gated] = {}

    def factory(url: str) -> _Gated:
        clients[url] = _Gated(url)
        return clients[url]

    pool = TritonPool(["a:1"], batch_size=1, max_inflight=3, client_factory=factory)

    async def main() -> tuple[int, list[int]]:
        first = [asyncio.ensure_future(pool.infer_batch(_hu(1), priority=2)) for _ in range(3)]
        while pool.inflight_requests < 3:
            await asyncio.sleep(0.001)
        client = clients["a:1"]
        waiting = [asyncio.ensure_future(pool.infer_batch(_hu(1), priority=2)) for _ in range(3)]
        await asyncio.sleep(0.01)
        urgent = asyncio.ensure_future(pool.infer_batch(_hu(1), priority=1))
        await asyncio.sleep(0.01)
        answers, client.gate = client.gate, asyncio.Event()  # the next calls are held
        answers.set()  # the three answers, together
        await asyncio.gather(*first)
        await asyncio.sleep(0.05)
        started = pool.inflight_requests
        client.gate.set()
        await asyncio.gather(*waiting, urgent)
        return started, client.priorities

    started, priorities = _run(main())
    assert priorities[3] == 1  # the urgent batch first
    assert started == 3, f"{started} of the 3 free slots taken"


def test_an_urgent_batch_waiting_for_another_endpoint_leaves_a_free_one_to_routine_batches():
    """An urgent batch whose try on ``a`` failed (INTERNAL: ``a`` stays healthy) waits for ``b``, the endpoint it
    has not tried, busy with a slow request; ``a`` is free. A routine batch takes ``a`` at once. Seen failing
    before: it left ``a`` to the urgent batch, which does not take it, and both waited for ``b``'s answer (up to
    ``timeout_s``, 30 s, when ``b`` hangs on probation)."""
    clients: dict[str, FakeTriton] = {}

    def factory(url: str) -> FakeTriton:
        clients[url] = (_Gated(url) if url == "b:1"
                        else FakeTriton(url, fail_first=1, fail_with="StatusCode.INTERNAL"))
        return clients[url]

    pool = TritonPool(["b:1"], batch_size=1, max_inflight=1, client_factory=factory)

    async def main() -> None:
        slow = asyncio.ensure_future(pool.infer_batch(_hu(1), priority=2))  # b's only slot, held
        while pool.inflight_requests < 1:
            await asyncio.sleep(0.001)
        pool.set_endpoints(["b:1", "a:1"])
        urgent = asyncio.ensure_future(pool.infer_batch(_hu(1), priority=1))
        while "a:1" not in clients or clients["a:1"].calls < 1 or pool.inflight_requests > 1:
            await asyncio.sleep(0.001)  # its try on a failed; it waits for b
        try:
            out = await asyncio.wait_for(pool.infer_batch(_hu(1), priority=2), 2)
        finally:
            clients["b:1"].gate.set()  # type: ignore[attr-defined]
            await asyncio.gather(slow, urgent)
        assert out[0].endpoint == "a:1"

    _run(main())
