"""pydicom decoding of a series into an HU volume, the way MONAI Deploy's series-to-volume operator does it.

Kept apart from :mod:`benchmarks.ratios` so that the MONAI Deploy SDK peer (:mod:`benchmarks.monai_sdk_app`,
in its own virtual environment) imports it with nothing but numpy, scipy and pydicom.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from ctscreen.contracts import SLICE_SIZE


class DecodeError(ValueError):
    """A series the MONAI-style decoding does not handle."""


def decode_series(files: Sequence[tuple[str, bytes]]) -> tuple[np.ndarray, list[tuple[str, float]]]:
    """pydicom decoding as MONAI Deploy's series-to-volume operator does it: HU int16 ``[Z, 512, 512]``
    sorted along the slice normal, with (SOP Instance UID, position) per slice."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    items = []
    for name, data in files:
        ds = pydicom.dcmread(io.BytesIO(data))
        hu = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
        if hu.ndim != 2:
            raise DecodeError(f"{name}: {hu.shape} pixel data; the MONAI-style client handles single frames only")
        if hu.shape != (SLICE_SIZE, SLICE_SIZE):  # a Resize transform in a MONAI app: bilinear to 512
            hu = ndimage.zoom(hu, (SLICE_SIZE / hu.shape[0], SLICE_SIZE / hu.shape[1]), order=1, grid_mode=True,
                              mode="nearest")
        iop = np.asarray(ds.ImageOrientationPatient, float)
        normal = np.cross(iop[:3], iop[3:])
        pos = float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float)))
        items.append((pos, str(ds.SOPInstanceUID), np.clip(np.rint(hu), -32768, 32767).astype(np.int16)))
    items.sort(key=lambda t: t[0])
    return np.stack([t[2] for t in items]), [(t[1], t[0]) for t in items]
