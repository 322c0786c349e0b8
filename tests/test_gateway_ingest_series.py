"""Series selection and slice ordering on real DICOM series written with pydicom (and the phantom)."""

from __future__ import annotations

import io
import json
import random
import zipfile

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGLSNearLossless, RLELossless, generate_uid

from aggregator.case import CaseRule, case_result
from ctscreen.contracts import EMPTY_BOX
from ctscreen.postprocess import SliceBoxes
from gateway.dicom import FrameHeader, to_grid
from gateway.errors import NoUsableSeries, UploadError
from gateway.ingest import StudyAccumulator, load_study, make_decode_pool
from gateway.series import SeriesRules, slice_normal, sort_slices
from tests.gateway_dicom_factory import CORONAL, chest_like, ct_dataset, make_series, to_bytes


def _files(series: list[tuple[str, bytes, np.ndarray, float]], prefix: str = "") -> list[tuple[str, bytes]]:
    return [(prefix + name, data) for name, data, _, _ in series]


def test_shuffled_files_with_scrambled_instance_numbers_come_back_in_position_order() -> None:
    series = make_series(9, rows=32, cols=32, spacing=2.5, z0=-100.0)
    files = _files(series)
    random.Random(1).shuffle(files)
    study = load_study(files, workers=2)
    assert [s.position_mm for s in study.slices] == [-100.0 + 2.5 * i for i in range(9)]
    # the pixels travelled with their positions (each slice has its own noise)
    for i, (_, _, hu, _) in enumerate(series):
        np.testing.assert_array_equal(study.hu[i], to_grid(hu)[0])
    assert study.spacing_mm == pytest.approx(2.5)
    assert study.excluded == [] and study.rejected == []


def test_order_runs_feet_to_head_and_a_position_is_the_patients_z_whatever_the_scan_direction() -> None:
    """IOP (-1,0,0, 0,1,0) (feet first): row x col = (0,0,-1), turned toward the head, so positions are the
    slices' z, as a PACS shows them (they read -z: "93.8 mm" for the slice a PACS showed at -93.75)."""
    iop = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    np.testing.assert_allclose(slice_normal(iop), [0, 0, -1])
    series = make_series(5, rows=32, cols=32, spacing=3.0, orientation=iop)
    files = _files(series)
    z = {name: float(pydicom.dcmread(io.BytesIO(data)).ImagePositionPatient[2]) for name, data in files}
    study = load_study(files[::-1])
    assert study.normal == (0.0, 0.0, 1.0)
    assert [s.position_mm for s in study.slices] == sorted(z.values())
    assert [s.position_mm for s in study.slices] == [z[s.filename] for s in study.slices]
    assert len(set(z.values())) == 5


def test_lossy_compressed_slices_are_flagged_once_for_the_study() -> None:
    """The models learnt from lossless CT: a study with lossy slices (a JPEG 2000 or JPEG-LS near-lossless
    syntax, or a lossy copy stored again losslessly, Lossy Image Compression 01) says so in one warning;
    a lossless syntax says nothing."""
    series = make_series(4, rows=32, cols=32, transfer_syntax=JPEG2000)
    (warned,) = [w for w in load_study(_files(series)).warnings if "lossy" in w]
    assert warned.startswith("4 of 4 slices lossy compressed (JPEG 2000 Image Compression)")
    lossless = make_series(4, rows=32, cols=32, transfer_syntax=JPEG2000Lossless)
    assert not [w for w in load_study(_files(lossless)).warnings if "lossy" in w]
    mixed = make_series(3, rows=32, cols=32)
    again = pydicom.dcmread(io.BytesIO(mixed[0][1]))
    again.LossyImageCompression = "01"
    near = pydicom.dcmread(io.BytesIO(mixed[1][1]))
    files = [("a.dcm", to_bytes(again)), ("b.dcm", to_bytes(near, JPEGLSNearLossless)), ("c.dcm", mixed[2][1])]
    (warned,) = [w for w in load_study(files).warnings if "lossy" in w]
    assert warned.startswith("2 of 3 slices lossy compressed (JPEG-LS Lossy (Near-Lossless) Image Compression, "
                             "Lossy Image Compression 01)"), warned


