"""The case result as a DICOM Structured Report (TID 1500 Measurement Report), for PACS.

:func:`to_sr` encodes a :class:`~aggregator.schema.CaseResult` as a Comprehensive 3D SR built with
highdicom, in memory (no I/O: the caller stores or sends the returned data set):

* one **case-level group** (TID 1501): finding type suspected COVID-19 (SCT 840544004, the concept the FHIR
  report uses: a screening result is no diagnosis, and the disorder 840539006 = Present would read as one),
  qualitative evaluation "Suspected disease caused by SARS-CoV-2" = Present / Absent / Indeterminate for a
  positive / negative / indeterminate verdict,
  the algorithm (``ctscreen`` and its version) with every case-rule parameter, the images of the
  evidence run as source images;
* one **planar ROI group** (TID 1410) per lesion box of the evidence run (``boxes="evidence"``, the
  default) or of every slice (``boxes="all"``): finding type Lesion, finding site Lung, the box as a
  closed POLYLINE on the stored image's pixel grid (``LesionBox.original``; the edges of the inclusive
  pixels, so ``x0 .. x1 + 1``), and its score as a Probability measurement;
* the **Image Library** (TID 1600) of the images the report references (the evidence run's and those
  its regions lie on; not the whole series), grouped by modality and frame of reference, each entry with
  the descriptors (TID 1602/1604) its header states: modality, frame of reference, rows and columns,
  pixel spacing, slice thickness, spacing between slices, image position and orientation. A descriptor
  the header lacks (or states unreadably) is left out and named in the log, never made up. A report that
  references no image (a series that is no chest) has no library, as highdicom makes it.

The SR's patient and study come from the source images (``evidence``: their headers suffice); a box
whose slice is not among them, or whose ``original`` box is unknown, is left out and logged. UIDs are
derived from the result unless given, so encoding one result twice gives the same SR.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np

from aggregator import fhir
from aggregator.schema import CaseResult, LesionBox, quadrant_words, slice_span

if TYPE_CHECKING:  # pragma: no cover
    from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

__all__ = ["SUSPECTED_COVID19", "IMAGE_LIBRARY_KEYWORDS", "SR_HEADER_KEYWORDS", "SR_SERIES_DESCRIPTION", "SourceError", "device_observer",
           "equipment_and_time", "library_uids", "local_time", "made_at", "result_key", "sr_uids", "stable_uid",
           "timezone_offset", "to_sr", "usable_headers"]

SUSPECTED_COVID19 = (fhir.SUSPECTED_COVID19[0], "SCT", "Suspected disease caused by SARS-CoV-2")
"""SNOMED CT 840544004 "Suspected disease caused by severe acute respiratory coronavirus 2" (situation), as the FHIR
report's conclusion code and verdict (:mod:`aggregator.fhir`): a machine's screening result, not the disorder
(840539006), which coded consumers (problem lists, notifiable-disease rules) read as a diagnosis. Its Code Meaning
is shortened to fit LO's 64 characters."""

_PATIENT_STUDY = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                  "StudyDate", "StudyTime", "ReferringPhysicianName")
_TEMPORAL = ("DA", "DT", "TM")
_SEXES = ("M", "F", "O")


def patient_sex(raw: object) -> str:
    """A Patient's Sex as the enumerated value DICOM (and HL7 v2 table 0001) has for it, M, F or O; "" for any
    other value (a scanner's ``U`` or ``W``; ``m`` is read as ``M``).

    >>> patient_sex(" m"), patient_sex("W"), patient_sex(None)
    ('M', '', '')
    """
    sex = str(raw or "").strip().upper()
    return sex if sex in _SEXES else ""


class SourceError(ValueError):
    """The source images cannot make the object asked for (missing, of another study, multi-frame).

    Its message names UIDs only, never a header value, so it may be shown and logged; any other error
    while an object is built (highdicom refusing a header) may quote a value and must not be."""


SR_SERIES_DESCRIPTION: Final = "ctscreen COVID-19 AI: {verdict} - not a diagnosis"
"""What a PACS shows for the SR series: a machine reading, to be verified (IHE AIR: say what made it), with the
verdict in capitals: a PACS study list shows series descriptions, so a reader sees the machine's reading there
without opening the SR (at most 53 characters of LO's 64)."""


