"""The case result as FHIR R4: a ``DiagnosticReport``, its ``Observation`` s and the ``Device`` that made
them, for the RIS.

:func:`to_fhir` returns a transaction ``Bundle`` (JSON, a ``dict``) a FHIR R4 server takes at its base
URL, or a webhook takes as it is:

* one ``DiagnosticReport`` (status ``preliminary``: a machine reading no radiologist has verified yet;
  category RAD), whose ``imagingStudy`` refers to the ``ImagingStudy``
  by its Study Instance UID (``identifier`` ``urn:dicom:uid`` / ``urn:oid:<uid>``, a logical reference
  the server needs not resolve), whose ``subject`` is the patient and whose ``basedOn`` is the order
  (accession number): with the site's identifier systems (:class:`IdentifierSystems`, per destination)
  as conditional references (``Patient?identifier=<system>|<id>``) that the server resolves to its own
  Patient and ServiceRequest inside the transaction; without them by identifier only (Issuer of Patient
  ID as the assigner), which a server stores unresolved. The ``conclusion`` begins with the notice that
  this is a machine reading for screening, not a diagnosis; ``conclusionCode`` is *suspected* COVID-19
  (SNOMED CT 840544004, a situation, not the disorder 840539006, which coded consumers such as problem
  lists and notifiable-disease rules would read as a diagnosis) for a positive result, absent otherwise;
* ``Observation`` s it lists in ``result``: the **verdict** (SNOMED CT 840544004 suspected COVID-19 with the
  qualifier value Present or Absent), the **reason** (code and sentence), the **quadrant** and the **run** (slices and
  millimetres) of the evidence when there is one; each one's ``device`` is the Device below;
* one ``Device``: the algorithm that made the reading (:func:`device_identifier`; manufacturer ctscreen,
  the software version, each model's version, runtime and sha256), one per algorithm configuration at
  the server however many readings refer to it. R4's ``DiagnosticReport.performer`` takes a
  Practitioner, PractitionerRole, Organization or CareTeam only, so the report reaches its device through
  its results: ``Observation.device``, "the device used to generate the observation data", which is also
  where the HL7 DICOM SR to FHIR guide puts the SR's algorithm (TID 4019).

**Which code.** The report's code is DICOM 126000 "Imaging Measurement Report", the title of the TID 1500 SR
the PACS gets for the same reading, and what the HL7 DICOM SR to FHIR guide maps such an SR's
``DiagnosticReport.code`` to. It was LOINC 24627-2 "CT Chest", a LOINC imaging document code, a set whose
documents "contain a consulting specialist's interpretation of image data": the radiologist's report of
the same exam, so a RIS or EHR listing reports by code showed the machine reading as the radiologist's.
(The SR keeps 24627-2 as its Procedure Reported, which the exam is.) The report and its observations
also carry the security label AIAST "Artificial Intelligence asserted" (``v3-ObservationValue``), the
marker HL7's AI Transparency on FHIR guide (ballot) uses for content an AI asserted.

**A reading replaced by a later one** (late instances opened a new version of the study, screened again;
``supersedes``). FHIR R4 has no report status for it: ``cancelled`` is "the report is unavailable because
the measurement was not started or not completed", ``entered-in-error`` a report that should never have
existed, ``amended`` / ``corrected`` / ``appended`` come after ``final``; ctscreen set the earlier one to
``cancelled`` before, which said it never completed. Nor is the new reading a new version of the same
report: a conditional update by identifier updates on one match and creates on none, so the last bundle
to arrive wins, and a delayed retry of the earlier reading would overwrite the later one; a transaction
cannot make that depend on which is newer without the server's version ids (``If-Match``). So each
reading stays its own report with its own status and content, and the later one names the earlier with
R4's core extension ``diagnosticReport-replaces`` ("The report replaces the target resource ... where the
subsequent observation of case and report may be on more or different material ... not same concept as
DiagnosticReport.status"; R6 makes it ``DiagnosticReport.relatesTo``), each of its observations the
earlier reading's observation of the same part with ``observation-replaces`` ("This observation replaces
a previous observation (i.e. a revised value)"), by identifier. The study's current reading is its report
that no other report names so (also the one issued last); :func:`current_reports` says which. A bundle
carries the study's earlier readings too, each naming the one before it, so the chain has no gap at a
destination that never got one of them (a rule left it out, a delivery failed). Nothing is ever updated:
every entry is a conditional create, so a bundle sent again, or an earlier reading sent late, adds only
what is missing and changes nothing held: it never makes an earlier reading current again.

Every resource carries an ``identifier`` (:data:`IDENTIFIER_SYSTEM`, derived from the job; the Device's in
:data:`DEVICE_SYSTEM`), and each entry is a conditional create (``ifNoneExist``), so sending the same
result twice creates nothing new.
The bundle is validated with the ``fhir.resources`` models (R4B, the same as R4 for these resources)
before it is returned; a result the models refuse raises :class:`ValueError`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote

from aggregator.schema import CaseResult, quadrant_words

__all__ = ["DEVICE_SYSTEM", "IDENTIFIER_SYSTEM", "NOTICE", "REPLACES", "IdentifierSystems", "current_reports",
           "device_identifier", "refusal", "report_identifier", "to_fhir", "validate_bundle"]

IDENTIFIER_SYSTEM: Final = "urn:ctscreen:result"
"""System of the identifiers of every report and observation ctscreen makes (value: job id, then ``/`` and a
part)."""
DEVICE_SYSTEM: Final = "urn:ctscreen:device"
"""System of the identifiers of ctscreen's Devices (value: :func:`device_identifier`)."""
REPLACES: Final = {"DiagnosticReport": "http://hl7.org/fhir/StructureDefinition/diagnosticReport-replaces",
                   "Observation": "http://hl7.org/fhir/StructureDefinition/observation-replaces"}
