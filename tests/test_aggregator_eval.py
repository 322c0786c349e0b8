"""``ctscreen eval``: phantom studies through the in-process reference and through the real serving path.

The serving-path test is end to end with nothing faked: phantom DICOM files, the real gateway app under
uvicorn, the session's real embedded tritonserver; its verdicts must equal the in-process reference's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aggregator.case import SliceInput, decide
from evaluation import EvalError
from evaluation.cli import eval_main
from evaluation.dataset import discover, read_labels, slice_truth_from_manifest, unlisted

N_SLICES = 8


def test_slice_truth_from_manifest_matches_by_position():
    manifest = {"z_positions": [-10.0, -5.0, 0.0, 5.0, 10.0], "slice_spacing": 5.0,
                "lesion_slices": [1, 2, 3], "lesion_area_px": [10, 400, 26]}
    truth = slice_truth_from_manifest(manifest, min_px=25)
    va = np.array([100, 100, 400, 400])
    # result slices in another order, one shifted by less than half a spacing, one matching nothing
    slices = [SliceInput(f"u{z}", z, np.zeros((0, 5)), va) for z in (10.0, -4.0, 0.0, 5.0, -10.0, 30.0)]
    result = decide(slices).to_result(study_instance_uid="1", series_instance_uid="2")
    assert truth(result) == {"u10.0": False, "u0.0": True, "u5.0": True, "u-10.0": False}  # u-4.0: 10 px, left out
    assert slice_truth_from_manifest({}, 25)(result) == {}
    # the SOP Instance UIDs of the written files win over positions
    manifest["files"] = [{"index": 4, "sop_instance_uid": "u0.0"}, {"index": 2, "sop_instance_uid": "u10.0"}]
    got = slice_truth_from_manifest(manifest, min_px=25)(result)
    assert got["u0.0"] is False and got["u10.0"] is True
    # a failed study (no result): every slice the manifest knows, by its file's UID or else its index
    assert slice_truth_from_manifest(manifest, min_px=25)(None) == {
        "#0": False, "u10.0": True, "#3": True, "u0.0": False}  # index 1: 10 px, left out
    from evaluation.seg import SegTruth, slice_truth_from_seg

    assert slice_truth_from_seg(SegTruth({"a": 0, "b": 10, "c": 400}), 25)(None) == {"a": False, "c": True}


def test_discover_reads_labels_and_kinds(tmp_path):
    for name, kind, label in (("a", "covid", 1), ("b", "tb", 0), ("c", "normal", None)):
        (tmp_path / name).mkdir()
        manifest = {"kind": kind, "z_positions": [0.0]}
        if label is not None:
            manifest["label"] = label
        (tmp_path / name / "manifest.json").write_text(json.dumps(manifest))
    cases = discover(tmp_path)
    assert [(c.case_id, c.kind, c.label) for c in cases] == [("a", "covid", True), ("b", "tb", False), ("c", "normal", False)]
    (tmp_path / "c" / "manifest.json").write_text("{not json")
    assert eval_main(["--data", str(tmp_path), "--in-process"]) == 2


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory) -> Path:
    phantom = pytest.importorskip("phantom")
    if not hasattr(phantom, "write_study"):
        pytest.skip("phantom.write_study has not landed yet")
    from evaluation.dataset import make_phantom_set

    data = tmp_path_factory.mktemp("eval-phantom")
    make_phantom_set(data, 2, n_slices=N_SLICES, montage=False)  # a covid and a normal study, held-out seeds
    return data


def _run(argv: list[str]) -> tuple[int, dict, list[dict]]:
    code = eval_main(argv)
    out = Path(argv[argv.index("--out") + 1])
    report = json.loads((out / "report.json").read_text())
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return code, report, rows


@pytest.fixture(scope="module")
def reference(phantom_set, tmp_path_factory) -> tuple[int, dict, list[dict], Path]:
    """The phantom set through the in-process reference (ingest + ORT + postprocess_batch)."""
    out = tmp_path_factory.mktemp("eval-reference")
    return (*_run(["--data", str(phantom_set), "--in-process", "--out", str(out), "-q"]), out)


def test_eval_in_process_writes_the_report(reference):
    code, report, rows, out = reference
    assert code == (0 if report["goal"]["met"] else 1)  # 1: goal not met
    assert report["n_cases"] == 2 and report["n_failed"] == 0
    assert report["kinds"] == {"covid": 1, "normal": 1}
    assert report["per_patient"]["n"] == 2
    assert report["per_image"]["n"] > 0  # per-image truth matched to screened slices
    assert all(len(r["result"]["slices"]) == N_SLICES for r in rows)
    assert (out / "report.md").read_text().count("| per patient |") == 1
    # stamped as every published figure is: the commit, the machine and its load, the shipped models
    stamp = report["meta"]["machine"]
    assert stamp["commit"] and stamp["cores"] and "loadavg_1m" in stamp and stamp["models"]
    assert f"- **stamp**: commit `{stamp['commit']}`" in (out / "report.md").read_text()


def test_a_failed_studys_truth_slices_are_said_missing_from_the_per_image_row(phantom_set, tmp_path):
    """A study that failed to screen had its slices drop out of the per-image row without a word; its manifest
    still knows their truth, which the report now states as missing (report.md and report.json)."""
    import shutil

    covid = next(p for p in sorted(phantom_set.iterdir()) if "covid" in p.name)
    study = tmp_path / "data" / covid.name
    shutil.copytree(covid, study)
    for dcm in (study / "dicom").iterdir():
        dcm.write_bytes(b"not a DICOM file any more")
    manifest = json.loads((study / "manifest.json").read_text())
    area = dict(zip(manifest["lesion_slices"], manifest["lesion_area_px"], strict=True))
    known = [area.get(i, 0) for i in range(N_SLICES) if area.get(i, 0) == 0 or area.get(i, 0) > 25]
    code, report, rows = _run(["--data", str(tmp_path / "data"), "--in-process", "--out", str(tmp_path / "r"), "-q"])
    assert code == 1 and report["n_failed"] == 1 and rows[0]["result"] is None
    positive = sum(px > 0 for px in known)
    assert report["per_image_missing"] == {"studies": 1, "studies_with_truth": 1, "slices": len(known),
                                           "positive_slices": positive}
    assert report["per_image"]["n"] == 0 and len(rows[0]["slice_truth"]) == len(known)
    assert (f"**Per image leaves out 1 failed study** (no slice screened): {len(known)} truth slices of it "
            f"({positive} positive, {len(known) - positive} negative).") in (tmp_path / "r" / "report.md").read_text()


@pytest.mark.triton
def test_eval_through_the_serving_path_agrees_with_the_reference(phantom_set, reference, triton, tmp_path):
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "audit.jsonl").write_text('{"a": "line of an earlier run"}\n')
    code, report, rows = _run(["--data", str(phantom_set), "--triton-url", triton.grpc_url,
                               "--out", str(tmp_path / "served"), "-q"])
    audit = (tmp_path / "served" / "audit.jsonl").read_text().splitlines()
    assert audit and "earlier run" not in audit[0]  # the audit trail of this run only, beside its report
    assert code == (0 if report["goal"]["met"] else 1)
    assert report["n_failed"] == 0
    assert report["meta"]["serving_path"].startswith("embedded stack")
    ref = reference[2]
    for served, local in zip(rows, ref, strict=True):
        assert served["result"]["verdict"] == local["result"]["verdict"]
        assert served["result"]["reason"] == local["result"]["reason"]
        assert served["slice_truth"] == local["slice_truth"]
        got = [[b["grid"] for b in s["boxes"]] for s in served["result"]["slices"]]
        want = [[b["grid"] for b in s["boxes"]] for s in local["result"]["slices"]]
        assert got == want
        assert [s["valid_area"] for s in served["result"]["slices"]] == [
            s["valid_area"] for s in local["result"]["slices"]]


def test_eval_of_a_nifti_set_writes_dicom_studies_first(tmp_path):
    phantom = pytest.importorskip("phantom")
    if not hasattr(phantom, "write_study"):
        pytest.skip("phantom.write_study has not landed yet")
    import nibabel as nib

    root = tmp_path / "nifti"
    (root / "ct_scans").mkdir(parents=True)
    (root / "Infection_Mask").mkdir()
    for cid, has_lesion in (("case1", True), ("case2", False)):
        hu = np.full((64, 64, 6), -1000, np.int16)
        hu[8:56, 8:56] = 40
        hu[12:30, 12:52] = -850
        hu[34:52, 12:52] = -850
        mask = np.zeros(hu.shape, np.uint8)
        if has_lesion:
            mask[15:25, 15:25, 1:5] = 1
            hu[mask > 0] = -300
        affine = np.diag([0.7, 0.7, 5.0, 1.0])
        nib.save(nib.Nifti1Image(hu, affine), root / "ct_scans" / f"{cid}.nii.gz")
        nib.save(nib.Nifti1Image(mask, affine), root / "Infection_Mask" / f"{cid}.nii.gz")
    # a labels run of the same folder first: its studies are never counted as the set's (one --work for both)
    (root / "labels.csv").write_text("study,label\nct_scans/case1.nii.gz,1\n")
    assert eval_main(["--data", str(root), "--labels", str(root / "labels.csv"), "--in-process",
                      "--work", str(tmp_path / "work"), "--out", str(tmp_path / "r0"), "-q"]) in (0, 1)
    code, report, rows = _run(["--data", str(root), "--in-process", "--work", str(tmp_path / "work"),
                               "--out", str(tmp_path / "r"), "-q"])
    assert code == (0 if report["goal"]["met"] else 1)
    assert [(r["case_id"], r["kind"], r["label"]) for r in rows] == [("case1", "covid", 1), ("case2", "normal", 0)]
    assert all(len(r["result"]["slices"]) == 6 for r in rows)
    # slices 1-4 of case1 hold a 10 x 10 lesion (6400 pixels on the 512 grid): per-image positives
    assert sum(rows[0]["slice_truth"].values()) == 4 and not any(rows[1]["slice_truth"].values())
    assert report["per_image"]["tp"] + report["per_image"]["fn"] == 4


def test_eval_url_that_does_not_answer_is_a_one_line_error(tmp_path, capsys):
    from ctscreen.embedded import free_port

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "manifest.json").write_text(json.dumps({"kind": "covid", "z_positions": [0.0]}))
    url = f"http://127.0.0.1:{free_port()}"
    assert eval_main(["--data", str(tmp_path), "--url", url, "--out", str(tmp_path / "r"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot connect" in err and len(err.splitlines()) == 1


def test_cases_run_concurrently_keep_their_order_and_a_crash_is_a_row():
    """A stand-in runner (unit test of the fan-out only; the real paths are tested above)."""
    import threading
    import time

    from evaluation.dataset import LabelledCase
    from evaluation.runners import run_cases

    va = np.array([100, 100, 400, 400])
    seen = set()

    def runner(case):
        seen.add(threading.current_thread().name)
        time.sleep(0.05 * (5 - int(case.case_id)))  # later cases finish first
        if case.case_id == "2":
            raise ConnectionError("gateway went away")
        s = [SliceInput(f"{case.case_id}.{i}", float(i), np.zeros((0, 5)), va) for i in range(3)]
        return decide(s).to_result(study_instance_uid=case.case_id, series_instance_uid="x"), 0.1, None

    cases = [LabelledCase(str(i), "normal", False, Path("."), lambda r: {}) for i in range(5)]
    rows = run_cases(cases, runner, workers=3, quiet=True)
    assert [r.case_id for r in rows] == ["0", "1", "2", "3", "4"]
    assert rows[2].result is None and rows[2].error == "ConnectionError: gateway went away"
    assert all(r.result is not None for i, r in enumerate(rows) if i != 2)
    assert len(seen) > 1


# --- a centre's own studies, labelled per study by a labels file (--labels) --------------------------------


def _centre_export(phantom_set: Path, root: Path) -> Path:
    """The phantom set as a centre would export it: no manifest, the COVID study's files in a nested folder,
    the normal study's in a zip; and a labels file as a spreadsheet writes it (BOM, ``;``, capitals, an extra
    column, a blank line)."""
    import shutil
    import zipfile

    covid, normal = sorted(p for p in phantom_set.iterdir() if (p / "manifest.json").is_file())
    data = root / "export"
    shutil.copytree(covid / "dicom", data / "P0001" / "CT" / "series 2")
    with zipfile.ZipFile(data / "P0002.zip", "w") as z:
        for f in sorted((normal / "dicom").iterdir()):
            z.write(f, f"IMG/{f.name}")
    (data / "labels.csv").write_text("\ufeffStudy;LABEL;Kind;Comment\nP0001;positive;covid;ward 3\n\n"
                                     "P0002.zip;0;;\n", encoding="utf-8")
    return data


def test_a_centres_own_studies_are_evaluated_from_a_labels_file(phantom_set, reference, tmp_path):
    data = _centre_export(phantom_set, tmp_path)
    code, report, rows = _run(["--data", str(data), "--labels", str(data / "labels.csv"), "--in-process",
                               "--out", str(tmp_path / "r"), "-q"])
    assert code == (0 if report["goal"]["met"] else 1)
    assert [(r["case_id"], r["kind"], r["label"]) for r in rows] == [("P0001", "covid", 1), ("P0002.zip", "non-covid", 0)]
    # the same studies screened as with their manifests: the same verdicts, the same boxes
    for mine, ref in zip(rows, reference[2], strict=True):
        assert mine["result"]["verdict"] == ref["result"]["verdict"]
        assert [[b["grid"] for b in s["boxes"]] for s in mine["result"]["slices"]] == [
            [b["grid"] for b in s["boxes"]] for s in ref["result"]["slices"]]
    # labelled per study: nothing counts per image, and the report says why
    assert all(r["slice_truth"] == {} for r in rows) and report["per_image"]["n"] == 0
    assert report["per_patient"]["n"] == 2
    md = (tmp_path / "r" / "report.md").read_text()
    assert "- **labels**: " in md and "no per-image truth" in md


def test_studies_under_data_that_the_labels_file_does_not_name_are_said(phantom_set, tmp_path, capsys):
    """A study left out of the labels file (a row forgotten, a study exported late) was not screened, and the report
    measured the others without a word: the run says which, on stderr before it starts and in the report's note."""
    import shutil

    data = _centre_export(phantom_set, tmp_path)
    shutil.copytree(data / "P0001", data / "P0003")
    (data / "more").mkdir()
    shutil.copy(data / "P0002.zip", data / "more" / "P0004.zip")
    shutil.copy(data / "P0002.zip", data / "more" / "P0005.zip")
    (data / "notes").mkdir()
    (data / "notes" / "ward.txt").write_text("not a study")
    (data / ".Trash").mkdir()
    (data / ".Trash" / "IM1.dcm").write_bytes(b"x")
    (data / "labels.csv").write_text("study,label\nP0001,1\nmore/P0005.zip,0\nP0002.zip,0\n")
    out = data / "report"  # the report and work folders under --data are no studies
    code, report, rows = _run(["--data", str(data), "--labels", str(data / "labels.csv"), "--in-process",
                               "--work", str(data / "work"), "--out", str(out), "--limit", "2", "-q"])
    assert [r["case_id"] for r in rows] == ["P0001", "more/P0005.zip"]  # P0002.zip: named, left out by --limit
    words = "2 studies under --data that no row of --labels names, not screened: P0003, more/P0004.zip"
    err = capsys.readouterr().err
    assert words in err and "P0002" not in err
    assert words in (out / "report.md").read_text() and report["meta"]["unlisted"] == ["P0003", "more/P0004.zip"]
    (data / "labels.csv").write_text("study,label\nP0001,1\nmore/P0005.zip,0\nP0002.zip,0\nP0003,1\n"
                                     "more/P0004.zip,0\n")
    assert unlisted(read_labels(data / "labels.csv", data), data, skip=(out, data / "labels.csv")) == []


