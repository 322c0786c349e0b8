"""The labelled set of ``ctscreen eval``: studies on disk with their truth.

A set is a folder of phantom studies as ``ctscreen phantom`` writes them (one folder per study with its
DICOM files and ``manifest.json``, format ``ctscreen-phantom/1``); :func:`make_phantom_set` writes the
held-out phantom set, and :func:`write_nifti_set` writes a NIfTI set (the training layout) as such
studies. :func:`discover` reads the set back as :class:`LabelledCase` records.

A centre's own studies need no manifest: :func:`read_labels` reads a labels file (CSV: ``study``, ``label``
and optionally ``kind`` and ``mask``), one row per study, the study being a folder of DICOM files, a DICOM
file, a zip or a NIfTI volume under the set's folder, and :func:`labelled_cases` makes its cases (a NIfTI
volume is first written as a DICOM study). Such cases have a per-patient truth only, unless a study comes with
its lesion mask (a NIfTI volume's NIfTI mask, a DICOM study's DICOM SEG, :mod:`evaluation.seg`): then its
slices count per image too.

Per-image truth: a slice is positive when its lesion mask covers more than ``min_px`` pixels (default
25, the paper's box size), negative when it covers none; slices in between (a lesion's tip) are left
out of the per-image metrics.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import re
import shutil
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.schema import CaseResult
from ctscreen.contracts import MIN_BOX_AREA
from evaluation import EvalError
from evaluation.seg import SEG_SOP_CLASSES, is_seg, read_seg, slice_truth_from_seg
from gateway.client import CliError, collect_files

logger = logging.getLogger(__name__)


@dataclass
class LabelledCase:
    """One study of the set on disk, with its truth."""

    case_id: str
    kind: str
    label: bool
    path: Path
    slice_truth: Callable[[CaseResult | None], dict[str, bool]]
    """Truth per image for the slices of a result (by SOP Instance UID); given None (the study failed), for every
    slice the truth knows, so the report can say what the per-image row lacks."""
    lesion_segments: tuple[str, ...] = ()
    """The labels of the segments of its DICOM SEG counted as lesions (none without a SEG)."""
    patient: int | None = None
    """A labels file's DICOM study: the index (in the file's rows) of the first study of its patient, by Patient ID
    (compared, never kept); None when its files state none, or for a NIfTI volume."""


def slice_truth_from_manifest(manifest: dict[str, Any], min_px: int = MIN_BOX_AREA
                              ) -> Callable[[CaseResult | None], dict[str, bool]]:
    """Per-image truth of a phantom study (``ctscreen-phantom/1`` manifest).

    The manifest gives the lesion area of each lesion slice by slice index, and for each index its
    SOP Instance UID (``files``) and z position (``z_positions``; the slices are axial, so z is the
    position along the normal). A result slice is matched by SOP Instance UID, or else to the slice
    nearest its ``position_mm`` within half the slice spacing. It is positive above ``min_px`` lesion
    pixels, negative at 0, and left out in between or when it matches no slice. Given None (the study failed),
    the truth of every slice of the manifest, keyed by its SOP Instance UID (or ``#index`` when it states none).
    """
    zs = np.asarray(manifest.get("z_positions") or [], dtype=float)
    if zs.size == 0:
        return lambda result: {}
    area = np.zeros(len(zs), dtype=int)
    lesion_slices = manifest.get("lesion_slices") or []
    area[np.asarray(lesion_slices, dtype=int)] = np.asarray(manifest.get("lesion_area_px") or [], dtype=int)
    by_uid = {f["sop_instance_uid"]: int(f["index"]) for f in manifest.get("files") or []
              if isinstance(f, dict) and "sop_instance_uid" in f and "index" in f}
    spacing = float(manifest.get("slice_spacing") or (np.median(np.diff(np.sort(zs))) if zs.size > 1 else 1.0))

    def index_of(uid: str, position_mm: float) -> int | None:
        if uid in by_uid:
            return by_uid[uid]
        k = int(np.argmin(np.abs(zs - position_mm)))
        return k if abs(zs[k] - position_mm) <= spacing / 2 else None

    def truth(result: CaseResult | None) -> dict[str, bool]:
        slices: list[tuple[str, int | None]]
        if result is None:
            uid_of = {k: uid for uid, k in by_uid.items()}
            slices = [(uid_of.get(k, f"#{k}"), k) for k in range(len(area))]
        else:
            slices = [(f.sop_instance_uid, index_of(f.sop_instance_uid, f.position_mm)) for f in result.slices]
        out = {}
        for uid, k in slices:
            if k is None or not 0 <= k < len(area):
                continue
            px = int(area[k])
            if px == 0 or px > min_px:
                out[uid] = px > min_px
        return out

    return truth


def discover(data: Path, min_px: int = MIN_BOX_AREA) -> list[LabelledCase]:
    """Every labelled study under ``data`` (folders holding a ``manifest.json``), sorted by name."""
    if not data.is_dir():
        raise EvalError(f"--data {data}: not a directory")
    cases = []
    for manifest_path in sorted(data.rglob("manifest.json")):
        folder = manifest_path.parent
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise EvalError(f"{manifest_path}: unreadable manifest ({exc})") from exc
        kind = str(manifest.get("kind", "unknown"))
        label = manifest.get("label")
        if label is None:
            label = kind == "covid"
        cases.append(LabelledCase(
            case_id=str(folder.relative_to(data)) if folder != data else folder.name,
            kind=kind, label=bool(int(label)), path=folder,
            slice_truth=slice_truth_from_manifest(manifest, min_px),
        ))
    if not cases:
        raise EvalError(f"--data {data}: no study with a manifest.json (write the phantom set with --make-phantom N, "
                        "or name your own studies and their labels with --labels FILE)")
    return cases


LABEL_WORDS = {"1": True, "0": False, "positive": True, "negative": False, "yes": True, "no": False,
               "true": True, "false": False}
"""How a labels file may write a study's truth (any case): 1 / positive / yes / true is COVID-19 pneumonia."""


@dataclass(frozen=True)
class StudyLabel:
    """One row of a labels file: a study under the set's folder and its truth."""

    study: str
    """The row's ``study`` as written (the case's name in the report)."""
    path: Path
    label: bool
    kind: str
    """The row's ``kind``, or ``covid`` / ``non-covid`` from the label: the class of the report's
    false-positive table."""
    mask: Path | None = None
    """The study's lesion mask (the row's ``mask``): a NIfTI volume's NIfTI mask, a DICOM study's DICOM SEG;
    per-image truth for its slices."""
    where: str = ""
    """Where the row is (``--labels FILE, line N``): the start of a message about it."""
    mask_text: str = ""
    """The row's ``mask`` as written (how messages name it)."""


def _labels_text(labels: Path) -> str:
    """The labels file's text: UTF-8 (a byte-order mark skipped), UTF-16 with its mark (a spreadsheet's
    "Unicode text"), else Windows-1252 (a spreadsheet's plain "CSV" on Windows), line by line: a UTF-8 file
    with one line edited in a Windows tool keeps its other lines' names as written.
    """
    try:
        raw = labels.read_bytes()
    except OSError as exc:
        raise EvalError(f"--labels {labels}: cannot read it ({exc.strerror or exc})") from exc
    if raw.startswith(b"PK\x03\x04"):
        raise EvalError(f"--labels {labels}: a workbook (.xlsx), not CSV: save it as CSV UTF-8")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    lines = []
    for line in raw.split(b"\n"):  # "\n" is one byte in both: a line is decoded whole, one way or the other
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(line.decode("cp1252", errors="replace"))
    return "\n".join(lines)


def _header(lines: list[str]) -> tuple[str, int]:
    """The delimiter and the header's line index (blank lines before it skipped): Excel's ``sep=;`` line names
    the delimiter; else the one of ``,`` ``;`` tab that splits the header into a ``study`` and a ``label``
    column (``,`` when none does)."""
    at = next(i for i, line in enumerate(lines) if line.strip())
    first = lines[at].rstrip("\r\n")
    if first.lower().startswith("sep=") and len(first) == 5:
        return first[4], at + 1
    for sep in (",", ";", "\t"):
        cells = [c.strip().strip('"').lower() for c in first.split(sep)]
        if "study" in cells and "label" in cells:
            return sep, at
    return ",", at


def read_labels(labels: Path, data: Path) -> list[StudyLabel]:
    """The rows of a labels file, their studies checked to exist under ``data``.

    The file is CSV as spreadsheets write it (``,`` ``;`` or tab; Excel's ``sep=`` line; UTF-8 with or without
    a byte-order mark, UTF-16, Windows-1252) with a header row naming ``study`` and ``label`` (any case;
    further columns are ignored) and optionally ``kind`` and ``mask``. ``study`` is a path under ``data`` (``/``
    or ``\\``): a folder of one study's DICOM files (any depth), one DICOM file, a zip, or a NIfTI volume
    (``.nii``, ``.nii.gz``) in Hounsfield units; ``mask``, the study's lesion mask: for a NIfTI volume a NIfTI of
    the same grid (lesion where not 0), for a DICOM study a DICOM SEG file of it (:mod:`evaluation.seg`).
    ``label`` is one of :data:`LABEL_WORDS`. Blank lines are skipped.

    Raises
    ------
    EvalError
        The file cannot be read, lacks a column or names one twice, or a row names no study, a study twice, a study that is
        not there or an empty folder, a label it does not know, or a kind that contradicts the label (the
        line number said).
    """
    text = _labels_text(labels)
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # CSV's line ends only (splitlines also
    # breaks at U+2028 and the like inside a cell, which shifted every line number after it)
    if not any(line.strip() for line in lines):
        raise EvalError(f"--labels {labels}: the file is empty (expected a header row: study,label[,kind])")
    sep, skip = _header(lines)
    source = io.StringIO("\n".join(lines[skip:]) + "\n")
    reader = csv.reader(source, delimiter=sep)
    header = [h.strip().lower() for h in next(reader, [])]
    missing = [c for c in ("study", "label") if c not in header]
    if missing:
        raise EvalError(f"--labels {labels}: no {' or '.join(missing)} column in the header row "
                        f"(found: {', '.join(h for h in header if h) or 'nothing'}; expected study,label[,kind])")
    twice = [name for name in ("study", "label", "kind", "mask") if header.count(name) > 1]
    if twice:  # a sheet merged from two (the first reading's label and the second's): which one is the truth?
        name = twice[0]
        at = [str(i + 1) for i, h in enumerate(header) if h == name]
        raise EvalError(f"--labels {labels}: the header row names a {name} column {len(at)} times (columns "
                        f"{', '.join(at)}): keep one, or rename the others")
    col: dict[str, int] = {name: header.index(name) for name in ("study", "label", "kind", "mask") if name in header}
    rows: list[StudyLabel] = []
    seen: dict[str, int] = {}
    end = reader.line_num
    for cells in reader:
        number, end = end + 1 + skip, reader.line_num  # the record's first line in the file (a quoted cell may span lines)
        if not any(c.strip() for c in cells):
            continue
        value = {name: cells[i].strip() if i < len(cells) else "" for name, i in col.items()}
        where = f"--labels {labels}, line {number}"
        study, word, kind, mask = value["study"], value["label"], value.get("kind", ""), value.get("mask", "")
        if not study:
            raise EvalError(f"{where}: no study named")
        if word.lower() not in LABEL_WORDS:
            raise EvalError(f"{where}: label {word!r} of {study!r} is not one of "
                            f"{', '.join(LABEL_WORDS)}" if word else f"{where}: {study!r} has no label")
        label = LABEL_WORDS[word.lower()]
        if _contradicts(kind, label):
            raise EvalError(f"{where}: kind {kind!r} of {study!r} contradicts its label {word!r}")
        path = data / study.replace("\\", "/")
        key = str(path.resolve())
        if key in seen:
            raise EvalError(f"{where}: {study!r} is named again (first on line {seen[key]})")
        seen[key] = number
        if not path.exists():
            where_not = "no such file or folder" if Path(study).is_absolute() else f"not under --data {data}"
            raise EvalError(f"{where}: {study!r}: {where_not}")
        if path.is_dir():
            try:
                collect_files(path)  # what an upload of it would send
            except CliError:
                raise EvalError(f"{where}: {study!r} holds no file to screen (empty, or only hidden files and "
                                "non-DICOM ones such as .json .png .nii)") from None
        mask_path = data / mask.replace("\\", "/") if mask else None
        if mask_path is not None and is_nifti(path) and not is_nifti(mask_path):
            raise EvalError(f"{where}: mask {mask!r} of the NIfTI volume {study!r} is no NIfTI file under --data")
        if mask_path is not None and not is_nifti(path) and not (mask_path.is_file() and is_seg(mask_path)):
            raise EvalError(f"{where}: mask {mask!r} of the DICOM study {study!r} is no DICOM Segmentation (SEG) "
                            "file under --data")
        rows.append(StudyLabel(study, path, label, kind or ("covid" if label else "non-covid"), mask_path, where, mask))
    if not rows:
        raise EvalError(f"--labels {labels}: no study listed under the header row")
    return rows


def unlisted(rows: Sequence[StudyLabel], data: Path, skip: Sequence[Path] = ()) -> list[str]:
    """What lies under ``data`` that a row could name as a study and none does (``/``-separated, relative to
    ``data``, sorted): a folder holding a file to screen, a zip, a ``.dcm`` file or a NIfTI volume, looked for
    beside the named studies (``data``'s own entries, and those of a folder holding a named study or mask), hidden
    names and ``skip`` (the labels file, the report and work folders) left aside. A study forgotten in the labels
    file is not screened: the run says so, rather than reporting on fewer studies without a word.
    """
    named = {row.path.resolve() for row in rows} | {row.mask.resolve() for row in rows if row.mask is not None}
    skipped = {p.resolve() for p in skip}
    found: list[str] = []

    def holds(folder: Path) -> bool:  # a named study or mask, or the report or work folder, lies inside
        return any(folder in p.parents for p in named | skipped)

    def walk(folder: Path) -> None:
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            return
        for entry in entries:
            path = entry.resolve()
            if entry.name.startswith(".") or path in named or path in skipped:
                continue
            if entry.is_dir():
                if holds(path):
                    walk(entry)
                    continue
                try:
                    collect_files(entry)
                except CliError:
                    continue
            elif not (entry.is_file() and (entry.name.lower().endswith((".zip", ".dcm")) or is_nifti(entry))):
                continue
            found.append(entry.relative_to(data).as_posix())

    walk(data)
    return found


def _contradicts(kind: str, label: bool) -> bool:
    """Whether a kind says the opposite of its label (a slip in one of the two columns).

    >>> [_contradicts(k, False) for k in ("COVID-19 pneumonia", "covid19", "non_covid", "bacterial")]
    [True, True, False, False]
    >>> [_contradicts(k, True) for k in ("healthy", "Non-COVID", "normal", "covid")]
    [True, True, True, False]

    A kind that names COVID-19 to say it is absent is a negative's, and one of another pneumonia than COVID-19's a
    negative's too:

    >>> [_contradicts(k, False) for k in ("COVID-negative", "covid-free", "COVID-19 ruled out")]
    [False, False, False]
    >>> [_contradicts(k, True) for k in ("COVID-negative", "Non-COVID pneumonia")]
    [True, True]
    """
    word = re.sub(r"[^a-z0-9]", "", kind.lower())
    negative = word.startswith("noncovid") or word in ("normal", "negative", "healthy") or (
        word.startswith("covid") and any(no in word for no in ("neg", "free", "ruledout", "excluded")))
    return negative if label else word.startswith(("covid", "positive")) and not negative


def is_nifti(path: Path) -> bool:
    """A NIfTI volume: a file with its name (:func:`training.datasets.is_nifti_name`)."""
    from training.datasets import is_nifti_name

    return path.is_file() and is_nifti_name(path.name)


def work_folder(work: Path, data: Path, kind: str) -> Path:
    """Where the NIfTI volumes of ``data`` are written as DICOM studies: a folder of ``work`` of its own for
    that folder (its name and a digest of its resolved path: two sites' ``export`` folders never share one)
    and for ``kind`` (``set`` or ``labels``: a later run of the other kind never counts these studies)."""
    resolved = str(data.resolve())
    return work / f"{data.resolve().name or 'data'}-{kind}-{hashlib.sha256(resolved.encode()).hexdigest()[:8]}"


def _work_folder(work: Path, study: str) -> Path:
    """A folder of its own under ``work`` for a study's path: a readable name and a digest of the path, so
    ``scans/a b.nii.gz`` and ``scans/a_b.nii.gz`` never share one (``scans__a_b.nii.gz-1f2e3d4c``)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", study.replace("/", "__").replace("\\", "__")).strip("._") or "study"
    return work / f"{name[:80]}-{hashlib.sha256(study.encode()).hexdigest()[:8]}"


def labelled_cases(rows: list[StudyLabel], work: Path, *, quiet: bool = True, min_px: int = MIN_BOX_AREA,
                   named_segments: Sequence[str] = ()) -> list[LabelledCase]:
    """The cases of a labels file's rows, in its order; each NIfTI volume first written as a DICOM study under
    ``work`` (reused by a later run while the volume is the same file, unchanged). Per-patient truth only,
    but for a study with its mask, whose slices count per image (positive above ``min_px`` lesion pixels, as
    :func:`slice_truth_from_manifest`): a NIfTI volume's NIfTI mask, a DICOM study's DICOM SEG (of that study;
    ``named_segments``: its lesion segments' labels or types, :func:`evaluation.seg.lesion_segments`).

    Raises
    ------
    EvalError
        A volume or a mask it cannot use, or a study named twice (one Study Instance UID), the row's line said."""
    cases = []
    volumes = sum(is_nifti(row.path) for row in rows)
    done = 0
    uids, patients = _once_each(rows)
    for row, uid, patient in zip(rows, uids, patients, strict=True):
        path = row.path
        if is_nifti(path):
            done += 1
            if not quiet:
                print(f"NIfTI {done}/{volumes}: {row.study} as a DICOM study", file=sys.stderr, flush=True)
            folder = _work_folder(work, row.study)
            with _at(row.where):
                _write_nifti_study(row.study, path, row.mask, None, folder, label=row.label, kind=row.kind,
                                   lesion_labels=_label_values(named_segments))
            path = folder / "dicom"
            if row.mask is not None:
                manifest = json.loads((folder / "manifest.json").read_text())
                cases.append(LabelledCase(case_id=row.study, kind=row.kind, label=row.label, path=path,
                                          slice_truth=slice_truth_from_manifest(manifest, min_px), patient=patient))
                continue
        elif row.mask is not None:
            with _at(row.where):
                seg = read_seg(row.mask, row.mask_text or row.mask.name, named_segments)
                if uid is not None and seg.study_instance_uid and seg.study_instance_uid != uid:
                    raise EvalError(f"mask {row.mask_text or row.mask.name!r} segments another study than "
                                    f"{row.study!r} (its Study Instance UID is not the study's)")
                _check_mask_label(row.study, row.label, any(px > 0 for px in seg.pixels.values()))
            cases.append(LabelledCase(case_id=row.study, kind=row.kind, label=row.label, path=path,
                                      slice_truth=slice_truth_from_seg(seg, min_px, f"{row.where}: {row.study}"),
                                      lesion_segments=tuple(seg.segments), patient=patient))
            continue
        cases.append(LabelledCase(case_id=row.study, kind=row.kind, label=row.label, path=path,
                                  slice_truth=lambda result: {}, patient=patient))
    return cases


def _once_each(rows: Sequence[StudyLabel]) -> tuple[list[str | None], list[int | None]]:
    """The Study Instance UID of each row's DICOM study (None for a NIfTI volume, or when none is stated), checked
    to be another study than every earlier row's: one study exported twice (a folder and its zip, or one of its
    files) would count one patient twice, with its verdict twice. And each DICOM row's patient: the index of the
    first row whose study states the same Patient ID (and Issuer of Patient ID), None where none is stated; two
    studies of one patient (a baseline and its follow-up) are two studies, counted apart (see
    :func:`same_patient`). The IDs themselves are compared here and kept nowhere.

    Raises
    ------
    EvalError
        Two rows name one study, the later row's line said."""
    uids: list[str | None] = []
    patients: list[int | None] = []
    first: dict[str, StudyLabel] = {}
    first_of: dict[tuple[str, str], int] = {}
    for i, row in enumerate(rows):
        uid, patient = (None, None) if is_nifti(row.path) else _study_ids(row.path)
        patients.append(None if patient is None else first_of.setdefault(patient, i))
        if uid is not None and uid in first:
            line = first[uid].where.rpartition(", ")[2]
            raise EvalError(f"{row.where}: {row.study!r} is the same study as {first[uid].study!r}"
                            f"{f' ({line})' if line else ''}: one Study Instance UID; name it once")
        if uid is not None:
            first[uid] = row
        uids.append(uid)
    return uids, patients


def same_patient(rows: Sequence[StudyLabel], cases: Sequence[LabelledCase]) -> list[list[str]]:
    """The labels file's studies that are of one patient (:attr:`LabelledCase.patient`), each group as the lines
    of its rows (``["line 3", "line 7"]``), in the file's order; ``cases`` are ``rows``' (one each, in order)."""
    groups: dict[int, list[str]] = {}
    for row, case in zip(rows, cases, strict=True):
        if case.patient is not None:
            groups.setdefault(case.patient, []).append(row.where.rpartition(", ")[2] or row.study)
    return [lines for lines in groups.values() if len(lines) > 1]


def same_patient_words(groups: Sequence[Sequence[str]], n_studies: int) -> str:
    """What :func:`same_patient` found, in words for stderr and the report's note ("" when nothing).

    >>> same_patient_words([["line 3", "line 7"]], 9)
    'lines 3 and 7 of --labels are studies of one patient (one Patient ID): 8 patients in 9 studies; the per-patient row counts studies (and its intervals take them as independent)'
    >>> same_patient_words([["line 2", "line 4", "line 5"], ["line 3", "line 6"]], 5)
    'lines 2, 4 and 5, and lines 3 and 6, of --labels are studies of one patient each (one Patient ID): 2 patients in 5 studies; the per-patient row counts studies (and its intervals take them as independent)'
    """
    if not groups:
        return ""

    def lines(group: Sequence[str]) -> str:
        numbers = [g.removeprefix("line ") for g in group]
        return f"lines {', '.join(numbers[:-1])} and {numbers[-1]}"

    patients = n_studies - sum(len(g) - 1 for g in groups)
    named = lines(groups[0]) if len(groups) == 1 else ", and ".join(map(lines, groups)) + ","
    each = "" if len(groups) == 1 else " each"
    return (f"{named} of --labels are studies of one patient{each} (one Patient ID): {patients} "
            f"patient{'s' if patients != 1 else ''} in {n_studies} studies; the per-patient row counts studies "
            "(and its intervals take them as independent)")


@contextlib.contextmanager
def _at(where: str) -> Iterator[None]:
    """An :class:`EvalError` raised inside said with ``where`` (a labels file's line) in front."""
    try:
        yield
    except EvalError as exc:
        raise EvalError(f"{where}: {exc}" if where else str(exc)) from None


def _check_mask_label(case_id: str, label: bool, has_lesion: bool) -> None:
    """Refuse a study whose lesion mask says the opposite of its label (a NIfTI mask's or a DICOM SEG's)."""
    if has_lesion and not label:
        raise EvalError(f"{case_id}: labelled negative, but its lesion mask marks lesions")
    if label and not has_lesion:
        raise EvalError(f"{case_id}: labelled positive, but its lesion mask marks none")


def _study_ids(path: Path) -> tuple[str | None, tuple[str, str] | None]:
    """The Study Instance UID of the first DICOM image of a study (a folder, a zip or a file) that one of its first
    files states (read as an upload of it would be, :func:`gateway.uploads.iter_upload`), and that file's patient
    (Issuer of Patient ID, Patient ID; None when it states no Patient ID); (None, None) when no file states a
    Study Instance UID."""
    from itertools import islice

    import pydicom

    from gateway.errors import UploadError
    from gateway.uploads import iter_upload

    def ids(source: Any) -> tuple[str | None, tuple[str, str] | None]:
        try:
            ds = pydicom.dcmread(source, stop_before_pixels=True, specific_tags=[
                "StudyInstanceUID", "SOPClassUID", "PatientID", "IssuerOfPatientID"])
        except Exception:  # noqa: BLE001 - not DICOM, or cut short: the next file
            return None, None
        if str(ds.get("SOPClassUID", "")) in SEG_SOP_CLASSES:  # a SEG kept in the study's folder
            return None, None
        patient = str(ds.get("PatientID", "") or "").strip()
        return (str(ds.get("StudyInstanceUID", "") or "") or None,
                (str(ds.get("IssuerOfPatientID", "") or "").strip(), patient) if patient else None)

    def contents() -> Iterator[tuple[str, bytes | Path]]:
        for file in collect_files(path):
            yield from iter_upload(file.name, file)

    try:
        for _, content in islice(contents(), 20):
            found = ids(content if isinstance(content, Path) else io.BytesIO(content))
            if found[0]:
                return found
    except (CliError, UploadError, OSError):  # no file, or an archive an upload would refuse too
        return None, None
    return None, None


def make_phantom_set(data: Path, n: int, *, n_slices: int | None = None, encoding: str = "explicit",
                     montage: bool = True) -> None:
    """Write the held-out phantom set: ``n`` studies, seeds from ``PHANTOM_EVAL_SEED0``."""
    import phantom
    from training.datasets import PHANTOM_EVAL_SEED0, phantom_kind

    data.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        kind = phantom_kind(i)
        seed = PHANTOM_EVAL_SEED0 + i
        out = data / f"{i:03d}-{kind}-{seed}"
        if (out / "manifest.json").is_file():
            continue
        study = phantom.make_study(seed, kind=kind, n_slices=n_slices)
        phantom.write_study(study, out, encoding=encoding, montage=montage)
        logger.info("wrote %s", out)


def write_nifti_set(root: Path, out: Path) -> list[str]:
    """Write a NIfTI set (the training layout: volumes plus lesion masks) as DICOM studies under ``out``.

    Each case becomes a folder in the phantom layout (``dicom/``, ``manifest.json``, ``masks/``) written
    by :func:`phantom.write_study`, so that it can travel the serving path like any study: axial slices
    on the 512 grid, positions along +z by the volume's slice spacing, label 1 when the lesion mask is
    not empty. A study already written from the same files is kept. Returns the case ids written, in order.
    """
    from training.datasets import DataError, nifti_cases

    try:
        cases = nifti_cases(root)
    except DataError as exc:
        raise EvalError(str(exc)) from exc
    for case_id, volume, lesion, lung in cases:
        _write_nifti_study(case_id, volume, lesion, lung, out / case_id)
    return [case_id for case_id, *_ in cases]


AIR_HU = -500.0
"""A volume in Hounsfield units has air around and in the chest: its 1st percentile lies below this."""


def _label_values(named: Sequence[str]) -> tuple[int, ...]:
    """The lesion labels of a NIfTI mask among ``--lesion-segments``' names: the whole numbers.

    >>> _label_values(["3", "Infection", "1"])
    (1, 3)
    """
    return tuple(sorted({int(n) for n in named if n.strip().isdigit()}))


def _write_nifti_study(case_id: str, volume: Path, lesion: Path | None, lung: Path | None, folder: Path, *,
                       label: bool | None = None, kind: str | None = None, lesion_labels: Sequence[int] = ()) -> None:
    """Write one NIfTI volume (and its masks) as a DICOM study in the phantom layout under ``folder``, unless
    it is there already, written from the same files unchanged (their paths, sizes and modification times,
    kept in the manifest's ``source``; anything else there is replaced). ``label``/``kind`` (a labels file's
    row) replace the lesion mask's; without a ``lesion`` mask the manifest holds no per-slice truth (the study
    is labelled as a whole).

    Raises
    ------
    EvalError
        The volume cannot be read, its masks do not fit it, its values are not Hounsfield units, or its lesion
        mask marks lesions where ``label`` says there are none.
    """
    import nibabel as nib

    import phantom
    from training.datasets import DataError, load_nifti_case

    source = {"files": [_fingerprint(f) for f in (volume, lesion, lung)], "label": label, "kind": kind,
              "lesion_labels": list(lesion_labels), "layout": 2}  # 2: square fields, world z (an older write is redone)
    try:
        if json.loads((folder / "manifest.json").read_text()).get("source") == source:
            return
    except (OSError, ValueError):
        pass
    if folder.exists():  # another volume's, an earlier version's, or a write cut short: if this command wrote it
        if not folder.is_dir() or folder.is_symlink() or any(
                p.name not in ("dicom", "masks", "manifest.json") for p in folder.iterdir()):
            raise EvalError(f"{folder} is in the way and is no study this command wrote: choose another --work")
        shutil.rmtree(folder)
    try:
        v = load_nifti_case(case_id, volume, lesion, lung, tuple(lesion_labels))
        img = nib.as_closest_canonical(nib.load(str(volume)))
    except DataError as exc:
        raise EvalError(str(exc)) from exc
    except (OSError, ValueError, EOFError, zlib.error) as exc:  # nibabel's errors on a truncated or foreign file
        raise EvalError(f"{case_id}: cannot read NIfTI: {exc}") from exc
    low = float(np.percentile(v.hu, 1))
    if low > AIR_HU:
        raise EvalError(f"{case_id}: its values do not look like Hounsfield units (1st percentile {low:.0f}, no air "
                        f"below {AIR_HU:.0f}); export the volume in HU (a windowed 0-255 image cannot be screened)")
    sz = float(img.header.get_zooms()[2])
    has_lesion = bool(v.lesion.any())
    if label is not None and lesion is not None:
        _check_mask_label(case_id, label, has_lesion)
    study = phantom.Study(
        hu=v.hu, lung_mask=np.zeros(v.hu.shape, bool), lesion_mask=v.lesion,
        finding_mask=np.zeros(v.hu.shape, np.uint8), valid_boxes=np.where(v.valid_boxes < 0, -1, v.valid_boxes),
        kind=kind or ("covid" if has_lesion else "normal"), label=int(has_lesion if label is None else label),
        pixel_spacing=(v.meta["grid_mm"], v.meta["grid_mm"]),  # a square field on the grid: square pixels
        slice_thickness=sz, slice_spacing=sz,
        # the slices' z in the volume's world (RAS and DICOM's LPS share it): a slice the report names is found in
        # a NIfTI viewer at its position; index 0 is the lowest slice, whatever order the file stores them in
        positions=np.array([[0.0, 0.0, float(img.affine[2, 3]) + k * sz] for k in range(len(v.hu))]),
        seed=0, rescale_intercept=-1024, pixel_representation=1,
    )
    # UIDs of their own for each source: two sites' study_0001, or a volume exported again, are other studies
    salt = f"{case_id}:{hashlib.sha256(json.dumps(source).encode()).hexdigest()[:16]}"
    phantom.write_study(study, folder, salt=salt, montage=False)
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if lesion is None:  # no per-slice truth: a later discover() of this folder must not count its slices
        for key in ("z_positions", "lesion_slices", "lesion_area_px"):
            manifest.pop(key, None)
        manifest["slice_truth"] = "none: labelled per study by a labels file"
    manifest["source"] = source  # written last: a write cut short is written again by the next run
    manifest_path.write_text(json.dumps(manifest, indent=1))
    logger.info("wrote %s", folder)


def _fingerprint(path: Path | None) -> list[Any] | None:
    """``[resolved path, size, modification time in ns]`` of a file (None for no file)."""
    if path is None:
        return None
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def looks_like_nifti_set(data: Path) -> bool:
    """True when ``data`` holds NIfTI files and no study with a ``manifest.json``."""
    return data.is_dir() and not any(data.rglob("manifest.json")) and any(data.rglob("*.nii*"))