"""The R4 core extensions by which a later reading names the one it replaces, per resource type."""

SNOMED, LOINC, UCUM = "http://snomed.info/sct", "http://loinc.org", "http://unitsofmeasure.org"
SUSPECTED_COVID19: Final = ("840544004", "Suspected disease caused by severe acute respiratory coronavirus 2")
"""SNOMED CT code and display of the reading's concept (a situation: suspected, not the disorder); the SR's too
(:data:`aggregator.sr.SUSPECTED_COVID19`)."""
DCM = "http://dicom.nema.org/resources/ontology/DCM"
_VERDICT = {"positive": ("52101004", "Present"), "negative": ("272519000", "Absent"),  # the SR's (PS3.16)
            "indeterminate": ("82334004", "Indeterminate")}
_CTSCREEN = "urn:ctscreen:code"
_AI_ASSERTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "AIAST",
                "display": "Artificial Intelligence asserted"}
NOTICE: Final = "Machine reading for screening, not a diagnosis; to be verified by a radiologist."
"""Opens every conclusion and the KOS's text; the SR says "not a diagnosis" in its Series Description (its
TID 1500 content holds coded findings only), the key images in theirs, the CLI under its table."""


@dataclass(frozen=True, slots=True)
class IdentifierSystems:
    """The site's identifier systems (URIs), by which a FHIR server finds its own Patient and order.

    Attributes
    ----------
    patient_id : str | None
        The system of the Patient IDs of studies that name no Issuer of Patient ID.
    issuers : Mapping[str, str]
        Issuer of Patient ID -> system. A study whose issuer is not listed gets no system (its identifier
        carries the issuer as assigner and is stored unresolved): an outside clinic's Patient ID 12345,
        filed under the site's own system, named the site's patient 12345. List the site's own issuer here
        when its scanners write one.
    accession : str | None
        The system of accession numbers (the ServiceRequest's identifier).
    """

    patient_id: str | None = None
    issuers: Mapping[str, str] = field(default_factory=dict)
    accession: str | None = None

    def of_patient(self, issuer: str | None) -> str | None:
        """The system of a Patient ID from ``issuer`` (None: unresolved).

        >>> s = IdentifierSystems(patient_id="urn:oid:2.999.1", issuers={"HOSP": "urn:oid:2.999.3"})
        >>> s.of_patient(None), s.of_patient("HOSP"), s.of_patient("OUTSIDE_CLINIC")
        ('urn:oid:2.999.1', 'urn:oid:2.999.3', None)
        """
        return self.issuers.get(issuer) if issuer else self.patient_id


