"""The case rule: table tests at every boundary, and hypothesis properties.

Pure-library tests: the inputs are the arrays the serving path returns (boxes and valid-area boxes
on the 512 grid), so no model or Triton is involved.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.case import CaseRule, SliceInput, decide, quadrants_of, replay, to_original_grid
from aggregator.schema import CaseResult
from ctscreen.contracts import EMPTY_BOX, PADDING_ROW
from ctscreen.postprocess import postprocess_batch, unpack_boxes

VA = np.array([100, 100, 400, 400], np.float32)  # valid area, split point (250, 250)
BOX = {
    "top_left": (150, 150, 170, 170),
    "top_right": (330, 150, 350, 170),
    "bottom_left": (150, 330, 170, 350),
    "bottom_right": (330, 330, 350, 350),
}
NONE = np.zeros((0, 5), np.float32)


def boxes(*quadrants: str, score: float = 0.9) -> np.ndarray:
    if not quadrants:
        return NONE
    return np.array([[*BOX[q], score] for q in quadrants], np.float32)


def series(lesions: dict[int, tuple[str, ...]], n: int, spacing: float = 5.0, skip=(), valid=VA):
    """n slices at spacing mm (indices in ``skip`` missing), lesions by slice index."""
    return [
        SliceInput(f"1.2.840.1.{i}", spacing * i, boxes(*lesions.get(i, ())), valid)
        for i in range(n)
        if i not in skip
    ]


TL = ("top_left",)


# ---- run length ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("lesions", "verdict", "reason"),
    [
        ({}, "negative", "no_findings"),
        ({4: TL}, "negative", "no_run"),
        ({4: TL, 5: TL}, "negative", "no_run"),
        ({4: TL, 5: TL, 6: TL}, "positive", "run_found"),
        ({0: TL, 1: TL, 2: TL}, "positive", "run_found"),  # at the very start
        ({7: TL, 8: TL, 9: TL}, "positive", "run_found"),  # at the very end
        ({4: TL, 6: TL, 8: TL}, "negative", "no_run"),  # not consecutive
        ({4: TL, 5: ("top_right",), 6: TL}, "negative", "no_run"),  # quadrant changes
        ({4: TL, 5: ("top_left", "bottom_right"), 6: TL}, "positive", "run_found"),
        ({4: ("bottom_right",), 5: ("bottom_right",), 6: ("bottom_right",)}, "positive", "run_found"),
    ],
)
def test_run_length_table(lesions, verdict, reason):
    d = decide(series(lesions, 10))
    assert (d.verdict, d.reason) == (verdict, reason)


def test_a_single_slice_is_said_as_one_slice():
    """The reader's page read "Longest run: 1 consecutive slices" (the web review)."""
    one = decide(series({4: TL}, 10))
    assert "Longest run: 1 slice (" in one.message and "1 consecutive slices" not in one.message, one.message
    assert "Longest run: 2 consecutive slices (" in decide(series({4: TL, 5: TL}, 10)).message


def test_exactly_two_negative_three_positive_in_every_quadrant():
    for q in BOX:
        assert decide(series({3: (q,), 4: (q,)}, 10)).verdict == "negative"
        d = decide(series({3: (q,), 4: (q,), 5: (q,)}, 10))
        assert d.verdict == "positive"
        assert d.evidence.quadrant == q and d.evidence.qualifies
        assert [s.index for s in d.evidence.slices] == [3, 4, 5]


def test_run_slices_parameter_moves_the_boundary():
    two = series({3: TL, 4: TL}, 10)
    assert decide(two, CaseRule(run_slices=2)).verdict == "positive"
    assert decide(series({3: TL, 4: TL, 5: TL}, 10), CaseRule(run_slices=4)).verdict == "negative"


def test_negative_case_still_reports_its_longest_run():
    d = decide(series({1: TL, 5: ("bottom_right",), 6: ("bottom_right",)}, 10))
    assert d.verdict == "negative"
    assert d.evidence.quadrant == "bottom_right" and d.evidence.n_slices == 2
    assert not d.evidence.qualifies
    assert d.evidence.extent_mm == pytest.approx(10.0)


# ---- order --------------------------------------------------------------------------------------
def test_order_is_by_position_not_by_input_order():
    s = series({3: TL, 4: TL, 5: TL}, 10)
    reordered = [s[i] for i in (5, 0, 9, 3, 1, 8, 4, 2, 7, 6)]
    a, b = decide(s), decide(reordered)
    assert a.verdict == b.verdict == "positive"
    assert a.slices == b.slices and a.evidence == b.evidence


