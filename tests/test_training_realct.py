"""Real chest CT exported as 8-bit lung-window JPEGs (:mod:`training.realct`) and the training pieces
that consume it (pseudo-label weights, hard-negative mining, a deterministic run).

Known answers come from three places: synthetic histograms and arrays (exact), the phantom (exact lung
masks and boxes; seeds outside 700000-700005, which build the orientation template) and real HU chest
slices from ``../shared/data/dicom-edge-cases`` windowed here with known windows. The bounds on real
slices were measured on the current code and carry a margin; each test says what was measured.
Defects found while writing these tests are strict xfails with the reason, so that a fix shows up as an
XPASS (a failure under ``xfail_strict``) and the marker is then removed.

Tests that need the real data skip, naming the folder, where ``../shared/data`` is absent.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from training import realct
from training.datasets import SliceBank, Volume

ROOT = Path(__file__).resolve().parents[1]
DICOM_DIR = ROOT.parent / "shared" / "data" / "dicom-edge-cases"

CHEST = {
    "nema-ct1": "dwv/nema-ct1_jpll.dcm",
    "toutatix-100": "dwv/osirix-toutatix-100.dcm",
    "toutatix-101": "dwv/osirix-toutatix-101.dcm",
    "toshiba": "pylibjpeg-data/TOSHIBA_J2K_OpenJPEGv2Regression.dcm",
    "goudurix": "dwv/osirix-goudurix.dcm",
}
"""Real HU chest slices (real lungs, no COVID), all in the radiological convention."""
ABDOMEN = "pydicom/explicit_VR-UN.dcm"
"""A real abdomen slice (bowel gas, no lung) with the CT table in view."""
WINDOWS = ((-1350.0, 150.0), (-1250.0, 250.0), (-1500.0, 500.0), (-1000.0, 200.0), (-1200.0, -200.0))
"""Lung windows an exporter might use (lo, hi); the last clips soft tissue white, (-1000, 200) clips air."""


# --- helpers -----------------------------------------------------------------------------------


def _real_root() -> Path:
    try:
        return realct.real_ct_root()
    except realct.DataError:
        pytest.skip(f"real-CT data not found at {realct.DEFAULT_ROOT} (../shared/data/real-ct)")


@lru_cache(maxsize=8)
def _read_hu(rel: str) -> np.ndarray:
    import pydicom

    ds = pydicom.dcmread(DICOM_DIR / rel)
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    hu.setflags(write=False)
    return hu


def _dicom_hu(rel: str) -> np.ndarray:
    if not (DICOM_DIR / rel).is_file():
        pytest.skip(f"real DICOM slice not found: {DICOM_DIR / rel}")
    return _read_hu(rel)


def _crop_to_field(hu: np.ndarray) -> np.ndarray:
    """The lung-field box of a slice, as the JPEG exporter's crop roughly was."""
    x0, y0, x1, y1 = (int(v) for v in realct.field_box(realct.lung_field(hu)))
    assert x0 >= 0, "no lung field on a real chest slice"
    return hu[y0 : y1 + 1, x0 : x1 + 1]


@lru_cache(maxsize=4)
def _study(seed: int):
    import phantom

    assert not 700_000 <= seed <= 700_005, "seeds 700000-700005 build the orientation template"
    return phantom.make_study(seed=seed, kind="normal", n_slices=16, matrix=256)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    if a[0] < 0 or b[0] < 0:
        return 0.0
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    area = lambda q: (q[2] - q[0] + 1) * (q[3] - q[1] + 1)  # noqa: E731
    return float(ix * iy / (area(a) + area(b) - ix * iy))


# --- 1. window estimate ------------------------------------------------------------------------

# air 300 px, parenchyma 3000 px, soft tissue 4000 px (soft tissue the larger mode)
_SYNTH = np.concatenate([np.full(300, -1000.0), np.full(3000, -860.0), np.full(4000, 40.0)])


@pytest.mark.parametrize("lo, hi", WINDOWS + ((-1100.0, 300.0), (-1400.0, 200.0)))
def test_estimate_window_recovers_a_synthetic_window(lo, hi):
    w = realct.estimate_window(realct.apply_window(_SYNTH, realct.Window(lo, hi)))
    tol = 2 * (hi - lo) / 255  # two grey levels: the 8-bit rounding of the landmarks
    assert abs(w.lo - lo) <= tol and abs(w.hi - hi) <= tol, (w, tol)