def report_identifier(result: CaseResult) -> str:
    """The identifier value of a result's DiagnosticReport: one per job (one per study version)."""
    return f"{result.job_id or result.study_instance_uid}"


def device_identifier(result: CaseResult) -> str:
    """The identifier value of the Device that made ``result``: the software version and a digest of every
    model's name, version, sha256 and runtime, so new weights under the same software are another Device."""
    models = sorted((m.name, m.version, m.sha256 or "", m.platform or "") for m in result.models)
    digest = hashlib.sha256(json.dumps(models).encode()).hexdigest()[:16]
    return f"ctscreen/{result.software_version or 'unknown'}/{digest}"


def _uuid(*parts: str) -> str:
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_OID, '/'.join(parts))}"


def _concept(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def to_fhir(result: CaseResult, patient: Mapping[str, str] | None = None,
            systems: IdentifierSystems | None = None, supersedes: Sequence[CaseResult] = ()) -> dict[str, Any]:
    """Encode ``result`` as a FHIR R4 transaction Bundle (see the module docstring).

    Parameters
    ----------
    result : CaseResult
        The case result.
    patient : Mapping[str, str] or None
        DICOM attributes of the source: ``PatientID``, ``IssuerOfPatientID``, ``AccessionNumber``;
        ``StudyDate``, ``StudyTime`` and ``TimezoneOffsetFromUTC`` make the ``effectiveDateTime`` of the report and
        the observations (:func:`study_date_time`) (absent ones are left out).
    systems : IdentifierSystems or None
        The receiving site's identifier systems; without them, references by identifier only.
    supersedes : Sequence[CaseResult]
        Earlier readings of the same study (earlier versions), newest first, as the state store gives them.
        This report names the newest with ``diagnosticReport-replaces`` (its observations the same parts
        of it with ``observation-replaces``), and each of them is in the bundle as well, as conditional
        creates naming the one after it in turn, so a destination holds the whole chain.

    Returns
    -------
    dict
        The Bundle as JSON-able data, validated.

    Raises
    ------
    ValueError
        When the FHIR models refuse the bundle.
    """
    patient = dict(patient or {})
    systems = systems or IdentifierSystems()
    readings = [_Reading.of(r, patient, systems) for r in (result, *supersedes)]
    for later, earlier in zip(readings, readings[1:], strict=False):
        later.replaces(earlier)
    entries: dict[str, dict[str, Any]] = {}
    for reading in readings:  # this reading first (its report is the first entry), then the earlier ones
        for full_url, resource in reading.resources():
            entries.setdefault(full_url, _create(full_url, resource))  # a Device the readings share, once
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "identifier": {"system": IDENTIFIER_SYSTEM, "value": f"{report_identifier(result)}/bundle"},
        "entry": list(entries.values()),
    }
    validate_bundle(bundle)
    return bundle


