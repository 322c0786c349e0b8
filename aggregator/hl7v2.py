r"""The case result as an HL7 v2.5.1 ``ORU^R01`` message, for a RIS that takes results as HL7 v2 (over MLLP:
:func:`gateway.delivery.senders.send_hl7`).

The message says what the FHIR report of the same reading says, read from it (:func:`aggregator.fhir.to_fhir`):
one place decides the codes, texts and numbers, and this module only writes them the v2 way.

* ``MSH``: the sending and receiving application and facility (the destination's), the time the message was
  made, a control id derived from the reading (:func:`control_id`: the same message sent again carries the same
  one, so a RIS that drops duplicates drops it), processing id ``P``, version ``2.5.1``, character set ``UNICODE
  UTF-8``; acknowledgment by the original mode (MSH-15/16 empty: the RIS answers ``AA``, ``AE`` or ``AR``).
* ``PID``: Patient ID (with the Issuer of Patient ID as its assigning authority), name (DICOM's family, given,
  middle, prefix, suffix as XPN's family, given, middle, suffix, prefix), birth date and sex as the study has
  them; a birth date that is no date, or a sex other than M, F or O, is left empty, as the SR leaves it.
* ``ORC`` / ``OBR``: the accession number as placer order number (ORC-2, OBR-2: the exam this reading is of;
  empty without one), ctscreen's own screening of the study as filler order number (ORC-3, OBR-3:
  :func:`filler_order_number`, never the accession number); OBR-4 the report's code (DICOM 126000 "Imaging
  Measurement Report", as the FHIR report's: not a LOINC imaging report code such as 24627-2 "CT Chest", which
  is the radiologist's report of the exam), OBR-7 the study's date and time, OBR-22 when the reading was
  made, OBR-24 ``CT``, OBR-25 ``P`` (:data:`RESULT_STATUS`).
  ORC-1 ``RE``; ORC-5 (order status) empty: the exam's order is the RIS's to state.
* ``NTE`` after the OBR: the research-use note the FHIR Device carries.
* ``OBX`` rows: the conclusion (``TX``: the notice that this is a machine reading, the verdict, the reason;
  what the FHIR report's ``conclusion`` says), the Study Instance UID (``ST``, DICOM 110180: the link to the
  images, with or without an accession number), then each FHIR Observation in the report's order: the verdict as
  a coded value (``CWE``, SNOMED CT 840544004 *suspected* COVID-19 = 52101004 Present / 272519000 Absent /
  82334004 Indeterminate, the verdict's word as its original text), the reason (code and sentence), the
  quadrant and the run (``NM`` in UCUM units; its extent, whether it qualifies and its first slice in rows of
  the same sub-id). Each row carries the result status, the study's date and time, and the Device's identifier
  as its equipment (OBX-18).

**Whose order number.** The RIS or dictation system sends the radiologist's report of the exam under its accession
number, often as the filler order number too; a receiver that files results by filler order number would file a
message whose filler order number is the accession number over that report, or that report over it. So the
accession number is only the placer order number, the link to the exam, and the filler order number is ctscreen's
identifier of its screening of the study, in ctscreen's namespace (EI ``<id>^CTSCREEN``).

**Preliminary, always.** OBR-25 and every OBX-11 are ``P`` (tables 0123 and 0085: preliminary), as the FHIR report
is ``preliminary``: a machine reading no radiologist has verified. ``F`` (final) and ``C`` (a correction of a final
result) say a verified result: a RIS or EHR shows such a one as the exam's signed report. A later reading of the
study (screened again) is ``P`` too, with the same filler order number and OBR-4 service as the earlier one, so a
receiver that keys results by order and service replaces the earlier preliminary result with it; its conclusion
names the reading it replaces, as the FHIR report does.

Every text is escaped (:func:`escape`). Pure: no I/O; the message is a ``str`` whose segments end in ``\r``.
"""

from __future__ import annotations

import datetime
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from aggregator.fhir import (
    DCM,
    IDENTIFIER_SYSTEM,
    LOINC,
    SNOMED,
    UCUM,
    report_identifier,
    study_date_time,
    to_fhir,
)
from aggregator.schema import CaseResult
from aggregator.sr import patient_sex

