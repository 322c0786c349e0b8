"""Training data: phantom studies (generated on the fly) and NIfTI sets, as banks of labelled slices.

Every source yields :class:`Volume` objects (HU ``[Z, 512, 512]`` int16, masks, per-slice class); a
:class:`SliceBank` keeps the slices of many volumes with the target of one task, pooled to the net's
input size, and draws class-balanced batches.

Targets
-------
``valid_area``  the filled rectangle of the lung-field box of each slice (the phantom's ``valid_boxes``,
                or the bounding box of the lung mask of a NIfTI set); empty where no lung is.
``lesion``      the COVID-19 lesion mask only. Non-COVID findings (the phantom's ``finding_mask``: nodules,
                TB, bronchiectasis, bacterial pneumonia, emphysema, the stomach bubble) are target 0,
                and slices showing them are over-sampled so the net learns to ignore them.

NIfTI layout (COVID-19-CT-Seg, MosMedData and the like)
-------------------------------------------------------
``DIR`` holds a folder of volumes and a folder of lesion masks (and optionally lung masks); files are
matched by case id (the file name without ``.nii[.gz]`` and without a ``_mask``/``_seg`` suffix)::

    DIR/ct_scans/case1.nii.gz      (or images/, imagesTr/, volumes/, studies/, recursively)
    DIR/Infection_Mask/case1.nii.gz (or infection/, lesion/, masks/, labelsTr/)
    DIR/Lung_Mask/case1.nii.gz      (optional; or lung/, lungs/, lung_masks/)

Volumes are reoriented to RAS, sliced axially into DICOM-like images (row 0 anterior, column 0 the
patient's right) and resampled to 512 x 512 when needed.
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctscreen.contracts import SLICE_SIZE

logger = logging.getLogger(__name__)

# Per-slice sampling classes (column ``cls`` of a bank).
CLS_EMPTY = 0  # no lung on the slice
CLS_PLAIN = 1  # lung, no lesion, no finding
CLS_LESION = 2  # COVID lesion present
CLS_FINDING = 3  # a hard-negative finding (class name in ``finding``), no lesion

PHANTOM_TRAIN_SEED0 = 1_000
PHANTOM_VAL_SEED0 = 500_000
PHANTOM_EVAL_SEED0 = 900_000
"""Seed ranges: training studies start at 1000, validation at 500000, held-out evaluation at 900000."""

PHANTOM_KIND_CYCLE = (
    "covid", "normal", "covid", "nodule", "covid", "tb", "covid", "bronchiectasis",
    "covid", "bacterial", "covid", "emphysema",
)  # fmt: skip
"""Kinds of successive phantom studies: half COVID, half every other class in turn."""


class DataError(ValueError):
    """A training data source is missing, empty or malformed."""


@dataclass
class Volume:
    """One labelled study, slices in order: HU and masks at 512 x 512."""

    case_id: str
    hu: np.ndarray  # int16 [Z, 512, 512]
    lesion: np.ndarray  # bool [Z, 512, 512]
    valid_boxes: np.ndarray  # int [Z, 4] (x0, y0, x1, y1) inclusive, -1 where no lung
    finding: list[str]  # per slice: "" or the hard-negative class shown on the slice
    kind: str = "unknown"
    meta: dict = field(default_factory=dict)
    finding_mask: np.ndarray | None = None  # bool [Z, 512, 512] where a hard-negative finding is

    def __post_init__(self) -> None:
        z = len(self.hu)
        if self.hu.ndim != 3 or self.hu.shape[1:] != (SLICE_SIZE, SLICE_SIZE):
            raise DataError(f"{self.case_id}: HU must be [Z, 512, 512], got {self.hu.shape}.")
        if self.lesion.shape != self.hu.shape:
            raise DataError(f"{self.case_id}: lesion mask {self.lesion.shape} != HU {self.hu.shape}.")
        if self.valid_boxes.shape != (z, 4) or len(self.finding) != z:
            raise DataError(f"{self.case_id}: per-slice labels do not match {z} slices.")


def boxes_from_mask(mask: np.ndarray) -> np.ndarray:
    """Per-slice bounding boxes ``[Z, 4]`` (x0, y0, x1, y1 inclusive; -1 when empty) of ``[Z, H, W]``."""
    out = np.full((len(mask), 4), -1, dtype=np.int32)
    for i, m in enumerate(mask):
        rows = np.flatnonzero(m.any(axis=1))
        if len(rows) == 0:
            continue
        cols = np.flatnonzero(m.any(axis=0))
        out[i] = (cols[0], rows[0], cols[-1], rows[-1])
    return out


def box_mask(box: np.ndarray, size: int = SLICE_SIZE) -> np.ndarray:
    """Filled rectangle ``[size, size]`` bool of one inclusive box (all False when the box is empty)."""
    m = np.zeros((size, size), dtype=bool)
    if np.all(np.asarray(box) >= 0):
        x0, y0, x1, y1 = (int(v) for v in box)
        m[y0 : y1 + 1, x0 : x1 + 1] = True
    return m


# --- phantom -----------------------------------------------------------------------------------


def phantom_kind(i: int) -> str:
    """Kind of the ``i``-th phantom study of a set (see :data:`PHANTOM_KIND_CYCLE`)."""
    return PHANTOM_KIND_CYCLE[i % len(PHANTOM_KIND_CYCLE)]


GUT_FINDINGS = ("stomach_bubble", "bowel_gas")
"""Findings present in every phantom study (below the diaphragm)."""


def primary_finding(names: str) -> str:
    """The class a slice is sampled as: its first lung finding, else its gut finding ("" if none)."""
    parts = [p for p in names.split("+") if p]
    lung = [p for p in parts if p not in GUT_FINDINGS]
    return (lung or parts or [""])[0]


def _finding_codes() -> dict[int, str]:
    """Code -> class name of ``Study.finding_mask`` values (``phantom.findings.FINDING_CODES``)."""
    try:
        from phantom.findings import FINDING_CODES
    except ImportError:  # pragma: no cover - older phantom
        return {}
    return {int(v): k for k, v in FINDING_CODES.items()}


def volume_from_study(study) -> Volume:
    """A :class:`Volume` from a ``phantom.Study`` (resampled to 512 x 512 when its matrix differs)."""
    return _volume_from_arrays(
        f"phantom-{study.seed}-{study.kind}", np.asarray(study.hu), np.asarray(study.lung_mask),
        np.asarray(study.lesion_mask), np.asarray(study.finding_mask), study.kind,
        {"seed": int(study.seed), "kind": study.kind},
    )


def phantom_volumes(
    n: int, seed0: int, *, n_slices: int | None = None, kinds: tuple[str, ...] | None = None
) -> Iterator[Volume]:
    """Generate ``n`` phantom studies with seeds ``seed0 .. seed0 + n - 1``, kinds cycling."""
    import phantom

    for i in range(n):
        kind = kinds[i % len(kinds)] if kinds else phantom_kind(i)
        study = phantom.make_study(seed=seed0 + i, kind=kind, n_slices=n_slices, matrix=SLICE_SIZE)
        yield volume_from_study(study)


def _volume_from_arrays(case_id: str, hu, lung, lesion, finding_mask, kind: str, meta: dict) -> Volume:
    """A :class:`Volume` from ``[Z, H, W]`` arrays on any square grid (resampled to 512)."""
    codes = _finding_codes()
    names = []
    for sl in finding_mask:
        vals = np.unique(sl[sl > 0])
        names.append("+".join(sorted({codes.get(int(v), f"finding{int(v)}") for v in vals})))
    if hu.shape[1:] != (SLICE_SIZE, SLICE_SIZE):
        hu = np.clip(np.rint(_to_grid(hu, 1)), -32768, 32767)
        lung = _to_grid(lung.astype(np.float32), 0) > 0.5
        lesion = _to_grid(lesion.astype(np.float32), 0) > 0.5
        finding_mask = _to_grid(finding_mask.astype(np.float32), 0) > 0.5
    return Volume(
        case_id=case_id,
        hu=np.asarray(hu, dtype=np.int16),
        lesion=np.asarray(lesion, dtype=bool),
        valid_boxes=boxes_from_mask(np.asarray(lung, dtype=bool)),
        finding=names,
        kind=kind,
        meta=meta,
        finding_mask=np.asarray(finding_mask) > 0,
    )


def load_phantom_dir(study_dir: Path) -> Volume:
    """A study written by ``phantom.write_study`` (``dicom/``, ``masks/*.nii.gz``, ``manifest.json``).

    HU come from the DICOM files (sorted by position along the slice normal, inferior first, as
    ``phantom.Study``), the truth from the NIfTI masks.
    """
    import pydicom

    from phantom.dicomio import read_manifest, read_masks

    study_dir = Path(study_dir)
    try:
        manifest = read_manifest(study_dir)
        masks = read_masks(study_dir)
    except (OSError, ValueError) as exc:
        raise DataError(f"{study_dir}: not a phantom study folder: {exc}") from exc
    slices = []
    for f in sorted((study_dir / "dicom").iterdir()):
        ds = pydicom.dcmread(f)
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        slices.append((float(ds.ImagePositionPatient[2]), hu))
    if len(slices) != len(masks["lung"]):
        raise DataError(f"{study_dir}: {len(slices)} DICOM files but {len(masks['lung'])} mask slices.")
    slices.sort(key=lambda t: t[0])
    hu = np.stack([h for _, h in slices])
    kind = str(manifest.get("kind", "unknown"))
    seed = manifest.get("seed")
    return _volume_from_arrays(
        f"phantom-{seed}-{kind}", hu, masks["lung"], masks["lesion"], masks["finding"], kind,
        {"seed": seed, "kind": kind, "path": str(study_dir)},
    )


def phantom_dir_volumes(root: Path) -> Iterator[Volume]:
    """Every study folder (one holding ``manifest.json``) under ``root``, in name order."""
    dirs = sorted(p.parent for p in Path(root).rglob("manifest.json"))
    if not dirs:
        raise DataError(f"{root}: no phantom study folders (with manifest.json) found.")
    for d in dirs:
        yield load_phantom_dir(d)


# --- NIfTI -------------------------------------------------------------------------------------

_VOLUME_DIRS = ("ct_scans", "images", "imagestr", "volumes", "studies", "ct", "scans")
_LESION_DIRS = ("infection_mask", "infection", "lesion", "lesions", "masks", "labelstr", "labels")
_LUNG_DIRS = ("lung_mask", "lung", "lungs", "lung_masks")
_NII = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)


def is_nifti_name(name: str) -> bool:
    """Whether a file name is a NIfTI volume's (``.nii`` or ``.nii.gz``, any case)."""
    return bool(_NII.search(name))


def _case_id(path: Path) -> str:
    stem = _NII.sub("", path.name)
    return re.sub(r"(_mask|_seg|_label|_0000)$", "", stem, flags=re.IGNORECASE)


def _index(root: Path, names: tuple[str, ...]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower() in names):
        for f in sorted(d.rglob("*")):
            if f.is_file() and _NII.search(f.name):
                found.setdefault(_case_id(f), f)
    return found


def nifti_cases(root: Path) -> list[tuple[str, Path, Path, Path | None]]:
    """``(case_id, volume, lesion_mask, lung_mask | None)`` for every case of a NIfTI set."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f'Argument "root" must be a folder, got {root}.')
    vols = _index(root, _VOLUME_DIRS)
    lesions = _index(root, _LESION_DIRS)
    lungs = _index(root, _LUNG_DIRS)
    if not vols:
        raise DataError(f"{root}: no NIfTI volumes in any of {', '.join(_VOLUME_DIRS)}/.")
    cases = [(cid, v, lesions[cid], lungs.get(cid)) for cid, v in vols.items() if cid in lesions]
    if not cases:
        raise DataError(f"{root}: no volume has a lesion mask (looked in {', '.join(_LESION_DIRS)}/).")
    missing = sorted(set(vols) - set(lesions))
    if missing:
        logger.warning("%s: %d volume(s) without a lesion mask skipped: %s", root, len(missing), missing[:5])
    return cases


def _axial_slices(img) -> np.ndarray:
    """``[Z, H, W]`` axial slices of a nibabel image, DICOM-like orientation, inferior first."""
    import nibabel as nib

    can = nib.as_closest_canonical(img)
    data = np.asanyarray(can.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"expected a 3-D NIfTI image, got shape {data.shape}.")
    # RAS: +x patient left->right, +y posterior->anterior. DICOM images: column 0 = patient right,
    # row 0 = anterior. So reverse both in-plane axes and put z first.
    return np.ascontiguousarray(np.transpose(data[::-1, ::-1, :], (2, 1, 0)))


def square_extent(shape: tuple[int, ...], spacing: tuple[float, float]) -> tuple[int, int]:
    """Rows and columns of a slice of ``shape`` (``[..., H, W]``) padded to a square field (in mm, with
    ``spacing`` = (row, column) mm), so a zoom to the grid keeps pixels square instead of stretching a
    non-square slice (384 x 512 read 1.33 times too tall).

    >>> square_extent((10, 384, 512), (0.7, 0.7)), square_extent((10, 512, 512), (0.7, 0.7))
    ((512, 512), (512, 512))
    """
    h, w = shape[-2], shape[-1]
    side = max(h * spacing[0], w * spacing[1])
    return max(h, round(side / spacing[0])), max(w, round(side / spacing[1]))


def _to_grid(vol: np.ndarray, order: int, spacing: tuple[float, float] | None = None, fill: float = 0.0) -> np.ndarray:
    """``vol`` ``[Z, H, W]`` zoomed to the 512 grid; with ``spacing`` (row, column mm), first padded with ``fill``
    around the centre to a square field, so its pixels stay square."""
    if spacing is not None:
        h, w = square_extent(vol.shape, spacing)
        if (h, w) != vol.shape[1:]:
            top, left = (h - vol.shape[1]) // 2, (w - vol.shape[2]) // 2
            padded = np.full((vol.shape[0], h, w), fill, dtype=vol.dtype)
            padded[:, top : top + vol.shape[1], left : left + vol.shape[2]] = vol
            vol = padded
    if vol.shape[1:] == (SLICE_SIZE, SLICE_SIZE):
        return vol
    from scipy import ndimage

    zoom = (1.0, SLICE_SIZE / vol.shape[1], SLICE_SIZE / vol.shape[2])
    out = ndimage.zoom(vol.astype(np.float32), zoom, order=order, grid_mode=True, mode="nearest")
    return out[:, :SLICE_SIZE, :SLICE_SIZE]


def load_nifti_case(
    case_id: str, volume: Path, lesion: Path | None, lung: Path | None = None,
    lesion_labels: Sequence[int] | None = None,
) -> Volume:
    """Load one NIfTI case as a :class:`Volume` (HU clipped to int16, NaN as air; masks > 0; no ``lesion`` file:
    an empty lesion mask, for a volume labelled per study only). A slice that is not square (in mm) is padded
    with air to a square field before the zoom to the grid (``meta["grid_mm"]``: mm a grid pixel).

    A mask whose header puts it on the volume's voxels in another voxel order (saved canonical, RAS, beside a
    volume stored head first) is read in world space; any other mask is taken voxel for voxel on the volume's
    grid (its array in the volume's orientation), with a warning: a mask written with another affine (a tool's
    identity, a flipped z) was turned by its own and its lesions landed on other slices.

    ``lesion_labels``: None, every non-zero voxel is lesion (a training set's binary masks); a tuple (evaluation):
    those labels are lesion, and an empty one refuses a mask of several labels (COVID-19-CT-Seg's lungs 1, 2 and
    infection 3; MedSeg's effusion 3 beside its lesions), where every non-zero voxel counted as lesion made each
    lung slice a lesion slice."""
    import nibabel as nib

    def on_volume_grid(mask_path: Path, img: Any, labels: Sequence[int] | None) -> np.ndarray:
        mask: Any = nib.load(str(mask_path))
        can_mask, can_img = nib.as_closest_canonical(mask), nib.as_closest_canonical(img)
        if can_mask.shape[:3] == can_img.shape[:3] and np.allclose(can_mask.affine, can_img.affine, atol=1e-2):
            values = _axial_slices(mask)  # the same voxels, maybe in another order: read in world space
        else:
            if not np.allclose(mask.affine, img.affine, atol=1e-2):
                logger.warning("%s: the mask's header places it otherwise than the volume's; taken voxel for "
                               "voxel on the volume's grid", case_id)
            values = _axial_slices(nib.Nifti1Image(np.asanyarray(mask.dataobj), img.affine))
        if labels is None:  # a lung mask: any label is lung
            return values > 0
        if labels:
            return np.isin(values, np.asarray(labels))
        found = [v for v in np.unique(values) if v != 0]
        if len(found) > 1:
            shown = ", ".join(f"{float(v):g}" for v in found[:8])
            raise DataError(f"its lesion mask holds several labels ({shown}): which are lesions? (lungs, "
                            "effusion ...); name them, e.g. --lesion-segments 3 (or 1,2)")
        return values > 0

    try:
        img: Any = nib.load(str(volume))
        hu = _axial_slices(img).astype(np.float32)
        les = (on_volume_grid(lesion, img, None if lesion_labels is None else tuple(lesion_labels))
               if lesion is not None else np.zeros(hu.shape, bool))
        lng = on_volume_grid(lung, img, None) if lung is not None else None
    except (OSError, EOFError, zlib.error, nib.filebasedimages.ImageFileError) as exc:  # EOFError: a truncated .gz
        raise DataError(f"{case_id}: cannot read NIfTI: {exc}") from exc
    except DataError as exc:  # not 3-D
        raise DataError(f"{case_id}: {exc}") from exc
    if les.shape != hu.shape or (lng is not None and lng.shape != hu.shape):
        raise DataError(f"{case_id}: mask shape differs from volume shape {hu.shape}.")
    hu = np.nan_to_num(hu, nan=-1024.0)  # NaN outside a reconstruction circle: air, not 0 HU
    sx, sy = (float(z) for z in nib.as_closest_canonical(img).header.get_zooms()[:2])
    grid = (sy, sx)  # rows run along y, columns along x (_axial_slices)
    side_rows = square_extent(hu.shape, grid)[0]
    hu = np.clip(np.rint(_to_grid(hu, 1, grid, fill=-1024.0)), -32768, 32767).astype(np.int16)
    les = _to_grid(les.astype(np.float32), 0, grid) > 0.5
    if lng is not None:
        lng = _to_grid(lng.astype(np.float32), 0, grid) > 0.5
        boxes = boxes_from_mask(lng)
    else:
        boxes = np.full((len(hu), 4), -2, dtype=np.int32)  # unknown: no valid-area target
    return Volume(
        case_id=case_id,
        hu=hu,
        lesion=les,
        valid_boxes=boxes,
        finding=[""] * len(hu),
        kind="covid" if les.any() else "unknown",
        meta={"volume": str(volume), "lesion": str(lesion) if lesion else None, "lung": str(lung) if lung else None,
              "grid_mm": side_rows * sy / SLICE_SIZE},
    )


def nifti_volumes(root: Path) -> Iterator[Volume]:
    """Every case of a NIfTI set (see the module docstring for the layout)."""
    for case in nifti_cases(root):
        yield load_nifti_case(*case)


# --- sources -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where training data come from: ``phantom`` (generated), ``phantom-dir``, ``nifti`` or ``real``
    (the real-CT JPEG collection, :mod:`training.realct`), or ``mix`` of several (``parts``)."""

    kind: str
    path: Path | None = None
    parts: tuple[Source, ...] = ()

    def describe(self) -> str:
        if self.kind == "mix":
            return "+".join(p.describe() for p in self.parts)
        name = "phantom" if self.kind == "phantom-dir" else self.kind
        return name if self.path is None else f"{name}:{self.path}"


def parse_source(text: str) -> Source:
    """Parse ``--data``: ``phantom`` (generated), ``phantom:DIR`` (written studies), ``nifti:DIR``,
    ``real`` / ``real:DIR`` (real-CT collection), or several joined by ``+`` (``real+phantom``)."""
    if "+" in text:
        parts = tuple(parse_source(t) for t in text.split("+"))
        if len({p.kind for p in parts}) != len(parts):
            raise ValueError(f"--data {text}: each kind of source at most once")
        return Source("mix", parts=parts)
    kind, _, rest = text.partition(":")
    if kind == "real":
        from training.realct import real_ct_root

        return Source("real", real_ct_root(Path(rest).expanduser() if rest else None))
    if kind == "phantom" and not rest:
        return Source("phantom")
    if kind == "phantom":
        path = Path(rest).expanduser()
        if not path.is_dir():
            raise ValueError(f"--data {text}: no such folder")
        return Source("phantom-dir", path)
    if kind == "nifti":
        if not rest:
            raise ValueError("--data nifti:DIR needs a folder")
        path = Path(rest).expanduser()
        if not path.is_dir():
            raise ValueError(f"--data {text}: no such folder")
        return Source("nifti", path)
    raise ValueError(f"--data must be 'phantom', 'phantom:DIR', 'nifti:DIR', 'real[:DIR]' or a '+' of them, got {text!r}")


# --- banks -------------------------------------------------------------------------------------


def pool_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Area fraction ``[.., size, size]`` float16 of a boolean ``[.., 512, 512]`` mask."""
    k = mask.shape[-1] // size
    m = mask.reshape(*mask.shape[:-2], size, k, size, k).astype(np.float32).mean(axis=(-3, -1))
    return m.astype(np.float16)


class SliceBank:
    """Slices of many volumes with the target of one task at the net's size, and balanced sampling.

    Parameters
    ----------
    task : str
        ``valid_area`` or ``lesion``.
    size : int
        Target resolution (the net's input size).
    volumes : Iterable[Volume]
        Source volumes; slices without a usable target (a NIfTI set without lung masks for
        ``valid_area``) are skipped.
    max_slices_per_volume : int | None
        Keep at most this many slices per volume (evenly spaced), to bound memory.
    """

    def __init__(
        self,
        task: str,
        size: int,
        volumes: Iterable[Volume],
        *,
        max_slices_per_volume: int | None = None,
    ) -> None:
        if task not in ("valid_area", "lesion"):
            raise ValueError(f'Argument "task" must be valid_area or lesion, got {task!r}.')
        self.task, self.size = task, size
        hus, tgts, cls, finding, cases, focus, lws = [], [], [], [], [], [], []
        k = SLICE_SIZE // size
        frng = np.random.default_rng(0)
        for vol in volumes:
            idx = np.arange(len(vol.hu))
            if max_slices_per_volume and len(idx) > max_slices_per_volume:
                idx = np.unique(np.linspace(0, len(idx) - 1, max_slices_per_volume).round().astype(int))
            if task == "valid_area":
                idx = idx[vol.valid_boxes[idx, 0] > -2]
            for i in idx:
                has_lung = bool(vol.valid_boxes[i, 0] >= 0)
                if task == "valid_area":
                    tgt = pool_mask(box_mask(vol.valid_boxes[i]), size)
                else:
                    tgt = pool_mask(vol.lesion[i], size)
                les = bool(vol.lesion[i].sum() >= 16)
                f = vol.finding[i]
                c = CLS_LESION if les else CLS_FINDING if f else CLS_PLAIN if has_lung else CLS_EMPTY
                lung = vol.meta.get("lung_field")
                if c == CLS_LESION and lung is not None:
                    # half on the lesion, half anywhere in the lung field: the lesion-free parts of a
                    # real slice are the real negatives that the net must learn to leave alone
                    les_pts, lung_pts = np.argwhere(vol.lesion[i]), np.argwhere(lung[i] & ~vol.lesion[i])
                    n_each = 16
                    pts = np.concatenate([
                        les_pts[frng.choice(len(les_pts), min(n_each, len(les_pts)), replace=False)],
                        lung_pts[frng.choice(len(lung_pts), min(n_each, len(lung_pts)), replace=False)],
                    ])
                elif c == CLS_LESION:
                    pts = np.argwhere(vol.lesion[i])
                elif c == CLS_FINDING and vol.finding_mask is not None:
                    pts = np.argwhere(vol.finding_mask[i])
                elif has_lung:
                    x0, y0, x1, y1 = vol.valid_boxes[i]
                    pts = np.stack([frng.integers(y0, y1 + 1, 16), frng.integers(x0, x1 + 1, 16)], 1)
                else:
                    pts = np.zeros((0, 2), int)
                if len(pts) > 32:
                    pts = pts[frng.choice(len(pts), 32, replace=False)]
                focus.append((pts // k).astype(np.int16))
                hus.append(vol.hu[i])
                tgts.append(tgt)
                cls.append(c)
                finding.append(f)
                cases.append(vol.case_id)
                lws.append(float(vol.meta.get("label_weight", 1.0)))
        if not hus:
            raise DataError(f"no usable slices for task {task!r}.")
        self.hu = np.stack(hus)
        self.target = np.stack(tgts)[:, None]
        self.cls = np.asarray(cls, dtype=np.int8)
        self.finding = np.asarray(finding)
        self.case = np.asarray(cases)
        self.focus = focus
        self.label_weight = np.asarray(lws, dtype=np.float32)
        """Loss weight of each slice's target (radiologist or phantom 1.0, pseudo-labels lower)."""
        self.weights = self._weights()

    def __len__(self) -> int:
        return len(self.hu)

    def counts(self) -> dict[str, int]:
        """Slices per sampling class (and per hard-negative finding)."""
        names = {CLS_EMPTY: "no_lung", CLS_PLAIN: "plain", CLS_LESION: "lesion", CLS_FINDING: "finding"}
        out = {names[c]: int((self.cls == c).sum()) for c in names}
        primary = np.asarray([primary_finding(f) for f in self.finding])
        for f in sorted(set(primary[self.cls == CLS_FINDING])):
            out[f"finding:{f}"] = int(((self.cls == CLS_FINDING) & (primary == f)).sum())
        return out

    def _weights(self) -> np.ndarray:
        """Sampling weights: for valid_area 25 % slices without lung (below the diaphragm: bowel gas,
        the stomach bubble, which must get an empty or tiny valid area), the rest uniform; for lesion
        40 % lesion slices, 35 % hard negatives (equal share per finding class), 20 % plain lung, 5 %
        no lung."""
        n = len(self.cls)
        if self.task == "valid_area":
            empty = self.cls == CLS_EMPTY
            if not empty.any() or empty.all():
                return np.full(n, 1.0 / n)
            w = np.where(empty, 0.25 / empty.sum(), 0.75 / (~empty).sum())
            return w / w.sum()
        w = np.zeros(n)
        shares = {CLS_LESION: 0.40, CLS_FINDING: 0.35, CLS_PLAIN: 0.20, CLS_EMPTY: 0.05}
        present = {c: s for c, s in shares.items() if (self.cls == c).any()}
        total = sum(present.values())
        for c, s in present.items():
            sel = self.cls == c
            if c == CLS_FINDING:
                primary = np.asarray([primary_finding(f) for f in self.finding])
                names = sorted(set(primary[sel]))
                for f in names:
                    sub = sel & (primary == f)
                    w[sub] = s / total / len(names) / sub.sum()
            else:
                w[sel] = s / total / sel.sum()
        return w / w.sum()

    def sample(
        self, rng: np.random.Generator, batch: int, crop: int | None = None, *, with_weights: bool = False
    ) -> tuple[np.ndarray, ...]:
        """A batch: HU ``[B, 1, 512, 512]`` int16 and target ``[B, 1, S, S]`` float32 (and, with
        ``with_weights``, the label weight ``[B]`` of each item).

        With ``crop`` (a size at the net's resolution, < S), each item is a ``crop``-sized window
        (``crop * 512 / S`` HU pixels) centred, with jitter, on a lesion pixel (lesion slices), a
        finding pixel (hard negatives) or a point of the lung field, else anywhere: the net is fully
        convolutional, so training on windows costs a fraction and teaches the same local decision.
        """
        idx = rng.choice(len(self.cls), size=batch, p=self.weights)
        extra = (self.label_weight[idx],) if with_weights else ()
        if crop is None or crop >= self.size:
            return (self.hu[idx][:, None], self.target[idx].astype(np.float32), *extra)
        k = SLICE_SIZE // self.size
        hu = np.empty((batch, 1, crop * k, crop * k), np.int16)
        tgt = np.empty((batch, 1, crop, crop), np.float32)
        for j, i in enumerate(idx):
            pts = self.focus[i]
            if len(pts):
                cy, cx = pts[rng.integers(len(pts))] + rng.integers(-crop // 3, crop // 3 + 1, 2)
            else:
                cy, cx = rng.integers(0, self.size, 2)
            y0 = int(np.clip(cy - crop // 2, 0, self.size - crop))
            x0 = int(np.clip(cx - crop // 2, 0, self.size - crop))
            hu[j, 0] = self.hu[i, y0 * k : (y0 + crop) * k, x0 * k : (x0 + crop) * k]
            tgt[j] = self.target[i, :, y0 : y0 + crop, x0 : x0 + crop]
        return (hu, tgt, *extra)
