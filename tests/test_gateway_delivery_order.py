"""The order in which delivery tasks are claimed (``Deliveries.claim``), on real SQLite and a real PostgreSQL 15.

A later version of a study waits for the earlier versions' deliveries to the same destination to end (its
Rejection Note, its FHIR report's replaces, are built from what the destination acknowledged of them); an
earlier one waiting in back-off is taken at once, to be skipped as superseded; an ended one blocks nothing.
Deliveries to a FHIR destination go one at a time across replicas (``Store`` objects with owners of their own).
The deliveries end to end, against real peers, are in ``tests/test_gateway_delivery.py``.
"""

from __future__ import annotations

import asyncio

import pytest

from aggregator.case import CaseRule, decide
from gateway.store import Store
from gateway.store.deliveries import FAILED, SKIPPED, Deliveries
from gateway.store.migrate import upgrade


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return request.getfixturevalue("pg_url")


async def _screened(store: Store, study_uid: str, sop_uid: str) -> str:
    """The study's next version (one instance), screened: its job done."""
    await store.add_instance(study_uid, sop_uid, f"{sop_uid}.dcm", f"k-{sop_uid}", 1)
    job_id = (await store.complete_now(study_uid, 60)).job_id
    claimed = await store.claim(60)
    assert claimed is not None and claimed.id == job_id
    result = decide([], CaseRule()).to_result(study_instance_uid=study_uid, series_instance_uid=f"{study_uid}.9",
                                              models=[], job_id=job_id)
    assert await store.finish(job_id, result, None)
    return job_id


def _with_deliveries(db_url: str, body) -> None:
    """Run ``body(store, deliveries)`` on a migrated database."""
    upgrade(db_url)

    async def go():
        store = Store(db_url)
        try:
            await body(store, Deliveries(store))
        finally:
            await store.close()

    asyncio.run(go())


async def _first_version_sending(store: Store, deliveries: Deliveries):
    """Version 1 of study 1.2.7 screened, its delivery to ``pacs`` claimed: ``(job id, task)``."""
    first = await _screened(store, "1.2.7", "1.2.7.1")
    assert await deliveries.enqueue_missing({"pacs": "dicom"}, 3600) == 1
    sending = await deliveries.claim(60, ["pacs"])
    assert sending is not None and sending.job_id == first
    return first, sending


@pytest.mark.parametrize("earlier_ends", ["done", "failed", "skipped"])
def test_a_later_version_waits_for_the_earlier_ones_delivery_to_end(db_url, earlier_ends):
    """Version 2 was claimed and built while version 1 was still being sent to the same PACS: its Rejection Note
    could not retract what the PACS had not acknowledged yet, and version 1 stayed live there."""
    async def body(store, deliveries):
        first, sending = await _first_version_sending(store, deliveries)
        second = await _screened(store, "1.2.7", "1.2.7.2")
        other = await _screened(store, "1.2.8", "1.2.8.1")  # another study's is not held up
        assert await deliveries.enqueue_missing({"pacs": "dicom"}, 3600) == 2
        taken = await deliveries.claim(60, ["pacs"])
        assert taken is not None and taken.job_id == other
        assert await deliveries.claim(60, ["pacs"]) is None  # version 2 waits
        # and says for whom (a plain "pending" before)
        assert await deliveries.held_behind(second) == {"pacs": first}
        assert await deliveries.held_behind(first) == {} and await deliveries.held_behind(other) == {}
        state = {"done": "done", "failed": FAILED, "skipped": SKIPPED}[earlier_ends]
        assert await deliveries.finish(sending.id, state, None if state == "done" else "why")
        assert await deliveries.held_behind(second) == {}
        later = await deliveries.claim(60, ["pacs"])  # an ended delivery blocks nothing
        assert later is not None and later.job_id == second

    _with_deliveries(db_url, body)