def test_a_slice_warning_is_said_once_for_the_study_without_file_names() -> None:
    """A warning of every slice (Rescale missing) is one counted line; it was one line per slice, each
    headed by the uploader's file name, which may carry a patient's name, onto every screen showing it."""
    series = make_series(3, rows=32, cols=32)
    files = []
    for i, (_, data, _, _) in enumerate(series):
        ds = pydicom.dcmread(io.BytesIO(data))
        if i:  # two of three without rescale
            del ds.RescaleSlope, ds.RescaleIntercept
        files.append((f"DOE^JANE_{i}.dcm", to_bytes(ds)))
    warnings = load_study(files).warnings
    (warned,) = [w for w in warnings if "Rescale" in w]
    assert warned.startswith("2 of 3 slices: Rescale Slope/Intercept missing"), warned
    assert not [w for w in warnings if "DOE" in w]


def _no_findings(study) -> list[SliceBoxes]:
    return [SliceBoxes(np.zeros((0, 5), np.float32), np.array(EMPTY_BOX, np.float32))] * study.n_slices


def test_duplicates_removed_and_the_gap_decided_once_by_the_aggregator() -> None:
    series = make_series(10, rows=32, cols=32, spacing=1.0)
    files = _files(series)
    del files[5], files[5]  # slices at 5 and 6 mm missing: a 3 mm step after index 4
    # a duplicate of slice 2: same position and series, another SOP instance
    dup = pydicom.dcmread(io.BytesIO(series[2][1]))
    dup.SOPInstanceUID = dup.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dup.InstanceNumber = 99
    files.append(("dup.dcm", to_bytes(dup)))
    study = load_study(files)
    assert study.n_slices == 8
    assert [s.position_mm for s in study.slices] == [0, 1, 2, 3, 4, 7, 8, 9]
    assert study.slices[2].filename == "s0002.dcm"  # lower instance number kept
    assert [(r.filename, r.reason) for r in study.excluded] == [("dup.dcm", "duplicate_position")]
    assert any("duplicate" in w for w in study.warnings)
    assert not any("gap" in w.lower() for w in study.warnings)  # ingest orders; the aggregator decides gaps
    result = case_result(study, _no_findings(study))
    assert [(g.after_sop_instance_uid, g.before_sop_instance_uid, g.distance_mm, g.expected_mm) for g in result.gaps] == [
        (study.slices[4].sop_instance_uid, study.slices[5].sop_instance_uid, 3.0, 1.0)]
    assert len([w for w in result.warnings if "gap" in w.lower()]) == 1


@pytest.fixture(scope="module")
def mixed_study() -> tuple[list[tuple[str, bytes]], str]:
    """Main axial series (12) + localizer + smaller axial series (6) + coronal reformat (20)
    + DERIVED axial series (30) + thick axial series (40 x 15 mm): the main one must win."""
    study = generate_uid()
    main_uid = generate_uid()
    files = _files(
        make_series(12, rows=32, cols=32, study_uid=study, series_uid=main_uid, series_number=2), "main/"
    )
    scout = ct_dataset(
        chest_like(40, 32),
        study_uid=study,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        orientation=CORONAL,
        series_number=1,
    )
    files.append(("scout.dcm", to_bytes(scout)))
    files += _files(make_series(6, rows=32, cols=32, study_uid=study, series_number=3), "small/")
    files += _files(
        make_series(20, rows=32, cols=32, study_uid=study, orientation=CORONAL, series_number=4), "cor/"
    )
    files += _files(
        make_series(
            30,
            rows=32,
            cols=32,
            study_uid=study,
            series_number=5,
            image_type=("DERIVED", "SECONDARY", "AXIAL"),
        ),
        "mpr/",
    )
    files += _files(
        make_series(40, rows=32, cols=32, study_uid=study, series_number=6, thickness=15.0), "thick/"
    )
    random.Random(7).shuffle(files)
    return files, main_uid


def test_series_selection_rules(mixed_study: tuple[list[tuple[str, bytes]], str]) -> None:
    files, main_uid = mixed_study
    study = load_study(files)
    assert study.series_instance_uid == main_uid and study.n_slices == 12
    reasons: dict[str, set[str]] = {}
    for r in study.excluded:
        reasons.setdefault(r.filename.split("/")[0], set()).add(r.reason)
    assert reasons == {
        "scout.dcm": {"localizer"},
        "cor": {"not_axial"},
        "mpr": {"not_original"},
        "thick": {"thickness"},
    }
    assert list(study.other_series.values()) == [6]


