"""Results to a RIS as HL7 v2.5.1 ORU^R01 over MLLP (destination ``kind: hl7``).

What is real: the state store (SQLite) and blob folder, the done job made from phantom DICOM files and a case
result (:func:`tests.test_gateway_delivery.done_job`, as the FHIR delivery tests make it), the
:class:`~gateway.delivery.deliverer.Deliverer` with its retries and back-off, the MLLP connection over loopback
TCP, and the RIS's side: an MLLP server of the ``hl7`` library that parses each message with ``hl7.parse`` and
answers the ACK the library builds (``tests/mllp_receiver.py``). What stands in: that server for a RIS's interface
engine, answering as the test scripts it (AE, AR, no ACK, an ACK of another message...).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pydicom
import pytest
from prometheus_client import CollectorRegistry

from aggregator.hl7v2 import filler_order_number
from ctscreen.embedded import free_port
from gateway.delivery import DestinationsError, parse_destinations
from gateway.delivery.deliverer import Deliverer
from tests.mllp_receiver import ERR_TEXT, MllpReceiver
from tests.test_aggregator_hl7v2 import orders, result_statuses
from tests.test_gateway_delivery import delivery_settings, done_job, until_states, write_study
from tests.test_gateway_dicom_security import pki  # noqa: F401 - a fixture: the test CA's certificates

pytestmark = [pytest.mark.timeout(120)]

NAME = ("O'Brien|Smith&Co", "Zoë~Ann")
"""A patient's family and given names holding HL7's delimiters (| & ~) and a non-ASCII letter."""
PATIENT_ID, ISSUER, ACCESSION = "P|12&3", "HOSP~A", "ACC^77"


@pytest.fixture
def study_files(tmp_path, request) -> list[Path]:
    return write_study(tmp_path / "study", request.node.name[-40:].replace("[", "_").replace("]", "_"))


def with_patient(files: list[Path], *, name: str = "^".join(NAME), patient_id: str = PATIENT_ID,
                 accession: str = ACCESSION, birth_date: str = "19610304", sex: str = "F") -> list[Path]:
    """The files with these patient and order attributes (UTF-8: ISO_IR 192)."""
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName, ds.PatientID, ds.IssuerOfPatientID = name, patient_id, ISSUER
        ds.AccessionNumber, ds.PatientBirthDate, ds.PatientSex = accession, birth_date, sex
        ds.save_as(f)
    return files


def ris(receiver: MllpReceiver, **kw) -> dict:
    return {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": receiver.port,
            "receiving_application": "RIS", "receiving_facility": "HOSP", "sending_facility": "RAD",
            "timeout_s": 2, "connect_timeout_s": 2, **kw}


def _deliver(tmp_path: Path, files: list[Path], destination, check, *, answers: tuple[str, ...] = (),
             positive: bool = True, receiver_port: int = 0, start=None):
    """Run ``check(deliverer, receiver, store, blobs, result)`` with a done job of ``files`` and a receiver answering
    ``answers`` first (``start(port)``: a coroutine that starts it, else a plain one); ``destination(receiver)`` is
    the destination's entry."""
    async def scenario():
        receiver = await (start(receiver_port) if start else MllpReceiver(receiver_port).start())
        receiver.answers += answers
        settings = delivery_settings(tmp_path)
        store, blobs, result = await done_job(settings, files, positive=positive)
        deliverer = Deliverer(store, blobs, parse_destinations([destination(receiver)]), settings,
                              CollectorRegistry())
        try:
            return await check(deliverer, receiver, store, blobs, result)
        finally:
            await deliverer.stop()
            await receiver.close()
            await store.close()

    return asyncio.run(scenario())


