"""Vectorised rasterisers shared by the anatomy and the findings.

Everything here works in pixel units on one 2-D canvas (rows = y, columns = x). The shapes come
from analytic 3-D objects cut by the slice plane, so they are computed per slice without building
any 3-D volume.
"""

from __future__ import annotations

import numpy as np

_HALVES = (2, 4, 8, 16, 32, 64, 128)
_HALVES_ARR = np.array(_HALVES, dtype=np.float32)
_OFFSETS = [np.arange(-h, h + 1, dtype=np.int32) for h in _HALVES]


def splat_discs(
    canvas: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    rad: np.ndarray,
    value: float | np.ndarray,
    *,
    where: np.ndarray | None = None,
    mark: np.ndarray | None = None,
    mark_value: int | bool = True,
) -> None:
    """Paint filled discs into ``canvas`` in place.

    Parameters
    ----------
    canvas
        2-D array written in place.
    cx, cy, rad
        Centres (column, row) and radii in pixels, 1-D float arrays of equal length; radii <= 0
        are skipped.
    value
        Scalar or one value per disc.
    where
        Optional boolean canvas: only pixels where it is true are painted.
    mark
        Optional canvas (bool or integer) that receives ``mark_value`` where a disc was painted.
    """
    cx = np.asarray(cx, dtype=np.float32)
    cy = np.asarray(cy, dtype=np.float32)
    rad = np.asarray(rad, dtype=np.float32)
    if cx.size == 0:
        return
    h, w = canvas.shape
    if (rad > _HALVES[-1]).any():
        raise ValueError(f'Argument "rad" must not exceed {_HALVES[-1]} pixels.')
    values = np.broadcast_to(np.asarray(value, dtype=canvas.dtype), cx.shape)
    live = rad > 0
    cls = np.searchsorted(_HALVES_ARR, rad)
    # largest discs first, so concentric layers given outer-to-inner nest correctly
    for ci in np.unique(cls[live])[::-1]:
        sel = live & (cls == ci)
        scx, scy, srad, sval = cx[sel], cy[sel], rad[sel], values[sel]
        off = _OFFSETS[ci]
        ix = np.rint(scx).astype(np.int32)[:, None, None] + off[None, None, :]
        iy = np.rint(scy).astype(np.int32)[:, None, None] + off[None, :, None]
        d2 = (ix - scx[:, None, None]) ** 2 + (iy - scy[:, None, None]) ** 2
        inside = (d2 <= (srad * srad)[:, None, None]) & (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
        flat = (iy * w + ix)[inside]
        vals = np.broadcast_to(sval[:, None, None], inside.shape)[inside]
        if where is not None:
            keep = where.ravel()[flat]
            flat, vals = flat[keep], vals[keep]
        canvas.ravel()[flat] = vals
        if mark is not None:
            mark.ravel()[flat] = mark_value


def ellipse_weight(
    shape: tuple[int, int],
    cx: float,
    cy: float,
    a: float,
    b: float,
    angle: float,
    soft: float,
) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """Soft-edged rotated ellipse inside its bounding window.

    Returns ``(window, weight)`` where ``weight`` is 1 inside, falls linearly to 0 over the
    outer ``soft`` fraction of the normalised radius, or ``None`` when the ellipse misses the
    canvas. Units are pixels; ``angle`` in radians.
    """
    h, w = shape
    reach = max(a, b) + 1.0
    r0, r1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, h)
    c0, c1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, w)
    if r0 >= r1 or c0 >= c1 or a <= 0 or b <= 0:
        return None
    yy = (np.arange(r0, r1, dtype=np.float32) - cy)[:, None]
    xx = (np.arange(c0, c1, dtype=np.float32) - cx)[None, :]
    ca, sa = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u = (xx * ca + yy * sa) / a
    v = (-xx * sa + yy * ca) / b
    rho = u * u + v * v
    weight = np.clip((1.0 - rho) / max(soft, 1e-3), 0.0, 1.0)
    return (slice(r0, r1), slice(c0, c1)), weight
