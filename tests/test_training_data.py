"""Training data without torch: NIfTI loader (a tiny real NIfTI set written with nibabel), banks, sources."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from training import datasets
from training.datasets import DataError, SliceBank, Volume


def make_nifti_set(root, n_cases: int = 2, shape=(64, 64, 4)):
    """COVID-19-CT-Seg layout: ct_scans/, Infection_Mask/, Lung_Mask/ with an identity (RAS+) affine.

    Each volume has a bright marker block at high x (patient right) and high y (anterior), and a
    lesion block at low x (patient left), low y (posterior) on slice 2; no lung on slice 0.
    """
    for d in ("ct_scans", "Infection_Mask", "Lung_Mask"):
        (root / d).mkdir(parents=True)
    affine = np.eye(4)  # RAS+: +x towards the patient's right, +y anterior, +z superior
    for c in range(n_cases):
        vol = np.full(shape, -1000, dtype=np.int16)
        lung = np.zeros(shape, dtype=np.uint8)
        les = np.zeros(shape, dtype=np.uint8)
        lung[8:56, 16:48, 1:] = 1  # no lung on slice 0 (inferior-most)
        vol[lung > 0] = -850
        # marker: x high (towards +x = Right in RAS), y high (towards Anterior)
        vol[60:64, 60:64, :] = 1000
        les[10:20, 20:30, 2] = 1  # x low = patient left
        vol[les > 0] = -400
        nib.save(nib.Nifti1Image(vol, affine), str(root / "ct_scans" / f"case{c}.nii.gz"))
        nib.save(nib.Nifti1Image(les, affine), str(root / "Infection_Mask" / f"case{c}.nii.gz"))
        nib.save(nib.Nifti1Image(lung, affine), str(root / "Lung_Mask" / f"case{c}_mask.nii.gz"))


def test_nifti_loader_layout_orientation_and_targets(tmp_path):
    make_nifti_set(tmp_path)
    cases = datasets.nifti_cases(tmp_path)
    assert [c[0] for c in cases] == ["case0", "case1"]
    assert all(c[3] is not None for c in cases), "lung masks matched despite the _mask suffix"
    vol = datasets.load_nifti_case(*cases[0])
    assert vol.hu.shape == (4, 512, 512) and vol.hu.dtype == np.int16
    # The marker sits at RAS x high (patient right) and y high (anterior): DICOM-like images put the
    # patient's right in column 0 and anterior in row 0, so it lands top-left.
    ys, xs = np.nonzero(vol.hu[1] > 500)
    assert ys.max() < 40 and xs.max() < 40
    # Lesion: low x (patient left: image right half), low y (posterior: image bottom half).
    ys, xs = np.nonzero(vol.lesion[2])
    assert xs.min() > 256 and ys.min() > 256
    assert not vol.lesion[[0, 1, 3]].any()
    # Valid boxes from the lung mask; none on slice 0.
    assert vol.valid_boxes[0].tolist() == [-1, -1, -1, -1]
    x0, y0, x1, y1 = vol.valid_boxes[1]
    assert (x1 - x0 + 1, y1 - y0 + 1) == (384, 256)  # 48 (x) by 32 (y) voxels, scaled by 8
    assert float(np.median(vol.hu[2][vol.lesion[2]])) == pytest.approx(-400, abs=2)


def test_nifti_without_lung_masks_cannot_train_valid_area(tmp_path):
    make_nifti_set(tmp_path, n_cases=1)
    for f in (tmp_path / "Lung_Mask").iterdir():
        f.unlink()
    vol = next(datasets.nifti_volumes(tmp_path))
    assert SliceBank("lesion", 64, [vol]).counts()["lesion"] == 1
    with pytest.raises(DataError, match="no usable slices"):
        SliceBank("valid_area", 64, [vol])


def test_nifti_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="no NIfTI volumes"):
        datasets.nifti_cases(tmp_path)
    (tmp_path / "ct_scans").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 2), np.int16), np.eye(4)), str(tmp_path / "ct_scans" / "a.nii"))
    with pytest.raises(DataError, match="no volume has a lesion mask"):
        datasets.nifti_cases(tmp_path)
    with pytest.raises(ValueError, match="nifti:DIR"):
        datasets.parse_source("nifti:")
    with pytest.raises(ValueError, match="no such folder"):
        datasets.parse_source(f"nifti:{tmp_path / 'missing'}")
    with pytest.raises(DataError, match="real-CT data not found"):
        datasets.parse_source(f"real:{tmp_path}")
    with pytest.raises(ValueError, match="each kind of source at most once"):
        datasets.parse_source("phantom+phantom")
    mix = datasets.parse_source(f"phantom+nifti:{tmp_path}")
    assert mix.kind == "mix" and [p.kind for p in mix.parts] == ["phantom", "nifti"]
    assert mix.describe() == f"phantom+nifti:{tmp_path}"
    with pytest.raises(ValueError, match="'nifti:DIR', 'real\\[:DIR\\]' or a '\\+' of them"):
        datasets.parse_source("kaggle")


def _volume(n: int = 6, lesion_on=(2, 3), finding_on=(4,)) -> Volume:
    hu = np.full((n, 512, 512), -1000, np.int16)
    lesion = np.zeros(hu.shape, bool)
    boxes = np.full((n, 4), -1, np.int32)
    for i in range(1, n):
        hu[i, 100:400, 80:430] = -850
        boxes[i] = (80, 100, 429, 399)
    for i in lesion_on:
        lesion[i, 200:240, 150:190] = True
    finding = ["stomach_bubble" if i in finding_on else "" for i in range(n)]
    return Volume("synthetic", hu, lesion, boxes, finding, kind="covid")


def test_bank_targets_and_balanced_sampling():
    bank = SliceBank("lesion", 128, [_volume()])
    assert bank.counts() == {"no_lung": 1, "plain": 2, "lesion": 2, "finding": 1, "finding:stomach_bubble": 1}
    # lesion target pooled to 128: a 40 x 40 px square becomes 10 x 10 ones
    assert bank.target.shape == (6, 1, 128, 128)
    assert float(bank.target[2].sum()) == pytest.approx(100.0)
    hu, tgt = bank.sample(np.random.default_rng(0), 40)
    assert hu.shape == (40, 1, 512, 512) and hu.dtype == np.int16
    assert tgt.shape == (40, 1, 128, 128) and tgt.dtype == np.float32
    # 40 % of draws are lesion slices, 35 % the (single) finding class, 20 % plain, 5 % no lung
    idx = np.random.default_rng(0).choice(len(bank), size=20000, p=bank.weights)
    share = np.bincount(bank.cls[idx], minlength=4) / 20000
    assert share[datasets.CLS_LESION] == pytest.approx(0.40, abs=0.02)
    assert share[datasets.CLS_FINDING] == pytest.approx(0.35, abs=0.02)
    va = SliceBank("valid_area", 128, [_volume()])
    assert float(va.target[0].sum()) == 0.0  # no lung: empty target
    assert float(va.target[1].sum()) == pytest.approx((350 / 4) * (300 / 4), rel=0.02)


def test_phantom_kind_cycle_mixes_every_class():
    kinds = {datasets.phantom_kind(i) for i in range(12)}
    assert kinds == {"covid", "normal", "nodule", "tb", "bronchiectasis", "bacterial", "emphysema"}


def test_phantom_studies_read_from_disk_equal_the_generated_ones(tmp_path):
    """A study written with ``phantom.write_study`` (real DICOM + NIfTI masks) loads back exactly."""
    import phantom
    from phantom.dicomio import write_study

    study = phantom.make_study(seed=3, kind="tb", n_slices=4, matrix=64)
    write_study(study, tmp_path / "s3", shuffle=True, montage=False)
    assert datasets.parse_source(f"phantom:{tmp_path}").kind == "phantom-dir"
    (got,) = list(datasets.phantom_dir_volumes(tmp_path))
    want = datasets.volume_from_study(study)
    assert got.kind == "tb" and got.hu.shape == (4, 512, 512)
    np.testing.assert_array_equal(got.hu, want.hu)
    np.testing.assert_array_equal(got.lesion, want.lesion)
    np.testing.assert_array_equal(got.valid_boxes, want.valid_boxes)
    assert got.finding == want.finding
    # at 64 px the valid boxes are those of the study, scaled by 8
    assert np.all(np.abs(want.valid_boxes[want.valid_boxes[:, 0] >= 0] // 8
                         - study.valid_boxes[study.valid_boxes[:, 0] >= 0]) <= 1)