def test_descending_and_negative_positions_are_sorted():
    s = [SliceInput(f"u{i}", -2.5 * i, boxes(*(TL if i in (2, 3, 4) else ())), VA) for i in range(8)]
    d = decide(s)
    assert d.verdict == "positive"
    assert [f.position_mm for f in d.slices] == sorted(f.position_mm for f in d.slices)


# ---- gaps ---------------------------------------------------------------------------------------
def test_gap_breaks_a_run_and_makes_the_case_indeterminate():
    # slices at 0..45 mm, slice 5 missing: lesions on 3, 4 | gap | 6 -> three lesion slices, broken
    d = decide(series({3: TL, 4: TL, 6: TL}, 10, skip={5}))
    assert (d.verdict, d.reason) == ("indeterminate", "run_broken_by_gap")
    assert len(d.gaps) == 1 and d.gaps[0].distance_mm == pytest.approx(10.0)
    assert d.gaps[0].expected_mm == pytest.approx(5.0)
    assert d.warnings and "gap" in d.warnings[0]


def test_gap_elsewhere_does_not_hide_a_run():
    d = decide(series({1: TL, 2: TL, 3: TL}, 10, skip={6}))
    assert d.verdict == "positive" and len(d.gaps) == 1


def test_gap_with_no_broken_run_is_still_negative():
    d = decide(series({1: TL, 7: TL}, 10, skip={5}))
    assert (d.verdict, d.reason) == ("negative", "no_run")


@pytest.mark.parametrize(("distance", "is_gap"), [(7.4, False), (7.5, False), (7.6, True), (10.0, True)])
def test_gap_tolerance_boundary(distance, is_gap):
    # nominal 5 mm (median), tolerance 1.5 -> a neighbour distance > 7.5 mm is a gap
    pos = [0, 5, 10, 15, 15 + distance, 20 + distance, 25 + distance]
    s = [SliceInput(f"u{i}", p, boxes(*TL) if i in (2, 3, 4) else NONE, VA) for i, p in enumerate(pos)]
    d = decide(s)
    assert bool(d.gaps) is is_gap
    assert d.verdict == ("indeterminate" if is_gap else "positive")


def test_explicit_spacing_overrides_the_median():
    s = series({0: TL, 1: TL, 2: TL}, 6)  # 5 mm apart
    assert decide(s).verdict == "positive"
    d = decide(s, spacing_mm=2.5)  # every neighbour is now two slices apart
    assert d.reason == "run_broken_by_gap" and len(d.gaps) == 5
    assert d.nominal_spacing_mm == 2.5


# ---- too few slices, empty valid area -----------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 2])
def test_too_few_slices_is_indeterminate_never_negative(n):
    d = decide(series({}, n))
    assert (d.verdict, d.reason) == ("indeterminate", "too_few_slices")


def test_segments_all_too_short_is_indeterminate():
    d = decide(series({}, 8, skip={2, 5}))  # 0 1 | 3 4 | 6 7
    assert (d.verdict, d.reason) == ("indeterminate", "too_few_slices")


def test_two_slices_of_lesion_in_a_two_slice_series_is_indeterminate():
    assert decide(series({0: TL, 1: TL}, 2)).verdict == "indeterminate"


def test_empty_valid_area_everywhere_is_indeterminate_with_no_findings():
    s = series({i: TL for i in range(6)}, 6, valid=np.array(EMPTY_BOX, np.float32))
    for rule in (CaseRule(), CaseRule(drop_outside_valid=False)):
        d = decide(s, rule)
        assert (d.verdict, d.reason) == ("indeterminate", "no_valid_area")
        assert all(f.boxes == [] and f.valid_area is None for f in d.slices)
        assert all(f.n_dropped == 1 for f in d.slices)
        assert d.evidence is None