def test_estimate_window_docstring_example():
    hu = np.concatenate([np.full(300, -1000.0), np.full(4000, -860.0), np.full(3000, 40.0)])
    w = realct.estimate_window(realct.apply_window(hu, realct.Window(-1350.0, 150.0)))
    tol = 1500 / 255  # one grey level: the landmarks land on rounded grey values
    assert abs(w.lo - -1350) <= tol and abs(w.hi - 150) <= tol, w


def test_estimate_window_recovers_hu_on_real_chest_slices():
    """5 real slices x 5 windows, each cropped to its lung field. Measured: MAE over unclipped pixels
    median 75.6 HU, worst 249 HU (TOSHIBA at (-1200, -200)); level within 150 HU on 21/25; width within
    25 % on 22/25. Errors are largest where soft tissue is clipped white or the white spike's smoothed
    shoulder wins the bright-side mode (then the fallback width of 1200 HU is taken)."""
    maes, level_ok, width_ok = [], 0, 0
    for rel in CHEST.values():
        crop = _crop_to_field(_dicom_hu(rel))
        for lo, hi in WINDOWS:
            true = realct.Window(lo, hi)
            img = realct.apply_window(crop, true)
            est = realct.estimate_window(img)
            unclipped = (crop > lo) & (crop < hi)
            maes.append(float(np.abs(realct.to_hu(img, est) - crop)[unclipped].mean()))
            level_ok += abs(est.level - true.level) <= 150
            width_ok += abs(est.width - true.width) <= 0.25 * true.width
    assert len(maes) == 25
    assert np.median(maes) <= 110, np.round(maes)
    assert max(maes) <= 300, np.round(maes)
    assert level_ok >= 20, (level_ok, np.round(maes))
    assert width_ok >= 21, (width_ok, np.round(maes))


# --- 2. orientation ----------------------------------------------------------------------------


@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("flip", [False, True])
def test_inverse_undoes_transform(k, flip):
    a = np.arange(15).reshape(3, 5)
    o = (k, flip)
    assert np.array_equal(realct.transform(realct.transform(a, o), realct.inverse(o)), a)
    assert realct.inverse(realct.inverse(o)) == o


def test_orient_puts_quarter_turned_phantom_volumes_back():
    seed = 4242
    hus = [h.astype(np.float32) for h in _study(seed).hu]
    for o in realct.ORIENTATIONS:
        turned = [np.ascontiguousarray(realct.transform(h, o)) for h in hus]
        got = realct.orient(turned)
        assert got == realct.inverse(o), (seed, o, got)
        for before, after in zip(hus, turned, strict=True):
            assert np.array_equal(realct.transform(after, got), before)


def test_orient_undoes_quarter_turns_of_real_chest_slices():
    """Single slices, whole and cropped to the lung field: measured 24 of 24 put back (goudurix, not
    asserted here, is turned upside down in all 4 cases: the template scores 180 degrees higher)."""
    done, tried = 0, []
    for name in ("nema-ct1", "toutatix-100", "toshiba"):
        hu = _dicom_hu(CHEST[name])
        for view, img in (("whole", hu), ("crop", _crop_to_field(hu))):
            for o in realct.ORIENTATIONS:
                turned = np.ascontiguousarray(realct.transform(img, o))
                ok = np.array_equal(realct.transform(turned, realct.orient([turned])), img)
                done += ok
                tried.append((name, view, o[0], ok))
    assert done == 24, [t for t in tried if not t[3]]


# --- 3. lung fields ----------------------------------------------------------------------------


def test_lung_field_boxes_match_the_phantom_lung_boxes():
    """Measured: median IoU 1.0 (seed 4242) and 0.98 (31337); the first and last lung slices (a few
    hundred pixels of apex or base) are the misses."""
    ious = []
    for seed in (4242, 31337):
        study = _study(seed)
        for hu, lung, box in zip(study.hu, study.lung_mask, study.valid_boxes, strict=True):
            if lung.any():
                ious.append(_iou(realct.field_box(realct.lung_field(hu.astype(np.float32))), box))
    assert len(ious) >= 20
    assert np.median(ious) >= 0.9, np.round(ious, 2)
    assert np.mean(np.asarray(ious) >= 0.9) >= 0.75, np.round(ious, 2)


def test_lung_field_is_empty_below_the_phantom_diaphragm():
    from phantom.findings import FINDING_CODES

    study = _study(31337)
    hu, lung, finding = study.hu[0], study.lung_mask[0], study.finding_mask[0]
    gas = finding == FINDING_CODES["bowel_gas"]
    assert not lung.any() and gas.sum() >= 50, "slice 0 must show bowel gas and no lung"
    field = realct.lung_field(hu.astype(np.float32))
    assert field.mean() < 0.005, field.mean()  # measured 0.0
    assert (field & gas).sum() <= 0.1 * gas.sum(), ((field & gas).sum(), gas.sum())  # measured 0 of 141