__all__ = ["DELIMITERS", "FILLER_NAMESPACE", "RESULT_STATUS", "Parties", "control_id", "escape",
           "filler_order_number", "to_oru"]

DELIMITERS: Final = "|^~\\&"
"""The field separator and the encoding characters (component, repetition, escape, subcomponent) of every
message made here (MSH-1, MSH-2): a name of an application or facility may hold none of them."""

CODING_SYSTEMS: Final = {SNOMED: "SCT", LOINC: "LN", UCUM: "UCUM", DCM: "DCM",
                         "http://terminology.hl7.org/CodeSystem/v2-0074": "HL70074"}
"""FHIR code systems by their HL7 v2 names (table 0396); ctscreen's own (``urn:ctscreen:code``...) are local:
:func:`_system`."""

RESULT_STATUS: Final = "P"
"""OBR-25 and OBX-11 of every message: preliminary (a machine reading; see the module docstring). Never ``F`` or
``C``, which claim a result a radiologist verified."""

FILLER_NAMESPACE: Final = "CTSCREEN"
"""EI.2 (namespace id) of the filler order number: ctscreen's, the same whatever a destination's
``sending_application`` says, so a renamed sending application still replaces the preliminary results sent
under the old name."""

_ESCAPES = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "~": "\\R\\", "&": "\\T\\"}


def escape(text: str) -> str:
    r"""``text`` as an HL7 v2 value (2.7.4): the delimiters as ``\F\ \S\ \R\ \E\ \T\``, a line break (``\r\n``,
    ``\n`` or ``\r``) as ``\.br\`` and any other control character as ``\Xhh\``; the others as they are (the
    message is UTF-8: MSH-18). The ``hl7`` library's own escape writes every non-ASCII character as ``\Xhh\`` of
    its code point (one byte of Latin-1 under a UTF-8 message; three digits or more for others) and keeps ``\n``,
    so it is not used.

    >>> print(escape("O'Brien|Smith^Zoë~Ann\\B&C\r\nnext\x0b"))
    O'Brien\F\Smith\S\Zoë\R\Ann\E\B\T\C\.br\next\X0B\
    """
    text = re.sub(r"\r\n|\r|\n", "\n", text)
    out = []
    for c in text:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif c == "\n":
            out.append("\\.br\\")
        elif ord(c) < 0x20 or ord(c) == 0x7F:  # 0x0B, 0x1C would end the MLLP block
            out.append(f"\\X{ord(c):02X}\\")
        else:
            out.append(c)
    return "".join(out)


@dataclass(frozen=True, slots=True)
class Parties:
    """MSH-3 to MSH-6: who sends and who receives (names without HL7 delimiters: checked at start)."""

    sending_application: str = "CTSCREEN"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""


def control_id(result: CaseResult) -> str:
    """MSH-10 of the message of ``result``: 20 characters derived from the reading, one per reading (a study
    screened again is another reading, another message), the same each time it is made.

    >>> from aggregator.schema import CaseResult
    >>> r = CaseResult.model_construct(job_id="job-1", study_instance_uid="1.2.3")
    >>> control_id(r) == control_id(r), len(control_id(r))
    (True, 20)
    """
    return uuid.uuid5(uuid.NAMESPACE_OID, f"{IDENTIFIER_SYSTEM}/{report_identifier(result)}/hl7").hex[:20].upper()


def filler_order_number(result: CaseResult) -> str:
    """ORC-3 and OBR-3 of the message of ``result``: ctscreen's screening of the study (EI, already escaped:
    16 hex digits derived from the Study Instance UID, the study's part of what the SR's and KOS's UIDs derive
    from, then :data:`FILLER_NAMESPACE`). The same for every reading of the study, so a later one replaces the
    earlier preliminary result at the RIS; another study's differs; never the accession number.

    >>> from aggregator.schema import CaseResult
    >>> one, again = (CaseResult.model_construct(job_id=j, study_instance_uid="1.2.3") for j in ("job-1", "job-2"))
    >>> filler_order_number(one) == filler_order_number(again), filler_order_number(one).endswith("^CTSCREEN")
    (True, True)
    """
    key = uuid.uuid5(uuid.NAMESPACE_OID, f"{IDENTIFIER_SYSTEM}/study/{result.study_instance_uid}/hl7-order")
    return f"{key.hex[:16].upper()}^{FILLER_NAMESPACE}"


