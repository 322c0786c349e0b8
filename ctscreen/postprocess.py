"""From probability maps to boxes: the one post-processing used by Triton and by every reference.

This module is pure (numpy and scipy only) so that the ``postprocess`` python-backend model can carry
a verbatim copy of it, and the in-process reference pipeline, the tests and the benchmarks import the
very same code.

Rules (the paper's, with the open choices decided here)
-------------------------------------------------------
* A pixel is foreground when its probability is ``>= cutoff`` (default 0.50).
* Regions are 8-connected components of the foreground.
* A region's box is the smallest rectangle holding it, as inclusive pixel indices
  ``(x0, y0, x1, y1)``; it "covers" ``(x1 - x0 + 1) * (y1 - y0 + 1)`` pixels and counts when that is
  ``> min_area`` (default 25).
* A region's score is the mean probability over its pixels (so always ``>= cutoff``).
* The valid area is the smallest rectangle holding every valid-area region whose box counts; it is
  empty (``EMPTY_BOX``) when no region counts. ctscreen's addition: a valid-area region counts only
  when at least :data:`~ctscreen.contracts.MIN_LUNG_SHARE` of its pixels lie on the slice's classical
  lung field (:func:`ctscreen.lungs.coarse_lung_field` of the HU the models saw, with the lesion
  pixels as seeds, so that a lung filled by pneumonia is still lung). The paper's valid-area net alone drew its rectangle over bowel
  gas, a kidney and the air on the CT table of a real abdomen slice.
* A lesion box is dropped when its centre lies outside the valid-area box (inclusive), and every lesion
  box is dropped when the valid area is empty.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage

from ctscreen.contracts import EMPTY_BOX, MIN_BOX_AREA, MIN_LUNG_SHARE, PADDING_ROW, PROB_CUTOFF
from ctscreen.lungs import coarse_lung_field

_EIGHT = np.ones((3, 3), dtype=bool)


def _regions(prob: np.ndarray, cutoff: float, min_area: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Labels, boxes ``[N, 4]`` of every region, the mask of those that count, and N."""
    if prob.ndim != 2:
        raise ValueError(f'Argument "prob" must be 2-D, got shape {prob.shape}.')
    labels, n = ndimage.label(prob >= cutoff, structure=_EIGHT)
    if n == 0:
        return labels, np.zeros((0, 4), np.float32), np.zeros((0,), bool), 0
    boxes = np.array(
        [(s[1].start, s[0].start, s[1].stop - 1, s[0].stop - 1) for s in ndimage.find_objects(labels)],
        dtype=np.float32,
    )
    area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    return labels, boxes, area > min_area, int(n)


