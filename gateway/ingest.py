"""Turn uploaded files into one :class:`PreparedStudy`: HU slices in anatomical order.

Pipeline: expand uploads (:func:`gateway.uploads.iter_upload`) ▸ parse each file once
(:func:`gateway.dicom.read_dataset`) into its frame headers, refusing what is not a CT image
(:func:`gateway.dicom.read_headers`) ▸ refuse CT images of more than one study
(:class:`~gateway.errors.MixedStudies`) ▸ choose the series (:func:`gateway.series.select_series`)
▸ decode only that series' pixels to HU on the 512 grid, from the data sets parsed on arrival (their
Pixel Data is read from the file's bytes only now), in parallel threads (the codecs release the GIL)
▸ sort along the slice normal, drop duplicate positions (:func:`gateway.series.sort_slices`) ▸ keep
the headers an SR needs (:func:`gateway.report.sr_context`). Nothing later parses the files again.

Partial failure is data: a file that cannot be used becomes a :class:`Rejection` with a reason
code from :mod:`gateway.errors`, and the rest of the study goes on. Only when nothing usable is
left does :func:`load_study` raise :class:`~gateway.errors.NoUsableSeries` (carrying every
rejection). Deciding whether there are enough slices for the case rule, and where the series has
gaps, is the aggregator's job (:func:`aggregator.case.decide`, under the job's rule); this module
only orders the slices.

:class:`StudyAccumulator` does the same one file at a time, for DICOMweb STOW-RS requests that
arrive in pieces: headers are checked on arrival (bad files are refused at once), pixels are
decoded when :meth:`StudyAccumulator.finish` is called.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import BrokenExecutor, Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from pydicom.dataset import Dataset

from aggregator.schema import counted
from ctscreen.contracts import SLICE_SIZE
from ctscreen.lungs import SECTION_PROBES, widest_sections
from ctscreen.machine import cores
from gateway.dicom import (
    ALWAYS_LOSSY,
    CT_SOP_CLASSES,
    MAYBE_LOSSY,
    NOISY_HU,
    FrameHeader,
    GridMapping,
    decode_hu,
    header_value,
    image_noise_hu,
    known_spacing,
    read_dataset,
    read_headers,
    to_grid,
)
from gateway.errors import InvalidInput, MixedPatients, MixedStudies, NoUsableSeries, Undecodable, UploadError
from gateway.phi import file_ref, patient_key_of, protect_logs
from gateway.report import SrContext, sr_context
from gateway.series import (
    MIN_SCREENABLE_POSITIONS,
    SeriesLabels,
    SeriesRules,
    SeriesSelection,
    SortedSeries,
    frame_exclusion,
    select_series,
    series_labels,
    sort_slices,
)
from gateway.uids import check_header_uids, is_uid
from gateway.uploads import UploadLimits, iter_upload

logger = logging.getLogger(__name__)

__all__ = [
    "PreparedStudy", "Rejection", "SliceInfo", "StudyAccumulator", "StudyPlan",
    "decode_frames", "load_study", "make_decode_pool", "plan_study", "section_extent", "study_noise_hu",
]

NOISE_PROBES = 3
"""Slices whose image noise is measured (:func:`study_noise_hu`): about 8 ms each."""


class Rejection(NamedTuple):
    """A file (or frame) that was not screened, and why."""

    filename: str
    reason: str
    """A :mod:`gateway.errors` reason code (``not_dicom``, ``not_ct``, ``no_pixel_data``,
    ``undecodable``) or a series-rule code (``localizer``, ``not_axial``, ``not_original``,
    ``thickness``, ``no_geometry``, ``orientation_mismatch``, ``duplicate_position``)."""
    message: str


@dataclass(frozen=True)
class SliceInfo:
    """Metadata of one screened slice (index ``i`` of :attr:`PreparedStudy.hu`)."""

    sop_instance_uid: str
    frame_index: int | None
    """0-based frame for multi-frame objects, else ``None``."""
    position_mm: float
    """Position along the slice normal (ascending through the study)."""
    instance_number: int | None
    filename: str
    rows: int
    cols: int
    grid: GridMapping
    """Maps 512-grid boxes back to this slice's original pixel grid (``grid.to_original``)."""

    @property
    def scale(self) -> float:
        """Original pixels per 512-grid pixel."""
        return self.grid.scale


