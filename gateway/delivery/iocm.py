"""What a Rejection Note retracts (IHE IOCM): the objects one destination holds of a study's earlier readings.

A destination whose ``objects`` hold ``rejection`` gets, with a reading that replaces earlier ones (a study
screened again), a Rejection Note (:func:`aggregator.keyimages.rejection_note`) naming what that destination
acknowledged for the earlier readings (:meth:`gateway.store.deliveries.Deliveries.acknowledged`): their SR, key
images and KOS, never the screened images, never another destination's objects (an archive refuses a note naming
an instance it does not hold). The four UIDs a note names come from each object's payload blob, the very bytes
that were sent. An instance that an earlier note acknowledged there retracted already is left out: each is
retracted once (by then the archive may have deleted it, and dcm4chee refuses a note naming an instance it does
not hold, 0xA772).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from typing import Any

from gateway.delivery.payloads import REJECTION

logger = logging.getLogger(__name__)

__all__ = ["retractable"]


def retractable(objects: Sequence[dict[str, str]], get: Callable[[str], bytes]) -> list[Any]:
    """Headers of ``objects`` (one destination's acknowledged objects of the earlier readings) to retract.

    ``get`` reads a payload blob. Rejection Notes among ``objects`` are never retracted; the instances they name
    are left out. An object whose blob is gone (or holds another instance) is left out with a warning: a note
    names only what is known to have been sent.
    """
    import pydicom

    headers, retracted = [], set()
    for o in objects:
        try:
            ds = pydicom.dcmread(io.BytesIO(get(o["blob_key"])), stop_before_pixels=True)
        except FileNotFoundError:
            logger.warning("the payload blob of %s %s is gone; a rejection note cannot name it", o["kind"], o["uid"])
            continue
        if str(ds.get("SOPInstanceUID", "")) != o["uid"]:
            logger.warning("the payload blob of %s %s holds another instance; left out", o["kind"], o["uid"])
            continue
        if o["kind"] == REJECTION:
            retracted |= {str(ref.ReferencedSOPInstanceUID)
                          for study in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
                          for series in study.get("ReferencedSeriesSequence", [])
                          for ref in series.get("ReferencedSOPSequence", [])}
        else:
            headers.append(ds)
    return [ds for ds in headers if str(ds.SOPInstanceUID) not in retracted]