def test_one_study_named_twice_under_two_names_is_refused_before_the_run(phantom_set, tmp_path, capsys):
    """A study exported twice (its folder and a zip of it, or one of its files) was screened twice and counted as
    two patients, its verdict twice in every per-patient figure."""
    import zipfile

    data = _centre_export(phantom_set, tmp_path)
    with zipfile.ZipFile(data / "P0001 again.zip", "w") as z:
        for f in sorted((data / "P0001").rglob("*.dcm")):
            z.write(f, f.name)
    for twice in ("P0001 again.zip", "P0001/CT/series 2/IM0003.dcm"):
        (data / "labels.csv").write_text(f"study,label\nP0001,1\nP0002.zip,0\n{twice},1\n")
        code = eval_main(["--data", str(data), "--labels", str(data / "labels.csv"), "--in-process",
                          "--out", str(tmp_path / "r"), "-q"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert f"line 4: {twice!r} is the same study as 'P0001' (line 2): one Study Instance UID; name it once" in err
        assert not (tmp_path / "r" / "report.json").exists()  # refused before anything was screened


def test_two_studies_of_one_patient_are_said_not_counted_as_two_patients_silently(phantom_set, tmp_path, capsys):
    """A baseline and its follow-up (two studies, one Patient ID) counted as two patients, the intervals taking them
    as independent, without a word. They are still screened and counted as studies, but stderr and the report's
    note say which lines are one patient, never the Patient ID itself."""
    import zipfile

    import pydicom

    data = _centre_export(phantom_set, tmp_path)
    covid_file = next((data / "P0001").rglob("*.dcm"))
    patient_id = str(pydicom.dcmread(covid_file, stop_before_pixels=True).PatientID)
    follow_up = data / "P0003"  # the normal study's files, as a later study of P0001's patient
    follow_up.mkdir()
    study_uid, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    with zipfile.ZipFile(data / "P0002.zip") as z:
        for name in z.namelist():
            ds = pydicom.dcmread(z.open(name))
            assert ds.PatientID != patient_id
            ds.PatientID = patient_id
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
            ds.save_as(follow_up / Path(name).name)
    (data / "labels.csv").write_text("study,label\nP0001,1\nP0002.zip,0\nP0003,0\n")
    code, report, rows = _run(["--data", str(data), "--labels", str(data / "labels.csv"), "--in-process",
                               "--out", str(tmp_path / "r"), "-q"])
    err = capsys.readouterr().err
    assert code in (0, 1) and len(rows) == 3 and report["per_patient"]["n"] == 3  # not refused, counted as studies
    said = ("lines 2 and 4 of --labels are studies of one patient (one Patient ID): 2 patients in 3 studies; "
            "the per-patient row counts studies")
    assert f"ctscreen eval: warning: {said}" in err
    assert said in report["meta"]["note"] and report["meta"]["same_patient"] == [["line 2", "line 4"]]
    assert said in (tmp_path / "r" / "report.md").read_text()
    for text in (err, (tmp_path / "r" / "report.md").read_text(), (tmp_path / "r" / "report.json").read_text()):
        assert patient_id not in text  # compared, never written
    # the centre's own export (two patients) says nothing
    (data / "labels.csv").write_text("study,label\nP0001,1\nP0002.zip,0\n")
    _, report, _ = _run(["--data", str(data), "--labels", str(data / "labels.csv"), "--in-process",
                         "--out", str(tmp_path / "r"), "-q"])
    assert "one patient" not in capsys.readouterr().err and report["meta"]["same_patient"] == []


@pytest.mark.parametrize(("content", "message"), [
    ("name,label\nP0001,1\n", "no study column in the header row (found: name, label"),
    # two readings merged into one sheet: the first label column was taken without a word
    ("study,label,Label\nP0001,1,0\n", "the header row names a label column 2 times (columns 2, 3): keep one"),
    ("study,label\nP0001,maybe\n", "line 2: label 'maybe' of 'P0001' is not one of 1, 0, positive"),
    ("study,label\nP0001,\n", "line 2: 'P0001' has no label"),
    ("study,label\nP0001,1\nP0009,0\n", "line 3: 'P0009': not under --data"),
    ("study,label\nP0001,1\n/nowhere/P9,0\n", "line 3: '/nowhere/P9': no such file or folder"),
    ("study,label\nP0001,1\n./P0001/,0\n", "line 3: './P0001/' is named again (first on line 2)"),
    # was a failed case: a false positive
    ("study,label\nP0001,1\nEMPTY,0\n", "line 3: 'EMPTY' holds no file to screen"),
    ("\nstudy,label\nP0001,1\nDS,0\n", "line 4: 'DS' holds no file to screen"),  # a blank first line; only .DS_Store
    ("study,label,kind\nP0001,0,covid\n", "line 2: kind 'covid' of 'P0001' contradicts its label '0'"),
    # a quoted comment over two lines: the error names the line in the file, not the record's number
    ('study,label,comment\nP0001,1,"two\nlines"\nP0009,0,\n', "line 4: 'P0009'"),
    ('study,label,comment\nP0001,1,"a\u2028b"\nP0009,0,\n', "line 3: 'P0009'"),  # a line separator in a cell
    ("", "the file is empty"),
    ("study,label\n\n", "no study listed under the header row"),
])
def test_a_labels_file_it_cannot_use_is_a_one_line_error_naming_the_line(tmp_path, capsys, content, message):
    (tmp_path / "P0001").mkdir()
    (tmp_path / "P0001" / "IM0001").write_bytes(b"a file")
    (tmp_path / "EMPTY" / "sub").mkdir(parents=True)
    (tmp_path / "DS").mkdir()
    (tmp_path / "DS" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "labels.csv").write_text(content)
    code = eval_main(["--data", str(tmp_path), "--labels", str(tmp_path / "labels.csv"), "--in-process",
                      "--out", str(tmp_path / "r"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(("raw", "ok"), [
    (b"sep=;\r\nstudy;label;kind (covid, normal)\r\nP0001;1;covid\r\n", True),  # Excel's sep line, a "," in a name
    ("study\tlabel\tcomment\nP0001\t1\tFr\u00e4ulein\n".encode("utf-16"), True),  # "Unicode text"
    (b"sep=\t\nstudy\tlabel\nP0001\t1\n", True),
    ("study,label,comment\nP0001,1,caf\u00e9\n".encode("cp1252"), True),  # Excel's plain "CSV" on Windows
    (b"study,label\nsub\\P0001,1\n", True),  # a Windows path
    (b"PK\x03\x04 a workbook", False),
])
def test_a_labels_file_as_spreadsheets_save_it_is_read(tmp_path, raw, ok):
    from evaluation.dataset import read_labels

    (tmp_path / "sub" / "P0001").mkdir(parents=True)
    (tmp_path / "sub" / "P0001" / "IM1").write_bytes(b"x")
    (tmp_path / "P0001").symlink_to(tmp_path / "sub" / "P0001")
    (tmp_path / "labels.csv").write_bytes(raw)
    if not ok:
        with pytest.raises(EvalError, match=r"a workbook \(\.xlsx\), not CSV: save it as CSV UTF-8"):
            read_labels(tmp_path / "labels.csv", tmp_path)
        return
    (row,) = read_labels(tmp_path / "labels.csv", tmp_path)
    assert row.label is True and row.path.resolve() == (tmp_path / "sub" / "P0001").resolve()


@pytest.mark.parametrize(("label", "kind", "contradicts"), [
    ("0", "COVID-negative", False), ("0", "covid-free", False), ("0", "COVID-19 ruled out", False),  # were refused
    ("1", "Non-COVID pneumonia", True), ("1", "COVID negative", True),  # were taken: a slip in one of the columns
    ("0", "COVID-19 pneumonia", True), ("1", "healthy", True), ("0", "bacterial", False), ("1", "covid19", False),
])
def test_a_kind_is_checked_against_its_label_as_centres_word_it(tmp_path, label, kind, contradicts):
    from evaluation.dataset import read_labels

    (tmp_path / "P1").mkdir()
    (tmp_path / "P1" / "IM1").write_bytes(b"x")
    (tmp_path / "labels.csv").write_text(f"study,label,kind\nP1,{label},{kind}\n")
    if contradicts:
        with pytest.raises(EvalError, match=f"line 2: kind {kind!r} of 'P1' contradicts its label '{label}'"):
            read_labels(tmp_path / "labels.csv", tmp_path)
    else:
        (row,) = read_labels(tmp_path / "labels.csv", tmp_path)
        assert (row.label, row.kind) == (label == "1", kind)


def test_cutoffs_under_the_served_one_are_said_to_be_left_out(tmp_path, capsys):
    (tmp_path / "labels.csv").write_text("study,label\nnone,0\n")
    assert eval_main(["--data", str(tmp_path), "--labels", str(tmp_path / "labels.csv"), "--in-process",
                      "--cutoffs", "0.3,0.5,0.7", "--out", str(tmp_path / "r"), "-q"]) == 2
    assert "--cutoffs below the served 0.50 are not measured" in capsys.readouterr().err


def test_labels_and_make_phantom_do_not_go_together(tmp_path, capsys):
    (tmp_path / "labels.csv").write_text("study,label\n")
    assert eval_main(["--data", str(tmp_path), "--labels", str(tmp_path / "labels.csv"), "--make-phantom", "2",
                      "--in-process"]) == 2
    assert "give one or the other" in capsys.readouterr().err


def test_a_nifti_volume_labelled_per_study_is_written_as_dicom_and_counted_per_patient(tmp_path, capsys):
    import nibabel as nib

    data = tmp_path / "vols"
    data.mkdir()
    hu = np.full((64, 64, 6), -1000, np.int16)
    hu[8:56, 8:56] = 40
    hu[12:30, 12:52] = -850
    hu[34:52, 12:52] = -850
    affine = np.diag([0.7, 0.7, 5.0, 1.0])
    nib.save(nib.Nifti1Image(hu, affine), data / "case 1.nii.gz")
    # a lung-windowed export (0-255): not Hounsfield units, refused before anything is screened
    nib.save(nib.Nifti1Image(((hu + 1000) // 8).clip(0, 255).astype(np.uint8), affine), data / "windowed.nii")
    (data / "labels.csv").write_text("study,label\ncase 1.nii.gz,no\n")
    work = tmp_path / "work"
    code, report, rows = _run(["--data", str(data), "--labels", str(data / "labels.csv"), "--in-process",
                               "--work", str(work), "--out", str(tmp_path / "r"), "-q"])
    assert code == (0 if report["goal"]["met"] else 1)
    assert [(r["case_id"], r["kind"], r["label"]) for r in rows] == [("case 1.nii.gz", "non-covid", 0)]
    assert len(rows[0]["result"]["slices"]) == 6 and rows[0]["slice_truth"] == {}
    (folder,) = (p for p in work.glob("vols-labels-*/*") if p.is_dir())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["label"] == 0 and "z_positions" not in manifest  # no per-slice truth for a later run either
    (data / "labels.csv").write_text("study,label\ncase 1.nii.gz,0\nwindowed.nii,0\n")
    assert eval_main(["--data", str(data), "--labels", str(data / "labels.csv"), "--in-process",
                      "--work", str(work), "--out", str(tmp_path / "r"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "windowed.nii: its values do not look like Hounsfield units" in err


@pytest.mark.triton
def test_a_labels_file_through_the_serving_path_agrees_with_the_reference(phantom_set, reference, triton, tmp_path):
    data = _centre_export(phantom_set, tmp_path)
    code, report, rows = _run(["--data", str(data), "--labels", str(data / "labels.csv"),
                               "--triton-url", triton.grpc_url, "--out", str(tmp_path / "served"), "-q"])
    assert report["n_failed"] == 0 and report["meta"]["serving_path"].startswith("embedded stack")
    assert [r["result"]["verdict"] for r in rows] == [r["result"]["verdict"] for r in reference[2]]
    assert [r["case_id"] for r in rows] == ["P0001", "P0002.zip"]


def _volume(path: Path, slices: int, body_hu: int = 40) -> None:
    import nibabel as nib

    hu = np.full((64, 64, slices), -1000, np.int16)
    hu[8:56, 8:56] = body_hu
    hu[12:30, 12:52] = -850
    hu[34:52, 12:52] = -850
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(hu, np.diag([0.7, 0.7, 5.0, 1.0])), path)


def test_a_converted_volume_is_never_screened_in_place_of_another(tmp_path):
    """The DICOM written from a NIfTI volume was reused by the volume's name alone: a second site's
    study_0001.nii.gz, a re-exported file, or "vol a" beside "vol_a" was screened as the first one written."""
    work = tmp_path / "work"

    def slices(data: Path, labels: str) -> list[int]:
        (data / "labels.csv").write_text(labels)
        code, report, rows = _run(["--data", str(data), "--labels", str(data / "labels.csv"), "--in-process",
                                   "--work", str(work), "--out", str(tmp_path / "r"), "-q"])
        assert report["n_failed"] == 0
        return [len(r["result"]["slices"]) for r in rows]

    for site, n in (("siteA", 6), ("siteB", 4)):  # the same folder name and file name at two sites
        _volume(tmp_path / site / "export" / "CT-1" / "study_0001.nii.gz", n)
        assert slices(tmp_path / site / "export", "study,label\nCT-1/study_0001.nii.gz,0\n") == [n]
    # ... and other studies to a gateway too (their own UIDs: through --url they would have been versions of one)
    uids = {json.loads(m.read_text())["study_instance_uid"] for m in work.glob("*/*/manifest.json")}
    assert len(uids) == 2
    data = tmp_path / "siteB" / "export"
    _volume(data / "CT-1" / "study_0001.nii.gz", 5)  # exported again
    assert slices(data, "study,label\nCT-1/study_0001.nii.gz,0\n") == [5]
    _volume(data / "vol a.nii.gz", 3)
    _volume(data / "vol_a.nii.gz", 7)
    assert slices(data, "study,label\nvol a.nii.gz,0\nvol_a.nii.gz,0\n") == [3, 7]
    # a folder in the way that this command did not write (here: a file added to it) is never deleted
    (folder,) = [m.parent for m in work.glob("export-labels-*/*/manifest.json")
                 if json.loads(m.read_text())["source"]["files"][0][0].endswith("/vol_a.nii.gz")]
    (folder / "notes.txt").write_text("mine")
    _volume(data / "vol_a.nii.gz", 8)
    (data / "labels.csv").write_text("study,label\nvol_a.nii.gz,0\n")
    assert eval_main(["--data", str(data), "--labels", str(data / "labels.csv"), "--in-process", "--work", str(work),
                      "--out", str(tmp_path / "r"), "-q"]) == 2
    assert (folder / "notes.txt").read_text() == "mine"


def test_a_volume_it_cannot_read_is_a_one_line_error_naming_it(tmp_path, capsys):
    import nibabel as nib

    _volume(tmp_path / "whole.nii.gz", 4)
    raw = (tmp_path / "whole.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])  # a copy cut short (was an EOFError traceback)
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.int16), np.eye(4)), tmp_path / "flat.nii")
    for name, message in (("cut.nii.gz", "cut.nii.gz: cannot read NIfTI"),
                          ("flat.nii", "flat.nii: expected a 3-D NIfTI image")):
        (tmp_path / "labels.csv").write_text(f"study,label\n{name},0\n")
        assert eval_main(["--data", str(tmp_path), "--labels", str(tmp_path / "labels.csv"), "--in-process",
                          "--work", str(tmp_path / "work"), "--out", str(tmp_path / "r"), "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    # --limit: only the studies evaluated are converted (a trial run of a large set)
    (tmp_path / "labels.csv").write_text("study,label\nwhole.nii.gz,0\ncut.nii.gz,0\n")
    code = eval_main(["--data", str(tmp_path), "--labels", str(tmp_path / "labels.csv"), "--in-process", "--limit", "1",
                      "--work", str(tmp_path / "work"), "--out", str(tmp_path / "r"), "-q"])
    assert code in (0, 1)


def test_a_work_folder_it_cannot_write_is_a_one_line_error(tmp_path, capsys):
    _volume(tmp_path / "v.nii.gz", 4)
    (tmp_path / "labels.csv").write_text("study,label\nv.nii.gz,0\n")
    (tmp_path / "work").write_text("a file where --work should be a folder")
    assert eval_main(["--data", str(tmp_path), "--labels", str(tmp_path / "labels.csv"), "--in-process",
                      "--work", str(tmp_path / "work"), "--out", str(tmp_path / "r"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ctscreen eval: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_a_study_that_fails_is_said_in_the_summary_and_its_row(tmp_path, capsys):
    (tmp_path / "P1").mkdir()
    (tmp_path / "P1" / "IM1").write_bytes(b"not a DICOM file")
    (tmp_path / "labels.csv").write_text("study,label\nP1,0\n")
    code, report, rows = _run(["--data", str(tmp_path), "--labels", str(tmp_path / "labels.csv"), "--in-process",
                               "--out", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert report["n_failed"] == 1 and rows[0]["error"] and code == 1
    assert "1 of 1 studies failed (counted positive; see the report's cases)" in out
    # a COVID-19 study that failed counts positive by default: the goal reads met, but the run measured
    # nothing, and its exit status says so (it was 0, what a CI gate on the exit status takes as a pass)
    (tmp_path / "labels.csv").write_text("study,label\nP1,1\n")
    code, report, _ = _run(["--data", str(tmp_path), "--labels", str(tmp_path / "labels.csv"), "--in-process",
                            "--out", str(tmp_path / "r"), "-q"])
    assert report["goal"]["met"] is True and code == 1
    row = next(line for line in (tmp_path / "r" / "report.md").read_text().splitlines() if line.startswith("| P1 |"))
    # counted positive, it is one of Table 3's true positives: not marked wrong, its error in the row
    assert "| failed |" in row and "**x**" not in row and rows[0]["error"].split(":")[0] in row


def test_a_nifti_volume_with_its_lesion_mask_counts_per_image_too(tmp_path, capsys):
    import nibabel as nib

    data = tmp_path / "set"
    _volume(data / "vols" / "c1.nii.gz", 6)
    _volume(data / "vols" / "n1.nii.gz", 6)
    mask = np.zeros((64, 64, 6), np.uint8)
    mask[15:25, 15:25, 1:5] = 1  # slices 1-4: a 10 x 10 lesion, 6400 pixels on the 512 grid
    (data / "masks").mkdir()
    nib.save(nib.Nifti1Image(mask, np.diag([0.7, 0.7, 5.0, 1.0])), data / "masks" / "c1.nii.gz")
    (data / "labels.csv").write_text("study,label,mask\nvols/c1.nii.gz,1,masks/c1.nii.gz\nvols/n1.nii.gz,0,\n")
    code, report, rows = _run(["--data", str(data), "--labels", str(data / "labels.csv"), "--in-process",
                               "--work", str(tmp_path / "work"), "--out", str(tmp_path / "r"), "-q"])
    assert sum(rows[0]["slice_truth"].values()) == 4 and len(rows[0]["slice_truth"]) == 6
    assert rows[1]["slice_truth"] == {}  # no mask: per patient only
    assert report["per_image"]["tp"] + report["per_image"]["fn"] == 4
    assert "per-image truth from the lesion masks of 1 of 2 studies" in (tmp_path / "r" / "report.md").read_text()
    (data / "P1").mkdir()
    (data / "P1" / "IM1").write_bytes(b"x")
    nib.save(nib.Nifti1Image(mask * 0, np.diag([0.7, 0.7, 5.0, 1.0])), data / "masks" / "empty.nii.gz")
    for labels, message in (("study,label,mask\nvols/c1.nii.gz,0,masks/c1.nii.gz\n",
                             "vols/c1.nii.gz: labelled negative, but its lesion mask marks lesions"),
                            ("study,label,mask\nvols/c1.nii.gz,1,masks/empty.nii.gz\n",
                             "vols/c1.nii.gz: labelled positive, but its lesion mask marks none"),
                            ("study,label,mask\nP1,1,masks/c1.nii.gz\n",
                             "line 2: mask 'masks/c1.nii.gz' of the DICOM study 'P1' is no DICOM Segmentation (SEG)"),
                            ("study,label,mask\nvols/c1.nii.gz,1,masks/none.nii.gz\n",
                             "line 2: mask 'masks/none.nii.gz' of the NIfTI volume 'vols/c1.nii.gz' is no NIfTI file "
                             "under --data")):
        (data / "labels.csv").write_text(labels)
        assert eval_main(["--data", str(data), "--labels", str(data / "labels.csv"), "--in-process",
                          "--work", str(tmp_path / "work"), "--out", str(tmp_path / "r"), "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_a_study_that_is_no_ct_fails_with_the_reason_the_upload_route_gives(phantom_set, tmp_path):
    """In process, an MR series failed as no_usable_series where the serving path answers not_ct (the API's
    narrowing of a refusal every file shares lived in its exception handler): one rule, both paths."""
    import pydicom

    covid = next(p for p in sorted(phantom_set.iterdir()) if (p / "manifest.json").is_file())
    (tmp_path / "MR1").mkdir()
    for i, f in enumerate(sorted((covid / "dicom").iterdir())[:3]):
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(tmp_path / "MR1" / f"IM{i}")
    (tmp_path / "labels.csv").write_text("study,label\nMR1,0\n")
    code, report, rows = _run(["--data", str(tmp_path), "--labels", str(tmp_path / "labels.csv"), "--in-process",
                               "--out", str(tmp_path / "r"), "-q"])
    assert rows[0]["error"].startswith("not_ct: ") and "Modality is 'MR'" in rows[0]["error"], rows[0]["error"]


@pytest.mark.triton
def test_eval_against_a_gateway_that_asks_for_a_credential_sends_ctscreen_token(phantom_set, triton, tmp_path,
                                                                                  monkeypatch, capsys):
    """ctscreen eval --url sent no credential: against a cluster's gateway every upload was refused (401), every
    study a failed row counted positive. It sends $CTSCREEN_TOKEN as ctscreen screen does, and a refused
    credential ends the run with one line instead of a report of failures."""
    from gateway.cli import run_stack
    from gateway.keys import KeyStore

    keyfile = tmp_path / "keys.json"
    key, _ = KeyStore(keyfile).add("evaluator", ["studies:write", "results:read"])
    argv = ["--data", str(phantom_set), "--url", "", "--out", str(tmp_path / "r"), "-q", "--limit", "1"]
    with run_stack(port=0, triton_url=triton.grpc_url, settings_overrides={"auth_api_keys_file": keyfile}) as stack:
        argv[3] = stack.url
        monkeypatch.delenv("CTSCREEN_TOKEN", raising=False)
        assert eval_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "refuses the credential (unauthorized): set CTSCREEN_TOKEN" in err and len(err.splitlines()) == 1
        monkeypatch.setenv("CTSCREEN_TOKEN", key)
        code, report, rows = _run(argv)
        assert report["n_failed"] == 0 and rows[0]["result"]["verdict"] in ("positive", "negative")


def test_a_mask_is_taken_voxel_for_voxel_on_the_volumes_grid(tmp_path):
    """A mask whose header placed it otherwise than its volume (here z flipped) was turned by its own header:
    its lesions landed on other slices and the per-image truth was wrong, silently."""
    import doctest

    import nibabel as nib

    import evaluation.dataset
    import evaluation.seg

    assert doctest.testmod(evaluation.dataset).failed == 0  # _contradicts' cases
    assert doctest.testmod(evaluation.seg).failed == 0  # lesion_segments' cases
    data = tmp_path / "set"
    (data / "masks").mkdir(parents=True)
    hu = np.full((64, 64, 30), -1000, np.int16)
    hu[8:56, 8:56] = 40
    hu[12:30, 12:52] = -850
    hu[34:52, 12:52] = -850
    flipped = np.diag([0.7, 0.7, -5.0, 1.0])
    nib.save(nib.Nifti1Image(hu, flipped), data / "v.nii.gz")
    mask = np.zeros(hu.shape, np.uint8)
    mask[15:25, 15:25, 2:8] = 1  # voxel slices 2-7 of the volume's array
    nib.save(nib.Nifti1Image(mask, flipped), data / "masks" / "same.nii.gz")
    nib.save(nib.Nifti1Image(mask, np.diag([0.7, 0.7, 5.0, 1.0])), data / "masks" / "other.nii.gz")
    truths = []
    for name in ("same", "other"):
        (data / "labels.csv").write_text(f"study,label,mask\nv.nii.gz,1,masks/{name}.nii.gz\n")
        code, report, rows = _run(["--data", str(data), "--labels", str(data / "labels.csv"), "--in-process",
                                   "--work", str(tmp_path / f"work-{name}"), "--out", str(tmp_path / "r"), "-q"])
        truths.append(sorted(round(s["position_mm"]) for s in rows[0]["result"]["slices"]
                             if rows[0]["slice_truth"].get(s["sop_instance_uid"])))
    assert len(truths[0]) == 6 and truths[0] == truths[1]


def _seg(sources: list[Path], lesion: np.ndarray, out: Path, *, lungs: bool = True, anatomy_only: bool = False,
         lungs_as_tissue: bool = False, labelmap: bool = False) -> Path:
    """A DICOM SEG of ``sources`` (in order) as highdicom writes it: the lungs (anatomy, or filed under Tissue as
    some converters do) and the lesions (under Anatomical Structure too with ``anatomy_only``, as MONAI Label's
    writer files every segment); a label-map SEG with ``labelmap``."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    images = [pydicom.dcmread(f) for f in sources]
    algorithm = hd.seg.SegmentAlgorithmTypeValues.MANUAL
    described = []
    arrays = []
    if lungs:
        tissue = Code("85756007", "SCT", "Tissue")
        described.append((tissue if lungs_as_tissue else codes.SCT.AnatomicalStructure, codes.SCT.Lung, "lungs"))
        body = np.zeros_like(lesion)
        body[:, 40:200, 30:220] = True  # a lung-field box: anatomy, never counted
        arrays.append(body)
    category = codes.SCT.AnatomicalStructure if anatomy_only else codes.SCT.MorphologicallyAbnormalStructure
    described.append((category, codes.SCT.Lesion, "ground-glass opacity"))
    arrays.append(lesion)
    descriptions = [hd.seg.SegmentDescription(segment_number=i, segment_label=label, segmented_property_category=cat,
                                              segmented_property_type=kind, algorithm_type=algorithm)
                    for i, (cat, kind, label) in enumerate(described, 1)]
    if labelmap:  # one value a pixel: the lesion's number over the lungs'
        pixels = np.zeros(lesion.shape, np.uint8)
        for number, array in enumerate(arrays, 1):
            pixels[array.astype(bool)] = number
        kind_of = hd.seg.SegmentationTypeValues.LABELMAP
    else:
        pixels, kind_of = np.stack(arrays, axis=-1).astype(bool), hd.seg.SegmentationTypeValues.BINARY
    seg = hd.seg.Segmentation(
        source_images=images, pixel_array=pixels, segmentation_type=kind_of, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=300, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="test", manufacturer_model_name="test", software_versions="1", device_serial_number="1")
    out.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out)
    return out


def test_a_dicom_study_with_its_dicom_seg_counts_per_image_as_its_phantom_truth(phantom_set, reference, tmp_path,
                                                                               caplog):
    """A centre's lesion annotations are DICOM SEG objects beside the images; a labels file's ``mask`` took NIfTI
    only, so a DICOM study counted per patient alone. The SEG of the phantom's own lesion mask gives each slice
    the truth its manifest gives (the lungs' segment, anatomy, not counted)."""
    import shutil

    import phantom
    from training.datasets import PHANTOM_EVAL_SEED0, phantom_kind

    covid = next(p for p in sorted(phantom_set.iterdir()) if "covid" in p.name)
    i = int(covid.name.split("-")[0])
    study = phantom.make_study(PHANTOM_EVAL_SEED0 + i, kind=phantom_kind(i), n_slices=N_SLICES)
    manifest = json.loads((covid / "manifest.json").read_text())
    files = {int(f["index"]): covid / f["file"] for f in manifest["files"]}
    sources = [files[k] for k in sorted(files)]
    data = tmp_path / "export"
    shutil.copytree(covid / "dicom", data / "P0001")
    _seg(sources, study.lesion_mask.astype(bool), data / "seg" / "P0001-lesions.dcm")
    (data / "labels.csv").write_text("study,label,mask\nP0001,1,seg/P0001-lesions.dcm\n")
    code, report, rows = _run(["--data", str(data), "--labels", str(data / "labels.csv"), "--in-process",
                               "--out", str(tmp_path / "r"), "-q"])
    ref = next(r for r in reference[2] if r["case_id"] == covid.name)
    assert ref["slice_truth"] and any(ref["slice_truth"].values())
    assert rows[0]["slice_truth"] == ref["slice_truth"]
    assert report["per_image"]["n"] == len(ref["slice_truth"])
    md = (tmp_path / "r" / "report.md").read_text()
    assert "per-image truth from the lesion masks of 1 of 1 studies" in md
    assert "DICOM SEG segments counted as lesions: 'ground-glass opacity'" in md
    # the same truth from the SEGs tools write otherwise: the lungs filed under Tissue (not counted: their type is
    # the lung), a label map, every segment filed as anatomy (MONAI Label's writer) with the lesions named
    for name, options, argv in (("tissue.dcm", {"lungs_as_tissue": True}, []), ("map.dcm", {"labelmap": True}, []),
                                ("monai.dcm", {"anatomy_only": True}, ["--lesion-segments", "Ground-glass opacity"])):
        _seg(sources, study.lesion_mask.astype(bool), data / "seg" / name, **options)
        (data / "labels.csv").write_text(f"study,label,mask\nP0001,1,seg/{name}\n")
        code, report, rows = _run(["--data", str(data), "--labels", str(data / "labels.csv"), "--in-process",
                                   "--out", str(tmp_path / name), "-q", *argv])
        assert rows[0]["slice_truth"] == ref["slice_truth"], name
    # a SEG whose Referenced Series Sequence names 3 of its images: the slices of the rest are left out (never
    # guessed), and highdicom's warning a frame stays out of the output
    import pydicom

    ds = pydicom.dcmread(data / "seg" / "P0001-lesions.dcm")
    named = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence = named[:3]
    ds.save_as(data / "seg" / "three.dcm")
    (data / "labels.csv").write_text("study,label,mask\nP0001,1,seg/three.dcm\n")
    caplog.clear()
    code, report, rows = _run(["--data", str(data), "--labels", str(data / "labels.csv"), "--in-process",
                               "--out", str(tmp_path / "three"), "-q"])
    three = {str(item.ReferencedSOPInstanceUID) for item in named[:3]}
    assert set(rows[0]["slice_truth"]) <= three and rows[0]["slice_truth"]
    assert all(ref["slice_truth"][k] == v for k, v in rows[0]["slice_truth"].items())
    assert not [r for r in caplog.records if r.name.startswith("highdicom")]

    # a SEG of another series: nothing matches, said, and the study counts per patient only
    other = tmp_path / "other"
    shutil.copytree(covid / "dicom", other)
    import highdicom as hd
    import pydicom

    for f in other.iterdir():
        ds = pydicom.dcmread(f)
        ds.SOPInstanceUID, ds.SeriesInstanceUID = hd.UID(), "1.2.3.4.5"
        ds.save_as(f)
    _seg(sorted(other.iterdir()), np.ones(study.lesion_mask.shape, bool), data / "seg" / "other.dcm", lungs=False)
    (data / "labels.csv").write_text("study,label,mask\nP0001,1,seg/other.dcm\n")
    with caplog.at_level("WARNING", logger="evaluation.seg"):
        code, report, rows = _run(["--data", str(data), "--labels", str(data / "labels.csv"), "--in-process",
                                   "--out", str(tmp_path / "r2"), "-q"])
    assert rows[0]["slice_truth"] == {} and rows[0]["result"]["verdict"] == ref["result"]["verdict"]
    assert "line 2: P0001: the mask references none of the" in caplog.text
    assert "lesion masks of 0 of 1 studies (1 mask(s) matched none of the screened slices" in (
        tmp_path / "r2" / "report.md").read_text()


def test_a_mask_it_cannot_use_stops_the_run_naming_the_line(phantom_set, tmp_path, capsys, caplog):
    """A mask that is no SEG for a DICOM study, a SEG of anatomy only, a SEG that contradicts the label, a SEG
    for a NIfTI volume: each one line naming the labels file's line, before anything is screened."""
    import shutil

    covid = next(p for p in sorted(phantom_set.iterdir()) if "covid" in p.name)
    sources = sorted((covid / "dicom").iterdir())
    data = tmp_path / "export"
    shutil.copytree(covid / "dicom", data / "P0001")
    import pydicom

    first = pydicom.dcmread(sources[0], stop_before_pixels=True)
    empty = np.zeros((len(sources), first.Rows, first.Columns), bool)
    some = empty.copy()
    some[2, 100:120, 100:120] = True
    _seg(sources, some, data / "seg" / "lesions.dcm")
    _seg(sources, some, data / "seg" / "lungs.dcm", anatomy_only=True)
    _seg(sources, empty, data / "seg" / "empty.dcm")
    (data / "seg" / "notes.txt").write_text("not a SEG")
    cut = (data / "seg" / "lesions.dcm").read_bytes()
    (data / "seg" / "cut.dcm").write_bytes(cut[: len(cut) * 2 // 3])
    ds = pydicom.dcmread(data / "seg" / "lesions.dcm")
    del ds.ReferencedSeriesSequence
    ds.save_as(data / "seg" / "unreferenced.dcm")
    ds = pydicom.dcmread(data / "seg" / "lesions.dcm")
    ds.StudyInstanceUID = "1.2.3.4.5.6"
    ds.save_as(data / "seg" / "another-study.dcm")
    _volume(data / "vols" / "v.nii.gz", 6)
    for labels, message in (
        ("study,label,mask\nP0001,1,seg/notes.txt\n",
         "line 2: mask 'seg/notes.txt' of the DICOM study 'P0001' is no DICOM Segmentation (SEG) file under --data"),
        ("study,label,mask\nP0001,1,P0001/" + sources[0].name + "\n", "is no DICOM Segmentation (SEG) file"),  # a CT image
        ("study,label,mask\nP0001,1,seg/lungs.dcm\n", "line 2: mask 'seg/lungs.dcm' segments anatomy only (its segments: "
         "'lungs', 'ground-glass opacity'); if some are the lesions, name them with --lesion-segments"),
        ("study,label,mask\nP0001,1,seg/cut.dcm\n", "line 2: mask 'seg/cut.dcm' is cut short"),
        ("study,label,mask\nP0001,1,seg/unreferenced.dcm\n", "line 2: mask 'seg/unreferenced.dcm' has no Referenced Series"),
        ("study,label,mask\nP0001,1,seg/another-study.dcm\n",
         "line 2: mask 'seg/another-study.dcm' segments another study than 'P0001'"),
        ("study,label,mask\n\nP0001,0,seg/lesions.dcm\n",
         "line 3: P0001: labelled negative, but its lesion mask marks lesions"),
        ("study,label,mask\nP0001,1,seg/empty.dcm\n", "line 2: P0001: labelled positive, but its lesion mask marks none"),
        ("study,label,mask\nvols/v.nii.gz,1,seg/lesions.dcm\n",
         "line 2: mask 'seg/lesions.dcm' of the NIfTI volume 'vols/v.nii.gz' is no NIfTI file under --data"),
    ):
        (data / "labels.csv").write_text(labels)
        caplog.clear()
        assert eval_main(["--data", str(data), "--labels", str(data / "labels.csv"), "--in-process",
                          "--work", str(tmp_path / "work"), "--out", str(tmp_path / "r"), "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not [r for r in caplog.records if r.name.startswith("highdicom")]  # one line, not a warning a frame
    (data / "labels.csv").write_text("study,label,mask\nP0001,1,seg/lesions.dcm\n")
    assert eval_main(["--data", str(data), "--labels", str(data / "labels.csv"), "--in-process", "--lesion-segments",
                      "consolidation", "--out", str(tmp_path / "r"), "-q"]) == 2
    assert ("line 2: mask 'seg/lesions.dcm' has no segment named 'consolidation' (its segments: 'lungs', "
            "'ground-glass opacity')") in capsys.readouterr().err


def test_refusals_met_while_converting_a_volume_name_the_labels_line(tmp_path, capsys):
    """A volume refused while it is written as DICOM (not in HU) named the volume only; the line of the labels
    file that names it is said too, as for every other refusal of the file."""
    import nibabel as nib

    data = tmp_path / "set"
    (data / "vols").mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.full((32, 32, 4), 128, np.uint8), np.eye(4)), data / "vols" / "windowed.nii.gz")
    (data / "labels.csv").write_text("study,label\n\nvols/windowed.nii.gz,0\n")
    assert eval_main(["--data", str(data), "--labels", str(data / "labels.csv"), "--in-process",
                      "--work", str(tmp_path / "work"), "--out", str(tmp_path / "r"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "labels.csv, line 3: vols/windowed.nii.gz: its values do not look like Hounsfield units" in err, err


def test_a_utf8_labels_file_with_one_windows_line_keeps_its_other_names(tmp_path):
    """One stray Windows-1252 byte made the whole UTF-8 file read as Windows-1252: every other non-ASCII name came
    out garbled ('ZÃ¼rich') and 'not under --data'. Each line is read in the encoding it is in."""
    from evaluation.dataset import read_labels

    for name in ("Z\u00fcrich P1", "Montr\u00e9al P2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "IM1").write_bytes(b"x")
    (tmp_path / "labels.csv").write_bytes("\ufeffstudy,label\nZ\u00fcrich P1,1\n".encode()
                                          + "Montr\u00e9al P2,0\n".encode("cp1252"))
    rows = read_labels(tmp_path / "labels.csv", tmp_path)
    assert [(r.study, r.label) for r in rows] == [("Z\u00fcrich P1", True), ("Montr\u00e9al P2", False)]


def _body(shape: tuple[int, int, int]) -> np.ndarray:
    """A volume in HU, x, y, z: air, a body and two lungs."""
    hu = np.full(shape, -1000, np.int16)
    hu[4:-4, 4:-4] = 40
    hu[8 : shape[0] // 2 - 2, 8:-8] = -850
    hu[shape[0] // 2 + 2 : -8, 8:-8] = -850
    return hu


def test_a_nifti_mask_in_another_voxel_order_is_read_where_its_header_puts_it(tmp_path):
    """A review: the volume stored head first (dcm2niix), the mask of the same voxels saved canonical (RAS, as
    nibabel's as_closest_canonical writes it). Taken voxel for voxel, its lesions landed on the mirror slices."""
    import nibabel as nib

    from training.datasets import load_nifti_case

    hu = _body((64, 64, 30))
    head_first = np.array([[0.7, 0, 0, 0], [0, 0.7, 0, 0], [0, 0, -5.0, 100.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(hu, head_first), tmp_path / "v.nii.gz")
    mask = np.zeros(hu.shape, np.uint8)
    mask[15:25, 15:25, 2:8] = 1  # array slices 2-7: the volume's z 90 to 65 mm
    nib.save(nib.Nifti1Image(mask, head_first), tmp_path / "same.nii.gz")
    nib.save(nib.as_closest_canonical(nib.Nifti1Image(mask, head_first)), tmp_path / "canonical.nii.gz")
    assert not np.allclose(nib.load(tmp_path / "canonical.nii.gz").affine, head_first)
    lesion_slices = [np.flatnonzero(load_nifti_case("v", tmp_path / "v.nii.gz", tmp_path / f"{m}.nii.gz").lesion
                                    .any(axis=(1, 2))).tolist() for m in ("same", "canonical")]
    assert lesion_slices[0] == lesion_slices[1] == list(range(22, 28))  # lowest first: array slices 7..2


def test_a_nifti_mask_of_several_labels_is_refused_unless_its_lesion_labels_are_named(tmp_path):
    """COVID-19-CT-Seg's Lung_and_Infection_Mask (1, 2 lungs, 3 infection): every lung slice was a lesion slice."""
    import nibabel as nib

    from training.datasets import DataError, load_nifti_case

    hu = _body((64, 64, 20))
    mask = np.zeros(hu.shape, np.uint8)
    mask[8:30, 8:-8, 2:18] = 1
    mask[34:-8, 8:-8, 2:18] = 2
    mask[15:25, 15:25, 5:9] = 3
    affine = np.diag([0.7, 0.7, 5.0, 1.0])
    nib.save(nib.Nifti1Image(hu, affine), tmp_path / "v.nii.gz")
    nib.save(nib.Nifti1Image(mask, affine), tmp_path / "m.nii.gz")
    with pytest.raises(DataError, match=r"several labels \(1, 2, 3\).*--lesion-segments 3"):
        load_nifti_case("v", tmp_path / "v.nii.gz", tmp_path / "m.nii.gz", lesion_labels=())
    named = load_nifti_case("v", tmp_path / "v.nii.gz", tmp_path / "m.nii.gz", lesion_labels=(3,))
    assert np.flatnonzero(named.lesion.any(axis=(1, 2))).tolist() == [5, 6, 7, 8]
    assert load_nifti_case("v", tmp_path / "v.nii.gz", tmp_path / "m.nii.gz").lesion.any(axis=(1, 2)).sum() == 16


def test_a_nifti_volume_of_non_square_slices_keeps_square_pixels_and_nan_is_air(tmp_path):
    """A 384 x 512 slice (0.7 mm pixels) was stretched to the square grid, its chest 1.33 times too tall; NaN
    outside a reconstruction circle became 0 HU (soft tissue)."""
    import nibabel as nib

    from training.datasets import load_nifti_case

    hu = _body((64, 48, 4)).astype(np.float32)  # x 64 columns, y 48 rows
    hu[0, 0, :] = np.nan
    nib.save(nib.Nifti1Image(hu, np.diag([0.7, 0.7, 5.0, 1.0])), tmp_path / "v.nii.gz")
    v = load_nifti_case("v", tmp_path / "v.nii.gz", None)
    rows_with_body = np.flatnonzero((v.hu[0] > -500).any(axis=1))
    height = rows_with_body[-1] - rows_with_body[0] + 1
    width = np.ptp(np.flatnonzero((v.hu[0] > -500).any(axis=0))) + 1
    assert abs(height / width - 40 / 56) < 0.03, (height, width)  # the body's 40 x 56 voxels, not stretched
    assert v.meta["grid_mm"] == pytest.approx(64 * 0.7 / 512)
    assert v.hu.min() >= -1024 and not (v.hu == 0).any()
