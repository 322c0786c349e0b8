"""Real chest CT exported as 8-bit lung-window images, put back into Hounsfield units on the 512 grid.

The real-CT collection (``../shared/data/real-ct/``, see its README) holds JPEG slices that someone
already windowed, cropped and often rotated or mirrored, with lesion masks but no HU, no spacing and no
lung masks. This module turns each image into what the detector sees at run time, in four tested steps:

1. **HU from the window** (:func:`estimate_window`): the image is ``v = 255 * (HU - lo) / (hi - lo)``,
   clipped, for an unknown ``(lo, hi)``. Two landmarks of the image's own histogram fix the line: air
   (the darkest ~0.3 % of pixels, trachea or outside air, -1000 HU) and soft tissue (the mode of the
   bright side, muscle / heart / vessels, +40 HU); where soft tissue is clipped at white, the lung
   parenchyma mode (-860 HU) stands in for it, and where air is clipped at black, the parenchyma mode
   stands in for air. The error on real HU slices windowed here is in ``docs/models/real.md``.
2. **Standard orientation** (:func:`orient`): of the eight flips and quarter turns, the one whose
   lung-window picture correlates best with a template of correctly oriented chests (built from
   phantom slices: spine posterior, heart to the patient's left, lungs wider than deep); decided once
   per volume from all of its slices.
3. **Lung fields** (:func:`lung_field`): the classical method: air below -400 HU, the air outside the
   body removed (components touching the crop's edge that are uniformly air), small components
   (trachea, specks) dropped, holes filled, lesions added.
4. **The 512 grid** (:func:`place`): scaled so that the lung field is as wide as an adult's (about
   270 mm at 0.7 mm per pixel), centred, the cropped-away body wall replaced by a soft-tissue ring and
   air beyond it; masks follow with nearest-neighbour sampling.

Splits are by volume (pseudo-labelled volumes) and by the collection's own fixed split (MedSeg); see
:data:`PSEUDO_SPLIT`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from ctscreen.contracts import SLICE_SIZE
from ctscreen.lungs import lung_field
from training.datasets import DataError, Volume, boxes_from_mask

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO_ROOT.parent / "shared" / "data" / "real-ct"

AIR_HU = -1000.0
LUNG_HU = -860.0
SOFT_HU = 40.0
FAT_HU = -100.0
PAD_TISSUE_HU = 30.0
SPACING_MM = 0.7
"""Nominal pixel spacing of a placed slice (a 358 mm field of view on 512 pixels)."""
LUNG_WIDTH_MM = 270.0
"""Width of both lung fields together in an adult chest, the yardstick for the scale."""
MIN_WIDTH, MAX_WIDTH, FALLBACK_WIDTH = 900.0, 2200.0, 1200.0
"""Plausible lung-window widths (HU); the fallback where soft tissue is clipped white."""
PSEUDO_WEIGHT = 0.5
"""Loss weight of pseudo-labelled pixels against a radiologist's (1.0)."""

PSEUDO_SPLIT = {
    "val": ("coronacases_org_008", "radiopaedia_org_covid-19-pneumonia-36_86526_0-dcm"),
    "test": (
        "coronacases_org_002",
        "coronacases_org_010",
        "radiopaedia_org_covid-19-pneumonia-14_85914_0-dcm",
        "radiopaedia_org_covid-19-pneumonia-40_86625_0-dcm",
    ),
}
"""Held-out pseudo-labelled volumes (every other volume trains); never the same volume on two sides."""


def real_ct_root(root: Path | None = None) -> Path:
    """The real-CT folder, or a :class:`DataError` that says where it was looked for."""
    path = Path(root) if root is not None else DEFAULT_ROOT
    if not (path / "medseg-100").is_dir() or not (path / "covid-volumes-pseudo").is_dir():
        raise DataError(
            f"real-CT data not found at {path} (expected medseg-100/ and covid-volumes-pseudo/; "
            "it lives in ../shared/data/real-ct beside the checkout)"
        )
    return path


# --- 1. HU from an 8-bit window -----------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """HU of grey 0 (``lo``) and grey 255 (``hi``)."""

    lo: float
    hi: float

    @property
    def width(self) -> float:
        return self.hi - self.lo

    @property
    def level(self) -> float:
        return (self.hi + self.lo) / 2


def apply_window(hu: np.ndarray, window: Window) -> np.ndarray:
    """HU -> 8-bit grey as an exporter would (clipped, rounded)."""
    v = (np.asarray(hu, np.float32) - window.lo) / window.width * 255.0
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)