def test_empty_valid_area_on_one_slice_breaks_the_run_there_and_is_never_silently_negative():
    """Slice 5's valid area missed: 3 4 | 6 7. It was a silent negative; a run of four that only a slice
    without a valid area breaks is indeterminate now, its evidence the run the message names."""
    s = series({3: TL, 4: TL, 5: TL, 6: TL, 7: TL}, 10)
    s[5] = SliceInput(s[5].sop_instance_uid, s[5].position_mm, boxes(*TL), np.array(EMPTY_BOX))
    d = decide(s)
    assert d.slices[5].boxes == [] and d.slices[5].quadrants == []
    assert (d.verdict, d.reason) == ("indeterminate", "run_broken_by_gap") and "no valid area" in d.message
    assert [e.index for e in d.evidence.slices] == [3, 4, 6, 7] and not d.evidence.qualifies
    assert decide(s, CaseRule(run_slices=2)).verdict == "positive"
    # the slice without a valid area is unknown, not lesion-free: with it, 5 would do; 6 would not either way
    assert (decide(s, CaseRule(run_slices=5)).reason) == "run_broken_by_gap"
    assert decide(s, CaseRule(run_slices=6)).verdict == "negative"
    apex = series({3: TL, 4: TL}, 10)  # no valid area on the first slices, above the lungs: nothing broken
    for i in (0, 1):
        apex[i] = SliceInput(apex[i].sop_instance_uid, apex[i].position_mm, boxes(), np.array(EMPTY_BOX))
    assert decide(apex).verdict == "negative"


def test_a_run_broken_by_a_gap_shows_the_broken_run_as_its_evidence():
    """The evidence was the best run inside the gap-free segments (two bottom-right slices), not the three
    top-left ones the message named: the key images sent the reader to the wrong slices."""
    positions = [0, 5, 10, 15, 20, 25, 30, 40, 45, 50]
    tl, br = boxes("top_left"), boxes("bottom_right")
    s = [SliceInput(f"1.3.{i}", float(p), br if p in (5, 10) else tl if p in (25, 30, 40) else boxes(), VA)
         for i, p in enumerate(positions)]
    d = decide(s)
    assert (d.verdict, d.reason) == ("indeterminate", "run_broken_by_gap") and "right anterior quadrant" in d.message  # top_left
    assert d.evidence.quadrant == "top_left" and [e.position_mm for e in d.evidence.slices] == [25.0, 30.0, 40.0]
    assert not d.evidence.qualifies


# ---- filters ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("row", "kept"),
    [
        ((150, 150, 154, 154, 0.9), False),  # 5 x 5 = 25 pixels: not > 25
        ((150, 150, 151, 162, 0.9), True),  # 2 x 13 = 26 pixels
        ((150, 150, 150, 175, 0.9), True),  # 1 x 26 = 26 pixels
        ((150, 150, 170, 170, 0.5), True),  # score == cutoff counts
        ((150, 150, 170, 170, 0.4999), False),
        ((50, 150, 70, 170, 0.9), False),  # centre (60, 160) left of the valid area
        ((90, 150, 112, 170, 0.9), True),  # centre (101, 160) inside, box pokes out
        ((90, 150, 110, 170, 0.9), True),  # centre exactly on the valid-area edge (inclusive)
    ],
)
def test_box_filters(row, kept):
    s = series({}, 5)
    s[2] = SliceInput("x", s[2].position_mm, np.array([row], np.float32), VA)
    f = decide(s).slices[2]
    assert (len(f.boxes) == 1) is kept
    assert f.n_dropped == (0 if kept else 1)


def test_drop_outside_valid_can_be_switched_off():
    s = series({}, 5)
    s[2] = SliceInput("x", s[2].position_mm, np.array([[50, 150, 70, 170, 0.9]], np.float32), VA)
    assert decide(s, CaseRule(drop_outside_valid=False)).slices[2].quadrants == ["top_left"]


def test_higher_cutoff_and_min_area_refilter():
    s = series({i: TL for i in range(5)}, 5)
    assert decide(s, CaseRule(cutoff=0.95)).reason == "no_findings"
    assert decide(s, CaseRule(min_area=21 * 21)).reason == "no_findings"
    assert decide(s, CaseRule(min_area=21 * 21 - 1)).verdict == "positive"


def test_padding_rows_are_ignored():
    padded = np.array([[*BOX["top_left"], 0.9], PADDING_ROW, PADDING_ROW], np.float32)
    s = SliceInput("x", 0.0, padded, VA)
    assert s.boxes.shape == (1, 5)


