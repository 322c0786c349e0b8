"""Which series of a study is screened: the chest over other body parts, then its lung reconstruction
(gateway.series.select_series), decided from real DICOM headers through the ingest path (plan_study: nothing is
decoded), and once end to end (load_study)."""

from __future__ import annotations

import doctest
import io

import pydicom
import pytest
from pydicom.uid import generate_uid

import gateway.series
from gateway.ingest import load_study, plan_study
from gateway.series import kernel_class, region
from tests.gateway_dicom_factory import chest_like, ct_dataset, to_bytes


def _series(study: str, number: int, description: str = "", kernel: str | list[str] = "", *, n: int = 8,
            z0: float = 0.0, step: float = 1.0, thickness: float | None = None, body_part: str = "", protocol: str = "", study_description: str = "",
            frame_of_reference: str | None = None) -> list[tuple[str, bytes]]:
    """One axial series of ``n`` slices from ``z0`` (mm, upwards by ``step``), with the headers the choice reads; all
    series of ``study`` share a frame of reference unless one is given."""
    series_uid = generate_uid()
    out = []
    for i in range(n):
        ds = ct_dataset(chest_like(32, 32, seed=i), position=(0.0, 0.0, z0 + step * i), study_uid=study,
                        series_uid=series_uid, instance_number=i + 1, series_number=number,
                        thickness=abs(step) if thickness is None else thickness)
        ds.FrameOfReferenceUID = frame_of_reference or generate_uid(entropy_srcs=[study])  # one per study
        for keyword, value in (("SeriesDescription", description), ("ConvolutionKernel", kernel),
                               ("BodyPartExamined", body_part), ("ProtocolName", protocol),
                               ("StudyDescription", study_description)):
            if value:
                setattr(ds, keyword, value)
        out.append((f"s{number}/{i}.dcm", to_bytes(ds)))
    return out


def _screened(*series: list[tuple[str, bytes]]) -> int | None:
    """The Series Number the headers choose (plan_study: header only)."""
    plan = plan_study([f for s in series for f in s])
    return plan.ordered.slices[0].series_number


def _study() -> str:
    return str(generate_uid())


KERNELS = [
    # Siemens: family + sharpness (>= 50 sharp, <= 40 soft) + letters; the lung family Bl whatever its number
    ("B70f", "sharp"), ("B60f", "sharp"), ("Br64", "sharp"), ("Br64d\\3", "sharp"), ("I70f", "sharp"),
    ("I50f\\3", "sharp"), ("Bl57", "sharp"), ("Bl64\\3", "sharp"), ("Hr68", "sharp"), ("BL57D", "sharp"),
    ("B30f", "soft"), ("B31f", "soft"), ("Br40", "soft"), ("Br36\\3", "soft"), ("I30f", "soft"), ("I26f\\2", "soft"),
    ("Bv40", "soft"), ("Qr40", "soft"), ("B45f", None), ("B46f", None), ("T20f", None),
    # GE
    ("LUNG", "sharp"), ("BONE", "sharp"), ("BONEPLUS", "sharp"), ("BONE PLUS", "sharp"), ("EDGE", "sharp"),
    ("SHARP", "sharp"), ("HD LUNG", "sharp"), ("STANDARD", "soft"), ("SOFT", "soft"), ("DETAIL", "soft"),
    ("HD STANDARD", "soft"), ("CHEST", None),
    # Philips: letters only, the whole value
    ("YA", "sharp"), ("YB", "sharp"), ("YC", "sharp"), ("YD", "sharp"), ("L", "sharp"), ("D", "sharp"),
    ("A", "soft"), ("B", "soft"), ("C", "soft"),
    # Canon / Toshiba
    ("FC50", "sharp"), ("FC52", "sharp"), ("FC56\\AIDR 3D", "sharp"), ("FC86", "sharp"), ("FL03", "sharp"),
    ("FC01", "soft"), ("FC13", "soft"), ("FC18\\AIDR 3D", "soft"), ("FC30", None), ("Lung\\AiCE", "sharp"),
    ("Body Sharp\\AiCE", "sharp"), ("Body\\AiCE", "soft"),
    # United Imaging, and nothing
    ("B_SHARP_C", "sharp"), ("B_SOFT_B", "soft"), ("", None), ("3", None),
]


