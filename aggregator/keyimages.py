"""Key images of a case result: DICOM Secondary Capture images a radiologist can open in any PACS viewer,
and a Key Object Selection document that flags the evidence in the study itself.

:func:`key_images` renders each slice of the result's evidence run (the run of consecutive slices that
made the case positive, or the longest one found) in a lung window (:data:`LUNG_WINDOW`, HU), with the
run's lesion boxes drawn in :data:`BOX_RGB`, and encodes it as a highdicom
:class:`~highdicom.sc.SCImage` (RGB, 8 bits). Each key image:

* carries the Patient and General Study modules of its source slice (highdicom's
  ``copy_patient_and_study_information``), so a PACS files it under the same patient and study;
* belongs to a new series per result (UIDs derived from the result, so encoding one result twice gives
  the same objects and a re-send never makes a duplicate);
* refers to its source slice (Source Image Sequence) and keeps its pixel spacing, and its Body Part Examined
  (with its series' Laterality, where it states one).

A negative result has no key images (its SR says so). Pure function: the caller reads the source
instances (with pixel data) and sends the returned data sets.

:func:`key_object_selection` makes the Key Object Selection document (KOS, PS3.3 A.35.4; SOP class
1.2.840.10008.5.1.4.1.1.88.59) a PACS viewer shows as the study's key images: titled "Of Interest"
(DCM 113000), it references the evidence run's own CT slices and the key images made for them, with the
notice that this is a machine reading as its description. Same patient and study, series 9903, one per
result, its UIDs derived from the result like the key images'.

:func:`rejection_note` makes the IHE IOCM Rejection Note (a KOS titled "Rejected for Quality Reasons", DCM
113001, series 9904) that retracts ctscreen's objects of earlier readings of the study, which a later reading
supersedes; it never references a screened instance.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import numpy as np

from aggregator.schema import Box, CaseResult, Evidence, EvidenceSlice, counted, quadrant_words, slice_span
from aggregator.sr import (
    SourceError,
    device_observer,
    equipment_and_time,
    made_at,
    result_key,
    stable_uid,
    usable_headers,
)

if TYPE_CHECKING:  # pragma: no cover
    from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

__all__ = ["BOX_RGB", "KEY_SERIES_DESCRIPTION", "KEY_SERIES_NUMBER", "KOS_SERIES_DESCRIPTION", "KOS_SERIES_NUMBER",
           "LUNG_WINDOW", "OF_INTEREST", "REJECTED_FOR_QUALITY", "REJECTION_SERIES_DESCRIPTION",
           "REJECTION_SERIES_NUMBER", "draw_box", "key_images", "key_object_selection", "lung_window",
           "rejection_note", "run_sources"]

LUNG_WINDOW: Final = (-600.0, 1500.0)
"""Window centre and width in HU (the usual lung window)."""

BOX_RGB: Final = (255, 40, 40)
"""Colour of the lesion boxes drawn on the key images."""

BOX_LINE: Final = 2
"""Line width of a drawn box, pixels (inside the box's edges)."""

KEY_SERIES_NUMBER: Final = 9902
KEY_SERIES_DESCRIPTION: Final = "ctscreen AI key images, not a diagnosis (lung window, boxes)"
"""Series Number of the key images (the SR is 9901)."""

KOS_SERIES_NUMBER: Final = 9903
KOS_SERIES_DESCRIPTION: Final = "ctscreen AI key object selection, not a diagnosis"
"""Series Number and Description of the Key Object Selection document."""

OF_INTEREST: Final = ("113000", "DCM", "Of Interest")
"""The KOS document title (CID 7010 Key Object Selection Document Title)."""

REJECTION_SERIES_NUMBER: Final = 9904
REJECTION_SERIES_DESCRIPTION: Final = "ctscreen AI rejection note: earlier readings superseded"
"""Series Number and Description of the Rejection Note (IHE IOCM)."""

REJECTED_FOR_QUALITY: Final = ("113001", "DCM", "Rejected for Quality Reasons")
"""The Rejection Note's document title (CID 7010; one of the four IHE IOCM titles). Of those, the one whose
instances an archive hides from regular use and keeps (113037 "Rejected for Patient Safety Reasons" is for a
wrong patient, 113038 "Incorrect Modality Worklist Entry" for a wrong order, 113039 "Data Retention Policy
Expired" has them deleted); DICOM has no title for a result superseded by a later one."""


_CODE_STRING: Final = re.compile(r"[A-Z0-9_ ]{1,16}")
"""A one-valued CS (PS3.5 6.2): what a header value copied into an object must be (else it is left out)."""


def lung_window(hu: np.ndarray, centre: float = LUNG_WINDOW[0], width: float = LUNG_WINDOW[1]) -> np.ndarray:
    """Map HU to 0..255 through a linear window.

    >>> lung_window(np.array([-2000, -600, 1000])).tolist()
    [0, 128, 255]
    """
    lo = centre - width / 2.0
    scaled = (np.asarray(hu, np.float64) - lo) / width * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def draw_box(rgb: np.ndarray, box: Box, colour: tuple[int, int, int] = BOX_RGB, line: int = BOX_LINE) -> None:
    """Draw the outline of ``box`` (inclusive pixel indices) into ``rgb`` (rows x columns x 3) in place.

    >>> img = np.zeros((6, 6, 3), np.uint8)
    >>> draw_box(img, Box(x0=1, y0=1, x1=4, y1=4), line=1)
    >>> (img[..., 0] > 0).astype(int).tolist()[1]
    [0, 1, 1, 1, 1, 0]
    >>> int(img[2, 2, 0])
    0
    """
    rows, cols = rgb.shape[:2]
    x0, x1 = max(0, box.x0), min(cols - 1, box.x1)
    y0, y1 = max(0, box.y0), min(rows - 1, box.y1)
    if x0 > x1 or y0 > y1:
        return
    w = max(1, int(line))
    colour_arr = np.asarray(colour, np.uint8)
    rgb[y0:min(y0 + w, y1 + 1), x0:x1 + 1] = colour_arr
    rgb[max(y1 - w + 1, y0):y1 + 1, x0:x1 + 1] = colour_arr
    rgb[y0:y1 + 1, x0:min(x0 + w, x1 + 1)] = colour_arr
    rgb[y0:y1 + 1, max(x1 - w + 1, x0):x1 + 1] = colour_arr


def _orientation(ds: Dataset) -> tuple[str, str]:
    """Patient Orientation (row, column directions) from Image Orientation (Patient); axial LPS default.

    >>> from pydicom.dataset import Dataset
    >>> ds = Dataset(); ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    >>> _orientation(ds)
    ('L', 'P')
    """
    iop = ds.get("ImageOrientationPatient")
    if not iop or len(iop) != 6:
        return ("L", "P")
    letters = (("R", "L"), ("A", "P"), ("F", "H"))
    out = []
    for vec in (iop[:3], iop[3:]):
        axis = int(np.argmax(np.abs(np.asarray(vec, np.float64))))
        out.append(letters[axis][1 if float(vec[axis]) > 0 else 0])
    return out[0], out[1]


def _hu(ds: Dataset) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    return np.asarray(apply_modality_lut(ds.pixel_array, ds), np.float64)


def run_sources(result: CaseResult,
                sources: Sequence[Dataset]) -> tuple[Evidence, list[tuple[EvidenceSlice, Dataset]]] | None:
    """The evidence run and its slices paired with their instances in ``sources``, what the key images and the KOS
    show; None when there is nothing to show (a negative result, one without evidence, a series that is no chest).

    Raises
    ------
    aggregator.sr.SourceError
        When an evidence slice is missing from ``sources``, belongs to another study or is multi-frame (a frame
        of it would need a Referenced Frame Number).
    """
    ev = result.evidence
    if result.verdict == "negative" or ev is None or not ev.slices or not result.shows_lesions:
        return None
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    run = []
    for evidence in ev.slices:
        ds = by_uid.get(evidence.sop_instance_uid)
        if ds is None:
            raise SourceError(f'Argument "sources" lacks evidence slice {evidence.sop_instance_uid}.')
        if str(ds.StudyInstanceUID) != result.study_instance_uid:
            raise SourceError(f'Argument "sources" holds slice {evidence.sop_instance_uid} of another study.')
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise SourceError(f"Slice {evidence.sop_instance_uid} is multi-frame; key images and the KOS need "
                              "single frames.")
        run.append((evidence, ds))
    return ev, run


def key_images(
    result: CaseResult,
    sources: Sequence[Dataset],
    *,
    series_instance_uid: str | None = None,
    series_number: int = KEY_SERIES_NUMBER,
) -> list[Dataset]:
    """Encode the slices of ``result``'s evidence run as Secondary Capture images with the boxes drawn.

    Parameters
    ----------
    result : CaseResult
        The case result.
    sources : Sequence[pydicom.dataset.Dataset]
        The screened instances with pixel data (at least those of the evidence run).
    series_instance_uid : str or None
        Of the key-image series; by default derived from the result (one new series per result).
    series_number : int
        Of the key-image series.

    The images' UIDs are made under ``result.uid_root`` (:func:`aggregator.sr.stable_uid`).

    Returns
    -------
    list[highdicom.sc.SCImage]
        One per evidence slice in position order; empty for a negative result, one without evidence, or a
        series that is no chest (its boxes are no lesions: :attr:`CaseResult.shows_lesions`).

    Raises
    ------
    aggregator.sr.SourceError
        When an evidence slice is missing from ``sources``, belongs to another study or is multi-frame.
    """
    found = run_sources(result, sources)
    if found is None:
        return []
    ev, run = found
    from highdicom import CoordinateSystemNames
    from highdicom.sc import SCImage
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    key = result_key(result)
    series = series_instance_uid or stable_uid(*key, "key-images-series", root=result.uid_root)
    out: list[Dataset] = []
    for n, (evidence, ds) in enumerate(run, start=1):
        grey = lung_window(_hu(ds))
        rgb = np.repeat(grey[..., None], 3, axis=2)
        for box in evidence.boxes:
            if box.original is not None:
                draw_box(rgb, box.original)
        spacing = ds.get("PixelSpacing")
        sc = SCImage(
            pixel_array=rgb,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system=CoordinateSystemNames.PATIENT,
            study_instance_uid=result.study_instance_uid,
            series_instance_uid=series,
            series_number=series_number,
            sop_instance_uid=stable_uid(*key, "key-image", evidence.sop_instance_uid, root=result.uid_root),
            instance_number=n,
            manufacturer="ctscreen",
            pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing else None,
            patient_orientation=_orientation(ds),
            series_description=KEY_SERIES_DESCRIPTION,
            **equipment_and_time(result, [ds]),
        )
        headers = usable_headers([ds])[0]  # an unreadable date left empty, the character set made plain
        sc.copy_patient_and_study_information(headers)
        if "SpecificCharacterSet" in headers:  # not copied by highdicom: a name would be written in another one
            sc.SpecificCharacterSet = headers.SpecificCharacterSet
        sc.ImageType = ["DERIVED", "SECONDARY"]
        sc.ConversionType = "WSD"
        sc.DerivationDescription = (f"ctscreen: {slice_span(evidence.index, evidence.index)} of the "
                                    f"{quadrant_words(ev.quadrant)} run, "
                                    f"lung window C {LUNG_WINDOW[0]:g} W {LUNG_WINDOW[1]:g}, lesion boxes drawn")
        sc.BurnedInAnnotation = "YES"
        part = str(ds.get("BodyPartExamined", "") or "").strip()
        if _CODE_STRING.fullmatch(part):  # the source's (CHEST): without it, Laterality (Type 2C on a paired part)
            sc.BodyPartExamined = part   # reads as missing (dciodvfy), and a hanging protocol finds no body part
            if "Laterality" in ds and str(ds.Laterality or "").strip() in ("", "R", "L"):
                sc.Laterality = str(ds.Laterality or "").strip()  # the source series' (a paired part's)
        source = Dataset()
        source.ReferencedSOPClassUID = ds.SOPClassUID
        source.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        sc.SourceImageSequence = DicomSequence([source])
        out.append(made_at(sc, result, [ds]))
    return out


def key_object_selection(result: CaseResult, sources: Sequence[Dataset], key_images: Sequence[Dataset] = ()) -> Dataset | None:
    """The Key Object Selection document that flags ``result``'s evidence in its study (see the module docstring).

    Parameters
    ----------
    result : CaseResult
        The case result.
    sources : Sequence[pydicom.dataset.Dataset]
        The screened instances (headers are enough), at least those of the evidence run.
    key_images : Sequence[pydicom.dataset.Dataset]
        The key images made for the run (:func:`key_images`), referenced after the slices; none to flag
        the slices only.

    Returns
    -------
    highdicom.ko.KeyObjectSelectionDocument or None
        None for a negative result, one without evidence or a series that is no chest (nothing to flag), as for
        the key images.

    Raises
    ------
    aggregator.sr.SourceError
        When an evidence slice is missing from ``sources``, belongs to another study or is multi-frame.
    """
    found = run_sources(result, sources)
    if found is None:
        return None
    ev, run = found
    from aggregator.fhir import NOTICE

    headers = usable_headers([ds for _, ds in run])
    referenced = [*headers, *key_images]
    key = result_key(result)
    version = result.software_version or "unknown"
    # not "consecutive": a run bridged over a slice without a lung field spans more slices than it counts
    description = (f"{NOTICE} COVID-19 screening (ctscreen {version}): {result.verdict} ({result.reason}); "
                   f"{counted(ev.n_slices, 'slice')} with lesions in the {quadrant_words(ev.quadrant)} quadrant, "
                   f"{slice_span(ev.slices[0].index, ev.slices[-1].index)}.")
    # its content decides its UID: two destinations asking for different objects (with the key images or not)
    # never get two documents under one SOP Instance UID
    kind = "kos+key-images" if key_images else "kos"
    return _document(result, headers[0], OF_INTEREST, referenced, description,
                     series_instance_uid=stable_uid(*key, "kos-series", root=result.uid_root),
                     series_number=KOS_SERIES_NUMBER, series_description=KOS_SERIES_DESCRIPTION,
                     sop_instance_uid=stable_uid(*key, kind, root=result.uid_root), sources=headers)


def rejection_note(result: CaseResult, sources: Sequence[Dataset], rejected: Sequence[Dataset]) -> Dataset | None:
    """The IHE IOCM Rejection Note that retracts ``rejected``, ctscreen's objects of earlier readings of the study.

    A Key Object Selection document (PS3.3 A.35.4) titled :data:`REJECTED_FOR_QUALITY` that references each
    rejected instance in its content and in the Current Requested Procedure Evidence Sequence (by study,
    series, SOP class and instance), so an archive that implements IOCM hides them from regular use; without
    a Document Title Modifier (CID 7011 lists acquisition failures, none of which a superseded reading is).
    Same patient and study as the other objects (copied from ``sources``), series
    :data:`REJECTION_SERIES_NUMBER`; its UIDs derive from ``result`` and its content decides its SOP Instance
    UID (the same instances rejected again, the same note; another set, another note).

    Parameters
    ----------
    result : CaseResult
        The reading that replaces the earlier ones.
    sources : Sequence[pydicom.dataset.Dataset]
        The screened instances of ``result`` (headers are enough); never rejected.
    rejected : Sequence[pydicom.dataset.Dataset]
        Headers of the instances to retract (``StudyInstanceUID``, ``SeriesInstanceUID``, ``SOPClassUID``,
        ``SOPInstanceUID``; ``Rows`` and ``Columns`` for an image): ctscreen's own objects (Manufacturer
        ctscreen) of the same study.

    Returns
    -------
    highdicom.ko.KeyObjectSelectionDocument or None
        None when ``rejected`` is empty.

    Raises
    ------
    aggregator.sr.SourceError
        When ``sources`` holds no instance of ``result``'s study.
    ValueError
        When a rejected instance is of another study, not made by ctscreen, or one of the screened series.
    """
    if not rejected:
        return None
    own = [ds for ds in sources if str(ds.StudyInstanceUID) == result.study_instance_uid]
    if not own:
        raise SourceError(f'Argument "sources" holds no instance of study {result.study_instance_uid}.')
    screened = {str(ds.SeriesInstanceUID) for ds in sources} | {str(ds.SOPInstanceUID) for ds in sources}
    for ds in rejected:
        uid = str(ds.SOPInstanceUID)
        if str(ds.StudyInstanceUID) != result.study_instance_uid:
            raise ValueError(f'Argument "rejected" holds instance {uid} of another study.')
        if str(ds.get("Manufacturer", "")) != "ctscreen":
            raise ValueError(f'Argument "rejected" holds instance {uid}, which ctscreen did not make.')
        if {uid, str(ds.SeriesInstanceUID)} & screened:
            raise ValueError(f'Argument "rejected" holds instance {uid} of the screened series.')
    headers = usable_headers(own[:1])
    referenced = sorted(rejected, key=lambda ds: (str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)))
    key = result_key(result)
    description = (f"Superseded: {counted(len(referenced), 'object')} of earlier ctscreen readings of this study, replaced "
                   f"by a later reading (job {result.job_id or 'unknown'}); machine readings, not a diagnosis.")
    return _document(result, headers[0], REJECTED_FOR_QUALITY, referenced, description,
                     series_instance_uid=stable_uid(*key, "rejection-series", root=result.uid_root),
                     series_number=REJECTION_SERIES_NUMBER, series_description=REJECTION_SERIES_DESCRIPTION,
                     sop_instance_uid=stable_uid(*key, "rejection", *(str(ds.SOPInstanceUID) for ds in referenced),
                                                 root=result.uid_root), sources=headers)


def _document(result: CaseResult, study: Dataset, title: tuple[str, str, str], referenced: Sequence[Dataset],
              description: str, *, series_instance_uid: str, series_number: int, series_description: str,
              sop_instance_uid: str, sources: Sequence[Dataset]) -> Dataset:
    """A Key Object Selection document of ``referenced`` under ``title``, in ``study``'s patient and study."""
    from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
    from highdicom.sr import CodedConcept

    content = KeyObjectSelection(
        document_title=CodedConcept(*title),
        referenced_objects=referenced,
        observer_device_context=device_observer(result),
        description=description,
    )
    kos = KeyObjectSelectionDocument(
        evidence=referenced,
        content=content,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer="ctscreen",
        series_description=series_description,
        **equipment_and_time(result, sources),
    )
    kos.copy_patient_and_study_information(study)  # the whole modules (issuer, study description), as the key images
    if "SpecificCharacterSet" in study:
        kos.SpecificCharacterSet = study.SpecificCharacterSet
    return made_at(kos, result, sources)