def study_date_time(date: str | None, time: str | None = None, offset: str | None = None) -> str | None:
    """The study's DICOM Study Date and Time as a FHIR ``dateTime`` (the report's and the observations'
    ``effectiveDateTime``: when the images were taken), or None without a valid date.

    FHIR R4 (2.24.0.1, dateTime): "If hours and minutes are specified, a time zone SHALL be populated", and the
    seconds must be given. With the study's Timezone Offset From UTC, the date and time with that offset (a
    time of hours or hours and minutes gets zero minutes and seconds); without one the study's zone is unknown
    (its time is the scanner's local time), so the date alone.

    >>> study_date_time("20261205", "093015.25", "+0100"), study_date_time("20261205", "0930", "-0330")
    ('2026-12-05T09:30:15.25+01:00', '2026-12-05T09:30:00-03:30')
    >>> study_date_time("20261205", "093015"), study_date_time("2026-12-05"), study_date_time("20261305")
    ('2026-12-05', None, None)
    """
    m = re.fullmatch(r"(\d{4})(\d\d)(\d\d)", (date or "").strip())
    try:
        day = datetime.date(int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None
    except ValueError:
        day = None
    if day is None or day.year < 1:
        return None
    t = re.fullmatch(r"([01]\d|2[0-3])([0-5]\d)?([0-5]\d)?(\.\d{1,6})?", (time or "").strip())
    z = re.fullmatch(r"([+-])(0\d|1[0-3])([0-5]\d)|([+-])(14)(00)", (offset or "").strip())
    if t is None or z is None or (t.group(4) and not t.group(3)):
        return day.isoformat()
    sign, hours, minutes = (g for g in z.groups() if g is not None)
    return (f"{day.isoformat()}T{t.group(1)}:{t.group(2) or '00'}:{t.group(3) or '00'}{t.group(4) or ''}"
            f"{sign}{hours}:{minutes}")


@dataclass(frozen=True, slots=True)
class _Reading:
    """One result's report, observations (by part) and device, before they become entries."""

    ident: str
    report: dict[str, Any]
    observations: dict[str, dict[str, Any]]
    device: dict[str, Any]

    @classmethod
    def of(cls, result: CaseResult, patient: Mapping[str, str], systems: IdentifierSystems) -> _Reading:
        ident = report_identifier(result)
        study = {"type": "ImagingStudy",
                 "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{result.study_instance_uid}"},
                 "display": f"Study {result.study_instance_uid}"}
        subject = None
        if patient.get("PatientID"):
            subject = _by_identifier("Patient", patient["PatientID"],
                                     systems.of_patient(patient.get("IssuerOfPatientID")),
                                     assigner=patient.get("IssuerOfPatientID"))
        issued = result.created_at.isoformat() if result.created_at is not None else None
        device = _device(result)
        device_ref = {"reference": _uuid(DEVICE_SYSTEM, device["identifier"][0]["value"]), "type": "Device",
                      "identifier": dict(device["identifier"][0]), "display": device["deviceName"][0]["name"]}
        covid = _concept(SNOMED, *SUSPECTED_COVID19)
        code, meaning = _VERDICT[result.verdict]
        effective = study_date_time(patient.get("StudyDate"), patient.get("StudyTime"),
                                    patient.get("TimezoneOffsetFromUTC"))
        common: dict[str, Any] = {"meta": {"security": [_AI_ASSERTED]}, "status": "preliminary",
                                  **({"subject": subject} if subject is not None else {}),
                                  **({"effectiveDateTime": effective} if effective else {}),
                                  **({"issued": issued} if issued else {})}

        def observation(part: str, code_: dict[str, Any], **value: Any) -> dict[str, Any]:
            return {
                "resourceType": "Observation",
                "identifier": [{"system": IDENTIFIER_SYSTEM, "value": f"{ident}/{part}"}],
                **common,
                "category": [_concept("http://terminology.hl7.org/CodeSystem/observation-category", "imaging",
                                      "Imaging")],
                "code": code_,
                "derivedFrom": [study],
                "device": device_ref,
                **value,
            }

        observations = {
            "verdict": observation("verdict", covid, valueCodeableConcept=_concept(SNOMED, code, meaning),
                                   interpretation=[{"text": result.verdict}]),
            "reason": observation("reason", {"coding": [{"system": _CTSCREEN, "code": "reason"}], "text": "Reason"},
                                  valueCodeableConcept={"coding": [{"system": f"{_CTSCREEN}:reason",
                                                                    "code": result.reason}],
                                                        "text": result.message}),
        }
        if result.evidence is not None and result.shows_lesions:  # a series that is no chest has no lesion run
            ev = result.evidence
            observations["quadrant"] = observation(
                "quadrant", {"coding": [{"system": _CTSCREEN, "code": "quadrant"}], "text": "Quadrant of the run"},
                valueCodeableConcept={"coding": [{"system": f"{_CTSCREEN}:quadrant", "code": ev.quadrant}],
                                      "text": quadrant_words(ev.quadrant)})
            observations["run"] = observation(
                "run", {"coding": [{"system": _CTSCREEN, "code": "run"}], "text": "Run of consecutive slices"},
                valueQuantity={"value": ev.n_slices, "unit": "slices", "system": UCUM, "code": "{slices}"},
                component=[
                    {"code": {"text": "extent"},
                     "valueQuantity": {"value": round(ev.extent_mm, 3), "unit": "mm", "system": UCUM, "code": "mm"}},
                    {"code": {"text": "qualifies"}, "valueBoolean": ev.qualifies},
                    {"code": {"text": "first slice"},
                     "valueString": ev.slices[0].sop_instance_uid if ev.slices else ""},
                ])

        report: dict[str, Any] = {
            "resourceType": "DiagnosticReport",
            "identifier": [{"system": IDENTIFIER_SYSTEM, "value": ident}],
            **common,
            "category": [_concept("http://terminology.hl7.org/CodeSystem/v2-0074", "RAD", "Radiology")],
            # not LOINC 24627-2 "CT Chest", the radiologist's report of the exam (module docstring)
            "code": {"coding": [{"system": DCM, "code": "126000", "display": "Imaging Measurement Report"}],
                     "text": "COVID-19 screening of chest CT, machine reading"},
            "imagingStudy": [study],
            "result": [{"reference": _uuid(IDENTIFIER_SYSTEM, ident, part), "type": "Observation"}
                       for part in observations],
            "conclusion": f"{NOTICE} COVID-19 screening (ctscreen {result.software_version or 'unknown'}): "
                          f"{result.verdict}. {result.message}",  # the version as the KOS names it
        }
        if result.verdict == "positive":  # the code alone must say it: "Present" did not
            report["conclusionCode"] = [covid]
        if patient.get("AccessionNumber"):
            order = _by_identifier("ServiceRequest", patient["AccessionNumber"], systems.accession)
            order["identifier"]["type"] = _concept("http://terminology.hl7.org/CodeSystem/v2-0203", "ACSN",
                                                   "Accession ID")
            report["basedOn"] = [order]
        return cls(ident, report, observations, device)

    def replaces(self, earlier: _Reading) -> None:
        """Name ``earlier``'s report and its observations of the same parts as the ones this one replaces."""
        _replacing(self.report, earlier.report)
        for part, obs in self.observations.items():
            if part in earlier.observations:
                _replacing(obs, earlier.observations[part])
        self.report["conclusion"] += f" It replaces the earlier reading {earlier.ident} of this study."

    def resources(self) -> Iterable[tuple[str, dict[str, Any]]]:
        """(fullUrl, resource): the report, its observations in ``result`` order, the device."""
        yield _uuid(IDENTIFIER_SYSTEM, self.ident, "report"), self.report
        for part, obs in self.observations.items():
            yield _uuid(IDENTIFIER_SYSTEM, self.ident, part), obs
        yield _uuid(DEVICE_SYSTEM, self.device["identifier"][0]["value"]), self.device