@dataclass
class PreparedStudy:
    """One series ready for inference."""

    hu: np.ndarray
    """int16 [Z, 512, 512] in slice order; [0, 512, 512] when the study was screened ahead (the upload's
    speculation sent its slices to Triton as they were decoded, and nothing reads them after screening)."""
    slices: list[SliceInfo]
    study_instance_uid: str
    series_instance_uid: str
    series_number: int | None
    series_description: str
    normal: tuple[float, float, float]
    spacing_mm: float | None
    slice_thickness_mm: float | None
    pixel_spacing_mm: tuple[float, float] | None
    lung_field_cm2: float | None = None
    """The widest lung field of up to :data:`ctscreen.lungs.SECTION_PROBES` slices spread over the series, in cm²
    (:func:`section_extent`); None when a probed slice has no usable pixel spacing. The case rule calls a series
    whose widest lung field and widest body section are both smaller than a chest's no chest CT."""
    body_cm2: float | None = None
    """The widest body section of the same probes, in cm² (:func:`section_extent`)."""
    rejected: list[Rejection] = field(default_factory=list)
    """Files refused outright (not DICOM, not CT, no pixels, undecodable)."""
    excluded: list[Rejection] = field(default_factory=list)
    """Frames left out by the series rules or as duplicate positions."""
    other_series: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    n_files: int = 0
    sr_context: SrContext | None = None
    """Patient, study and instance headers of the screened slices, for the SR and FHIR report."""
    work_s: dict[str, float] = field(default_factory=dict)
    """Seconds of work per stage, summed over the decoding workers: ``decode`` (pixel data to HU) and
    ``resample`` (to the 512 grid)."""
    patient_key: str | None = None
    """The patient the study's CT images name (:func:`gateway.phi.patient_key`): the store compares it with the
    study's earlier versions."""

    @property
    def n_slices(self) -> int:
        """Number of slices to screen."""
        return len(self.slices)

    def summary(self) -> dict[str, object]:
        """JSON-friendly description without pixels (for job status and results)."""
        return {
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "series_number": self.series_number,
            "series_description": self.series_description,
            "n_files": self.n_files,
            "n_slices": self.n_slices,
            "spacing_mm": self.spacing_mm,
            "slice_thickness_mm": self.slice_thickness_mm,
            "rejected": [r._asdict() for r in self.rejected],
            "excluded": [r._asdict() for r in self.excluded],
            "other_series": dict(self.other_series),
            "warnings": list(self.warnings),
        }


def _default_workers() -> int:
    """Decode workers: the cores this process may use (its affinity, as everywhere else), at most 4."""
    return max(1, min(4, cores()))


