"""The worker's slots (:class:`gateway.worker._Slots`): ``max_concurrent_studies`` for any job and ``urgent_slots``
more for urgent ones only. The worker loop runs for real; the store's claim, Triton's readiness and the job's
work are stubs (no database, no Triton)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from gateway.jobs import ROUTINE
from gateway.settings import Settings
from gateway.store.store import Changes, Claimed
from gateway.worker import Worker


class _Store:
    """Just what the worker loop asks of a store: ``claim`` (from ``queued``, the highest rank first), ``work``."""

    def __init__(self, queued: list[tuple[str, int]]) -> None:
        self.queued = queued
        self.work = Changes()
        self.claims: list[tuple[float, str | None]] = []  # (when, the job claimed)
        self.ageing: set[float | None] = set()  # the claims' ageing_s

    async def claim(self, lease_s, exclude=(), min_priority=None, ageing_s=None):
        await asyncio.sleep(0.01)  # a round trip to the database
        self.ageing.add(ageing_s)
        due = [j for j in self.queued if j[0] not in exclude and (min_priority is None or j[1] >= min_priority)]
        job = max(due, key=lambda j: j[1], default=None)
        self.claims.append((time.monotonic(), None if job is None else job[0]))
        if job is None:
            return None
        self.queued.remove(job)
        self.work.notify()  # as Store.claim: a claim is a change
        return Claimed(job[0], "s", "1.2", "upload", 1, 0.0, 1e12, job[1])

    def take_lost_failed(self) -> int:
        return 0

    async def release_all(self) -> int:
        return 0


def test_a_slot_freed_while_the_urgent_slot_is_polled_is_taken_at_once_not_a_poll_later():
    """One slot, busy with a routine job, another routine job queued: the worker polls the slot kept for urgent
    jobs (``urgent_slots``), finds none and waits a poll. The routine job ends (its finish wakes the worker
    while its task still runs): the next routine job was claimed only a whole ``worker_poll_s`` later (the freed
    slot was not what the worker waited on), where ``asyncio.Semaphore`` had woken the loop at once."""

    async def go() -> float:
        store = _Store([("r1", ROUTINE), ("r2", ROUTINE)])
        finish = asyncio.Event()

        async def ready() -> bool:
            return True

        screener = SimpleNamespace(pool=SimpleNamespace(is_ready=ready), ahead=set(),
                                   metrics=SimpleNamespace(failed=lambda *a: None))
        worker = Worker(store, None, screener,  # type: ignore[arg-type]
                        Settings(max_concurrent_studies=1, urgent_slots=1, worker_poll_s=30, priority_ageing_s=900))

        async def work(job: Claimed) -> None:
            if job.id == "r1":
                await finish.wait()
                store.work.notify()  # Store.finish's wake-up, before the job's task ends

        worker._work = work  # type: ignore[method-assign]
        try:
            worker.start()
            while not any(job == "r1" for _, job in store.claims):
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)  # the urgent slot polled: nothing urgent
            t = time.monotonic()
            finish.set()
            while not any(job == "r2" for _, job in store.claims):
                assert time.monotonic() - t < 20, "r2 never claimed (not before the poll)"
                await asyncio.sleep(0.01)
            assert store.ageing == {900}  # the setting: no claim strict, none first come first served
            return next(when for when, job in store.claims if job == "r2") - t
        finally:
            await worker.stop(0)

    took = asyncio.run(go())
    assert took < 5, f"the freed slot took {took:.2f} s to be claimed (worker_poll_s is 30)"
