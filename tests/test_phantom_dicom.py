"""phantom.write_study: real DICOM files read back with pydicom and dcmtk's dcmdump, exact HU,
consistent geometry, NIfTI masks and manifest.

dcmdump comes from the Debian package ``dcmtk`` (installed by scripts/setup.sh); the dcmdump
check is skipped, with that reason, on a machine without it.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest

import phantom

CONVENTIONS = [(-1024, 0), (-1024, 1), (0, 1), (-1000, 0)]


def _series(folder):
    files = sorted((folder / "dicom").iterdir())
    return files, [pydicom.dcmread(f) for f in files]


@pytest.fixture(scope="module")
def small_study():
    return phantom.make_study(31, "covid", n_slices=10, matrix=96, circle=True, rescale_intercept=0,
                              pixel_representation=1)


@pytest.mark.parametrize("encoding", phantom.ENCODINGS)
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_every_file_reads_back_with_exact_hu(tmp_path, encoding, convention):
    intercept, rep = convention
    study = phantom.make_study(3, "covid", n_slices=8, matrix=96, rescale_intercept=intercept,
                               pixel_representation=rep, circle=True)
    out = phantom.write_study(study, tmp_path / "s", encoding=encoding, shuffle=True, montage=False)
    manifest = phantom.read_manifest(out)
    index_of = {f["sop_instance_uid"]: f["index"] for f in manifest["files"]}
    files, datasets = _series(out)
    assert len(files) == study.hu.shape[0]
    for ds in datasets:
        assert ds.file_meta.TransferSyntaxUID == manifest["transfer_syntax_uid"]
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage
        hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        assert np.array_equal(hu, study.hu[index_of[ds.SOPInstanceUID]])
        assert int(ds.RescaleIntercept) == intercept and ds.PixelRepresentation == rep
        assert int(ds.PixelPaddingValue) + intercept == study.padding_hu
    if shutil.which("dcmdump") is None:
        pytest.skip("dcmtk's dcmdump is not installed (apt-get install dcmtk)")
    r = subprocess.run(["dcmdump", "-q", "-dc", *map(str, files)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "E:" not in r.stderr and "W:" not in r.stderr
    assert r.stdout.count("(7fe0,0010)") == len(files)


def test_dcmdump_decodes_compressed_pixels(tmp_path, small_study):
    """dcmdump +dc only parses; dcmconv/dcmdjpeg would need more packages: check the file structure
    dcmtk reports for an encapsulated transfer syntax."""
    if shutil.which("dcmdump") is None:
        pytest.skip("dcmtk's dcmdump is not installed (apt-get install dcmtk)")
    out = phantom.write_study(small_study, tmp_path / "j2k", encoding="jpeg2000", montage=False)
    f = sorted((out / "dicom").iterdir())[0]
    r = subprocess.run(["dcmdump", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert "JPEG2000LosslessOnly" in r.stdout
    assert "PixelSequence" in r.stdout or "pixel sequence" in r.stdout.lower()


def test_required_modules_and_geometry(tmp_path, small_study):
    out = phantom.write_study(small_study, tmp_path / "s", montage=False)
    _, datasets = _series(out)
    required = [
        # patient, general study, general series, frame of reference, general equipment
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
        "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
        "Modality", "SeriesInstanceUID", "SeriesNumber", "PatientPosition",
        "FrameOfReferenceUID", "PositionReferenceIndicator", "Manufacturer",
        # general image, image plane, image pixel, CT image, VOI LUT, SOP common
        "InstanceNumber", "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness",
        "SpacingBetweenSlices", "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns",
        "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "PixelData", "ImageType",
        "RescaleIntercept", "RescaleSlope", "KVP", "WindowCenter", "WindowWidth", "SOPClassUID", "SOPInstanceUID",
    ]
    for ds in datasets:
        missing = [k for k in required if k not in ds]
        assert not missing
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    # spatial order along the normal, not file or instance order
    iop = np.array(datasets[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    along = sorted(float(np.dot(np.array(ds.ImagePositionPatient, float), normal)) for ds in datasets)
    assert np.allclose(np.diff(along), float(datasets[0].SpacingBetweenSlices), atol=1e-4)
    assert float(datasets[0].SpacingBetweenSlices) == small_study.slice_spacing
    by_pos = sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert [ds.InstanceNumber for ds in by_pos] == list(range(len(datasets), 0, -1))
    assert [float(v) for v in datasets[0].PixelSpacing] == list(small_study.pixel_spacing)


def test_uids_are_unique_per_study_and_repeatable(tmp_path):
    a = phantom.make_study(1, "normal", n_slices=4, matrix=64)
    b = phantom.make_study(2, "normal", n_slices=4, matrix=64)
    ua, ub = phantom.dicomio.study_uids(a), phantom.dicomio.study_uids(b)
    assert ua == phantom.dicomio.study_uids(a)
    assert not set(ua.values()) & set(ub.values())
    assert phantom.dicomio.study_uids(a, salt="x") != ua
    for uid in ua.values():
        assert pydicom.uid.UID(uid).is_valid


def test_masks_manifest_and_montage(tmp_path, small_study):
    out = phantom.write_study(small_study, tmp_path / "s")
    masks = phantom.read_masks(out)
    assert np.array_equal(masks["lung"], small_study.lung_mask)
    assert np.array_equal(masks["lesion"], small_study.lesion_mask)
    assert np.array_equal(masks["finding"], small_study.finding_mask)
    m = phantom.read_manifest(out / "manifest.json")
    assert m["kind"] == "covid" and m["label"] == 1 and m["seed"] == 31
    assert m["lesion_slices"] and m["quadrants"]
    assert m["pixel_spacing"] == list(small_study.pixel_spacing)
    assert m["slice_spacing"] == small_study.slice_spacing
    assert len(m["files"]) == small_study.hu.shape[0]
    from PIL import Image

    with Image.open(out / "montage.png") as im:
        assert im.mode == "RGB" and min(im.size) >= 256
    import nibabel as nib

    img = nib.load(out / "masks" / "lung.nii.gz")
    # voxel (0, 0, k) maps to ImagePositionPatient of slice k (RAS = LPS with x, y negated)
    k = 3
    ras = img.affine @ np.array([0, 0, k, 1.0])
    lps = small_study.positions[k]
    assert np.allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=1e-4)


def test_unshuffled_names_follow_instance_numbers(tmp_path):
    s = phantom.make_study(4, "nodule", n_slices=5, matrix=64)
    out = phantom.write_study(s, tmp_path / "s", montage=False)
    names = sorted(p.name for p in (out / "dicom").iterdir())
    assert names == [f"IM{i:04d}.dcm" for i in range(1, 6)]
    with pytest.raises(ValueError, match="encoding"):
        phantom.write_study(s, tmp_path / "t", encoding="jpeg-ls")
