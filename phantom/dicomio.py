"""Write a :class:`phantom.Study` as a real DICOM CT series with its truth beside it.

Layout of ``out_dir``::

    dicom/          one CT Image Storage file per slice (names IM0001.dcm.. or shuffled hex names)
    masks/          lung.nii.gz, lesion.nii.gz, finding.nii.gz (uint8, RAS affine)
    manifest.json   class, geometry, lesion slices, quadrants, findings, seed, UIDs, file list
    montage.png     lung-window montage (apex first); montage_truth.png with the truth outlined
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from .montage import LUNG_WINDOW, save_montage
from .study import Study

logger = logging.getLogger(__name__)

ENCODINGS: tuple[str, ...] = ("explicit", "jpeg2000", "rle")
"""``explicit``: Explicit VR Little Endian; ``jpeg2000``: JPEG 2000 lossless; ``rle``: RLE lossless."""

_EPOCH = _dt.datetime(2020, 2, 1, 8, 0, 0)


def _uid(*parts: object) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["ctscreen-phantom", *[str(p) for p in parts]])


def _transfer_syntax(encoding: str) -> str:
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

    return {"explicit": ExplicitVRLittleEndian, "jpeg2000": JPEG2000Lossless, "rle": RLELossless}[encoding]


def study_uids(study: Study, salt: str = "") -> dict[str, str]:
    """Study, series and frame-of-reference UIDs (deterministic from seed, kind and ``salt``)."""
    key = (study.seed, study.kind, salt)
    return {
        "study_instance_uid": _uid(*key, "study"),
        "series_instance_uid": _uid(*key, "series"),
        "frame_of_reference_uid": _uid(*key, "for"),
    }


def write_study(study: Study, out_dir: str | Path, *, encoding: str = "explicit", shuffle: bool = False,
                salt: str = "", montage: bool = True) -> Path:
    """Write ``study`` under ``out_dir`` (created if needed) and return ``out_dir``.

    Parameters
    ----------
    study
        A study from :func:`phantom.make_study`.
    out_dir
        Folder for this one series and its truth.
    encoding
        One of :data:`ENCODINGS`; the HU values decode back exactly with every encoding.
    shuffle
        Give the files random (seeded) hex names, so that file order says nothing.
    salt
        Extra text mixed into the UIDs (two writes of one seed with different salts get
        different UIDs).
    montage
        Also write the PNG montages.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f'Argument "encoding" must be one of {", ".join(ENCODINGS)}; got {encoding!r}.')
    out = Path(out_dir)
    dicom_dir = out / "dicom"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    uids = study_uids(study, salt)
    files = _write_dicom(study, dicom_dir, encoding, shuffle, salt, uids)
    _write_masks(study, out / "masks")
    manifest = dict(study.manifest)
    manifest.update(uids)
    manifest.update({
        "encoding": encoding,
        "transfer_syntax_uid": str(_transfer_syntax(encoding)),
        "shuffled": bool(shuffle),
        "salt": salt,
        "files": files,
        "masks": {"lung": "masks/lung.nii.gz", "lesion": "masks/lesion.nii.gz", "finding": "masks/finding.nii.gz"},
    })
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if montage:
        save_montage(study, out / "montage.png", outline=False)
        save_montage(study, out / "montage_truth.png", outline=True)
    return out