def regions(prob: np.ndarray, cutoff: float, min_area: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes ``[N, 4]`` (float32) and mean scores ``[N]`` of the regions of one 2-D map that count."""
    labels, boxes, keep, n = _regions(prob, cutoff, min_area)
    if n == 0:
        return boxes, np.zeros((0,), np.float32)
    fg = labels > 0  # sums over the foreground alone: the same pixels in the same order, a fraction of the work
    on = labels[fg]
    sums = np.bincount(on, weights=prob[fg].astype(np.float64), minlength=n + 1)[1:]
    counts = np.bincount(on, minlength=n + 1)[1:]
    scores = (sums / counts).astype(np.float32)
    return boxes[keep], scores[keep]


def valid_area_box(
    prob: np.ndarray,
    cutoff: float = PROB_CUTOFF,
    min_area: int = MIN_BOX_AREA,
    lungs: np.ndarray | None = None,
) -> np.ndarray:
    """The valid-area box ``[4]`` of one 2-D valid-area probability map (``EMPTY_BOX`` if none).

    ``lungs`` (bool, same shape): the slice's lung field; a region counts only when at least
    :data:`~ctscreen.contracts.MIN_LUNG_SHARE` of its pixels lie on it (and then with its whole box).
    None: no such check (the paper's rule alone; for maps without a slice, e.g. in unit tests).

    >>> p = np.zeros((64, 64), np.float32); p[10:20, 30:40] = 0.9; p[40:50, 5:15] = 0.9
    >>> valid_area_box(p).tolist()
    [5.0, 10.0, 39.0, 49.0]
    >>> lungs = np.zeros((64, 64), bool); lungs[12:14, 30:40] = True     # 20 of the region's 100 px
    >>> valid_area_box(p, lungs=lungs).tolist()
    [30.0, 10.0, 39.0, 19.0]
    """
    labels, boxes, keep, n = _regions(prob, cutoff, min_area)
    if lungs is not None and n:
        if lungs.shape != prob.shape:
            raise ValueError(f'Argument "lungs" must have shape {prob.shape}, got {lungs.shape}.')
        fg = labels > 0  # counts over the foreground alone (the valid-area map's regions)
        pixels = np.bincount(labels[fg], minlength=n + 1)[1:]
        on_lung = np.bincount(labels[fg & lungs.astype(bool, copy=False)], minlength=n + 1)[1:]
        keep &= on_lung >= MIN_LUNG_SHARE * pixels
    boxes = boxes[keep]
    if len(boxes) == 0:
        return np.array(EMPTY_BOX, dtype=np.float32)
    return np.array(
        [boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max()], dtype=np.float32
    )


def is_empty_box(box: np.ndarray | tuple[float, ...]) -> bool:
    """True when ``box`` is the empty valid area (any negative coordinate)."""
    return bool(np.any(np.asarray(box) < 0))


def inside_valid_area(boxes: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Boolean mask over ``boxes [N, >=4]``: the box centre lies inside ``valid`` (inclusive)."""
    if is_empty_box(valid):
        return np.zeros(len(boxes), dtype=bool)
    cx = (boxes[:, 0] + boxes[:, 2]) / 2.0
    cy = (boxes[:, 1] + boxes[:, 3]) / 2.0
    return (cx >= valid[0]) & (cx <= valid[2]) & (cy >= valid[1]) & (cy <= valid[3])


def lesion_boxes(
    prob: np.ndarray,
    valid: np.ndarray,
    cutoff: float = PROB_CUTOFF,
    min_area: int = MIN_BOX_AREA,
) -> np.ndarray:
    """Lesion boxes ``[N, 5]`` (x0, y0, x1, y1, score) of one 2-D lesion map, inside ``valid``.

    >>> p = np.zeros((64, 64), np.float32); p[10:20, 30:40] = 0.8; p[50:52, 5:7] = 0.9
    >>> lesion_boxes(p, np.array([0, 0, 63, 63], np.float32)).tolist()
    [[30.0, 10.0, 39.0, 19.0, 0.800000011920929]]
    >>> lesion_boxes(p, np.array(EMPTY_BOX, np.float32)).shape
    (0, 5)
    """
    boxes, scores = regions(prob, cutoff, min_area)
    out = np.concatenate([boxes, scores[:, None]], axis=1).astype(np.float32)
    return out[inside_valid_area(out, valid)]


def postprocess_batch(
    valid_prob: np.ndarray,
    lesion_prob: np.ndarray,
    hu: np.ndarray,
    cutoff: float = PROB_CUTOFF,
    min_area: int = MIN_BOX_AREA,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Post-process a batch of maps ``[B, 1, H, W]`` of the slices ``hu`` (INT16 ``[B, 1, H, W]``, the
    HU the models saw) into the ensemble's three outputs.

    Returns
    -------
    lesion_boxes : float32 [B, K, 5], K = max(1, most boxes on one slice); padding rows are -1.
    box_count : int32 [B, 1]
    valid_area : float32 [B, 4]
    """
    if valid_prob.shape != lesion_prob.shape or valid_prob.ndim != 4 or valid_prob.shape[1] != 1:
        raise ValueError(
            "Arguments \"valid_prob\" and \"lesion_prob\" must both be [B, 1, H, W], got "
            f"{valid_prob.shape} and {lesion_prob.shape}."
        )
    if hu.shape != valid_prob.shape:
        raise ValueError(f'Argument "hu" must have the maps\' shape {valid_prob.shape}, got {hu.shape}.')
    per_slice_valid = [
        valid_area_box(v[0], cutoff, min_area, coarse_lung_field(h[0], p[0] >= cutoff))
        for v, p, h in zip(valid_prob, lesion_prob, hu, strict=True)
    ]
    per_slice_boxes = [
        lesion_boxes(p[0], v, cutoff, min_area) for p, v in zip(lesion_prob, per_slice_valid, strict=True)
    ]
    k = max([1] + [len(b) for b in per_slice_boxes])
    out = np.tile(np.array(PADDING_ROW, np.float32), (len(per_slice_boxes), k, 1))
    for i, b in enumerate(per_slice_boxes):
        out[i, : len(b)] = b
    counts = np.array([[len(b)] for b in per_slice_boxes], dtype=np.int32).reshape(-1, 1)
    return out, counts, np.stack(per_slice_valid).astype(np.float32).reshape(-1, 4)


def unpack_boxes(boxes: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """Split the padded ``[B, K, 5]`` ensemble output into one ``[n_i, 5]`` array per slice."""
    return [boxes[i, : int(counts[i].reshape(-1)[0])] for i in range(len(boxes))]


class SliceBoxes(NamedTuple):
    """What the ensemble found on one slice (512 grid), unpacked from its output tensors."""

    boxes: np.ndarray
    """float32 ``[n, 5]`` lesion boxes ``(x0, y0, x1, y1, score)``, no padding rows."""
    valid_area: np.ndarray
    """float32 ``[4]`` valid-area box, ``EMPTY_BOX`` when empty."""


def unpack_outputs(lesion_boxes: np.ndarray, box_count: np.ndarray, valid_area: np.ndarray) -> list[SliceBoxes]:
    """The ensemble's three output tensors for a batch of ``B`` slices, one :class:`SliceBoxes` per slice.

    The one place the outputs (``LESION_BOXES [B, K, 5]``, ``BOX_COUNT [B, 1]``, ``VALID_AREA_BOX [B, 4]``,
    from Triton or from :func:`postprocess_batch`) are decoded; the arrays returned are copies.

    >>> hu = np.full((2, 1, 8, 8), -850, np.int16)   # all lung
    >>> out = unpack_outputs(*postprocess_batch(np.ones((2, 1, 8, 8), np.float32), np.zeros((2, 1, 8, 8), np.float32), hu))
    >>> [(s.boxes.shape, s.valid_area.tolist()) for s in out]
    [((0, 5), [0.0, 0.0, 7.0, 7.0]), ((0, 5), [0.0, 0.0, 7.0, 7.0])]
    """
    n = len(box_count)
    boxes = unpack_boxes(np.asarray(lesion_boxes).reshape(n, -1, 5), np.asarray(box_count).reshape(n, -1))
    valid = np.asarray(valid_area).reshape(n, 4)
    return [SliceBoxes(np.array(b, dtype=np.float32), np.array(v, dtype=np.float32)) for b, v in zip(boxes, valid, strict=True)]
