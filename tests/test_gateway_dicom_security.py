"""DICOM security (``gateway.dicom_security``) with real peers: dcmtk's ``echoscu``/``storescu`` and pynetdicom.

The Storage SCP runs alone on its own loop thread over a :class:`~gateway.stow.Intake` (SQLite and a blob folder) (no Triton: the
question is who may associate and what is kept). Certificates for TLS are made here with ``cryptography``:
a CA, a server certificate and a client certificate, written as PEM files.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import subprocess
import threading
import time

import numpy as np
import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from ctscreen.embedded import free_port
from gateway.audit import AuditLog
from gateway.dicom_security import Peer, PeerPolicy, parse_peers, tls_context
from gateway.dimse import OUT_OF_RESOURCES, SUCCESS, ScpLimits, StorageScp
from gateway.dimse_scu import steady_reactor
from gateway.metrics import Metrics
from gateway.store import FolderBlobs, Store
from gateway.store.migrate import upgrade
from gateway.stow import Intake, Watermark
from tests.gateway_dicom_factory import ct_dataset
from tests.test_gateway_dimse import ECHOSCU, STORESCU, needs_dcmtk

AE = "CTSCREEN"


@pytest.fixture
def scp_factory(tmp_path):
    """Start StorageScps with given security options; all stopped at the end."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    started: list[StorageScp] = []
    audit = AuditLog(tmp_path / "audit.jsonl")
    url = f"sqlite:///{tmp_path / 'state.db'}"
    upgrade(url)
    store = Store(url)

    def make(watermark: Watermark | None = None, **options) -> StorageScp:
        stow = Intake(store, FolderBlobs(tmp_path / "blobs"), max_pending_studies=4, max_pending_bytes=64 * 1024**2,
                      watermark=watermark)
        scp = StorageScp(stow, loop, port=free_port(), host="127.0.0.1", ae_title=AE, audit=audit, **options)
        scp.start()
        started.append(scp)
        return scp

    make.audit_path = tmp_path / "audit.jsonl"  # type: ignore[attr-defined]
    yield make
    for scp in started:
        scp.stop()
    asyncio.run_coroutine_threadsafe(store.close(), loop).result(10)
    audit.close()
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def _echo(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ECHOSCU, "-v", "-aec", AE, *args, "127.0.0.1", str(port)], capture_output=True, text=True,
                          timeout=60)


@needs_dcmtk
def test_calling_ae_allow_list_with_hosts(scp_factory):
    policy = PeerPolicy(parse_peers(["GOODSCU@127.0.0.1", "FARSCU@10.0.0.0/8"]))
    scp = scp_factory(peers=policy)
    ok = _echo(scp.port, "-aet", "GOODSCU")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for calling in ("BADSCU", "FARSCU"):  # unknown title; known title from a host it may not call from
        refused = _echo(scp.port, "-aet", calling)
        out = refused.stdout + refused.stderr
        assert refused.returncode != 0 and "Association Rejected" in out, out
        assert "Rejected Permanent" in out and "Calling AE Title Not Recognized" in out, out
    wrong_called = subprocess.run([ECHOSCU, "-v", "-aet", "GOODSCU", "-aec", "NOTME", "127.0.0.1", str(scp.port)],
                                  capture_output=True, text=True, timeout=60)
    assert "Called AE Title Not Recognized" in wrong_called.stdout + wrong_called.stderr
    records = [json.loads(line) for line in scp_factory.audit_path.read_text().splitlines()]
    denied = [r for r in records if r["outcome"] == "denied"]
    assert {r["who"].split("@")[0] for r in denied} == {"BADSCU", "FARSCU", "GOODSCU"}
    assert {r["reason"] for r in denied} == {"calling_ae_not_recognised", "called_ae_not_recognised"}


def test_peer_policy_table():
    policy = PeerPolicy([Peer("A", ipaddress.ip_network("10.1.0.0/16")), Peer("B", None)])
    assert policy.allows("A", "10.1.2.3") and policy.allows("A", "::ffff:10.1.2.3")
    assert not policy.allows("A", "10.2.0.1") and not policy.allows("C", "10.1.2.3")
    assert policy.allows("B", "192.0.2.7") and not policy.allows("B", "not-an-ip")
    assert PeerPolicy([]).allows("ANY", "203.0.113.9")
    with pytest.raises(ValueError, match="AE@host"):
        parse_peers(["NOHOST"])