def to_hu(img: np.ndarray, window: Window) -> np.ndarray:
    """8-bit grey -> HU (float32) under ``window``."""
    return window.lo + np.asarray(img, np.float32) / 255.0 * window.width


def _line(v1: float, h1: float, v2: float, h2: float) -> Window:
    slope = (h2 - h1) / (v2 - v1)
    return Window(lo=h1 - slope * v1, hi=h1 + slope * (255.0 - v1))


def estimate_window(img: np.ndarray) -> Window:
    """The window an 8-bit lung-window image was exported with, from its own histogram.

    >>> hu = np.concatenate([np.full(300, -1000.0), np.full(4000, -860.0), np.full(3000, 40.0)])
    >>> w = estimate_window(apply_window(hu, Window(-1350.0, 150.0)))
    >>> abs(w.lo - -1350) < 10 and abs(w.hi - 150) < 10  # within the 8-bit rounding (6 HU a grey level)
    True
    """
    v = np.asarray(img).ravel()
    if v.size < 100:
        raise DataError(f"image too small to estimate its window ({v.size} pixels)")
    counts = np.bincount(v, minlength=256).astype(np.float64)
    inner = counts.copy()
    inner[0] = inner[255] = 0  # what the window clipped to black or white is no mode
    hist = ndimage.gaussian_filter1d(inner, 1.5)
    v_air = float(np.percentile(v, 0.3))
    # dark (lung) against bright (tissue): Otsu's split, then each side's mode
    from skimage.filters import threshold_otsu

    # (the clipped pixels weigh in the split, as mass, though they are no mode)
    t = min(max(int(threshold_otsu(hist=counts.astype(np.int64))), 8), 240)
    v_lung = float(1 + np.argmax(hist[1 : t + 1]))
    start = int(max(t, v_lung)) + 8  # past the lung peak's shoulder
    v_soft, soft_hu, soft_ok = 0.0, SOFT_HU, False
    if start < 250:
        seg = hist[start:254]
        peak = int(np.argmax(seg))
        # a real mode rises above the valley before it and is not the edge of the range
        soft_ok = (0 < peak < len(seg) - 2 and seg[peak] > 1.5 * seg[: peak + 1].min()
                   and seg[peak] > 0.002 * v.size)
        v_soft = float(start + peak)
        mass = counts[max(1, int(v_soft) - 6) : int(v_soft) + 7].sum()
        if soft_ok and counts[255] > 2 * mass:
            soft_hu = FAT_HU  # soft tissue is clipped white: the bright mode left is fat
    soft_ok = soft_ok and v_soft - v_lung > 25
    air_ok = v_air > 2 and v_lung - v_air > 6
    if soft_ok and air_ok:
        return _line(v_air, AIR_HU, v_soft, soft_hu)
    if soft_ok:
        return _line(v_lung, LUNG_HU, v_soft, soft_hu)
    if air_ok:
        w = _line(v_air, AIR_HU, v_lung, LUNG_HU)
        if MIN_WIDTH <= w.width <= MAX_WIDTH:
            return w
        # air and parenchyma lie close together: their 140 HU apart is too short a base, so keep the
        # air anchor and take the width of a usual lung window whose white end is below soft tissue
        width = FALLBACK_WIDTH
        return Window(lo=AIR_HU - v_air / 255.0 * width, hi=AIR_HU + (255.0 - v_air) / 255.0 * width)
    return _line(v_lung, LUNG_HU, 255.0, LUNG_HU + FALLBACK_WIDTH * (255.0 - v_lung) / 255.0)


# --- 3. lung fields -----------------------------------------------------------------------------


def field_box(mask: np.ndarray) -> np.ndarray:
    """(x0, y0, x1, y1) inclusive of a 2-D mask; -1 when empty."""
    return boxes_from_mask(mask[None])[0]


# --- 2. orientation -----------------------------------------------------------------------------

ORIENTATIONS = tuple((k, False) for k in range(4))
"""Candidates as (quarter turns counter-clockwise, mirrored first); (0, False) is as-is. Only the four
rotations are decided: a mirror image of a chest is still a plausible chest at the resolution that the
template sees (the heart's side is the only cue, and it is not reliable on crops), so mirroring is left
to the training's flip augmentation and is never "corrected" at random."""
_TEMPLATE_SIZE = 40


