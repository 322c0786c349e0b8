"""Who may send over DICOM, what, and when the SCP must say no (used by :mod:`gateway.dimse`).

* **Calling AE allow-list with source hosts** (``CTSCREEN_DICOM_ALLOWED_PEERS=CT1@10.0.0.5,PACS@10.1.0.0/24``;
  ``AE@*`` for any host). An association from an AE title not on the list, or from a host the list does
  not give that title, is rejected at association (A-ASSOCIATE-RJ) with result *rejected-permanent*
  (0x01), source *service user* (0x01), diagnostic *calling AE title not recognised* (0x03) (PS3.8
  9.3.4). A called AE title other than the SCP's is rejected with diagnostic 0x07.
* **SOP-class allow-list** (``CTSCREEN_DICOM_SOP_CLASSES``): a subset of the CT storage classes the decoder
  reads; the CT classes left out are not negotiated. Storage classes other than CT are discarded or not
  negotiated (``CTSCREEN_DICOM_ACCEPT_NON_CT``, :mod:`gateway.dimse`), never read.
* **TLS** (``CTSCREEN_DICOM_TLS_CERT`` / ``_KEY``; ``_CA`` makes it mutual: peers must present a certificate
  signed by that CA), TLS 1.2 or later (PS3.15 Annex B.9 "BCP 195" profile). With
  ``CTSCREEN_DICOM_TLS_BIND_AE_TITLE`` the calling AE title must be the certificate's subject CN or a DNS
  name of its subjectAltName (else rejected, diagnostic 0x03): a certificate issued to one scanner cannot
  call as another sender (the allow-list's host check alone lets any certified host use any listed title).
* **Watermarks** (:class:`gateway.stow.Watermark`, for C-STORE, STOW-RS and uploads alike): 0xA700 (out of resources)
  while the backlog of slices waiting to be screened is above ``CTSCREEN_DICOM_MAX_BACKLOG_SLICES`` or the
  blob volume has less free space than ``CTSCREEN_DICOM_MIN_FREE_BYTES``, so a sender keeps what the
  gateway could not keep and retries later.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.dicom import CT_SOP_CLASSES

logger = logging.getLogger(__name__)

__all__ = ["Peer", "PeerPolicy", "check_sop_classes", "parse_peers", "peer_ip", "tls_context"]

REJECTED_PERMANENT, SERVICE_USER = 0x01, 0x01
CALLING_AE_NOT_RECOGNISED, CALLED_AE_NOT_RECOGNISED = 0x03, 0x07

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Peer:
    """One allowed calling AE title and the hosts it may call from (None: any host)."""

    ae_title: str
    network: _Network | None


def parse_peers(entries: Sequence[str]) -> list[Peer]:
    """Parse ``AE@host``, ``AE@cidr`` or ``AE@*`` entries.

    >>> parse_peers(["CT1@10.0.0.5", "PACS@10.1.0.0/24", "ANY@*"])[1].network
    IPv4Network('10.1.0.0/24')
    >>> parse_peers(["CT1"])
    Traceback (most recent call last):
    ...
    ValueError: DICOM peer 'CT1' must read AE@host, AE@cidr or AE@* (e.g. CT_SCANNER@10.0.0.5).
    """
    peers = []
    for entry in entries:
        ae, sep, host = entry.strip().rpartition("@")
        ae = ae.strip()
        if not sep or not 0 < len(ae) <= 16 or "\\" in ae or not host.strip():
            raise ValueError(f"DICOM peer {entry!r} must read AE@host, AE@cidr or AE@* (e.g. CT_SCANNER@10.0.0.5).")
        host = host.strip()
        try:
            network = None if host == "*" else ipaddress.ip_network(host, strict=False)
        except ValueError as exc:
            raise ValueError(f"DICOM peer {entry!r}: {host!r} is not an IP address, a CIDR or '*'.") from exc
        peers.append(Peer(ae, network))
    return peers


def check_sop_classes(uids: Sequence[str]) -> list[str]:
    """The SOP classes to negotiate: ``uids`` (each one a CT storage class) or every CT class."""
    unknown = [u for u in uids if u not in CT_SOP_CLASSES]
    if unknown:
        raise ValueError(f"{unknown} are not CT storage classes the decoder reads "
                         f"({', '.join(sorted(CT_SOP_CLASSES))}).")
    return sorted(uids) if uids else sorted(CT_SOP_CLASSES)


class PeerPolicy:
    """Decides at A-ASSOCIATE-RQ whether a calling AE from an address may associate.

    Parameters
    ----------
    peers : Sequence[Peer]
        The allow-list; empty allows every calling AE from every host.
    bind_certificates : bool
        The calling AE title must be a name of the peer's TLS certificate (:func:`certificate_names`).
    """

    def __init__(self, peers: Sequence[Peer], bind_certificates: bool = False) -> None:
        self.peers = list(peers)
        self.bind_certificates = bind_certificates

    def allows(self, ae_title: str, address: str) -> bool:
        """Whether ``ae_title`` may call from ``address``."""
        if not self.peers:
            return True
        ip = peer_ip(address)
        if ip is None:
            return False
        return any(p.ae_title == ae_title.strip() and (p.network is None or ip in p.network) for p in self.peers)

    def admits_host(self, address: str) -> bool:
        """Whether some allowed peer may call from ``address`` (any AE title): a connection from any other host
        is refused before it sends anything. Every host is admitted without an allow-list or with a peer ``AE@*``.

        >>> policy = PeerPolicy(parse_peers(["CT1@10.0.0.5", "PACS@10.1.0.0/24"]))
        >>> policy.admits_host("10.1.0.7"), policy.admits_host("::ffff:10.0.0.5"), policy.admits_host("10.0.0.6")
        (True, True, False)
        >>> PeerPolicy(parse_peers(["ANY@*"])).admits_host("192.0.2.1")
        True
        """
        if not self.peers or any(p.network is None for p in self.peers):
            return True
        ip = peer_ip(address)
        return ip is not None and any(p.network is not None and ip in p.network for p in self.peers)

    def on_requested(self, event: Any, notify: Callable[[str], None] | None = None) -> None:
        """pynetdicom ``EVT_REQUESTED`` handler: reject an association the policy does not allow; ``notify(why)``
        is told the reason first."""
        assoc = event.assoc
        primitive = assoc.requestor.primitive  # the A-ASSOCIATE-RQ: the requestor's titles are not set yet
        ae, address = str(primitive.calling_ae_title).strip(), str(assoc.requestor.address)
        called = str(primitive.called_ae_title).strip()
        if called != str(assoc.acceptor.ae_title).strip():
            diagnostic, why = CALLED_AE_NOT_RECOGNISED, "called_ae_not_recognised"
        elif not self.allows(ae, address):
            diagnostic, why = CALLING_AE_NOT_RECOGNISED, "calling_ae_not_recognised"
        elif self.bind_certificates and ae not in certificate_names(_peer_certificate(assoc)):
            diagnostic, why = CALLING_AE_NOT_RECOGNISED, "calling_ae_not_its_certificate"
        else:
            return
        logger.warning("DICOM association from %r at %s rejected: %s", ae[:16], address, why)
        if notify is not None:  # recorded before the peer hears of it
            notify(why)
        assoc.acse.send_reject(REJECTED_PERMANENT, SERVICE_USER, diagnostic)
        assoc.kill()  # as pynetdicom's own rejections do: waits until the DUL has sent the A-ASSOCIATE-RJ


def peer_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address of a peer's ``address`` (an IPv4-mapped IPv6 address as IPv4; a zone dropped); None when
    it is none.

    >>> peer_ip("::ffff:10.0.0.5"), peer_ip("fe80::1%eth0"), peer_ip("ct1.example.org")
    (IPv4Address('10.0.0.5'), IPv6Address('fe80::1'), None)
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def certificate_names(cert: dict[str, Any] | None) -> set[str]:
    """The names a peer certificate (``ssl.SSLSocket.getpeercert()``) is issued to: its subject CNs and the
    DNS names of its subjectAltName; none without a certificate.

    >>> sorted(certificate_names({"subject": ((("commonName", "CT_ROOM_1"),),),
    ...                           "subjectAltName": (("DNS", "ct1.example.org"), ("IP Address", "10.0.0.5"))}))
    ['CT_ROOM_1', 'ct1.example.org']
    """
    if not cert:
        return set()
    names = {value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"}
    return names | {value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"}


def _peer_certificate(assoc: Any) -> dict[str, Any] | None:
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    return sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None


def tls_context(cert: Path, key: Path, ca: Path | None = None) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2+); with ``ca``, peers must present a certificate it signed."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    if ca is not None:
        context.load_verify_locations(cafile=str(ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context