class StudyAccumulator:
    """Collect files one by one (STOW-RS, C-STORE) and prepare the study when complete.

    Parameters
    ----------
    rules : SeriesRules | None
        Series rules applied by :meth:`finish`.
    limits : UploadLimits | None
        Limits applied when a zip is added.
    max_files : int
        Most objects accepted (later ones are refused as ``too_large``).
    one_study : bool
        Refuse CT images of more than one study in :meth:`finish` (default); ``False`` screens the
        best series whatever its study (a corpus of test files).

    Examples
    --------
    >>> acc = StudyAccumulator()
    >>> acc.add("x.dcm", b"not dicom").reason
    'not_dicom'
    >>> len(acc), acc.rejected[0].reason
    (0, 'not_dicom')
    """

    def __init__(
        self, rules: SeriesRules | None = None, *, limits: UploadLimits | None = None, max_files: int = 5000,
        one_study: bool = True, on_object: Callable[[str, Dataset, list[FrameHeader]], object] | None = None,
    ) -> None:
        if max_files < 1:
            raise ValueError(f'Argument "max_files" must be >= 1, got {max_files}.')
        self.rules = rules or SeriesRules()
        self.limits = limits or UploadLimits()
        self.max_files = max_files
        self.one_study = one_study
        self.on_object = on_object
        """Called with ``(SOP Instance UID, data set, frame headers)`` of each object kept, as it is kept
        (in the parsing thread; :class:`gateway.speculation.Speculation` screens ahead with it)."""
        self._objects: dict[str, tuple[Dataset, list[FrameHeader]]] = {}
        self._studies: Counter[str] = Counter()  # CT images per Study Instance UID, refused ones too
        self._patients: set[str] = set()  # the patient keys of those CT images (gateway.phi.patient_key)
        self.rejected: list[Rejection] = []
        self.n_files = 0
        self._lock = threading.Lock()  # add() may be called from several request threads

    def __len__(self) -> int:
        """Number of accepted objects (distinct SOP Instance UIDs)."""
        return len(self._objects)

    @property
    def study_instance_uids(self) -> set[str]:
        """Study Instance UIDs of the accepted objects."""
        return {hs[0].study_instance_uid for _, hs in self._objects.values()}

    @property
    def patient_key(self) -> str | None:
        """The patient the CT images name (:func:`gateway.phi.patient_key`), None before any or when several do."""
        with self._lock:
            return next(iter(self._patients)) if len(self._patients) == 1 else None

    @property
    def sop_instance_uids(self) -> list[str]:
        """SOP Instance UIDs of the accepted objects, in arrival order."""
        return list(self._objects)

    def add(self, filename: str, data: bytes | Path) -> Rejection | None:
        """Parse one file (the only time it is parsed), check its header and keep it; return its
        :class:`Rejection` if refused. ``data`` is the file's bytes or the file (which must then stay
        until the study's pixels are decoded: only its headers are read now).

        A second object with the same SOP Instance UID replaces the first (a re-send). Zip uploads
        must be expanded first (:meth:`add_upload`).
        """
        with self._lock:
            self.n_files += 1
            full = len(self._objects) >= self.max_files
        if full:
            return self._reject(
                Rejection(filename, "too_large", f"More than {self.max_files} files in one study.")
            )
        try:
            ds = read_dataset(data, filename)  # parsing runs outside the lock
            study = _ct_study_of(ds)
            if study is not None:
                patient = patient_key_of(ds)
                with self._lock:
                    self._studies[study] += 1
                    self._patients.add(patient)
            _, headers = read_headers(filename, ds)
            check_header_uids(headers[0])  # before any UID names a file or a row (issue 14)
        except InvalidInput as exc:
            # the reason only: a message may quote a header value (a Modality element whose broken length took in the
            # patient's name); the message goes to the uploader in the study's rejections
            logger.info("refused %s: %s", file_ref(filename), exc.reason)
            return self._reject(Rejection(filename, exc.reason, exc.message))
        uid = headers[0].sop_instance_uid
        with self._lock:
            if uid in self._objects:
                logger.info("%s re-sends SOP Instance %s; keeping the later copy", file_ref(filename), uid)
            self._objects[uid] = (ds, headers)
        if self.on_object is not None:
            self.on_object(uid, ds, headers)
        return None

    def _reject(self, rejection: Rejection) -> Rejection:
        with self._lock:
            self.rejected.append(rejection)
        return rejection

    def add_upload(self, filename: str, data: bytes | Path) -> list[Rejection]:
        """Expand an upload (a file or a zip, see :func:`gateway.uploads.iter_upload`) and add each file.

        Raises
        ------
        gateway.errors.UploadError
            The container breaks a limit or is unsafe (the whole upload is refused).
        """
        out = []
        for name, content in iter_upload(filename, data, self.limits):
            rej = self.add(name, content)
            if rej is not None:
                out.append(rej)
        return out

    def finish(self, *, workers: int | None = None, executor: Executor | None = None) -> PreparedStudy:
        """Choose the series, decode it and return the prepared study.

        Parameters
        ----------
        workers : int | None
            Decoding threads when no ``executor`` is given (default: up to 4, one per CPU).
        executor : concurrent.futures.Executor | None
            Pool to decode in, e.g. :func:`make_decode_pool` (processes: JPEG 2000 gains ~2x on
            2 cores; threads only help uncompressed and RLE data).

        Raises
        ------
        gateway.errors.MixedStudies
            The files hold CT images of more than one study (only one would be screened), unless
            ``one_study`` is False.
        gateway.errors.NoUsableSeries
            No frame passes the rules, or none of the chosen series decodes.
        """
        rejected, objects, frames, selection = self._select()
        excluded = [Rejection(_frame_name(h), reason, msg) for h, reason, msg in selection.excluded]
        failed_series: list[str] = []
        work: Counter[str] = Counter()
        while True:
            decoded, failures = _decode(objects, selection.chosen, workers or _default_workers(), executor, work)
            rejected.extend(failures)
            good = [h for h in selection.chosen if h.key in decoded]
            if good:
                break
            # the best series cannot be decoded at all: fall back to the next one
            failed_series.append(selection.series_instance_uid)
            logger.warning(
                "series %s: no frame decodes; trying the next series", selection.series_instance_uid
            )
            remaining = [h for h in frames if h.series_instance_uid not in failed_series]
            following = select_series(remaining, self.rules, _labels_of(objects))
            if following is None:
                raise NoUsableSeries(
                    f"No frame of series {', '.join(failed_series)} could be decoded and no other "
                    "series is usable.",
                    rejected=rejected,
                )
            selection = following
        ordered = sort_slices(good, self.rules)
        hu = np.empty((len(ordered.slices), SLICE_SIZE, SLICE_SIZE), dtype=np.int16)
        for i, h in enumerate(ordered.slices):
            hu[i] = decoded[h.key][0]
        grids = {key: grid for key, (_, grid) in decoded.items()}
        return _assemble(objects, selection, ordered, hu, grids, rejected, excluded, failed_series,
                         self.n_files, dict(work), patient_key=self.patient_key)

    def _select(
        self,
    ) -> tuple[list[Rejection], dict[str, tuple[Dataset, list[FrameHeader]]], list[FrameHeader], SeriesSelection]:
        """The header-level decisions: refuse mixed studies, choose the series (no pixel is decoded)."""
        with self._lock:
            rejected = list(self.rejected)
            objects = dict(self._objects)
            studies = dict(self._studies)
            patients = len(self._patients)
        if self.one_study and len(studies) > 1:
            found = ", ".join(f"{uid} ({n} files)" for uid, n in studies.items())
            raise MixedStudies(
                f"The upload holds CT images of {len(studies)} studies: {found}. Upload one study at a time "
                "(or send them by STOW-RS, which screens each study apart)."
            )
        if self.one_study and patients > 1:  # one study of two patients' series: a study names one patient
            raise MixedPatients(
                f"The upload's CT images name {patients} patients (their Patient ID or Issuer of Patient ID differ); a "
                "study names one patient. Upload each patient's study apart."
            )
        frames = [h for _, hs in objects.values() for h in hs]
        selection = select_series(frames, self.rules, _labels_of(objects))
        if selection is None:
            for h in frames:
                why = frame_exclusion(h, self.rules)
                if why is not None:
                    rejected.append(Rejection(_frame_name(h), *why))
            raise NoUsableSeries(
                f"No usable CT series among {self.n_files} files "
                f"({len(objects)} CT objects, {len(frames)} frames).",
                rejected=rejected,
            )
        return rejected, objects, frames, selection

    def plan(self) -> StudyPlan:
        """Decide the study from its headers alone: the series and the slice order, nothing decoded.

        :class:`StudyPlan` then decodes the objects in slice order, a batch at a time, so that
        inference can start on the first batch (:meth:`gateway.screening.Screener.screen`). As long
        as every frame of the chosen series decodes, the study it assembles is the one
        :meth:`finish` returns; when one does not, :meth:`finish` (which falls back to the next
        series and re-sorts what decoded) is the answer.

        Raises
        ------
        gateway.errors.MixedStudies, gateway.errors.NoUsableSeries
            As :meth:`finish`, for what the headers show.
        """
        rejected, objects, _, selection = self._select()
        excluded = [Rejection(_frame_name(h), reason, msg) for h, reason, msg in selection.excluded]
        return StudyPlan(self, objects, selection, sort_slices(selection.chosen, self.rules), rejected, excluded)