def dtm(value: str | None) -> str:
    """A FHIR ``date`` or ``dateTime`` as an HL7 v2 DTM (fractions of a second cut to 4 digits); "" for None.

    >>> dtm("2026-12-05T09:30:15.123456+01:00"), dtm("2026-12-05"), dtm("2026-12-05T09:30:15Z"), dtm(None)
    ('20261205093015.1234+0100', '20261205', '20261205093015+0000', '')
    """
    m = re.fullmatch(r"(\d{4})-(\d\d)-(\d\d)(?:T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?)?", value or "")
    if m is None:
        return ""
    year, month, day, hour, minute, second, fraction, zone = m.groups()
    out = f"{year}{month}{day}"
    if hour is not None:
        out += f"{hour}{minute}{second}" + (f".{fraction[:4]}" if fraction else "")
        out += "+0000" if zone == "Z" else (zone or "").replace(":", "")
    return out


def _system(system: str) -> str:
    """An HL7 v2 coding system name: table 0396's, or a local one (``99CTS``; ``99CTR`` for the reason codes,
    ``99CTQ`` for the quadrants)."""
    if system in CODING_SYSTEMS:
        return CODING_SYSTEMS[system]
    return {"urn:ctscreen:code:reason": "99CTR", "urn:ctscreen:code:quadrant": "99CTQ"}.get(system, "99CTS")


def _cwe(concept: Mapping[str, Any], code: str | None = None) -> str:
    """A CodeableConcept as a CWE: code, text, system, and its text as the original text (CWE.9) where it says
    more than the display; ``code`` where the concept has no coding of its own (a component)."""
    coding = (concept.get("coding") or [{}])[0]
    text = str(concept.get("text") or "")
    display = str(coding.get("display") or text)
    parts = [str(coding.get("code") or code or ""), display, _system(str(coding.get("system") or ""))]
    if text and text != display:
        parts += ["", "", "", "", "", text]
    return "^".join(escape(p) for p in parts)


def _segment(name: str, fields: Mapping[int, str]) -> str:
    """``name|f1|f2|...``, the fields by number (already escaped; components joined), trailing empty ones left out;
    an MSH's from MSH-2 (MSH-1 is the ``|`` after its name)."""
    last = max((n for n, v in fields.items() if v), default=0)
    return f"{name}|" + "|".join(fields.get(n, "") for n in range(2 if name == "MSH" else 1, last + 1))


def _name(value: str) -> str:
    """A DICOM Person Name (its alphabetic group) as an XPN: family, given, middle, suffix, prefix."""
    family, given, middle, prefix, suffix = ([*value.split("=", 1)[0].split("^"), "", "", "", ""])[:5]
    return "^".join(escape(p.strip()) for p in (family, given, middle, suffix, prefix)).rstrip("^")