def equipment_and_time(result: CaseResult, sources: Sequence[Dataset] = ()) -> dict[str, Any]:
    """Equipment (model name and software version) and content date and time of an object made from
    ``result``: the result's time, so an object built again (a payload rebuilt, the API's SR) carries the
    same content under the same SOP Instance UID; in the time zone of the study (:func:`local_time`)."""
    out: dict[str, Any] = {"manufacturer_model_name": "ctscreen",
                           "software_versions": result.software_version or "unknown"}
    when, _ = local_time(result, sources)
    if when is not None:
        out["content_date"], out["content_time"] = when.date(), when.time()
    return out


def made_at(ds: Dataset, result: CaseResult, sources: Sequence[Dataset] = ()) -> Dataset:
    """Set the Instance Creation Date and Time, the Series Date and Time (and the Contribution DateTime of its
    contributing equipment, a key image's Date and Time of Secondary Capture) of an object made from ``result`` to the result's time (highdicom writes the clock's): built again under the same SOP
    Instance UID, it is the same object, byte for byte. Its dates and times are in the zone of the study they
    join (:func:`local_time`); Timezone Offset From UTC is written when the sources say theirs, and applies
    to the study's dates and times the object copies as well."""
    when, offset = local_time(result, sources)
    if when is not None:
        if offset is not None:
            ds.TimezoneOffsetFromUTC = offset
        elif "TimezoneOffsetFromUTC" in ds:
            del ds.TimezoneOffsetFromUTC
        ds.InstanceCreationDate = ds.SeriesDate = when.strftime("%Y%m%d")  # a PACS lists a series by its date
        ds.InstanceCreationTime = ds.SeriesTime = when.strftime("%H%M%S.%f")
        if "DateOfSecondaryCapture" in ds:  # a key image: highdicom writes its build's clock there too
            ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = ds.SeriesDate, ds.SeriesTime
        for item in ds.get("ContributingEquipmentSequence", []):
            if "ContributionDateTime" in item:
                item.ContributionDateTime = when.strftime("%Y%m%d%H%M%S.%f")
    return ds


_OFFSET = re.compile(r"^([+-])(\d\d)(\d\d)$")


def local_time(result: CaseResult, sources: Sequence[Dataset] = ()) -> tuple[datetime | None, str | None]:
    """The result's time as the object made from it states it, and the offset to state with it.

    An object joins a study whose dates and times (Study Time, copied into the object) are the scanner's
    local time. Timezone Offset From UTC applies to every date and time of an object, so it is the study's:
    when the sources carry one (``+0100``), the result's time is given in it and the offset written; else the
    study's zone is unknown, the time is this machine's local time (set ``TZ`` to the site's zone) and no
    offset is written. (Writing ``+0000`` beside a study's local Study Time put a study an hour off, and the
    result before its scan.) A naive ``created_at`` is taken as UTC, as the worker writes it.

    >>> from datetime import UTC
    >>> from pydicom.dataset import Dataset
    >>> r = CaseResult.model_construct(created_at=datetime(2026, 12, 5, 8, 30, tzinfo=UTC))
    >>> src = Dataset(); src.TimezoneOffsetFromUTC = "+0100"
    >>> local_time(r, [src])
    (datetime.datetime(2026, 12, 5, 9, 30), '+0100')
    """
    t = result.created_at
    if t is None:
        return None, None
    aware = t if t.tzinfo is not None else t.replace(tzinfo=UTC)
    offset = timezone_offset(sources)
    if offset is not None:
        minutes = (1 if offset[0] == "+" else -1) * (60 * int(offset[1:3]) + int(offset[3:]))
        return aware.astimezone(timezone(timedelta(minutes=minutes))).replace(tzinfo=None), offset
    return aware.astimezone().replace(tzinfo=None), None


def timezone_offset(sources: Sequence[Dataset]) -> str | None:
    """The first Timezone Offset From UTC among ``sources`` that is one (``+hhmm`` / ``-hhmm``, at most 14
    hours), as :func:`local_time` takes it; None when none states one.

    >>> from pydicom.dataset import Dataset
    >>> a, b, c = Dataset(), Dataset(), Dataset()
    >>> a.TimezoneOffsetFromUTC, b.TimezoneOffsetFromUTC = "+2500", " -0330 "
    >>> timezone_offset([c, a, b]), timezone_offset([c])
    ('-0330', None)
    """
    for ds in sources:
        m = _OFFSET.match(str(ds.get("TimezoneOffsetFromUTC", "") or "").strip())
        if m and int(m.group(2)) <= 14 and int(m.group(3)) < 60:
            return m.group(0)
    return None