@dataclass
class StudyPlan:
    """One study decided from its headers (:meth:`StudyAccumulator.plan`), decoded a batch at a time.

    Decoding happens one object at a time (:meth:`decode_object`, thread-safe), in the order
    :meth:`batches` gives; :meth:`assemble` builds the :class:`PreparedStudy` once every object
    decoded; :meth:`finish` is the whole-study path (:meth:`StudyAccumulator.finish`) for a study
    with a frame that does not decode.
    """

    accumulator: StudyAccumulator
    objects: dict[str, tuple[Dataset, list[FrameHeader]]]
    selection: SeriesSelection
    ordered: SortedSeries
    """The chosen frames in slice order (duplicate positions removed), assuming every one decodes."""
    rejected: list[Rejection]
    excluded: list[Rejection]

    @property
    def n_slices(self) -> int:
        """Slices to screen when every chosen frame decodes."""
        return len(self.ordered.slices)

    @property
    def study_instance_uid(self) -> str:
        return self.ordered.slices[0].study_instance_uid

    @property
    def patient_key(self) -> str | None:
        """The patient the study's CT images name (:attr:`StudyAccumulator.patient_key`)."""
        return self.accumulator.patient_key

    @property
    def series_instance_uid(self) -> str:
        return self.ordered.slices[0].series_instance_uid

    def batches(self, size: int) -> list[tuple[int, list[str]]]:
        """``(slices ready, objects to decode)`` per step: decoding the objects of a step (after those
        of the steps before) fills slices ``[0, slices ready)``. Objects are SOP Instance UIDs, each
        listed once (a multi-frame object in the first step that needs it); the objects holding only
        duplicate positions come in a last step (they must decode too: a failure changes the result)."""
        if size < 1:
            raise ValueError(f'Argument "size" must be >= 1, got {size}.')
        seen: set[str] = set()
        steps: list[tuple[int, list[str]]] = []
        frames = self.ordered.slices
        for start in range(0, len(frames), size):
            chunk = frames[start : start + size]
            uids = [h.sop_instance_uid for h in chunk if h.sop_instance_uid not in seen]
            uids = list(dict.fromkeys(uids))
            seen.update(uids)
            steps.append((start + len(chunk), uids))
        rest = list(dict.fromkeys(h.sop_instance_uid for h in self.selection.chosen if h.sop_instance_uid not in seen))
        if rest:
            steps.append((len(frames), rest))
        return steps

    def decode_object(self, uid: str) -> tuple[list[tuple[tuple[str, int], np.ndarray, GridMapping]],
                                                Rejection | None, dict[str, float]]:
        """Decode the chosen frames of one object to the 512 grid (see :func:`decode_frames`)."""
        ds, headers = self.objects[uid]
        return decode_frames(ds, headers, self._chosen_keys.get(uid, frozenset()))

    @functools.cached_property
    def _chosen_keys(self) -> dict[str, frozenset[tuple[str, int]]]:
        # built once: a scan of every chosen frame for each object was O(n^2)
        return _keys_by_object(self.selection.chosen)

    def assemble(self, hu: np.ndarray, grids: dict[tuple[str, int], GridMapping],
                 work: dict[str, float] | None = None, *,
                 pixels: Mapping[tuple[str, int], np.ndarray] | None = None) -> PreparedStudy:
        """The prepared study once every object decoded: ``hu`` filled in :attr:`ordered` order, or empty
        with ``pixels`` holding each slice by key (a study screened ahead: :attr:`PreparedStudy.hu` stays empty)."""
        frames = self.ordered.slices
        slice_at = None if pixels is None else (lambda i: pixels[frames[i].key])
        return _assemble(self.objects, self.selection, self.ordered, hu, grids, list(self.rejected),
                         list(self.excluded), [], self.accumulator.n_files, dict(work or {}), slice_at,
                         patient_key=self.patient_key)

    def finish(self, *, workers: int | None = None, executor: Executor | None = None) -> PreparedStudy:
        """The whole-study path (:meth:`StudyAccumulator.finish`): for a study with a frame that does not decode."""
        return self.accumulator.finish(workers=workers, executor=executor)


