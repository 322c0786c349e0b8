"""Classical lung fields of an axial HU slice: thresholds, connected components, hole filling.

Pure numpy and scipy, like :mod:`ctscreen.postprocess`, which uses it (and carries a verbatim copy of
it into the ``postprocess`` python-backend model) to check the valid-area model against the slice's
own Hounsfield units: a valid-area region counts only when it lies on aerated lung inside the body,
so the model can no longer draw the valid area over bowel gas, a kidney or the air on the CT table.
The training loaders (:mod:`training.realct`) use the same function to label real slices that come
without lung masks.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

AIR_BELOW_HU = -400.0
"""Air (lung parenchyma included) is below this."""

OUTSIDE_AIR_HU = -960.0
"""Air touching the image's edge whose median is below this is the air around the patient."""

MIN_FIELD_FRACTION = 0.004
"""Air components smaller than this share of the slice (trachea, specks, a bubble) are not lung."""


def lung_field(hu: np.ndarray, lesion: np.ndarray | None = None, *, min_frac: float = MIN_FIELD_FRACTION) -> np.ndarray:
    """Both lung fields (bool, same shape) of one axial HU slice by thresholds and components.

    Air below -400 HU; components touching the image edge whose median is below -960 HU (more than
    half their pixels below it) are the air outside the body; components smaller than ``min_frac`` of the image (trachea, specks, a bubble)
    are dropped; air whose rim is mostly tissue other than the body (the CT table's foam core, a
    cushion) is dropped; holes (vessels, nodules) are filled and ``lesion`` pixels are added, so that
    dense consolidation against the chest wall still counts as lung.

    >>> hu = np.full((64, 64), -1000.0, np.float32); hu[8:56, 4:60] = 40.0     # body in air
    >>> hu[16:48, 10:28] = -850.0; hu[16:48, 36:54] = -850.0                   # two lungs
    >>> field = lung_field(hu); int(field.sum()), bool(field[30, 20]), bool(field[30, 31])
    (1144, True, False)
    >>> int(lung_field(np.full((64, 64), 40.0, np.float32)).sum())             # no air, no lung
    0
    """
    air = hu < AIR_BELOW_HU
    air = ndimage.binary_opening(np.pad(air, 1, mode="edge"), iterations=1)[1:-1, 1:-1]  # the edge repeated
    lab, n = ndimage.label(air)
    if n == 0:
        lungs = np.zeros_like(air)
        return lungs | lesion.astype(bool) if lesion is not None else lungs
    flat = lab.ravel()
    sizes = np.bincount(flat, minlength=n + 1)[1:]
    # "median below -960 HU", counted: more than half of the component's pixels are below it
    outside_like = np.bincount(flat, weights=(hu < OUTSIDE_AIR_HU).ravel(), minlength=n + 1)[1:] > 0.5 * sizes
    edge = np.zeros(n + 1, bool)
    for border in (lab[0], lab[-1], lab[:, 0], lab[:, -1]):
        edge[np.unique(border)] = True
    keep = np.zeros(n + 1, bool)
    keep[1:] = (sizes >= min_frac * hu.size) & ~(edge[1:] & outside_like)
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


def coarse_lung_field(hu: np.ndarray, lesion: np.ndarray | None = None, *, step: int = 4) -> np.ndarray:
    """:func:`lung_field` on every ``step``-th pixel, blown back up to ``hu``'s shape, plus each
    connected ``lesion`` region that touches that field.

    Lungs are tens of millimetres across, so a 128 x 128 look at a 512 slice finds the same fields in
    a twentieth of the time (the serving path runs it on every slice). Dense consolidation against the
    chest wall is not air, so lesion regions count as lung, but only those that touch aerated lung:
    a lesion-like blob on the CT table's cushion or in the abdomen must not make its own lung field.

    >>> hu = np.full((64, 64), -1000.0, np.float32); hu[8:56, 4:60] = 40.0; hu[16:48, 10:28] = -850.0
    >>> lesion = np.zeros((64, 64), bool); lesion[20:30, 28:32] = True; lesion[2:6, 2:6] = True
    >>> field = coarse_lung_field(hu, lesion, step=2)
    >>> bool(field[25, 30]), bool(field[3, 3])       # touches the lung / lies in the air outside
    (True, False)
    """
    if hu.ndim != 2:
        raise ValueError(f'Argument "hu" must be 2-D, got shape {hu.shape}.')
    small = lung_field(np.asarray(hu[::step, ::step], dtype=np.float32))
    if lesion is not None and small.any() and lesion.any():
        # lesion regions (at the same coarse scale: any lesion pixel in a step x step cell) that touch
        # the aerated field join it
        h, w = (-(-n // step) * step for n in lesion.shape)
        padded = np.zeros((h, w), bool)
        padded[: lesion.shape[0], : lesion.shape[1]] = lesion
        cells = padded.reshape(h // step, step, w // step, step).any(axis=(1, 3))[: small.shape[0], : small.shape[1]]
        lab, n = ndimage.label(cells, structure=np.ones((3, 3), bool))
        touching = np.zeros(n + 1, bool)
        touching[np.unique(lab[ndimage.binary_dilation(small) & (lab > 0)])] = True
        touching[0] = False
        small = small | touching[lab]
    return np.repeat(np.repeat(small, step, axis=0), step, axis=1)[: hu.shape[0], : hu.shape[1]]
