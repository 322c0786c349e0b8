"""Classical lung fields of an axial HU slice: thresholds, connected components, hole filling.

Pure numpy and scipy, like :mod:`ctscreen.postprocess`, which uses it (and carries a verbatim copy of
it into the ``postprocess`` python-backend model) to check the valid-area model against the slice's
own Hounsfield units: a valid-area region counts only when it lies on aerated lung inside the body,
so the model can no longer draw the valid area over bowel gas, a kidney or the air on the CT table.
The training loaders (:mod:`training.realct`) use the same function to label real slices that come
without lung masks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

AIR_BELOW_HU = -400.0
"""Air (lung parenchyma included) is below this."""

OUTSIDE_AIR_HU = -960.0
"""Air touching the image's edge whose median is below this is the air around the patient."""

MIN_FIELD_FRACTION = 0.004
"""Air components smaller than this share of the slice (trachea, specks, a bubble) are not lung."""

MIN_AIR_SHARE = 0.25
"""A component grown by ``seed`` pixels (suspected lesions) must still be this share aerated."""


def lung_field(
    hu: np.ndarray,
    lesion: np.ndarray | None = None,
    *,
    min_frac: float = MIN_FIELD_FRACTION,
    seed: np.ndarray | None = None,
) -> np.ndarray:
    """Both lung fields (bool, same shape) of one axial HU slice by thresholds and components.

    Air below -400 HU; components touching the image edge whose median is below -960 HU (more than
    half their pixels below it) are the air outside the body; components smaller than ``min_frac`` of the image (trachea, specks, a bubble)
    are dropped; air whose rim is mostly tissue other than the body (the CT table's foam core, a
    cushion) is dropped; holes (vessels, nodules) are filled and ``lesion`` pixels are added, so that
    dense consolidation against the chest wall still counts as lung.

    ``seed`` (bool, same shape; the serving path passes the lesion net's pixels) counts as air while
    the components are found: a diseased lung base, whose aerated parts are specks between
    consolidation, then forms one field instead of specks below ``min_frac``. A component grown so
    counts when its aerated pixels alone reach ``min_frac`` (as without a seed) or when, at that
    size, at least :data:`MIN_AIR_SHARE` of it is aerated: a lesion-like blob with no air around it
    (on a cushion, in the abdomen) still makes no field.

    >>> hu = np.full((64, 64), -1000.0, np.float32); hu[8:56, 4:60] = 40.0     # body in air
    >>> hu[16:48, 10:28] = -850.0; hu[16:48, 36:54] = -850.0                   # two lungs
    >>> field = lung_field(hu); int(field.sum()), bool(field[30, 20]), bool(field[30, 31])
    (1144, True, False)
    >>> int(lung_field(np.full((64, 64), 40.0, np.float32)).sum())             # no air, no lung
    0
    """
    aerated = hu < AIR_BELOW_HU
    aerated = ndimage.binary_opening(np.pad(aerated, 1, mode="edge"), iterations=1)[1:-1, 1:-1]  # the edge repeated
    air = aerated | seed.astype(bool) if seed is not None else aerated
    lab, n = ndimage.label(air)
    if n == 0:
        lungs = np.zeros_like(air)
        return lungs | lesion.astype(bool) if lesion is not None else lungs
    flat = lab.ravel()
    sizes = np.bincount(flat, minlength=n + 1)[1:]
    big = sizes >= min_frac * hu.size
    if seed is not None:
        aired = np.bincount(flat, weights=aerated.ravel(), minlength=n + 1)[1:]
        big = (aired >= min_frac * hu.size) | (big & (aired >= MIN_AIR_SHARE * sizes))
    edge, outside = _outside(lab, n, sizes, hu)
    keep = np.zeros(n + 1, bool)
    keep[1:] = big & ~outside[1:]
    # lungs lie inside the body: air whose rim is mostly some other tissue (the foam core of the CT
    # table, a cushion) is not lung. Only for air that the image's edge does not cut: on a crop the
    # body wall is in pieces, and a lung there touches the edge.
    tissue = ~air
    tlab, tn = ndimage.label(tissue)
    if tn:
        body = tlab == 1 + int(np.argmax(np.bincount(tlab.ravel(), minlength=tn + 1)[1:]))
        objects = ndimage.find_objects(lab)
        for i in np.flatnonzero(keep & ~edge):
            s = objects[i - 1]
            win = tuple(slice(max(0, d.start - 3), d.stop + 3) for d in s)  # the rim lies within 2 px
            comp = lab[win] == i
            rim = ndimage.binary_dilation(comp, iterations=2) & tissue[win]
            if rim.any() and (rim & body[win]).sum() < 0.5 * rim.sum():
                keep[i] = False
    lungs = keep[lab]
    if lesion is not None:
        lungs |= lesion.astype(bool)
    # close with the image's edge repeated, so that a field cut by the crop keeps its rim
    pad = 3
    lungs = ndimage.binary_closing(np.pad(lungs, pad, mode="edge"), iterations=3)[pad:-pad, pad:-pad]
    return ndimage.binary_fill_holes(lungs)