def _assemble(
    objects: dict[str, tuple[Dataset, list[FrameHeader]]],
    selection: SeriesSelection,
    ordered: SortedSeries,
    hu: np.ndarray,
    grids: dict[tuple[str, int], GridMapping],
    rejected: list[Rejection],
    excluded: list[Rejection],
    failed_series: list[str],
    n_files: int,
    work: dict[str, float],
    slice_at: Callable[[int], np.ndarray] | None = None,
    *,
    patient_key: str | None = None,
) -> PreparedStudy:
    """The :class:`PreparedStudy` of ``ordered`` slices whose HU are ``hu`` (one row per slice), or
    ``slice_at(i)`` where ``hu`` is empty; ``patient_key``: the patient its CT images name."""
    for h in ordered.duplicates:
        excluded.append(
            Rejection(
                _frame_name(h), "duplicate_position", "Another slice has the same position; kept one."
            )
        )
    infos = []
    warnings: list[str] = []
    for h, p in zip(ordered.slices, ordered.positions_mm, strict=True):
        infos.append(
            SliceInfo(
                h.sop_instance_uid,
                h.frame_index,
                float(p),
                h.instance_number,
                h.filename,
                h.rows,
                h.cols,
                grids[h.key],
            )
        )
    # each slice-level warning once, counted: per file it repeated for every slice, and it named the
    # uploader's file names (which may carry a patient's name) on every screen that shows the result
    for warning, n in Counter(w for h in ordered.slices for w in h.warnings).items():
        warnings.append(f"{n} of {counted(len(ordered.slices), 'slice')}: {warning}")
    first = ordered.slices[0]
    if ordered.duplicates:
        warnings.append(f"{counted(len(ordered.duplicates), 'duplicate slice position')} removed.")
    if selection.derived is not None:
        shown = "\\".join(selection.derived) or "absent"
        warnings.append(f"No ORIGINAL\\PRIMARY series of {MIN_SCREENABLE_POSITIONS} or more positions: screened a derived "
                        f"axial series (Image Type {shown}); "
                        "check it is a plain reconstruction of the acquisition.")
    if selection.other_series:
        warnings.append(f"{len(selection.other_series)} other usable series not screened.")
    for uid in failed_series:
        warnings.append(
            f"Series {uid} could not be decoded; screened series {selection.series_instance_uid}."
        )
    lossy = [h for h in ordered.slices if h.lossy]
    if lossy:
        syntaxes = ", ".join(sorted({_lossy_label(h.transfer_syntax_uid) for h in lossy}))
        warnings.append(f"{len(lossy)} of {counted(len(ordered.slices), 'slice')} lossy compressed ({syntaxes}): the models "
                        "learnt from lossless CT, so faint opacities may be missed; screen the lossless original.")
    if (first.rows, first.cols) != (SLICE_SIZE, SLICE_SIZE):
        warnings.append(f"Matrix {first.rows}x{first.cols} resampled to {SLICE_SIZE}x{SLICE_SIZE}.")
    thicknesses = [h.slice_thickness for h in ordered.slices if h.slice_thickness is not None]
    at = slice_at or (lambda i: hu[i])
    lung_field_cm2, body_cm2 = section_extent(at, ordered.slices, grids)
    noise = study_noise_hu(at, len(ordered.slices))
    if noise is not None and noise > NOISY_HU:
        warnings.append(f"Image noise about {noise:.0f} HU (soft tissue, as the models see it): above the {NOISY_HU:.0f} HU "
                        "up to which they were measured; expect more false boxes (a low-dose or sharp-kernel series: "
                        "screen a soft-kernel reconstruction if there is one).")
    if lung_field_cm2 is None:
        warnings.append("No usable Pixel Spacing: the slices' scale is unknown, so the matrix alone sets the grid and "
                        "the check that the series is a chest (lung field and body section in cm²) is off.")
    context = sr_context(objects[uid][0] for uid in dict.fromkeys(info.sop_instance_uid for info in infos))  # slice order
    return PreparedStudy(
        hu=hu,
        patient_key=patient_key,
        slices=infos,
        study_instance_uid=first.study_instance_uid,
        series_instance_uid=first.series_instance_uid,
        series_number=first.series_number,
        series_description=first.series_description,
        normal=ordered.normal,
        spacing_mm=ordered.spacing_mm,
        slice_thickness_mm=float(np.median(thicknesses)) if thicknesses else None,
        pixel_spacing_mm=first.pixel_spacing,
        lung_field_cm2=lung_field_cm2,
        body_cm2=body_cm2,
        rejected=rejected,
        excluded=excluded,
        other_series=selection.other_series,
        warnings=warnings,
        n_files=n_files,
        sr_context=context,
        work_s=work,
    )


