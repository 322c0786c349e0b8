"""The HL7 v2 ORU^R01 of a result (:mod:`aggregator.hl7v2`), parsed back with the ``hl7`` library; the message a
RIS gets over MLLP is in ``tests/test_gateway_delivery_hl7.py``."""

from __future__ import annotations

import hl7

from aggregator.case import decide
from aggregator.hl7v2 import Parties, filler_order_number, to_oru


def test_an_oru_escapes_every_delimiter_and_leaves_absent_or_invalid_patient_fields_empty():
    """Pure: the message of a result whose study has a backslash in a name (DICOM's value delimiter, here as it
    reached the headers kept), a birth date that is no date, a sex outside M/F/O, and no accession number."""
    result = decide([]).to_result(study_instance_uid="1.2.3", series_instance_uid="1.2.3.4", job_id="job-7") \
        .model_copy(update={"message": "No run: a | b ^ c ~ d \\ e & f\nsecond line"})
    text = to_oru(result, {"PatientName": "Back\\slash^Ann", "PatientBirthDate": "19611340", "PatientSex": "W"},
                  Parties(sending_facility="RAD"))
    assert "\n" not in text and text.endswith("\r")
    message = hl7.parse(text)
    assert message["PID.F5.R1.C1"] == "Back\\slash" and "Back\\Eslash" not in text and "Back\\E\\slash" in text
    assert (message["PID.F3"], message["PID.F7"], message["PID.F8"]) == ("", "", "")
    # without an accession number no placer order; the filler order is ctscreen's screening of the study
    assert orders(message) == {("", filler_order_number(result))}
    assert message["OBR.F3.R1.C2"] == "CTSCREEN"
    reason = next(s for s in message.segments("OBX") if str(s(3)(1)(1)) == "reason")
    assert message.unescape(str(reason(5)(1)(2))) == "No run: a | b ^ c ~ d \\ e & f\rsecond line"
    assert "\\F\\ b \\S\\ c \\R\\ d \\E\\ e \\T\\ f\\.br\\second line" in text


def _positive(job_id: str):
    import numpy as np

    from aggregator.case import SliceInput

    lesion, va = np.array([[200, 180, 240, 220, 0.9]], np.float32), np.array([60, 60, 450, 450], np.float32)
    inputs = [SliceInput(f"1.2.3.4.{k}", 5.0 * k, lesion if k in (2, 3, 4) else np.zeros((0, 5)), va, rows=512,
                         cols=512) for k in range(8)]
    return decide(inputs).to_result(study_instance_uid="1.2.3", series_instance_uid="1.2.3.4", job_id=job_id)


def orders(message: hl7.Message) -> set[tuple[str, str]]:
    """(placer, filler order number) of the ORC and of the OBR of ``message``, each field whole (as sent)."""
    return {(str(message.segment(name)(2)), str(message.segment(name)(3))) for name in ("ORC", "OBR")}


def result_statuses(message: hl7.Message) -> set[str]:
    """OBR-25 and every OBX-11 of ``message``: what it claims of its result (tables 0123, 0085)."""
    return {str(s(25)) for s in message.segments("OBR")} | {str(s(11)) for s in message.segments("OBX")}


def test_a_reading_that_replaces_one_sent_is_again_preliminary_naming_it():
    """A machine reading is preliminary (P), never final (F) nor a correction of a final result (C), which a RIS
    shows as the exam's verified report: the first reading and the re-screen that replaces it alike."""
    first, second = _positive("job-1"), _positive("job-2")
    patient = {"PatientID": "P1", "AccessionNumber": "A1", "StudyDate": "20261205", "StudyTime": "093015",
               "TimezoneOffsetFromUTC": "+0100", "PatientName": "Doe^Jane", "PatientBirthDate": "19610304",
               "PatientSex": "f"}
    sent = hl7.parse(to_oru(first, patient))
    again = hl7.parse(to_oru(second, patient, supersedes=[first]))
    assert result_statuses(sent) == result_statuses(again) == {"P"}
    assert len(sent.segments("OBX")) > 5 and len(again.segments("OBX")) == len(sent.segments("OBX"))
    assert sent["OBR.F4"] == again["OBR.F4"]  # the same service: the later result replaces the earlier one
    assert sent["MSH.F10"] != again["MSH.F10"]
    # the accession number is the placer order (the exam); the filler order is ctscreen's, the same for both
    # readings of the study (so the later replaces the earlier), never the accession number
    for message in (sent, again):
        assert orders(message) == {("A1", filler_order_number(first))}
        assert message["OBR.F3.R1.C1"] not in ("A1", "") and message["OBR.F3.R1.C2"] == "CTSCREEN"
    assert sent["OBR.F7"] == "20261205093015+0100" and sent["PID.F8"] == "F" and sent["PID.F5.R1.C2"] == "Jane"
    assert "It replaces the earlier reading job-1 of this study." in again.unescape(str(again.segments("OBX")[0](5)))
    assert to_oru(first, patient, now=None).split("|")[9] == sent["MSH.F10"]  # the same message, the same id


def test_two_studies_have_two_filler_orders_and_the_service_is_the_fhir_report_s_code():
    """Another study, another filler order number, also under the same accession number (a RIS that gives one
    accession to two studies of a visit keeps both readings); OBR-4 is the FHIR report's code, DICOM 126000, no LOINC
    imaging report code (LOINC 24627-2 "CT Chest" is the radiologist's report of the exam)."""
    from aggregator.fhir import to_fhir

    one = _positive("job-1")
    other = one.model_copy(update={"study_instance_uid": "1.2.4", "job_id": "job-3"})
    patient = {"AccessionNumber": "A1"}
    first, second = hl7.parse(to_oru(one, patient)), hl7.parse(to_oru(other, patient))
    assert orders(first) == {("A1", filler_order_number(one))}
    assert orders(second) == {("A1", filler_order_number(other))}
    assert filler_order_number(one) != filler_order_number(other)
    coding = to_fhir(one, patient)["entry"][0]["resource"]["code"]["coding"][0]
    assert (first["OBR.F4.R1.C1"], first["OBR.F4.R1.C2"]) == (coding["code"], coding["display"]) == (
        "126000", "Imaging Measurement Report")
    assert first["OBR.F4.R1.C3"] == "DCM" and "LN" not in {str(c) for c in first.segment("OBR")(4)(1)}
    # the images' study whatever the accession (none here), and no order status claimed for the exam
    bare = hl7.parse(to_oru(other, {}))
    assert orders(bare) == {("", filler_order_number(other))}
    assert [str(o(5)) for o in bare.segments("OBX") if str(o(3)).startswith("110180^")] == ["1.2.4"]
    assert len(bare.segment("ORC")) == 4  # ORC-5 (and what follows) left out
