"""The gateway's associations as a requestor (:mod:`gateway.dimse_scu`): pynetdicom 3.0.4's reactor race
(pydicom/pynetdicom#875) forced on a real association to a real pynetdicom C-STORE SCP on loopback, through
:func:`gateway.delivery.senders.send_dicom`."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest

from gateway.delivery import parse_destinations
from gateway.delivery.senders import send_dicom
from gateway.dimse_scu import ReactorCheckpoint, steady_reactor
from tests.gateway_dicom_factory import ct_dataset, to_bytes

pytestmark = [pytest.mark.timeout(60)]

HOLD_S = 1.0
"""The longest a late reactor is held back (it lets go earlier once the next answer has arrived)."""


class _LateCheckpoint:
    """An association's checkpoint as :class:`_LateReactor` lets its threads see it. The reactor's ``wait``: after
    the wake that follows the first answer, the reactor is held back, as a thread the OS runs late would be, until
    the next answer is in the DIMSE queue (or :data:`HOLD_S` passed). The requesting thread's ``clear`` (its next
    request pausing the reactor) waits until the reactor has woken: the request comes while the reactor is late."""

    def __init__(self, late: _LateReactor, inner) -> None:
        self._late, self._inner = late, inner

    def wait(self, timeout: float | None = None) -> bool:
        running = self._inner.wait(timeout)
        late = self._late
        if late.first_answered.is_set() and not late.held.is_set():
            late.held.set()
            deadline = time.monotonic() + HOLD_S
            while late.assoc.dimse.msg_queue.empty() and time.monotonic() < deadline:
                time.sleep(0.005)
        return running

    def clear(self) -> None:
        self._late.held.wait(HOLD_S)
        self._inner.clear()

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


class _LateReactor:
    """Forces the race on ``assoc`` (an established requestor's association), whatever checkpoint it is given
    later: its reactor, woken by the first answer's ``set()``, is held back once and the next request comes
    meanwhile (:class:`_LateCheckpoint`); the requesting thread's wait for that request's answer lets the held
    reactor poll the DIMSE queue first (as a requesting thread run late would). Under pynetdicom's own checkpoint
    the held reactor still reads paused, so the request goes and the reactor takes its answer."""

    def __init__(self, assoc) -> None:
        self.assoc = assoc
        self.first_answered = threading.Event()
        self.held = threading.Event()  # the reactor woke after the first answer and was held back
        self.polled = threading.Event()  # the held reactor polled the DIMSE queue since
        self.answers_awaited = 0
        get_msg = assoc.dimse.get_msg

        def late_get_msg(block: bool = False):
            if not block:  # the reactor's poll
                item = get_msg(block=False)
                if self.held.is_set() and threading.current_thread() is assoc:
                    self.polled.set()
                return item
            self.answers_awaited += 1
            if self.answers_awaited > 1:
                self.polled.wait(HOLD_S + 2)
            item = get_msg(block=True)
            self.first_answered.set()
            return item

        assoc.dimse.get_msg = late_get_msg
        late = self

        class Late(type(assoc)):
            @property
            def _reactor_checkpoint(self):
                inner = self.__dict__["_reactor_checkpoint"]
                # to the requesting thread, the checkpoint itself until the first answer (steady_reactor reads it)
                seen = threading.current_thread() is self or late.first_answered.is_set()
                return _LateCheckpoint(late, inner) if seen else inner

            @_reactor_checkpoint.setter
            def _reactor_checkpoint(self, value) -> None:
                self.__dict__["_reactor_checkpoint"] = value

        assoc.__class__ = Late


@pytest.fixture
def pacs():
    """A pynetdicom C-STORE SCP (CT Image Storage, Verification) on loopback: its port and the SOP Instance UIDs it
    received, in order."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage, Verification

    scp = AE(ae_title="PACS")
    scp.add_supported_context(CTImageStorage)
    scp.add_supported_context(Verification)
    received: list[str] = []

    def on_store(event):
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    server = scp.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield server.server_address[1], received
    finally:
        server.shutdown()


def test_send_dicom_keeps_every_answer_when_the_reactor_runs_late(pacs, monkeypatch, caplog):
    """pynetdicom's reactor, woken by the first C-STORE's answer but run late, still read ``_is_paused``: the second
    C-STORE went, the reactor took its answer ("Received unexpected C-STORE service message") and the C-STORE waited
    out the DIMSE timeout, failing the delivery ("did not answer a C-STORE"). With the gateway's checkpoint the
    second C-STORE waits for the reactor to pause again: both answered, within the hold, not the timeout."""
    from pynetdicom.ae import ApplicationEntity

    port, received = pacs
    lates: list[_LateReactor] = []
    associate = ApplicationEntity.associate

    def late_associate(self, *args, **kwargs):
        assoc = associate(self, *args, **kwargs)
        if assoc.is_established:
            lates.append(_LateReactor(assoc))
        return assoc

    monkeypatch.setattr(ApplicationEntity, "associate", late_associate)
    [dest] = parse_destinations([{"name": "pacs", "kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1",
                                  "port": port, "objects": ["sr"], "timeout_s": 10}])
    datasets = [ct_dataset(np.full((16, 16), -1000, np.int16)) for _ in range(2)]
    items = [(str(ds.SOPInstanceUID), str(ds.SOPClassUID), to_bytes(ds)) for ds in datasets]
    caplog.set_level(logging.WARNING, logger="pynetdicom")
    started = time.monotonic()
    sent = send_dicom(dest, items, "CTSCREEN")
    elapsed = time.monotonic() - started
    assert [late.held.is_set() for late in lates] == [True], "the race was not set up"
    assert sent == received == [uid for uid, _, _ in items]
    assert elapsed < 10, elapsed  # not the DIMSE timeout waited out (a loaded machine takes more than the hold)
    assert not [r for r in caplog.records if "unexpected" in r.getMessage()]


def test_a_reactor_that_releases_on_a_network_timeout_pauses_itself(pacs):
    """With ``network_timeout_response = "A-RELEASE"`` pynetdicom's reactor releases an idle association itself:
    its release clears the checkpoint and waits for ``_is_paused``, from the reactor's own thread. A checkpoint whose
    ``wait`` says running on return (the tests' earlier copy) had that reactor wait for itself for ever."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    port, _ = pacs
    scu = AE(ae_title="CTSCREEN")
    scu.add_requested_context(Verification)
    scu.network_timeout = 0.5
    assoc = scu.associate("127.0.0.1", port, ae_title="PACS")
    assert assoc.is_established
    assoc.network_timeout_response = "A-RELEASE"
    steady_reactor(assoc)
    assert isinstance(assoc._reactor_checkpoint, ReactorCheckpoint)
    assert int(assoc.send_c_echo().Status) == 0
    assoc.join(5)
    assert assoc.is_released and not assoc.is_alive()


def test_an_association_it_cannot_make_steady_is_left_as_it_is(caplog):
    """Another pynetdicom (no ``_reactor_checkpoint`` Event or ``_is_paused`` flag) or a request under way: left as
    it is, said once at debug, without a word about the association."""
    from types import SimpleNamespace

    caplog.set_level(logging.DEBUG, logger="gateway.dimse_scu")
    newer = [SimpleNamespace(), SimpleNamespace(_reactor_checkpoint=threading.Event())]
    for assoc in newer + newer:
        assert steady_reactor(assoc) is assoc
    assert vars(newer[0]) == {} and type(newer[1]._reactor_checkpoint) is threading.Event
    paused = threading.Event()
    busy = SimpleNamespace(_reactor_checkpoint=paused, _is_paused=True)
    steady_reactor(busy)
    assert busy._reactor_checkpoint is paused and busy._is_paused
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.dimse_scu"]
    assert len(lines) == 2 and all(r.levelno == logging.DEBUG for r in caplog.records), lines
    assert "no _reactor_checkpoint" in lines[0] and "under way" in lines[1]