def _outside(lab: np.ndarray, n: int, sizes: np.ndarray, hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per label of the air components ``lab`` (0 included, never set): whether it touches the image's edge, and
    whether it is the air around the patient (touches the edge, its median below :data:`OUTSIDE_AIR_HU`)."""
    # "median below -960 HU", counted: more than half of the component's pixels are below it
    outside_like = np.bincount(lab.ravel(), weights=(hu < OUTSIDE_AIR_HU).ravel(), minlength=n + 1)[1:] > 0.5 * sizes
    edge = np.zeros(n + 1, bool)
    for border in (lab[0], lab[-1], lab[:, 0], lab[:, -1]):
        edge[np.unique(border)] = True
    edge[0] = False
    outside = np.zeros(n + 1, bool)
    outside[1:] = edge[1:] & outside_like
    return edge, outside


def coarse_lung_field(hu: np.ndarray, lesion: np.ndarray | None = None, *, step: int = 4) -> np.ndarray:
    """:func:`lung_field` on every ``step``-th pixel, blown back up to ``hu``'s shape, with ``lesion``
    (at the same coarse scale: any lesion pixel in a ``step x step`` cell) as its ``seed``.

    Lungs are tens of millimetres across, so a 128 x 128 look at a 512 slice finds the same fields in
    a twentieth of the time (the serving path runs it on every slice). Dense consolidation is not air,
    so lesion regions count as lung, but only with air around them: a diseased base whose aerated
    parts are specks between lesions makes one field, a lesion-like blob on the CT table's cushion
    or in the abdomen makes none.

    >>> hu = np.full((64, 64), -1000.0, np.float32); hu[8:56, 4:60] = 40.0; hu[16:48, 10:28] = -850.0
    >>> lesion = np.zeros((64, 64), bool); lesion[20:30, 28:32] = True; lesion[2:6, 2:6] = True
    >>> field = coarse_lung_field(hu, lesion, step=2)
    >>> bool(field[25, 30]), bool(field[3, 3])       # touches the lung / lies in the air outside
    (True, False)
    >>> blob = np.zeros((64, 64), bool); blob[40:52, 36:56] = True          # no air around it
    >>> bool(coarse_lung_field(hu, blob, step=2)[45, 45])
    False
    """
    if hu.ndim != 2:
        raise ValueError(f'Argument "hu" must be 2-D, got shape {hu.shape}.')
    seed = any_per_cell(lesion, step) if lesion is not None and lesion.any() else None
    small = lung_field(np.asarray(hu[::step, ::step], dtype=np.float32), seed=seed)
    return np.repeat(np.repeat(small, step, axis=0), step, axis=1)[: hu.shape[0], : hu.shape[1]]


def any_per_cell(mask: np.ndarray, step: int) -> np.ndarray:
    """Whether each ``step x step`` cell of a bool ``mask`` holds a True pixel, in ``mask[::step, ::step]``'s
    shape (cells cut by the edge count what they hold).

    >>> m = np.zeros((9, 8), bool); m[5, 6] = True
    >>> any_per_cell(m, 4).astype(int).tolist()
    [[0, 0], [0, 1], [0, 0]]
    """
    rows, cols = mask.shape
    if step == 4 and rows % 4 == 0 and cols % 4 == 0:
        # the serving path (512 x 512, step 4): four neighbouring pixels are one 32-bit word
        words = np.ascontiguousarray(mask, dtype=bool).view(np.uint32).reshape(rows // 4, 4, cols // 4)
        return (words[:, 0] | words[:, 1] | words[:, 2] | words[:, 3]) != 0
    h, w = -(-rows // step) * step, -(-cols // step) * step
    padded = np.zeros((h, w), bool)
    padded[:rows, :cols] = mask
    return padded.reshape(h // step, step, w // step, step).any(axis=(1, 3))



CHEST_LUNG_FIELD_CM2 = 50.0
"""A chest CT's widest lung field is at least this many cm² (both lungs); :data:`CHEST_BODY_CM2` must fail too.

Measured by :func:`section_areas_cm2` (``docs/case-rule.md``, 8): 232-251 cm² on real adult chest slices of four
scanners, 164-279 cm² for the phantom's chests; 0-19 cm² on real head, face, neck and abdomen slices. Air only:
lungs filled by ground glass above -400 HU or by consolidation measure less (a synthetic chest with diffuse
ground glass at -420 HU: 20-63 cm²; at -350 HU: 0), which is why the body section must be small too."""

CHEST_BODY_CM2 = 300.0
"""A chest CT's widest body section is at least this many cm², whatever fills its lungs.

Measured by :func:`section_areas_cm2`: 383-821 cm² on real adult chest slices (383 on a 20 cm field of view that
cuts the chest wall), 542-741 cm² for the phantom's chests; 159-243 cm² on real head and face slices. A child's
chest may be smaller: it still counts as a chest while its lungs hold air (:data:`CHEST_LUNG_FIELD_CM2`); so does
a field of view under about 17 cm, whose whole area is under this."""

PROBE_STEP = 8
"""The look of :func:`section_areas_cm2`: a 64 x 64 look at a 512 slice (under 1 ms; the serving check's 128 x 128
look, :func:`coarse_lung_field`, costs 1.7 ms), ample for areas of tens of cm²."""


def section_areas_cm2(hu: np.ndarray, mm_per_pixel: tuple[float, float], *,
                      step: int = PROBE_STEP) -> tuple[float, float]:
    """The areas, in cm², of both lung fields (:func:`lung_field`, without a seed) and of the body section of one
    axial HU slice: the largest region that is not the air around the patient (:func:`_outside`), so the lungs
    and a field of view that cuts the chest wall count, and a table or a head holder apart from the body does not.

    ``mm_per_pixel`` is the (row, column) size of one pixel of ``hu``. Both are found on every ``step``-th
    pixel: each pixel of that look stands for ``step x step`` pixels of ``hu``.

    >>> hu = np.full((512, 512), -1000.0, np.float32); hu[64:448, 32:480] = 40.0      # body in air
    >>> hu[128:384, 80:216] = -850.0; hu[128:384, 296:432] = -850.0                   # two lungs
    >>> [round(a) for a in section_areas_cm2(hu, (0.7, 0.7))]                        # 2 x 256 x 136 px; 384 x 448
    [339, 843]
    >>> section_areas_cm2(np.full((512, 512), 40.0, np.float32), (0.7, 0.7))[0]      # no air, no lung
    0.0
    """
    if hu.ndim != 2:
        raise ValueError(f'Argument "hu" must be 2-D, got shape {hu.shape}.')
    if step < 1:
        raise ValueError(f'Argument "step" must be >= 1, got {step}.')
    small = np.asarray(hu[::step, ::step], dtype=np.float32)
    field = lung_field(small)
    lab, n = ndimage.label(small < AIR_BELOW_HU)
    _, outside = _outside(lab, n, np.bincount(lab.ravel(), minlength=n + 1)[1:], small)
    regions, m = ndimage.label(~outside[lab])
    body = int(np.bincount(regions.ravel(), minlength=m + 1)[1:].max()) if m else 0
    pixel_cm2 = step * step * mm_per_pixel[0] * mm_per_pixel[1] / 100.0
    return float(field.sum()) * pixel_cm2, body * pixel_cm2


SECTION_PROBES = 12
"""Slices spread evenly over a series whose sections :func:`widest_sections` measures (under 1 ms each).

Ten inner probes land several times in the lungs of a chest series, of a chest-abdomen-pelvis series a few times;
the measures only have to tell a chest from a head (over 160 cm² of lung field against under 20, over 380 cm² of
body against under 250)."""


def widest_sections(
    slice_at: Callable[[int], np.ndarray],
    mm_at: Callable[[int], tuple[float, float] | None],
    n: int,
    probes: int = SECTION_PROBES,
) -> tuple[float | None, float | None]:
    """The widest lung field and the widest body section (cm², :func:`section_areas_cm2`) of up to ``probes`` of
    the ``n`` slices of a series, spread evenly over it (first and last included): slice ``i`` is ``slice_at(i)``,
    its pixel ``mm_at(i)`` (None: unknown). ``(None, None)`` when a probed slice's pixel size is unknown or when
    ``n`` is 0. The probes may miss the very widest slice: the measures are "the widest probe".

    >>> hu = np.full((512, 512), -1000.0, np.float32); hu[64:448, 32:480] = 40.0
    >>> [round(a) for a in widest_sections(lambda i: hu, lambda i: (0.7, 0.7), 40)]      # a body, no lungs
    [0, 843]
    >>> widest_sections(lambda i: hu, lambda i: None if i == 39 else (0.7, 0.7), 40)     # the last probe unknown
    (None, None)
    """
    lungs = body = 0.0
    if n < 1:
        return None, None
    for i in np.unique(np.linspace(0, n - 1, min(n, probes)).round().astype(int)):
        mm = mm_at(int(i))
        if mm is None:
            return None, None
        a, b = section_areas_cm2(slice_at(int(i)), mm)
        lungs, body = max(lungs, a), max(body, b)
    return lungs, body