def to_oru(result: CaseResult, patient: Mapping[str, str] | None = None, parties: Parties | None = None, *,
           supersedes: Sequence[CaseResult] = (), now: datetime.datetime | None = None) -> str:
    """Encode ``result`` as an HL7 v2.5.1 ORU^R01 message (see the module docstring).

    Parameters
    ----------
    result : CaseResult
        The case result.
    patient : Mapping[str, str] or None
        DICOM attributes of the source (``PatientID``, ``IssuerOfPatientID``, ``PatientName``,
        ``PatientBirthDate``, ``PatientSex``, ``AccessionNumber``, ``StudyDate``, ``StudyTime``,
        ``TimezoneOffsetFromUTC``); absent or invalid ones are left empty.
    parties : Parties or None
        MSH-3 to MSH-6.
    supersedes : Sequence[CaseResult]
        The study's earlier readings, newest first (the conclusion names the one this replaces; the message is
        preliminary all the same).
    now : datetime.datetime or None
        MSH-7 (default: now, UTC).

    Returns
    -------
    str
        The message, each segment ending in ``\\r``.

    Raises
    ------
    ValueError
        When the FHIR models refuse the report it is read from.
    """
    patient = dict(patient or {})
    parties = parties or Parties()
    bundle = to_fhir(result, patient, supersedes=supersedes)
    by_url = {e["fullUrl"]: e["resource"] for e in bundle["entry"]}
    report = bundle["entry"][0]["resource"]
    device = next(r for r in by_url.values() if r["resourceType"] == "Device")
    effective = dtm(report.get("effectiveDateTime"))
    equipment = escape(device["identifier"][0]["value"])
    when = (now or datetime.datetime.now(datetime.UTC)).astimezone(datetime.UTC)
    accession = escape(patient.get("AccessionNumber", "").strip())
    filler = filler_order_number(result)
    pid = escape(patient.get("PatientID", "").strip())
    issuer = escape(patient.get("IssuerOfPatientID", "").strip())
    segments = [
        _segment("MSH", {2: DELIMITERS[1:], 3: escape(parties.sending_application),
                         4: escape(parties.sending_facility), 5: escape(parties.receiving_application),
                         6: escape(parties.receiving_facility), 7: when.strftime("%Y%m%d%H%M%S+0000"),
                         9: "ORU^R01^ORU_R01", 10: control_id(result), 11: "P", 12: "2.5.1", 18: "UNICODE UTF-8"}),
        _segment("PID", {1: "1", 3: f"{pid}^^^{issuer}".rstrip("^") if pid else "",
                         5: _name(patient.get("PatientName", "")),
                         7: dtm(study_date_time(patient.get("PatientBirthDate"))),
                         8: patient_sex(patient.get("PatientSex"))}),
        _segment("ORC", {1: "RE", 2: accession, 3: filler}),  # ORC-5 empty: "CM" said the exam's order completed
        _segment("OBR", {1: "1", 2: accession, 3: filler, 4: _cwe(report["code"]), 7: effective,
                         22: dtm(report.get("issued")), 24: "CT", 25: RESULT_STATUS}),
    ]
    segments += [_segment("NTE", {1: str(n), 2: "L", 3: escape(note["text"])})
                 for n, note in enumerate(device.get("note", []), 1)]
    rows: list[dict[int, str]] = [{2: "TX", 3: "conclusion^Conclusion^99CTS", 5: escape(report["conclusion"])},
                                  {2: "ST", 3: "110180^Study Instance UID^DCM", 5: escape(result.study_instance_uid)}]
    for sub_id, ref in enumerate(report["result"], 1):
        obs = by_url[ref["reference"]]
        code = obs["code"]
        rows.append({3: _cwe(code), 4: str(sub_id), **_value(obs)})
        parent = str((code.get("coding") or [{}])[0].get("code", ""))
        for component in obs.get("component", []):
            name = str(component["code"].get("text", ""))
            rows.append({3: _cwe(component["code"], f"{parent}.{name.replace(' ', '_')}"), 4: str(sub_id),
                         **_value(component)})
    for n, row in enumerate(rows, 1):
        segments.append(_segment("OBX", {1: str(n), **row, 11: RESULT_STATUS, 14: effective, 18: equipment}))
    return "\r".join(segments) + "\r"


def _value(element: Mapping[str, Any]) -> dict[int, str]:
    """OBX-2, OBX-5 and OBX-6 of an Observation's value (or a component's)."""
    if "valueCodeableConcept" in element:
        concept = element["valueCodeableConcept"]
        interpretation = [i.get("text") for i in element.get("interpretation", []) if i.get("text")]
        if interpretation:  # the verdict's word (positive, negative, indeterminate) as the original text
            concept = {**concept, "text": interpretation[0]}
        return {2: "CWE", 5: _cwe(concept)}
    if "valueQuantity" in element:
        q = element["valueQuantity"]
        return {2: "NM", 5: str(q["value"]),
                6: "^".join(escape(str(q.get(k, ""))) for k in ("code", "unit")) + f"^{_system(q.get('system', ''))}"}
    if "valueBoolean" in element:
        return {2: "CWE", 5: "Y^Yes^HL70136" if element["valueBoolean"] else "N^No^HL70136"}
    return {2: "ST", 5: escape(str(element.get("valueString", "")))}