def test_rules_are_configurable(mixed_study: tuple[list[tuple[str, bytes]], str]) -> None:
    files, _ = mixed_study
    loose = load_study(files, SeriesRules(require_original_primary=False))
    assert loose.n_slices == 30 and loose.series_number == 5
    thick_ok = load_study(files, SeriesRules(max_slice_thickness_mm=None))
    assert thick_ok.n_slices == 40 and thick_ok.series_number == 6
    anything = load_study(
        files, SeriesRules(require_axial=False, require_original_primary=False, max_slice_thickness_mm=None)
    )
    assert anything.n_slices == 40
    with pytest.raises(ValueError, match='"min_slice_thickness_mm"'):
        SeriesRules(min_slice_thickness_mm=5, max_slice_thickness_mm=1)


def test_too_few_slices_is_reported_under_the_jobs_rule_not_refused() -> None:
    study = load_study(_files(make_series(2, rows=32, cols=32)))
    assert study.n_slices == 2
    warned = case_result(study, _no_findings(study)).warnings
    assert [w for w in warned if w.startswith("Only")] == ["Only 2 slices; the case rule looks for 3 consecutive slices."]
    assert not any(w.startswith("Only") for w in case_result(study, _no_findings(study), CaseRule(run_slices=2)).warnings)


def test_no_usable_series_lists_every_reason() -> None:
    study_uid = generate_uid()  # one study: several would be refused as mixed_studies first
    scout = ct_dataset(chest_like(32, 32), image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), study_uid=study_uid)
    mr = ct_dataset(chest_like(32, 32), modality="MR", study_uid=study_uid)
    with pytest.raises(NoUsableSeries) as info:
        load_study([("scout.dcm", to_bytes(scout)), ("mr.dcm", to_bytes(mr)), ("junk.txt", b"hello")])
    err = info.value
    assert err.reason == "no_usable_series" and err.http_status == 422
    assert sorted((f, r) for f, r, _ in err.rejected) == [
        ("junk.txt", "not_dicom"),
        ("mr.dcm", "not_ct"),
        ("scout.dcm", "localizer"),
    ]
    assert err.to_dict()["rejected"][0].keys() == {"filename", "reason", "message"}
    with pytest.raises(UploadError):
        load_study([])


def test_zip_upload_is_expanded_and_bad_zip_refused_whole() -> None:
    series = make_series(4, rows=32, cols=32)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data, _, _ in series:
            zf.writestr(f"DICOM/{name}", data)
        zf.writestr("DICOM/README.txt", b"notes")
    study = load_study([("study.zip", buf.getvalue())])
    assert study.n_slices == 4
    assert [(r.filename, r.reason) for r in study.rejected] == [("study.zip/DICOM/README.txt", "not_dicom")]
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../x.dcm", series[0][1])
    with pytest.raises(UploadError) as info:
        load_study([("evil.zip", evil.getvalue())])
    assert info.value.reason == "unsafe_path"


def test_accumulator_takes_files_one_by_one() -> None:
    series = make_series(6, rows=32, cols=32, transfer_syntax=JPEG2000Lossless)
    acc = StudyAccumulator()
    assert acc.add("junk", b"\x00" * 300) is not None
    for name, data, _, _ in series:
        assert acc.add(name, data) is None
    assert acc.add("again.dcm", series[0][1]) is None  # a re-send replaces, does not duplicate
    assert len(acc) == 6 and acc.n_files == 8
    assert len(acc.study_instance_uids) == 1
    study = acc.finish(workers=1)
    assert study.n_slices == 6 and [r.reason for r in study.rejected] == ["not_dicom"]
    for i, (_, _, hu, _) in enumerate(series):
        assert study.slices[i].position_mm == float(i)
        assert study.slices[i].grid.scale == 32 / 512
        np.testing.assert_array_equal(study.hu[i], to_grid(hu)[0])
    with pytest.raises(ValueError, match='"max_files"'):
        StudyAccumulator(max_files=0)
    small = StudyAccumulator(max_files=1)
    small.add(series[0][0], series[0][1])
    assert small.add(series[1][0], series[1][1]).reason == "too_large"