@pytest.mark.parametrize(("kernel", "expected"), KERNELS)
def test_reconstruction_kernels_are_sharp_or_soft_by_vendor(kernel: str, expected: str | None) -> None:
    assert kernel_class(kernel) == expected


@pytest.mark.parametrize(("text", "chest", "named"), [
    ("Lung 5.0 B70f", True, True), ("Thorax 1.0 Br40", True, True), ("CHEST", True, True), ("LUNG", True, True),
    ("Chest/Abdomen/Pelvis 5.0", True, True), ("Thorax-Abdomen", True, True), ("CHESTABDPELVIS", True, True),
    ("Thx 3mm", True, True), ("Lunge 1.0", True, True), ("Poumon", True, True), ("Tórax 1mm", True, True),
    ("Torace HR", True, True), ("Pulmonary angio", True, True), ("Mediastinum 1 mm", True, True),
    ("Abdomen 3.0 B31f", False, True), ("ABDOMENPELVIS", False, True), ("Abd/Pel 5mm", False, True),
    ("Becken 3.0", False, True), ("Bassin", False, True), ("HEAD", False, True), ("Kopf nativ", False, True),
    ("5.0 B31f", False, False), ("Dose Report", False, False), ("", False, False),
])
def test_header_texts_name_the_chest_in_several_languages(text: str, chest: bool, named: bool) -> None:
    """A text naming the chest with another part (a chest-abdomen-pelvis series) is a chest text."""
    found = region(text)
    assert (found.chest, found.named) == (chest, named)


def test_the_chest_series_is_screened_not_the_longer_abdomen_series_of_the_same_study() -> None:
    """The reviewer's chest-abdomen study (a CAP protocol in two series): the abdomen series holds more positions and
    the two lowest chest slices, the chest series the lungs; the chest is screened."""
    st = _study()
    chest = _series(st, 3, "Lung 5.0 B70f", "B70f", n=16, z0=0.0, step=5.0)
    abdomen = _series(st, 4, "Abdomen 3.0 B31f", "B31f", n=24, z0=-64.0, step=3.0)
    assert _screened(abdomen, chest) == 3


@pytest.mark.parametrize("headers", [
    # the body part alone (descriptions without a region, as some scanners write)
    (dict(description="5.0 B70f", body_part="CHEST"), dict(description="3.0 B31f", body_part="ABDOMEN")),
    (dict(description="5.0", body_part="LUNG"), dict(description="3.0", body_part="ABDOMENPELVIS")),
    # the description outranks a Body Part Examined the protocol wrote on every series
    (dict(description="Thorax 5.0", body_part="ABDOMEN"), dict(description="Abdomen 3.0", body_part="CHEST")),
    # in other languages, and a chest-abdomen series is a chest series
    (dict(description="Lunge 5.0"), dict(description="Becken 3.0")),
    (dict(description="Poumon 5mm"), dict(description="Abdomen-pelvis 3mm")),
    (dict(description="Thorax-Abdomen 5.0"), dict(description="Abdomen 3.0")),
    # under a chest-abdomen protocol with no series named, the upper series is the chest
    (dict(protocol="Thorax-Abdomen"), dict(protocol="Thorax-Abdomen")),
    (dict(protocol="CAP", study_description="CT Chest Abdomen Pelvis"),
     dict(protocol="CAP", study_description="CT Chest Abdomen Pelvis")),
])
def test_the_chest_wins_over_more_positions_whatever_header_names_it(headers: tuple[dict, dict]) -> None:
    chest_headers, abdomen_headers = headers
    st = _study()
    chest = _series(st, 5, n=16, z0=0.0, step=5.0, **chest_headers)
    abdomen = _series(st, 4, n=60, z0=-240.0, step=4.0, **abdomen_headers)  # 236 mm, its top 4 mm over the chest's base
    assert _screened(chest, abdomen) == 5


def test_an_unnamed_series_lying_over_a_chest_series_is_a_chest_series() -> None:
    """Geometry: the unnamed thin series lies within the named chest series (one frame of reference): it images the
    chest too, and its lung kernel then wins over the named soft series; in another frame of reference its positions
    say nothing and the named chest wins."""
    st = _study()
    thorax = _series(st, 2, "Thorax 5.0 B31f", "B31f", n=12, z0=0.0, step=5.0)
    unnamed = _series(st, 3, "1.0 B70f", "B70f", n=50, z0=3.0, step=1.1)
    abdomen = _series(st, 4, "Abdomen 3.0 B31f", "B31f", n=80, z0=-230.0, step=3.0)
    assert _screened(thorax, unnamed, abdomen) == 3
    elsewhere = _series(st, 3, "1.0 B70f", "B70f", n=50, z0=3.0, step=1.1, frame_of_reference=generate_uid())
    assert _screened(thorax, elsewhere, abdomen) == 2


