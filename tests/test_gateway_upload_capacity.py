"""The upload limit of a cluster (``gateway.api.studies.check_capacity``) on real SQLite and PostgreSQL.

Replicas are ``Store`` objects with their own owner names on one database, recorded alive as their
sweepers record them (table ``replicas``); jobs are accepted and claimed as the workers do. The limit is
the sum of the live replicas' ``max_concurrent_studies + max_queued_studies``: one gateway refuses at its
own limit, as it always did; a second one raises the cluster's, and a killed one's share goes with it.
"""

from __future__ import annotations

import asyncio

from sqlalchemy import update

from gateway.api.studies import check_capacity
from gateway.errors import Busy
from gateway.jobs import PRIORITIES, Priority
from gateway.settings import Settings
from gateway.store import Store
from gateway.store.migrate import upgrade
from gateway.store.models import Replica

SETTINGS = Settings(triton_urls="fake:1", max_concurrent_studies=2, max_queued_studies=1, urgent_slots=1, lease_s=30,
                    sweep_interval_s=0.5, retry_after_s=7)


async def _accept(store: Store, n: int, priority: Priority = "routine") -> None:
    for i in range(n):
        await store.accept_upload(f"1.2.826.0.1.{priority}.{i}", [("a.dcm", f"key-{priority}-{i}", 10)], 3600,
                                  slices_total=10, priority=PRIORITIES[priority])


async def _refused(store: Store, priority: Priority = "routine") -> Busy | None:
    try:
        await check_capacity(store, SETTINGS, priority)
    except Busy as exc:
        return exc
    return None


def test_a_second_gateway_raises_the_cluster_limit_and_a_killed_one_takes_its_share_away(db_url):
    """The review's cluster: two gateways with 2 slots and a queue of 1 each, 3 studies running (2 on A, 1 on
    B), none queued, a slot free on B. The 4th upload was refused (3 >= one gateway's 2 + 1); now it is
    taken, and the cluster refuses at 2 x 3. Once B stops being seen (killed), A alone refuses at 3."""
    upgrade(db_url)

    async def go():
        a, b = Store(db_url, owner="a"), Store(db_url, owner="b")
        try:
            await a.seen(SETTINGS.replica_alive_s)
            await b.seen(SETTINGS.replica_alive_s)
            await _accept(a, 3)
            for holder in (a, a, b):
                assert await holder.claim(SETTINGS.lease_s) is not None
            assert await a.counts() == (0, 3, 30)
            assert await a.live_replicas(SETTINGS.replica_alive_s) == 2
            assert await _refused(a) is None and await _refused(b) is None  # the 4th upload, on either gateway
            await _accept(b, 2)  # 5 active
            assert await _refused(b) is None
            await _accept(b, 1)  # 6 active: 2 gateways x (2 + 1)
            refused = await _refused(a)
            assert refused is not None and refused.retry_after_s == 7 and "6 studies" in str(refused)
            # B killed: not seen for longer than max(lease_s, 4 x sweep_interval_s); A alone refuses at 3
            async with a.tx() as s:
                await s.execute(update(Replica).where(Replica.owner == "b").values(
                    seen_at=await a.now() - 2 * SETTINGS.replica_alive_s))
            assert await a.live_replicas(SETTINGS.replica_alive_s) == 1
            refused = await _refused(a)
            assert refused is not None and "3 studies" in str(refused)
        finally:
            await a.close()
            await b.close()

    asyncio.run(go())


def test_one_gateway_still_refuses_at_its_own_limit(db_url):
    """The overload protection of a single gateway is unchanged: queued or running jobs of any origin (a
    C-STORE study waits for the same slots) reach ``max_concurrent_studies + max_queued_studies``: 429. The
    gateway counts itself before its sweeper first recorded it."""
    upgrade(db_url)

    async def go():
        a = Store(db_url, owner="a")
        try:
            assert await a.live_replicas(SETTINGS.replica_alive_s) == 1  # no row yet
            await _accept(a, 2)
            assert await _refused(a) is None
            await a.add_instance("1.2.826.0.9", "1.2.826.0.9.1", "x.dcm", "key-x", 10)
            await a.complete_now("1.2.826.0.9", 3600)  # a C-STORE study: 3 queued
            assert await a.counts() == (3, 0, 21)
            refused = await _refused(a)
            assert refused is not None and str(refused).startswith("3 studies are being screened or waiting;")
            await a.seen(SETTINGS.replica_alive_s)
            assert await _refused(a) is not None  # its own row counts once
        finally:
            await a.close()

    asyncio.run(go())


def test_an_urgent_upload_is_not_turned_away_by_routine_work(db_url):
    """A full gateway (2 slots + 1 queued, all routine) refused an emergency department's study as it refused
    any upload. Urgent uploads count only urgent jobs against the limit: taken while routine work fills the
    gateway, refused once urgent jobs alone reach it and the slot kept for them (``urgent_slots``; at most twice
    the limit and those slots in all); a routine upload is still refused all along."""
    upgrade(db_url)

    async def go():
        a = Store(db_url, owner="a")
        try:
            await _accept(a, 3)  # routine: the gateway is full
            assert await _refused(a) is not None
            assert await _refused(a, "urgent") is None
            await _accept(a, 2, "urgent")
            assert await _refused(a, "urgent") is None
            assert await a.counts(priority=PRIORITIES["urgent"]) == (2, 0, 20)
            await _accept(a, 1, "urgent")  # 3 urgent: the limit, of urgent jobs alone; one more for the urgent slot
            assert await _refused(a, "urgent") is None
            await _accept(a, 1, "urgent")
            refused = await _refused(a, "urgent")
            assert refused is not None and str(refused).startswith("4 urgent studies are being screened or waiting;")
            assert await _refused(a, "low") is not None
        finally:
            await a.close()

    asyncio.run(go())