def test_sort_slices_guards() -> None:
    with pytest.raises(ValueError, match='"frames"'):
        sort_slices([])
    with pytest.raises(ValueError, match='"orientation"'):
        slice_normal((1, 0, 0, 1, 0, 0))


def test_summary_is_json_friendly() -> None:
    study = load_study(_files(make_series(3, rows=512, cols=512)))
    text = json.dumps(study.summary())
    assert '"n_slices": 3' in text
    assert study.slices[0].grid.is_identity


def test_process_pool_decodes_the_same() -> None:
    """The decode pool (spawned processes, for GIL-bound codecs) gives the same study as threads."""
    series = make_series(4, rows=64, cols=64, transfer_syntax=JPEG2000Lossless)
    with make_decode_pool(1) as pool:
        study = load_study(_files(series), executor=pool)
    assert [s.position_mm for s in study.slices] == [0.0, 1.0, 2.0, 3.0]
    for i, (_, _, hu, _) in enumerate(series):
        np.testing.assert_array_equal(study.hu[i], to_grid(hu)[0])
    with pytest.raises(ValueError, match='"workers"'):
        make_decode_pool(0)


def test_doctests() -> None:
    import doctest

    import gateway.ingest

    assert doctest.testmod(gateway.ingest).failed == 0


def _header(i: int, z: float, instance: int) -> FrameHeader:
    return FrameHeader(
        filename=f"f{i}",
        frame_index=None,
        sop_instance_uid=f"1.2.{i}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid="1",
        series_instance_uid="2",
        series_number=1,
        series_description="",
        modality="CT",
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        position=(5.0, -3.0, z),
        slice_thickness=1.0,
        pixel_spacing=(0.7, 0.7),
        instance_number=instance,
        rows=512,
        cols=512,
        slope=1.0,
        intercept=-1024.0,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )


@settings(max_examples=60, deadline=None)
@given(
    zs=st.lists(st.integers(-400, 400), min_size=1, max_size=40),
    seed=st.integers(0, 2**16),
)
def test_sort_slices_properties(zs: list[int], seed: int) -> None:
    """Whatever the file order and instance numbers: strictly increasing positions, one slice per
    distinct position, every input either kept or reported as a duplicate."""
    rng = random.Random(seed)
    frames = [_header(i, z * 0.5, rng.randint(1, 1000)) for i, z in enumerate(zs)]
    rng.shuffle(frames)
    out = sort_slices(frames)
    pos = out.positions_mm
    assert (np.diff(pos) > 0).all()
    assert sorted(pos.tolist()) == sorted({z * 0.5 for z in zs})
    assert len(out.slices) + len(out.duplicates) == len(frames)


def _garble(data: bytes) -> bytes:
    """Overwrite 1000 bytes of the compressed stream: the RLE codec panics on it."""
    out = bytearray(data)
    n = len(out)
    out[n - 3000 : n - 2000] = np.random.default_rng(0).integers(0, 255, 1000, dtype=np.uint8).tobytes()
    return bytes(out)


def test_undecodable_best_series_falls_back_to_the_next() -> None:
    study_uid = generate_uid()
    broken = make_series(
        5, rows=128, cols=128, study_uid=study_uid, transfer_syntax=RLELossless, series_number=1
    )
    good = make_series(3, rows=32, cols=32, study_uid=study_uid, series_number=2)
    files = [(f"broken/{n}", _garble(d)) for n, d, _, _ in broken] + _files(good, "good/")
    study = load_study(files, workers=1)
    assert study.n_slices == 3 and study.series_number == 2
    assert sorted(r.reason for r in study.rejected) == ["undecodable"] * 5
    assert any("could not be decoded" in w for w in study.warnings)
    with pytest.raises(NoUsableSeries, match="could be decoded") as info:
        load_study(files[:5])
    assert len(info.value.rejected) == 5