def test_an_earlier_version_in_back_off_is_taken_at_once_to_be_skipped(db_url):
    """Version 1 waits an hour in back-off (its PACS was down); version 2, screened meanwhile, must not wait that
    hour for it: version 1 is due at once (its claim skips it as superseded), then version 2 goes."""
    async def body(store, deliveries):
        first, task = await _first_version_sending(store, deliveries)
        assert await deliveries.retry_later(task.id, 3600, "cannot reach the PACS")
        assert await deliveries.claim(60, ["pacs"]) is None  # in back-off, nothing later yet
        second = await _screened(store, "1.2.7", "1.2.7.2")
        await deliveries.enqueue_missing({"pacs": "dicom"}, 3600)
        again = await deliveries.claim(60, ["pacs"])
        assert again is not None and again.job_id == first
        assert await deliveries.claim(60, ["pacs"]) is None
        assert await deliveries.finish(again.id, SKIPPED, "superseded")
        later = await deliveries.claim(60, ["pacs"])
        assert later is not None and later.job_id == second

    _with_deliveries(db_url, body)


def test_deliveries_to_a_fhir_server_are_sent_one_at_a_time_by_all_replicas(db_url):
    """Two transactions with the same conditional create (the Device's ``ifNoneExist``) at once made two Devices
    at HAPI FHIR (hapifhir/hapi-fhir#3141), and every later one failed 412. Three replicas claim at the same
    moment, again and again: one task to the RIS is sent at a time; the PACS takes several."""
    upgrade(db_url)

    async def go():
        stores = [Store(db_url, owner=f"replica-{i}") for i in range(3)]
        replicas = [Deliveries(s) for s in stores]
        try:
            for i in range(4):
                await _screened(stores[0], f"1.2.{i}", f"1.2.{i}.1")
            assert await replicas[0].enqueue_missing({"ris": "fhir", "pacs": "dicom"}, 3600) == 8
            sent = []
            while len(sent) < 4:
                taken = await asyncio.gather(*(r.claim(60, ["ris"], None, ["ris"]) for r in replicas))
                holders = [(r, t) for r, t in zip(replicas, taken, strict=True) if t is not None]
                assert len(holders) == 1, taken
                assert await replicas[0].claim(60, ["ris"], None, ["ris"]) is None  # still being sent
                ((holder, task),) = holders
                sent.append(task.job_id)
                assert await holder.finish(task.id, "done")
            assert len(set(sent)) == 4
            pacs = [await r.claim(60, ["pacs"], None, ["ris"]) for r in replicas]
            assert all(pacs)  # not held to one at a time
        finally:
            for s in stores:
                await s.close()

    asyncio.run(go())


def test_a_forced_resend_that_fails_keeps_what_the_destination_was_acknowledged_to_hold(db_url):
    """The reviewer's case, in the store: job J2 delivered (its objects acknowledged), sent again by force to a PACS
    stopped meanwhile, failed with nothing acknowledged. The force had cleared ``sent``, the only record of what the
    PACS holds, so the next version's build read nothing of J2 (``acknowledged``): no Rejection Note for J2's SR, key
    images and KOS, live at the PACS beside the new reading (and at a RIS, no report replacing J2's from a reading
    its rule leaves out). The earlier acknowledgements are kept (``held``) with the new round's; the forced round
    still sends every object again."""
    async def body(store, deliveries):
        first, task = await _first_version_sending(store, deliveries)
        objects = [{"kind": kind, "uid": f"9.{n}", "sop_class_uid": "1.2", "blob_key": f"b{n}"}
                   for n, kind in enumerate(("sr", "key_image", "kos"))]
        assert await deliveries.save_payload(task.id, {"verdict": "positive", "objects": objects})
        assert await deliveries.mark_sent(task.id, ["9.0", "9.1", "9.2"])
        assert await deliveries.finish(task.id, "done")
        forced = await deliveries.resend(first, "pacs", "dicom", force=True)
        again = await deliveries.claim(60, ["pacs"])
        assert again is not None and again.id == task.id and again.sent == ()  # every object goes again
        assert await deliveries.mark_sent(again.id, ["9.0"])  # then the PACS went away
        assert await deliveries.finish(again.id, FAILED, "cannot reach the PACS")
        assert await deliveries.acknowledged([first], "pacs") == objects
        assert forced.sent == () and forced.held == ("9.0", "9.1", "9.2")
        (failed,) = await deliveries.of_job(first)
        assert (failed.state, failed.sent, failed.held) == (FAILED, ("9.0",), ("9.0", "9.1", "9.2"))

    _with_deliveries(db_url, body)