def device_observer(result: CaseResult) -> Any:
    """The observer context (highdicom ``ObserverContext``) of ctscreen, the device that made an object of
    ``result``: the SR's and the KOS's, one UID per software version under the result's UID root."""
    from highdicom.sr import CodedConcept, DeviceObserverIdentifyingAttributes, ObserverContext

    version = result.software_version or "unknown"
    return ObserverContext(
        observer_type=CodedConcept("121007", "DCM", "Device"),
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=stable_uid("device", version, root=result.uid_root), name="ctscreen", manufacturer_name="ctscreen",
            model_name="ctscreen"),
    )


def sr_uids(result: CaseResult) -> tuple[str, str]:
    """The Series and SOP Instance UIDs of ``result``'s SR (derived from it, under its own UID root: the same
    result, the same UIDs), also what a later reading of the study names as its predecessor."""
    key = result_key(result)
    return stable_uid(*key, "series", root=result.uid_root), stable_uid(*key, "sop", root=result.uid_root)


def result_key(result: CaseResult) -> tuple[object, ...]:
    """What every UID made from ``result`` derives from (:func:`stable_uid`): the study, series, job, time and verdict."""
    return (result.study_instance_uid, result.series_instance_uid, result.job_id or "", result.created_at or "",
            result.verdict)


def stable_uid(*parts: object, root: str | None = None) -> str:
    """A DICOM UID derived from ``parts``: the same parts give the same UID (a result sent again keeps its UIDs).

    ``root``: the organisation's UID root the UID is made under (digits and dots, ending in a dot); None:
    pydicom's root, 1.2.826.0.1.3680043.8.498.

    >>> stable_uid("a", root="1.2.3.") == stable_uid("a", root="1.2.3.") != stable_uid("b", root="1.2.3.")
    True
    >>> stable_uid("a", root="1.2.3.").startswith("1.2.3.")
    True
    """
    from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

    return str(generate_uid(prefix=root or PYDICOM_ROOT_UID, entropy_srcs=["ctscreen-sr", *[str(p) for p in parts]]))


def _predecessor(result: CaseResult) -> Dataset:
    """What highdicom reads of an earlier SR to name it as a predecessor: its four UIDs."""
    from pydicom.dataset import Dataset
    from pydicom.uid import Comprehensive3DSRStorage

    ds = Dataset()
    ds.StudyInstanceUID = result.study_instance_uid
    ds.SeriesInstanceUID, ds.SOPInstanceUID = sr_uids(result)
    ds.SOPClassUID = Comprehensive3DSRStorage
    return ds