def test_refilter_is_idempotent_with_triton_postprocessing():
    """Boxes from ctscreen.postprocess (what Triton returns) all survive the default rule."""
    rng = np.random.default_rng(0)
    valid = np.zeros((4, 1, 512, 512), np.float32)
    valid[:, :, 80:420, 60:460] = 0.9
    lesion = rng.random((4, 1, 512, 512)).astype(np.float32) * 0.45
    lesion[:, :, 150:170, 150:175] = 0.8
    lesion[:, :, 300:302, 300:302] = 0.9  # 4 pixels: Triton drops it
    lesion[:, :, 10:40, 10:40] = 0.9  # outside the valid area: Triton drops it
    hu = np.full((4, 1, 512, 512), -1000, np.int16)  # air around a body (40 HU) with lung (-850 HU)
    hu[:, :, 60:460, 40:480] = 40
    hu[:, :, 80:420, 60:460] = -850
    out, counts, va = postprocess_batch(valid, lesion, hu)
    s = [SliceInput(f"u{i}", float(i), b, v) for i, (b, v) in enumerate(zip(unpack_boxes(out, counts), va, strict=True))]
    d = decide(s)
    assert d.verdict == "positive"
    assert all(f.n_dropped == 0 and len(f.boxes) == 1 for f in d.slices)


# ---- quadrants ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("box", "spanning", "expected"),
    [
        ((240, 150, 249, 170), "every", ["top_left"]),
        ((240, 150, 250, 170), "every", ["top_left", "top_right"]),  # touches the line x = 250
        ((251, 150, 260, 170), "every", ["top_right"]),
        ((240, 150, 262, 170), "every", ["top_left", "top_right"]),
        ((240, 150, 262, 170), "centre", ["top_right"]),  # centre 251
        ((240, 150, 260, 170), "centre", ["top_left", "top_right"]),  # centre exactly on the line
        ((240, 240, 262, 262), "every", ["top_left", "top_right", "bottom_left", "bottom_right"]),
        ((240, 240, 262, 262), "centre", ["bottom_right"]),
    ],
)
def test_box_on_a_quadrant_border(box, spanning, expected):
    assert quadrants_of(box, (250.0, 250.0), spanning) == expected
    s = series({}, 5)
    s[2] = SliceInput("x", s[2].position_mm, np.array([[*box, 0.9]], np.float32), VA)
    assert decide(s, CaseRule(spanning=spanning)).slices[2].quadrants == expected


def test_spanning_box_joins_runs_on_both_sides_only_with_every():
    """Lesion drifting across the split line: left, straddling, right-and-left."""
    straddle = np.array([[240, 150, 262, 170, 0.9]], np.float32)  # centre right of x = 250
    s = series({3: TL, 5: TL}, 10)
    s[4] = SliceInput(s[4].sop_instance_uid, s[4].position_mm, straddle, VA)
    assert decide(s, CaseRule(spanning="every")).verdict == "positive"
    assert decide(s, CaseRule(spanning="centre")).verdict == "negative"


def test_quadrants_split_at_the_valid_area_or_the_image_centre():
    off_centre = np.array([0, 0, 300, 300], np.float32)  # patient lying left and high: split (150, 150)
    row = np.array([[200, 50, 220, 70, 0.9]], np.float32)
    s = [SliceInput(f"u{i}", float(i), row, off_centre) for i in range(3)]
    assert decide(s).evidence.quadrant == "top_right"
    assert decide(s, CaseRule(quadrant_split="image")).evidence.quadrant == "top_left"


# ---- run in millimetres -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spacing", "run_lesions", "n", "rule", "verdict"),
    [
        (5.0, 3, 10, CaseRule(run_mm=15.0), "positive"),  # 3 x 5 mm = 15 mm exactly
        (5.0, 3, 10, CaseRule(run_mm=15.1), "negative"),
        (5.0, 4, 10, CaseRule(run_mm=15.1), "positive"),
        (0.625, 3, 40, CaseRule(run_mm=10.0), "negative"),  # 1.875 mm
        (0.625, 16, 40, CaseRule(run_mm=10.0), "positive"),  # 16 x 0.625 = 10 mm
        (0.625, 15, 40, CaseRule(run_mm=10.0), "negative"),
        (5.0, 2, 10, CaseRule(run_slices=1, run_mm=10.0), "positive"),  # mm only
        (5.0, 2, 10, CaseRule(run_mm=10.0), "negative"),  # slices still need 3
        (0.625, 3, 10, CaseRule(run_mm=10.0), "indeterminate"),  # series covers 6.25 mm only
    ],
)
def test_run_mm_variants(spacing, run_lesions, n, rule, verdict):
    d = decide(series({i: TL for i in range(2, 2 + run_lesions)}, n, spacing=spacing), rule)
    assert d.verdict == verdict
    if verdict == "indeterminate":
        assert d.reason == "too_few_slices"


