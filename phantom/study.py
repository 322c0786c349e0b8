"""``make_study``: one synthetic chest-CT study with exact ground truth, deterministic from a seed."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import scipy.fft as sfft

from . import findings as fnd
from .anatomy import Patient, sample_patient
from .findings import Blob, Finding
from .render import Frame, Renderer, build_skeleton
from .trees import build_trees

logger = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("covid", "normal", "nodule", "tb", "bronchiectasis", "bacterial", "emphysema")
"""Study classes: ``covid`` is the positive class, every other kind is a control (label 0)."""

SLICE_SPACINGS: tuple[float, ...] = (0.625, 1.25, 2.5, 5.0)
RESCALE_CONVENTIONS: tuple[tuple[int, int], ...] = ((-1024, 0), (-1024, 1), (0, 1), (-1000, 0))
"""(RescaleIntercept, PixelRepresentation) pairs seen on real scanners."""

_OVERRIDES = {
    "pixel_spacing", "slice_spacing", "slice_thickness", "rescale_intercept", "pixel_representation",
    "stage", "noise", "circle", "shape", "detail", "fissures",
}


@dataclass(eq=False)
class Study:
    """One synthetic CT series and its truth.

    Slice order: index 0 is the most *inferior* slice and positions increase along the slice
    normal (+z, towards the head) by ``slice_spacing``; ``InstanceNumber`` in the written files
    counts from the top (acquisition order), so file order, instance order and spatial order
    all differ, as on real scanners.

    Attributes
    ----------
    hu : int16 [Z, H, W]
        Hounsfield units (exactly what the DICOM files decode to).
    lung_mask : bool [Z, H, W]
        Both lungs including everything inside them (vessels, lesions).
    lesion_mask : bool [Z, H, W]
        COVID-19 findings only (the positive target); empty for every other kind.
    finding_mask : uint8 [Z, H, W]
        Non-COVID findings, values from :data:`phantom.FINDING_CODES` (the stomach bubble and
        bowel gas are present in every study).
    valid_boxes : int [Z, 4]
        Bounding box of ``lung_mask`` per slice, (x0, y0, x1, y1) inclusive, ``-1`` without lung.
        Pixel coordinates of this study's own grid (512 only when the matrix is 512).
    positions : float [Z, 3]
        ImagePositionPatient of every slice (mm); ImageOrientationPatient is axial (1,0,0,0,1,0).
    """

    hu: np.ndarray
    lung_mask: np.ndarray
    lesion_mask: np.ndarray
    finding_mask: np.ndarray
    valid_boxes: np.ndarray
    kind: str
    label: int
    pixel_spacing: tuple[float, float]
    slice_thickness: float
    slice_spacing: float
    positions: np.ndarray
    seed: int
    rescale_intercept: int = -1024
    pixel_representation: int = 0
    padding_hu: int | None = None
    stage: str | None = None
    findings: list[dict] = field(default_factory=list)
    patient: dict = field(default_factory=dict)
    noise_sigma: float = 0.0

    @property
    def shape(self) -> tuple[int, int, int]:
        z, rows, cols = self.hu.shape
        return int(z), int(rows), int(cols)

    @property
    def orientation(self) -> tuple[float, ...]:
        return (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

    def quadrants(self, k: int) -> list[int]:
        """Quadrants of slice ``k`` holding lesion pixels (0 UL, 1 UR, 2 LL, 3 LR in the image),
        split at the centre of the slice's valid-area box."""
        box = self.valid_boxes[k]
        m = self.lesion_mask[k]
        if box[0] < 0 or not m.any():
            return []
        cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
        rows, cols = np.nonzero(m)
        q = (rows > cy).astype(int) * 2 + (cols > cx).astype(int)
        return sorted(set(q.tolist()))

    @cached_property
    def manifest(self) -> dict:
        """JSON-ready description: class, geometry, lesion slices, quadrants and runs."""
        lesion_area = self.lesion_mask.sum(axis=(1, 2))
        lesion_slices = [int(k) for k in np.flatnonzero(lesion_area)]
        quads = {str(k): self.quadrants(k) for k in lesion_slices}
        finding_slices = {}
        for name, code in fnd.FINDING_CODES.items():
            ks = np.flatnonzero((self.finding_mask == code).any(axis=(1, 2)))
            if ks.size:
                finding_slices[name] = [int(ks[0]), int(ks[-1]), int(ks.size)]
        return {
            "format": "ctscreen-phantom/1",
            "seed": int(self.seed),
            "kind": self.kind,
            "label": int(self.label),
            "stage": self.stage,
            "shape": [int(v) for v in self.hu.shape],
            "pixel_spacing": [float(v) for v in self.pixel_spacing],
            "slice_thickness": float(self.slice_thickness),
            "slice_spacing": float(self.slice_spacing),
            "rescale_intercept": int(self.rescale_intercept),
            "pixel_representation": int(self.pixel_representation),
            "padding_hu": None if self.padding_hu is None else int(self.padding_hu),
            "slice_order": "index 0 = most inferior; positions increase along +z by slice_spacing",
            "z_positions": [round(float(z), 4) for z in self.positions[:, 2]],
            "lesion_slices": lesion_slices,
            "lesion_area_px": [int(a) for a in lesion_area[lesion_slices]],
            "quadrants": quads,
            "quadrant_convention": "0 upper-left, 1 upper-right, 2 lower-left, 3 lower-right (image), "
            "split at the centre of the valid-area box",
            "longest_quadrant_run": longest_quadrant_run(quads),
            "finding_slices": finding_slices,
            "finding_codes": dict(fnd.FINDING_CODES),
            "findings": self.findings,
            "valid_boxes": self.valid_boxes.tolist(),
            "patient": self.patient,
            "noise_sigma": round(float(self.noise_sigma), 2),
        }