def test_sop_class_allow_list_and_watermark(scp_factory):
    from pynetdicom import AE as ApplicationEntity
    from pynetdicom.sop_class import CTImageStorage, EnhancedCTImageStorage

    narrow = scp_factory(sop_classes=[EnhancedCTImageStorage])
    scu = ApplicationEntity(ae_title="TESTSCU")
    scu.add_requested_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    scu.add_requested_context(EnhancedCTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    assoc = scu.associate("127.0.0.1", narrow.port, ae_title=AE)
    assert assoc.is_established
    accepted = {c.abstract_syntax for c in assoc.accepted_contexts}
    assoc.release()
    assert accepted == {EnhancedCTImageStorage}

    backlog = [0]
    full = scp_factory(watermark=Watermark(backlog=lambda: backlog[0], max_backlog_slices=10))
    ds = ct_dataset(np.full((16, 16), -1000, np.int16))
    assoc = steady_reactor(scu.associate("127.0.0.1", full.port, ae_title=AE))
    try:
        first = int(assoc.send_c_store(ds).Status)
        backlog[0] = 11
        second = int(assoc.send_c_store(ct_dataset(np.full((16, 16), -1000, np.int16))).Status)  # a new study
        rest = ct_dataset(np.full((16, 16), -1000, np.int16), study_uid=str(ds.StudyInstanceUID))
        third = int(assoc.send_c_store(rest).Status)  # the study being received is let finish
    finally:
        assoc.release()
    assert (first, second, third) == (SUCCESS, OUT_OF_RESOURCES, SUCCESS)


@needs_dcmtk
def test_a_large_instance_is_received_into_a_file_not_memory(scp_factory, tmp_path):
    """An Enhanced CT is a whole series in one instance (here 48 MiB): the SCP writes it to a file as its
    fragments arrive and stores it from there. It was gathered in memory, then copied: tracemalloc (every
    thread of this process: pynetdicom's and the event loop's) saw over twice its size at the peak."""
    import tracemalloc

    path = _enhanced_file(tmp_path)
    size = path.stat().st_size
    assert size > 48 * 1024**2
    scp = scp_factory(received_dir=tmp_path / "rx")
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        sent = subprocess.run([STORESCU, "-aec", AE, "127.0.0.1", str(scp.port), str(path)], capture_output=True,
                              text=True, timeout=120)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert sent.returncode == 0, sent.stderr
    assert peak < size / 2, f"{peak / 1024**2:.1f} MiB allocated at the peak for a {size / 1024**2:.1f} MiB instance"
    assert not list((tmp_path / "rx").glob("ctscreen-rx-*"))  # received into a file there, removed once stored
    (blob,) = [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]  # stored whole (its file meta rewritten)
    stored, original = pydicom.dcmread(blob), pydicom.dcmread(path)
    assert stored.SOPInstanceUID == original.SOPInstanceUID and stored.PixelData == original.PixelData


def _enhanced_file(tmp_path, frames: int = 96):
    from tests.gateway_dicom_factory import chest_like, enhanced_ct

    slices = [chest_like(512, 512, seed=i) for i in range(4)]
    path = tmp_path / "enhanced.dcm"
    path.write_bytes(enhanced_ct([slices[i % 4] for i in range(frames)], [(1.0, -1024.0)] * frames,
                                 [float(i) for i in range(frames)]))
    return path


@needs_dcmtk
def test_an_instance_cut_off_mid_transfer_leaves_no_file_for_good(scp_factory, tmp_path):
    """pynetdicom writes an arriving instance to a file and removes it once handled, never one whose
    association ended mid-transfer: those went to /tmp for good (an 8 GiB emptyDir in the chart). They now
    go to the SCP's own folder, whose sweep removes a file untouched past the stale age, never a live one."""
    rx = tmp_path / "rx"
    scp = scp_factory(received_dir=rx, limits=ScpLimits(network_timeout_s=1.0), stale_after_s=0.1)
    path = _enhanced_file(tmp_path, 192)
    sender = subprocess.Popen([STORESCU, "-aec", AE, "127.0.0.1", str(scp.port), str(path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not list(rx.glob("ctscreen-rx-*")) and time.monotonic() < deadline:
        time.sleep(0.005)
    sender.kill()  # mid-transfer: the SCP never sees the end of the instance
    sender.wait()
    time.sleep(0.5)
    assert len(list(rx.glob("ctscreen-rx-*"))) == 1, "no partial file: the transfer ended before the kill?"
    assert scp.sweep_received() == 0  # fresh: it may be a live transfer
    assert scp.sweep_received(now=time.time() + 3) == 1 and not list(rx.glob("ctscreen-rx-*"))  # 2 s: twice the network timeout
    assert not list((tmp_path / "blobs").rglob("*.dcm"))


def _counted(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("ctscreen_errors_total", {"reason": reason}) or 0.0


def test_the_disk_is_measured_once_at_a_time_and_a_hung_volume_counts_as_full(tmp_path):
    """A hung network volume: each instance started its own measurement (a thread parked per instance,
    the blob writes' threads with them); now one measurement at a time, and one that does not answer in
    time is "full", so senders retry instead of waiting."""
    calls: list[int] = []
    release = threading.Event()

    class Hung(Watermark):
        @staticmethod
        def _measure(disk, min_free_bytes):  # statvfs on a server that does not answer
            calls.append(1)
            release.wait(10)
            return False

    mark = Hung(disk=tmp_path, min_free_bytes=1, disk_timeout_s=0.2)

    async def scenario() -> None:
        assert await asyncio.gather(*(mark.refusal() for _ in range(20))) == ["disk_full"] * 20
        assert len(calls) == 1
        release.set()
        await asyncio.sleep(0.2)
        assert await mark.refusal() is None and len(calls) == 1  # measured: room, and it stands a while

    asyncio.run(scenario())


@needs_dcmtk
def test_association_limit_and_idle_timeout(scp_factory):
    """One association past the limit is rejected as transient (dcmtk's echoscu sees "local limit
    exceeded"), so a PACS retries; an association left idle past the network timeout is aborted by the
    SCP, and its place is free again."""
    from pynetdicom import AE as ApplicationEntity
    from pynetdicom.sop_class import Verification

    metrics = Metrics()
    scp = scp_factory(limits=ScpLimits(max_associations=1, network_timeout_s=1.0), metrics=metrics)
    scu = ApplicationEntity(ae_title="TESTSCU")
    scu.add_requested_context(Verification)
    held = scu.associate("127.0.0.1", scp.port, ae_title=AE)
    assert held.is_established
    second = _echo(scp.port)
    out = second.stdout + second.stderr
    assert second.returncode != 0 and "Rejected Transient" in out and "Local Limit Exceeded" in out, out
    deadline = time.monotonic() + 5  # counted (the intake-refusing alert sees a saturated SCP) and audited
    while not _counted(metrics, "association_limit") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _counted(metrics, "association_limit") == 1
    assert '"reason":"association_limit"' in scp_factory.audit_path.read_text().replace(" ", "")
    deadline = time.monotonic() + 10
    while held.is_established and time.monotonic() < deadline:  # idle: sends nothing
        time.sleep(0.1)
    assert held.is_aborted, "the idle association was not aborted"
    again = _echo(scp.port)
    while again.returncode != 0 and time.monotonic() < deadline:  # the SCP's thread of it ends a moment later
        time.sleep(0.2)
        again = _echo(scp.port)
    assert again.returncode == 0, again.stdout + again.stderr


# --- TLS --------------------------------------------------------------------------------------------
def _cert(subject: str, key, issuer_name, issuer_key, *, ca: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                        critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """PEM files: ca.crt, server.{crt,key}, client.{crt,key} (client signed by the CA), rogue.{crt,key} (self-signed)."""
    out = tmp_path_factory.mktemp("pki")
    keys = {n: rsa.generate_private_key(public_exponent=65537, key_size=2048) for n in ("ca", "server", "client", "rogue")}
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ctscreen test CA")])
    certs = {"ca": _cert("ctscreen test CA", keys["ca"], ca_name, keys["ca"], ca=True),
             "server": _cert("ctscreen-scp", keys["server"], ca_name, keys["ca"]),
             "client": _cert("GOODSCU", keys["client"], ca_name, keys["ca"])}
    rogue_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rogue")])
    certs["rogue"] = _cert("rogue", keys["rogue"], rogue_name, keys["rogue"])
    for name, key in keys.items():
        (out / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.TraditionalOpenSSL,
                                                            serialization.NoEncryption()))
    for name, cert in certs.items():
        (out / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out


@needs_dcmtk
def test_mutual_tls_with_dcmtk(scp_factory, pki, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="gateway.dimse")
    scp = scp_factory(ssl_context=tls_context(pki / "server.crt", pki / "server.key", pki / "ca.crt"))
    tls = ["+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt")]
    ok = _echo(scp.port, "-aet", "GOODSCU", *tls)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    plain = _echo(scp.port, "-aet", "GOODSCU", "-to", "5", "-ta", "5")
    assert plain.returncode != 0  # no TLS: no association
    rogue = _echo(scp.port, "-aet", "GOODSCU", "+tls", str(pki / "rogue.key"), str(pki / "rogue.crt"),
                  "+cf", str(pki / "ca.crt"))
    assert rogue.returncode != 0, rogue.stdout + rogue.stderr  # a certificate the CA did not sign
    anonymous = _echo(scp.port, "-aet", "GOODSCU", "+tla", "+cf", str(pki / "ca.crt"))
    assert anonymous.returncode != 0  # mutual TLS: no client certificate, no association
    ds = ct_dataset(np.full((16, 16), -1000, np.int16))
    path = tmp_path / "one.dcm"
    ds.save_as(path, enforce_file_format=True)
    stored = subprocess.run([STORESCU, "-v", "-aet", "GOODSCU", "-aec", AE, *tls, "127.0.0.1", str(scp.port),
                             str(path)], capture_output=True, text=True, timeout=60)
    assert stored.returncode == 0 and "Received Store Response (Success)" in stored.stdout + stored.stderr, (
        stored.stdout + stored.stderr)
    # the three failed handshakes are logged with OpenSSL's reason, not just "SSLError"
    failures = sorted(r.getMessage().split(" failed: ")[1] for r in caplog.records if "TLS handshake" in r.getMessage())
    assert len(failures) == 3 and all(": " in f for f in failures), failures
    assert any("CERTIFICATE_VERIFY_FAILED" in f for f in failures), failures  # the rogue certificate
    assert any("PEER_DID_NOT_RETURN_A_CERTIFICATE" in f for f in failures), failures  # none at all


@needs_dcmtk
def test_a_certificate_speaks_for_its_own_ae_title_only(scp_factory, pki):
    """Bound (CTSCREEN_DICOM_TLS_BIND_AE_TITLE), the client certificate issued to GOODSCU calls as GOODSCU,
    not as another title the allow-list knows: the host check alone let any certified host use any listed
    title. The binding needs mutual TLS."""
    from pydantic import ValidationError

    from gateway.settings import Settings

    peers = parse_peers(["GOODSCU@127.0.0.1", "OTHERSCU@127.0.0.1"])
    context = tls_context(pki / "server.crt", pki / "server.key", pki / "ca.crt")
    tls = ["+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt")]
    bound = scp_factory(peers=PeerPolicy(peers, bind_certificates=True), ssl_context=context)
    ok = _echo(bound.port, "-aet", "GOODSCU", *tls)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    other = _echo(bound.port, "-aet", "OTHERSCU", *tls)
    out = other.stdout + other.stderr
    assert other.returncode != 0 and "Calling AE Title Not Recognized" in out, out
    records = [json.loads(line) for line in scp_factory.audit_path.read_text().splitlines()]
    assert [r["reason"] for r in records if r["outcome"] == "denied"] == ["calling_ae_not_its_certificate"]
    loose = scp_factory(peers=PeerPolicy(peers), ssl_context=context)
    assert _echo(loose.port, "-aet", "OTHERSCU", *tls).returncode == 0  # what the binding stops
    with pytest.raises(ValidationError, match="needs mutual TLS"):
        Settings(dicom_tls_bind_ae_title=True, dicom_tls_cert=pki / "server.crt", dicom_tls_key=pki / "server.key")


@needs_dcmtk
def test_a_silent_connection_does_not_keep_tls_senders_out(scp_factory, pki):
    """pynetdicom shook TLS hands in its one accepting thread with no deadline: a TCP connection that sent
    nothing kept every sender out until it closed. The handshake now runs in each association's thread."""
    import socket

    scp = scp_factory(ssl_context=tls_context(pki / "server.crt", pki / "server.key", pki / "ca.crt"))
    tls = ["+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt")]
    with socket.create_connection(("127.0.0.1", scp.port)):  # connected, silent
        time.sleep(0.3)
        ok = _echo(scp.port, "-aet", "GOODSCU", "-to", "10", "-ta", "10", *tls)
        assert ok.returncode == 0, ok.stdout + ok.stderr


def test_the_scp_advertises_a_bounded_pdu(scp_factory):
    """A maximum PDU of 0 (no limit) let a sender put a whole instance into one PDU, which the idle timer
    (restarted per complete PDU) aborts when it takes longer than the network timeout to arrive."""
    from pynetdicom import AE as Requestor
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from gateway.dimse import MAX_PDU_BYTES

    scp = scp_factory()
    requestor = Requestor(ae_title="ANYSCU")
    requestor.add_requested_context(Verification)
    assoc = requestor.associate("127.0.0.1", scp.port, ae_title=AE)
    try:
        assert assoc.is_established and assoc.acceptor.maximum_length == MAX_PDU_BYTES > 0
    finally:
        assoc.release()

    elsewhere = requestor.associate("127.0.0.1", scp.port, ae_title="WHATEVER")  # no allow-list: still our title
    assert elsewhere.is_rejected and not elsewhere.is_established


def _silent(port: int, source: str, n: int) -> list:
    """``n`` TCP connections from ``source`` (a loopback address) that never send an A-ASSOCIATE-RQ."""
    import socket

    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        socks.append(s)
    time.sleep(0.3)  # accepted (or refused) by the SCP
    return socks


def _closed(s) -> bool:
    s.settimeout(0.01)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def _echo_scu(port: int, calling: str = "GOODSCU"):
    from pynetdicom import AE as ApplicationEntity
    from pynetdicom.sop_class import Verification

    scu = ApplicationEntity(ae_title=calling)
    scu.add_requested_context(Verification)
    scu.acse_timeout = 5
    return scu.associate("127.0.0.1", port, ae_title=AE)


def test_connections_from_a_host_no_peer_names_take_no_place(scp_factory):
    """12 silent connections from a host no allowed peer may call from (127.0.0.2) are closed as they are
    accepted, each audited: the allowed scanner associates (before: they held all 10 places for the ACSE
    timeout, and it got "local limit exceeded"; pen test rev1, 07 and 24)."""
    metrics = Metrics()
    scp = scp_factory(peers=PeerPolicy(parse_peers(["GOODSCU@127.0.0.1"])), metrics=metrics,
                      limits=ScpLimits(max_associations=10))
    socks = _silent(scp.port, "127.0.0.2", 12)
    try:
        assert all(_closed(s) for s in socks)
        assoc = _echo_scu(scp.port)
        assert assoc.is_established, "the allowed scanner was kept out"
        assert assoc.send_c_echo().Status == SUCCESS
        assoc.release()
    finally:
        for s in socks:
            s.close()
    records = [json.loads(line) for line in scp_factory.audit_path.read_text().splitlines()]
    refused = [r for r in records if r["action"] == "DICOM connection"]
    assert len(refused) == 12
    assert {(r["client"], r["outcome"], r["reason"]) for r in refused} == {("127.0.0.2", "denied", "host_not_allowed")}
    assert _counted(metrics, "dicom_host_not_allowed") == 12


def test_one_allowed_host_holds_a_few_connections_and_a_silent_one_briefly(scp_factory):
    """An allowed host (127.0.0.3) opening 12 silent connections keeps 3 (the cap per host), each for the wait
    for an A-ASSOCIATE-RQ (2 s here), not the ACSE timeout: a scanner from another host associates meanwhile,
    and the cap's connections are closed after the wait."""
    scp = scp_factory(peers=PeerPolicy(parse_peers(["GOODSCU@127.0.0.1", "ROUTER@127.0.0.3"])),
                      limits=ScpLimits(max_associations=4, request_timeout_s=2.0, connections_per_host=3))
    socks = _silent(scp.port, "127.0.0.3", 12)
    try:
        assert sum(_closed(s) for s in socks) == 9
        assoc = _echo_scu(scp.port)
        assert assoc.is_established
        time.sleep(2.5)  # past the request wait: the 3 kept are closed
        assert all(_closed(s) for s in socks)
        assert assoc.is_established and assoc.send_c_echo().Status == SUCCESS  # the ACSE timeout is back after the RQ
        assoc.release()
    finally:
        for s in socks:
            s.close()
    reasons = [json.loads(line)["reason"] for line in scp_factory.audit_path.read_text().splitlines()
               if json.loads(line)["action"] == "DICOM connection"]
    assert reasons == ["too_many_connections_from_host"] * 9