def usable_headers(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Header-only copies with the patient/study attributes highdicom reads present (empty if absent).

    A top-level date or time that pydicom cannot read (a scanner's ``03/02/1901`` birth date) is left
    empty: highdicom converts them and would refuse the whole object for it; so is a Patient's Sex other than
    M, F or O (a scanner's ``U`` or ``W``; ``m`` is read as ``M``), which highdicom checks. Which attribute was
    emptied is logged, never its value. So is a Specific Character Set highdicom refuses: empty, or a
    lone ISO 2022 term (:func:`_plain_character_set`). The copies hold the caller's own element objects
    where nothing changed (no value is set on them; a changed one is a new element), so ``datasets`` is
    left as it was.
    """
    from pydicom.dataset import Dataset

    emptied: set[str] = set()
    out = []
    for ds in datasets:
        copy = Dataset()
        for tag in ds.keys():  # by tag: iterating the data set would read a deferred Pixel Data from its file
            if tag.group == 0x7FE0:  # no pixel data
                continue
            elem = ds[tag]
            if elem.VR in _TEMPORAL and not _readable(elem.VR, elem.value):
                emptied.add(elem.keyword or str(elem.tag))
                copy.add_new(elem.tag, elem.VR, "")
            else:
                copy.add(elem)
        for keyword in _PATIENT_STUDY:
            if keyword not in copy:
                setattr(copy, keyword, "")
        raw = str(copy.PatientSex or "")
        sex = patient_sex(raw)  # an enumerated value (M, F, O) highdicom checks
        if raw.strip() and not sex:
            emptied.add("PatientSex")
        if sex != raw:  # a new element: the caller's stays as it was
            copy.add_new(0x00100040, "CS", sex)
        _plain_character_set(copy)
        out.append(copy)
    if emptied:
        logger.warning("source headers: %s not a valid DICOM value (a date, a time, Patient's Sex M, F or O); left "
                       "empty", ", ".join(sorted(emptied)))
    return out


_SINGLE_BYTE = {"100", "101", "109", "110", "126", "127", "138", "144", "148", "166", "203", "13"}


def _plain_character_set(ds: Dataset) -> None:
    """Specific Character Set as highdicom accepts it and PACS read it, for what scanners write: an empty value is
    the default repertoire (the element goes); one ``ISO 2022 IR n`` term alone (code extensions without a second
    term) is ``ISO_IR n`` (the same single-byte set; ``IR 6`` is the default repertoire); several terms (code
    extensions, ``\\ISO 2022 IR 87`` as Japanese scanners write) are written in UTF-8 (``ISO_IR 192``)."""
    if "SpecificCharacterSet" not in ds:
        return
    value = ds.SpecificCharacterSet
    terms = [str(t).strip() for t in ([value] if isinstance(value, str) else value)]
    if not any(terms):
        del ds.SpecificCharacterSet
    elif len(terms) == 1 and terms[0].startswith("ISO 2022 IR "):
        number = terms[0].removeprefix("ISO 2022 IR ").strip()
        if number == "6":
            del ds.SpecificCharacterSet
        elif number in _SINGLE_BYTE:
            ds.add_new(0x00080005, "CS", f"ISO_IR {number}")  # a new element: the caller's stays as it is
    elif len(terms) > 1:
        # code extensions: highdicom refuses the source's own empty first value, and the value it takes,
        # ``ISO 2022 IR 6\ISO 2022 IR 87``, Orthanc 1.10 reads as ASCII (the names show raw escape sequences);
        # UTF-8 every current PACS and viewer reads. The copies' text is already decoded (read by tag with the
        # source's set), so it is encoded afresh, losing nothing
        ds.add_new(0x00080005, "CS", "ISO_IR 192")


def _readable(vr: str, value: object) -> bool:
    from pydicom.valuerep import DA, DT, TM

    values = list(value) if isinstance(value, Iterable) and not isinstance(value, str) else [value]
    try:
        for v in values:
            if v not in (None, ""):
                {"DA": DA, "DT": DT, "TM": TM}[vr](v)
    except (ValueError, TypeError, OverflowError):
        return False
    return True


def _polyline(box) -> np.ndarray:
    x0, y0, x1, y1 = float(box.x0), float(box.y0), float(box.x1 + 1), float(box.y1 + 1)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)


_DESCRIPTORS: Final = (
    # (TID 1602/1604 concept, keyword, value index, unit), in the order of TID 1602 and 1604
    ("PixelDataRows", "Rows", 0, "pixels"),
    ("PixelDataColumns", "Columns", 0, "pixels"),
    ("HorizontalPixelSpacing", "PixelSpacing", 1, "mm"),  # Pixel Spacing is (row spacing, column spacing)
    ("VerticalPixelSpacing", "PixelSpacing", 0, "mm"),
    ("SpacingBetweenSlices", "SpacingBetweenSlices", 0, "mm"),
    ("SliceThickness", "SliceThickness", 0, "mm"),
    *((f"ImagePositionPatient{a}", "ImagePositionPatient", i, "mm") for i, a in enumerate("XYZ")),
    *((f"ImageOrientationPatient{d}{a}", "ImageOrientationPatient", 3 * j + i, "{-1:1}")
      for j, d in enumerate(("Row", "Column")) for i, a in enumerate("XYZ")),
)
"""The numeric Image Library Entry Descriptors, each from one value of a header attribute of the image."""

_VM: Final = {"Rows": 1, "Columns": 1, "PixelSpacing": 2, "SpacingBetweenSlices": 1, "SliceThickness": 1,
              "ImagePositionPatient": 3, "ImageOrientationPatient": 6}
_OPTIONAL: Final = {"SpacingBetweenSlices"}
"""Attributes a CT image need not have (Type 3): their absence is no gap in what was carried."""

IMAGE_LIBRARY_KEYWORDS: Final = ("Modality", "FrameOfReferenceUID", *_VM)
"""What :func:`to_sr` reads of an image it references, beyond its UIDs and Number of Frames: the Image Library's
descriptors. (Of the first image in slice order, the evidence's first, it reads more: :data:`SR_HEADER_KEYWORDS`.)"""

_PATIENT_AND_STUDY: Final = (
    # highdicom's SOPClass.copy_patient_and_study_information: the root attributes of the modules of the Patient
    # and Study entities of the source's IOD, the same five for CT Image, Enhanced CT and Legacy Converted
    # Enhanced CT (highdicom 0.28's tables). Patient:
    "ReferencedPatientSequence", "PatientName", "PatientID", "IssuerOfPatientID", "TypeOfPatientID",
    "IssuerOfPatientIDQualifiersSequence", "SourcePatientGroupIdentificationSequence",
    "GroupOfPatientsIdentificationSequence", "PatientBirthDate", "PatientBirthTime",
    "PatientBirthDateInAlternativeCalendar", "PatientDeathDateInAlternativeCalendar", "PatientAlternativeCalendar",
    "PatientSex", "QualityControlSubject", "StrainDescription", "StrainNomenclature", "StrainStockSequence",
    "StrainAdditionalInformation", "StrainCodeSequence", "GeneticModificationsSequence", "OtherPatientNames",
    "OtherPatientIDsSequence", "ReferencedPatientPhotoSequence", "EthnicGroupCodeSequence",
    "PatientSpeciesDescription", "PatientSpeciesCodeSequence", "PatientBreedDescription", "PatientBreedCodeSequence",
    "BreedRegistrationSequence", "ResponsiblePerson", "ResponsiblePersonRole", "ResponsibleOrganization",
    "PatientComments", "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    # Clinical Trial Subject
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName",
    "IssuerOfClinicalTrialProtocolID", "OtherClinicalTrialProtocolIDsSequence", "ClinicalTrialSiteID",
    "ClinicalTrialSiteName", "IssuerOfClinicalTrialSiteID", "ClinicalTrialSubjectID", "IssuerOfClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID", "IssuerOfClinicalTrialSubjectReadingID", "ClinicalTrialProtocolEthicsCommitteeName",
    "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
    # General Study
    "StudyDate", "StudyTime", "AccessionNumber", "IssuerOfAccessionNumberSequence", "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence", "ConsultingPhysicianName", "ConsultingPhysicianIdentificationSequence",
    "StudyDescription", "ProcedureCodeSequence", "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence",
    "NameOfPhysiciansReadingStudy", "PhysiciansReadingStudyIdentificationSequence", "ReferencedStudySequence",
    "StudyInstanceUID", "StudyID", "RequestingService", "RequestingServiceCodeSequence",
    "ReasonForPerformedProcedureCodeSequence",
    # Patient Study
    "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence", "PatientAge", "PatientSize",
    "PatientSizeCodeSequence", "PatientBodyMassIndex", "MeasuredAPDimension", "MeasuredLateralDimension",
    "PatientWeight", "MedicalAlerts", "Allergies", "Occupation", "SmokingStatus", "AdditionalPatientHistory",
    "PregnancyStatus", "LastMenstrualDate", "PatientSexNeutered", "ReasonForVisit", "ReasonForVisitCodeSequence",
    "AdmissionID", "IssuerOfAdmissionIDSequence", "ServiceEpisodeID", "ServiceEpisodeDescription",
    "IssuerOfServiceEpisodeIDSequence", "PatientState",
    # Clinical Trial Study
    "ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription", "LongitudinalTemporalOffsetFromEvent",
    "LongitudinalTemporalEventType", "ClinicalTrialTimePointTypeCodeSequence", "IssuerOfClinicalTrialTimePointID",
    "ConsentForClinicalTrialUseSequence",
)
_ACQUISITION_EQUIPMENT: Final = (
    # highdicom's ContributingEquipment.for_image_acquisition: the SR's Contributing Equipment Sequence item
    "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "DeviceSerialNumber", "InstitutionName",
    "InstitutionalDepartmentName", "InstitutionAddress", "StationName", "AcquisitionDateTime", "AcquisitionDate",
    "AcquisitionTime",
)

SR_HEADER_KEYWORDS: Final = tuple(dict.fromkeys((
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID",
    *_PATIENT_AND_STUDY, *_ACQUISITION_EQUIPMENT,
    "SamplesPerPixel", "PixelRepresentation", "NumberOfFrames",  # highdicom's check of a source image, the boxes'
    *IMAGE_LIBRARY_KEYWORDS, "TimezoneOffsetFromUTC",
)))
"""Every attribute :func:`to_sr` reads of its first source image in slice order (the evidence's first), of
which highdicom copies the patient, study and acquisition equipment into the SR: its character set and UIDs; the
patient and study modules highdicom copies (Patient, Clinical Trial Subject, General Study, Patient Study,
Clinical Trial Study: Other Patient IDs, Study Description, weight...); the acquisition equipment highdicom
names as contributing (manufacturer, model, serial number, software, institution, its department and address,
station, acquisition date and time); the pixel description highdicom checks a source image by; the Image
Library's descriptors; the Timezone Offset From UTC. What else a header holds (Patient's Address, Operators'
Name, private elements...) does not change the SR: the headers kept to make it again need no more
(``gateway.report.SrContext``)."""


def _shown(result: CaseResult) -> Any:
    """The evidence run the SR shows; None for a series that is no chest (its run is no lesions)."""
    return result.evidence if result.evidence is not None and result.shows_lesions else None


def library_uids(result: CaseResult, boxes: Literal["evidence", "all"] = "evidence") -> set[str]:
    """SOP Instance UIDs of the images the SR of ``result`` may reference, so describe in its Image Library
    (:func:`to_sr` with the same ``boxes``): the evidence run's, and for ``"all"`` those of every slice with a box."""
    shown = _shown(result)
    uids = {s.sop_instance_uid for s in shown.slices} if shown is not None else set()
    return uids | {uid for _, uid, _ in _chosen(result, boxes)}


def _chosen(result: CaseResult, boxes: Literal["evidence", "all"]) -> list[tuple[int, str, LesionBox]]:
    """``(slice index, SOP Instance UID, box)`` of each box the SR of ``result`` encodes (:func:`to_sr`)."""
    if not result.shows_lesions:
        return []
    if boxes == "evidence":
        shown = _shown(result)
        return [(s.index, s.sop_instance_uid, b) for s in (shown.slices if shown is not None else []) for b in s.boxes]
    return [(f.index, f.sop_instance_uid, b) for f in result.slices for b in f.boxes]


def _in_slice_order(result: CaseResult, evidence: Sequence[Dataset]) -> list[Dataset]:
    """``evidence`` once per SOP Instance UID (the later copy of one sent twice, as ingest keeps it), in the order
    of the result's slices (along the normal; any other after, as given): the evidence the SR lists and the header
    it copies the patient and study from (the first slice's) do not depend on the order the instances arrived
    or were stored in, so the SR made from the stored instances and the one made from the headers the gateway
    kept (``gateway.report.SrContext``) are one object."""
    rank: dict[str, int] = {}
    for s in result.slices:
        rank.setdefault(s.sop_instance_uid, len(rank))
    latest = {str(ds.get("SOPInstanceUID", "")): ds for ds in evidence}
    return sorted(latest.values(), key=lambda ds: rank.get(str(ds.get("SOPInstanceUID", "")), len(rank)))


def _numbers(ds: Dataset, keyword: str) -> list[float] | None:
    """The values of ``keyword`` in ``ds`` as finite numbers, or None when absent, empty, unreadable or of
    another multiplicity than the attribute's."""
    import math

    value = ds.get(keyword)
    values = list(value) if isinstance(value, Iterable) and not isinstance(value, str) else [value]
    try:
        out = [float(v) for v in values]  # None or "" (an empty Type 2 value): TypeError, ValueError
    except (TypeError, ValueError, OverflowError):
        return None
    return out if len(out) == _VM[keyword] and all(math.isfinite(v) for v in out) else None


def _modality_and_frame(ds: Dataset, missing: Counter[str]) -> tuple[Any, str]:
    """The image's modality as a CID 29 code (None when its header states none of them) and its Frame of
    Reference UID ("" when absent or no UID); what is not stated counts in ``missing``."""
    from pydicom.sr.codedict import codes
    from pydicom.uid import UID

    modality = {c.value: c for c in codes.cid29.concepts.values()}.get(str(ds.get("Modality", "") or "").strip())
    frame_of_reference = str(ds.get("FrameOfReferenceUID", "") or "").strip()
    if not UID(frame_of_reference).is_valid:
        frame_of_reference = ""
    missing.update(k for k, v in (("Modality", modality), ("FrameOfReferenceUID", frame_of_reference)) if not v)
    return modality, frame_of_reference


def _shared_descriptors(modality: Any, frame_of_reference: str) -> list[Any]:
    """The Modality and Frame of Reference UID descriptors (TID 1602), those known: an entry's, and its group's."""
    from highdicom.sr import CodeContentItem, RelationshipTypeValues, UIDRefContentItem
    from pydicom.sr.codedict import codes

    acq = RelationshipTypeValues.HAS_ACQ_CONTEXT
    out: list[Any] = []
    if modality is not None:
        out.append(CodeContentItem(name=codes.DCM.Modality, value=modality, relationship_type=acq))
    if frame_of_reference:
        out.append(UIDRefContentItem(name=codes.DCM.FrameOfReferenceUID, value=frame_of_reference,
                                     relationship_type=acq))
    return out


def _numeric_descriptors(ds: Dataset, missing: Counter[str]) -> list[Any]:
    """The numeric descriptors (TID 1602 rows and columns, TID 1604 geometry) the image's header states;
    what it does not state counts in ``missing``."""
    from highdicom.sr import CodedConcept, NumContentItem, RelationshipTypeValues
    from pydicom.sr.codedict import codes

    units = {"mm": codes.UCUM.Millimeter, "pixels": CodedConcept("{pixels}", "UCUM", "Pixels"),
             "{-1:1}": CodedConcept("{-1:1}", "UCUM", "{-1:1}")}
    read = {keyword: _numbers(ds, keyword) for keyword in _VM}
    missing.update(k for k, values in read.items() if values is None and k not in _OPTIONAL)
    return [NumContentItem(name=getattr(codes.DCM, concept), value=values[index], unit=units[unit],
                           relationship_type=RelationshipTypeValues.HAS_ACQ_CONTEXT)
            for concept, keyword, index, unit in _DESCRIPTORS if (values := read[keyword]) is not None]


def _image_library(images: Sequence[Dataset], study_instance_uid: str) -> Any:
    """The Image Library (TID 1600) of ``images``: one Image Library Group per modality and frame of reference,
    which it states as the group's descriptors, and in it one entry (TID 1601) per image with all its own."""
    from highdicom.sr import (
        CodedConcept,
        ContainerContentItem,
        ContentSequence,
        ImageContentItem,
        RelationshipTypeValues,
    )
    from pydicom.sr.codedict import codes

    contains = RelationshipTypeValues.CONTAINS
    groups: dict[tuple[Any, str], list[Any]] = {}
    missing: Counter[str] = Counter()
    for ds in images:
        key = _modality_and_frame(ds, missing)
        entry = ImageContentItem(name=CodedConcept("260753009", "SCT", "Source"),  # as highdicom's ImageLibrary
                                 referenced_sop_class_uid=str(ds.SOPClassUID),
                                 referenced_sop_instance_uid=str(ds.SOPInstanceUID), relationship_type=contains)
        entry.ContentSequence = ContentSequence([*_shared_descriptors(*key), *_numeric_descriptors(ds, missing)])
        groups.setdefault(key, []).append(entry)
    library = ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=contains)
    library.ContentSequence = ContentSequence()
    for key, entries in groups.items():
        group = ContainerContentItem(name=codes.DCM.ImageLibraryGroup, relationship_type=contains)
        group.ContentSequence = ContentSequence([*_shared_descriptors(*key), *entries])
        library.ContentSequence.append(group)
    if missing:
        logger.info("SR image library of %s: not in the source headers, left out: %s", study_instance_uid,
                    ", ".join(f"{k} ({n} of {len(images)} images)" for k, n in sorted(missing.items())))
    return library


def to_sr(
    result: CaseResult,
    evidence: Sequence[Dataset],
    *,
    boxes: Literal["evidence", "all"] = "evidence",
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    series_number: int = 9901,
    instance_number: int = 1,
    predecessors: Sequence[CaseResult] = (),
) -> Dataset:
    """Encode ``result`` as a Comprehensive 3D SR (TID 1500).

    Parameters
    ----------
    result : CaseResult
        The case result.
    evidence : Sequence[pydicom.dataset.Dataset]
        The screened series' images (headers are enough), one per SOP Instance UID of the result, in any
        order: the SR lists them in slice order and copies the patient and study from the first slice's.
    boxes : {"evidence", "all"}
        Encode the boxes of the evidence run only, or every box of every slice.
    series_instance_uid, sop_instance_uid : str or None
        UIDs of the SR; by default derived from the result (same result, same UIDs).
    series_number, instance_number : int
        Of the SR.
    predecessors : Sequence[CaseResult]
        Earlier readings of the same study (earlier versions) this one replaces: their SRs are named in
        the Predecessor Documents Sequence, by the UIDs :func:`sr_uids` gives them (each under its own root).

    Every UID made here is under ``result.uid_root`` (:func:`stable_uid`).

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        A pydicom data set, ready for ``dcmwrite`` or C-STORE / STOW-RS.

    Raises
    ------
    SourceError
        When ``evidence`` is empty or belongs to another study.
    ValueError
        When ``boxes`` is unknown; highdicom's own errors on headers it refuses.
    """
    import highdicom as hd
    from highdicom.sr import (
        AlgorithmIdentification,
        CodedConcept,
        Comprehensive3DSR,
        FindingSite,
        ImageRegion,
        Measurement,
        MeasurementReport,
        MeasurementsAndQualitativeEvaluations,
        ObservationContext,
        PlanarROIMeasurementsAndQualitativeEvaluations,
        QualitativeEvaluation,
        SourceImageForMeasurementGroup,
        SourceImageForRegion,
        TrackingIdentifier,
    )
    from pydicom.sr.codedict import codes

    if not evidence:
        raise SourceError('Argument "evidence" must hold the source images of the result.')
    if boxes not in ("evidence", "all"):
        raise ValueError(f'Argument "boxes" must be "evidence" or "all", got {boxes!r}.')
    images = usable_headers(_in_slice_order(result, evidence))
    studies = {str(ds.StudyInstanceUID) for ds in images}
    if studies != {result.study_instance_uid}:
        raise SourceError(
            f'Argument "evidence" must belong to study {result.study_instance_uid}, got {sorted(studies)}.'
        )
    by_uid = {str(ds.SOPInstanceUID): ds for ds in images}
    version = result.software_version or "unknown"
    key = result_key(result)
    algorithm = AlgorithmIdentification(
        name="ctscreen", version=version,
        parameters=[f"{k}={v}" for k, v in result.rule.model_dump().items()]
        + [f"model {m.name}={m.version}" for m in result.models],
    )
    lung = [FindingSite(codes.SCT.Lung)]
    covid = CodedConcept(*SUSPECTED_COVID19)
    value = {"positive": codes.SCT.Present, "negative": codes.SCT.Absent,
             "indeterminate": codes.SCT.Indeterminate}[result.verdict]

    # a series that is no chest: its run is no lesions, so the SR holds the verdict only
    shown = _shown(result)
    evidence_uids = [s.sop_instance_uid for s in shown.slices] if shown else []
    referenced = [u for u in evidence_uids if u in by_uid]  # and the images of the regions, below
    sources = [SourceImageForMeasurementGroup.from_source_image(by_uid[u]) for u in referenced]
    groups: list = [
        MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=stable_uid(*key, "case", root=result.uid_root), identifier=f"case verdict: {result.reason}"),
            finding_type=covid,
            algorithm_id=algorithm,
            finding_sites=lung,
            qualitative_evaluations=[QualitativeEvaluation(name=covid, value=value)],
            source_images=sources or None,
        )
    ]

    chosen = _chosen(result, boxes)
    skipped = 0
    for n, (index, uid, box) in enumerate(chosen):
        ds = by_uid.get(uid)
        if ds is None or box.original is None or int(ds.get("NumberOfFrames", 1) or 1) > 1:
            skipped += 1
            continue
        region = ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=_polyline(box.original),
            source_image=SourceImageForRegion.from_source_image(ds),
        )
        referenced.append(uid)
        groups.append(
            PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(
                    uid=stable_uid(*key, "box", n, root=result.uid_root), identifier=f"lesion {n + 1}, {slice_span(index, index)}, {', '.join(quadrant_words(q) for q in box.quadrants)}"
                ),
                referenced_region=region,
                finding_type=codes.SCT.Lesion,
                algorithm_id=algorithm,
                finding_sites=lung,
                measurements=[Measurement(name=codes.DCM.Probability, value=float(box.score),
                                          unit=CodedConcept("1", "UCUM", "no units"))],
            )
        )
    if skipped:
        logger.warning("SR of %s: %d box(es) left out (slice not in the evidence, multi-frame, or no original box)",
                       result.study_instance_uid, skipped)

    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=device_observer(result)),
        procedure_reported=CodedConcept("24627-2", "LN", "CT Chest"),
        imaging_measurements=groups,
    )
    if referenced:  # TID 1500 row 5, before the Imaging Measurements (row 6): each referenced image once
        content = report[0].ContentSequence
        measurements = next(i for i, item in enumerate(content) if item.name == codes.DCM.ImagingMeasurements)
        content.insert(measurements, _image_library([by_uid[u] for u in dict.fromkeys(referenced)],
                                                    result.study_instance_uid))
    series_uid, sop_uid = sr_uids(result)
    sr = Comprehensive3DSR(
        evidence=images,
        content=report,
        series_instance_uid=series_instance_uid or series_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or sop_uid,
        previous_versions=[_predecessor(p) for p in predecessors] or None,
        instance_number=instance_number,
        manufacturer="ctscreen",
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=SR_SERIES_DESCRIPTION.format(verdict=result.verdict.upper()),
        **equipment_and_time(result, images),
    )
    return made_at(sr, result, images)