def test_a_chest_abdomen_series_makes_no_chest_of_what_lies_in_its_abdomen() -> None:
    """An unnamed sharp series over the abdomen part of a chest-abdomen series is not thereby a chest series (a range
    named for both is no chest's range): the chest-abdomen series, which holds the chest, is screened."""
    st = _study()
    both = _series(st, 2, "Thorax-Abdomen 5.0 B31f", "B31f", n=60, z0=-300.0, step=5.0)
    lower = _series(st, 3, "1.0 B70f", "B70f", n=150, z0=-300.0, step=1.0)
    assert _screened(both, lower) == 2


def test_a_lung_series_covers_the_chest_even_beside_a_longer_chest_abdomen_series() -> None:
    """The chest's length is taken from the chest series, not from a chest-abdomen series beside them: the 5 mm lung
    series over the chest wins over the soft chest-abdomen series of more positions."""
    st = _study()
    lung = _series(st, 3, "Lung 5.0 B70f", "B70f", n=21, z0=0.0, step=5.0)
    both = _series(st, 2, "Thorax-Abdomen 5.0 B31f", "B31f", n=60, z0=-195.0, step=5.0)
    assert _screened(both, lung) == 3


def test_the_top_of_a_protocol_that_reaches_the_neck_is_not_taken_for_the_chest() -> None:
    """Under a neck-chest-abdomen protocol the top series is the neck's: with no series named, nothing says which is
    the chest, and the most positions win, as before."""
    st = _study()
    neck = _series(st, 2, n=25, z0=200.0, step=4.0, protocol="Hals-Thorax-Abdomen")
    abdomen = _series(st, 3, n=60, z0=-240.0, step=4.0, protocol="Hals-Thorax-Abdomen")
    assert _screened(neck, abdomen) == 3