def _replacing(later: dict[str, Any], earlier: Mapping[str, Any]) -> None:
    """Add to ``later`` the core extension that names ``earlier`` (by identifier: it may be held already,
    under the server's own id) as the resource it replaces."""
    kind = earlier["resourceType"]
    later.setdefault("extension", []).append({"url": REPLACES[kind], "valueReference": {
        "type": kind, "identifier": dict(earlier["identifier"][0])}})


def _device(result: CaseResult) -> dict[str, Any]:
    """The Device resource of the algorithm that made ``result`` (see :func:`device_identifier`)."""
    versions: list[dict[str, Any]] = [{"type": {"text": "software"}, "value": result.software_version or "unknown"}]
    for m in sorted(result.models, key=lambda m: m.name):
        version: dict[str, Any] = {"type": {"text": f"model {m.name}" + (f" ({m.platform})" if m.platform else "")},
                                   "value": m.version}
        if m.sha256:
            version["component"] = {"type": {"text": "sha256"}, "value": m.sha256}
        versions.append(version)
    return {
        "resourceType": "Device",
        "identifier": [{"system": DEVICE_SYSTEM, "value": device_identifier(result)}],
        "status": "active",
        "manufacturer": "ctscreen",
        "deviceName": [{"name": f"ctscreen {result.software_version or ''}".strip(), "type": "model-name"}],
        "type": {"text": "Software: deep-learning screening of chest CT for COVID-19 pneumonia"},
        "version": versions,
        "note": [{"text": "Research use only, not a medical device: its readings are to be verified by a "
                          "radiologist."}],
    }