@pytest.mark.parametrize(
    "where",
    [
        "real-abdomen",
        pytest.param("phantom-2024", marks=pytest.mark.xfail(strict=True, reason=(
            "known limit: on phantom studies rendered without a field-of-view circle the table's foam "
            "core touches the image edge like a tightly cropped lung, so the body-rim rule cannot drop it "
            "(the phantom's valid areas come from its exact masks, never from lung_field)"))),
    ],
)
def test_lung_field_ignores_the_ct_table(where):
    if where == "real-abdomen":
        hu = _dicom_hu(ABDOMEN)
    else:
        study = _study(2024)
        assert not study.lung_mask[0].any()
        hu = study.hu[0].astype(np.float32)
    assert realct.lung_field(hu).mean() < 0.02


def test_lung_field_keeps_the_crop_edge():
    hu = np.full((100, 120), 30.0)
    hu[10:90, 0:50] = -850  # lungs cropped tight: both touch the image edge
    hu[10:90, 70:120] = -850
    lesion = np.zeros(hu.shape, bool)
    lesion[40:60, 0:20] = True
    field = realct.lung_field(hu, lesion)
    assert not np.any(lesion & ~field)
    assert field[10:90, 0].all() and field[10:90, -1].all()


# --- 4. the 512 grid ---------------------------------------------------------------------------


def test_place_centres_and_scales_a_crop_and_its_masks():
    h, w, s = 200, 300, 1.5
    hu = np.full((h, w), -800.0, np.float32)
    full = np.ones((h, w), bool)
    blob = np.zeros((h, w), bool)
    blob[90:110, 140:160] = True  # 20 x 20 at the crop's centre
    out, (m_full, m_blob) = realct.place(hu, [full, blob], s, seed=3)
    assert out.shape == (512, 512) and out.dtype == np.int16
    assert m_full.shape == (512, 512) and m_full.dtype == bool
    nh, nw = round(h * s), round(w * s)
    y0, x0 = (512 - nh) // 2, (512 - nw) // 2
    assert m_full.sum() == nh * nw
    assert m_full[y0 : y0 + nh, x0 : x0 + nw].all()
    assert np.all(out[m_full] == -800) and not np.any(out[~m_full] == -800)
    assert abs(m_blob.sum() / (blob.sum() * s * s) - 1) < 0.1, m_blob.sum()
    cy, cx = np.argwhere(m_blob).mean(axis=0)
    assert abs(cy - 255.5) <= 1.5 and abs(cx - 255.5) <= 1.5, (cy, cx)
    # a soft-tissue ring right outside the crop, air at the corners beyond it
    ring = out[y0 - 5, 256], out[256, x0 - 5]
    assert all(-40 <= v <= 100 for v in ring), ring
    assert np.all(out[:10, :10] == -1000) and np.all(out[-10:, -10:] == -1000)


def test_place_crops_what_the_scale_pushes_off_the_grid():
    hu = np.zeros((400, 400), np.float32)
    hu[195:205, 195:205] = -900
    out, (m,) = realct.place(hu, [hu < -500], 1.5)
    assert out.shape == (512, 512) and not m.all()
    assert abs(m.sum() / (100 * 1.5**2) - 1) < 0.15
    cy, cx = np.argwhere(m).mean(axis=0)
    assert abs(cy - 255.5) <= 1.5 and abs(cx - 255.5) <= 1.5, (cy, cx)
    assert not np.any(out == -1000)  # the crop fills the whole grid: no air outside


# --- 5. loaders on the real data ---------------------------------------------------------------


@pytest.fixture(scope="module")
def medseg_test() -> Volume:
    _real_root()
    return realct.medseg_volume("test")


def test_medseg_test_volume(medseg_test):
    v = medseg_test
    assert v.hu.shape == (48, 512, 512) and v.hu.dtype == np.int16
    assert v.lesion.shape == v.hu.shape and v.lesion.dtype == bool
    has_lesion = v.lesion.reshape(48, -1).sum(1) > 0
    assert has_lesion.sum() >= 46, has_lesion.sum()  # measured 48 of 48
    lung = v.meta["lung_field"]
    assert (v.valid_boxes[:, 0] >= 0).sum() >= 46  # measured 48
    # lesions are added to the lung field, so the masks line up (measured 0.57 % outside, all of it the
    # rim that lung_field's closing erodes at the crop edge: see test_lung_field_keeps_the_crop_edge)
    outside = (v.lesion & ~lung).sum() / v.lesion.sum()
    assert outside < 0.01, outside
    assert v.meta["label_weight"] == 1.0 and len(v.meta["slices"]) == 48
    assert all("medseg-100/test/" in p for p in v.meta["slices"])
    assert -1050 <= np.median(v.hu[lung]) <= -300  # the lung field is air-dark in HU