def study_noise_hu(slice_at: Callable[[int], np.ndarray], n: int, probes: int = NOISE_PROBES) -> float | None:
    """The median image noise (:func:`gateway.dicom.image_noise_hu`) of up to ``probes`` slices spread over the
    middle of the series (``slice_at(i)``: slice ``i`` on the 512 grid), or None when none holds enough tissue."""
    at = sorted({int(round(v)) for v in np.linspace(0, n - 1, probes + 2)[1:-1]}) if n > 2 else list(range(n))

    def centre(img: np.ndarray) -> np.ndarray:  # the middle 3/4: half the time, the same readings on real chests
        r, c = img.shape[0] // 8, img.shape[1] // 8
        return img[r : img.shape[0] - r, c : img.shape[1] - c]

    values = [v for v in (image_noise_hu(centre(slice_at(i))) for i in at) if v is not None]
    return float(np.median(values)) if values else None


def section_extent(slice_at: Callable[[int], np.ndarray], frames: Sequence[FrameHeader],
                   grids: Mapping[tuple[str, int], GridMapping],
                   probes: int = SECTION_PROBES) -> tuple[float | None, float | None]:
    """The widest lung field and the widest body section (cm², :func:`ctscreen.lungs.widest_sections`) of up to
    ``probes`` slices spread evenly over the series ``frames`` (in slice order; ``slice_at(i)`` is slice ``i`` on
    the 512 grid, whose pixel is the stored one times ``grids[key].scale``), each on the original image's
    footprint (:meth:`GridMapping.footprint`). ``(None, None)`` when a probed slice
    has no pixel spacing, or one that is no CT's (:func:`gateway.dicom.known_spacing`)."""

    def mm_at(i: int) -> tuple[float, float] | None:
        h = frames[i]
        if h.pixel_spacing is None or not known_spacing(h.pixel_spacing, h.rows, h.cols):
            return None
        scale = grids[h.key].scale
        return h.pixel_spacing[0] * scale, h.pixel_spacing[1] * scale

    # measured on the original image's footprint: the body wall to_grid puts around a cut field of view is no body
    return widest_sections(lambda i: slice_at(i)[grids[frames[i].key].footprint()], mm_at, len(frames), probes)