@pytest.mark.parametrize(("image_type", "screened"), [
    (("DERIVED", "PRIMARY", "AXIAL"), True),             # a lossy conversion, a PACS export
    (("DERIVED", "SECONDARY", "AXIAL", "CT_SOM5 SPI"), True),
    ((), True),                                          # Image Type stripped by an anonymiser
    (("DERIVED", "SECONDARY", "MPR"), False),
    (("DERIVED", "PRIMARY", "AXIAL", "MIP"), False),
    (("DERIVED", "PRIMARY", "PERFUSION", "RCBF"), False),
])
def test_a_study_without_an_original_series_screens_a_plain_derived_axial_stack(image_type, screened) -> None:
    """Only the thick axial series routed on, or an anonymised export: every frame was refused not_original,
    and the study with it. A plain axial stack is now screened with a warning; reformats and maps are not."""
    files = _files(make_series(6, rows=32, cols=32, image_type=image_type))
    if not screened:
        with pytest.raises(NoUsableSeries) as info:
            load_study(files)
        assert {r for _, r, _ in info.value.rejected} == {"not_original"}
        return
    study = load_study(files)
    assert study.n_slices == 6
    assert [w for w in study.warnings if w.startswith("No ORIGINAL\\PRIMARY series")], study.warnings


@pytest.mark.parametrize(("value", "reason", "shown"), [("LOCALIZER", "localizer", None),
                                                     ("SECONDARY", "not_original", "SECONDARY")])
def test_a_single_valued_image_type_is_one_code_not_its_letters(value, reason, shown) -> None:
    """Image Type of one value (VM 1, against the standard's 2-n, as some exporters write it) came back from
    pydicom as a string and was read letter by letter: a one-valued LOCALIZER was no localizer, and the
    refusal named the type 'S\\E\\C...'."""
    files = []
    for name, data in _files(make_series(4, rows=32, cols=32)):
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.ImageType = value
        files.append((name, to_bytes(ds)))
    with pytest.raises(NoUsableSeries) as info:
        load_study(files)
    assert {r for _, r, _ in info.value.rejected} == {reason}, info.value.rejected
    if shown:
        assert all(m.startswith(f"Image Type {shown} is not") for _, _, m in info.value.rejected), info.value.rejected


def test_an_original_series_still_wins_over_a_derived_one() -> None:
    study_uid = generate_uid()
    original = _files(make_series(6, rows=32, cols=32, study_uid=study_uid, series_number=2), "orig/")
    derived = _files(make_series(20, rows=32, cols=32, study_uid=study_uid, series_number=3,
                                 image_type=("DERIVED", "PRIMARY", "AXIAL")), "derived/")
    study = load_study(original + derived)
    assert study.n_slices == 6 and study.series_number == 2
    assert not [w for w in study.warnings if "derived axial" in w]
    assert {r.reason for r in study.excluded} == {"not_original"}


@pytest.mark.parametrize("positions", [1, 2])
def test_a_bolus_tracker_does_not_win_over_the_chest_because_it_is_original(positions) -> None:
    """An ORIGINAL\\PRIMARY bolus-tracking series (8 images at one or two positions) and the chest stack
    labelled DERIVED (a PACS export): the tracker won by its Image Type and the study was screened as one
    slice. A series too short for the case rule's run of three no longer keeps the derived stack out."""
    study_uid = generate_uid()
    tracker = _files(make_series(8, rows=32, cols=32, study_uid=study_uid, series_number=2, spacing=0.0), "tracker/")
    if positions == 2:
        tracker = tracker[:4] + _files(make_series(4, rows=32, cols=32, study_uid=study_uid, z0=5.0, spacing=0.0,
                                                   series_number=2, series_uid=_series_of(tracker)), "tracker2/")
    chest = _files(make_series(20, rows=32, cols=32, study_uid=study_uid, series_number=3,
                               image_type=("DERIVED", "PRIMARY", "AXIAL")), "chest/")
    study = load_study(tracker + chest)
    assert study.n_slices == 20 and study.series_number == 3
    assert [w for w in study.warnings if w.startswith("No ORIGINAL\\PRIMARY series of 3 or more")], study.warnings


def _series_of(files: list[tuple[str, bytes]]) -> str:
    return str(pydicom.dcmread(io.BytesIO(files[0][1]), stop_before_pixels=True).SeriesInstanceUID)


def _tilted(deg: float) -> tuple[float, ...]:
    import math

    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return (1.0, 0.0, 0.0, 0.0, c, s)