def test_pseudo_split_is_disjoint_and_covers_every_volume():
    _real_root()
    parts = {s: realct.pseudo_split(s) for s in ("train", "val", "test")}
    assert all(parts.values())
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not set(parts[a]) & set(parts[b]), (a, b)
    assert sorted(sum(parts.values(), [])) == realct.pseudo_cases()
    assert len(realct.pseudo_cases()) == 16
    with pytest.raises(ValueError):
        realct.pseudo_split("holdout")


def test_real_volumes_train_and_val_share_no_case(monkeypatch):
    """The split logic on the real file listing (pixel decoding and placement stubbed out)."""
    root = _real_root()
    monkeypatch.setattr(realct, "read_gray", lambda p: np.zeros((4, 4), np.uint8))
    monkeypatch.setattr(realct, "read_mask", lambda p, pseudo: np.zeros((4, 4), bool))

    def fake_build(case_id, slices, *, weight, per_slice):
        return SimpleNamespace(case_id=case_id, meta={"slices": [str(s.path) for s in slices],
                                                      "label_weight": weight, "per_slice": per_slice})

    monkeypatch.setattr(realct, "build_volume", fake_build)
    vols = {s: list(realct.real_volumes(s)) for s in ("train", "val")}
    paths = {s: {p for v in vs for p in v.meta["slices"]} for s, vs in vols.items()}
    assert not paths["train"] & paths["val"]
    cases = {s: {v.case_id for v in vs} for s, vs in vols.items()}
    assert cases["train"] & cases["val"] == {"medseg-train"}  # one folder, split by file
    assert {c for c in cases["val"] if c.startswith("pseudo-")} == {f"pseudo-{c}" for c in realct.PSEUDO_SPLIT["val"]}
    for s, vs in vols.items():
        for v in vs:
            medseg = v.case_id.startswith("medseg")
            assert v.meta["label_weight"] == (1.0 if medseg else realct.PSEUDO_WEIGHT)
            assert v.meta["per_slice"] == medseg
        assert not any(c in realct.PSEUDO_SPLIT["test"] for v in vs for c in [v.case_id[len("pseudo-"):]])
        assert not any("medseg-100/test/" in p for p in paths[s])
    stem = {s: {Path(p).stem for p in paths[s] if "medseg-100/train/" in p} for s in paths}
    assert (len(stem["train"]), len(stem["val"])) == (40, 10)
    all_stems = {p.stem for p in (root / "medseg-100" / "train" / "images").iterdir()}
    assert stem["train"] | stem["val"] == all_stems


def test_a_pseudo_volume_keeps_its_slices_in_index_order():
    root = _real_root()
    case = "radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm"  # the smallest volume: 13 slices
    files = sorted((root / "covid-volumes-pseudo" / case / "images").iterdir(), key=lambda p: int(p.stem))
    v = realct.pseudo_volume(case)
    assert v.meta["indices"] == [int(p.stem) for p in files] == sorted(v.meta["indices"])
    assert v.meta["slices"] == [str(p) for p in files]
    assert len(set(v.meta["orientations"])) == 1 and len(set(v.meta["scales"])) == 1
    assert v.meta["label_weight"] == realct.PSEUDO_WEIGHT
    # content follows the order: placed lesion area = file's lesion area x scale^2 (one scale for all)
    raw = np.array([realct.read_mask(p.parent.parent / "masks" / (p.stem + ".png"), True).sum() for p in files])
    placed = v.lesion.reshape(len(files), -1).sum(1)
    s2 = v.meta["scales"][0] ** 2
    big = raw * s2 > 200
    assert big.sum() >= 5
    np.testing.assert_allclose(placed[big], raw[big] * s2, rtol=0.15)
    sub = realct.pseudo_volume(case, max_slices=5)
    assert sub.meta["indices"] == sorted(sub.meta["indices"]) and len(sub.meta["indices"]) == 5


# --- 6. training -------------------------------------------------------------------------------


