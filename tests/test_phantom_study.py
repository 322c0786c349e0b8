"""phantom.make_study: determinism, truth consistency, findings, HU ranges and geometry.

Small slice counts and matrices keep this fast; every property checked here does not depend on
the matrix size (the anatomy is analytic and scales with the pixel spacing).
"""

from __future__ import annotations

import numpy as np
import pytest

import phantom
from phantom.study import RESCALE_CONVENTIONS, SLICE_SPACINGS, longest_quadrant_run, sample_geometry

SMALL = dict(n_slices=24, matrix=128)
LUNG_FINDINGS = {phantom.FINDING_CODES[k] for k in ("nodule", "tb", "bronchiectasis", "bacterial", "emphysema")}


@pytest.fixture(scope="module")
def studies() -> dict[str, phantom.Study]:
    return {kind: phantom.make_study(21, kind, **SMALL) for kind in phantom.KINDS}


def test_same_seed_gives_identical_bytes_and_different_seeds_differ():
    a = phantom.make_study(7, "covid", n_slices=10, matrix=96)
    b = phantom.make_study(7, "covid", n_slices=10, matrix=96)
    c = phantom.make_study(8, "covid", n_slices=10, matrix=96)
    assert a.hu.tobytes() == b.hu.tobytes()
    assert a.lesion_mask.tobytes() == b.lesion_mask.tobytes()
    assert a.finding_mask.tobytes() == b.finding_mask.tobytes()
    assert a.manifest == b.manifest
    assert a.hu.shape == c.hu.shape and a.hu.tobytes() != c.hu.tobytes()
    assert a.patient != c.patient or a.noise_sigma != c.noise_sigma


def test_same_seed_is_the_same_patient_with_and_without_disease(studies):
    covid, normal = studies["covid"], studies["normal"]
    assert np.array_equal(covid.lung_mask, normal.lung_mask)
    from scipy.ndimage import binary_dilation

    # away from the lungs (the partial-volume blur reaches one pixel) the pixels are identical
    outside = ~binary_dilation(covid.lung_mask, structure=np.ones((1, 5, 5), bool))
    assert np.array_equal(covid.hu[outside], normal.hu[outside])


def test_study_shapes_dtypes_and_labels(studies):
    for kind, s in studies.items():
        z, h, w = s.hu.shape
        assert (z, h, w) == (24, 128, 128)
        assert s.hu.dtype == np.int16
        assert s.lung_mask.dtype == bool and s.lesion_mask.dtype == bool
        assert s.finding_mask.dtype == np.uint8
        assert s.valid_boxes.shape == (z, 4)
        assert s.positions.shape == (z, 3)
        assert s.kind == kind and s.label == int(kind == "covid")


def test_truth_masks_are_consistent(studies):
    from scipy.ndimage import binary_erosion

    for kind, s in studies.items():
        assert not (s.lesion_mask & ~s.lung_mask).any(), kind
        lung_findings = np.isin(s.finding_mask, list(LUNG_FINDINGS))
        assert not (lung_findings & ~s.lung_mask).any(), kind
        bubble = s.finding_mask == phantom.FINDING_CODES["stomach_bubble"]
        assert bubble.any(), f"{kind}: no stomach bubble"
        assert not (bubble & s.lung_mask).any()
        # the bubble is below the lungs' top and in the lower half of the study
        ks = np.flatnonzero(bubble.any(axis=(1, 2)))
        assert ks.max() < s.hu.shape[0] // 2
        core = binary_erosion(bubble, structure=np.ones((1, 3, 3), bool))
        assert np.median(s.hu[core]) < -900
        if kind == "covid":
            assert s.lesion_mask.any()
        else:
            assert not s.lesion_mask.any(), kind