@pytest.mark.parametrize(("second", "kept"), [(0.2872, 8), (0.8, 8), (10.0, 4)])
def test_one_series_keeps_frames_whose_orientations_differ_by_rounding_only(second, kept) -> None:
    """Cosines 0.00499 and 0.00501 (0.286 and 0.287 degrees of tilt) were rounded to different orientations
    and half the series was dropped as orientation_mismatch; within a degree is one orientation now, and
    10 degrees another still."""
    study, series = generate_uid(), generate_uid()
    files = _files(make_series(4, rows=32, cols=32, study_uid=study, series_uid=series,
                               orientation=_tilted(0.2859)), "a/")
    files += _files(make_series(4, rows=32, cols=32, study_uid=study, series_uid=series, z0=10.0, seed=4,
                                orientation=_tilted(second)), "b/")
    study_ = load_study(files)
    assert study_.n_slices == kept
    assert {r.reason for r in study_.excluded} == (set() if kept == 8 else {"orientation_mismatch"})


def test_the_sections_are_probed_on_slices_spread_over_the_series() -> None:
    """12 probes spread evenly (first and last included) find a chest's wide middle in a long series; a probed slice
    without a usable pixel spacing leaves the series unmeasured (the case rule then does not check it)."""
    from dataclasses import replace

    from ctscreen.lungs import SECTION_PROBES
    from gateway.dicom import GridMapping
    from gateway.ingest import section_extent

    air = np.full((512, 512), -1000, np.int16)
    chest = air.copy()
    chest[64:448, 32:480] = 40
    chest[128:384, 80:216] = -850
    chest[128:384, 296:432] = -850
    frames = [replace(_header(i, float(i), i + 1), pixel_spacing=(0.5, 0.5)) for i in range(300)]
    grids = {h.key: GridMapping(512, 512) for h in frames}
    seen: list[int] = []

    def slice_at(i: int) -> np.ndarray:
        seen.append(i)
        return chest if i == 150 else air

    assert section_extent(slice_at, frames, grids) == (0.0, 0.0)  # slice 150 lies between probes 136 and 163
    assert len(seen) == SECTION_PROBES and seen[0] == 0 and seen[-1] == 299
    lungs, body = section_extent(lambda i: chest if 130 <= i <= 170 else air, frames, grids)
    assert lungs is not None and 160 < lungs < 180  # 2 x 256 x 136 px of 0.5 mm, at the 64 x 64 look
    assert body is not None and 420 < body < 440  # 384 x 448 px
    for bad in (None, (0.0, 0.5), (-0.5, 0.5), (1e200, 1e200), (6.0, 6.0)):  # absent, or no CT's
        broken = [replace(frames[0], pixel_spacing=bad), *frames[1:]]
        assert section_extent(lambda i: chest, broken, grids) == (None, None), bad
    assert section_extent(lambda i: chest, [], grids) == (None, None)


def test_a_diseased_chest_is_still_a_chest() -> None:
    """Lungs filled by disease hold little air (ground glass above -400 HU, dependent consolidation), so their lung
    field is under a head's limit; the body section keeps them a chest, and the run of lesions stays positive."""
    study_uid, series_uid = generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    files = []
    for k in range(6):
        hu = np.full((512, 512), -1000, np.int16)
        yy, xx = np.mgrid[:512, :512]
        hu[((yy - 256) / 170.0) ** 2 + ((xx - 256) / 230.0) ** 2 <= 1] = 40  # an adult chest, 0.7 mm pixels
        for cx in (160, 352):  # two lungs of dense ground glass and consolidation, -350 HU on average, noisy
            lung = ((yy - 250) / 120.0) ** 2 + ((xx - cx) / 75.0) ** 2 <= 1
            hu[lung] = np.clip(rng.normal(-350, 100, lung.sum()), -1000, 100).astype(np.int16)
        ds = ct_dataset(hu, position=(0.0, 0.0, 2.0 * k), study_uid=study_uid, series_uid=series_uid,
                        instance_number=k + 1)
        files.append((f"{k}.dcm", to_bytes(ds)))
    study = load_study(files)
    assert study.lung_field_cm2 is not None and study.lung_field_cm2 < 50  # as small as a head's
    assert study.body_cm2 is not None and study.body_cm2 > 500  # but a chest's size (602 cm²)
    lesion = np.array([[150, 200, 200, 260, 0.9]], np.float32)
    outputs = [SliceBoxes(lesion if k in (2, 3, 4) else np.zeros((0, 5), np.float32),
                          np.array([60, 100, 450, 400], np.float32)) for k in range(6)]
    result = case_result(study, outputs)
    assert (result.verdict, result.reason) == ("positive", "run_found")
    assert (result.lung_field_cm2, result.body_cm2) == (study.lung_field_cm2, study.body_cm2)
    lungs_only = case_result(study, outputs, CaseRule(min_body_cm2=None))  # what the lung field alone would say
    assert lungs_only.reason == "not_chest"