def longest_quadrant_run(quads: dict[str, list[int]]) -> int:
    """Longest run of consecutive slice indices sharing a quadrant."""
    best = 0
    for q in range(4):
        run, prev = 0, None
        for k in sorted(int(k) for k, v in quads.items() if q in v):
            run = run + 1 if prev is not None and k == prev + 1 else 1
            prev = k
            best = max(best, run)
    return best


def _noise_fields(rng: np.random.Generator, shape: tuple[int, int], n: int, cutoff: float,
                  ramp: bool) -> np.ndarray:
    """``n`` unit-variance random fields with a CT-like (ramp x apodisation) or smooth spectrum."""
    h, w = shape
    fy = sfft.fftfreq(h)[:, None]
    fx = sfft.rfftfreq(w)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    filt = (f * np.exp(-((f / cutoff) ** 2))) if ramp else np.exp(-((f / cutoff) ** 2))
    white = rng.standard_normal((n, h, w), dtype=np.float32)
    out = sfft.irfft2(sfft.rfft2(white) * filt.astype(np.float32), s=(h, w)).astype(np.float32)
    out /= out.std(axis=(1, 2), keepdims=True) + 1e-12
    return out


def _blur(a: np.ndarray) -> None:
    """Partial-volume blur in place: separable [1, 2, 1] / 4 kernel."""
    t = a[1:-1].copy()
    t *= 2.0
    t += a[:-2]
    t += a[2:]
    t *= 0.25
    a[1:-1] = t
    t = a[:, 1:-1].copy()
    t *= 2.0
    t += a[:, :-2]
    t += a[:, 2:]
    t *= 0.25
    a[:, 1:-1] = t


