"""DICOM C-STORE into the gateway: a Storage SCP (and Verification SCP) so ctscreen can sit on a PACS route.

Scanners and PACS push studies with C-STORE. :class:`StorageScp` is a pynetdicom Application Entity
that accepts CT Image Storage, Enhanced CT Image Storage and Legacy Converted Enhanced CT Image
Storage in every transfer syntax the decoder reads, and C-ECHO. Every other storage SOP class (a dose
SR, a secondary capture: what a PACS routes along with a whole study) is accepted too and each instance
is answered 0x0000 and discarded, never stored nor screened (``CTSCREEN_DICOM_ACCEPT_NON_CT=discard``,
the default: a router that forwards a study, as Orthanc does, fails before sending anything when one of
its classes has no context, and dcmtk's storescu stops at the first such instance); with ``refuse`` they
are not negotiated, so the peer learns before sending. A CT class left out of
``CTSCREEN_DICOM_SOP_CLASSES`` is never negotiated.

Each received instance goes, as the bytes of a DICOM Part 10 file, to the same
:class:`~gateway.stow.Intake` as DICOMweb STOW-RS: written to the blob store and recorded in the
state store before 0x0000 is answered; a study is screened after ``CTSCREEN_STOW_QUIET_PERIOD_S``
without a new instance (on any replica), or on ``POST /v1/studies/{uid}/complete``. pynetdicom runs
each association in its own thread; the intake lives on the asyncio loop, so every instance is handed
over with :func:`asyncio.run_coroutine_threadsafe` and the C-STORE answer waits for it. C-STORE statuses (PS3.4 B.2.3):

========  =====================================================================
0x0000    stored (or, for a class other than CT, discarded)
0xA700    out of resources: too many studies or bytes are being received (retry later), or the instance is
          larger than one file may be (:attr:`StorageScp.max_instance_bytes`, the upload path's per-file
          limit): refused before its header is read, nothing kept (its temporary file holds nothing once
          the instance passes the limit: :class:`CappedFile`)
0xA900    the data set is not of the SOP class negotiated for it
0xA901    its study's earlier instances name another patient (Patient ID with its issuer): nothing kept
0xC000    cannot understand: the header lacks its SOP/Study Instance UIDs
0x0110    processing failure: not stored durably, or the gateway did not answer in time
========  =====================================================================

Security (:mod:`gateway.dicom_security`): an allow-list of calling AE titles and their hosts (others are
rejected at association, diagnostic 0x03), an allow-list of SOP classes, optional TLS (mutual with a CA),
and 0xA700 whenever :meth:`gateway.stow.Intake.refusal` says no (a watermark, the limits, the state
store away). Every association that sent an A-ASSOCIATE-RQ gets exactly one record in the audit trail
(:mod:`gateway.audit`) once it ends: accepted (``echo``, ``stored 40, discarded 2 (not CT)``, ``nothing
stored``), ``denied`` (rejected, with the reason and the called AE title the peer used) or ``aborted``;
before it, one record per study and C-STORE status of the instances it sent. A DIMSE message the SCP cannot act
on (a command set cut short, a request without its Message ID, a P-DATA on a presentation context not accepted)
ends its association with an A-ABORT and one warning (:meth:`StorageScp._receive`), as dcmtk's storescp ends it.

Started by the app's lifespan when ``CTSCREEN_DICOM_PORT`` is set (``ctscreen serve --dicom-port N``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from pydicom import uid as _uid
from pydicom.dataset import Dataset as _Dataset

from aggregator.schema import counted
from gateway.dicom import CT_SOP_CLASSES
from gateway.dicom_security import PeerPolicy, check_sop_classes, parse_peers, peer_ip, tls_context
from gateway.errors import GatewayError, InvalidInput, OutOfResources, PatientMismatch, StoreUnavailable
from gateway.jobs import DIMSE_PRIORITIES, PRIORITIES, ROUTINE
from gateway.metrics import Metrics
from gateway.settings import NonCt, Settings
from gateway.store.blobs import sweep_stale
from gateway.stow import PATIENT_MISMATCH, InstanceHeader, Intake, read_header
from gateway.uids import is_uid
from gateway.uploads import UploadLimits

logger = logging.getLogger(__name__)

__all__ = ["NON_CT", "TRANSFER_SYNTAXES", "CappedFile", "ConnectionGate", "ScpLimits", "StorageScp", "non_ct_storage_classes", "start_from_settings"]

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110

TRANSFER_SYNTAXES = [
    _uid.ExplicitVRLittleEndian,
    _uid.ImplicitVRLittleEndian,
    _uid.DeflatedExplicitVRLittleEndian,
    _uid.ExplicitVRBigEndian,
    _uid.JPEGLossless,
    _uid.JPEGLosslessSV1,
    _uid.JPEGBaseline8Bit,
    _uid.JPEGExtended12Bit,
    _uid.JPEGLSLossless,
    _uid.JPEGLSNearLossless,
    _uid.JPEG2000Lossless,
    _uid.JPEG2000,
    _uid.RLELossless,
]
"""Transfer syntaxes accepted for the CT storage classes (those the decoder reads), and for the others."""

NON_CT: tuple[str, ...] = get_args(NonCt)
"""What the SCP does with a storage SOP class other than CT (``CTSCREEN_DICOM_ACCEPT_NON_CT``): accept it and
answer each instance 0x0000 without keeping it (``discard``), or not negotiate it (``refuse``)."""


def non_ct_storage_classes() -> list[str]:
    """Every storage SOP class pynetdicom knows (170 in 3.0) but the CT image classes: those accepted only to be
    discarded. For an acceptor pynetdicom has no limit on supported contexts (its 128 is for requested ones).

    >>> "1.2.840.10008.5.1.4.1.1.88.67" in non_ct_storage_classes()  # X-Ray Radiation Dose SR
    True
    >>> CT_SOP_CLASSES & set(non_ct_storage_classes())
    frozenset()
    """
    from pynetdicom.presentation import AllStoragePresentationContexts

    return sorted({str(cx.abstract_syntax) for cx in AllStoragePresentationContexts} - CT_SOP_CLASSES)


def accept_private_classes(assoc: Any) -> list[str]:
    """Add to an association being requested (``EVT_REQUESTED``, before negotiation) a supported context for each
    private SOP class it proposes (a UID outside the standard's root ``1.2.840.10008``), in the transfer syntaxes
    of the others; returns those classes. Under ``non_ct="discard"`` their instances are then answered 0x0000 and
    discarded like any other class but CT: a Siemens CT study carries CSA Non-Image objects
    (``1.3.12.2.1107.5.9.1``), which were not negotiated, so the sender's C-STORE of each failed, and a sender that
    stops at a failure kept the rest of the CT back. Such a class is registered with pynetdicom as storage (at
    most :data:`MAX_PRIVATE_CLASSES` in a process). Standard classes keep their own negotiation (a Storage
    Commitment or a query is never accepted this way: a sender would wait for an answer that never comes)."""
    from pydicom.uid import UID
    from pynetdicom.presentation import build_context
    from pynetdicom.service_class import StorageServiceClass
    from pynetdicom.sop_class import register_uid

    syntaxes: list[str | UID] = [*TRANSFER_SYNTAXES]
    supported = assoc.acceptor.supported_contexts
    have = {str(c.abstract_syntax) for c in supported}
    proposed = {str(c.abstract_syntax) for c in assoc.requestor.primitive.presentation_context_definition_list}
    private = []
    with _PRIVATE_LOCK:
        for uid in sorted(proposed - have):
            if uid.startswith("1.2.840.10008.") or not is_uid(uid):
                continue
            if uid not in _PRIVATE_CLASSES:
                if len(_PRIVATE_CLASSES) >= MAX_PRIVATE_CLASSES:  # pynetdicom's table is process-wide: bounded
                    continue
                # pynetdicom dispatches a C-STORE only for a class it knows as storage
                register_uid(uid, "CtscreenPrivate_" + uid.replace(".", "_"), StorageServiceClass)
                _PRIVATE_CLASSES.add(uid)
            private.append(uid)
    if private:
        assoc.acceptor.supported_contexts = supported + [build_context(uid, syntaxes) for uid in private]
    return private


MAX_PRIVATE_CLASSES = 256
"""Most private SOP classes :func:`accept_private_classes` registers in a process (a sender proposing ever new
ones is not let grow pynetdicom's tables without bound)."""
_PRIVATE_CLASSES: set[str] = set()
_PRIVATE_LOCK = threading.Lock()


MAX_PDU_BYTES = 262_144
"""The largest PDU this SCP takes (advertised at association). 0 would mean no limit: a sender then puts a
whole instance into one PDU, and the idle timer, which restarts only when a PDU is complete, aborts an
instance that takes longer than the network timeout to arrive, every time it is sent again."""
TLS_HANDSHAKE_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class ScpLimits:
    """How many associations the SCP serves at once and how long it waits on a peer (pynetdicom's AE).

    One association past ``max_associations`` is rejected as transient (A-ASSOCIATE-RJ result 2, source 3,
    reason 2: local limit exceeded), so the sender tries again later. ``acse_timeout_s``: the wait for
    an association's acceptance or release; ``dimse_timeout_s``: for the next DIMSE message;
    ``network_timeout_s``: an association idle this long is aborted (a sender gone silent frees its place).
    ``request_timeout_s``: the wait for a connection's A-ASSOCIATE-RQ, while it holds a place (a connection
    that sends nothing is closed then); ``connections_per_host``: TCP connections one address holds at once
    (one more is closed as it is accepted), so one host, allowed or not, cannot take every place.
    """

    max_associations: int = 10
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 30.0
    network_timeout_s: float = 60.0
    request_timeout_s: float = 5.0
    connections_per_host: int = 4

    @classmethod
    def from_settings(cls, settings: Settings) -> ScpLimits:
        return cls(settings.dicom_max_associations, settings.dicom_acse_timeout_s, settings.dicom_dimse_timeout_s,
                   settings.dicom_network_timeout_s, settings.dicom_request_timeout_s,
                   settings.dicom_max_connections_per_host)


class ConnectionGate:
    """Which TCP connections the SCP takes, decided as each is accepted, before it has a thread or a place
    among the associations: one from a host no allowed peer may call from (``peers``), or one past
    ``per_host`` open from its address, is closed at once and ``refused(address, why)`` is told.

    >>> from gateway.dicom_security import parse_peers
    >>> gate = ConnectionGate(PeerPolicy(parse_peers(["CT1@10.0.0.5"])), per_host=2)
    >>> gate.admit("10.0.0.9"), gate.admit("10.0.0.5"), gate.admit("::ffff:10.0.0.5"), gate.admit("10.0.0.5")
    ('host_not_allowed', None, None, 'too_many_connections_from_host')
    >>> gate.release("10.0.0.5"); gate.admit("10.0.0.5") is None
    True
    """

    def __init__(self, peers: PeerPolicy | None, per_host: int) -> None:
        self.peers, self.per_host = peers, per_host
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    @staticmethod
    def _key(address: str) -> str:
        ip = peer_ip(address)
        return str(ip) if ip is not None else address

    def admit(self, address: str) -> str | None:
        """None when a connection from ``address`` is taken (counted until :meth:`release`), else why not."""
        if self.peers is not None and not self.peers.admits_host(address):
            return "host_not_allowed"
        key = self._key(address)
        with self._lock:
            if self._open[key] >= self.per_host:
                return "too_many_connections_from_host"
            self._open[key] += 1
        return None

    def release(self, address: str) -> None:
        """A connection :meth:`admit` took has ended."""
        key = self._key(address)
        with self._lock:
            self._open[key] -= 1
            if self._open[key] <= 0:
                del self._open[key]


def _address(client_address: Any) -> str:
    return str(client_address[0] if isinstance(client_address, tuple) else client_address)


def _server_class(gate: ConnectionGate, refused: Callable[[str, str], None]) -> type:
    from pynetdicom.transport import ThreadedAssociationServer

    class HandshakeInItsThread(ThreadedAssociationServer):
        """pynetdicom's threaded server, but the TLS handshake runs in the association's own thread under
        :data:`TLS_HANDSHAKE_TIMEOUT_S`. pynetdicom shakes hands in its one accepting thread with no
        deadline, so a single TCP connection that sent nothing kept every other sender out. Each connection's
        thread outlives its association (:func:`_handler_class`), so it is a daemon, and closing the server
        does not wait for it. Each connection passes ``gate`` first (in the accepting thread: a refused one
        never takes a thread nor an association's place), and leaves it when its thread ends."""

        daemon_threads = True
        block_on_close = False

        def verify_request(self, request: Any, client_address: Any) -> bool:
            why = gate.admit(_address(client_address))
            if why is None:
                return True
            refused(_address(client_address), why)
            return False  # socketserver closes it

        def get_request(self) -> Any:
            assert self.socket is not None  # bound: serve_forever runs
            return self.socket.accept()  # the plain socket; process_request_thread wraps it

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                if self.ssl_context:
                    before = request.gettimeout()
                    try:
                        request.settimeout(TLS_HANDSHAKE_TIMEOUT_S)
                        request = self.ssl_context.wrap_socket(request, server_side=True)
                        request.settimeout(before)
                    except OSError as exc:  # ssl.SSLError, a timeout, a reset: no association
                        logger.warning("DICOM TLS handshake with %s failed: %s", _address(client_address),
                                       _tls_failure(exc))
                        self.shutdown_request(request)
                        return
                super().process_request_thread(request, client_address)
            finally:
                gate.release(_address(client_address))

    return HandshakeInItsThread


def _handler_class(ended: Callable[[Any], None], request_timeout_s: float) -> type:
    from pynetdicom.transport import RequestHandler

    class EndsEachAssociation(RequestHandler):
        """pynetdicom's request handler, which starts the association's thread and returns; this one then
        waits for that thread in the connection's own and calls ``ended(assoc)``: every association ends
        there once, after its last event, whichever way it ended (pynetdicom fires no event for some).
        The association waits ``request_timeout_s`` for its A-ASSOCIATE-RQ (pynetdicom's wait is its ACSE
        timeout, read as the wait starts; the SCP puts the ACSE timeout back once the request came)."""

        assoc: Any = None

        def _create_association(self) -> Any:
            self.assoc = super()._create_association()
            self.assoc.acse_timeout = request_timeout_s
            return self.assoc

        def handle(self) -> None:
            super().handle()
            if self.assoc is not None:
                self.assoc.join()
                ended(self.assoc)

    return EndsEachAssociation


def _tls_failure(exc: OSError) -> str:
    """Why a TLS handshake failed as OpenSSL words it, else the error's type.

    >>> import ssl
    >>> _tls_failure(ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"))
    'SSLError'
    >>> err = ssl.SSLCertVerificationError(1, "certificate verify failed")
    >>> err.reason, err.verify_message = "CERTIFICATE_VERIFY_FAILED", "self-signed certificate"
    >>> _tls_failure(err)
    'SSLCertVerificationError: CERTIFICATE_VERIFY_FAILED (self-signed certificate)'
    """
    reason = getattr(exc, "reason", None)
    verify = getattr(exc, "verify_message", None)
    if not reason:
        return type(exc).__name__
    return f"{type(exc).__name__}: {reason}" + (f" ({verify})" if verify else "")


_REJECTIONS = {(1, 3): "calling_ae_not_recognised", (1, 7): "called_ae_not_recognised",
               (1, 2): "application_context_not_supported", (2, 2): "protocol_version_not_supported",
               (2, 1): "user_identity_not_verified",  # pynetdicom's only use of ACSE "no reason given"
               (3, 2): "association_limit", (3, 1): "temporary_congestion"}
"""A-ASSOCIATE-RJ (source, diagnostic) of pynetdicom's own rejections -> the audit's reason (PS3.8 9.3.4)."""


@dataclass
class _Association:
    """What one association asked and did, until its one audit record is written."""

    calling: str
    called: str
    address: str
    stored: Counter[tuple[str, int]] = field(default_factory=Counter)  # (study, C-STORE status) -> instances
    sent: dict[str, set[str]] = field(default_factory=dict)  # study -> SOP Instance UIDs stored (0x0000)
    discarded: int = 0
    echoes: int = 0
    malformed: bool = False  # aborted by the SCP for a DIMSE message it could not act on (StorageScp._receive)
    priorities_read: int = 0  # requests whose Priority was none of LOW, MEDIUM, HIGH, read as MEDIUM (_read_priority)

    def summary(self, accepted_contexts: int) -> str:
        """``echo``, ``stored 40, refused 2 (0xA700), discarded 3 (not CT)``, ``nothing stored``...

        >>> a = _Association("CT1", "CTSCREEN", "10.0.0.5")
        >>> a.summary(1), a.summary(0)
        ('nothing stored', 'nothing stored (no presentation context accepted)')
        >>> a.echoes, a.discarded = 1, 2
        >>> a.stored.update({("1.2.3", 0x0000): 3, ("1.2.4", 0x0000): 1, ("1.2.4", 0xA700): 2})
        >>> a.summary(2)
        'echo, stored 4, refused 2 (0xA700), discarded 2 (not CT)'
        """
        by_status: Counter[int] = Counter()
        for (_study, status), n in self.stored.items():
            by_status[status] += n
        parts = [f"echo x{self.echoes}" if self.echoes > 1 else "echo"] if self.echoes else []
        if by_status[SUCCESS]:
            parts.append(f"stored {by_status.pop(SUCCESS)}")
        parts += [f"refused {n} (0x{status:04X})" for status, n in sorted(by_status.items()) if n]
        if self.discarded:
            parts.append(f"discarded {self.discarded} (not CT)")
        if parts:
            return ", ".join(parts)
        return "nothing stored" if accepted_contexts else "nothing stored (no presentation context accepted)"


class CappedFile:
    """The temporary file pynetdicom writes a C-STORE's data set to (``tempfile.NamedTemporaryFile``'s arguments),
    keeping at most ``cap`` bytes.

    pynetdicom writes each fragment as it arrives and calls the C-STORE handler after the last, and the request
    tells no size before: an instance over the limit would be on disk whole before it could be refused. Once
    the bytes written pass ``cap`` the file is emptied and the rest is only counted (:attr:`received`):
    nothing of it stays on disk, and :attr:`over` tells the handler to refuse it.

    Parameters
    ----------
    cap : int
        The most bytes the file keeps (the File Meta Information pynetdicom writes first included).
    **kwargs
        ``tempfile.NamedTemporaryFile``'s (pynetdicom passes ``delete``, ``mode`` and ``suffix``).
    """

    def __init__(self, cap: int, **kwargs: Any) -> None:
        if cap < 0:
            raise ValueError(f'Argument "cap" must not be negative, got {cap}.')
        self._file = tempfile.NamedTemporaryFile(**kwargs)
        self.name: str = self._file.name
        self.file = self._file.file  # pynetdicom flushes it after each fragment
        self.cap = cap
        self.received = 0
        """Bytes pynetdicom wrote, those not kept included."""

    @property
    def over(self) -> bool:
        """Whether more than ``cap`` bytes came (the file is then empty)."""
        return self.received > self.cap

    def write(self, data: bytes) -> int:
        was_over = self.over
        self.received += len(data)
        if not self.over:
            return self._file.write(data)
        if not was_over:  # this write passes the cap: what was kept goes too
            self._file.seek(0)
            self._file.truncate()
            self._file.flush()
        return len(data)

    def close(self) -> None:
        self._file.close()


STORE_COMMAND_UIDS = ("AffectedSOPClassUID", "AffectedSOPInstanceUID")
"""The C-STORE-RQ command's UIDs, both mandatory (PS3.7 Table 9.1-1, "M"): the class and the instance the data set is."""

_NO_UID = _uid.UID("0")
"""What pynetdicom's file meta of a received instance says for a UID its C-STORE command lacks (never read:
:meth:`StorageScp._on_command` answers such a command and removes the file)."""


class _StoreCommand(_Dataset):
    """A C-STORE-RQ command set without a UID of :data:`STORE_COMMAND_UIDS`: reading it gives :data:`_NO_UID`
    (``in``, iterating and the request primitive pynetdicom makes of it still lack it)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in STORE_COMMAND_UIDS:
                return _NO_UID
            raise


_SERVICES = {0x0001: "C-STORE", 0x0010: "C-GET", 0x0020: "C-FIND", 0x0021: "C-MOVE", 0x0030: "C-ECHO",
             0x0100: "N-EVENT-REPORT", 0x0110: "N-GET", 0x0120: "N-SET", 0x0130: "N-ACTION", 0x0140: "N-CREATE",
             0x0150: "N-DELETE"}
DIMSE_COMMANDS: dict[int, str] = {**{field: f"{name}-RQ" for field, name in _SERVICES.items()},
                                  **{0x8000 | field: f"{name}-RSP" for field, name in _SERVICES.items()},
                                  0x0FFF: "C-CANCEL-RQ"}
"""Command Field (0000,0100) -> the DIMSE command it names (PS3.7 Table E.1-1); pynetdicom decodes these alone.

>>> from pynetdicom.dimse_messages import _MESSAGE_TYPES
>>> DIMSE_COMMANDS == {field: kind[0] for field, kind in _MESSAGE_TYPES.items()}
True
"""


class MalformedMessage(ValueError):
    """A DIMSE message the SCP cannot act on: its association is aborted (:meth:`StorageScp._receive`). Its text
    says why in the standard's words and numbers, never a value the peer sent (no patient data)."""


def _element(keyword: str) -> str:
    """A command element's name and tag, as the log words them.

    >>> _element("CommandField")
    'Command Field (0000,0100)'
    """
    from pydicom.datadict import dictionary_description, tag_for_keyword

    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return f"{dictionary_description(tag)} ({tag >> 16:04X},{tag & 0xFFFF:04X})"


MEDIUM = 0x0000
"""The Priority (0000,0700) a request whose own is none of LOW, MEDIUM, HIGH is read with (:func:`_read_priority`)."""

_PRIORITY_REQUESTS = frozenset({0x0001, 0x0010, 0x0020, 0x0021})
"""The requests whose command carries a Priority (0000,0700), mandatory: C-STORE, C-GET, C-FIND, C-MOVE (PS3.7 9.3)."""

PRIORITY_SENT = "_ctscreen_priority_sent"
"""The attribute of a command set whose Priority was read as :data:`MEDIUM`: what it said (:func:`_read_priority`)."""


def _read_priority(command: _Dataset) -> None:
    """Read a request's Priority (0000,0700) that is none of LOW (0x0002), MEDIUM (0x0000), HIGH (0x0001) as MEDIUM,
    as dcmtk's storescp takes such a C-STORE (it stores the instance); what it said is kept in the command's
    :data:`PRIORITY_SENT` (``0x0007``, ``empty``, ``2 values``, ``none``) for :meth:`StorageScp._on_command` to
    say. pynetdicom 3.0.4 refused to make its request primitive of it (``ValueError: Priority must be 0, 1, or
    2``) and dropped the association with an A-P-ABORT, after a traceback in the log (and another of its own
    EVT_DIMSE_RECV logger, which names the priority). The Priority only ranks the study (HIGH urgent, MEDIUM
    routine, LOW low: :data:`gateway.jobs.DIMSE_PRIORITIES`), and MEDIUM is the rank of a study sent without
    one (STOW-RS), so nothing is refused for it. (dcmtk aborts the association for an empty or absent Priority,
    "Command Parse Failed"; pynetdicom stored one absent as LOW, with its logger's traceback.)

    >>> from pydicom.dataset import Dataset
    >>> command = Dataset()
    >>> command.CommandField, command.Priority = 0x0001, 0x0007
    >>> _read_priority(command)
    >>> command.Priority, getattr(command, PRIORITY_SENT)
    (0, '0x0007')
    >>> command.Priority = 0x0002  # LOW
    >>> _read_priority(command), command.Priority
    (None, 2)
    """
    if command.get("CommandField") not in _PRIORITY_REQUESTS:
        return
    sent = command.get("Priority")
    if isinstance(sent, int) and sent in DIMSE_PRIORITIES:
        return
    if "Priority" not in command:
        said = "none"
    elif sent is None:
        said = "empty"
    elif isinstance(sent, int):
        said = f"0x{sent:04X}"
    else:  # several values (pynetdicom took the first, and its logger raised on them)
        said = f"{len(sent)} values"
    command.Priority = MEDIUM
    setattr(command, PRIORITY_SENT, said)


SCP_READER = threading.local()
"""``active`` while an SCP association's reader decodes a P-DATA (:meth:`StorageScp._receive`): only there does
:func:`decode_command` check a command set (``dimse_messages.decode`` is module-wide, and the gateway's own
associations as a requestor, :mod:`gateway.dimse_scu`, are read in the same process as pynetdicom reads them)."""


def decode_command(bytestring: Any, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False) -> Any:
    """pynetdicom's ``dimse_messages.decode`` (``dsutils.decode``, which it calls for command sets only) for the
    gateway: the command set, checked (:func:`_check_command`) where an SCP association's reader decodes it.

    A C-STORE-RQ command without an Affected SOP Class or Instance UID (or with an empty one, dropped) is a
    :class:`_StoreCommand`: in chunked receiving (``STORE_RECV_CHUNKED_DATASET``, the gateway's) pynetdicom 3.0.4's
    ``decode_msg`` reads both UIDs from the command, for the meta of its temporary file, before any handler runs,
    and one missing killed the reader too. The message is now decoded whole, and :meth:`StorageScp._on_command`
    answers it (pynetdicom itself drops a request short of a mandatory parameter unanswered:
    ``Association._serve_request``, "Received unexpected C-STORE service message"). A request's Priority that is
    none of LOW, MEDIUM, HIGH is read as MEDIUM (:func:`_read_priority`)."""
    from pynetdicom.dsutils import decode

    command = decode(bytestring, is_implicit_vr, is_little_endian, deflated)
    if getattr(SCP_READER, "active", False):
        _check_command(command, len(bytestring.getvalue()))
    _read_priority(command)
    if command.get("CommandField") == 0x0001:  # C-STORE-RQ
        lacking = [keyword for keyword in STORE_COMMAND_UIDS if not command.get(keyword)]
        for keyword in lacking:
            if keyword in command:  # present and empty: says no more than absent
                delattr(command, keyword)
        if lacking:
            command.__class__ = _StoreCommand
    return command


def _check_command(command: _Dataset, nbytes: int) -> None:
    """Raise :class:`MalformedMessage` for a command set (``nbytes`` long) without a Command Field (a P-DATA cut
    short) or with one that names no DIMSE command, or without a Command Data Set Type: ``decode_msg`` read them
    unchecked, and its AttributeError or KeyError killed the association's reader thread (a traceback on stderr,
    the TCP connection dropped without an A-ABORT); :meth:`StorageScp._receive` now aborts the association.

    So it does for a request without its Message ID, or a response or C-CANCEL without its Message ID Being
    Responded To (PS3.7 9.3 and 10.3: mandatory): a response must name the request's Message ID, and no response
    can name a request that has none (one with none, or 0, another request's ID, would break the standard's
    pairing: the sender could not take it for this request's). pynetdicom dropped such a request unanswered
    ("Received unexpected C-STORE service message", after a traceback of its EVT_DIMSE_RECV logger) and the sender
    waited out its DIMSE timeout for the answer; dcmtk's storescp aborts the association ("Command Parse Failed:
    Element: (0000,0110)")."""
    field = command.get("CommandField")
    if field is None:
        said, received = command.get("CommandGroupLength"), nbytes - 12  # the bytes after that element
        cut = f" (cut short: {max(received, 0)} of its {said} bytes)" if isinstance(said, int) and said > received else ""
        raise MalformedMessage(f"its command set has no {_element('CommandField')}{cut}")
    if not isinstance(field, int) or field not in DIMSE_COMMANDS:
        raise MalformedMessage(f"its command set's {_element('CommandField')} names no DIMSE command")
    name = DIMSE_COMMANDS[field]
    if not isinstance(command.get("CommandDataSetType"), int):
        raise MalformedMessage(f"its {name} command has no {_element('CommandDataSetType')}")
    if field & 0x8000 or field == 0x0FFF:  # a response, C-CANCEL: the request it is about
        if not isinstance(command.get("MessageIDBeingRespondedTo"), int):
            raise MalformedMessage(f"its {name} command has no {_element('MessageIDBeingRespondedTo')}")
    elif not isinstance(command.get("MessageID"), int):
        raise MalformedMessage(f"its {name} command has no {_element('MessageID')}, which a response must name")


def _fragment_out_of_order(message: Any, pdvs: list[Any]) -> str | None:
    """Why the presentation data values of a P-DATA (``(context id, control header and bytes)``), read after the
    message pynetdicom has gathered so far (``message``: None, or a ``DIMSEMessage``, whose class is the command's
    once its command set is whole), break the order of a message's fragments (PS3.8 E.2: the command comes first,
    and no fragment of another message comes before the current one's last), or None.

    A data set fragment before its command set: pynetdicom took such a message for whole and failed to convert it,
    with a traceback (``DIMSEServiceProvider.receive_primitive``, "Received an invalid DIMSE message"). A command
    fragment after a data set fragment that was not the last (in this P-DATA, or pending from an earlier one):
    pynetdicom read it as the message's command, never answered the request it cut short, and left that one's
    file in ``received_dir`` for the sweep. (A command after a command set in one P-DATA is not refused here: a
    message without a data set ends at its command set, and pynetdicom reads no further in that P-DATA.)

    >>> from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, DIMSEMessage
    >>> _fragment_out_of_order(None, [(1, b"\\x02...")])
    'a data set fragment came before its command set'
    >>> _fragment_out_of_order(None, [(1, b"\\x03..."), (1, b"\\x02...")]) is None
    True
    >>> _fragment_out_of_order(DIMSEMessage(), [(1, b"\\x00...")])
    'a data set fragment came before its command set'
    >>> _fragment_out_of_order(C_ECHO_RQ(), [(1, b"\\x00...")]) is None
    True
    >>> _fragment_out_of_order(C_STORE_RQ(), [(1, b"\\x03...")])
    'a command fragment came before the data set of the message before it ended'
    >>> _fragment_out_of_order(None, [(1, b"\\x03..."), (1, b"\\x00..."), (1, b"\\x03...")])
    'a command fragment came before the data set of the message before it ended'
    """
    from pynetdicom.dimse_messages import DIMSEMessage

    whole = message is not None and type(message) is not DIMSEMessage
    pending = whole  # a data set begun (in an earlier P-DATA once the command is whole) and not ended
    for _context_id, pdv in pdvs:
        if not pdv:
            continue  # decode_msg's IndexError: StorageScp._receive
        if pdv[0] & 1:  # a command fragment
            if pending:
                return "a command fragment came before the data set of the message before it ended"
            whole = whole or bool(pdv[0] & 2)
        elif not whole:
            return "a data set fragment came before its command set"
        elif pdv[0] & 2:  # the data set's last: pynetdicom reads no further in this P-DATA
            return None
        else:
            pending = True
    return None


def _discard_received(message: Any) -> None:
    """Close and remove the file pynetdicom was writing ``message``'s data set into (chunked receiving:
    ``_data_set_file``, ``_data_set_path``), if it had begun one: a message the SCP refuses or aborts keeps nothing."""
    received, path = getattr(message, "_data_set_file", None), getattr(message, "_data_set_path", None)
    if received is not None:
        received.close()
    if isinstance(path, Path):
        path.unlink(missing_ok=True)


class StorageScp:
    """A C-STORE / C-ECHO SCP feeding a :class:`~gateway.stow.Intake`.

    Parameters
    ----------
    stow : Intake
        Where instances are stored until their study is complete.
    loop : asyncio.AbstractEventLoop
        The loop that owns ``stow`` (instances are handed over to it).
    port : int
        TCP port to listen on.
    host : str
        Address to listen on.
    ae_title : str
        The SCP's AE title (1 to 16 characters).
    metrics : Metrics | None
        Counts refused instances by reason, and discarded ones by SOP class.
    handover_timeout_s : float
        Longest wait for the loop to take an instance (else 0x0110).
    peers : PeerPolicy | None
        Calling AE titles and hosts allowed (None: any).
    sop_classes : list[str] | None
        CT SOP classes negotiated and stored (None: every CT storage class).
    non_ct : str
        A storage class other than CT: ``"discard"`` (negotiated; each instance answered 0x0000, not kept)
        or ``"refuse"`` (not negotiated); see :data:`NON_CT`.
    ssl_context : ssl.SSLContext | None
        Serve DICOM over TLS.
    limits : ScpLimits
        Associations at once and the timeouts.
    audit : gateway.audit.AuditLog | None
        Where associations (one record each) and their instances per study are recorded.
    received_dir : Path | None
        Where each instance is written as it arrives, then stored from (None: the temporary folder). A
        file an aborted association left is removed once untouched for ``stale_after_s``.
    stale_after_s : float
        See ``received_dir``; longer than any pause of a live transfer (the network timeout aborts one).
    urgent_ae_titles : Collection[str]
        Calling AE titles whose studies are urgent whatever Priority their C-STORE requests carry (an
        emergency department's scanner); the others' rank is the request's Priority (LOW, MEDIUM, HIGH).
    """

    max_instance_bytes: int = UploadLimits.max_file_bytes
    """The largest instance a C-STORE may bring (the upload path's per-file limit): a larger one is answered
    0xA700 and not kept (its job would fail ``too_large`` after a 0x0000 that told the sender it was stored).
    C-STORE tells no size before the data set, and pynetdicom reads the data set to its end before the handler
    answers: its temporary file (:class:`CappedFile`) is emptied once the instance passes this, and the rest
    is counted, not written."""

    def __init__(self, stow: Intake, loop: asyncio.AbstractEventLoop, *, port: int, host: str = "0.0.0.0",
                 ae_title: str = "CTSCREEN", metrics: Metrics | None = None,
                 handover_timeout_s: float = 30.0, peers: PeerPolicy | None = None,
                 sop_classes: list[str] | None = None, ssl_context: Any = None, audit: Any = None,
                 limits: ScpLimits = ScpLimits(), received_dir: Path | None = None,
                 stale_after_s: float = 600.0, non_ct: str = "discard", urgent_ae_titles: Collection[str] = ()) -> None:
        if not 0 < port < 65536:
            raise ValueError(f'Argument "port" must be 1..65535, got {port}.')
        if not 0 < len(ae_title.strip()) <= 16:
            raise ValueError(f'Argument "ae_title" must be 1 to 16 characters, got {ae_title!r}.')
        self.urgent_ae_titles = frozenset(a.strip() for a in urgent_ae_titles)
        if non_ct not in NON_CT:
            raise ValueError(f'Argument "non_ct" must be one of {", ".join(NON_CT)}, got {non_ct!r}.')
        self.stow = stow
        self.loop = loop
        self.host, self.port, self.ae_title = host, port, ae_title.strip()
        self.metrics = metrics
        self.handover_timeout_s = handover_timeout_s
        self._server: Any = None
        self.peers, self.sop_classes, self.ssl_context = peers, sop_classes or sorted(CT_SOP_CLASSES), ssl_context
        self.audit, self.limits, self.non_ct = audit, limits, non_ct
        self._associations: dict[Any, _Association] = {}  # pynetdicom's Association -> what it did so far
        self._associations_lock = threading.Lock()
        self.received_dir = Path(received_dir or tempfile.gettempdir())
        self.stale_after_s = max(stale_after_s, 2 * limits.network_timeout_s)
        self._swept_at = 0.0

    def start(self) -> None:
        """Listen (in pynetdicom's own threads); returns at once."""
        from pynetdicom import AE, _config, dimse_messages, evt
        from pynetdicom.events import EventHandlerType
        from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # made at import, from its UID table
            Verification,
        )
        from pynetdicom.utils import make_target

        # each received instance is written to a file in received_dir as its fragments arrive (then stored
        # from there), not gathered in memory: an enhanced CT is a whole series in one instance. Both are
        # process-wide (the gateway's process is the only SCP in it); pynetdicom takes no folder for these
        # files, so its NamedTemporaryFile is given ours (where a file an abort leaves is swept), one that
        # writes no instance past max_instance_bytes
        self.received_dir.mkdir(parents=True, exist_ok=True)
        _config.STORE_RECV_CHUNKED_DATASET = True
        dimse_messages.NamedTemporaryFile = self._received_file  # type: ignore[assignment]
        dimse_messages.decode = decode_command  # a C-STORE command lacking a UID is answered: _on_command
        self.sweep_received()
        ae = AE(ae_title=self.ae_title)
        for sop_class in self.sop_classes:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        if self.non_ct == "discard":
            for sop_class in non_ct_storage_classes():
                ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.maximum_pdu_size = MAX_PDU_BYTES
        ae.maximum_associations = self.limits.max_associations
        ae.acse_timeout, ae.dimse_timeout = self.limits.acse_timeout_s, self.limits.dimse_timeout_s
        ae.network_timeout = self.limits.network_timeout_s
        ae.require_called_aet = True  # a sender addresses this AE title (with or without a peer allow-list)
        handlers: list[EventHandlerType] = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_REQUESTED, self._on_requested), (evt.EVT_REJECTED, self._on_rejected),
                    (evt.EVT_RELEASED, self._on_end),  # an abort or a dropped connection: _ended
                    (evt.EVT_DIMSE_RECV, self._on_command)]
        # AE.start_server(block=False), but with a server class that shakes TLS hands in each association's
        # own thread under a deadline (see _server_class), and a handler that sees each association end
        gate = ConnectionGate(self.peers, self.limits.connections_per_host)
        server = ae.make_server((self.host, self.port), evt_handlers=handlers, ssl_context=self.ssl_context,
                                server_class=_server_class(gate, self._connection_refused),
                                request_handler=_handler_class(self._ended, self.limits.request_timeout_s))
        ae._servers.append(server)  # as start_server does: the server's shutdown() takes itself out of the list
        threading.Thread(target=make_target(server.serve_forever), name=f"dicom-scp-{self.port}", daemon=True).start()
        self._server = server
        logger.info("DICOM SCP %s listening on %s:%d%s", self.ae_title, self.host, self.port,
                    " (TLS)" if self.ssl_context is not None else "")

    def stop(self) -> None:
        """Stop listening and abort open associations (blocking; call it off the event loop): an association
        left open went on getting 0x0000 while the gateway shut down, then 0xC211 once its loop had closed."""
        if self._server is not None:
            server, self._server = self._server, None
            server.shutdown()
            for assoc in list(server.active_associations):
                assoc.abort()
            logger.info("DICOM SCP %s stopped", self.ae_title)

    # --- pynetdicom threads -----------------------------------------------------------------
    def _connection_refused(self, address: str, why: str) -> None:
        """A TCP connection closed as it was accepted (:class:`ConnectionGate`): logged, counted and audited
        (its address and why; it sent nothing)."""
        logger.warning("DICOM connection from %s refused: %s", address, why)
        self._refuse(f"dicom_{why}")
        if self.audit is not None:
            self.audit.write(who=f"@{address}", auth="dicom_ae", action="DICOM connection", status=0,
                             client=address, outcome="denied", reason=why)

    def _on_requested(self, event: Any) -> None:
        """An A-ASSOCIATE-RQ: the association is followed from here (a connection that sends none is not one)."""
        assoc = event.assoc
        assoc.acse_timeout = self.limits.acse_timeout_s  # the request's own wait was request_timeout_s
        primitive = assoc.requestor.primitive  # the requestor's titles are not set yet
        with self._associations_lock:
            self._associations[assoc] = _Association(str(primitive.calling_ae_title or "").strip()[:16],
                                                     str(primitive.called_ae_title or "").strip()[:16],
                                                     str(assoc.requestor.address))
        if self.non_ct == "discard":
            accept_private_classes(assoc)
        assoc.dimse.receive_primitive = functools.partial(self._receive, assoc, assoc.dimse.receive_primitive)
        if self.peers is not None:  # a rejection is recorded before the peer hears of it
            self.peers.on_requested(event, lambda why: self._finish(assoc, rejected=why))

    def _on_rejected(self, event: Any) -> None:
        """pynetdicom rejected an association itself (the policy's rejections never reach here): over the
        association limit (transient: the sender retries), or, without an allow-list, a wrong called AE title."""
        assoc = event.assoc
        rj = assoc.acceptor.primitive  # the A-ASSOCIATE-RJ sent
        source, diagnostic = int(rj.result_source or 0), int(rj.diagnostic or 0)
        why = _REJECTIONS.get((source, diagnostic), f"rejected_{source}_{diagnostic}")
        if why == "association_limit":
            logger.warning("DICOM association from %r at %s rejected: %d associations open (the limit)",
                           str(assoc.requestor.primitive.calling_ae_title).strip()[:16], assoc.requestor.address,
                           assoc.ae.maximum_associations)
        self._finish(assoc, rejected=why)

    def _on_end(self, event: Any) -> None:
        """Released (an abort, by either side, or a dropped connection is written when its thread ends: _ended)."""
        self._finish(event.assoc)

    def _ended(self, assoc: Any) -> None:
        """The association's thread has ended: its record, if no event wrote it (a connection that dropped
        without an A-ABORT, say), and the files of aborted transfers."""
        try:
            self._finish(assoc, aborted=True)
            if time.monotonic() - self._swept_at > 60:
                self.sweep_received()
        except Exception as exc:  # noqa: BLE001 - in a connection's thread: logged, never raised into socketserver
            logger.warning("end of a DICOM association not recorded: %s", type(exc).__name__)

    def _finish(self, assoc: Any, *, rejected: str | None = None, aborted: bool = False) -> None:
        """Write the association's one audit record (the first call for it; later ones find nothing): denied
        with the reason, or what it did, preceded by a record per study and C-STORE status it sent."""
        with self._associations_lock:
            done = self._associations.pop(assoc, None)
        if done is None:
            return
        if rejected is not None:
            self._refuse(rejected)
        else:
            self._transfer_ended(done, aborted)
        if self.audit is None:
            return
        who, action = f"{done.calling}@{done.address}", f"DICOM association to {done.called}"
        if rejected is not None:
            self.audit.write(who=who, auth="dicom_ae", action=action, status=0, client=done.address,
                             outcome="denied", reason=rejected)
            return
        for (study, status), n in sorted(done.stored.items()):
            self.audit.write(who=who, auth="dicom_ae", action=f"DICOM C-STORE x{n}", status=status,
                             client=done.address, study_instance_uid=study,
                             outcome="ok" if status == SUCCESS else "refused",
                             reason=None if status == SUCCESS else f"0x{status:04X}")
        summary = done.summary(len(assoc.accepted_contexts))
        if aborted:
            summary = f"aborted{' (malformed DIMSE message)' if done.malformed else ''}: {summary}"
        self.audit.write(who=who, auth="dicom_ae", action=action, status=0, client=done.address,
                         outcome="aborted" if aborted else "ok", reason=summary)

    def _transfer_ended(self, done: _Association, aborted: bool) -> None:
        """Tell the store how the association into each study it stored instances of ended: without a release,
        the study's open version may be incomplete, and its result says so (a negative one is indeterminate);
        a release clears that where it sent every instance the open version holds (the sender sent the study
        again, whole; not a second sender adding a few). Waits for the store at most
        :attr:`handover_timeout_s` (in the association's thread); a failure is logged, never raised."""
        if not done.sent:
            return
        stored = sum(len(sops) for sops in done.sent.values())
        note = (f"The C-STORE association from {done.calling or 'an unnamed AE'} ended without a release (an abort or a "
                f"dropped connection) after {counted(stored, 'instance')}: the study may be incomplete.") if aborted else None
        try:
            future = asyncio.run_coroutine_threadsafe(self.stow.transfer_ended(done.sent, note), self.loop)
            future.result(self.handover_timeout_s)
        except Exception as exc:  # noqa: BLE001 - the loop stopping, the store away: said, not raised
            logger.warning("how a DICOM association ended (%s) not recorded for %d studies: %s",
                           "aborted" if aborted else "released", len(done.sent), type(exc).__name__)

    def _tally(self, assoc: Any, *, stored: tuple[str, int] | None = None, sop_instance_uid: str = "", echoes: int = 0,
               discarded: int = 0) -> None:
        """Count what the association did: an instance stored (its study and status, and its SOP Instance UID), a
        C-ECHO, a discard."""
        with self._associations_lock:
            done = self._associations.get(assoc)
            if done is not None:
                if stored is not None:
                    done.stored[stored] += 1
                    if stored[1] == SUCCESS and stored[0]:
                        done.sent.setdefault(stored[0], set()).add(sop_instance_uid)
                done.echoes += echoes
                done.discarded += discarded

    def sweep_received(self, now: float | None = None) -> int:
        """Remove the files of instances whose association ended mid-transfer (pynetdicom removes a file once
        the instance has been handled, never one it did not finish): those untouched for ``stale_after_s``.
        Runs at start and at an association's end, at most once a minute; returns how many it removed."""
        self._swept_at = time.monotonic()
        removed = sweep_stale(self.received_dir, "ctscreen-rx-*", self.stale_after_s, now)
        if removed:
            logger.warning("removed %d partly received DICOM instance file(s) left by aborted associations", removed)
        return removed

    def _received_file(self, **kwargs: Any) -> CappedFile:
        """pynetdicom's ``NamedTemporaryFile`` for a C-STORE's data set: in ``received_dir``, and capped at
        :attr:`max_instance_bytes` (read as each instance begins)."""
        return CappedFile(self.max_instance_bytes, dir=self.received_dir, prefix="ctscreen-rx-", **kwargs)

    def _count_store(self, event: Any, study: str, status: int, sop_instance_uid: str = "") -> int:
        self._tally(event.assoc, stored=(study, status), sop_instance_uid=sop_instance_uid)
        return status

    def _on_echo(self, event: Any) -> int:
        self._tally(event.assoc, echoes=1)
        return SUCCESS

    def _refuse(self, reason: str) -> None:
        if self.metrics is not None:
            self.loop.call_soon_threadsafe(self.metrics.error, reason)

    def _discard(self, event: Any, sop_class: str) -> int:
        """An instance of a class other than CT (``non_ct="discard"``): answered 0x0000 unread, counted, not kept
        (pynetdicom removes its file once this returns)."""
        self._tally(event.assoc, discarded=1)
        if self.metrics is not None:
            self.loop.call_soon_threadsafe(self.metrics.discarded, sop_class)
        return SUCCESS

    def _receive(self, assoc: Any, receive: Callable[[Any], None], primitive: Any) -> None:
        """Each P-DATA the association's reader passes to pynetdicom's DIMSE provider (``receive``, its
        ``receive_primitive``, in the reader thread; installed as the association is requested): one pynetdicom
        cannot decode ends the association with an A-ABORT (source: service user), one warning in the log and
        nothing kept, as dcmtk's storescp ends it ("DIMSE failure (aborting association)"); the SCP goes on
        serving the others. Such a message was a P-DATA on a presentation context the association did not
        accept, a data set fragment before its command or a command before a data set ended
        (:func:`_fragment_out_of_order`), or a command set :func:`decode_command` refuses (one cut before its
        Command Field, one naming no DIMSE command, a request without its Message ID:
        :func:`_check_command`). pynetdicom's exception killed the reader thread (a traceback on stderr, the
        connection dropped without an A-ABORT, or an A-P-ABORT after a logged traceback for a fragment out of
        order). Later P-DATA of the association are dropped unread."""
        if assoc.is_aborted:
            return
        dimse = assoc.dimse
        why = None
        accepted = {cx.context_id for cx in assoc.accepted_contexts}
        pdvs = list(primitive.presentation_data_value_list)
        stray = sorted({context_id for context_id, _pdv in pdvs if context_id not in accepted})
        if stray:
            why = f"a P-DATA on presentation context {stray[0]}, which the association did not accept"
        elif (out_of_order := _fragment_out_of_order(dimse.message, pdvs)) is not None:
            why = out_of_order
        else:
            SCP_READER.active = True  # decode_command checks each command set
            try:
                receive(primitive)
                return
            except MalformedMessage as exc:
                why = str(exc)
            except Exception as exc:  # noqa: BLE001 - in the association's reader: pynetdicom's decoding failed
                why = f"its DIMSE message could not be decoded ({type(exc).__name__})"
            finally:
                SCP_READER.active = False
        message, dimse.message = dimse.message, None  # what was gathered of it goes
        with contextlib.suppress(OSError):  # one left behind is swept (sweep_received)
            _discard_received(message)
        peer = assoc.requestor
        logger.warning("DICOM association from %s@%s aborted (A-ABORT): %s", peer.ae_title, peer.address, why)
        self._refuse("malformed_dimse")
        with self._associations_lock:
            done = self._associations.get(assoc)
            if done is not None:
                done.malformed = True
        assoc.abort(block=False)  # in the reader: the abort is sent from its queue, then the thread ends

    def _on_command(self, event: Any) -> None:
        """EVT_DIMSE_RECV (each DIMSE message received, in the association's reader): a C-STORE-RQ whose command lacks
        its Affected SOP Class or Instance UID (:func:`decode_command`; PS3.7 Table 9.1-1: both mandatory) is
        answered 0xC000 here, with an Error Comment that names what it lacks (PS3.4 Table B.2-1: 0xCxxx, "cannot
        understand", the C-STORE failure for a request the SCP cannot make sense of; 0xA900 is for a data set
        that does not match its SOP class, and there may be no class to match). pynetdicom then drops the request
        (warned: "Received unexpected C-STORE service message") and the association goes on. Said in the log
        (which UIDs: no patient data), counted and audited as a refusal; the data set's file is removed. (One
        without a Message ID as well, which no response could name, never comes here: :func:`decode_command`
        refuses it and :meth:`_receive` aborts the association.)

        A request whose Priority :func:`decode_command` read as MEDIUM (none of LOW, MEDIUM, HIGH) goes on as
        one with MEDIUM: the first of an association is said at INFO (the peer, what it sent; a sender that gets
        it wrong gets it wrong for every instance), the others at DEBUG."""
        try:
            message = event.message
            command = message.command_set
            if hasattr(command, PRIORITY_SENT):
                self._priority_read(event.assoc, DIMSE_COMMANDS[command.CommandField], getattr(command, PRIORITY_SENT))
            if not isinstance(command, _StoreCommand):
                return
            lacking = {(False, True): "Affected SOP Class UID", (True, False): "Affected SOP Instance UID"}.get(
                ("AffectedSOPClassUID" in command, "AffectedSOPInstanceUID" in command), "Affected SOP Class and Instance UIDs")
            peer = event.assoc.requestor
            logger.warning("C-STORE from %s@%s refused (0xC000): its command lacks the %s (PS3.7 9.1.1: mandatory)",
                           peer.ae_title, peer.address, lacking)
            self._refuse("no_affected_sop_uid")
            self._tally(event.assoc, stored=("", CANNOT_UNDERSTAND))
            _discard_received(message)
            from pynetdicom.dimse_primitives import C_STORE

            rsp = C_STORE()
            rsp.MessageIDBeingRespondedTo = command.MessageID
            rsp.Status = CANNOT_UNDERSTAND
            # LO, 64 characters at most; pynetdicom's attribute (a str, documented) starts None, typed so
            rsp.ErrorComment = f"Command lacks {lacking}"  # type: ignore[assignment]
            if "AffectedSOPClassUID" in command:
                rsp.AffectedSOPClassUID = command.AffectedSOPClassUID
            event.assoc.dimse.send_msg(rsp, message.context_id)
        except Exception as exc:  # noqa: BLE001 - in the association's reader: logged, never raised
            logger.warning("a DIMSE command received not handled: %s", type(exc).__name__)

    def _priority_read(self, assoc: Any, name: str, said: str) -> None:
        """Say that a request's Priority was read as MEDIUM (:meth:`_on_command`): at INFO for the association's
        first, at DEBUG after it."""
        with self._associations_lock:
            done = self._associations.get(assoc)
            first = done is None or not done.priorities_read
            if done is not None:
                done.priorities_read += 1
        peer = assoc.requestor
        logger.log(logging.INFO if first else logging.DEBUG,
                   "%s from %s@%s: its Priority (0000,0700) is %s, none of LOW, MEDIUM, HIGH (PS3.7 9.3); read as "
                   "MEDIUM%s", name, peer.ae_title, peer.address, said,
                   " (said once per association)" if first else "")

    def _on_store(self, event: Any) -> int:
        sop_class = str(event.context.abstract_syntax)
        if sop_class not in CT_SOP_CLASSES:  # negotiated only to be discarded
            return self._discard(event, sop_class)
        data = event.dataset_path  # the instance in a file pynetdicom removes once this returns
        peer = event.assoc.requestor
        received = getattr(event.request, "_dataset_file", None)  # pynetdicom's; ours unless another SCP started
        nbytes = received.received if isinstance(received, CappedFile) else data.stat().st_size
        if nbytes > self.max_instance_bytes or (isinstance(received, CappedFile) and received.over):
            logger.info("C-STORE from %s refused (0xA700): %d bytes, over the %d bytes one instance may be",
                        peer.ae_title, nbytes, self.max_instance_bytes)
            self._refuse("too_large")
            return self._count_store(event, "", OUT_OF_RESOURCES)
        name = f"dimse:{peer.ae_title}@{peer.address}#{event.request.AffectedSOPInstanceUID}"
        try:
            header = read_header(data, name)
        except InvalidInput as exc:  # not DICOM, or a deflated data set that inflates past the bounds
            logger.info("C-STORE from %s refused (0xC000): %s", peer.ae_title, exc.reason)  # a message may quote the header
            self._refuse(exc.reason)
            return self._count_store(event, "", CANNOT_UNDERSTAND)  # in the association's audit summary too
        if header.sop_class_uid != str(event.request.AffectedSOPClassUID) or header.sop_class_uid not in CT_SOP_CLASSES:
            self._refuse("not_ct")
            return self._count_store(event, "", DOES_NOT_MATCH)
        if header.sop_instance_uid != str(event.request.AffectedSOPInstanceUID).strip():
            # PS3.7 9.1.1: the command names the instance its data set is; a sender that names another would
            # count as acknowledged (retries, storage commitment, the audit) an instance the gateway does not hold
            logger.info("C-STORE from %s refused (0xA900): the data set's SOP Instance UID is not the command's",
                        peer.ae_title)
            self._refuse("uid_mismatch")
            return self._count_store(event, "", DOES_NOT_MATCH)
        urgent = str(peer.ae_title).strip() in self.urgent_ae_titles
        priority = PRIORITIES["urgent"] if urgent else DIMSE_PRIORITIES.get(int(event.request.Priority or 0), ROUTINE)
        future = None
        try:
            future = asyncio.run_coroutine_threadsafe(self._hold(header, name, data, data.stat().st_size, priority),
                                                      self.loop)
            return self._count_store(event, header.study_instance_uid, future.result(self.handover_timeout_s),
                                     header.sop_instance_uid)
        except Exception as exc:  # noqa: BLE001 - the loop stopping (cancelled), closed or stuck, or a fault:
            # answered, never raised (pynetdicom would answer 0xC211 and leave the instance's file behind)
            if future is not None:
                future.cancel()
            logger.warning("C-STORE of %s not taken by the gateway: %s", header.sop_instance_uid, type(exc).__name__)
            return self._count_store(event, header.study_instance_uid, PROCESSING_FAILURE)

    # --- the event loop ---------------------------------------------------------------------
    async def _hold(self, header: InstanceHeader, name: str, data: Path, nbytes: int, priority: int = ROUTINE) -> int:
        refusal = await self.stow.refusal(header.study_instance_uid, nbytes)
        if refusal is not None:  # the sender keeps it and retries
            self._count(refusal)
            return OUT_OF_RESOURCES
        try:
            await self.stow.add(header, name, data, nbytes, priority)  # fsynced and recorded before 0x0000
        except (StoreUnavailable, OutOfResources) as exc:  # the state store or the blob volume cannot take it now:
            self._count(exc.reason)  # the sender retries
            return OUT_OF_RESOURCES
        except PatientMismatch as exc:  # its study names another patient: nothing kept (the audit has the status)
            self._count(exc.reason)
            return PATIENT_MISMATCH
        except GatewayError as exc:
            self._count(exc.reason)
            return PROCESSING_FAILURE
        return SUCCESS

    def _count(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.error(reason)


def start_from_settings(settings: Settings, stow: Intake, metrics: Metrics | None = None, *,
                        audit: Any = None) -> StorageScp | None:
    """Start the SCP the settings ask for (``dicom_port``), on the running loop; None when not asked.

    Raises
    ------
    OSError
        When the port cannot be bound (the gateway then does not start).
    """
    if settings.dicom_port is None:
        return None
    peers = parse_peers(settings.dicom_allowed_peers)
    bind = settings.dicom_tls_bind_ae_title
    cert, key, ca = settings.dicom_tls_cert, settings.dicom_tls_key, settings.dicom_tls_ca
    scp = StorageScp(stow, asyncio.get_running_loop(), port=settings.dicom_port, host=settings.dicom_host,
                     ae_title=settings.dicom_ae_title, metrics=metrics,
                     peers=PeerPolicy(peers, bind) if peers or bind else None,
                     sop_classes=check_sop_classes(settings.dicom_sop_classes),
                     ssl_context=tls_context(cert, key, ca) if cert is not None and key is not None else None,
                     audit=audit, limits=ScpLimits.from_settings(settings),
                     received_dir=settings.data_dir / "dicom-received", non_ct=settings.dicom_accept_non_ct,
                     urgent_ae_titles=settings.dicom_urgent_ae_titles)
    scp.start()
    return scp
