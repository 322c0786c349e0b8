"""Build small, real DICOM CT objects with pydicom for the gateway ingest tests and benchmarks."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

FOV_MM = 358.4
"""The field of view every made slice has, whatever its matrix: 0.7 mm a pixel on the 512 grid, as the models learnt
(gateway.dicom.GRID_MM), so that a small test matrix stands for a whole chest, not a 22 mm one."""

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def chest_like(rows: int = 512, cols: int = 512, seed: int = 0) -> np.ndarray:
    """A smooth HU image: air outside, a soft-tissue ellipse, two darker 'lungs', noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cy, cx = rows / 2, cols / 2
    hu = np.full((rows, cols), -1000.0, dtype=np.float32)
    body = ((y - cy) / (0.4 * rows)) ** 2 + ((x - cx) / (0.45 * cols)) ** 2 < 1
    hu[body] = 40
    for side in (-1, 1):
        lung = ((y - cy) / (0.28 * rows)) ** 2 + ((x - cx - side * 0.2 * cols) / (0.15 * cols)) ** 2 < 1
        hu[lung] = -850
    hu += rng.normal(0, 15, hu.shape).astype(np.float32)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def ct_dataset(
    hu: np.ndarray,
    *,
    position: Sequence[float] = (0.0, 0.0, 0.0),
    orientation: Sequence[float] = AXIAL,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    instance_number: int = 1,
    series_number: int = 1,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    thickness: float = 1.0,
    slope: float = 1.0,
    intercept: float = -1024.0,
    modality: str = "CT",
    signed: bool = False,
) -> Dataset:
    """A CT Image Storage data set holding ``hu`` (stored = (hu - intercept) / slope)."""
    stored = np.rint((hu.astype(np.float64) - intercept) / slope)
    dtype = np.int16 if signed else np.uint16
    info = np.iinfo(dtype)
    if stored.min() < info.min or stored.max() > info.max:
        raise ValueError("hu does not fit the stored type with this slope/intercept")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid) if sop_uid else generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = modality
    ds.ImageType = list(image_type)
    ds.PatientID = "PHANTOM"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    ds.SliceThickness = f"{thickness:g}"
    ds.PixelSpacing = [f"{FOV_MM / n:.6g}" for n in hu.shape]  # a chest field of view at any matrix
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.PixelData = stored.astype(dtype).tobytes()
    return ds


def study_companions(study_uid: str) -> list[Dataset]:
    """What a scanner adds to a CT study and a PACS routes with it: an X-Ray Radiation Dose SR and a Secondary
    Capture (a dose screen), each in a series of its own, as Part 10 data sets."""
    made = []
    for sop_class, modality in (("1.2.840.10008.5.1.4.1.1.88.67", "SR"), ("1.2.840.10008.5.1.4.1.1.7", "OT")):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = UID(sop_class)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
        ds.PatientID, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "PHANTOM", modality, 999, 1
        if modality == "SR":
            ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
        else:
            ds.ConversionType, ds.SamplesPerPixel, ds.PhotometricInterpretation = "WSD", 1, "MONOCHROME2"
            ds.Rows = ds.Columns = 16
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
            ds.PixelData = bytes(16 * 16)
        made.append(ds)
    return made


def to_bytes(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """Encode ``ds`` in ``transfer_syntax`` (compressing with pydicom's encoders) and serialise.

    Lossy JPEG 2000 uses a 10:1 compression ratio.
    """
    if transfer_syntax == ImplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    elif transfer_syntax == DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    elif transfer_syntax == JPEG2000:
        ds.compress(transfer_syntax, j2k_cr=[10])
    elif transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def make_series(
    n: int,
    *,
    rows: int = 64,
    cols: int = 64,
    spacing: float = 1.0,
    z0: float = 0.0,
    orientation: Sequence[float] = AXIAL,
    study_uid: str | None = None,
    series_uid: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    seed: int = 0,
    **kwargs: Any,
) -> list[tuple[str, bytes, np.ndarray, float]]:
    """``n`` slices along the orientation's normal: ``(filename, bytes, hu, position_mm)`` each."""
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    row = np.asarray(orientation[:3])
    col = np.asarray(orientation[3:])
    normal = np.cross(row, col)
    out = []
    for i in range(n):
        hu = chest_like(rows, cols, seed=seed + i)
        hu[0, 0] = i  # slice signature: lets tests check the order
        d = z0 + i * spacing
        pos = normal * d
        ds = ct_dataset(
            hu,
            position=pos,
            orientation=orientation,
            study_uid=study_uid,
            series_uid=series_uid,
            instance_number=i + 1,
            **kwargs,
        )
        out.append((f"s{i:04d}.dcm", to_bytes(ds, transfer_syntax), hu, d))
    return out


def enhanced_ct(frames_hu: list[np.ndarray], rescale: list[tuple[float, float]], z: list[float]) -> bytes:
    """An Enhanced CT object: geometry in the Shared group, position and rescale per frame."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import EnhancedCTImageStorage

    ds = ct_dataset(frames_hu[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    for kw in (
        "RescaleSlope",
        "RescaleIntercept",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "SliceThickness",
        "PixelSpacing",
    ):
        delattr(ds, kw)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = len(frames_hu)
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([Dataset()])
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence = Sequence([Dataset()])
    shared.PixelMeasuresSequence[0].SliceThickness = 1.0
    shared.PixelMeasuresSequence[0].PixelSpacing = [FOV_MM / n for n in frames_hu[0].shape]
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per, stored = [], []
    for hu, (slope, intercept), zz in zip(frames_hu, rescale, z, strict=True):
        item = Dataset()
        item.PlanePositionSequence = Sequence([Dataset()])
        item.PlanePositionSequence[0].ImagePositionPatient = [0, 0, zz]
        item.PixelValueTransformationSequence = Sequence([Dataset()])
        item.PixelValueTransformationSequence[0].RescaleSlope = slope
        item.PixelValueTransformationSequence[0].RescaleIntercept = intercept
        item.PixelValueTransformationSequence[0].RescaleType = "HU"
        per.append(item)
        stored.append(np.rint((hu.astype(np.float64) - intercept) / slope).astype(np.uint16))
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.PixelData = np.stack(stored).tobytes()
    return to_bytes(ds)


FACE_SLICE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom-edge-cases" / "pylibjpeg-data" / \
    "ELSCINT1_JP2vsJ2K.dcm"
"""A real CT slice of a face (the oral airway, metal streaks): the models box it, two boxes a slice on the grid at
their scale. (The fo-dicom head slice, whose sinus air they boxed when it filled the grid, gets none at its
149 mm field's true scale.)"""


def face_series(folder: Path, n: int = 6) -> Path:
    """``n`` copies of :data:`FACE_SLICE` 2 mm apart as one new series of a new study, written to ``folder``: a
    head CT a router sent on (the caller skips when the file is absent)."""
    import pydicom

    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ds = pydicom.dcmread(FACE_SLICE)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 2.0 * i]
        ds.InstanceNumber = i + 1
        ds.save_as(folder / f"face{i}.dcm")
    return folder