@pytest.mark.parametrize("shared", [False, True])
def test_series_labels_read_the_body_part_from_an_anatomic_region_code_too(shared: bool) -> None:
    """Body Part Examined absent, the Anatomic Region Sequence names it: at the top level, or in an enhanced CT's
    shared Frame Anatomy functional group."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    from gateway.series import series_labels

    ds = ct_dataset(chest_like(32, 32))
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "51185008", "SCT", "Thorax"
    holder = Dataset() if shared else ds
    holder.AnatomicRegionSequence = DicomSequence([code])
    if shared:
        group = Dataset()
        group.FrameAnatomySequence = DicomSequence([holder])
        ds.SharedFunctionalGroupsSequence = DicomSequence([group])
    ds.ProtocolName, ds.StudyDescription, ds.FrameOfReferenceUID = "Thorax HR", "CT Thorax", "1.2.3"
    labels = series_labels(ds)
    assert (labels.body_part_examined, labels.protocol_name, labels.study_description,
            labels.frame_of_reference_uid) == ("Thorax", "Thorax HR", "CT Thorax", "1.2.3")
    assert region(labels.body_part_examined).chest


def test_an_unnamed_series_within_an_abdomen_series_is_no_chest() -> None:
    st = _study()
    unnamed = _series(st, 2, "3.0 B31f", "B31f", n=60, z0=-200.0, step=3.0)  # within the abdomen series
    abdomen = _series(st, 3, "Abdomen 5.0 B31f", "B31f", n=45, z0=-220.0, step=5.0)
    other = _series(st, 4, "5.0 B31f", "B31f", n=40, z0=10.0, step=5.0)  # above: nothing says what it is
    assert _screened(unnamed, abdomen, other) == 4


def test_a_chest_series_too_short_to_screen_does_not_win() -> None:
    """A bolus tracker named for the chest (two positions) is no series to screen: the abdomen series is."""
    st = _study()
    tracker = _series(st, 2, "Thorax Bolus", "B30f", n=2, z0=0.0, step=1.0)
    abdomen = _series(st, 3, "Abdomen 3.0", "B31f", n=20, z0=-100.0, step=3.0)
    assert _screened(tracker, abdomen) == 3


@pytest.mark.parametrize(("soft", "lung"), [
    (("Thorax 1.0 Br40", ["Br40", "3"]), ("Lung 1.0 Br64", ["Br64", "3"])),  # Siemens ADMIRE: Br64 is sharp
    (("Thorax 1.0", "I30f"), ("Thorax 1.0", "I70f")),  # Siemens SAFIRE, one name for both
    (("Thorax 1.0 B31f", ""), ("Thorax 1.0 B70f", "")),  # the kernel only in the description
    (("Chest 1mm", "B"), ("Chest 1mm", "YA")),  # Philips
    (("Chest 1mm", "C"), ("Chest 1mm", "L")),
    (("Chest 1mm", "A"), ("Chest 1mm", "YC")),
    (("Body 1.0 CE", "FC13"), ("Lung 1.0 CE", "FC86")),  # Canon
])
def test_among_chest_series_the_lung_kernel_wins_over_the_soft_one_numbered_first(soft, lung) -> None:
    st = _study()
    assert _screened(_series(st, 3, *soft), _series(st, 4, *lung)) == 4


def test_a_lung_kernel_wins_over_more_positions_when_it_covers_the_chest() -> None:
    """GE: 0.625 mm STANDARD (twice the positions) and 1.25 mm LUNG over the same length, both of the chest: the
    lung reconstruction is screened (the paper's HRCT); and over a 5 mm soft series, a 5 mm lung one."""
    st = _study()
    standard = _series(st, 3, "0.625mm STND", "STANDARD", n=160, z0=0.0, step=0.625, body_part="CHEST")
    lung = _series(st, 4, "1.25mm LUNG", "LUNG", n=80, z0=0.0, step=1.25, body_part="CHEST")
    assert _screened(standard, lung) == 4
    thin_soft = _series(st, 2, "Thorax 1.0 B31f", "B31f", n=100, z0=0.0, step=1.0)
    thick_lung = _series(st, 5, "Lung 5.0 B70f", "B70f", n=21, z0=0.0, step=5.0)
    assert _screened(thin_soft, thick_lung) == 5


def test_a_lung_reconstruction_covering_part_of_the_chest_does_not_win_over_one_covering_it() -> None:
    """An expiration scan (a few lung-kernel slices) beside the chest: the chest, with more positions, is screened."""
    st = _study()
    thorax = _series(st, 2, "Thorax 1.0 B31f", "B31f", n=100, z0=0.0, step=3.0)
    expiration = _series(st, 3, "Lung Exp 1.0 Bl64", "Bl64", n=5, z0=100.0, step=20.0, thickness=1.0)
    assert _screened(thorax, expiration) == 2


def test_with_no_body_part_named_the_most_positions_win_as_before() -> None:
    st = _study()
    fewer = _series(st, 2, "5.0", "", n=16, z0=0.0, step=5.0)
    more = _series(st, 3, "3.0", "", n=24, z0=-64.0, step=3.0)
    assert _screened(fewer, more) == 3


def test_load_study_screens_the_chest_of_a_chest_and_abdomen_study_and_names_what_it_left() -> None:
    """End to end (decoded): the chest series, its slices in order, the abdomen series counted as not screened."""
    st = _study()
    chest = _series(st, 3, "Lung 5.0 B70f", "B70f", n=16, z0=0.0, step=5.0, body_part="CHEST")
    abdomen = _series(st, 4, "Abdomen 3.0 B31f", "B31f", n=24, z0=-64.0, step=3.0, body_part="ABDOMEN")
    study = load_study(abdomen + chest)
    assert (study.series_number, study.series_description, study.n_slices) == (3, "Lung 5.0 B70f", 16)
    assert [s.position_mm for s in study.slices] == [5.0 * i for i in range(16)]
    abdomen_uid = pydicom.dcmread(io.BytesIO(abdomen[0][1])).SeriesInstanceUID
    assert study.other_series == {abdomen_uid: 24}
    assert "1 other usable series not screened." in study.warnings


def test_doctests() -> None:
    """The examples in gateway.series' docstrings (the suite does not use --doctest-modules)."""
    result = doctest.testmod(gateway.series)
    assert result.failed == 0 and result.attempted > 0
