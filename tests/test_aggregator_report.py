"""The evaluation report: built and written from a tiny labelled set of real decide() results."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aggregator.case import CaseRule, SliceInput, decide
from aggregator.report import EvalCase, Goal, build_report, render_markdown
from evaluation.cli import eval_main
from evaluation.output import write_report

VA = np.array([100, 100, 400, 400], np.float32)
TL = np.array([[150, 150, 170, 170, 0.9]], np.float32)
WEAK = np.array([[330, 330, 350, 350, 0.6]], np.float32)
NONE = np.zeros((0, 5), np.float32)


def _case(case_id, kind, label, lesion_slices, box=TL, n=8):
    slices = [SliceInput(f"{case_id}.{i}", 5.0 * i, box if i in lesion_slices else NONE, VA) for i in range(n)]
    result = decide(slices).to_result(study_instance_uid=f"{case_id}", series_instance_uid=f"{case_id}.1")
    truth = {f"{case_id}.{i}": (label and i in lesion_slices) for i in range(n)}
    return EvalCase(case_id, kind, label, result, truth, seconds=1.5)


@pytest.fixture
def cases():
    return [
        _case("c1", "covid", True, {2, 3, 4}),  # TP
        _case("c2", "covid", True, {1, 2, 3, 4}, box=WEAK),  # TP at 0.5, lost above 0.6
        _case("c3", "covid", True, {5}),  # FN
        _case("n1", "normal", False, set()),  # TN
        _case("n2", "tb", False, {3, 4, 5}),  # FP
        _case("n3", "nodule", False, {6}),  # TN, one FP image
        EvalCase("f1", "normal", False, None, {}, 0.1, "no_usable_series: nothing to screen"),
    ]


def test_build_report_counts(cases):
    report = build_report(cases, indeterminate_as="negative", cutoffs=[0.5, 0.7, 0.95])
    pp = report["per_patient"]
    assert (pp["tp"], pp["fn"], pp["tn"], pp["fp"], pp["indeterminate"]) == (2, 1, 3, 1, 1)
    pi = report["per_image"]
    # lesion slices: c1 3 + c2 4 + c3 1 = 8 truth-positive, all detected; FP images: n2 3 + n3 1
    assert (pi["tp"], pi["fn"], pi["fp"]) == (8, 0, 4)
    assert pi["tn"] == 6 * 8 - 8 - 4
    assert report["n_failed"] == 1 and report["n_cases"] == 7
    assert report["fp_by_class"]["tb"]["fp"] == 1 and report["fp_by_class"]["nodule"]["fp"] == 0
    assert report["fp_images_by_kind"]["nodule"] == {"slices": 8, "fp_slices": 1}
    assert report["goal"]["met"] is False
    at = {p["cutoff"]: p for p in report["curves"]["per_patient"]}
    assert at[0.5]["tp"] == 2 and at[0.7]["tp"] == 1 and at[0.95]["tp"] == 0 and at[0.95]["fp"] == 0
    assert report["rule"] == CaseRule().params().model_dump()


def test_failed_case_counts_as_indeterminate_positive_by_default(cases):
    report = build_report(cases)
    assert report["per_patient"]["fp"] == 2 and report["per_patient"]["indeterminate"] == 1


def test_goal_is_checked():
    good = [_case("c1", "covid", True, {2, 3, 4}), _case("n1", "normal", False, set())]
    assert build_report(good)["goal"]["met"] is True
    assert build_report(good, goal=Goal(sensitivity=1.0, specificity=1.0))["goal"]["met"] is True
    with pytest.raises(ValueError, match='"cases"'):
        build_report([])


def test_a_set_of_one_class_is_judged_on_the_measure_it_has(cases):
    """A centre's lesion-free scans measure specificity only: the goal read "NOT met" (exit 1) whatever the
    specificity, as sensitivity was n/a. It is judged on what the set measures, and says what it did not."""
    from aggregator.report import goal_words

    negatives = [_case("n1", "normal", False, set()), _case("n2", "normal", False, {6})]
    report = build_report(negatives)
    assert report["goal"] == {"sensitivity": 0.95, "specificity": 0.90, "measured": ["specificity"], "met": True}
    assert "met on specificity; sensitivity not measured: no COVID-19 study (sensitivity n/a, specificity 100.0%)" \
        in render_markdown(report)
    worse = build_report([*negatives, _case("n3", "tb", False, {3, 4, 5})])
    assert worse["goal"]["met"] is False and goal_words(worse["goal"]).startswith("goal NOT met on specificity")
    assert build_report([_case("c1", "covid", True, {2, 3, 4})])["goal"]["measured"] == ["sensitivity"]
    # every COVID-19 study failed and failures are left out: sensitivity has no value, but the set holds the
    # class, so the goal is not met (it read "met on specificity")
    failed = EvalCase("c9", "covid", True, None, {}, 0.1, "no_usable_series: nothing to screen")
    report = build_report([*negatives, failed], indeterminate_as="exclude")
    assert report["goal"]["measured"] == ["sensitivity", "specificity"] and report["goal"]["met"] is False
    # a failed study: its error in the report's row (it counts as indeterminate), and the count says so
    md = render_markdown(build_report(cases))
    assert "| f1 | normal | 0 | failed **x** | no_usable_series: nothing to screen |" in md
    assert "(1 indeterminate cases, 1 of them failed: no verdict, the error in the cases below)" in md


def test_markdown_is_laid_out_like_table3(cases):
    md = render_markdown(build_report(cases, indeterminate_as="negative"), plots=[("curves", "curves.png")])
    assert "| level | TP | FN | TN | FP | accuracy | sensitivity | specificity | PPV | NPV |" in md
    assert "| per patient | 2 | 1 | 3 | 1 | 71.43 [" in md
    assert "![curves](curves.png)" in md
    assert "NOT met" in md
    # counted negative, the failed normal study is one of Table 3's TN: not marked wrong (its error is in the row)
    assert "| f1 | normal | 0 | failed | no_usable_series: nothing to screen |" in md


def test_write_report_files(cases, tmp_path):
    report = write_report(cases, tmp_path / "eval", meta={"command": "ctscreen eval --data x"})
    out = tmp_path / "eval"
    assert json.loads((out / "report.json").read_text())["per_patient"] == report["per_patient"]
    assert (out / "report.md").read_text().startswith("# ctscreen evaluation")
    for name in ("curves.png", "roc.png", "fp_by_class.png", "confusion.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and rows[-1]["result"] is None and rows[0]["result"]["verdict"] == "positive"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "/nonexistent/x", "--in-process"], "not a directory"),
        (["--data", "{tmp}", "--in-process"], "no study with a manifest.json"),
        (["--data", "{tmp}", "--timeout", "0"], "--timeout"),
        (["--data", "{tmp}", "--timeout", "nan"], "--timeout must be > 0"),
        # every slice was a per-image positive, lesion-free ones too: sensitivity 25 % on a phantom pair
        (["--data", "{tmp}", "--min-lesion-px", "-1"], "--min-lesion-px must be >= 0 (lesion pixels), got -1"),
        (["--data", "{tmp}", "--repo", "/nonexistent/repo"], "--repo"),
    ],
)
def test_cli_bad_arguments_give_one_line_errors(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert eval_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("argv", [["--data", "x", "--url", "http://h", "--in-process"], ["--data", "x", "--cutoffs", "2"],
                                  ["--data", "x", "--limit", "0"], []])
def test_cli_argparse_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        eval_main(argv)
    assert info.value.code == 2
    assert "ctscreen eval: error:" in capsys.readouterr().err


def test_per_image_and_per_patient_curves_agree_on_a_cutoff_equal_to_the_score():
    """A float32 score of 0.9 passes the cutoff 0.9 in both curves (decide compares in float32)."""
    report = build_report([_case("c1", "covid", True, {2, 3, 4}), _case("n1", "normal", False, set())],
                          cutoffs=[0.9])
    assert report["curves"]["per_patient"][0]["tp"] == 1
    assert report["curves"]["per_image"][0]["tp"] == 3


def test_rule_variants_are_re_decided(cases):
    report = build_report(cases, indeterminate_as="negative")
    by_name = {v["name"]: v for v in report["variants"]}
    assert by_name["as served"]["tp"] == report["per_patient"]["tp"]
    assert by_name["as served"]["fp"] == report["per_patient"]["fp"]
    assert by_name["run of 4 slices"]["tp"] == 1  # only c2 has 4 lesion slices
    assert by_name["run of 4 slices"]["fp"] == 0
    assert "## Rule variants (per patient)" in render_markdown(report)


def test_results_jsonl_rows_validate_as_case_results(cases, tmp_path):
    from aggregator.schema import CaseResult

    write_report(cases, tmp_path)
    for line in (tmp_path / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["result"] is not None:
            CaseResult.model_validate(row["result"])


def test_results_csv_has_a_row_per_study_and_a_score_to_sweep(cases, tmp_path):
    """results.csv: what a scoring script of one's own reads; positive_up_to is the highest cutoff of the curves
    at which the case rule still calls the study positive (c2's boxes score 0.6: positive up to 0.6 only)."""
    import csv

    write_report(cases, tmp_path, cutoffs=[0.5, 0.6, 0.7, 0.95])
    rows = {r["case_id"]: r for r in csv.DictReader((tmp_path / "results.csv").open(encoding="utf-8"))}
    assert list(rows) == [c.case_id for c in cases]
    assert rows["c1"]["positive_up_to"] == "0.7" and rows["c2"]["positive_up_to"] == "0.6"  # scores 0.9, 0.6
    assert rows["n1"]["positive_up_to"] == "" and rows["n2"]["verdict"] == "positive" and rows["n2"]["correct"] == "0"
    assert rows["f1"]["verdict"] == "failed" and rows["f1"]["error"].startswith("no_usable_series")
    assert rows["c1"]["label"] == "1" and rows["c1"]["correct"] == "1"


def test_the_documented_results_csv_columns_are_the_written_ones():
    """docs/eval/README.md listed "case, ... slices, longest run" for case_id, ..., n_slices, run."""
    import re
    from pathlib import Path

    from evaluation.output import RESULTS_CSV_COLUMNS

    docs = Path(__file__).resolve().parents[1] / "docs" / "eval"
    row = next(line for line in (docs / "README.md").read_text().splitlines() if line.startswith("| `results.csv` |"))
    assert tuple(re.findall(r"`(\w+)`", row.split("|")[2])) == RESULTS_CSV_COLUMNS
    assert tuple((docs / "results.csv").read_text().splitlines()[0].split(",")) == RESULTS_CSV_COLUMNS


@pytest.mark.parametrize("policy", ["positive", "negative", "exclude"])
def test_correct_follows_the_indeterminate_policy_of_table3(cases, policy, tmp_path):
    """results.csv's `correct` said 0 (and report.md marked x) for an indeterminate COVID-19 study that Table 3, under
    the default --indeterminate-as positive, counted a true positive: summing `correct` did not give the accuracy.
    It now counts each study as the per-patient row does (left out, empty, under exclude)."""
    import csv

    short = _case("c4", "covid", True, {0, 1}, n=2)  # two slices: indeterminate (too_few_slices)
    assert short.result is not None and short.result.verdict == "indeterminate"
    report = write_report([*cases, short], tmp_path, indeterminate_as=policy, cutoffs=[0.5])
    rows = list(csv.DictReader((tmp_path / "results.csv").open(encoding="utf-8")))
    counted = [int(r["correct"]) for r in rows if r["correct"] != ""]
    pp = report["per_patient"]
    assert len(counted) == pp["tp"] + pp["fn"] + pp["tn"] + pp["fp"]
    assert sum(counted) / len(counted) == pytest.approx(pp["metrics"]["accuracy"]["value"])
    c4 = next(r for r in rows if r["case_id"] == "c4")
    assert c4["correct"] == {"positive": "1", "negative": "0", "exclude": ""}[policy]
    mark = {"positive": "", "negative": " **x**", "exclude": " (left out)"}[policy]
    assert f"| c4 | covid | 1 | indeterminate{mark} | too_few_slices |" in (tmp_path / "report.md").read_text()


def test_the_per_image_row_says_which_failed_studies_it_lacks(cases, tmp_path):
    """A failed study's slices dropped out of the per-image denominators without a word: report.md and report.json
    now say how many studies (and their truth slices, where known) the per-image row lacks."""
    truth = {f"c9.{i}": i in {2, 3} for i in range(6)}  # what its manifest or mask knows: 2 positive, 4 negative
    failed = EvalCase("c9", "covid", True, None, truth, 0.1, "no_usable_series: nothing to screen")
    report = write_report([*cases, failed], tmp_path, cutoffs=[0.5])
    assert report["per_image_missing"] == {"studies": 2, "studies_with_truth": 1, "slices": 6, "positive_slices": 2}
    assert json.loads((tmp_path / "report.json").read_text())["per_image_missing"] == report["per_image_missing"]
    assert report["per_image"]["n"] == 6 * 8  # the screened studies' slices only, as before
    md = (tmp_path / "report.md").read_text()
    assert ("**Per image leaves out 2 failed studies** (no slice screened): 6 truth slices of 1 of them "
            "(2 positive, 4 negative); the other 1 has no per-image truth.") in md
    assert md.index("Per image leaves out") < md.index("| level | TP |")
    assert "Per image leaves out" not in render_markdown(build_report(cases[:-1]))  # nothing failed: nothing said


def test_the_readmes_phantom_rows_say_what_docs_eval_report_json_counts():
    """README.md's figures row read 'same set, per image (2880 slices)': the report's per-image row counts 2878 (2
    slices of 1-25 lesion pixels are left out); the row's counts and figures are tied to docs/eval/report.json."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    report = json.loads((root / "docs" / "eval" / "report.json").read_text())
    lines = (root / "README.md").read_text().splitlines()
    patient = next(line for line in lines if line.startswith("| held-out phantom, per patient ("))
    assert re.search(r"\((\d+) studies", patient).group(1) == str(report["n_cases"])
    image = next(line for line in lines if line.startswith("| same set, per image ("))
    counted, screened = map(int, re.search(r"per image \((\d+) of its (\d+) slices", image).groups())
    assert (counted, screened) == (report["per_image"]["n"], report["n_slices"])
    row = next(r for r in report["table3"] if r["level"] == "per image")
    figures = " / ".join(row[m] for m in ("accuracy", "sensitivity", "specificity", "ppv", "npv"))
    assert f"| {figures} % |" in image