# ---- results and errors -------------------------------------------------------------------------
def test_every_parameter_is_recorded_and_reproducible():
    rule = CaseRule(cutoff=0.6, min_area=30, run_slices=4, run_mm=12.5, quadrant_split="image",
                    spanning="centre", gap_tolerance=2.0, drop_outside_valid=False, min_lung_field_cm2=80.0,
                    min_body_cm2=250.0)
    result = decide(series({}, 6), rule).to_result(study_instance_uid="1.2", series_instance_uid="1.2.3")
    assert result.rule.model_dump() == {
        "cutoff": 0.6, "min_area": 30, "run_slices": 4, "run_mm": 12.5, "quadrant_split": "image",
        "spanning": "centre", "gap_tolerance": 2.0, "drop_outside_valid": False, "min_lung_field_cm2": 80.0,
        "min_body_cm2": 250.0,
    }
    assert CaseRule.from_params(result.rule) == rule


# ---- a chest at all (docs/case-rule.md, 8) ------------------------------------------------------
@pytest.mark.parametrize(
    ("lung_field_cm2", "body_cm2", "rule", "verdict", "reason"),
    [
        (12.0, 200.0, CaseRule(), "indeterminate", "not_chest"),  # a head's sinuses: its run of boxes is no lesion
        (49.9, 299.9, CaseRule(), "indeterminate", "not_chest"),
        (50.0, 200.0, CaseRule(), "positive", "run_found"),  # lungs at the limit: a chest (a child's)
        (12.0, 300.0, CaseRule(), "positive", "run_found"),  # a chest's size: lungs filled by disease
        (250.0, 700.0, CaseRule(), "positive", "run_found"),
        (None, None, CaseRule(), "positive", "run_found"),  # not measured (no pixel spacing): not checked
        (12.0, None, CaseRule(), "positive", "run_found"),  # the body unknown: not a head for sure
        (12.0, None, CaseRule(min_body_cm2=None), "indeterminate", "not_chest"),  # the lung field alone decides
        (12.0, 200.0, CaseRule(min_lung_field_cm2=None), "positive", "run_found"),  # the check off (the paper's rule)
        (12.0, 200.0, CaseRule(min_lung_field_cm2=5.0), "positive", "run_found"),
    ],
)
def test_a_series_smaller_than_a_chest_is_indeterminate_whatever_its_boxes(lung_field_cm2, body_cm2, rule, verdict,
                                                                           reason):
    d = decide(series({2: TL, 3: TL, 4: TL}, 8), rule, lung_field_cm2=lung_field_cm2, body_cm2=body_cm2)
    assert (d.verdict, d.reason) == (verdict, reason)
    result = d.to_result(study_instance_uid="1.2", series_instance_uid="1.2.3")
    assert (result.lung_field_cm2, result.body_cm2) == (lung_field_cm2, body_cm2)  # recorded
    assert replay(result).reason == reason and result.shows_lesions == (reason != "not_chest")  # reproducible
    if reason == "not_chest":
        assert f"{lung_field_cm2:.0f} cm²" in d.message and "not a chest CT" in d.message
        assert d.evidence is not None and d.evidence.qualifies  # the boxes stay in the result for a reader


def test_a_result_made_before_the_chest_check_replays_unchecked():
    """Results of schema 1.1 record neither the measure nor the limit: replayed, they decide as they did."""
    result = decide(series({2: TL, 3: TL, 4: TL}, 8)).to_result(study_instance_uid="1.2", series_instance_uid="1.2.3")
    old = result.model_dump(mode="json")
    for name in ("min_lung_field_cm2", "min_body_cm2"):
        old["rule"].pop(name)
    for name in ("lung_field_cm2", "body_cm2"):
        old.pop(name)
    again = CaseResult.model_validate(old)
    assert again.rule.min_lung_field_cm2 is None and replay(again).verdict == "positive"


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["min_lung_field_cm2", "min_body_cm2"])
def test_the_chest_limits_must_be_positive(name, bad):
    with pytest.raises(ValueError, match=name):
        CaseRule(**{name: bad})


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["lung_field_cm2", "body_cm2"])
def test_a_measured_section_must_be_a_size(name, bad):
    with pytest.raises(ValueError, match=name):
        decide(series({}, 4), **{name: bad})


def test_boxes_are_mapped_back_to_the_original_grid():
    s = [SliceInput(f"u{i}", float(i), boxes(*TL), VA, rows=768, cols=768) for i in range(3)]
    f = decide(s).slices[0]
    assert f.boxes[0].grid.model_dump() == {"x0": 150, "y0": 150, "x1": 170, "y1": 170}
    assert f.boxes[0].original.model_dump() == {"x0": 225, "y0": 225, "x1": 256, "y1": 256}
    assert f.valid_area_original.model_dump() == {"x0": 150, "y0": 150, "x1": 601, "y1": 601}
    assert to_original_grid((0, 0, 511, 255), rows=256, cols=1024).model_dump() == {"x0": 0, "y0": 0, "x1": 1023, "y1": 127}