@pytest.mark.parametrize("positive", [True, False], ids=["positive", "negative"])
def test_a_result_reaches_the_ris_as_an_oru_r01_it_parses_and_accepts(study_files, tmp_path, caplog, positive):
    caplog.set_level(logging.INFO)

    async def check(deliverer, receiver, store, blobs, result):
        (task,) = await until_states(deliverer, result.job_id, {"done", "failed"})
        assert task.state == "done", task.error
        (message,) = receiver.filed
        assert receiver.connections == 1
        return message, receiver.raw[0], result

    message, raw, result = _deliver(tmp_path, with_patient(study_files), ris, check, positive=positive)
    assert raw.startswith(b"MSH|^~\\&|CTSCREEN|RAD|RIS|HOSP|")
    assert (message["MSH.F9.R1.C1"], message["MSH.F9.R1.C2"], message["MSH.F9.R1.C3"]) == ("ORU", "R01", "ORU_R01")
    assert (message["MSH.F11"], message["MSH.F12"], message["MSH.F18"]) == ("P", "2.5.1", "UNICODE UTF-8")
    assert len(message["MSH.F10"]) == 20 and len(message["MSH.F7"]) == 19  # YYYYMMDDHHMMSS+0000
    # the patient as the study has them, every delimiter escaped and read back, UTF-8 as MSH-18 says
    assert (message["PID.F5.R1.C1"], message["PID.F5.R1.C2"]) == NAME
    assert "Zoë".encode() in raw and b"O'Brien\\F\\Smith\\T\\Co^Zo\xc3\xab\\R\\Ann" in raw
    assert (message["PID.F3.R1.C1"], message["PID.F3.R1.C4"]) == (PATIENT_ID, ISSUER)
    assert (message["PID.F7"], message["PID.F8"]) == ("19610304", "F")
    # the accession number is the placer order only (the exam); the filler order is ctscreen's screening of the
    # study, so a RIS filing by filler order never files this reading over the radiologist's report of the exam
    assert orders(message) == {("ACC\\S\\77", filler_order_number(result))}  # ACCESSION, escaped as sent
    assert message["OBR.F3.R1.C1"] != ACCESSION and message["OBR.F3.R1.C2"] == "CTSCREEN"
    assert message["ORC.F1"] == "RE" and message["OBR.F24"] == "CT"
    assert result_statuses(message) == {"P"}  # a machine reading: preliminary, never F (final) nor C
    assert message["OBR.F4.R1.C1"] == "126000" and message["OBR.F4.R1.C3"] == "DCM"
    assert message["OBR.F7"][:8] == str(pydicom.dcmread(study_files[0]).StudyDate)  # when the images were taken
    assert "Research use only" in message["NTE.F3"]
    rows = {str(s(3)(1)(1)): s for s in message.segments("OBX")}
    conclusion = message.unescape(str(rows["conclusion"](5)))
    assert conclusion.startswith("Machine reading for screening, not a diagnosis") and result.verdict in conclusion
    verdict = rows["840544004"]
    assert str(verdict(2)) == "CWE" and str(verdict(3)(1)(3)) == "SCT"
    code, meaning = ("52101004", "Present") if positive else ("272519000", "Absent")
    assert (str(verdict(5)(1)(1)), str(verdict(5)(1)(2)), str(verdict(5)(1)(3)), str(verdict(5)(1)(9))) == (
        code, meaning, "SCT", result.verdict)
    assert str(rows["reason"](5)(1)(1)) == result.reason
    if positive:  # the run's numbers, as the FHIR Observation carries them
        ev = result.evidence
        assert str(rows["run"](2)) == "NM" and str(rows["run"](5)) == str(ev.n_slices)
        assert str(rows["run.extent"](5)) == str(round(ev.extent_mm, 3)) and str(rows["run.extent"](6)(1)(1)) == "mm"
        assert str(rows["run.qualifies"](5)(1)(1)) == ("Y" if ev.qualifies else "N")
        assert str(rows["quadrant"](5)(1)(1)) == ev.quadrant
    else:
        assert "run" not in rows and "quadrant" not in rows
    assert NAME[0] not in caplog.text and PATIENT_ID not in caplog.text and "delivered" in caplog.text


@pytest.mark.parametrize(("answer", "says"), [
    ("AE", "answered an application error (MSA-1 AE: ERR-3 204 unknown key identifier; its text withheld); tried "
           "again"),
    # v2.5 2.9.2: a reject "for reasons unrelated to content or format" (a system down): the RIS wants it again
    ("AR", "rejected the message (MSA-1 AR: ERR-3 207 application internal error; its text withheld), not for what it "
           "holds; tried again"),
    ("silent", "no ACK from MLLP 127.0.0.1:{port} within 0.5 s"),
    ("wrong", "acknowledged another message (MSA-2 'SOME-OTHER-ID', ours "),
    ("close", "MLLP 127.0.0.1:{port} closed the connection without an ACK"),
    ("reset", "connection to MLLP 127.0.0.1:{port} lost before its ACK (Connection reset by peer)"),
    ("garbage", "answered no HL7 ACK"),
])
def test_an_answer_that_is_no_accept_is_tried_again_then_delivered(study_files, tmp_path, answer, says):
    async def check(deliverer, receiver, store, blobs, result):
        (task,) = await until_states(deliverer, result.job_id, {"done", "failed"})
        assert task.state == "done" and task.attempts == 2, task
        errors = [h for h in task.history if h.get("state") == "pending" and h.get("detail")]
        return task, receiver, errors

    task, receiver, _ = _deliver(tmp_path, with_patient(study_files), lambda r: ris(r, timeout_s=0.5), check,
                                 answers=(answer,))
    first, again = receiver.messages
    assert str(first) == str(again)  # the same message, its control id too
    assert len(receiver.filed) == 1
    history = " ".join(str(h) for h in task.history)
    assert says.format(port=receiver.port) in history, history
    assert NAME[0] not in history and PATIENT_ID not in history and "4711" not in history


