"""Associations the gateway requests (an SCU: :func:`gateway.delivery.senders.send_dicom`), without pynetdicom's
reactor race (pynetdicom 3.0.4; pydicom/pynetdicom#875).

A pynetdicom :class:`~pynetdicom.association.Association` runs a reactor thread that polls the association's DIMSE
queue for the peer's requests. Each DIMSE request of ours (``send_c_store``, ``send_c_echo``, ``send_c_find``...)
first pauses it: it clears ``_reactor_checkpoint`` (a :class:`threading.Event`), waits until the reactor says
``_is_paused``, sends, takes the answer off the queue and sets the checkpoint again. The reactor says
``_is_paused = True`` before it waits on the checkpoint and False only once it runs again after the wait. So a
reactor woken by one request's ``set()`` but not yet run still reads paused: the next request is sent at once, the
reactor then polls the queue and takes that request's answer ("Received unexpected C-STORE service message"), and
the request waits out the whole DIMSE timeout (30 s) for nothing and aborts the association. For a delivery that is
a timeout and a resend of what was sent on that association.

:func:`steady_reactor` gives an established association a :class:`ReactorCheckpoint` instead, whose ``wait`` says
paused and running under the same lock as ``clear`` and returns only while the checkpoint is set: once ``clear``
has returned, a reactor that reads paused stays paused until the next ``set``.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pynetdicom.association import Association

logger = logging.getLogger(__name__)

__all__ = ["ReactorCheckpoint", "steady_reactor"]


class ReactorCheckpoint(threading.Event):
    """An association's reactor checkpoint (the ``threading.Event`` pynetdicom pauses its reactor with) that also
    keeps the association's ``_is_paused`` true to the reactor's state.

    ``wait`` (the reactor's) sets ``_is_paused`` and waits for the flag under one condition's lock, and says running
    (``_is_paused = False``) only as it returns, with the flag set; ``clear`` takes the same lock, so after it a
    reactor either waits (paused) or has already said it runs (and the requesting thread waits until it is back in
    ``wait``). The reactor clearing the checkpoint itself (pynetdicom's release on a network timeout with
    ``network_timeout_response = "A-RELEASE"``, which then waits for ``_is_paused``) is paused by definition."""

    def __init__(self, assoc: Association) -> None:
        super().__init__()
        self._assoc = assoc
        self._running = threading.Condition()
        self._flag_set = True  # a new association's checkpoint is set: its reactor runs

    def set(self) -> None:
        with self._running:
            self._flag_set = True
            self._running.notify_all()

    def clear(self) -> None:
        with self._running:
            self._flag_set = False
            if threading.current_thread() is self._assoc:
                self._assoc._is_paused = True

    def is_set(self) -> bool:
        return self._flag_set

    def wait(self, timeout: float | None = None) -> bool:
        with self._running:
            self._assoc._is_paused = True
            running = self._running.wait_for(lambda: self._flag_set, timeout)
            self._assoc._is_paused = False
            return running


def steady_reactor(assoc: Association) -> Association:
    """``assoc`` with a :class:`ReactorCheckpoint` in place of pynetdicom's: call it on an established association
    before its first request (its checkpoint is set then: nothing is under way), from the thread that requests.

    Left as it is, logged once at debug: a pynetdicom without the private ``_reactor_checkpoint`` (an Event) and
    ``_is_paused`` (a bool) this replaces (another version, which may have fixed the race its own way), or an
    association whose checkpoint is cleared (a request under way). Idempotent."""
    checkpoint: Any = getattr(assoc, "_reactor_checkpoint", None)
    if isinstance(checkpoint, ReactorCheckpoint):
        return assoc
    if not isinstance(checkpoint, threading.Event) or not isinstance(getattr(assoc, "_is_paused", None), bool):
        _left_as_is("this pynetdicom has no _reactor_checkpoint Event and _is_paused flag to replace")
        return assoc
    if not checkpoint.is_set():
        _left_as_is("its reactor is paused (a request is under way)")
        return assoc
    assoc._reactor_checkpoint = ReactorCheckpoint(assoc)
    # A reactor between its last wait on the old checkpoint and polling may still read paused: say running, so that
    # the first request waits until the reactor is back in a wait, on the new checkpoint.
    assoc._is_paused = False
    return assoc


@functools.cache
def _left_as_is(why: str) -> None:
    """One debug line per reason (no association detail: never a peer's or a patient's data)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pynetdicom = version("pynetdicom")
    except PackageNotFoundError:
        pynetdicom = "?"
    logger.debug("association left with pynetdicom %s's reactor checkpoint: %s", pynetdicom, why)