def test_non_square_images_need_the_ingest_mapping():
    """A non-square image is padded by ingest; only its own mapping knows how (here: shift by 10)."""
    plain = decide([SliceInput(f"u{i}", float(i), boxes(*TL), VA, rows=512, cols=400) for i in range(3)])
    assert plain.slices[0].boxes[0].original is None

    def shift(b):
        return b - 10.0

    mapped = decide([SliceInput(f"u{i}", float(i), boxes(*TL), VA, rows=512, cols=400, to_original=shift)
                     for i in range(3)])
    assert mapped.slices[0].boxes[0].original.model_dump() == {"x0": 140, "y0": 140, "x1": 160, "y1": 160}
    assert mapped.slices[0].valid_area_original.model_dump() == {"x0": 90, "y0": 90, "x1": 390, "y1": 390}
    assert to_original_grid((511, 511, 511, 511), 100, 100).model_dump() == {"x0": 99, "y0": 99, "x1": 99, "y1": 99}


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"cutoff": 1.5}, "cutoff"),
        ({"min_area": -1}, "min_area"),
        ({"min_area": 2.5}, "min_area"),
        ({"run_slices": 0}, "run_slices"),
        ({"run_mm": 0.0}, "run_mm"),
        ({"run_mm": float("nan")}, "run_mm"),
        ({"quadrant_split": "middle"}, "quadrant_split"),
        ({"spanning": "some"}, "spanning"),
        ({"gap_tolerance": 1.0}, "gap_tolerance"),
    ],
)
def test_bad_rule_parameters_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=f'"{argument}"'):
        CaseRule(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"boxes": np.zeros((2, 4))}, "boxes"),
        ({"boxes": np.array([[5, 5, 1, 1, 0.9]])}, "boxes"),
        ({"boxes": np.array([[np.nan, 5, 1, 1, 0.9]])}, "boxes"),
        ({"valid_area": np.zeros(3)}, "valid_area"),
        ({"position_mm": float("inf")}, "position_mm"),
        ({"sop_instance_uid": ""}, "sop_instance_uid"),
        ({"rows": 0}, "rows"),
    ],
)
def test_bad_slice_input_names_the_argument(kwargs, argument):
    base = {"sop_instance_uid": "u", "position_mm": 0.0, "boxes": NONE, "valid_area": VA}
    with pytest.raises(ValueError, match=f'"{argument}"'):
        SliceInput(**{**base, **kwargs})


def test_duplicate_uid_or_position_is_an_error():
    a = SliceInput("u1", 0.0, NONE, VA)
    with pytest.raises(ValueError, match="more than once"):
        decide([a, SliceInput("u1", 5.0, NONE, VA), SliceInput("u3", 10.0, NONE, VA)])
    with pytest.raises(ValueError, match="two slices at position"):
        decide([a, SliceInput("u2", 0.0, NONE, VA), SliceInput("u3", 10.0, NONE, VA)])
    with pytest.raises(ValueError, match='"spacing_mm"'):
        decide([a], spacing_mm=0)


# ---- properties ---------------------------------------------------------------------------------
quadrant_sets = st.lists(st.sampled_from(list(BOX)), max_size=2, unique=True)


@st.composite
def studies(draw, max_slices: int = 14):
    n = draw(st.integers(0, max_slices))
    spacing = draw(st.sampled_from([0.625, 1.25, 2.5, 5.0]))
    skip = draw(st.sets(st.integers(0, max(0, n - 1)), max_size=2)) if n > 3 else set()
    lesions = {i: tuple(draw(quadrant_sets)) for i in range(n)}
    return series(lesions, n, spacing=spacing, skip=skip)


rules = st.builds(
    CaseRule,
    run_slices=st.integers(1, 4),
    run_mm=st.none() | st.sampled_from([2.0, 5.0, 10.0]),
    quadrant_split=st.sampled_from(["valid_area", "image"]),
    spanning=st.sampled_from(["every", "centre"]),
)


