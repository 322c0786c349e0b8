"""What a delivery sends, built once from the job's stored instances and kept in the blob store.

For a DICOM or STOW-RS destination: the TID 1500 SR (:func:`aggregator.sr.to_sr`) over the full headers of
the screened series, the key images (:func:`aggregator.keyimages.key_images`) rendered from the stored
pixel data, and, where the destination asks for it, the Key Object Selection document that flags the evidence
slices and the key images (:func:`aggregator.keyimages.key_object_selection`). For a FHIR destination: the transaction Bundle (:func:`aggregator.fhir.to_fhir`), whose
patient identifiers come from the headers kept with the result; for an HL7 destination, the ORU^R01 message that
says the same (:func:`aggregator.hl7v2.to_oru`), with the patient's identifier, name, birth date and sex. Blocking, CPU-bound: run it in a thread.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aggregator.fhir import IdentifierSystems
from aggregator.hl7v2 import Parties
from aggregator.schema import CaseResult
from aggregator.sr import SourceError

logger = logging.getLogger(__name__)

SR, KEY_IMAGE, KOS, REJECTION, FHIR, HL7 = "sr", "key_image", "kos", "rejection", "fhir", "hl7"


class PayloadUnavailable(RuntimeError):
    """The objects cannot be built (instances gone, headers unusable): the delivery fails, with this reason."""


def calling_ae_titles(filenames: Sequence[str]) -> set[str]:
    """AE titles of the C-STORE peers that sent the instances (the intake names them ``dimse:AE@host#uid``).

    An AE title may hold ``@`` and ``#`` (PS3.5 6.2, AE): the host (an IP address) and the UID hold neither,
    so the title is what precedes the last ``@`` before the last ``#``.

    >>> sorted(calling_ae_titles(["dimse:CT_ROOM_1@10.0.0.5#1.2.3", "upload/a.dcm", "dimse:CT2@h#4", "dimse:CT@#1@::1#5"]))
    ['CT2', 'CT@#1', 'CT_ROOM_1']
    """
    out = set()
    for name in filenames:
        if name.startswith("dimse:") and "@" in name:
            out.add(name[len("dimse:"):].rsplit("#", 1)[0].rsplit("@", 1)[0])
    return out


def _bytes(ds: Any) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


DEFER_BYTES = 64 * 1024
"""Values longer than this (Pixel Data) are read from a stored instance's file only when used: the key
images' few slices, not the whole study (a 600-slice study held 300 MB twice over while its SR was built)."""


def _series(result: CaseResult, sources: Sequence[tuple[str, bytes | Path]]) -> list[Any]:
    """The screened series' instances, parsed; from a file, their pixel data is read when used (the key
    images'), so a study's building holds its headers, not its pixels."""
    import pydicom

    from gateway.uploads import iter_upload

    wanted = {s.sop_instance_uid for s in result.slices}
    out = []
    for filename, data in sources:
        for _name, content in iter_upload(filename, data):
            try:
                source = content if isinstance(content, Path) else io.BytesIO(content)
                ds = pydicom.dcmread(source, force=True, defer_size=DEFER_BYTES if isinstance(content, Path) else None)
            except Exception:  # noqa: BLE001 - not every member of an upload is DICOM
                continue
            if str(ds.get("SOPInstanceUID", "")) in wanted:
                out.append(ds)
    return out


def build_dicom(result: CaseResult, sources: Sequence[tuple[str, bytes | Path]], objects: Sequence[str],
                put: Callable[[bytes], str], earlier: Sequence[CaseResult] = (),
                rejected: Sequence[Any] = ()) -> list[dict[str, str]]:
    """Build the SR, the key images, the KOS and the Rejection Note, those of them in ``objects``; ``put`` stores
    bytes and returns a blob key. The KOS references the key images when they are made too; the Rejection Note
    (:func:`aggregator.keyimages.rejection_note`, last) retracts ``rejected``, headers of the objects of earlier
    readings (:func:`gateway.delivery.iocm.retractable`), and is made only when there are some. The SR names
    the SRs of the ``earlier`` readings of the study as its predecessors; every UID is made under the
    result's own UID root (``result.uid_root``, fixed when it was made).

    Raises
    ------
    PayloadUnavailable
        When none of the screened instances is kept any more, or highdicom refuses their headers.
    """
    from aggregator.keyimages import key_images, key_object_selection, rejection_note
    from aggregator.sr import to_sr

    datasets = _series(result, sources)
    if not datasets:
        raise PayloadUnavailable("the screened instances are no longer kept (retention); no SR can be made")
    made = []
    try:
        if "sr" in objects:
            made.append((SR, to_sr(result, datasets, predecessors=earlier)))
        if "key_images" in objects:
            made += [(KEY_IMAGE, ds) for ds in key_images(result, datasets)]
        if "kos" in objects:
            kos = key_object_selection(result, datasets, [ds for kind, ds in made if kind == KEY_IMAGE])
            made += [(KOS, kos)] if kos is not None else []
        if "rejection" in objects and (note := rejection_note(result, datasets, rejected)) is not None:
            made.append((REJECTION, note))
    except SourceError as exc:  # its message names UIDs only
        raise PayloadUnavailable(f"the source images cannot be used: {exc}") from None
    except (ValueError, AttributeError, TypeError) as exc:  # highdicom's message may quote a header value
        raise PayloadUnavailable(f"highdicom refused the source headers ({type(exc).__name__})") from None
    out = []
    for kind, ds in made:
        out.append({"kind": kind, "uid": str(ds.SOPInstanceUID), "sop_class_uid": str(ds.SOPClassUID),
                    "blob_key": put(_bytes(ds))})
    return out


def build_fhir(result: CaseResult, sr_context: dict[str, Any] | None, put: Callable[[bytes], str],
               systems: IdentifierSystems | None = None, earlier: Sequence[CaseResult] = ()) -> list[dict[str, str]]:
    """Build the FHIR Bundle of ``result``; patient identifiers from the stored SR headers, resolved in the
    receiving site's identifier ``systems``; the ``earlier`` readings of the study named as the ones it replaces.

    Raises
    ------
    PayloadUnavailable
        When the FHIR models refuse the bundle.
    """
    from aggregator.fhir import report_identifier, to_fhir

    try:
        bundle = to_fhir(result, _patient(sr_context), systems, supersedes=earlier)
    except ValueError as exc:
        raise PayloadUnavailable(str(exc)) from None
    return [{"kind": FHIR, "uid": report_identifier(result), "blob_key": put(json.dumps(bundle).encode())}]


def _patient(sr_context: dict[str, Any] | None) -> dict[str, str]:
    """The patient and study attributes kept with the result (those with a value), and the study's time zone."""
    from gateway.report import SrContext

    # read as the SR reads it (SrContext.from_json: what an earlier or a later release stored)
    context = SrContext.from_json(sr_context) if sr_context else None
    patient = {k: v for k, v in context.study if v} if context else {}
    if context is not None and context.timezone_offset:  # the study's zone: its date and time become one instant
        patient["TimezoneOffsetFromUTC"] = context.timezone_offset
    return patient


def build_hl7(result: CaseResult, sr_context: dict[str, Any] | None, put: Callable[[bytes], str], parties: Parties,
              earlier: Sequence[CaseResult] = ()) -> list[dict[str, str]]:
    """Build the HL7 v2.5.1 ORU^R01 message of ``result`` (UTF-8), a preliminary result (OBR-25 ``P``) also when it
    replaces an earlier reading of the study (``earlier``: its conclusion names the one it replaces).

    Raises
    ------
    PayloadUnavailable
        When the FHIR models refuse the report the message is read from.
    """
    from aggregator.fhir import report_identifier
    from aggregator.hl7v2 import to_oru

    try:
        message = to_oru(result, _patient(sr_context), parties, supersedes=earlier,
                         now=datetime.datetime.now(datetime.UTC))
    except ValueError as exc:
        raise PayloadUnavailable(str(exc)) from None
    return [{"kind": HL7, "uid": report_identifier(result), "blob_key": put(message.encode("utf-8"))}]