def test_a_reject_fails_the_delivery_for_good_with_the_ris_s_words(study_files, tmp_path):
    async def check(deliverer, receiver, store, blobs, result):
        (task,) = await until_states(deliverer, result.job_id, {"done", "failed"})
        return task, receiver

    task, receiver = _deliver(tmp_path, with_patient(study_files), ris, check, answers=("AR200",))
    assert task.state == "failed" and task.attempts == 1
    assert task.error == (f"MLLP 127.0.0.1:{receiver.port} rejected the message (MSA-1 AR: ERR-3 200 unsupported message "
                          "type; its text withheld); trying again cannot help")
    assert len(receiver.messages) == 1 and not receiver.filed


def test_an_ack_s_own_words_never_reach_the_log_or_the_delivery_and_any_line_ending_reads():
    """A RIS's reject named the patient ("Patient MRN 4711 DOE^JANE not registered" in MSA-3, ERR-8): ctscreen
    quoted it into its log, the delivery's error and the API (the review of this destination). Only the codes and
    ctscreen's words for them are said. An AA whose segments end in CR LF or LF (not the standard's CR) read as no
    ACK: the RIS filed the message and got it again until the delivery failed."""
    from gateway.delivery.senders import SendError, ack_outcome

    ack = (f"MSH|^~\\&|RIS|HOSP|||20261207||ACK|1|P|2.5.1\rMSA|AR|ID-1|{ERR_TEXT}\r"
           f"ERR||PID^1^3|207^{ERR_TEXT}^HL70357|E||||{ERR_TEXT}\r")
    with pytest.raises(SendError) as exc:
        ack_outcome("RIS", ack.encode(), "ID-1")
    assert "DOE" not in str(exc.value) and "4711" not in str(exc.value) and not exc.value.permanent, str(exc.value)
    for ending in ("\r\n", "\n"):
        ack_outcome("RIS", f"MSH|^~\\&|RIS|HOSP|||20261207||ACK|1|P|2.5.1{ending}MSA|AA|ID-1{ending}".encode(), "ID-1")


def test_a_ris_that_takes_the_connection_and_reads_nothing_does_not_hold_the_delivery():
    """The review: the message was written and drained without a time limit, so a RIS that accepted the connection
    and never read (a hung interface engine) held the delivery, and its slot, for good once the message outgrew
    the sockets' buffers. The send gives up after ``timeout_s`` (a real TCP server that reads nothing; a message of
    32 MB, past loopback's buffers)."""
    from gateway.delivery.senders import SendError, send_hl7

    async def scenario() -> SendError:
        held = []

        async def accept(reader, writer):  # never reads
            held.append(writer)

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        (dest,) = parse_destinations([{"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": port,
                                       "timeout_s": 1, "connect_timeout_s": 2}])
        message = b"MSH|^~\\&|CTSCREEN||||20261207||ORU^R01^ORU_R01|ID-1|P|2.5.1\rOBX|1|TX|||" + b"x" * (32 << 20)
        try:
            with pytest.raises(SendError) as exc:
                await asyncio.wait_for(send_hl7(dest, [("x", "", message + b"\r")]), 30)
            return exc.value
        finally:
            for writer in held:
                writer.close()
            server.close()

    error = asyncio.run(scenario())
    assert "read none of the message within 1 s" in str(error) and not error.permanent, str(error)


def test_a_ris_that_refuses_connections_is_tried_again_until_it_listens(study_files, tmp_path):
    port = free_port()

    async def check(deliverer, receiver, store, blobs, result):
        await receiver.close()  # nothing listens on the port
        (task,) = await until_states(deliverer, result.job_id, {"pending"}, at_least_attempts=2)
        assert task.error == f"cannot reach MLLP 127.0.0.1:{port}: Connection refused", task.error
        await MllpReceiver(port).start()  # the RIS is back (closed with the loop)
        (task,) = await until_states(deliverer, result.job_id, {"done", "failed"})
        return task

    assert _deliver(tmp_path, study_files, ris, check, receiver_port=port).state == "done"