def _ct_study_of(ds: Dataset) -> str | None:
    """The Study Instance UID of a CT image (by SOP class) whose three UIDs are well formed, else None.

    Counted for every such file, even one refused later (no pixels, not decodable), so that an upload
    mixing studies is refused whichever of its files would have been screened.
    """
    try:
        values = [str(header_value(ds, k, "") or "").strip() for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID")]
    except Exception:  # noqa: BLE001 - malformed values surface lazily in pydicom
        return None
    if values[0] not in CT_SOP_CLASSES or not all(is_uid(v) for v in values):
        return None
    return values[2]


def _labels_of(objects: Mapping[str, tuple[Dataset, list[FrameHeader]]]) -> dict[str, SeriesLabels]:
    """What each series' first object says of its body part and frame of reference (:func:`gateway.series.series_labels`),
    read from the data sets parsed on arrival."""
    labels: dict[str, SeriesLabels] = {}
    for ds, headers in objects.values():
        uid = headers[0].series_instance_uid
        if uid not in labels:
            labels[uid] = series_labels(ds)
    return labels


def _keys_by_object(frames: Iterable[FrameHeader]) -> dict[str, frozenset[tuple[str, int]]]:
    """The keys of ``frames`` grouped by their object (SOP Instance UID), in first-seen order."""
    keys: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for h in frames:
        keys[h.sop_instance_uid].add(h.key)
    return {uid: frozenset(k) for uid, k in keys.items()}


def _decode(
    objects: dict[str, tuple[Dataset, list[FrameHeader]]],
    chosen: list[FrameHeader],
    workers: int,
    executor: Executor | None,
    work: Counter[str],
) -> tuple[dict[tuple[str, int], tuple[np.ndarray, GridMapping]], list[Rejection]]:
    jobs = [(*objects[uid], keys) for uid, keys in _keys_by_object(chosen).items()]
    if executor is not None:
        try:
            results = list(executor.map(decode_frames, *zip(*jobs, strict=True), chunksize=4))
        except BrokenExecutor as exc:
            # a codec crashed a worker process (that is why decoding runs there): the study is
            # refused, the server lives; the owner of the pool must replace it.
            raise Undecodable(f"A decoder process died while decoding this study: {exc}") from exc
    elif workers > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
            results = list(pool.map(decode_frames, *zip(*jobs, strict=True)))
    else:
        results = [decode_frames(*job) for job in jobs]
    decoded: dict[tuple[str, int], tuple[np.ndarray, GridMapping]] = {}
    failures = []
    for frames, rej, spent in results:
        work.update(spent)
        if rej is not None:
            failures.append(rej)
        for key, arr, grid in frames:
            decoded[key] = (arr, grid)
    return decoded, failures


def decode_frames(
    ds: Dataset, headers: list[FrameHeader], keys: frozenset[tuple[str, int]]
) -> tuple[list[tuple[tuple[str, int], np.ndarray, GridMapping]], Rejection | None, dict[str, float]]:
    """Decode the wanted frames of one parsed object to 512-grid HU (top level: runs in worker
    processes, where the data set arrives pickled with its source bytes: it is not parsed again).

    The third item is the seconds spent (this thread's wall clock): ``decode`` and ``resample``."""
    filename = headers[0].filename
    t0 = time.perf_counter()
    try:
        native = decode_hu(ds, headers, filename)
    except InvalidInput as exc:
        return [], Rejection(filename, exc.reason, exc.message), {"decode": time.perf_counter() - t0}
    t1 = time.perf_counter()
    out = []
    for h, frame in zip(headers, native, strict=True):
        if h.key in keys:
            arr, grid = to_grid(frame, orientation=h.orientation, spacing=h.pixel_spacing)
            out.append((h.key, arr, grid))
    return out, None, {"decode": t1 - t0, "resample": time.perf_counter() - t1}


def make_decode_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool for :meth:`StudyAccumulator.finish` / :func:`load_study` (``executor=``).

    JPEG 2000 and JPEG-LS decoders hold the GIL, so threads do not help them; processes do.
    The pool uses the ``spawn`` start method (safe beside the server's threads); create it once
    (e.g. in the app's lifespan) and shut it down on exit. A codec that crashes kills only its
    worker: the study fails with :class:`~gateway.errors.Undecodable` and the pool is broken
    (``pool._broken``), so replace it.
    """
    if workers < 1:
        raise ValueError(f'Argument "workers" must be >= 1, got {workers}.')
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=protect_logs)


def _lossy_label(transfer_syntax_uid: str) -> str:
    """How a lossy slice was compressed: its transfer syntax's name, or its Lossy Image Compression flag
    (a lossy copy stored again in a lossless syntax)."""
    from pydicom.uid import UID

    if transfer_syntax_uid in ALWAYS_LOSSY | MAYBE_LOSSY:
        return UID(transfer_syntax_uid).name
    return "Lossy Image Compression 01"


def _frame_name(h: FrameHeader) -> str:
    return h.filename if h.frame_index is None else f"{h.filename}#frame{h.frame_index}"


def load_study(
    sources: Iterable[tuple[str, bytes | Path]],
    rules: SeriesRules | None = None,
    *,
    limits: UploadLimits | None = None,
    workers: int | None = None,
    executor: Executor | None = None,
    one_study: bool = True,
) -> PreparedStudy:
    """Prepare one study from uploaded files.

    Parameters
    ----------
    sources : Iterable[tuple[str, bytes | pathlib.Path]]
        ``(filename, content)`` per upload, or ``(filename, file)`` (kept until the pixels are decoded);
        zip archives are expanded with ``limits``.
    rules : SeriesRules | None
        Series rules (default :class:`~gateway.series.SeriesRules()`).
    limits : UploadLimits | None
        Upload limits for zip archives.
    workers : int | None
        Decoding threads.
    executor : concurrent.futures.Executor | None
        Decoding pool (see :func:`make_decode_pool`); overrides ``workers``.
    one_study : bool
        Refuse CT images of more than one study (see :class:`StudyAccumulator`).

    Returns
    -------
    PreparedStudy

    Raises
    ------
    gateway.errors.UploadError
        A zip archive is unsafe or too large (nothing is screened).
    gateway.errors.MixedStudies
        CT images of more than one study (with ``one_study``).
    gateway.errors.NoUsableSeries
        Nothing usable; ``exc.rejected`` lists every file and its reason.
    """
    return _accumulate(sources, rules, limits, one_study).finish(workers=workers, executor=executor)


def plan_study(
    sources: Iterable[tuple[str, bytes | Path]],
    rules: SeriesRules | None = None,
    *,
    limits: UploadLimits | None = None,
    one_study: bool = True,
    on_object: Callable[[str, Dataset, list[FrameHeader]], object] | None = None,
) -> StudyPlan:
    """Parse one study's files and decide it from their headers (:meth:`StudyAccumulator.plan`);
    the pixels are decoded later, in slice order (:class:`StudyPlan`). Arguments and errors as
    :func:`load_study`, less the pixel-level ones; ``on_object`` sees each object kept as it is parsed
    (:attr:`StudyAccumulator.on_object`)."""
    return _accumulate(sources, rules, limits, one_study, on_object).plan()


def _accumulate(
    sources: Iterable[tuple[str, bytes | Path]], rules: SeriesRules | None, limits: UploadLimits | None, one_study: bool,
    on_object: Callable[[str, Dataset, list[FrameHeader]], object] | None = None,
) -> StudyAccumulator:
    acc = StudyAccumulator(rules, limits=limits, one_study=one_study, on_object=on_object)
    n = 0
    for filename, data in sources:
        n += 1
        acc.add_upload(filename, data)
    if n == 0:
        raise UploadError("The upload holds no file (an empty zip, or one of folders only).")
    return acc