@settings(max_examples=150, deadline=None)
@given(studies(), rules, st.randoms(use_true_random=False))
def test_property_verdict_does_not_depend_on_input_order(slices, rule, rnd):
    shuffled = list(slices)
    rnd.shuffle(shuffled)
    a, b = decide(slices, rule), decide(shuffled, rule)
    assert (a.verdict, a.reason, a.evidence, a.slices) == (b.verdict, b.reason, b.evidence, b.slices)


@settings(max_examples=150, deadline=None)
@given(studies(), rules, st.data())
def test_property_adding_a_lesion_never_turns_positive_into_negative(slices, rule, data):
    if not slices:
        return
    before = decide(slices, rule)
    i = data.draw(st.integers(0, len(slices) - 1))
    x0 = data.draw(st.integers(100, 380))
    y0 = data.draw(st.integers(100, 380))
    w, h = data.draw(st.integers(5, 60)), data.draw(st.integers(6, 60))
    extra = np.array([[x0, y0, min(x0 + w, 400), min(y0 + h, 400), 0.9]], np.float32)
    s = slices[i]
    grown = list(slices)
    grown[i] = SliceInput(s.sop_instance_uid, s.position_mm, np.concatenate([s.boxes, extra]), s.valid_area)
    after = decide(grown, rule)
    if before.verdict == "positive":
        assert after.verdict == "positive"
    if rule.spanning == "every":  # more boxes never remove a quadrant from a slice
        for f0, f1 in zip(before.slices, after.slices, strict=True):
            assert set(f0.quadrants) <= set(f1.quadrants)


@settings(max_examples=100, deadline=None)
@given(studies(), rules)
def test_property_mirroring_the_image_keeps_the_verdict(slices, rule):
    def mirror(s: SliceInput) -> SliceInput:
        b = s.boxes.copy()
        b[:, [0, 2]] = 511 - s.boxes[:, [2, 0]]
        v = s.valid_area.copy()
        v[[0, 2]] = 511 - s.valid_area[[2, 0]]
        return SliceInput(s.sop_instance_uid, s.position_mm, b, v)

    a, b = decide(slices, rule), decide([mirror(s) for s in slices], rule)
    assert (a.verdict, a.reason) == (b.verdict, b.reason)


@settings(max_examples=100, deadline=None)
@given(studies(), st.integers(1, 4))
def test_property_run_mm_of_k_spacings_equals_k_slices_on_a_regular_series(slices, k):
    """Holds from two slices on; a single slice has no spacing, so no run in mm can be measured."""
    if len(slices) < 2:
        return
    regular = [SliceInput(s.sop_instance_uid, 2.5 * i, s.boxes, s.valid_area) for i, s in enumerate(slices)]
    by_slices = decide(regular, CaseRule(run_slices=k))
    by_mm = decide(regular, CaseRule(run_slices=1, run_mm=2.5 * k))
    assert (by_slices.verdict, by_slices.reason) == (by_mm.verdict, by_mm.reason)


@settings(max_examples=60, deadline=None)
@given(studies(), rules)
def test_property_a_stored_result_replays_to_the_same_decision(slices, rule):
    """JSON round trip of the CaseResult, then replay() under its recorded rule: same verdict and evidence."""
    from aggregator.case import replay
    from aggregator.schema import CaseResult

    decision = decide(slices, rule)
    stored = CaseResult.model_validate_json(
        decision.to_result(study_instance_uid="1.2", series_instance_uid="1.2.3").model_dump_json()
    )
    again = replay(stored)
    assert again.rule == rule
    assert (again.verdict, again.reason, again.evidence, again.slices) == (
        decision.verdict, decision.reason, decision.evidence, decision.slices)


def test_a_slice_whose_valid_area_holds_one_lung_is_split_at_the_series_midline():
    """At a base below the other lung the valid area holds one lung: its centre moved the split to that lung's
    middle, the same lesion changed quadrant from slice to slice and its run broke (negative). Such a slice is
    split at the series' median centre now; a series whose valid areas are all alike is split as before."""
    both, right_only = np.array([60, 120, 450, 400], np.float32), np.array([60, 120, 230, 400], np.float32)
    lesion = np.array([[160, 300, 200, 340, 0.9]], np.float32)
    s = [SliceInput(f"1.2.9.{i}", 5.0 * i, lesion, va) for i, va in enumerate([both, both, right_only, both, both])]
    d = decide(s)
    assert [f.quadrants for f in d.slices] == [["bottom_left"]] * 5
    assert d.verdict == "positive"
    narrow = [SliceInput(f"1.2.8.{i}", 5.0 * i, lesion, right_only) for i in range(5)]  # all one width
    assert [f.quadrants for f in decide(narrow).slices] == [["bottom_right"]] * 5  # split at 145 as before