def test_mllp_over_tls_delivers_and_a_handshake_that_fails_says_so(study_files, tmp_path, pki):  # noqa: F811
    """The destination's ``tls`` as a DICOM peer's: a RIS whose certificate chains to ``ca_file`` gets the message
    over TLS; one whose certificate is not for the name checked fails saying so, tried again (the certificates of
    tests/test_gateway_dicom_security.py, the server's for 127.0.0.1)."""
    import ssl

    from gateway.delivery.senders import SendError, send_hl7

    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(pki / "server.crt", pki / "server.key")

    async def check(deliverer, receiver, store, blobs, result):
        (task,) = await until_states(deliverer, result.job_id, {"done", "failed"})
        assert task.state == "done", task.error
        (dest,) = parse_destinations([ris(receiver, tls={"ca_file": str(pki / "ca.crt"),
                                                         "server_hostname": "ris.example.org"})])
        with pytest.raises(SendError) as exc:
            await send_hl7(dest, [("x", "", receiver.raw[0])])
        return receiver, exc.value

    async def start(port: int) -> MllpReceiver:
        return await MllpReceiver(port, ssl=server_tls).start()

    receiver, error = _deliver(tmp_path, study_files, lambda r: ris(r, tls={"ca_file": str(pki / "ca.crt")}), check,
                               start=start)
    assert len(receiver.filed) == 1
    assert str(error).startswith(f"TLS handshake with MLLP 127.0.0.1:{receiver.port} failed: certificate verify "
                                 "failed: Hostname mismatch"), str(error)
    assert not error.permanent


def test_a_study_screened_again_is_sent_as_a_preliminary_result_replacing_the_first(study_files, tmp_path):
    """Version 2 of a study (screened again, negative now) at a RIS that takes positives only: it was sent version
    1's positive, so version 2 goes all the same, again a preliminary result (OBR-25 and OBX-11 P, never F nor C:
    no radiologist verified it) of the same order and service, which the RIS files in place of the first, saying
    which reading it replaces (as the FHIR report does with its replaces extension)."""
    from aggregator.fhir import report_identifier

    async def check(deliverer, receiver, store, blobs, first):
        await until_states(deliverer, first.job_id, {"done"})
        _, _, second = await done_job(delivery_settings(tmp_path), study_files, stores=(store, blobs), positive=False)
        (task,) = await until_states(deliverer, second.job_id, {"done", "failed", "skipped"})
        assert task.state == "done" and "sent all the same" in task.payload["rule"]
        return receiver.filed, first, second

    (v1, v2), first, second = _deliver(tmp_path, with_patient(study_files),
                                       lambda r: ris(r, rule={"verdicts": ["positive"]}), check)
    assert result_statuses(v1) == result_statuses(v2) == {"P"}
    assert v1["OBR.F4"] == v2["OBR.F4"]
    assert orders(v1) == orders(v2) == {("ACC\\S\\77", filler_order_number(first))} and v1["MSH.F10"] != v2["MSH.F10"]
    assert v1["OBR.F2"] == ACCESSION and v1["OBR.F3.R1.C1"] != ACCESSION
    conclusion = v2.unescape(str(v2.segments("OBX")[0](5)))
    assert f"It replaces the earlier reading {report_identifier(first)}" in conclusion and "negative" in conclusion


@pytest.mark.parametrize(("entry", "says"), [
    ({"port": 0}, "destination 'ris' (destinations.0.port): Input should be greater than or equal to 1"),
    ({"port": 70000}, "destination 'ris' (destinations.0.port): Input should be less than or equal to 65535"),
    ({"host": ""}, "destination 'ris' (destinations.0.host): String should have at least 1 character"),
    ({"receiving_application": "RIS|A"}, "destinations.0.receiving_application): Value error, not an HL7 "
                                         "application or facility name"),
    ({"sending_facility": "RAD^1"}, "destinations.0.sending_facility): Value error, not an HL7 application"),
    ({"sending_application": "Zoë"}, "destinations.0.sending_application): Value error, not an HL7 application"),
    ({"connect_timeout_s": 0}, "destinations.0.connect_timeout_s): Input should be greater than 0"),
    ({"tls": {"ca_file": "/nonexistent/ca.pem"}}, "destination 'ris': TLS file /nonexistent/ca.pem does not exist"),
    ({"host": "${NOPE_UNSET_HOST}"}, "host refers to unset environment variable NOPE_UNSET_HOST"),
])
def test_an_hl7_destination_is_checked_at_start(entry, says):
    with pytest.raises(DestinationsError) as exc:
        parse_destinations([{"name": "ris", "kind": "hl7", "host": "ris.local", "port": 2575, **entry}])
    assert says in str(exc.value) and "\n" not in str(exc.value)


def test_an_hl7_destination_takes_its_defaults_and_its_host_from_the_environment(monkeypatch):
    monkeypatch.setenv("RIS_HOST", "ris.example.org")
    (dest,) = parse_destinations([{"name": "ris", "kind": "hl7", "host": "${RIS_HOST}", "port": 2575}])
    assert (dest.host, dest.where, dest.sending_application, dest.timeout_s, dest.connect_timeout_s) == (
        "ris.example.org", "MLLP ris.example.org:2575", "CTSCREEN", 30.0, 10.0)