def make_study(seed: int, kind: str = "covid", n_slices: int | None = None, matrix: int | None = None,
               **overrides) -> Study:
    """Synthesise one chest-CT study.

    Parameters
    ----------
    seed
        Any non-negative integer; the same arguments give byte-identical pixel data. The patient
        (anatomy, geometry) depends on the seed only, so one seed with two kinds gives the same
        patient with and without disease.
    kind
        One of :data:`KINDS`.
    n_slices
        Number of slices (1-2000); default drawn so that 60-600 slices cover the chest. When
        given, the slice spacing is the standard value closest to covering the chest, and the
        anatomy is scaled along z to fit the slices: the slices sit at evenly spaced levels of the
        whole chest (``step`` = chest length / ``n_slices`` apart), while each one still shows
        ``slice_thickness`` mm of the patient (a 16-slice study is 16 real 5 mm slices, about 20 mm
        apart in the patient, 5 mm apart in its positions).
    matrix
        Square matrix size (64-1024); default mostly 512, sometimes 768 or a cropped field.
    **overrides
        ``pixel_spacing``, ``slice_spacing``, ``slice_thickness``, ``rescale_intercept``,
        ``pixel_representation``, ``stage`` ("early", "progressive", "peak"), ``noise`` (HU sigma),
        ``circle`` (bool), ``shape`` ((rows, cols)), ``detail`` (vessel density factor),
        ``fissures`` (bool).

    Returns
    -------
    Study
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f'Argument "seed" must be a non-negative integer, got {seed!r}.')
    if kind not in KINDS:
        raise ValueError(f'Argument "kind" must be one of {", ".join(KINDS)}; got {kind!r}.')
    if n_slices is not None and not (isinstance(n_slices, int | np.integer) and 1 <= n_slices <= 2000):
        raise ValueError(f'Argument "n_slices" must be an integer in 1..2000, got {n_slices!r}.')
    if matrix is not None and not (isinstance(matrix, int | np.integer) and 64 <= matrix <= 1024):
        raise ValueError(f'Argument "matrix" must be an integer in 64..1024, got {matrix!r}.')
    unknown = set(overrides) - _OVERRIDES
    if unknown:
        raise TypeError(f"make_study() got unknown override(s): {', '.join(sorted(unknown))}")
    if overrides.get("stage") not in (None, "early", "progressive", "peak"):
        raise ValueError(f'Override "stage" must be early, progressive or peak; got {overrides["stage"]!r}.')
    if "shape" in overrides:
        shp = overrides["shape"]
        if len(shp) != 2 or not all(isinstance(v, int | np.integer) and 64 <= v <= 1024 for v in shp):
            raise ValueError(f'Override "shape" must be (rows, cols) in 64..1024, got {shp!r}.')
    seq = np.random.SeedSequence(int(seed))
    rng_anat, rng_geo, rng_tree, rng_noise, rng_gut = (np.random.default_rng(c) for c in seq.spawn(5))
    rng_find = np.random.default_rng(np.random.SeedSequence([int(seed), KINDS.index(kind), 7]))

    p = sample_patient(rng_anat)
    geo = sample_geometry(p, rng_geo, n_slices, matrix, overrides)
    n = geo["n"]
    rows, cols = geo["shape"]
    ps = geo["ps"]
    step = p.length / n  # anatomical mm per slice
    # each slice is ``thickness`` mm of the patient, as its SliceThickness says, however far apart the
    # z-scaling puts the slices: scaled with it, 16 x 5 mm rendered 18-22 mm of anatomy per slice
    half_slab = 0.5 * geo["thickness"]

    findings: list[Finding] = []
    stage = None
    if kind == "covid":
        findings, stage = fnd.covid_findings(p, rng_find, step, overrides.get("stage"))
    elif kind in fnd.HARD_NEGATIVES:
        findings = fnd.HARD_NEGATIVES[kind](p, rng_find, step)
    gut = _bowel(p, rng_gut)
    trees = build_trees(p, rng_tree, detail=float(overrides.get("detail", 1.0)))
    skeleton = build_skeleton(p, rng_tree)
    frame = Frame(rows, cols, ps, geo["x0"], geo["y0"])
    noise = _noise_fields(rng_noise, (rows + 48, cols + 48), 4, geo["kernel"], ramp=True)
    texture = _noise_fields(rng_noise, (rows, cols), 1, 0.03, ramp=False)[0]
    fissures = bool(overrides.get("fissures", geo["thickness"] <= 2.5))
    renderer = Renderer(p, frame, trees, skeleton, findings, gut, half_slab=half_slab, fissures=fissures,
                        texture_bank=texture, rng=rng_gut)

    hu = np.empty((n, rows, cols), np.int16)
    lung = np.empty((n, rows, cols), bool)
    lesion = np.empty((n, rows, cols), bool)
    finding = np.empty((n, rows, cols), np.uint8)
    offsets = rng_noise.integers(0, 48, size=(n, 3))
    lo, hi = geo["hu_min"], 3071.0
    circle_out = None
    if geo["circle"]:
        yy = (np.arange(rows) - (rows - 1) / 2.0)[:, None]
        xx = (np.arange(cols) - (cols - 1) / 2.0)[None, :]
        circle_out = (xx * xx + yy * yy) > (min(rows, cols) / 2.0) ** 2
    sigma = np.float32(geo["noise"])
    for k in range(n):
        s = 1.0 - (k + 0.5) / n
        img, lm, lsm, fm = renderer.render(s)
        _blur(img)
        i, dy, dx = offsets[k]
        img += sigma * noise[i % 4, dy:dy + rows, dx:dx + cols]
        np.rint(img, out=img)
        np.clip(img, lo, hi, out=img)
        if circle_out is not None:
            img[circle_out] = geo["padding"]
        hu[k] = img
        lung[k] = lm
        lesion[k] = lsm & lm
        finding[k] = fm

    boxes = np.full((n, 4), -1, dtype=np.int64)
    has_r = lung.any(axis=2)
    has_c = lung.any(axis=1)
    for k in np.flatnonzero(has_r.any(axis=1)):
        r = np.flatnonzero(has_r[k])
        c = np.flatnonzero(has_c[k])
        boxes[k] = (c[0], r[0], c[-1], r[-1])
    positions = np.zeros((n, 3), np.float64)
    positions[:, 0] = geo["x0"]
    positions[:, 1] = geo["y0"]
    positions[:, 2] = np.round(geo["z_bottom"] + np.arange(n) * geo["spacing"], 4)
    return Study(
        hu=hu,
        lung_mask=lung,
        lesion_mask=lesion,
        finding_mask=finding,
        valid_boxes=boxes,
        kind=kind,
        label=int(kind == "covid"),
        pixel_spacing=(ps, ps),
        slice_thickness=geo["thickness"],
        slice_spacing=geo["spacing"],
        positions=positions,
        seed=int(seed),
        rescale_intercept=geo["intercept"],
        pixel_representation=geo["pixel_representation"],
        padding_hu=geo["padding"] if geo["circle"] else None,
        stage=stage,
        findings=[f.summary() for f in findings],
        patient={"sex": "F" if p.female else "M", "age": int(18 + (seed * 7919) % 70),
                 "length_mm": round(p.length, 1)},
        noise_sigma=float(sigma),
    )


def sample_geometry(p: Patient, rng: np.random.Generator, n_slices, matrix, ov) -> dict:
    """The acquisition geometry of a study (matrix, field of view, slice count, spacing and thickness) drawn
    from ``rng`` for patient ``p``; ``n_slices``, ``matrix`` and the overrides ``ov`` win where given."""
    u = rng.random()
    if u < 0.82:
        shape = (512, 512)
    elif u < 0.9:
        shape = (768, 768)
    else:
        shape = (512, int(rng.integers(400, 481)))
    if matrix is not None:
        shape = (int(matrix), int(matrix))
    rows, cols = (int(v) for v in ov.get("shape", shape))
    fov = (2.0 * p.body_a * 0.98 + 40.0) * rng.uniform(1.0, 1.12)
    ps = round(float(np.clip(fov / max(rows, cols), 0.55, 0.9)), 6)
    if min(rows, cols) < 400:  # small matrices used in tests: keep the whole chest in view
        ps = round(fov / min(rows, cols), 6)
    ps = float(ov.get("pixel_spacing", ps))
    spacing = float(rng.choice(SLICE_SPACINGS, p=[0.25, 0.35, 0.2, 0.2]))
    if rows * cols > 512 * 512 and spacing < 1.25:
        spacing = 1.25  # keeps a large-matrix study (and its masks) under ~1 GB
    thick_double = rng.random() < 0.3
    if n_slices is not None:
        spacing = min(SLICE_SPACINGS, key=lambda v: abs(np.log(v * n_slices / p.length)))
        n = int(n_slices)
    else:
        n = int(np.clip(round(p.length / spacing), 60, 600))
    spacing = float(ov.get("slice_spacing", spacing))
    thickness = spacing * 2.0 if (thick_double and spacing <= 1.25) else spacing
    thickness = float(ov.get("slice_thickness", thickness))
    xc = rng.uniform(-12.0, 12.0)
    yc = p.body_cy + rng.uniform(5.0, 30.0)
    x0 = round(float(xc - (cols - 1) / 2.0 * ps), 4)
    y0 = round(float(yc - (rows - 1) / 2.0 * ps), 4)
    intercept, rep = RESCALE_CONVENTIONS[int(rng.choice(4, p=[0.4, 0.3, 0.2, 0.1]))]
    intercept = int(ov.get("rescale_intercept", intercept))
    rep = int(ov.get("pixel_representation", rep))
    circle = bool(ov.get("circle", rng.random() < 0.35))
    padding = intercept if rep == 0 else int(rng.choice([-2000, -3024]))
    hu_min = float(max(intercept, -1024)) if rep == 0 else -1024.0
    noise = float(ov.get("noise", np.clip(rng.uniform(9.0, 20.0) * np.sqrt(1.25 / thickness), 5.0, 30.0)))
    kernel = float(rng.uniform(0.17, 0.3))
    z_bottom = round(float(rng.uniform(-450.0, -250.0)), 3)
    return dict(shape=(rows, cols), ps=ps, n=n, spacing=spacing, thickness=thickness, x0=x0, y0=y0,
                intercept=intercept, pixel_representation=rep, circle=circle, padding=padding,
                hu_min=hu_min, noise=noise, kernel=kernel, z_bottom=z_bottom)


def _bowel(p: Patient, rng: np.random.Generator) -> list[Blob]:
    out = []
    for _ in range(int(rng.integers(2, 6))):
        s = rng.uniform(p.dome_l_s + 0.12, 1.03)
        cy, ac, bc = (float(v) for v in p.cavity(min(s, 1.0)))
        out.append(Blob(float(rng.uniform(-0.5, 0.6) * ac), float(cy + rng.uniform(-0.6, 0.1) * bc), float(s * p.length),
                        float(rng.uniform(10, 22)), float(rng.uniform(7, 14)), float(rng.uniform(10, 20)),
                        float(rng.uniform(0, 3))))
    return out