def transform(a: np.ndarray, orientation: tuple[int, bool]) -> np.ndarray:
    """Apply one of :data:`ORIENTATIONS` (mirror left-right first, then ``k`` quarter turns)."""
    k, flip = orientation
    return np.rot90(a[:, ::-1] if flip else a, k)


def inverse(orientation: tuple[int, bool]) -> tuple[int, bool]:
    """The orientation that undoes ``orientation``."""
    k, flip = orientation
    return ((k if flip else -k) % 4, flip)


def _signature(hu: np.ndarray, box: np.ndarray) -> np.ndarray | None:
    """Lung-window picture of the lung-field box (plus a margin), at a fixed size, zero mean, unit norm."""
    if box[0] < 0:
        return None
    x0, y0, x1, y1 = (int(b) for b in box)
    mx, my = (x1 - x0) // 10, (y1 - y0) // 10
    crop = hu[max(0, y0 - my) : y1 + my + 1, max(0, x0 - mx) : x1 + mx + 1]
    if min(crop.shape) < 16:
        return None
    x = np.clip((crop + 1350.0) / 1500.0, 0, 1)
    zoom = (_TEMPLATE_SIZE / x.shape[0], _TEMPLATE_SIZE / x.shape[1])
    s = ndimage.zoom(x, zoom, order=1)[:_TEMPLATE_SIZE, :_TEMPLATE_SIZE]
    s = s - s.mean()
    norm = np.linalg.norm(s)
    return s / norm if norm > 0 else None


@lru_cache(maxsize=1)
def orientation_template() -> np.ndarray:
    """Mean signature of correctly oriented chest slices (phantom studies, seeds no evaluation uses)."""
    import phantom

    sigs = []
    for seed in range(700_000, 700_006):
        study = phantom.make_study(seed=seed, kind="normal", n_slices=24, matrix=256)
        for hu, lung in zip(study.hu, study.lung_mask, strict=True):
            if lung.sum() > 0.05 * lung.size:
                s = _signature(hu.astype(np.float32), field_box(lung))
                if s is not None:
                    sigs.append(s)
    t = np.mean(sigs, axis=0)
    t = t - t.mean()
    return t / np.linalg.norm(t)


def orientation_scores(hu: np.ndarray, lung: np.ndarray | None = None) -> np.ndarray:
    """Score of each of :data:`ORIENTATIONS` for one slice (correlation with the template, plus a
    prior that the lung fields are wider than deep); zeros when the slice shows no lung."""
    lung = lung_field(hu) if lung is None else lung
    tmpl = orientation_template()
    out = np.zeros(len(ORIENTATIONS))
    for i, o in enumerate(ORIENTATIONS):
        t_hu, t_lung = transform(hu, o), transform(lung, o)
        box = field_box(t_lung)
        sig = _signature(np.ascontiguousarray(t_hu), box)
        if sig is None:
            return np.zeros(len(ORIENTATIONS))
        aspect = np.log((box[2] - box[0] + 1) / (box[3] - box[1] + 1))
        out[i] = float((sig * tmpl).sum()) + 0.5 * np.clip(aspect, -0.5, 0.5)
    return out


def orient(slices: list[np.ndarray], lungs: list[np.ndarray] | None = None) -> tuple[int, bool]:
    """The orientation that puts a volume's slices (HU) into the radiological convention."""
    total = np.zeros(len(ORIENTATIONS))
    pick = np.unique(np.linspace(0, len(slices) - 1, min(len(slices), 24)).round().astype(int))
    for i in pick:
        hu = slices[i]
        total += orientation_scores(hu, None if lungs is None else lungs[i])
    return ORIENTATIONS[int(np.argmax(total))]


# --- 4. the 512 grid ----------------------------------------------------------------------------


def scale_for(lung_widths_px: list[float]) -> float:
    """Zoom that makes the median lung-field width ``LUNG_WIDTH_MM`` at ``SPACING_MM`` per pixel."""
    widths = [w for w in lung_widths_px if w > 0]
    if not widths:
        return 1.0
    return float(LUNG_WIDTH_MM / SPACING_MM / np.median(widths))