def _synthetic(case: str, z: int, *, weight: float | None = None, marker: int = -1000, seed: int = 0) -> Volume:
    """A dark lung rectangle in a body, a lesion square on even slices; pixel (0, 0) = ``marker``."""
    rng = np.random.default_rng(seed)
    hu = np.full((z, 512, 512), -1000, np.int16)
    hu[:, 60:460, 40:470] = 30
    lesion = np.zeros(hu.shape, bool)
    lung = np.zeros(hu.shape, bool)
    boxes = np.full((z, 4), -1, np.int32)
    for i in range(z):
        hu[i, 120:380, 80:430] = -850
        lung[i, 120:380, 80:430] = True
        boxes[i] = (80, 120, 429, 379)
        if i % 2 == 0:
            y, x = rng.integers(150, 300, 2)
            lesion[i, y : y + 48, x : x + 48] = True
            hu[i][lesion[i]] = -450
    hu[:, 0, 0] = marker
    meta = {} if weight is None else {"label_weight": weight, "lung_field": lung}
    return Volume(case, hu, lesion, boxes, [""] * z, kind="covid", meta=meta)


def test_slice_bank_returns_the_pseudo_label_weight():
    vols = [_synthetic("radiologist", 4, marker=-1000), _synthetic("pseudo", 4, weight=realct.PSEUDO_WEIGHT,
                                                                    marker=-999, seed=1)]
    bank = SliceBank("lesion", 64, vols)
    rng = np.random.default_rng(0)
    hu, tgt, w = bank.sample(rng, 64, with_weights=True)
    assert w.shape == (64,) and len(hu) == len(tgt) == 64
    pseudo = hu[:, 0, 0, 0] == -999
    assert 0 < pseudo.sum() < 64
    assert np.all(w[pseudo] == realct.PSEUDO_WEIGHT) and np.all(w[~pseudo] == 1.0)
    hu_c, tgt_c, w_c = bank.sample(rng, 8, crop=32, with_weights=True)
    assert hu_c.shape == (8, 1, 256, 256) and tgt_c.shape == (8, 1, 32, 32) and w_c.shape == (8,)
    assert set(np.unique(w_c).tolist()) <= {1.0, realct.PSEUDO_WEIGHT}
    assert len(bank.sample(rng, 4)) == 2  # without with_weights: (hu, target) as before


@pytest.mark.torch
def test_hard_negatives_punish_a_false_positive_blob():
    torch = pytest.importorskip("torch")
    from training.train import bce_dice_loss

    target = torch.zeros(2, 1, 64, 64)
    target[:, :, 20:30, 20:30] = 1
    logits = torch.where(target > 0, torch.tensor(8.0), torch.tensor(-20.0))
    blob = logits.clone()
    blob[0, 0, 45:55, 40:50] = 3.0  # a false-positive blob on background (100 px, > 1 % of 8192)
    plain, hard = bce_dice_loss(blob, target), bce_dice_loss(blob, target, hard_negatives=1.0)
    assert float(hard) > float(plain) + 1.0, (float(plain), float(hard))
    clean, clean_hard = bce_dice_loss(logits, target), bce_dice_loss(logits, target, hard_negatives=1.0)
    assert abs(float(clean_hard) - float(clean)) < 1e-6
    # the per-item weight scales the cross-entropy (the Dice term is unweighted)
    bce = float(torch.nn.functional.binary_cross_entropy_with_logits(blob, target))
    half = bce_dice_loss(blob, target, weight=torch.tensor([0.5, 0.5]))
    assert float(bce_dice_loss(blob, target) - half) == pytest.approx(0.5 * bce, rel=1e-4)
    ones = bce_dice_loss(blob, target, weight=torch.ones(2))
    assert float(ones) == pytest.approx(float(plain), rel=1e-6)


@pytest.mark.torch
def test_a_tiny_training_run_is_deterministic(tmp_path, request):
    torch = pytest.importorskip("torch")
    from training.nets import NetSpec
    from training.train import TrainConfig, train

    threads = torch.get_num_threads()
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    spec = NetSpec("mobilenet_v2", 3, (16, 8, 8), 64)

    def run(seed: int, name: str) -> dict:
        cfg = TrainConfig(task="lesion", steps=3, batch=2, crop=32, val_every=3, progress=False, threads=1,
                          out=tmp_path / name, spec=spec, seed=seed)
        train_vols = [_synthetic("a", 4), _synthetic("p", 4, weight=realct.PSEUDO_WEIGHT, seed=1)]
        return train(cfg, train_volumes=train_vols, val_volumes=[_synthetic("v", 3, seed=5)])["final"]

    first, again, other = run(0, "a"), run(0, "b"), run(1, "c")
    assert first == again
    assert first["step"] == 3 and "val_loss" in first
    assert first != other  # the figures depend on the seed, so equality above means something