def test_valid_boxes_are_the_lung_bounding_boxes(studies):
    s = studies["covid"]
    for k in range(s.hu.shape[0]):
        box = s.valid_boxes[k]
        m = s.lung_mask[k]
        if not m.any():
            assert (box == -1).all()
            continue
        rows, cols = np.nonzero(m)
        assert tuple(box) == (cols.min(), rows.min(), cols.max(), rows.max())
    assert (s.valid_boxes[:, 0] >= 0).sum() > s.hu.shape[0] // 2


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_covid_lesions_are_large_bilateral_and_span_consecutive_slices(seed):
    s = phantom.make_study(seed, "covid", n_slices=40, matrix=512 // 2)
    m = s.manifest
    assert m["longest_quadrant_run"] >= 3
    assert len(m["lesion_slices"]) >= 5
    # at the 512 grid most lesion slices hold > 25 px (here 256: > 25 / 4 px)
    assert np.mean(np.array(m["lesion_area_px"]) > 25 / 4) > 0.8
    sides = {f["side"] for f in s.findings}
    assert sides == {"left", "right"}
    # peripheral: lesions are on average nearer the outer edge of the lung box than its centre
    ks = m["lesion_slices"]
    for k in ks[len(ks) // 2: len(ks) // 2 + 1]:
        x0, y0, x1, y1 = s.valid_boxes[k]
        _, cols = np.nonzero(s.lesion_mask[k])
        centre = (x0 + x1) / 2
        assert np.mean(np.abs(cols - centre)) > 0.35 * (x1 - x0) / 2


@pytest.mark.parametrize("kind", [k for k in phantom.KINDS if k not in ("covid", "normal")])
def test_hard_negative_finding_spans_several_slices(studies, kind):
    s = studies[kind]
    code = phantom.FINDING_CODES[kind]
    slices = np.flatnonzero((s.finding_mask == code).any(axis=(1, 2)))
    assert slices.size >= 3, (kind, slices)


def test_normal_study_has_no_lung_finding(studies):
    s = studies["normal"]
    assert not np.isin(s.finding_mask, list(LUNG_FINDINGS)).any()


@pytest.mark.parametrize(
    ("kind", "code", "key"),
    [("nodule", 1, "nodule"), ("bacterial", 4, "bacterial"), ("emphysema", 5, "emphysema"),
     ("normal", 6, "stomach_bubble")],
)
def test_finding_hu_in_range(studies, kind, code, key):
    s = studies[kind]
    lo, hi = phantom.HU_RANGES[key]
    from scipy.ndimage import binary_erosion

    # the core of the finding: one pixel in from its edge (partial-volume blur)
    core = binary_erosion(s.finding_mask == code, structure=np.ones((1, 3, 3), bool))
    values = s.hu[core]
    assert values.size > 20
    assert lo <= np.median(values) <= hi


def test_ggo_hu_in_range():
    s = phantom.make_study(5, "covid", n_slices=30, matrix=128, stage="early")
    lo, hi = phantom.HU_RANGES["ggo"]
    values = s.hu[s.lesion_mask]
    assert lo <= np.median(values) <= hi
    # ground glass: denser than the lung around it, far less dense than soft tissue
    lung_only = s.hu[s.lung_mask & ~s.lesion_mask]
    assert np.median(values) > np.median(lung_only) + 100


def test_consolidation_is_dense():
    s = phantom.make_study(6, "covid", n_slices=30, matrix=128, stage="peak")
    assert any(f["subtype"] == "consolidation" for f in s.findings)
    assert (s.hu[s.lesion_mask] > -100).sum() > 50


def test_positions_advance_along_the_normal_by_the_spacing(studies):
    for s in studies.values():
        normal = np.cross(s.orientation[:3], s.orientation[3:])
        along = s.positions @ normal
        assert np.allclose(np.diff(along), s.slice_spacing, atol=1e-3)
        assert np.ptp(s.positions[:, 0]) == 0 and np.ptp(s.positions[:, 1]) == 0
        assert s.slice_spacing in SLICE_SPACINGS


def test_a_slice_shows_its_stated_thickness_whatever_the_slice_count():
    # 16 and 48 slices, both 5 mm thick: slice k of the 16 sits at the anatomical level of slice 3k + 1 of
    # the 48, so the two images are the same 5 mm of the same patient. The z-scaling that fits the chest
    # into n_slices moves where the slices sit; it must not thicken them: 16 x 5 mm once rendered slabs of
    # 18-22 mm of anatomy (the whole chest / 80 mm) under SliceThickness 5, and the lesion net boxed them
    short = phantom.make_study(1, "normal", n_slices=16, matrix=128, noise=0.0)
    fine = phantom.make_study(1, "normal", n_slices=48, matrix=128, noise=0.0)
    assert short.slice_thickness == fine.slice_thickness == 5.0
    for k in (5, 7, 9):
        assert np.array_equal(short.lung_mask[k], fine.lung_mask[3 * k + 1])
        assert np.array_equal(short.hu[k], fine.hu[3 * k + 1]), k


def test_geometry_variation_across_seeds():
    from phantom.anatomy import sample_patient

    seen = {"shapes": set(), "spacing": set(), "rescale": set()}
    for seed in range(300):
        rng_a, rng_g = (np.random.default_rng(c) for c in np.random.SeedSequence(seed).spawn(2))
        g = sample_geometry(sample_patient(rng_a), rng_g, None, None, {})
        assert 0.55 <= g["ps"] <= 0.9
        assert 60 <= g["n"] <= 600
        assert g["thickness"] >= g["spacing"]
        seen["shapes"].add(g["shape"])
        seen["spacing"].add(g["spacing"])
        seen["rescale"].add((g["intercept"], g["pixel_representation"]))
    assert (512, 512) in seen["shapes"] and (768, 768) in seen["shapes"]
    assert any(c != r for r, c in seen["shapes"])
    assert seen["spacing"] == set(SLICE_SPACINGS)
    assert seen["rescale"] == set(RESCALE_CONVENTIONS)


def test_hu_respects_the_rescale_convention():
    s = phantom.make_study(3, "normal", n_slices=6, matrix=96, rescale_intercept=-1000, pixel_representation=0,
                           circle=True)
    assert s.hu.min() >= -1000
    s = phantom.make_study(3, "normal", n_slices=6, matrix=96, rescale_intercept=0, pixel_representation=1,
                           circle=True)
    assert s.padding_hu in (-2000, -3024) and s.hu.min() == s.padding_hu


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        (dict(seed=-1), ValueError),
        (dict(seed=1, kind="flu"), ValueError),
        (dict(seed=1, n_slices=0), ValueError),
        (dict(seed=1, matrix=8), ValueError),
        (dict(seed=1, colour="red"), TypeError),
        (dict(seed=1, stage="late"), ValueError),
        (dict(seed=1, shape=(512,)), ValueError),
    ],
)
def test_bad_arguments_are_named(kwargs, error):
    with pytest.raises(error) as exc:
        phantom.make_study(**kwargs)
    name = next(iter(k for k in kwargs if k != "seed"), "seed")
    assert name in str(exc.value)


def test_longest_quadrant_run():
    assert longest_quadrant_run({}) == 0
    assert longest_quadrant_run({"3": [0], "4": [0, 1], "5": [1], "7": [1]}) == 2
    assert longest_quadrant_run({"1": [2], "2": [2], "3": [2], "9": [3]}) == 3


def test_package_doctest():
    import doctest

    result = doctest.testmod(phantom, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 2 and result.failed == 0