def test_the_runs_quadrant_is_given_on_each_stored_image_as_the_rule_split_it():
    """The viewer shaded the run's quadrant from each slice's own valid-area centre on the stored image as
    stored: on a one-lung slice (split at the series' centre by the rule) and on a slice stored mirrored
    (its grid's left is the image's right) it shaded another region than the rule counted in."""
    both, right_only = np.array([60, 120, 450, 400], np.float32), np.array([60, 120, 230, 400], np.float32)
    lesion = np.array([[160, 300, 200, 340, 0.9]], np.float32)
    vas = [both, both, right_only, both, both]
    d = decide([SliceInput(f"1.2.9.{i}", 5.0 * i, lesion, va, rows=512, cols=512) for i, va in enumerate(vas)])
    assert d.evidence.quadrant == "bottom_left"
    regions = [e.quadrant_original.model_dump() for e in d.evidence.slices]
    whole = {"x0": 0, "y0": 260, "x1": 255, "y1": 511}  # split at (255, 260): the series' centre
    assert regions == [whole] * 5  # the one-lung slice too (its own centre is x = 145)

    def mirrored(b):  # stored with the columns the other way round (the grid is radiological)
        out = np.array(b, np.float64)
        out[:, [0, 2]] = 511.0 - out[:, [2, 0]]
        return out

    m = decide([SliceInput(f"1.2.7.{i}", 5.0 * i, lesion, both, rows=512, cols=512, to_original=mirrored)
                for i in range(3)])
    assert m.evidence.quadrant == "bottom_left"
    assert m.evidence.slices[0].quadrant_original.model_dump() == {"x0": 256, "y0": 260, "x1": 511, "y1": 511}
    assert m.slices[0].boxes[0].original.x0 >= 256  # where the lesion is drawn: inside that region
    unknown = decide([SliceInput(f"1.2.6.{i}", 5.0 * i, lesion, both, rows=512, cols=400) for i in range(3)])
    assert unknown.evidence.slices[0].quadrant_original is None  # no mapping known: the viewer's own guess


def test_a_slice_missing_or_unread_inside_a_lesion_is_unknown_never_a_silent_negative():
    """A review's cases (docs/case-rule.md 5: a gap must never make a sick patient look healthy). Lesions on
    the slices before and after one missing slice, or one whose valid area the model missed, were negative
    (no_run): the slice between was counted as lesion-free. It is unknown: were the lesion there, the run would
    qualify, so the case is indeterminate. A gap far from a run no longer blames it (with run_mm, the run was
    measured as its slices times the spacing)."""
    gap = series({3: TL, 5: TL}, 10, skip={4})
    d = decide(gap)
    assert (d.verdict, d.reason) == ("indeterminate", "run_broken_by_gap"), d.message
    assert "1 slice the gap leaves out" in d.message
    assert decide(gap, CaseRule(run_slices=4)).verdict == "negative"  # 2 + 1 unknown cannot make 4
    unread = series({3: TL, 4: TL, 5: TL}, 10)
    unread[4] = SliceInput(unread[4].sop_instance_uid, unread[4].position_mm, boxes(*TL), np.array(EMPTY_BOX))
    d = decide(unread)
    assert (d.verdict, d.reason) == ("indeterminate", "run_broken_by_gap") and "no valid area" in d.message
    far = series({2: TL, 3: TL}, 12, skip={7, 8})
    d = decide(far, CaseRule(run_slices=1, run_mm=15))
    assert (d.verdict, d.reason) == ("negative", "no_run"), d.message  # 2 slices cover 10 mm, the gap is elsewhere


def test_a_result_of_a_multi_frame_series_replays():
    """An Enhanced CT's frames share one SOP Instance UID: decide took them (by frame), but its result kept no
    frame, so replay (and the evaluation report, which replays every case per cutoff) refused it: 'holds SOP
    Instance UID ... more than once'."""
    from aggregator.case import replay

    frames = [SliceInput("1.2.3.enhanced", 5.0 * i, boxes(*(TL if i in (2, 3, 4) else ())), VA, frame_index=i)
              for i in range(8)]
    d = decide(frames)
    result = d.to_result(study_instance_uid="1.2.3", series_instance_uid="1.2.3.4", job_id="j")
    assert [f.frame_index for f in result.slices] == list(range(8))
    assert (replay(result).verdict, replay(result).reason) == (d.verdict, d.reason) == ("positive", "run_found")