def _series_named(study_uid: str, series_number: int, description: str, kernel: str,
                  n: int = 5) -> list[tuple[str, bytes]]:
    series_uid = generate_uid()
    out = []
    for i in range(n):
        ds = ct_dataset(chest_like(32, 32, seed=i), position=(0.0, 0.0, 1.0 * i), study_uid=study_uid,
                        series_uid=series_uid, instance_number=i + 1, series_number=series_number)
        ds.SeriesDescription = description
        if kernel:
            ds.ConvolutionKernel = kernel
        out.append((f"s{series_number}/{i}.dcm", to_bytes(ds)))
    return out


@pytest.mark.parametrize(
    ("soft", "lung", "screened"),
    [
        (("Thorax 1.0 B30f", "B30f"), ("Thorax 1.0 Bl64", "Bl64"), 3),  # Siemens: the lung family by its kernel
        (("Chest", "STANDARD"), ("Chest", "LUNG"), 3),  # GE: the kernel says it
        (("Mediastinum 1 mm", "FC13"), ("Lung 1 mm", "FC52"), 3),  # Canon: the description says it
        (("Body 1.0", "B30f"), ("Body 1.0", "B70f"), 3),  # a sharp kernel by number only (Siemens >= 50)
        (("LungCARE 1.0 Br40", "Br40"), ("LungCARE 1.0 Bl57", "Bl57"), 3),  # both say lung: the kernel decides
        (("Lung 1.0", "Bl57"), ("Pulmonary angio 1.0 Br36", "Br36"), 2),  # a CTPA's soft series is no lung one
        (("Thorax 1.0 FC86", "FC86"), ("Pulmonary angio 1.0 Br36", "Br36"), 2),  # ... nor wins over a lung one unnamed
        (("Lung 1.0", "STANDARD"), ("Chest 1.0", "LUNG"), 3),  # GE's soft kernel under a lung name: the kernel wins
    ],
)
def test_a_study_reconstructed_twice_is_screened_on_its_lung_reconstruction(soft, lung, screened) -> None:
    """Same positions, same thickness (the soft-tissue series numbered first, as scanners do): the tie goes to
    the series that calls itself a lung reconstruction, the paper's HRCT."""
    study_uid = generate_uid()
    study = load_study(_series_named(study_uid, 2, *soft) + _series_named(study_uid, 3, *lung))
    assert study.series_number == screened and study.n_slices == 5
    assert study.other_series and "1 other usable series not screened." in study.warnings


def test_more_slices_still_win_over_a_lung_reconstruction_of_part_of_the_chest() -> None:
    """A lung reconstruction wins over more positions only when it covers the chest (gateway.series.COVER_FRACTION):
    five of eight positions do not."""
    study_uid = generate_uid()
    study = load_study(_series_named(study_uid, 2, "Thorax 1.0", "B30f", n=8)
                       + _series_named(study_uid, 3, "Lung 1.0", "Bl64", n=5))
    assert study.series_number == 2 and study.n_slices == 8


