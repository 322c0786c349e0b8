"""Table-3 metrics against hand-computed matrices, the paper's own rows, and scipy's Wilson interval."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import binomtest

from aggregator.metrics import (
    METRICS,
    Confusion,
    CurvePoint,
    Estimate,
    auc,
    false_positives_by_class,
    sweep,
    table3,
    wilson,
)


@pytest.mark.parametrize(
    ("confusion", "printed"),
    [
        # Chen et al. 2020, Table 3, per patient and per image (accuracy, sens, spec, PPV, NPV in %)
        (Confusion(tp=11, fn=0, tn=29, fp=2), ["95.24", "100.00", "93.55", "84.62", "100.00"]),
        (Confusion(tp=600, fn=36, tn=9290, fp=79), ["98.85", "94.34", "99.16", "88.37", "99.61"]),
    ],
)
def test_paper_rows_to_the_printed_decimals(confusion, printed):
    assert [m.percent(2) for m in confusion.metrics().values()] == printed


def test_hand_computed_matrix():
    c = Confusion.from_labels([1, 1, 1, 0, 0, 0, 0, 1], [1, 0, 1, 0, 1, 0, 0, 1])
    assert (c.tp, c.fn, c.tn, c.fp, c.n) == (3, 1, 3, 1, 8)
    m = c.metrics()
    assert list(m) == list(METRICS)
    assert m["accuracy"].value == 6 / 8
    assert m["sensitivity"].value == m["specificity"].value == m["ppv"].value == m["npv"].value == 3 / 4
    assert (m["sensitivity"].successes, m["sensitivity"].total) == (3, 4)


def test_zero_denominator_is_none_not_a_number():
    c = Confusion(tn=5)
    assert c.sensitivity().value is None and c.sensitivity().percent() == "n/a"
    assert c.ppv().interval() == "n/a"
    assert c.specificity().value == 1.0


@pytest.mark.parametrize(("k", "n"), [(0, 1), (0, 10), (3, 10), (11, 11), (11, 13), (29, 31), (600, 636), (9290, 9326)])
def test_wilson_matches_scipy(k, n):
    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson(k, n)
    assert low == pytest.approx(ref.low, abs=1e-9)
    assert high == pytest.approx(ref.high, abs=1e-9)


def test_paper_per_patient_sensitivity_interval():
    est = Confusion(tp=11, fn=0, tn=29, fp=2).sensitivity()
    assert est.interval() == "74.1-100.0"


@given(st.integers(1, 500), st.data())
def test_property_wilson_interval_holds_the_estimate(n, data):
    k = data.draw(st.integers(0, n))
    low, high = wilson(k, n)
    assert 0.0 <= low <= k / n <= high <= 1.0


@pytest.mark.parametrize(("args", "argument"), [((1, 0), "total"), ((5, 4), "successes"), ((-1, 4), "successes")])
def test_wilson_bad_arguments(args, argument):
    with pytest.raises(ValueError, match=f'"{argument}"'):
        wilson(*args)


def test_verdicts_fold_indeterminate_as_asked():
    truth = [True, True, False, False, False]
    verdicts = ["positive", "indeterminate", "indeterminate", "negative", "positive"]
    as_pos = Confusion.from_verdicts(truth, verdicts)
    assert (as_pos.tp, as_pos.fn, as_pos.tn, as_pos.fp, as_pos.indeterminate) == (2, 0, 1, 2, 2)
    as_neg = Confusion.from_verdicts(truth, verdicts, indeterminate="negative")
    assert (as_neg.tp, as_neg.fn, as_neg.tn, as_neg.fp) == (1, 1, 2, 1)
    excl = Confusion.from_verdicts(truth, verdicts, indeterminate="exclude")
    assert (excl.n, excl.indeterminate) == (3, 2)
    with pytest.raises(ValueError, match="unknown verdict"):
        Confusion.from_verdicts([True], ["maybe"])
    with pytest.raises(ValueError, match="same length"):
        Confusion.from_verdicts([True], [])


def test_confusions_add():
    assert Confusion(1, 2, 3, 4, 1) + Confusion(1, 1, 1, 1) == Confusion(2, 3, 4, 5, 1)
    with pytest.raises(ValueError, match='"tp"'):
        Confusion(tp=-1)


def test_sweep_and_auc():
    scores_pos, scores_neg = [0.9, 0.8, 0.6, 0.3], [0.7, 0.2, 0.1, 0.05]

    def at(cutoff):
        return Confusion.from_labels([1] * 4 + [0] * 4, [s >= cutoff for s in scores_pos + scores_neg])

    points = sweep([0.5, 0.0, 1.0, 0.25, 0.75], at)
    assert [p.cutoff for p in points] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert points[0].tpr == 1.0 and points[0].fpr == 1.0
    assert points[-1].tpr == 0.0 and points[-1].fpr == 0.0
    # With every score as a cutoff the trapezoid area is the rank statistic: 14 of 16 pairs ordered.
    full = sweep(scores_pos + scores_neg + [1.0], at)
    assert auc(full) == pytest.approx(14 / 16)
    assert auc([CurvePoint(0.5, Confusion(tp=3))]) is None
    with pytest.raises(ValueError, match='"cutoffs"'):
        sweep([], at)


def test_false_positives_by_class():
    cases = [("normal", False, "negative"), ("tb", False, "positive"), ("tb", False, "negative"),
             ("covid", True, "positive"), ("nodule", False, "indeterminate")]
    table = false_positives_by_class(cases)
    assert list(table) == ["nodule", "normal", "tb"]
    assert table["tb"]["fp"] == 1 and table["tb"]["n"] == 2 and table["tb"]["rate"] == 0.5
    assert table["nodule"]["fp"] == 1 and table["nodule"]["indeterminate"] == 1
    assert false_positives_by_class(cases, indeterminate="negative")["nodule"]["fp"] == 0
    # excluded, as the per-patient figures of the same report leave it out (it was counted as a positive there)
    excluded = false_positives_by_class(cases + [("nodule", False, "negative")], indeterminate="exclude")["nodule"]
    assert (excluded["n"], excluded["fp"], excluded["indeterminate"], excluded["rate"]) == (1, 0, 1, 0.0)


def test_table3_rows():
    rows = table3({"per patient": Confusion(tp=11, fn=0, tn=29, fp=2)})
    assert rows[0]["accuracy"] == "95.24" and rows[0]["sensitivity_ci"] == "74.1-100.0"
    assert Estimate.of(0, 0).as_dict()["value"] is None