def _write_dicom(study: Study, folder: Path, encoding: str, shuffle: bool, salt: str, uids: dict) -> list[dict]:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

    z, rows, cols = study.hu.shape
    intercept = int(study.rescale_intercept)
    signed = study.pixel_representation == 1
    lo, hi = int(study.hu.min()) - intercept, int(study.hu.max()) - intercept
    dtype: type[np.integer]
    if signed:
        dtype, bits_stored = np.int16, 16
        if lo < -32768 or hi > 32767:
            raise ValueError("study HU do not fit signed 16-bit storage with this intercept")
    else:
        if lo < 0 or hi > 65535:
            raise ValueError("study HU below the rescale intercept cannot be stored unsigned")
        dtype, bits_stored = np.uint16, (12 if hi <= 4095 else 16)
    when = _EPOCH + _dt.timedelta(days=int(study.seed) % 1500, minutes=int(study.seed) % 600)
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    pid = f"PH{study.seed:08d}"
    names = _file_names(study, shuffle, salt)
    out = []
    tsyntax = _transfer_syntax(encoding)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
    ds.AccessionNumber = f"A{study.seed:08d}"
    ds.Modality = "CT"
    ds.Manufacturer = "ctscreen"
    ds.InstitutionName = "ctscreen phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT CHEST"
    ds.SeriesDescription = f"Chest {study.slice_thickness:g}mm phantom"
    ds.ManufacturerModelName = "digital phantom"
    ds.SoftwareVersions = "ctscreen-phantom 1"
    ds.PatientName = f"Phantom^{study.kind.capitalize()}{study.seed}"
    ds.PatientID = pid
    ds.PatientBirthDate = f"{int(date[:4]) - study.patient.get('age', 50)}0101"
    ds.PatientSex = study.patient.get("sex", "O")
    ds.PatientAge = f"{study.patient.get('age', 50):03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = f"{study.slice_thickness:g}"
    ds.KVP = "120"
    ds.ConvolutionKernel = "LUNG"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = uids["study_instance_uid"]
    ds.SeriesInstanceUID = uids["series_instance_uid"]
    ds.StudyID = f"{study.seed % 100000}"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [_ds(v) for v in study.orientation]
    ds.FrameOfReferenceUID = uids["frame_of_reference_uid"]
    ds.PositionReferenceIndicator = ""
    ds.SpacingBetweenSlices = f"{study.slice_spacing:g}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = [_ds(v) for v in study.pixel_spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if study.padding_hu is not None:
        ds.PixelPaddingValue = int(study.padding_hu - intercept)
    ds.WindowCenter = ["-600", "40"]
    ds.WindowWidth = ["1500", "400"]
    ds.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
    ds.RescaleIntercept = str(intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    for k in range(z):
        # one dataset, refilled per slice: only these elements differ between the files
        instance = z - k  # acquisition runs head to feet: instance 1 is the top slice
        sop = UID(_uid(study.seed, study.kind, salt, "sop", k))
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPInstanceUID = sop
        ds.InstanceNumber = instance
        ds.ImagePositionPatient = [_ds(v) for v in study.positions[k]]
        ds.SliceLocation = _ds(study.positions[k][2])
        pixels = (study.hu[k].astype(np.int32) - intercept).astype(dtype)
        ds.PixelData = pixels.tobytes()
        if encoding != "explicit":
            ds.compress(tsyntax, pixels, generate_instance_uid=False)
        name = names[k]
        ds.save_as(folder / name, enforce_file_format=True)
        out.append({"index": k, "file": f"dicom/{name}", "instance_number": instance, "sop_instance_uid": sop})
    return out


def _ds(v: float) -> str:
    """Decimal String of at most 16 characters."""
    s = f"{float(v):.6f}".rstrip("0").rstrip(".")
    if s in ("-0", "", "-"):
        s = "0"
    if len(s) > 16:
        raise ValueError(f"value {v!r} does not fit a DICOM DS")
    return s


def _file_names(study: Study, shuffle: bool, salt: str) -> list[str]:
    z = study.hu.shape[0]
    if not shuffle:
        return [f"IM{z - k:04d}.dcm" for k in range(z)]
    h = hashlib.sha256(f"{study.seed}/{study.kind}/{salt}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(h[:8], "little"))
    return [f"{v:016x}" for v in rng.integers(0, 2**63, size=z, dtype=np.int64)]


def _affine(study: Study) -> np.ndarray:
    """Voxel (col, row, slice) -> RAS mm (DICOM LPS with x and y negated)."""
    ps_r, ps_c = study.pixel_spacing
    x0, y0, z0 = study.positions[0]
    return np.array([
        [-ps_c, 0.0, 0.0, -x0],
        [0.0, -ps_r, 0.0, -y0],
        [0.0, 0.0, study.slice_spacing, z0],
        [0.0, 0.0, 0.0, 1.0],
    ])


def _write_masks(study: Study, folder: Path) -> None:
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    aff = _affine(study)
    for name, arr in (("lung", study.lung_mask), ("lesion", study.lesion_mask), ("finding", study.finding_mask)):
        # arr.T is the Fortran-ordered (col, row, slice) view NIfTI stores: no copy needed
        img = nib.Nifti1Image(arr.view(np.uint8).T, aff)
        img.header.set_xyzt_units("mm")
        nib.save(img, folder / f"{name}.nii.gz")


def read_manifest(path: str | Path) -> dict:
    """The manifest of a written study (``path`` = the study folder or its manifest.json)."""
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    return json.loads(p.read_text())


def read_masks(path: str | Path) -> dict[str, np.ndarray]:
    """The truth masks of a written study as [Z, H, W] arrays (same order as ``Study``)."""
    import nibabel as nib

    p = Path(path)
    out = {}
    for name, dtype in (("lung", bool), ("lesion", bool), ("finding", np.uint8)):
        img = nib.load(p / "masks" / f"{name}.nii.gz")
        if not isinstance(img, nib.Nifti1Image):
            raise ValueError(f"{p / 'masks'}: {name}.nii.gz is not a NIfTI-1 image")
        arr = np.asarray(img.dataobj)
        out[name] = np.ascontiguousarray(arr.transpose(2, 1, 0)).astype(dtype)
    return out


__all__ = ["ENCODINGS", "LUNG_WINDOW", "read_manifest", "read_masks", "study_uids", "write_study"]