def place(hu: np.ndarray, masks: list[np.ndarray], scale: float, seed: int = 0):
    """Put a cropped HU slice and its masks on the 512 grid (centred, scaled by ``scale``).

    Returns ``(hu int16 [512, 512], [mask bool [512, 512], ...])``. Outside the crop: a soft-tissue
    ring (the body wall the exporter cut away) 12 mm thick, then air.
    """
    h, w = hu.shape
    scale = min(scale, (SLICE_SIZE - 8) / max(h, w) * 1.25)
    img = ndimage.zoom(hu.astype(np.float32), scale, order=1, mode="nearest")
    ms = [ndimage.zoom(m.astype(np.uint8), scale, order=0) > 0 for m in masks]
    nh, nw = img.shape
    # centre; crop when the zoomed image is larger than the grid
    sy, sx = max(0, (nh - SLICE_SIZE) // 2), max(0, (nw - SLICE_SIZE) // 2)
    img = img[sy : sy + SLICE_SIZE, sx : sx + SLICE_SIZE]
    ms = [m[sy : sy + SLICE_SIZE, sx : sx + SLICE_SIZE] for m in ms]
    nh, nw = img.shape
    y0, x0 = (SLICE_SIZE - nh) // 2, (SLICE_SIZE - nw) // 2
    yy, xx = np.mgrid[:SLICE_SIZE, :SLICE_SIZE]
    ring = 12.0 / SPACING_MM
    ay, ax = nh / 2 * 1.2 + ring, nw / 2 * 1.2 + ring
    cy, cx = y0 + nh / 2, x0 + nw / 2
    body = ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 <= 1.0
    rng = np.random.default_rng(seed)
    out = np.where(body, PAD_TISSUE_HU + rng.normal(0, 12, body.shape), AIR_HU).astype(np.float32)
    out[y0 : y0 + nh, x0 : x0 + nw] = img
    out_masks = []
    for m in ms:
        full = np.zeros((SLICE_SIZE, SLICE_SIZE), bool)
        full[y0 : y0 + nh, x0 : x0 + nw] = m
        out_masks.append(full)
    return np.clip(np.rint(out), -1024, 3071).astype(np.int16), out_masks


# --- the two collections ------------------------------------------------------------------------


def read_gray(path: Path) -> np.ndarray:
    """An image file as 8-bit grey."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def read_mask(path: Path, pseudo: bool) -> np.ndarray:
    """A lesion mask (MedSeg palette: 1 GGO, 2 consolidation; pseudo-labels: grey >= 128)."""
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im if im.mode == "P" and not pseudo else im.convert("L"))
    return a >= 128 if pseudo else a > 0


@dataclass
class RealSlice:
    """One image of the collection: its grey values, lesion mask and where it came from."""

    case: str
    index: int
    path: Path
    gray: np.ndarray
    lesion: np.ndarray


def _slices(img_dir: Path, mask_dir: Path, case_of, pseudo: bool) -> list[RealSlice]:
    out = []
    for p in sorted(img_dir.iterdir(), key=lambda q: (len(q.stem), q.stem)):
        if p.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        m = mask_dir / (p.stem + ".png")
        if not m.is_file():
            raise DataError(f"{p}: no mask {m.name} in {mask_dir}")
        gray, lesion = read_gray(p), read_mask(m, pseudo)
        if gray.shape != lesion.shape:
            raise DataError(f"{p}: image {gray.shape} and mask {lesion.shape} differ in size")
        out.append(RealSlice(case_of(p), int(p.stem), p, gray, lesion))
    if not out:
        raise DataError(f"{img_dir}: no images")
    return out


def build_volume(case_id: str, slices: list[RealSlice], *, weight: float, per_slice: bool) -> Volume:
    """HU, orientation, lung fields and the 512 grid for a group of slices of one volume.

    ``per_slice`` decides the orientation and the scale for every slice on its own (MedSeg, whose
    slices come from different patients); otherwise once for the whole group.
    """
    windows = [estimate_window(s.gray) for s in slices]
    hus = [to_hu(s.gray, w) for s, w in zip(slices, windows, strict=True)]
    lungs = [lung_field(hu, s.lesion) for hu, s in zip(hus, slices, strict=True)]
    if per_slice:
        orients = [orient([hu], [lg]) for hu, lg in zip(hus, lungs, strict=True)]
    else:
        o = orient(hus, lungs)
        orients = [o] * len(slices)
    hus = [np.ascontiguousarray(transform(h, o)) for h, o in zip(hus, orients, strict=True)]
    lungs = [np.ascontiguousarray(transform(m, o)) for m, o in zip(lungs, orients, strict=True)]
    lesions = [np.ascontiguousarray(transform(s.lesion, o)) for s, o in zip(slices, orients, strict=True)]
    widths = [float(b[2] - b[0] + 1) if b[0] >= 0 else 0.0 for b in map(field_box, lungs)]
    scales = [scale_for([w]) for w in widths] if per_slice else [scale_for(widths)] * len(slices)
    out_hu, out_lung, out_les = [], [], []
    for i, (hu, lg, les, sc) in enumerate(zip(hus, lungs, lesions, scales, strict=True)):
        h, (lg2, les2) = place(hu, [lg, les], sc, seed=i)
        out_hu.append(h)
        out_lung.append(lg2)
        out_les.append(les2)
    lung = np.stack(out_lung)
    return Volume(
        case_id=case_id,
        hu=np.stack(out_hu),
        lesion=np.stack(out_les),
        valid_boxes=boxes_from_mask(lung),
        finding=[""] * len(slices),
        kind="covid",
        meta={
            "source": "real-ct",
            "label_weight": weight,
            "slices": [str(s.path) for s in slices],
            "indices": [s.index for s in slices],
            "windows": [(round(w.lo, 1), round(w.hi, 1)) for w in windows],
            "orientations": orients,
            "scales": scales,
            "lung_field": lung,
        },
    )


def medseg_volume(split: str, root: Path | None = None, *, names: set[str] | None = None) -> Volume:
    """The MedSeg slices of ``split`` (``train`` or ``test``), radiologist masks, as one volume of
    unrelated slices (each oriented and scaled on its own); ``names`` keeps only those file stems."""
    if split not in ("train", "test"):
        raise ValueError(f'Argument "split" must be train or test, got {split!r}.')
    d = real_ct_root(root) / "medseg-100" / split
    slices = _slices(d / "images", d / "masks", lambda p: f"medseg-{split}-{p.stem}", pseudo=False)
    if names is not None:
        slices = [s for s in slices if str(s.index) in names]
    return build_volume(f"medseg-{split}", slices, weight=1.0, per_slice=True)


def pseudo_cases(root: Path | None = None) -> list[str]:
    """Names of the pseudo-labelled volumes."""
    d = real_ct_root(root) / "covid-volumes-pseudo"
    return sorted(p.name for p in d.iterdir() if (p / "images").is_dir())


def pseudo_split(split: str, root: Path | None = None) -> list[str]:
    """Volumes of ``split``: ``train`` (all but val and test), ``val`` or ``test``."""
    cases = pseudo_cases(root)
    if split in PSEUDO_SPLIT:
        return [c for c in cases if c in PSEUDO_SPLIT[split]]
    if split != "train":
        raise ValueError(f'Argument "split" must be train, val or test, got {split!r}.')
    held = {c for v in PSEUDO_SPLIT.values() for c in v}
    return [c for c in cases if c not in held]


def pseudo_volume(case: str, root: Path | None = None, *, max_slices: int | None = None) -> Volume:
    """One pseudo-labelled volume (slices in index order, one orientation and scale for all)."""
    d = real_ct_root(root) / "covid-volumes-pseudo" / case
    if not d.is_dir():
        raise DataError(f"no pseudo-labelled volume {case!r} in {d.parent}")
    slices = _slices(d / "images", d / "masks", lambda p: case, pseudo=True)
    if max_slices and len(slices) > max_slices:
        keep = np.unique(np.linspace(0, len(slices) - 1, max_slices).round().astype(int))
        slices = [slices[i] for i in keep]
    return build_volume(f"pseudo-{case}", slices, weight=PSEUDO_WEIGHT, per_slice=False)


def medseg_train_split(root: Path | None = None) -> tuple[set[str], set[str]]:
    """The stems of ``medseg-100/train`` that train and those that validate: by file name order, every
    fifth image validates (40 / 10)."""
    stems = [p.stem for p in sorted((real_ct_root(root) / "medseg-100" / "train" / "images").iterdir())]
    val = {s for i, s in enumerate(stems) if i % 5 == 4}
    return set(stems) - val, val


def real_volumes(split: str, root: Path | None = None, *, max_slices: int | None = None) -> Iterator[Volume]:
    """Training (``train``) or validation (``val``) volumes of both collections.

    MedSeg ``train`` is split 40 / 10 by file name order (every fifth image validates); its ``test``
    folder is never used for training or validation.
    """
    if split not in ("train", "val"):
        raise ValueError(f'Argument "split" must be train or val (test data never trains), got {split!r}.')
    train, val = medseg_train_split(root)
    yield medseg_volume("train", root, names=val if split == "val" else train)
    for case in pseudo_split(split, root):
        yield pseudo_volume(case, root, max_slices=max_slices)