def _create(full_url: str, resource: dict[str, Any]) -> dict[str, Any]:
    """A transaction entry that creates ``resource`` unless the server holds one with its identifier."""
    identifier = resource["identifier"][0]
    return {"fullUrl": full_url, "resource": resource,
            "request": {"method": "POST", "url": resource["resourceType"],
                        "ifNoneExist": f"identifier={identifier['system']}|{identifier['value']}"}}


def current_reports(reports: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The reports of ``reports`` (a study's, as a server holds them) that no other one replaces: the
    study's current reading, what a consumer shows.

    >>> older = {"identifier": [{"system": IDENTIFIER_SYSTEM, "value": "job-0"}]}
    >>> newer = {"identifier": [{"system": IDENTIFIER_SYSTEM, "value": "job-1"}],
    ...          "extension": [{"url": REPLACES["DiagnosticReport"], "valueReference": {
    ...              "type": "DiagnosticReport", "identifier": {"system": IDENTIFIER_SYSTEM, "value": "job-0"}}}]}
    >>> [r["identifier"][0]["value"] for r in current_reports([older, newer])]
    ['job-1']
    """
    reports = list(reports)
    replaced = {(ref["identifier"].get("system"), ref["identifier"].get("value"))
                for r in reports for ext in r.get("extension", [])
                if ext.get("url") == REPLACES["DiagnosticReport"]
                for ref in [ext.get("valueReference", {})] if "identifier" in ref}
    return [r for r in reports
            if not any((i.get("system"), i.get("value")) in replaced for i in r.get("identifier", []))]


def _by_identifier(kind: str, value: str, system: str | None, *, assigner: str | None = None) -> dict[str, Any]:
    """A reference to the server's ``kind`` with this identifier: conditional (resolved by the server in the
    transaction) when the system is known, else a logical one it stores as it is."""
    identifier: dict[str, Any] = {"value": value}
    if system:
        identifier["system"] = system
    elif assigner:
        identifier["assigner"] = {"display": assigner}
    ref: dict[str, Any] = {"type": kind, "identifier": identifier}
    if system:
        ref["reference"] = f"{kind}?identifier={quote(_escaped(system), safe=':/.-_~')}|{quote(_escaped(value), safe='.-_~')}"
    return ref


def _escaped(text: str) -> str:
    r"""``text`` as a part of a FHIR search token: ``\``, ``|``, ``,`` and ``$`` escaped with a backslash (FHIR R4
    search, "Escaping Search Parameters"); percent-encoding alone reached the server as a bare ``|``, which split
    an identifier such as ``P 1|2`` into a system and a value.

    >>> print(_escaped("P 1|2,3$4\\5"))
    P 1\|2\,3\$4\\5
    """
    return text.replace("\\", "\\\\").replace("|", "\\|").replace(",", "\\,").replace("$", "\\$")


def validate_bundle(bundle: Mapping[str, Any]) -> None:
    """Check ``bundle`` against the FHIR models (``fhir.resources``, R4B).

    Raises
    ------
    ValueError
        With the first errors the models report.
    """
    from fhir.resources.R4B.bundle import Bundle

    try:
        Bundle.parse_obj(dict(bundle))
    except Exception as exc:  # pydantic.v1 ValidationError (a ValueError) or a type error of the models
        raise ValueError(f"FHIR bundle refused by the R4 models: {refusal(exc)}") from None


def refusal(exc: BaseException) -> str:
    """Where and why a model refused, without the refused values (they may be patient data).

    >>> from pydantic import BaseModel, ValidationError
    >>> class M(BaseModel):
    ...     n: int
    >>> try:
    ...     M(n="Jane Doe")
    ... except ValidationError as exc:
    ...     print(refusal(exc))
    n: Input should be a valid integer, unable to parse string as an integer
    """
    errors = getattr(exc, "errors", None)
    try:
        items = errors() if callable(errors) else None
    except Exception:  # noqa: BLE001 - not a validation error after all
        items = None
    if not items:
        return type(exc).__name__
    return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in items[:5])