def test_every_path_measures_the_same_sections() -> None:
    """The whole-study path (hu), the streamed one (hu filled batch by batch) and the screened-ahead one (each
    slice by key, hu empty) measure the same lung field and body section."""
    from gateway.ingest import plan_study

    files = _files(make_series(9, rows=128, cols=128, seed=3), "s/")
    whole = load_study(files)
    plan = plan_study(files)
    row = {h.key: i for i, h in enumerate(plan.ordered.slices)}
    hu = np.empty((plan.n_slices, 512, 512), np.int16)
    pixels, grids = {}, {}
    for _, uids in plan.batches(4):
        for uid in uids:
            frames, rejection, _ = plan.decode_object(uid)
            assert rejection is None
            for key, arr, grid in frames:
                hu[row[key]], pixels[key], grids[key] = arr, arr, grid
    streamed = plan.assemble(hu, grids)
    ahead = plan.assemble(np.empty((0, 512, 512), np.int16), grids, pixels=pixels)
    assert whole.lung_field_cm2 is not None and whole.body_cm2 is not None and whole.body_cm2 > 0
    for study in (streamed, ahead):
        assert (study.lung_field_cm2, study.body_cm2) == (whole.lung_field_cm2, whole.body_cm2)
    assert ahead.hu.shape[0] == 0


def test_the_convolution_kernel_of_an_enhanced_ct_comes_from_its_functional_groups() -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    from gateway.dicom import read_headers
    from gateway.series import lung_reconstruction
    from tests.gateway_dicom_factory import enhanced_ct

    ds = pydicom.dcmread(io.BytesIO(enhanced_ct([chest_like(32, 32, seed=k) for k in range(2)], [(1.0, -1024.0)] * 2,
                                                [0.0, 1.0])))
    recon = Dataset()
    recon.ConvolutionKernel = ["Bl64", "3"]
    ds.SharedFunctionalGroupsSequence[0].CTReconstructionSequence = DicomSequence([recon])
    _, frames = read_headers("e.dcm", ds)
    assert [h.convolution_kernel for h in frames] == ["Bl64\\3"] * 2 and all(map(lung_reconstruction, frames))


def test_the_body_section_leaves_out_the_table_and_a_cut_field_of_view_keeps_the_chest() -> None:
    """The body section is the largest region that is not the air around the patient: a head on a 50 cm field of
    view keeps a head's size beside the table (a shell with a foam core, apart from the head), and a chest whose
    field of view cuts its wall keeps all of that field."""
    from ctscreen.lungs import CHEST_BODY_CM2, section_areas_cm2

    mm = (500 / 512, 500 / 512)  # a 50 cm field of view
    yy, xx = np.mgrid[:512, :512]
    head = np.full((512, 512), -1000.0, np.float32)
    head[((yy - 200) / (95 / mm[0])) ** 2 + ((xx - 256) / (75 / mm[0])) ** 2 <= 1] = 40.0  # 19 x 15 cm
    head[340:380, 40:472] = 100.0  # the table's shell, 4 cm below the head's back
    head[348:372, 48:464] = -900.0  # ... its foam core
    lungs, body = section_areas_cm2(head, mm)
    assert lungs < 1 and 200 < body < CHEST_BODY_CM2  # the head alone (224 cm²), not the table's 210 more
    chest = np.full((512, 512), 40.0, np.float32)  # a 20 cm field of view inside a chest: no air around it
    chest[100:420, 20:230] = -850.0
    chest[100:420, 282:492] = -850.0
    lungs, body = section_areas_cm2(chest, (200 / 512, 200 / 512))
    assert lungs > 100 and body > 380  # the whole field


def test_a_series_without_pixel_spacing_says_its_scale_and_the_chest_check_are_unknown() -> None:
    """Without Pixel Spacing the slices' millimetres are unknown: the grid follows the matrix and the not-a-chest
    measures (cm²) cannot be taken. That was silent (a reviewer's finding): a head CT without the tag could be
    called positive with no word of why the check did not run. With the tag, no such warning."""
    from gateway.ingest import load_study

    files = [(name, data) for name, data, _, _ in make_series(6, spacing=1.0)]
    with_spacing = load_study(files)
    assert with_spacing.lung_field_cm2 is not None
    assert not any("Pixel Spacing" in w for w in with_spacing.warnings)
    stripped = []
    for name, data in files:
        ds = pydicom.dcmread(io.BytesIO(data))
        del ds.PixelSpacing
        stripped.append((name, to_bytes(ds)))
    study = load_study(stripped)
    assert study.lung_field_cm2 is None and study.body_cm2 is None
    assert any(w.startswith("No usable Pixel Spacing") and "chest" in w for w in study.warnings)
