"""The case result as FHIR R4: a ``DiagnosticReport`` with its ``Observation`` s, for the RIS.

:func:`to_fhir` returns a transaction ``Bundle`` (JSON, a ``dict``) a FHIR R4 server takes at its base
URL, or a webhook takes as it is:

* one ``DiagnosticReport`` (status ``preliminary``: a machine reading no radiologist has verified yet;
  code LOINC 24627-2 "CT Chest"; category RAD), whose ``imagingStudy`` refers to the ``ImagingStudy``
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
  millimetres) of the evidence when there is one, and one **model version** per model.

Every resource carries an ``identifier`` in :data:`IDENTIFIER_SYSTEM` derived from the job, and each
entry is a conditional create (``ifNoneExist``), so sending the same result twice creates nothing new.
The bundle is validated with the ``fhir.resources`` models (R4B, the same as R4 for these resources)
before it is returned; a result the models refuse raises :class:`ValueError`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote

from aggregator.schema import CaseResult, quadrant_words

__all__ = ["IDENTIFIER_SYSTEM", "NOTICE", "IdentifierSystems", "refusal", "report_identifier", "to_fhir",
           "validate_bundle"]

IDENTIFIER_SYSTEM: Final = "urn:ctscreen:result"
"""System of the identifiers of every resource ctscreen makes (value: job id, then ``/`` and a part)."""

SNOMED, LOINC, UCUM = "http://snomed.info/sct", "http://loinc.org", "http://unitsofmeasure.org"
_VERDICT = {"positive": ("52101004", "Present"), "negative": ("272519000", "Absent"),  # the SR's (PS3.16)
            "indeterminate": ("82334004", "Indeterminate")}
_CTSCREEN = "urn:ctscreen:code"
NOTICE: Final = "Machine reading for screening, not a diagnosis; to be verified by a radiologist."
"""Opens every conclusion (the SR and the key images say it too)."""


@dataclass(frozen=True, slots=True)
class IdentifierSystems:
    """The site's identifier systems (URIs), by which a FHIR server finds its own Patient and order.

    Attributes
    ----------
    patient_id : str | None
        The system of every Patient ID.
    issuers : Mapping[str, str]
        Issuer of Patient ID -> system; the study's issuer, when listed, wins over ``patient_id``.
    accession : str | None
        The system of accession numbers (the ServiceRequest's identifier).
    """

    patient_id: str | None = None
    issuers: Mapping[str, str] = field(default_factory=dict)
    accession: str | None = None

    def of_patient(self, issuer: str | None) -> str | None:
        return self.issuers.get(issuer, self.patient_id) if issuer else self.patient_id


def report_identifier(result: CaseResult) -> str:
    """The identifier value of a result's DiagnosticReport: one per job (one per study version)."""
    return f"{result.job_id or result.study_instance_uid}"


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
        DICOM attributes of the source: ``PatientID``, ``IssuerOfPatientID``, ``AccessionNumber``
        (absent ones are left out).
    systems : IdentifierSystems or None
        The receiving site's identifier systems; without them, references by identifier only.
    supersedes : Sequence[CaseResult]
        Earlier readings of the same study (earlier versions) this one replaces. Each one's report and
        observations are in the bundle too, as conditional updates (``PUT Type?identifier=...``) to
        status ``cancelled``, the report's conclusion naming this reading: one live report per study.
        A conditional update creates what is missing, so a late delivery of an earlier reading (a
        conditional create) finds it cancelled and adds nothing.

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
    ident = report_identifier(result)
    base = (IDENTIFIER_SYSTEM, ident)
    status = "preliminary"
    study = {"type": "ImagingStudy",
             "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{result.study_instance_uid}"},
             "display": f"Study {result.study_instance_uid}"}
    subject = None
    if patient.get("PatientID"):
        subject = _by_identifier("Patient", patient["PatientID"], systems.of_patient(patient.get("IssuerOfPatientID")),
                                 assigner=patient.get("IssuerOfPatientID"))
    issued = (result.created_at.isoformat() if result.created_at is not None else None)
    covid = _concept(SNOMED, "840544004", "Suspected disease caused by severe acute respiratory coronavirus 2")
    code, meaning = _VERDICT[result.verdict]

    def observation(part: str, code_: dict[str, Any], **value: Any) -> dict[str, Any]:
        obs: dict[str, Any] = {
            "resourceType": "Observation",
            "identifier": [{"system": IDENTIFIER_SYSTEM, "value": f"{ident}/{part}"}],
            "status": status,
            "category": [_concept("http://terminology.hl7.org/CodeSystem/observation-category", "imaging",
                                  "Imaging")],
            "code": code_,
            "derivedFrom": [study],
            "device": {"display": f"ctscreen {result.software_version or ''}".strip()},
            **value,
        }
        if subject is not None:
            obs["subject"] = subject
        if issued:
            obs["issued"] = issued
        return obs

    observations: list[tuple[str, dict[str, Any]]] = [
        ("verdict", observation("verdict", covid, valueCodeableConcept=_concept(SNOMED, code, meaning),
                                interpretation=[{"text": result.verdict}])),
        ("reason", observation("reason", {"coding": [{"system": _CTSCREEN, "code": "reason"}], "text": "Reason"},
                               valueCodeableConcept={"coding": [{"system": f"{_CTSCREEN}:reason",
                                                                 "code": result.reason}],
                                                     "text": result.message})),
    ]
    if result.evidence is not None and result.shows_lesions:  # a series that is no chest has no lesion run
        ev = result.evidence
        observations.append(("quadrant", observation(
            "quadrant", {"coding": [{"system": _CTSCREEN, "code": "quadrant"}], "text": "Quadrant of the run"},
            valueCodeableConcept={"coding": [{"system": f"{_CTSCREEN}:quadrant", "code": ev.quadrant}],
                                  "text": quadrant_words(ev.quadrant)})))
        observations.append(("run", observation(
            "run", {"coding": [{"system": _CTSCREEN, "code": "run"}], "text": "Run of consecutive slices"},
            valueQuantity={"value": ev.n_slices, "unit": "slices", "system": UCUM, "code": "{slices}"},
            component=[
                {"code": {"text": "extent"},
                 "valueQuantity": {"value": round(ev.extent_mm, 3), "unit": "mm", "system": UCUM, "code": "mm"}},
                {"code": {"text": "qualifies"}, "valueBoolean": ev.qualifies},
                {"code": {"text": "first slice"},
                 "valueString": ev.slices[0].sop_instance_uid if ev.slices else ""},
            ])))
    for m in result.models:
        observations.append((f"model-{m.name}", observation(
            f"model-{m.name}", {"coding": [{"system": _CTSCREEN, "code": "model-version"}],
                                "text": f"Model version: {m.name}"},
            valueString=m.version if not m.sha256 else f"{m.version} (sha256 {m.sha256[:16]})")))

    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": IDENTIFIER_SYSTEM, "value": ident}],
        "status": status,
        "category": [_concept("http://terminology.hl7.org/CodeSystem/v2-0074", "RAD", "Radiology")],
        "code": _concept(LOINC, "24627-2", "CT Chest"),
        "imagingStudy": [study],
        "result": [{"reference": _uuid(*base, part), "type": "Observation"} for part, _ in observations],
        "conclusion": f"{NOTICE} COVID-19 screening (ctscreen): {result.verdict}. {result.message}",
    }
    if result.verdict == "positive":  # the code alone must say it: "Present" did not
        report["conclusionCode"] = [covid]
    if subject is not None:
        report["subject"] = subject
    if issued:
        report["issued"] = issued
    if patient.get("AccessionNumber"):
        order = _by_identifier("ServiceRequest", patient["AccessionNumber"], systems.accession)
        order["identifier"]["type"] = _concept("http://terminology.hl7.org/CodeSystem/v2-0203", "ACSN", "Accession ID")
        report["basedOn"] = [order]

    def entry(full_url: str, resource: dict[str, Any]) -> dict[str, Any]:
        value = resource["identifier"][0]["value"]
        return {"fullUrl": full_url, "resource": resource,
                "request": {"method": "POST", "url": resource["resourceType"],
                            "ifNoneExist": f"identifier={IDENTIFIER_SYSTEM}|{value}"}}

    if supersedes:
        report["conclusion"] += (" It replaces the earlier reading" + ("s " if len(supersedes) > 1 else " ")
                                 + ", ".join(report_identifier(r) for r in supersedes) + " of this study.")
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "identifier": {"system": IDENTIFIER_SYSTEM, "value": f"{ident}/bundle"},
        "entry": [entry(_uuid(*base, "report"), report)]
        + [entry(_uuid(*base, part), obs) for part, obs in observations]
        + [e for earlier in supersedes for e in _cancelled(to_fhir(earlier, patient, systems), ident)],
    }
    validate_bundle(bundle)
    return bundle


def _cancelled(earlier: Mapping[str, Any], by: str) -> list[dict[str, Any]]:
    """The entries of an earlier reading's bundle as conditional updates to ``cancelled``."""
    out = []
    for e in earlier["entry"]:
        resource = {**e["resource"], "status": "cancelled"}
        if resource["resourceType"] == "DiagnosticReport":
            resource["conclusion"] = f"Superseded by the reading {by} of a newer version of this study. " + (
                resource.get("conclusion") or "")
            resource.pop("conclusionCode", None)
        value = resource["identifier"][0]["value"]
        out.append({"fullUrl": e["fullUrl"], "resource": resource,
                    "request": {"method": "PUT", "url": f"{resource['resourceType']}?identifier={IDENTIFIER_SYSTEM}|{value}"}})
    return out


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
        ref["reference"] = f"{kind}?identifier={quote(system, safe=':/.-_~')}|{quote(value, safe='.-_~')}"
    return ref


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
